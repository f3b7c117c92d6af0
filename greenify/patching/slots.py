"""Every slot greenify writes: one lock, one record type, one write path.

Two writers use it: the patcher (greenify/patching/patcher.py) points blocking
imports at the green twins, and patch_on_load (greenify/patching/onload.py) points
``dlopen``/``dlmopen`` imports at its hooks.  Both go the same way:

* plan: the writer reads the object's file (greenify.patching.elf) and decides which
  import gets which value;
* check (``check_object``): the file is the object that is loaded (same GNU
  build-id and PT_LOAD layout) and every slot it names lies in the object's
  own writable loaded segments;
* write and record (``write``): all of the object's slots or none, through
  csrc/patch/slots.c; each slot's previous value kept in a PatchedSlot;
* restore (``restore``): what each slot held before, unless someone hooked
  it since.

All of it runs under one re-entrant lock (``locked()``): with a lock per
writer, one made a shared RELRO page read-only again between the other's
mprotect and its store, and the process died.  Records of objects that were
unloaded are dropped.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from greenify.originals import get_original

from greenify.patching import elf
from greenify.patching import loaded
from greenify.errors import BuildIdMismatchError, SlotOutsideSegmentsError, SlotWriteError
from greenify.patching.loaded import LoadedObject

log = logging.getLogger("greenify")

POINTER_SIZE = struct.calcsize("P")

# What a slot greenify wrote now holds (PatchedSlot.purpose).
TWIN = "green twin"          # patch_library: a blocking import -> its green twin
DLOPEN_HOOK = "dlopen hook"  # patch_on_load: dlopen/dlmopen -> csrc/patch/onload.c's hook

ObjectKey = Tuple[str, int]  # (real path, load base) of a loaded object


@dataclass(frozen=True)
class PatchedSlot:
    """A slot that greenify wrote (and has not put back, while recorded)."""

    symbol: str
    version: Optional[str]
    relocation_type: str
    slot_address: int
    previous: int  # what the slot held before greenify: restored by unpatching
    value: int     # what greenify wrote: a green twin's or a hook's address
    purpose: str = TWIN

    def __repr__(self) -> str:
        version = f"@{self.version}" if self.version else ""
        hook = "" if self.purpose == TWIN else f" ({self.purpose})"
        return f"<{self.symbol}{version} {self.relocation_type} slot {self.slot_address:#x}{hook}>"


# A native lock even under monkey.patch_all(): writing never switches
# greenlets, and no two threads may have a page open for their stores at once.
# Re-entrant: a library loaded while this thread writes (pyelftools importing
# a module) enters the dlopen hook, whose work takes the lock again.
_lock = get_original("threading", "RLock")()
_records: Dict[ObjectKey, Dict[int, PatchedSlot]] = {}
_unloads_seen: Optional[int] = None  # loaded_subs() when records were last pruned


def _reset_after_fork() -> None:
    # Another thread may have held the lock at fork(); it never releases it
    # in the child.  Slot stores are single atomic writes: the records are whole.
    global _lock
    _lock = get_original("threading", "RLock")()


os.register_at_fork(after_in_child=_reset_after_fork)


def object_key(obj: LoadedObject) -> ObjectKey:
    return obj.realpath, obj.base


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the one lock for a whole plan -> write -> record operation (re-entrant)."""
    with _lock:
        _forget_unloaded()
        yield


def _forget_unloaded() -> None:
    """Drop the records of objects no longer loaded: nothing is left to put
    back, and a later object at the same base is another object."""
    global _unloads_seen
    from greenify._green import lib

    unloads = lib.loaded_subs()
    if unloads == _unloads_seen:
        return
    current = {object_key(obj) for obj in loaded.loaded_objects(with_missing_files=True)}
    for key in [key for key in _records if key not in current]:
        log.info("greenify: %s was unloaded: its %d written slot(s) are forgotten", key[0], len(_records[key]))
        del _records[key]
    _unloads_seen = unloads


def check_object(obj: LoadedObject, imports: elf.ElfImports) -> None:
    """The file read must be the object that is loaded, or its relocations
    would name slots of some other layout; and every slot it names (written
    or not: a file that names one elsewhere is not to be trusted at all)
    must lie in the object's own writable loaded segments."""
    if imports.build_id != obj.build_id:
        file_id = imports.build_id.hex() if imports.build_id else "none"
        memory_id = obj.build_id.hex() if obj.build_id else "none"
        raise BuildIdMismatchError(
            f"{obj.path}: the file's GNU build-id ({file_id}) differs from the loaded object's ({memory_id}); "
            "the file was replaced after it was loaded: restart the process to patch it", obj.path)
    file_layout = [(obj.base + seg.p_vaddr, obj.base + seg.p_vaddr + seg.p_memsz, seg.p_flags)
                   for seg in imports.segments]
    memory_layout = [(seg.start, seg.end, seg.flags) for seg in obj.segments]
    if file_layout != memory_layout:
        raise BuildIdMismatchError(f"{obj.path}: the file's PT_LOAD segments differ from the loaded object's", obj.path)
    for imp in imports.imports:
        slot_address = obj.base + imp.r_offset
        if not obj.holds_slot(slot_address, POINTER_SIZE):
            raise SlotOutsideSegmentsError(
                f"{obj.path}: relocation of {imp.symbol} names slot {slot_address:#x}, outside the object's "
                "writable loaded segments; refusing to write anything in it", obj.path)


def slot_value(slot_address: int) -> int:
    """What a slot holds now."""
    return ctypes.c_void_p.from_address(slot_address).value or 0


def write_slots(changes: Sequence[Tuple[int, int, int]]):
    """Store every (slot address, new value, expected value or 0 for any)
    through csrc/patch/slots.c: all or nothing, each page's protection put back
    exactly.  Returns the cffi array (``previous`` and ``written`` per
    entry) and None, or None and the reason nothing was written.  The one
    place greenify stores into slots; callers hold the lock."""
    from greenify._green import ffi, lib

    writes = ffi.new("struct slots_write[]", len(changes))
    for entry, (slot_address, value, expected) in zip(writes, changes):
        entry.slot = slot_address
        entry.value = value
        entry.expected = expected
    error = ffi.new("char[]", lib.SLOTS_ERROR_MAX)
    if lib.slots_write_all(writes, len(changes), error, len(error)) != lib.SLOTS_OK:
        return None, ffi.string(error).decode()
    return writes, None


def write(obj: LoadedObject, purpose: str,
          changes: Sequence[Tuple[elf.BlockingImport, int]]) -> Tuple[List[PatchedSlot], List[PatchedSlot]]:
    """Write each (import, value) into ``obj``'s slot for it, all or none,
    and record it.  ``obj`` must have passed ``check_object``.  Returns the
    slots written now and those that already held their value from an earlier
    write (a record whose slot no longer holds its value is stale: the object
    was reloaded or someone re-hooked the slot, and it is written again).
    Raises SlotWriteError, with nothing written, when the system refuses."""
    key = object_key(obj)
    with locked():
        record = _records.get(key, {})
        already: List[PatchedSlot] = []
        to_write: List[Tuple[elf.BlockingImport, int, int]] = []
        for imp, value in changes:
            slot_address = obj.base + imp.r_offset
            held = record.get(slot_address)
            if held is not None and held.value == value and slot_value(slot_address) == value:
                already.append(held)
            else:
                to_write.append((imp, slot_address, value))
        if not to_write:
            return [], already
        writes, error = write_slots([(slot_address, value, 0) for _imp, slot_address, value in to_write])
        if writes is None:
            raise SlotWriteError(f"{obj.path}: {error}; nothing was written", obj.path)
        record = _records.setdefault(key, {})
        written = []
        for i, (imp, slot_address, value) in enumerate(to_write):
            slot = PatchedSlot(imp.symbol, imp.version, imp.relocation_type, slot_address, writes[i].previous, value,
                               purpose)
            record[slot_address] = slot
            written.append(slot)
        log.info("greenify: wrote %d %s slot(s) of %s: %s", len(written), purpose, obj.path,
                 ", ".join(sorted({slot.symbol for slot in written})))
        return written, already


def restore(key: ObjectKey, path: str, slot_addresses: Iterable[int]) -> int:
    """Put back what each recorded slot of the object held before greenify
    wrote it, and forget the records.  A slot that no longer holds what
    greenify wrote (someone hooked it since) keeps its value.  Returns how
    many slots were put back; raises SlotWriteError when the system refuses."""
    with locked():
        record = _records.get(key, {})
        slots = [record[address] for address in slot_addresses if address in record]
        if not slots:
            return 0
        writes, error = write_slots([(slot.slot_address, slot.previous, slot.value) for slot in slots])
        if writes is None:
            raise SlotWriteError(f"{path}: {error}; nothing was put back", path)
        for i, slot in enumerate(slots):
            if not writes[i].written:
                log.warning("greenify: %s slot %#x of %s no longer holds greenify's %s (holds %#x): left as is",
                            path, slot.slot_address, slot.symbol, slot.purpose, writes[i].previous)
            del record[slot.slot_address]
        if not record:
            _records.pop(key, None)
        return sum(writes[i].written for i in range(len(slots)))


def restore_all(obj: Optional[LoadedObject] = None, purpose: Optional[str] = None) -> int:
    """``restore`` every recorded slot of ``obj`` (of every object when None)
    written for ``purpose`` (any when None)."""
    with locked():
        restored = 0
        for key, record in written_slots(obj, purpose).items():
            restored += restore(key, key[0], list(record))
        return restored


def written_slots(obj: Optional[LoadedObject] = None,
                  purpose: Optional[str] = None) -> Dict[ObjectKey, Dict[int, PatchedSlot]]:
    """A snapshot of the slots greenify has written and not put back, in
    objects still loaded: {(real path, load base): {slot address:
    PatchedSlot}}, only ``obj``'s and only ``purpose``'s when given."""
    with locked():
        keys = [object_key(obj)] if obj is not None else list(_records)
        snapshot = {}
        for key in keys:
            record = {address: slot for address, slot in _records.get(key, {}).items()
                      if purpose is None or slot.purpose == purpose}
            if record:
                snapshot[key] = record
        return snapshot
