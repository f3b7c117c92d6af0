"""``python -m greenify.demo --asyncio``: the demo's rounds as asyncio tasks.

Each call runs through ``greenify.asyncio.run`` on one event loop instead of
in a greenlet: unpatched, the library blocks the loop and the calls run one
after another; patched, they await the loop together.  No gevent hub is
involved.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Callable


def run_round(label: str, count: int, call: Callable[[int], str]) -> float:
    """Run call(i) for each i as `count` asyncio tasks through greenify.asyncio.run,
    drawing progress as they finish; the seconds until all finished."""
    import greenify.asyncio

    done = [0]
    live = sys.stdout.isatty()

    def draw(start: float) -> None:
        bar = "#" * (done[0] * 40 // count)
        sys.stdout.write(f"{chr(13) if live else ''}  {label:10} [{bar:40}] {done[0]:3}/{count}  "
                         f"{time.monotonic() - start:5.2f} s")
        sys.stdout.flush()

    async def one(i: int, start: float) -> str:
        result = await greenify.asyncio.run(call, i)
        done[0] += 1
        if live or done[0] == count:
            draw(start)
        return result

    async def main() -> float:
        start = time.monotonic()
        await asyncio.gather(*(one(i, start) for i in range(count)))
        return time.monotonic() - start

    took = asyncio.run(main())
    sys.stdout.write("\n")
    return took
