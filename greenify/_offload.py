"""The resolver's handoff: libc's getaddrinfo and friends in a worker thread.

A green resolver call (csrc/green_resolve.c) builds a job and enters here
once (entry greenify_offload).  The job goes to the calling greenlet's
waiter (greenify/_bridge.py's selection rule: with gevent, the hub's thread
pool) and this returns at once; the C side then waits, through the ordinary
wait bridge, for the eventfd the worker signals when done.  So waiting,
gevent.Timeout and kill follow the bridge's rules, and nothing here ever
switches greenlets or raises into C.

The worker's share of the job is one reference, held by a cffi object that
travels with the job runner: when the runner has run, or is dropped unrun (a
killed submitter, a pool that was killed), the object goes away and C drops
the reference; an unrun job then goes back to its caller, which calls libc
itself.  Where no waiter serves the caller (a plain thread, a pool worker,
the hub itself) the answer is NATIVE and libc is called directly.
"""
from __future__ import annotations

import functools

from greenlet import getcurrent

from greenify import _bridge
from greenify._green import ffi, lib

NATIVE: int = lib.GREEN_OFFLOAD_NATIVE
SUBMITTED: int = lib.GREEN_OFFLOAD_SUBMITTED


def offload(job) -> int:
    """Hand ``job`` to a worker thread: SUBMITTED, or NATIVE."""
    waiter = _bridge.waiter_for(getcurrent())
    if waiter is None:
        return NATIVE
    worker_ref = ffi.gc(lib.green_offload_retain(job), lib.green_offload_drop)
    # cffi releases the GIL around green_offload_run: the lookup runs in parallel
    return SUBMITTED if waiter.offload(functools.partial(lib.green_offload_run, worker_ref)) else NATIVE
