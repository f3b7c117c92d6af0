"""greenify under asyncio: ``await greenify.asyncio.run(fn, *args)`` runs
blocking code whose patched C calls await the running loop instead of
blocking it.  The implementation is greenify/waiting/asyncio_side.py, the
asyncio side of the wait; this module is its public face."""
from greenify.waiting.asyncio_side import AsyncProxy, run, wrap

__all__ = ["run", "wrap", "AsyncProxy"]
