"""The wait bridge: how a green function's wait is carried out.

The green functions (C) decide *when* to wait; this module decides *how*.
Its functions are entered from C through greenify/entries.py, with the GIL
held and no exception pending (csrc/wait/green_python.c set the caller's aside),
and never raise into C.

Which waiter serves a wait, per wait: the current greenlet's own, if one was
registered with ``use_waiter``; otherwise, if gevent has been imported, the
thread has a hub (never created here) and the caller is not the hub, that
hub (greenify/waiting/gevent_side.py); otherwise none: the answer is CANNOT_WAIT
and the C side blocks natively, as libc would.  Importing greenify never
imports gevent.

An exception a waiter raises is kept by interruptions.py; the outcomes,
events and the Waiter protocol every side shares are in protocol.py.
"""
from __future__ import annotations

import atexit
import sys
from typing import Callable, Dict, Optional

from greenlet import getcurrent, greenlet

from greenify._green import lib

from greenify.waiting.interruptions import interrupted, interrupted_by, pending_interruptions, take_pending_interrupt
from greenify.waiting.protocol import (CANNOT_WAIT, INTERRUPTED, READ, SWEEP_INTERVAL_S, TIMED_OUT, WOKEN, WRITE,
                                       Waiter, descriptor_closed)

__all__ = ["use_waiter", "drop_waiter", "waiter_for", "wait", "closing",
           # from protocol.py and interruptions.py, for the entries and the sides
           "CANNOT_WAIT", "INTERRUPTED", "READ", "SWEEP_INTERVAL_S", "TIMED_OUT", "WOKEN", "WRITE", "Waiter",
           "descriptor_closed", "interrupted", "interrupted_by", "pending_interruptions", "take_pending_interrupt"]


class _Registered:
    """A registered Waiter, seen the way the bridge calls the hub's."""

    __slots__ = ("waiter", "thread_root")

    def __init__(self, waiter: Waiter, thread_root: greenlet) -> None:
        self.waiter = waiter
        self.thread_root = thread_root

    def green_wait(self, current: greenlet, watches, nwatches: int, timeout: float) -> int:
        pairs = [(watches[i].fd, watches[i].events) for i in range(nwatches)]
        try:
            result = self.waiter.wait(pairs, None if timeout < 0 else timeout)
        except BaseException as exc:  # noqa: B902 - the protocol's interruption
            return interrupted_by(current, exc)
        return TIMED_OUT if result == TIMED_OUT else WOKEN

    def closing(self, fd: int) -> None:
        self.waiter.closing(fd)

    def offload(self, job_runner: Callable[[], None]) -> bool:
        return bool(self.waiter.offload(job_runner))


# Greenlets with a waiter of their own.
_waiters: Dict[greenlet, _Registered] = {}
# Greenlets interrupted inside a C call, and what was thrown into them.


def _thread_root(glet: greenlet) -> greenlet:
    # the main greenlet of the thread glet runs in
    while glet.parent is not None:
        glet = glet.parent
    return glet


def use_waiter(glet: greenlet, waiter: Waiter) -> None:
    """From now on the green calls made in ``glet`` wait through ``waiter``."""
    _waiters[glet] = _Registered(waiter, _thread_root(glet))
    lib.green_set_waiters_registered(len(_waiters))  # the wait below Python defers to the bridge


def drop_waiter(glet: greenlet) -> None:
    """``glet``'s green calls wait as if use_waiter had never been called."""
    _waiters.pop(glet, None)
    lib.green_set_waiters_registered(len(_waiters))


# gevent's get_hub_if_exists, once gevent is imported; and the module that
# waits on a hub, imported with it.
_get_hub_if_exists: Optional[Callable[[], object]] = None
_gevent_waiter = None


def _find_gevent() -> Optional[Callable[[], object]]:
    global _get_hub_if_exists, _gevent_waiter
    hub_local = sys.modules.get("gevent._hub_local")  # a hub exists only once this is imported
    if hub_local is None or not hasattr(hub_local, "get_hub_if_exists"):
        return None
    from greenify.waiting import gevent_side as waiter_module
    _gevent_waiter = waiter_module
    _get_hub_if_exists = hub_local.get_hub_if_exists
    return _get_hub_if_exists


def _hub_waiter(hub):
    try:
        return hub._greenify
    except AttributeError:
        return _gevent_waiter.attach(hub)


def waiter_for(current: greenlet):
    """What a green call of ``current`` waits through (the selection rule
    above), or None."""
    if _waiters and current in _waiters:
        return _waiters[current]
    get_hub = _get_hub_if_exists or _find_gevent()
    if get_hub is None:
        return None
    hub = get_hub()
    if hub is None or hub is current:
        return None
    return _hub_waiter(hub)


def wait(watches, nwatches: int, timeout: float) -> int:
    """The wait of a green function (entry greenify_wait)."""
    current = getcurrent()
    if interrupted():
        return INTERRUPTED
    waiter = waiter_for(current)
    if waiter is None:
        return CANNOT_WAIT
    return waiter.green_wait(current, watches, nwatches, timeout)


def closing(fd: int) -> None:
    """fd is about to be closed (entry greenify_closing): wake its waiters on
    this thread's hub and in this thread's registered waiters, so that they
    probe again and fail instead of waiting for ever."""
    if _waiters:
        root = _thread_root(getcurrent())
        told = set()
        for registered in list(_waiters.values()):
            if registered.thread_root is root and id(registered.waiter) not in told:
                told.add(id(registered.waiter))
                registered.closing(fd)
    get_hub = _get_hub_if_exists or _find_gevent()
    hub = get_hub() if get_hub is not None else None
    if hub is not None:
        _hub_waiter(hub).closing(fd)


# After the interpreter begins to finalize, C must never enter Python again:
# green calls from then on block natively.
atexit.register(lib.green_set_finalizing)
