"""The resolver's hand-off: worker threads for libc's getaddrinfo and friends.

A green resolver call (csrc/twins/green_resolve.c) queues its job in C and enters
here once (entry greenify_offload) to make sure a worker thread will come.
That worker runs a *runner*: a C loop that calls libc for queued jobs until
none is left, without the GIL.  The runner goes to the calling greenlet's
waiter (greenify/waiting/bridge.py's selection rule: with gevent, the hub's thread
pool), unless enough runners are already on their way (C decides, and
bounds them), and this returns at once; the C side then waits, through the
ordinary wait bridge, for the eventfd the runner signals when its job is
done.  So waiting, gevent.Timeout and kill follow the bridge's rules, and
nothing here ever switches greenlets or raises into C.

A runner travels as a cffi object: when the waiter lets go of it, run or
not (a refusal, a killed submitter, a pool that was killed), C counts it out
once; if no runner is left, the queued jobs go back to their callers, which
call libc themselves.  Where no waiter serves the caller (a plain thread, a
pool worker, the hub itself) the answer is NATIVE and libc is called
directly.
"""
from __future__ import annotations

import functools

from greenlet import getcurrent

from greenify.waiting import bridge as _bridge
from greenify._green import ffi, lib

NATIVE: int = lib.GREEN_OFFLOAD_NATIVE
SUBMITTED: int = lib.GREEN_OFFLOAD_SUBMITTED


def offload(job) -> int:
    """``job`` is queued: SUBMITTED if a worker thread will run it (one was
    asked of the caller's waiter, or enough are on their way), else NATIVE."""
    waiter = _bridge.waiter_for(getcurrent())
    if waiter is None:
        return NATIVE
    runner = lib.green_offload_runner_new()
    if runner == ffi.NULL:
        return SUBMITTED
    runner = ffi.gc(runner, lib.green_offload_runner_end)
    # cffi releases the GIL around green_offload_runner_run: lookups run in parallel
    return SUBMITTED if waiter.offload(functools.partial(lib.green_offload_runner_run, runner)) else NATIVE
