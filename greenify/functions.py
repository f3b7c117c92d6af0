"""The green functions, as csrc/wait/green.h lists them, read through cffi.

One row per libc call greenify knows to block: its name, the address of its
green twin (None for a call without one: greenify-inspect reports it, the
patcher leaves it alone), its family, and for a _FORTIFY_SOURCE form the
plain function it stands for.  The patcher's twins (greenify.patching.patcher),
the blocking calls read from ELF files (greenify.patching.elf) and greenify-inspect's
categories (greenify.patching.inventory) are derived from these rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

from greenify._green import ffi, lib


@dataclass(frozen=True)
class GreenFunction:
    name: str                    # libc's symbol
    twin: Optional[int]          # address of green_<name>, None if there is none
    family: str                  # one of BLOCKING_FAMILIES, or "descriptor" (close: never blocks)
    fortified_of: Optional[str]  # the plain function of a _FORTIFY_SOURCE form


def _string(pointer) -> Optional[str]:
    return None if pointer == ffi.NULL else ffi.string(pointer).decode()


def _read_rows(entry_at=lib.green_function_entry) -> Tuple[GreenFunction, ...]:
    rows = []
    index = 0
    while True:
        entry = entry_at(index)
        if entry == ffi.NULL:
            return tuple(rows)
        twin = int(ffi.cast("uintptr_t", entry.twin)) or None
        rows.append(GreenFunction(_string(entry.name), twin, _string(entry.family), _string(entry.fortified_of)))
        index += 1


GREEN_FUNCTIONS: Tuple[GreenFunction, ...] = _read_rows()
# The twins a TLS library gets (csrc/twins/green_tls.h): green on a greenified client's descriptors only.
TLS_TWINS: Tuple[GreenFunction, ...] = _read_rows(lib.green_tls_function_entry)


def twins() -> Dict[str, int]:
    """symbol -> address of its green twin, fortified forms included."""
    return {row.name: row.twin for row in GREEN_FUNCTIONS if row.twin is not None}


def tls_twins() -> Dict[str, int]:
    """symbol -> address of its twin for a TLS library (greenify.patching.companions)."""
    return {row.name: row.twin for row in TLS_TWINS}


BLOCKING_FAMILIES = ("socket", "io", "poll", "sleep", "resolver", "lock", "process")


def blocking_calls(*families: str) -> FrozenSet[str]:
    """The plain names (no fortified forms) of the calls that block, of
    ``families`` (every one of BLOCKING_FAMILIES if none is given), with a
    twin or not."""
    wanted = families or BLOCKING_FAMILIES
    return frozenset(row.name for row in GREEN_FUNCTIONS if row.fortified_of is None and row.family in wanted)


def activate() -> None:
    """Activate the green functions: from now on a twin called in a greenlet
    (or an asyncio run) waits instead of blocking (greenify.greenify())."""
    lib.green_set_active(1)


def is_active() -> bool:
    return bool(lib.green_is_active())
