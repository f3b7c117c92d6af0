"""Wait statistics: which green functions had to wait on the hub, and how long.

Counted in C on the wait path only (two relaxed atomic adds per wait), so the
fast path of a ready descriptor pays nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from greenify._green import ffi, lib


@dataclass(frozen=True)
class WaitStats:
    calls: int       # calls that waited on the hub at least once
    seconds: float   # total time those calls spent waiting


def stats(reset: bool = False) -> Dict[str, WaitStats]:
    """Per green function (``"recv"``, ``"poll"``, ...; fortified forms count
    as their plain function), the calls that had to wait and the total time
    waited, since the start or the last ``stats(reset=True)``, for every
    thread.  Functions that never waited are left out.  With ``reset=True``
    the counters are cleared after reading."""
    calls = ffi.new("unsigned long long *")
    wait_ns = ffi.new("unsigned long long *")
    figures = {}
    for function in range(lib.green_stats_count()):
        lib.green_stats_read(function, calls, wait_ns)
        if calls[0]:
            figures[ffi.string(lib.green_stats_name(function)).decode()] = WaitStats(int(calls[0]), wait_ns[0] / 1e9)
    if reset:
        lib.green_stats_reset()
    return figures
