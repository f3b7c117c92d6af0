"""What the fault tests share: a ticker that shows the hub keeps running, and
the bounds they hold the faults to."""
from __future__ import annotations

import time

import gevent

# A fault (a server killed, a connection terminated, a peer's reset) must
# reach every waiter promptly.  The waits it ends would go on for LONG_WAIT_S
# (or for ever); the bound is wide enough for a loaded 2-core machine and
# still far below that.
FAULT_BOUND_S = 2.5
LONG_WAIT_S = 10
# A timeout or a kill ends the wait itself: no round trip to any server.
INTERRUPT_BOUND_S = 1.5


class Ticker:
    """A greenlet that notes the time every 20 ms, to show the hub runs."""

    PERIOD_S = 0.02

    def __init__(self):
        self.ticks = []
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        while True:
            self.ticks.append(time.monotonic())
            gevent.sleep(self.PERIOD_S)

    def stop(self):
        self.greenlet.kill()

    def longest_gap(self, since: float, until: float) -> float:
        moments = [since] + [tick for tick in self.ticks if since <= tick <= until] + [until]
        return max(later - earlier for earlier, later in zip(moments, moments[1:]))
