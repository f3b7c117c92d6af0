"""Waiting on a gevent hub: the bridge's waiter for greenlets of a thread
that has a hub (greenify/waiting/bridge.py chooses it; imported once gevent is).

Each hub gets one ``HubWaiter``, kept as ``hub._greenify``: the io watchers
it reuses from one wait to the next, and a timer that wakes waits on
descriptors closed behind greenify's back.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Set, Tuple

import gevent

from greenify.waiting import fastwait as _fastwait
from greenify.waiting.interruptions import interrupted_by
from greenify.waiting.protocol import READ, SWEEP_INTERVAL_S, TIMED_OUT, WOKEN, WRITE, descriptor_closed

log = logging.getLogger("greenify")

# A watcher is kept per (fd, events): events (READ | WRITE) take two bits.
_EVENT_BITS = 2
_EVENT_MASKS = (READ, WRITE, READ | WRITE)


def _key(fd: int, events: int) -> int:
    return fd << _EVENT_BITS | events


class HubWaiter:
    """greenify's state on one hub, and how green calls wait there."""

    __slots__ = ("hub", "loop", "io_watchers", "private_watchers", "sweeper")

    def __init__(self, hub) -> None:
        self.hub = hub
        self.loop = hub.loop
        # (fd, events) -> the io watcher kept for it (the Python object only:
        # libev registers the fd anew each time it starts)
        self.io_watchers: Dict[int, object] = {}
        # watchers made for one wait because another greenlet waits on the kept one
        self.private_watchers: Set[object] = set()
        # ref=False: the sweeper alone never keeps the loop running
        self.sweeper = self.loop.timer(SWEEP_INTERVAL_S, SWEEP_INTERVAL_S, ref=False)
        self.sweeper.start(self.sweep)
        _fastwait.attach(hub)  # from now on the common wait on this hub stays in C

    def _watcher(self, fd: int, events: int) -> Tuple[object, bool]:
        """The io watcher for (fd, events), and whether it is a private one
        (closed after the wait)."""
        key = fd << _EVENT_BITS | events  # _key(), inline: this is on every wait
        watcher = self.io_watchers.get(key)
        if watcher is None:
            watcher = self.io_watchers[key] = self.loop.io(fd, events)
            return watcher, False
        if not watcher.active:
            # The number may name another file by now: setting it again makes
            # libev register it anew (a kept registration would never fire).
            watcher.fd = fd
            return watcher, False
        watcher = self.loop.io(fd, events)
        self.private_watchers.add(watcher)
        return watcher, True

    def _release(self, watcher, private: bool) -> None:
        watcher.stop()
        if private:
            self.private_watchers.discard(watcher)
            watcher.close()

    def green_wait(self, current, watches, nwatches: int, timeout: float) -> int:
        """Switch to the hub until a watch fires (WOKEN) or timeout seconds
        pass (TIMED_OUT; < 0: none); an exception thrown in is kept by the
        bridge (INTERRUPTED)."""
        if nwatches == 1 and timeout < 0:
            # the common wait (one fd, no deadline), kept short: it is on every switch
            watch = watches[0]
            watcher, private = self._watcher(watch.fd, watch.events)
            watcher.start(current.switch, WOKEN)
            try:
                self.hub.switch()
                return WOKEN
            except BaseException as exc:  # noqa: B902 - every exception thrown in must be kept, none may reach C
                return interrupted_by(current, exc)
            finally:
                self._release(watcher, private)
        held = [self._watcher(watches[i].fd, watches[i].events) for i in range(nwatches)]
        timer = self.loop.timer(timeout) if timeout >= 0 else None
        switch = current.switch
        try:
            for watcher, _private in held:
                watcher.start(switch, WOKEN)
            if timer is not None:
                timer.start(switch, TIMED_OUT, update=True)
            result = self.hub.switch()
            return TIMED_OUT if result == TIMED_OUT else WOKEN  # anything else: a spurious switch, probe again
        except BaseException as exc:  # noqa: B902
            return interrupted_by(current, exc)
        finally:
            for watcher, private in held:
                self._release(watcher, private)
            if timer is not None:
                timer.close()

    def waiting_watchers(self, fd: Optional[int] = None) -> List[object]:
        """The io watchers a greenlet is waiting on (on ``fd``, if given)."""
        if fd is None:
            candidates = list(self.io_watchers.values())
        else:
            candidates = [self.io_watchers.get(_key(fd, events)) for events in _EVENT_MASKS]
        candidates.extend(watcher for watcher in self.private_watchers if fd is None or watcher.fd == fd)
        return [watcher for watcher in candidates if watcher is not None and watcher.active]

    def _wake(self, watchers) -> None:
        # The waiter probes again and finds its descriptor gone (EBADF, POLLNVAL).
        for watcher in watchers:
            callback, args = watcher.callback, watcher.args
            watcher.stop()
            self.loop.run_callback(callback, *args)

    def closing(self, fd: int) -> None:
        self._wake(self.waiting_watchers(fd))

    def sweep(self) -> None:
        """A descriptor closed without greenify's close twin (Python's
        os.close, an unpatched library) silently leaves epoll: its waiter
        would wait for ever.  Once a second, wake the waiters whose
        descriptor is gone, and register the C waiters' descriptors anew
        (their number may name a new file by now)."""
        self._wake([watcher for watcher in self.waiting_watchers() if descriptor_closed(watcher.fd)])
        for fd in _fastwait.waiting_fds():  # the waits below Python (csrc/wait/green_fastwait.c)
            if descriptor_closed(fd):
                _fastwait.wake(fd)
        _fastwait.refresh()

    def offload(self, job_runner: Callable[[], None]) -> bool:
        """Run job_runner on the hub's thread pool; the caller meanwhile
        waits in C, interruptible."""
        gevent.spawn(_submit, self.hub, job_runner)
        return True


def _submit(hub, job_runner: Callable[[], None]) -> None:
    # A greenlet of its own, because ThreadPool.spawn waits while every
    # worker is busy.
    try:
        hub.threadpool.spawn(job_runner)
    except BaseException:  # noqa: B902 - a killed submitter just drops the job
        log.debug("greenify: resolver job not queued", exc_info=True)


def attach(hub) -> HubWaiter:
    """The hub's waiter, made on first use."""
    waiter = hub._greenify = HubWaiter(hub)
    return waiter
