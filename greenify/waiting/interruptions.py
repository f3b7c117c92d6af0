"""Interruptions kept for the greenlets they were thrown into.

An exception a waiter raises (``gevent.Timeout`` or ``Greenlet.kill``
thrown into the waiting greenlet, an asyncio cancellation) is kept here and
reported as INTERRUPTED; every further green call of that greenlet fails at
once, and once the frame that made the C call runs again the very exception
is raised there (csrc/wait/green_deliver.c).  Uses protocol.py and the cffi
module."""
from __future__ import annotations

from typing import Dict, Optional

from greenlet import getcurrent, greenlet

from greenify._green import lib
from greenify.waiting.protocol import INTERRUPTED

_interrupted: Dict[greenlet, BaseException] = {}


def interrupted_by(current: greenlet, exc: BaseException) -> int:
    """Keep ``exc``, thrown into ``current`` while it waited inside C."""
    _interrupted[current] = exc
    lib.green_set_interrupts_pending(len(_interrupted))
    return INTERRUPTED


def interrupted() -> int:
    """1 if the calling greenlet was interrupted and is still inside C
    (entry greenify_interrupted)."""
    return 1 if getcurrent() in _interrupted else 0


def take_pending_interrupt() -> Optional[BaseException]:
    """The exception to raise in the current greenlet now that its
    interrupted C call is back in Python, or None (for csrc/wait/green_deliver.c)."""
    exc = _interrupted.pop(getcurrent(), None)
    for gone in [glet for glet in _interrupted if glet.dead]:
        del _interrupted[gone]
    lib.green_set_interrupts_pending(len(_interrupted))
    return exc


def pending_interruptions() -> Dict[greenlet, BaseException]:
    """Interruptions not delivered yet: greenlet -> exception (for tests:
    after a test, none should be left)."""
    return dict(_interrupted)
