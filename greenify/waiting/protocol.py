"""What every waiter shares: a wait's outcomes and events (the values C
uses, csrc/wait/green.h), the sweep for descriptors closed behind
greenify's back, and the Waiter protocol.  Uses only the cffi module."""
from __future__ import annotations

import errno
import fcntl
from typing import Callable, Optional, Protocol, Sequence, Tuple

from greenify._green import lib

WOKEN: int = lib.GREEN_WOKEN
TIMED_OUT: int = lib.GREEN_TIMED_OUT
CANNOT_WAIT: int = lib.GREEN_CANNOT_WAIT
INTERRUPTED: int = lib.GREEN_INTERRUPTED
READ: int = lib.GREEN_READ
WRITE: int = lib.GREEN_WRITE


# How often a waiter looks for waits on descriptors closed behind
# greenify's back (os.close, an unpatched library): epoll silently drops
# them, and their waiters would wait for ever.
SWEEP_INTERVAL_S = 1.0


def descriptor_closed(fd: int) -> bool:
    """Whether ``fd`` no longer names an open file (the sweeps' test)."""
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


class Waiter(Protocol):
    """How the green calls of one greenlet wait (greenify.asyncio's loop
    waiter is one; ARCHITECTURE.md tells where each is chosen)."""

    def wait(self, watches: Sequence[Tuple[int, int]], timeout: Optional[float]) -> int:
        """In the greenlet inside the C call, GIL held, no exception pending:
        wait until one of the (fd, READ|WRITE) watches may be ready (WOKEN) or
        ``timeout`` seconds pass (TIMED_OUT; None: no deadline).  Raising
        means the greenlet was interrupted: see the module's docstring."""

    def closing(self, fd: int) -> None:
        """fd is about to be closed by the close twin: wake whoever waits on it."""

    def offload(self, job_runner: Callable[[], None]) -> bool:
        """Arrange for job_runner() to be called once in a worker thread and
        return True, or return False: C then calls libc itself."""
