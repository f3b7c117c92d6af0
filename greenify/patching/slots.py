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
import itertools
import logging
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

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


Change = Tuple[int, int, int]  # (slot address, new value, expected value or 0 for any)


def write_slots(groups: Sequence[Sequence[Change]]) -> List[Tuple[Optional[List[Tuple[int, int]]], Optional[str]]]:
    """Store each group's changes through csrc/patch/slots.c, each group all
    or nothing (one group per object), each page's protection put back
    exactly, with one read of /proc/self/maps for them all.  Returns per
    group the (previous value, written) of each change and None, or None and
    the reason nothing of that group was written.  The one place greenify
    stores into slots; callers hold the lock."""
    from greenify._green import ffi, lib

    changes = [change for group in groups for change in group]
    writes = ffi.new("struct slots_write[]", max(len(changes), 1))
    for entry, (slot_address, value, expected) in zip(writes, changes):
        entry.slot = slot_address
        entry.value = value
        entry.expected = expected
    ends = ffi.new("int[]", list(itertools.accumulate(len(group) for group in groups)) or [0])
    statuses = ffi.new("int[]", max(len(groups), 1))
    errors = ffi.new("char[]", lib.SLOTS_ERROR_MAX * max(len(groups), 1))
    lib.slots_write_groups(writes, ends, len(groups), statuses, errors)
    results: List[Tuple[Optional[List[Tuple[int, int]]], Optional[str]]] = []
    start = 0
    for g, group in enumerate(groups):
        if statuses[g] != lib.SLOTS_OK:
            results.append((None, ffi.string(errors + g * lib.SLOTS_ERROR_MAX).decode()))
        else:
            results.append(([(writes[i].previous, writes[i].written) for i in range(start, start + len(group))], None))
        start += len(group)
    return results


Written = Tuple[List[PatchedSlot], List[PatchedSlot]]


def write(obj: LoadedObject, purpose: str, changes: Sequence[Tuple[elf.BlockingImport, int]]) -> Written:
    """Write each (import, value) into ``obj``'s slot for it, all or none,
    and record it.  ``obj`` must have passed ``check_object``.  Returns the
    slots written now and those that already held their value from an earlier
    write (a record whose slot no longer holds its value is stale: the object
    was reloaded or someone re-hooked the slot, and it is written again).
    Raises SlotWriteError, with nothing written, when the system refuses."""
    (result,) = write_each([(obj, purpose, changes)])
    if isinstance(result, SlotWriteError):
        raise result
    return result


def write_each(items: Sequence[Tuple[LoadedObject, str, Sequence[Tuple[elf.BlockingImport, int]]]]
               ) -> List[Union[Written, SlotWriteError]]:
    """``write`` for several objects (obj, purpose, changes) at once, each
    all or nothing on its own: per object, what ``write`` returns, or the
    SlotWriteError it would raise (nothing written in that object)."""
    with locked():
        results: List[Union[Written, SlotWriteError, None]] = []
        # (index in results, obj, purpose, (import, slot, value) to write, slots that already hold theirs)
        pending: List[Tuple[int, LoadedObject, str, List[Tuple[elf.BlockingImport, int, int]], List[PatchedSlot]]] = []
        for obj, purpose, changes in items:
            record = _records.get(object_key(obj), {})
            already: List[PatchedSlot] = []
            to_write: List[Tuple[elf.BlockingImport, int, int]] = []
            for imp, value in changes:
                slot_address = obj.base + imp.r_offset
                held = record.get(slot_address)
                if held is not None and held.value == value and slot_value(slot_address) == value:
                    already.append(held)
                else:
                    to_write.append((imp, slot_address, value))
            results.append(([], already) if not to_write else None)
            if to_write:
                pending.append((len(results) - 1, obj, purpose, to_write, already))
        outcomes = write_slots([[(slot_address, value, 0) for _imp, slot_address, value in to_write]
                                for _index, _obj, _purpose, to_write, _already in pending]) if pending else []
        for (index, obj, purpose, to_write, already), (writes, error) in zip(pending, outcomes):
            if writes is None:
                results[index] = SlotWriteError(f"{obj.path}: {error}; nothing was written", obj.path)
                continue
            record = _records.setdefault(object_key(obj), {})
            written = []
            for (imp, slot_address, value), (previous, _written) in zip(to_write, writes):
                slot = PatchedSlot(imp.symbol, imp.version, imp.relocation_type, slot_address, previous, value,
                                   purpose)
                record[slot_address] = slot
                written.append(slot)
            log.info("greenify: wrote %d %s slot(s) of %s: %s", len(written), purpose, obj.path,
                     ", ".join(sorted({slot.symbol for slot in written})))
            results[index] = (written, already)
        return results  # type: ignore[return-value]  # every entry is filled above


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
        ((writes, error),) = write_slots([[(slot.slot_address, slot.previous, slot.value) for slot in slots]])
        if writes is None:
            raise SlotWriteError(f"{path}: {error}; nothing was put back", path)
        for slot, (previous, written) in zip(slots, writes):
            if not written:
                log.warning("greenify: %s slot %#x of %s no longer holds greenify's %s (holds %#x): left as is",
                            path, slot.slot_address, slot.symbol, slot.purpose, previous)
            del record[slot.slot_address]
        if not record:
            _records.pop(key, None)
        return sum(written for _previous, written in writes)


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
