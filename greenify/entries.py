"""Every entry from C into Python, side by side.

The ``greenify_*`` functions are ``extern "Python+C"`` callbacks (declared
in csrc/wait/green_python.cdef) that csrc/wait/green_python.c calls with the GIL held
and no exception pending: it set the caller's pending exception aside and
puts it back, identical, afterwards, whatever happens here.  The last two
are called through the CPython API: ``record_interruption`` by the wait
below Python (csrc/wait/green_fastwait.c, through the same helper) and
``take_pending_interrupt`` by the trace function that delivers an
interruption (csrc/wait/green_deliver.c).  Each delegates to
the module that owns the rule; none lets an exception reach C (the onerror
handlers report what slips through and give C an answer that blocks
natively or does nothing).

An interruption armed for delivery (csrc/wait/green_deliver.c) never fires in
these functions: they run below the C call, in frames that descend from the
frame that made it, and the exception waits for that frame.  C finds this
module by its name (GREENIFY_ENTRIES_MODULE in csrc/wait/green_python.h).
"""
from __future__ import annotations

import logging
from typing import Optional

from greenify.waiting import bridge as _bridge
from greenify.waiting import offload as _offload
from greenify.patching import onload
from greenify._green import ffi

log = logging.getLogger("greenify")


def _wait_failed(exc_type, exc_value, traceback) -> int:
    # A fault in the bridge itself must not leave the C call hanging or
    # crash the hub: report it and let the call block natively.
    log.error("greenify: wait bridge failed; blocking natively", exc_info=(exc_type, exc_value, traceback))
    return _bridge.CANNOT_WAIT


def _closing_failed(exc_type, exc_value, traceback) -> None:
    log.error("greenify: could not wake the waiters of a descriptor being closed",
              exc_info=(exc_type, exc_value, traceback))


def _offload_failed(exc_type, exc_value, traceback) -> int:
    log.error("greenify: could not hand a resolver call to a worker thread; calling libc directly",
              exc_info=(exc_type, exc_value, traceback))
    return _offload.NATIVE


def _loaded_failed(exc_type, exc_value, traceback) -> None:
    log.error("greenify: patching a newly loaded library failed", exc_info=(exc_type, exc_value, traceback))


@ffi.def_extern(onerror=_wait_failed)
def greenify_wait(watches, nwatches: int, timeout_s: float) -> int:
    """A green function would block: wait (csrc/wait/green_wait.c, green_wait)."""
    return _bridge.wait(watches, nwatches, timeout_s)


@ffi.def_extern(onerror=lambda *exc_info: 0)
def greenify_interrupted() -> int:
    """Whether the calling greenlet must fail fast (every green call, while
    some greenlet's interruption is pending)."""
    return _bridge.interrupted()


@ffi.def_extern(onerror=_closing_failed)
def greenify_closing(fd: int) -> None:
    """The close twin is about to close fd, while some wait is in progress."""
    _bridge.closing(fd)


@ffi.def_extern(onerror=_offload_failed)
def greenify_offload(job) -> int:
    """A green resolver call hands its job to a worker thread (csrc/twins/green_resolve.c)."""
    return _offload.offload(job)


@ffi.def_extern(onerror=_loaded_failed)
def greenify_loaded() -> None:
    """A hooked dlopen added objects (csrc/patch/onload.c): patch what matches."""
    onload.on_loaded()


def record_interruption(current, exc: BaseException) -> int:
    """The wait below Python (csrc/wait/green_fastwait.c) was interrupted: keep
    the exception as the bridge does."""
    return _bridge.interrupted_by(current, exc)


def take_pending_interrupt() -> Optional[BaseException]:
    """The trace function delivering an interruption (csrc/wait/green_deliver.c)
    takes the current greenlet's kept exception here, through the CPython
    API (and, from another greenlet, drops those of greenlets that ended)."""
    return _bridge.take_pending_interrupt()
