"""The gevent event of a greenify.watch() report (gevent.events).  Its own
module because it subclasses gevent's EventLoopBlocked: imported only once
gevent's events are, so that an asyncio user never imports gevent."""
from __future__ import annotations

from typing import Any

from gevent.events import EventLoopBlocked


class NativeCallBlocked(EventLoopBlocked):
    """The gevent event (``gevent.events.notify``) of one report.  A kind of
    gevent's EventLoopBlocked (``blocking_time``, ``info`` lines, ``hub``;
    ``greenlet`` is None: another thread's current greenlet cannot be read),
    so code written for gevent's monitor consumes it too, plus ``report``.
    Notified from the monitor thread, while the call still blocks."""

    def __init__(self, report: Any, hub: Any = None) -> None:
        self.report = report
        self.greenlet = None
        self.blocking_time = report.blocked_s
        self.info = str(report).splitlines()
        self.hub = hub

    def __repr__(self) -> str:
        return f"<NativeCallBlocked {self.report.library}: {self.report.symbol} {self.blocking_time:.2f} s>"
