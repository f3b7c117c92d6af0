"""The watch: which native call keeps an event loop's thread from running.

``greenify.watch(threshold=0.1)`` (or ``GREENIFY_WATCH=0.1`` in the
environment, read when greenify is imported) watches the event loop of the
calling thread: the running asyncio loop if there is one, else the gevent
hub.  The loop gets a heartbeat (a timer every threshold/2 that notes the
time; it does not keep the loop alive); a monitor thread, started on the
first watch, looks every threshold/2 whether each watched loop's heartbeat is
older than the threshold.  When one is, it reads the loop thread's native
state through greenify.watching.blocked (/proc: the system call, the calling library
found on the stack, the descriptor) and the Python stack the thread is
running (sys._current_frames()), and reports:

* through ``logging.getLogger("greenify.watch")`` (WARNING);
* to gevent's event subscribers: ``gevent.events.notify(NativeCallBlocked(report))``;
* under asyncio also to the loop's exception handler, when one is set.

Once per call site (library, symbol and Python stack), at most
``max_reports_per_minute`` reports a minute; the others are counted as
suppressed and the next report says how many.

It observes only: calls block exactly as they did, results and errno are
libc's.  A thread without a watched loop is never looked at (blocking is
allowed there).  What it cannot see: a call made while holding the GIL (the
monitor thread cannot run until it returns), a loop kept busy in Python or
waiting for the GIL or a Python lock (not a native call: gevent's own monitor
thread reports those).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from greenify.watching import blocked

log = logging.getLogger("greenify.watch")

ENVIRONMENT_VARIABLE = "GREENIFY_WATCH"
DEFAULT_THRESHOLD_S = 0.1
DEFAULT_MAX_REPORTS_PER_MINUTE = 10
PYTHON_STACK_FRAMES = 12   # the innermost frames a report shows
RECENT_REPORTS = 100       # kept in Watcher.reports
MAX_SITES = 10_000         # call sites remembered: a storm of new ones cannot grow memory without end


def _original(module: str, name: str) -> Any:
    """A thread primitive as the OS gives it, even under gevent.monkey.patch_all()."""
    if "gevent.monkey" in sys.modules:
        from gevent.monkey import get_original

        return get_original(module, name)
    return getattr(__import__(module), name)


@dataclass
class BlockedReport:
    """What the watch saw: a loop's thread blocked in a native call."""

    loop: str                          # "gevent hub" or "asyncio loop"
    call: blocked.BlockedCall
    blocked_s: float                   # how long the loop had not run when reported
    total_blocked_s: float             # this call site's stalls so far, this one included
    stalls: int                        # this call site's stalls so far
    python_stack: List[str]            # "file:line in function", outermost first
    suppressed_before: int = 0         # reports the rate limit held back since the last one

    @property
    def library(self) -> str:
        return self.call.library

    @property
    def symbol(self) -> str:
        return self.call.function

    @property
    def descriptors(self) -> Tuple[Tuple[int, str], ...]:
        return self.call.descriptors

    @property
    def python_line(self) -> Optional[str]:
        """The innermost Python line: the one that called into C."""
        return self.python_stack[-1] if self.python_stack else None

    @property
    def fix(self) -> str:
        return self.call.fix()

    def __str__(self) -> str:
        lines = [f"the {self.loop}'s thread has been blocked {self.blocked_s:.2f} s in {self.call.describe()}"]
        if self.call.caller:
            lines.append(f"  called from {self.call.caller.path}+{self.call.caller.file_offset:#x}")
        if self.python_stack:
            lines.append("  python stack (innermost last):")
            lines += [f"    {frame}" for frame in self.python_stack]
        else:
            lines.append("  python stack: none (the greenlet or callback calls C directly)")
        lines.append(f"  fix: {self.fix}")
        lines.append(f"  this call site: {self.stalls} stall(s), {self.total_blocked_s:.2f} s blocked in total")
        if self.suppressed_before:
            lines.append(f"  ({self.suppressed_before} other report(s) suppressed by the rate limit before this one)")
        return "\n".join(lines)


@dataclass
class _WatchedLoop:
    kind: str                      # "gevent hub" / "asyncio loop"
    loop: Any                      # the hub or the asyncio loop
    native_id: int                 # the thread's tid, for /proc
    ident: int                     # the thread's Python ident, for sys._current_frames()
    last_beat: float
    stop_beat: Callable[[], None] = lambda: None
    signature: Optional[tuple] = None        # the blocked call last read in full, while it lasts
    site: Optional[tuple] = None             # its call site
    seen_at: float = 0.0                     # when its time was last counted


@dataclass
class _Site:
    stalls: int = 0
    total_blocked_s: float = 0.0


@dataclass
class Watcher:
    """The process's one watch: the loops watched, the call sites seen, the
    rate limit's state and the last reports."""

    threshold: float = DEFAULT_THRESHOLD_S
    max_reports_per_minute: int = DEFAULT_MAX_REPORTS_PER_MINUTE
    loops: List[_WatchedLoop] = field(default_factory=list)
    sites: Dict[tuple, _Site] = field(default_factory=dict)
    reports: Deque[BlockedReport] = field(default_factory=lambda: deque(maxlen=RECENT_REPORTS))
    suppressed: int = 0            # held back by the rate limit, in all
    _suppressed_since: int = 0
    _sent: Deque[float] = field(default_factory=deque)
    _stop_lock: Any = None         # held while the monitor thread should run

    @property
    def period(self) -> float:
        return self.threshold / 2

    # --- the monitor thread (holds no lock the loops' threads take) ----------

    def _run(self) -> None:
        stop = self._stop_lock
        while not stop.acquire(timeout=self.period):
            try:
                self._check(time.monotonic())
            except Exception:  # noqa: BLE001 - the monitor must not die of one bad read
                log.debug("greenify.watch: check failed", exc_info=True)
        stop.release()

    def _check(self, now: float) -> None:
        for watched in list(self.loops):
            if watched.kind == "asyncio loop" and watched.loop.is_closed():
                self.loops.remove(watched)  # asyncio.run() ended: nothing left to watch there
                continue
            if now - watched.last_beat <= self.threshold:
                watched.signature = None
                continue
            self._examine(watched, now)

    def _examine(self, watched: _WatchedLoop, now: float) -> None:
        """One pass over a stalled loop: a call seen before (same stall, same
        system call and stack pointer, same Python line) only adds to its
        site's time; a new one is read in full and, at a new site, reported."""
        beat = watched.last_beat
        try:
            syscall = blocked.read_syscall(os.getpid(), watched.native_id)
        except FileNotFoundError:
            self.loops.remove(watched)  # its thread ended
            return
        except OSError:
            return
        frame = sys._current_frames().get(watched.ident)
        signature = (beat, syscall.number, syscall.stack_pointer, syscall.arguments, _frames_key(frame))
        if signature == watched.signature:
            if watched.site is not None:
                self.sites[watched.site].total_blocked_s += now - watched.seen_at
            watched.seen_at = now
            return
        watched.signature = None
        try:
            call = blocked.blocked_call(os.getpid(), watched.native_id, syscall)
        except OSError:
            call = None
        if call is None or beat != watched.last_beat:
            return  # running Python, or the loop came back meanwhile
        if call.waits_for_interpreter:
            watched.signature, watched.site = signature, None  # the GIL or a Python lock: not a native call's
            return
        stack = [f"{entry.filename}:{entry.lineno} in {entry.name}"
                 for entry in traceback.extract_stack(frame)[-PYTHON_STACK_FRAMES:]] if frame is not None else []
        del frame
        stalled_s = now - beat
        key = (call.library, call.function, tuple(stack))
        site = self.sites.get(key)
        first = site is None
        if first:
            if len(self.sites) >= MAX_SITES:
                del self.sites[next(iter(self.sites))]  # the oldest: it may be reported again one day
            site = self.sites[key] = _Site()
        site.stalls += 1
        site.total_blocked_s += stalled_s
        watched.signature, watched.site, watched.seen_at = signature, key, now
        if first:
            self._send(BlockedReport(watched.kind, call, stalled_s, site.total_blocked_s, site.stalls, stack),
                       watched)

    def _send(self, report: BlockedReport, watched: _WatchedLoop) -> None:
        now = time.monotonic()
        while self._sent and now - self._sent[0] >= 60.0:
            self._sent.popleft()
        if len(self._sent) >= self.max_reports_per_minute:
            self.suppressed += 1
            self._suppressed_since += 1
            return
        self._sent.append(now)
        report.suppressed_before, self._suppressed_since = self._suppressed_since, 0
        self.reports.append(report)
        log.warning("%s", report)
        _notify_gevent(report, watched.loop if watched.kind == "gevent hub" else None)
        if watched.kind == "asyncio loop":
            _tell_asyncio(watched.loop, report)


def _frames_key(frame: Any) -> tuple:
    """The Python stack's code objects and lines, cheaply: what tells one
    call site from another while the loop stays blocked."""
    key = []
    while frame is not None and len(key) < PYTHON_STACK_FRAMES:
        key.append((id(frame.f_code), frame.f_lineno))
        frame = frame.f_back
    return tuple(key)


def _notify_gevent(report: BlockedReport, hub: Any) -> None:
    events = sys.modules.get("gevent.events")
    if events is None:
        return
    from greenify.watching.gevent_event import NativeCallBlocked  # gevent's events are imported already

    try:
        events.notify(NativeCallBlocked(report, hub))
    except Exception:  # noqa: BLE001 - a subscriber's error must not stop the monitor
        log.exception("greenify.watch: a gevent.events subscriber failed on a NativeCallBlocked")


def _tell_asyncio(loop: Any, report: BlockedReport) -> None:
    # Only a handler the application set: the default one would log the report a second time.
    if loop.get_exception_handler() is None:
        return
    context = {"message": str(report), "greenify_report": report}
    try:
        loop.call_soon_threadsafe(loop.call_exception_handler, context)
    except RuntimeError:
        pass  # the loop was closed meanwhile


_watcher: Optional[Watcher] = None


def current() -> Optional[Watcher]:
    """The process's watch, None when nothing was ever watched."""
    return _watcher


def watch(threshold: float = DEFAULT_THRESHOLD_S, loop: Any = None,
          max_reports_per_minute: int = DEFAULT_MAX_REPORTS_PER_MINUTE) -> Watcher:
    """Watch the calling thread's event loop (``loop``: an asyncio loop or a
    gevent hub running in this thread; default: the running asyncio loop,
    else this thread's gevent hub) and report native calls that keep it from
    running longer than ``threshold`` seconds.  Changes no call's behaviour.
    Returns the process's Watcher; ``unwatch()`` stops it."""
    global _watcher
    if not threshold > 0:
        raise ValueError(f"watch(): threshold must be a positive number of seconds, not {threshold!r}")
    if _watcher is None:
        _watcher = Watcher()
    _watcher.threshold = float(threshold)
    _watcher.max_reports_per_minute = int(max_reports_per_minute)
    loop = _loop_of_this_thread() if loop is None else loop
    if not any(watched.loop is loop for watched in _watcher.loops):
        _watcher.loops.append(_heartbeat(loop, _watcher.period))
    if _watcher._stop_lock is None:
        _start_monitor(_watcher)
    return _watcher


def unwatch() -> Optional[Watcher]:
    """Stop watching every loop and end the monitor thread.  Returns the
    Watcher, whose reports stay readable; the next watch() starts afresh."""
    global _watcher
    watcher, _watcher = _watcher, None
    if watcher is None:
        return None
    for watched in watcher.loops:
        watched.stop_beat()
    watcher.loops.clear()
    if watcher._stop_lock is not None:
        watcher._stop_lock.release()
        watcher._stop_lock = None
    return watcher


def _loop_of_this_thread() -> Any:
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            pass
    from gevent import get_hub

    return get_hub()


def _thread_ids() -> Tuple[int, int]:
    return _original("_thread", "get_native_id")(), _original("_thread", "get_ident")()


def _heartbeat(loop: Any, period: float) -> _WatchedLoop:
    native_id, ident = _thread_ids()
    if hasattr(loop, "call_later"):  # asyncio
        watched = _WatchedLoop("asyncio loop", loop, native_id, ident, time.monotonic())
        handle: List[Any] = []

        def beat() -> None:
            watched.last_beat = time.monotonic()
            handle[:] = [loop.call_later(period, beat)]

        handle.append(loop.call_later(period, beat))
        def stop_beat() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: handle and handle[0].cancel())

        watched.stop_beat = stop_beat
        return watched
    watched = _WatchedLoop("gevent hub", loop, native_id, ident, time.monotonic())
    timer = loop.loop.timer(period, period, ref=False)

    def hub_beat() -> None:
        watched.last_beat = time.monotonic()

    timer.start(hub_beat)

    def stop_beat() -> None:
        # libev is not thread-safe: from another thread, the hub closes its timer itself
        if _thread_ids()[1] == ident:
            timer.close()
        else:
            loop.loop.run_callback_threadsafe(timer.close)

    watched.stop_beat = stop_beat
    return watched


def _start_monitor(watcher: Watcher) -> None:
    lock = _original("_thread", "allocate_lock")()
    lock.acquire()
    watcher._stop_lock = lock
    _original("_thread", "start_new_thread")(watcher._run, ())


def _after_fork_in_child() -> None:
    # The monitor thread did not survive the fork, nor did other threads' loops;
    # the forking thread's loop did (gevent reinitialises the hub's loop).
    watcher = _watcher
    if watcher is None or watcher._stop_lock is None:
        return
    native_id, ident = _thread_ids()
    watcher.loops[:] = [watched for watched in watcher.loops if watched.ident == ident]
    for watched in watcher.loops:
        watched.native_id, watched.last_beat = native_id, time.monotonic()
    _start_monitor(watcher)


os.register_at_fork(after_in_child=_after_fork_in_child)


def watch_from_environment() -> Optional[Watcher]:
    """``GREENIFY_WATCH=SECONDS`` (read when greenify is imported): watch the
    importing thread's running asyncio loop, else its gevent hub.  A bad
    value is logged and ignored."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not value or value == "0":
        return None
    try:
        threshold = float(value)
    except ValueError:
        log.warning("greenify.watch: %s=%r is not a number of seconds; not watching", ENVIRONMENT_VARIABLE, value)
        return None
    try:
        return watch(threshold)
    except ImportError:
        log.warning("greenify.watch: %s is set but neither an asyncio loop runs nor gevent is installed; "
                    "call greenify.watch() in the loop's thread", ENVIRONMENT_VARIABLE)
        return None
