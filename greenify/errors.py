"""The exceptions greenify raises; every one names its target.

Each error keeps the target it is about in ``.target`` so callers (and the
greenify-inspect CLI) can report it without parsing the message.  When a
patch is refused, nothing has been written.
"""
from __future__ import annotations

from typing import Optional, Sequence


class GreenifyError(Exception):
    """Base class of greenify's errors."""

    def __init__(self, message: str, target: Optional[str] = None) -> None:
        super().__init__(message)
        self.target = target


class TargetNotFoundError(GreenifyError):
    """The target path does not exist, or is not a regular file."""


class NotLoadedError(GreenifyError):
    """No object loaded in this process matches the target."""

    def __init__(self, target: str, similar: Sequence[str] = (), clients: Sequence[str] = ()) -> None:
        message = f"{target!r} is not loaded in this process"
        if similar:
            message += "; loaded objects with similar names: " + ", ".join(similar)
        if clients:
            message += ("; the client libraries loaded are " + ", ".join(clients) + ": for one of them, "
                        f'greenify.patch_library("{clients[0]}"), or greenify.patch_all() for every one')
        message += ("; if the driver that uses it is not imported yet, import it first, or use "
                    f'greenify.patch_on_load("{target}")')
        super().__init__(message, target)
        self.similar = tuple(similar)
        self.clients = tuple(clients)


class UnknownFunctionError(GreenifyError, ValueError):
    """``functions`` names a function greenify has no green twin for."""

    def __init__(self, unknown: Sequence[str], known: Sequence[str]) -> None:
        super().__init__(f"functions: no green twin for {', '.join(map(repr, unknown))}; "
                         f"greenify has twins for: {', '.join(known)}", ", ".join(unknown))
        self.unknown = tuple(unknown)


class NotElfError(GreenifyError):
    """The file is not an ELF object, or is too damaged to read."""


class WrongMachineError(GreenifyError):
    """The ELF file is for another machine or class (32/64 bit) than this process."""


class StaticExecutableError(GreenifyError):
    """The ELF file has no dynamic segment: it imports nothing that could be patched."""


class BuildIdMismatchError(GreenifyError):
    """The file on disk is not the object that is loaded (GNU build-ids or layouts differ)."""


class SlotOutsideSegmentsError(GreenifyError):
    """A relocation names a slot outside the object's own writable loaded segments."""


class ProtectedTargetError(GreenifyError):
    """The target is one greenify never patches: libc, ld.so, libpython, greenify itself."""


class SlotWriteError(GreenifyError):
    """The operating system refused a slot write (mprotect failed, page not mapped)."""
