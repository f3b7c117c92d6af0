"""The wait bridge: the only place where libgreenify's C enters Python.

A green function that would block calls ``greenify_wait`` with the
descriptors it needs and a timeout.  This module waits for them on the
calling thread's gevent hub and reports what happened; it never raises into
C, and it never creates a hub: where there is none (a plain thread, a
thread-pool worker), or where the caller is the hub itself, it answers
CANNOT_WAIT and the C side blocks natively, as libc would.

An exception thrown into a waiting greenlet (``gevent.Timeout``,
``Greenlet.kill``) is kept here and reported as INTERRUPTED; the C side then
fails the call and, once the call is back in Python, raises that very
exception in the greenlet (see csrc/green_core.c).
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import logging
from typing import Dict, Optional

from gevent._hub_local import get_hub_if_exists
from greenlet import getcurrent, greenlet

from greenify import _fastwait
from greenify._green import ffi, lib

log = logging.getLogger("greenify")

WOKEN: int = lib.GREEN_WOKEN
TIMED_OUT: int = lib.GREEN_TIMED_OUT
CANNOT_WAIT: int = lib.GREEN_CANNOT_WAIT
INTERRUPTED: int = lib.GREEN_INTERRUPTED

# Greenlets interrupted inside a C call, and what was thrown into them.
_interrupted: Dict[greenlet, BaseException] = {}


def _callback_failed(exc_type, exc_value, traceback) -> int:
    # A fault in the bridge itself must not leave the C call hanging or
    # crash the hub: report it and let the call block natively.
    log.error("greenify: wait bridge failed; blocking natively", exc_info=(exc_type, exc_value, traceback))
    return CANNOT_WAIT


def _watcher_for(hub, fd: int, events: int):
    """The hub's io watcher for (fd, events), kept from one wait to the next
    (the Python object only: libev registers the fd anew each time), and
    whether it is a private one, made because another greenlet is waiting on
    the kept one; the wait closes private watchers."""
    try:
        cache = hub._greenify_io_watchers
    except AttributeError:
        cache = hub._greenify_io_watchers = {}
        hub._greenify_private_watchers = set()
        _start_sweeper(hub)
        _fastwait.attach(hub)  # from now on the common wait on this hub stays in C
    key = fd << 2 | events
    watcher = cache.get(key)
    if watcher is None:
        watcher = cache[key] = hub.loop.io(fd, events)
        return watcher, False
    if not watcher.active:
        # The number may name another file by now: setting it again makes
        # libev register it anew (a kept registration would never fire).
        watcher.fd = fd
        return watcher, False
    watcher = hub.loop.io(fd, events)
    hub._greenify_private_watchers.add(watcher)
    return watcher, True


# How often waits on descriptors closed behind greenify's back are looked for.
SWEEP_INTERVAL_S = 1.0


def _waiting_watchers(hub, fd: Optional[int] = None) -> list:
    """The hub's io watchers a greenlet is waiting on (on ``fd``, if given)."""
    cache = getattr(hub, "_greenify_io_watchers", None)
    if not cache:
        return []
    if fd is None:
        candidates = list(cache.values())
    else:
        candidates = [cache.get(fd << 2 | events) for events in (1, 2, 3)]
    candidates.extend(watcher for watcher in hub._greenify_private_watchers if fd is None or watcher.fd == fd)
    return [watcher for watcher in candidates if watcher is not None and watcher.active]


def _wake(hub, watchers) -> None:
    # The waiter probes again and finds its descriptor gone (EBADF, POLLNVAL).
    for watcher in watchers:
        callback, args = watcher.callback, watcher.args
        watcher.stop()
        hub.loop.run_callback(callback, *args)


def _sweep(hub) -> None:
    """A descriptor closed without greenify's close twin (Python's os.close,
    an unpatched library) silently leaves epoll: its waiter would wait for
    ever.  Once a second, wake the waiters whose descriptor is gone."""
    gone = [watcher for watcher in _waiting_watchers(hub) if _closed(watcher.fd)]
    _wake(hub, gone)
    for fd in _fastwait.waiting_fds():
        if _closed(fd):
            _fastwait.wake(fd)


def _closed(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def _start_sweeper(hub) -> None:
    # ref=False: the sweeper alone never keeps the loop running
    sweeper = hub.loop.timer(SWEEP_INTERVAL_S, SWEEP_INTERVAL_S, ref=False)
    sweeper.start(_sweep, hub)
    hub._greenify_sweeper = sweeper


def _release(hub, watcher, private: bool) -> None:
    watcher.stop()
    if private:
        hub._greenify_private_watchers.discard(watcher)
        watcher.close()


def _interrupted_by(current, exc: BaseException) -> int:
    _interrupted[current] = exc
    lib.green_set_interrupts_pending(len(_interrupted))
    return INTERRUPTED


# --- temporary asyncio hook (helper `asyncio`), until boundary's Waiter bridge
# (helpers/WAITER.md) is merged: a greenlet registered here waits through its
# waiter instead of the hub.
_waiters: Dict[greenlet, object] = {}


def use_waiter(glet: greenlet, waiter) -> None:
    _waiters[glet] = waiter
    lib.green_set_waiters_registered(len(_waiters))  # the C fast wait (gevent's) steps aside meanwhile


def drop_waiter(glet: greenlet) -> None:
    _waiters.pop(glet, None)
    lib.green_set_waiters_registered(len(_waiters))


def _wait_through(waiter, current, watches, nwatches: int, timeout: float) -> int:
    if _interrupted and current in _interrupted:
        return INTERRUPTED
    try:
        result = waiter.wait([(watches[i].fd, watches[i].events) for i in range(nwatches)],
                             None if timeout < 0 else timeout)
        return TIMED_OUT if result == TIMED_OUT else WOKEN
    except BaseException as exc:  # noqa: B902
        return _interrupted_by(current, exc)
# --- end of the temporary asyncio hook


@ffi.def_extern(onerror=_callback_failed)
def greenify_wait(watches, nwatches: int, timeout: float) -> int:
    if _waiters:
        waiter = _waiters.get(getcurrent())
        if waiter is not None:
            return _wait_through(waiter, getcurrent(), watches, nwatches, timeout)
    hub = get_hub_if_exists()
    if hub is None:
        return CANNOT_WAIT
    current = getcurrent()
    if current is hub:
        return CANNOT_WAIT
    if _interrupted and current in _interrupted:
        return INTERRUPTED
    if nwatches == 1 and timeout < 0:
        # the common wait (one fd, no deadline), kept short: it is on every switch
        watch = watches[0]
        watcher, private = _watcher_for(hub, watch.fd, watch.events)
        watcher.start(current.switch, WOKEN)
        try:
            hub.switch()
            return WOKEN
        except BaseException as exc:  # noqa: B902 - every exception thrown in must be kept, none may reach C
            return _interrupted_by(current, exc)
        finally:
            _release(hub, watcher, private)
    held = [_watcher_for(hub, watches[i].fd, watches[i].events) for i in range(nwatches)]
    timer = hub.loop.timer(timeout) if timeout >= 0 else None
    switch = current.switch
    try:
        for watcher, _private in held:
            watcher.start(switch, WOKEN)
        if timer is not None:
            timer.start(switch, TIMED_OUT, update=True)
        result = hub.switch()
        return TIMED_OUT if result == TIMED_OUT else WOKEN  # anything else: a spurious switch, probe again
    except BaseException as exc:  # noqa: B902
        return _interrupted_by(current, exc)
    finally:
        for watcher, private in held:
            _release(hub, watcher, private)
        if timer is not None:
            timer.close()


@ffi.def_extern(onerror=_callback_failed)
def greenify_closing(fd: int) -> None:
    # Called just before fd is closed: wake this hub's waiters on it, so
    # that they probe again and fail instead of waiting for ever.
    if _waiters:  # temporary asyncio hook
        waiter = _waiters.get(getcurrent())
        if waiter is not None:
            waiter.closing(fd)
            return
    hub = get_hub_if_exists()
    if hub is not None:
        _wake(hub, _waiting_watchers(hub, fd))


@ffi.def_extern(onerror=lambda *exc_info: 0)
def greenify_interrupted() -> int:
    return 1 if getcurrent() in _interrupted else 0


def take_pending_interrupt() -> Optional[BaseException]:
    """Called from C once an interrupted call is back in Python: the
    exception to raise in the current greenlet, or None."""
    exc = _interrupted.pop(getcurrent(), None)
    for gone in [glet for glet in _interrupted if glet.dead]:
        del _interrupted[gone]
    lib.green_set_interrupts_pending(len(_interrupted))
    return exc


def activate() -> None:
    lib.green_set_active(1)


def is_active() -> bool:
    return bool(lib.green_is_active())


# After the interpreter begins to finalize, C must never enter Python again:
# green calls from then on block natively.
atexit.register(lib.green_set_finalizing)
