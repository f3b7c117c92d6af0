"""greenify under asyncio: a patched C library's blocking calls await the running event loop.

    conn = await greenify.asyncio.run(MySQLdb.connect, host=..., user=...)

``run(fn, *args, **kwargs)`` runs the synchronous ``fn`` in a greenlet of
its own whose parent is the greenlet running the event loop.  When a green
function inside ``fn`` would block, that greenlet hands its descriptors and
deadline to the loop (``add_reader``/``add_writer``, ``call_later``) and
switches back to the loop; the loop's callback switches into it again when
one is ready, and the C call goes on where it stopped.  Name resolution runs
on the loop's default executor.  Cancelling the awaiting task (``task.cancel()``,
``asyncio.timeout()``, ``asyncio.wait_for``) throws ``CancelledError`` into
the waiting greenlet: the C call fails at once as it does for
``gevent.Timeout`` and the exception comes back out of ``run``.

Outside ``run`` (plain code in the loop's thread, a thread without a loop)
a patched library blocks natively, as libc would.
"""
from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import inspect
import threading
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from greenlet import getcurrent, greenlet

from greenify import functions
from greenify.waiting import bridge as _bridge
from greenify.waiting.bridge import descriptor_closed
from greenify._green import lib

__all__ = ["run", "wrap", "AsyncProxy"]

T = TypeVar("T")

READ: int = lib.GREEN_READ
WRITE: int = lib.GREEN_WRITE
WOKEN: int = _bridge.WOKEN
TIMED_OUT: int = _bridge.TIMED_OUT

# How many times a closed coroutine throws CancelledError into a call that keeps waiting.
_CLOSE_ATTEMPTS = 100
SWEEP_INTERVAL_S = _bridge.SWEEP_INTERVAL_S  # as the hub's sweep


class _Wait:
    """One wait of one greenlet: what it registered on the loop, and the way
    back into it.  A wake-up after the wait ended (a callback already queued,
    a stale timer) does nothing."""

    __slots__ = ("glet", "pending", "watched", "timer")

    def __init__(self, glet: greenlet) -> None:
        self.glet = glet
        self.pending = True
        self.watched: List[Tuple[Dict[int, list], int]] = []
        self.timer: Optional[asyncio.TimerHandle] = None

    def wake(self, result: int) -> None:
        if self.pending:
            self.pending = False
            self.glet.switch(result)


class _LoopWaiter:
    """The waiter of one event loop, shared by every ``run`` on it: several
    waits on one descriptor share the loop's one registration for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.readers: Dict[int, List[_Wait]] = {}
        self.writers: Dict[int, List[_Wait]] = {}
        self.sweeper: Optional[asyncio.TimerHandle] = None

    # -- the Waiter protocol (greenify/waiting/protocol.py; docs/internals.md "Waiters"), called inside a run greenlet

    def wait(self, watches: Sequence[Tuple[int, int]], timeout: Optional[float]) -> int:
        current = getcurrent()
        wait = _Wait(current)
        try:
            for fd, events in watches:
                if events & READ and not self._watch(self.readers, self.loop.add_reader, self._readable, fd, wait):
                    return WOKEN  # the descriptor is gone: the C side probes again and sees EBADF
                if events & WRITE and not self._watch(self.writers, self.loop.add_writer, self._writable, fd, wait):
                    return WOKEN
            if timeout is not None:
                wait.timer = self.loop.call_later(timeout, wait.wake, TIMED_OUT)
            result = current.parent.switch()
            return TIMED_OUT if result == TIMED_OUT else WOKEN
        finally:
            wait.pending = False
            self._unwatch(wait)

    def closing(self, fd: int) -> None:
        # The fd is about to be closed: the loop forgets it now (a number
        # reused later must register anew), and its waiters probe again.
        if threading.get_ident() != self.thread:
            return
        for table, remove in ((self.readers, self.loop.remove_reader), (self.writers, self.loop.remove_writer)):
            waits = table.pop(fd, None)
            if waits:
                self._forget(remove, fd)
                for wait in waits:
                    self.loop.call_soon(wait.wake, WOKEN)

    def offload(self, job_runner: Callable[[], None]) -> bool:
        try:
            self.loop.run_in_executor(None, job_runner)
        except RuntimeError:  # the executor was shut down: libc is called in place
            return False
        return True

    # -- the loop's side

    def _watch(self, table: Dict[int, List[_Wait]], add: Callable, ready: Callable, fd: int, wait: _Wait) -> bool:
        waits = table.get(fd)
        if waits is None:
            try:
                add(fd, ready, fd)
            except (OSError, ValueError) as exc:
                if isinstance(exc, ValueError) or exc.errno == errno.EBADF:
                    return False
                raise
            waits = table[fd] = []
            if self.sweeper is None:
                self.sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)
        waits.append(wait)
        wait.watched.append((table, fd))
        return True

    def _sweep(self) -> None:
        """A descriptor closed without greenify's close twin (os.close, an
        unpatched library, plain code outside run) silently leaves epoll:
        while waits are registered, once a second, the waiters of
        descriptors that are gone are woken and fail with EBADF."""
        self.sweeper = None
        for table, remove in ((self.readers, self.loop.remove_reader), (self.writers, self.loop.remove_writer)):
            for fd in [fd for fd in table if descriptor_closed(fd)]:
                waits = table.pop(fd, None) or []
                self._forget(remove, fd)
                for wait in waits:
                    wait.wake(WOKEN)
        if self.readers or self.writers:
            self.sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    # The loop calls these when a descriptor is ready.  uvloop calls them
    # inside libuv's uv__io_poll, which keeps a pointer to its on-stack array
    # of epoll events in the loop while it dispatches; a greenlet resumed
    # there lies over that stack, and its next add_reader/remove_reader
    # (uv_poll_start/stop -> uv__platform_invalidate_fd) reads and writes
    # the greenlet's own frames through it (a segfault under
    # mysql-connector's deep TLS read).  So the waiters are woken from the
    # loop's ready queue instead, outside the poll.
    def _readable(self, fd: int) -> None:
        self.loop.call_soon(self._wake, self.readers, fd)

    def _writable(self, fd: int) -> None:
        self.loop.call_soon(self._wake, self.writers, fd)

    @staticmethod
    def _wake(table: Dict[int, List[_Wait]], fd: int) -> None:
        for wait in list(table.get(fd, ())):
            wait.wake(WOKEN)

    def _unwatch(self, wait: _Wait) -> None:
        if wait.timer is not None:
            wait.timer.cancel()
        for table, fd in wait.watched:
            waits = table.get(fd)
            if waits is None or wait not in waits:
                continue  # closing() already let go of it
            waits.remove(wait)
            if not waits:
                del table[fd]
                self._forget(self.loop.remove_reader if table is self.readers else self.loop.remove_writer, fd)

    @staticmethod
    def _forget(remove: Callable[[int], Any], fd: int) -> None:
        try:
            remove(fd)
        except (OSError, ValueError):  # closed already: the loop had nothing left to watch
            pass


_local = threading.local()


def _waiter_for(loop: asyncio.AbstractEventLoop) -> _LoopWaiter:
    waiter = getattr(_local, "waiter", None)
    if waiter is None or waiter.loop is not loop:
        waiter = _local.waiter = _LoopWaiter(loop)
    return waiter


class _GreenCall(greenlet):
    """The greenlet ``run`` runs ``fn`` in; ``done`` is resolved when it ends."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, done: asyncio.Future) -> None:
        super().__init__(parent=getcurrent())
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = done
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:  # greenlet's entry point
        try:
            self.value = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: B902 - everything goes back to the awaiting coroutine
            self.error = exc
        finally:
            self.fn = self.args = self.kwargs = None
            if not self.done.done():
                try:
                    self.done.set_result(None)
                except RuntimeError:  # its loop is closed: nobody awaits it any more
                    pass

    def outcome(self) -> Any:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.value


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Awaitable[T]:
    """``await run(fn, *args, **kwargs)``: call the synchronous ``fn`` so that
    every blocking call of a patched library inside it awaits the running
    event loop instead of blocking it; returns what ``fn`` returns or raises
    what it raises.  Cancelling the awaiting task interrupts a call waiting
    inside C at once and raises ``CancelledError``.  Must be called from a
    coroutine running on an event loop."""
    if not callable(fn):
        raise TypeError(f"greenify.asyncio.run() needs a callable, got {fn!r}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"greenify.asyncio.run() runs synchronous code; {fn!r} is a coroutine function: await it directly")
    if isinstance(getcurrent(), _GreenCall):
        raise RuntimeError(
            f"greenify.asyncio.run({getattr(fn, '__qualname__', fn)!r}) called inside a function that "
            "greenify.asyncio.run() is already running: that code is synchronous and its blocking calls already "
            "await the loop, so call the function directly")
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("greenify.asyncio.run() needs a running event loop: await it inside a coroutine "
                           "(for example one started by asyncio.run())") from None
    return _drive(loop, fn, args, kwargs)


async def _drive(loop: asyncio.AbstractEventLoop, fn: Callable, args: tuple, kwargs: dict) -> Any:
    functions.activate()
    call = _GreenCall(fn, args, kwargs, loop.create_future())
    call.gr_context = contextvars.copy_context()  # fn sees the caller's context variables, as with to_thread
    _bridge.use_waiter(call, _waiter_for(loop))
    try:
        call.switch()  # runs fn until its first wait, or to the end
        while not call.dead:
            try:
                await call.done
            except GeneratorExit:  # the coroutine is closed: nothing can be awaited any more
                for _ in range(_CLOSE_ATTEMPTS):
                    if call.dead:
                        break
                    call.throw(asyncio.CancelledError("greenify.asyncio.run() was closed"))
                raise
            except BaseException as exc:  # noqa: B902 - CancelledError and the like go into the C call
                if call.dead:
                    raise
                call.done = loop.create_future()
                call.throw(exc)  # the C call fails; fn ends, or waits again (a clean-up)
    finally:
        _bridge.drop_waiter(call)
    return call.outcome()


def wrap(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """A coroutine function that runs the synchronous ``fn`` through ``run``:
    ``fetch = greenify.asyncio.wrap(fetch_user); await fetch(42)``."""
    if not callable(fn):
        raise TypeError(f"greenify.asyncio.wrap() needs a callable, got {fn!r}")

    @functools.wraps(fn)
    async def awaitable_call(*args: Any, **kwargs: Any) -> T:
        return await run(fn, *args, **kwargs)

    return awaitable_call


class AsyncProxy:
    """An object whose methods are awaited: each call runs through ``run``;
    other attributes are read and set through to the object.

        conn = AsyncProxy(await greenify.asyncio.run(MySQLdb.connect, **params))
        await conn.query("SELECT SLEEP(1)")
        cursor = await conn.cursor()          # a plain cursor: use run() for its methods,
        cursor = AsyncProxy(cursor)           # or wrap it too
    """

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    @property
    def wrapped(self) -> Any:
        """The object itself."""
        return self._target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        return wrap(value) if callable(value) else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __repr__(self) -> str:
        return f"AsyncProxy({self._target!r})"
