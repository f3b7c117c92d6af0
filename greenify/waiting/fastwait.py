"""Attaching a thread's gevent hub to the common wait below Python
(csrc/wait/green_fastwait.c).

The C side needs the hub's libev loop and libev's io and timer start/stop,
event feeding, iteration count and clock update, which gevent's default
loop (``gevent.libev.corecext``) exports, and the layout of libev's
``struct ev_io`` and ``struct ev_timer``, which is known for the libev 4
that gevent embeds (built with an empty ``EV_COMMON``).  Any other loop (libuv,
the cffi backend, a system libev) is left to the general bridge.  The
hub is referenced weakly: when it is deallocated the C side is told first,
so a new hub at the same address is never mistaken for it.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import weakref
from typing import Dict

from greenify._green import ffi, lib

log = logging.getLogger("greenify")

# What C needs from the loop's extension module, by symbol.
_LIBEV_FUNCTIONS = ("ev_io_start", "ev_io_stop", "ev_feed_event", "ev_timer_start", "ev_timer_stop",
                    "ev_now_update")
_FAST_LOOP_MODULES = ("gevent.libev.corecext",)

# hub weakref -> handle; the weakrefs' callbacks tell C the hub is gone.
_attached: Dict[weakref.ref, int] = {}

# The most descriptors the sweeper asks C for at once.
_SWEEP_BATCH = 1024


def _libev_addresses(loop) -> "tuple[int, ...] | None":
    module = sys.modules.get(type(loop).__module__)
    if module is None or module.__name__ not in _FAST_LOOP_MODULES:
        return None
    if not getattr(module, "LIBEV_EMBED", False) or not module.get_version().startswith("libev-4."):
        return None  # struct ev_io may be laid out otherwise
    library = ctypes.CDLL(module.__file__)  # already loaded: the same handle
    return tuple(ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in _LIBEV_FUNCTIONS)


def attach(hub) -> bool:
    """Let this thread's common waits on ``hub`` take the C path; whether they will."""
    try:
        addresses = _libev_addresses(hub.loop)
        if addresses is None:
            return False
        handle = lib.green_fast_attach(id(hub), hub.loop.ptr, *(ffi.cast("void *", a) for a in addresses))
    except Exception:  # noqa: BLE001 - the general bridge still works: say why and go on
        log.debug("greenify: the fast wait is not available for this hub", exc_info=True)
        return False
    if not handle:
        return False

    def gone(ref, handle=handle) -> None:
        lib.green_fast_hub_gone(handle)
        _attached.pop(ref, None)

    _attached[weakref.ref(hub, gone)] = handle
    return True


def waiting_fds() -> list:
    """The descriptors this thread's fast waiters wait on."""
    buffer = ffi.new("int[]", _SWEEP_BATCH)
    return list(buffer[0:lib.green_fast_waiting_fds(buffer, _SWEEP_BATCH)])


def wake(fd: int) -> None:
    """Wake this thread's fast waiter on ``fd``: it probes again."""
    lib.green_fast_closing(fd)


def refresh() -> None:
    """Register anew the descriptors of this thread's fast waiters whose
    number was closed and reused (behind greenify's back) while they
    waited: the one case no wait can see when it starts."""
    lib.green_fast_refresh()
