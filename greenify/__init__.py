"""greenify: make blocking C libraries cooperative under gevent.

``greenify.patch_all()`` patches every C client library in the process, now
and as it loads (greenify.patching.policy decides which); ``greenify.patch_library(target)``
points one already-loaded library's imports of libc's blocking calls at their
green twins.  Both activate the green functions; ``greenify.greenify()`` is
the explicit, idempotent spelling kept for compatibility.
"""
from __future__ import annotations

from greenify import functions
from greenify import entries as _entries  # noqa: F401 - defines every entry from C into Python
from greenify.errors import (BuildIdMismatchError, GreenifyError, NotElfError, NotLoadedError, ProtectedTargetError,
                             SlotOutsideSegmentsError, SlotWriteError, StaticExecutableError, TargetNotFoundError,
                             UnknownFunctionError, WrongMachineError)
from greenify.watching.monitor import BlockedReport, unwatch, watch
from greenify.patching.patcher import (ObjectReport, PatchedSlot, PatchReport, SkippedImport, patch_lib, patch_library,
                              patched, unpatch_library)
from greenify.patching.inventory import report
from greenify.patching.onload import OnLoadPatch, cancel_patch_on_load, patch_on_load
from greenify.patching.all_clients import PatchAllReport, patch_all, unpatch_all
from greenify.waiting.stats import WaitStats, stats
from greenify.capi import _C_API, capi_address, get_include  # noqa: F401 - _C_API: the C API's capsule

__all__ = [
    "greenify", "is_active", "patch_all", "unpatch_all", "PatchAllReport",
    "patch_library", "unpatch_library", "patched", "patch_lib", "report", "stats", "WaitStats",
    "patch_on_load", "cancel_patch_on_load", "OnLoadPatch", "get_include", "capi_address",
    "PatchReport", "ObjectReport", "PatchedSlot", "SkippedImport",
    "GreenifyError", "TargetNotFoundError", "NotLoadedError", "NotElfError", "WrongMachineError",
    "StaticExecutableError", "BuildIdMismatchError", "SlotOutsideSegmentsError", "ProtectedTargetError",
    "SlotWriteError", "UnknownFunctionError",
    "watch", "unwatch", "BlockedReport", "NativeCallBlocked",
]
__version__ = "0.1.0"


def greenify() -> None:
    """Activate the green functions (idempotent).  From now on, a patched
    library's blocking call made in a greenlet waits on the gevent hub.
    patch_all() and patch_library() call it themselves: calling it first is
    never needed, and never wrong."""
    functions.activate()


def is_active() -> bool:
    """Whether ``greenify()`` was called."""
    return functions.is_active()




def __getattr__(name: str):
    # NativeCallBlocked subclasses gevent's EventLoopBlocked: importing it
    # imports gevent, which an asyncio user never does
    if name == "NativeCallBlocked":
        from greenify.watching.gevent_event import NativeCallBlocked

        return NativeCallBlocked
    raise AttributeError(f"module 'greenify' has no attribute {name!r}")


from greenify.watching import monitor as _monitor  # noqa: E402 - after every name above is defined

_monitor.watch_from_environment()
