"""The resolver's handoff: libc's getaddrinfo and friends on gevent's thread pool.

A green resolver call (csrc/green_resolve.c) builds a job and calls
``greenify_offload`` once.  This module hands the job to the calling thread's
hub threadpool and returns at once; the C side then waits on the hub, through
the ordinary wait bridge, for the eventfd the pool thread signals when done.
So waiting, gevent.Timeout and kill follow the bridge's rules, and nothing
here ever switches greenlets or raises into C.

The pool's share of the job is one reference, held by a cffi object that
travels with the task: when the task has run, or is dropped unrun (a killed
submitter, a pool that was killed), the object goes away and C drops the
reference; an unrun job then goes back to its caller, which calls libc
itself.  Where there is no hub (a plain thread, a pool worker) or the caller
is the hub, the answer is NATIVE and libc is called directly; no hub is ever
created here.
"""
from __future__ import annotations

import functools
import logging

import gevent
from gevent._hub_local import get_hub_if_exists
from greenlet import getcurrent

from greenify import _bridge
from greenify._green import ffi, lib

log = logging.getLogger("greenify")

NATIVE: int = lib.GREEN_OFFLOAD_NATIVE
SUBMITTED: int = lib.GREEN_OFFLOAD_SUBMITTED


def _offload_failed(exc_type, exc_value, traceback) -> int:
    log.error("greenify: could not hand a resolver call to the thread pool; calling libc directly",
              exc_info=(exc_type, exc_value, traceback))
    return NATIVE


def _run_in_pool(pool_ref) -> None:
    # cffi releases the GIL around the call: the lookup runs in parallel
    lib.green_offload_run(pool_ref)


def _submit(hub, pool_ref) -> None:
    # A greenlet of its own, because ThreadPool.spawn waits while every
    # worker is busy; the caller meanwhile waits in C, interruptible.
    try:
        hub.threadpool.spawn(_run_in_pool, pool_ref)
    except BaseException:  # noqa: B902 - a killed submitter just drops its reference
        log.debug("greenify: resolver job not queued", exc_info=True)


@ffi.def_extern(onerror=_offload_failed)
def greenify_offload(job) -> int:
    waiter = _bridge._waiters.get(getcurrent()) if _bridge._waiters else None  # temporary asyncio hook
    if waiter is not None:
        pool_ref = ffi.gc(lib.green_offload_retain(job), lib.green_offload_drop)
        return SUBMITTED if waiter.offload(functools.partial(_run_in_pool, pool_ref)) else NATIVE
    hub = get_hub_if_exists()
    if hub is None or getcurrent() is hub:
        return NATIVE
    pool_ref = ffi.gc(lib.green_offload_retain(job), lib.green_offload_drop)
    gevent.spawn(_submit, hub, pool_ref)
    return SUBMITTED
