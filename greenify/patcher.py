"""Pointing loaded libraries' imports of blocking calls at the green twins.

    report = patch_library("libmariadb.so.3")   # every loaded match
    unpatch_library("libmariadb.so.3")          # puts back what was there

The flow is one way: target -> loaded objects (greenify.loaded) -> their
blocking imports, read from the file (greenify.elf) -> checks -> slots
written (csrc/slots.c) -> PatchReport.  Before writing anything for an
object, the file must be the object that is loaded (same GNU build-id and
PT_LOAD layout) and every slot must lie in the object's own writable loaded
segments; the object is then patched all or nothing.  Every previous slot
value is recorded, so unpatching restores exactly what was there.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple

from gevent.monkey import get_original

from greenify import companions, elf, loaded
from greenify.errors import (BuildIdMismatchError, GreenifyError, ProtectedTargetError, SlotOutsideSegmentsError,
                             SlotWriteError, WrongMachineError)
from greenify.loaded import LoadedObject, Target

log = logging.getLogger("greenify")

_POINTER_SIZE = struct.calcsize("P")

# A native lock even under monkey.patch_all(): patching never switches
# greenlets, and threads must not interleave their slot writes.  Re-entrant:
# a library loaded while this thread patches (pyelftools importing a module)
# is patched on load (greenify.onload) from inside the outer call.
_lock = get_original("threading", "RLock")()


def _reset_lock_after_fork() -> None:
    # Another thread may have held the lock at fork(); it never releases it
    # in the child.  Slot writes are single stores, so the records are whole.
    global _lock
    _lock = get_original("threading", "RLock")()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


@dataclass(frozen=True)
class PatchedSlot:
    """A slot that now holds (or held) a green twin's address."""

    symbol: str
    version: Optional[str]
    relocation_type: str
    slot_address: int
    previous: int  # what the slot held before greenify: restored by unpatch
    green: int     # the twin's address

    def __repr__(self) -> str:
        version = f"@{self.version}" if self.version else ""
        return f"<{self.symbol}{version} {self.relocation_type} slot {self.slot_address:#x}>"


@dataclass(frozen=True)
class SkippedImport:
    """A blocking import left alone, and why."""

    symbol: str
    version: Optional[str]
    relocation_type: str
    slot_address: int
    reason: str

    def __repr__(self) -> str:
        return f"<{self.symbol} {self.relocation_type} slot {self.slot_address:#x}: {self.reason}>"


@dataclass
class ObjectReport:
    """What patching did to one loaded object."""

    path: str
    base: int
    build_id: Optional[str]
    patched: List[PatchedSlot] = field(default_factory=list)          # written by this call
    already_patched: List[PatchedSlot] = field(default_factory=list)  # written by an earlier call
    skipped: List[SkippedImport] = field(default_factory=list)
    reason: Optional[str] = None  # why an object the target did not name was patched (greenify.companions)

    def __bool__(self) -> bool:
        return bool(self.patched or self.already_patched)


@dataclass
class PatchReport:
    """The result of patch_library(): one ObjectReport per object patched,
    and the objects left out (with the reason).  Truthy when some slot of the
    target now points at a green twin (patched by this call or earlier)."""

    target: str
    objects: List[ObjectReport] = field(default_factory=list)
    skipped_objects: List[Tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.objects)

    @property
    def patched_slots(self) -> List[PatchedSlot]:
        return [slot for obj in self.objects for slot in obj.patched + obj.already_patched]

    def __repr__(self) -> str:
        lines = [f"<PatchReport {self.target}: {len(self.patched_slots)} slot(s) in {sum(map(bool, self.objects))} object(s)"]
        for obj in self.objects:
            lines.append(f"  {obj.path} (base {obj.base:#x}, build-id {obj.build_id or 'none'})"
                         + (f": {obj.reason}" if obj.reason else ""))
            lines += [f"    patched  {slot!r}" for slot in obj.patched]
            lines += [f"    already  {slot!r}" for slot in obj.already_patched]
            lines += [f"    skipped  {skip!r}" for skip in obj.skipped]
        lines += [f"  skipped object {path}: {reason}" for path, reason in self.skipped_objects]
        return "\n".join(lines) + ">"


# (real path, load base) -> {slot address: PatchedSlot}: every slot greenify wrote.
_records: Dict[Tuple[str, int], Dict[int, PatchedSlot]] = {}


def patched_slots(obj: Optional[LoadedObject] = None) -> Dict:
    """A snapshot of the slots greenify has written and not put back: for
    ``obj``, {slot address: PatchedSlot}; without it, {(real path, load
    base): {slot address: PatchedSlot}} for every object."""
    with _lock:
        if obj is not None:
            return dict(_records.get((obj.realpath, obj.base), {}))
        return {key: dict(record) for key, record in _records.items()}


@lru_cache(maxsize=None)
def green_twins() -> Dict[str, int]:
    """symbol -> address of its green twin: every ``green_<name>`` in
    greenify._green.lib whose <name> is a function libc exports."""
    from greenify._green import ffi, lib

    libc = ctypes.CDLL(None)
    twins = {}
    for attribute in dir(lib):
        if not attribute.startswith("green_"):
            continue
        symbol = attribute[len("green_"):]
        if not hasattr(libc, symbol):  # green_set_active and friends are not twins
            continue
        twins[symbol] = int(ffi.cast("uintptr_t", ffi.addressof(lib, attribute)))
    return twins


@lru_cache(maxsize=None)
def _host() -> Tuple[str, int]:
    """(e_machine, ELF class) of this process, from its own executable."""
    e_machine, elf_class, _e_type = elf.read_identity("/proc/self/exe")
    return e_machine, elf_class


def _describe(target: Target) -> str:
    if isinstance(target, types.ModuleType):
        return f"module {target.__name__}"
    return os.fspath(target)


def read_target_file(path: str, symbols: Optional[Iterable[str]] = None) -> elf.ElfImports:
    """Read and check an ELF file: it must be for this machine and class."""
    e_machine, elf_class, _e_type = elf.read_identity(path)
    host_machine, host_class = _host()
    if (e_machine, elf_class) != (host_machine, host_class):
        raise WrongMachineError(
            f"{path}: ELF{elf_class} {e_machine}, but this process is ELF{host_class} {host_machine}", path)
    return elf.read_blocking_imports(path, symbols)


def _check_identity(obj: LoadedObject, imports: elf.ElfImports) -> None:
    """The file must be the object that is loaded, or its relocations would
    name slots of some other layout."""
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


def _plan(obj: LoadedObject, functions: Optional[FrozenSet[str]],
          twins: Optional[Dict[str, int]] = None) -> Tuple[ObjectReport, List[Tuple[elf.BlockingImport, int, int]]]:
    """Read, check and decide; writes nothing.  Returns the report so far
    and the (import, slot address, twin address) to write.  ``twins``:
    symbol -> twin address, green_twins() unless given."""
    twins = green_twins() if twins is None else twins
    imports = read_target_file(obj.path, elf.BLOCKING_SYMBOLS | twins.keys())
    _check_identity(obj, imports)
    report = ObjectReport(obj.path, obj.base, imports.build_id_hex)
    record = _records.get((obj.realpath, obj.base), {})
    to_write = []
    for imp in imports.imports:
        slot_address = obj.base + imp.r_offset
        if not obj.holds_slot(slot_address, _POINTER_SIZE):
            # Checked for every import, patched or not: a file that names a
            # slot elsewhere is not to be trusted at all.
            raise SlotOutsideSegmentsError(
                f"{obj.path}: relocation of {imp.symbol} names slot {slot_address:#x}, outside the object's "
                "writable loaded segments; refusing to patch anything in it", obj.path)
        twin = twins.get(imp.symbol)
        reason = None
        if twin is None:
            reason = "no green twin"
        elif functions is not None and imp.symbol not in functions:
            reason = "not in functions"
        elif imp.r_addend != 0:
            reason = f"relocation has addend {imp.r_addend}"
        if reason is not None:
            report.skipped.append(SkippedImport(imp.symbol, imp.version, imp.relocation_type, slot_address, reason))
        elif slot_address in record and _slot_value(slot_address) == record[slot_address].green:
            report.already_patched.append(record[slot_address])
        else:
            to_write.append((imp, slot_address, twin))
    for imp in imports.self_defined:
        report.skipped.append(SkippedImport(imp.symbol, imp.version, imp.relocation_type, obj.base + imp.r_offset,
                                            "defined by the object itself"))
    return report, to_write


def write_slots(changes: Sequence[Tuple[int, int, int]]):
    """Write every (slot address, new value, expected value or 0 for any)
    through csrc/slots.c: all or nothing, each page's protection put back
    exactly.  Returns the cffi array (``previous`` and ``written`` per
    entry) and None, or None and the reason nothing was written."""
    from greenify._green import ffi, lib

    writes = ffi.new("struct slots_write[]", len(changes))
    for entry, (slot_address, value, expected) in zip(writes, changes):
        entry.slot = slot_address
        entry.value = value
        entry.expected = expected
    error = ffi.new("char[]", 512)
    if lib.slots_write_all(writes, len(changes), error, len(error)) != lib.SLOTS_OK:
        return None, ffi.string(error).decode()
    return writes, None


def _slot_value(slot_address: int) -> int:
    """What a slot holds now.  A record whose slot no longer holds its twin
    is stale (the object was unloaded and another loaded at the same base,
    or someone re-hooked the slot): the slot is patched again."""
    return ctypes.c_void_p.from_address(slot_address).value or 0


def _write(obj: LoadedObject, report: ObjectReport, to_write: List[Tuple[elf.BlockingImport, int, int]]) -> None:
    if not to_write:
        return
    writes, error = write_slots([(slot_address, twin, 0) for _imp, slot_address, twin in to_write])
    if writes is None:
        raise SlotWriteError(f"{obj.path}: {error}; nothing was patched", obj.path)
    record = _records.setdefault((obj.realpath, obj.base), {})
    for i, (imp, slot_address, twin) in enumerate(to_write):
        slot = PatchedSlot(imp.symbol, imp.version, imp.relocation_type, slot_address, writes[i].previous, twin)
        record[slot_address] = slot
        report.patched.append(slot)
    log.info("greenify: patched %d slot(s) of %s: %s", len(to_write), obj.path,
             ", ".join(sorted({imp.symbol for imp, _, _ in to_write})))


def _resolve(target: Target) -> Tuple[str, List[LoadedObject], List[Tuple[str, str]]]:
    """(description, objects to patch, objects left out with reasons).  An
    explicit target that is protected raises ProtectedTargetError."""
    description = _describe(target)
    if isinstance(target, types.ModuleType):
        objects, left_out = loaded.module_objects(target)
        return description, objects, [(obj.path, reason) for obj, reason in left_out]
    path = os.fspath(target)
    if "/" in path:
        loaded.check_path(path)
        read_target_file(path, symbols=())  # a bad file says so before "not loaded"
    objects = loaded.find_loaded(target)
    for obj in objects:
        reason = loaded.protected_reason(obj)
        if reason is not None:
            raise ProtectedTargetError(f"{description}: greenify never patches {obj.path}: {reason}", description)
    return description, objects, []


def patch_library(target: Target, *, functions: Optional[Iterable[str]] = None) -> PatchReport:
    """Point every blocking import that has a green twin, in every loaded
    object ``target`` names, at the twin; ``functions`` narrows the symbols.
    Each object is checked completely before anything is written, and is
    patched all or nothing; patching again changes nothing.  Raises a
    GreenifyError subclass, naming the target, when it cannot patch."""
    wanted = None if functions is None else frozenset(functions)
    if wanted is not None and wanted - green_twins().keys():
        log.warning("greenify: no green twin for %s: ignored", ", ".join(sorted(wanted - green_twins().keys())))
    with _lock:
        description, objects, left_out = _resolve(target)
        report = PatchReport(description, skipped_objects=left_out)
        # The TLS libraries that do the objects' socket I/O, found among them (a module target) or
        # brought along, get twins of their own (greenify.companions)
        tls = {companion.obj.realpath: companion for companion in companions.tls_companions_of(objects)}
        plans = [(obj,) + _plan(obj, wanted) for obj in objects if obj.realpath not in tls]  # all checked first
        for companion in tls.values():
            plans.append((companion.obj,) + _plan(companion.obj, wanted, companions.tls_twins()))
            plans[-1][1].reason = companion.reason
        for obj, object_report, to_write in plans:
            _write(obj, object_report, to_write)
            report.objects.append(object_report)
        return report


def _restore(key: Tuple[str, int], path: str, slot_addresses: Iterable[int]) -> int:
    record = _records.get(key, {})
    slots = [record[address] for address in slot_addresses if address in record]
    if not slots:
        return 0
    # expected: the twin; a slot someone else hooked since keeps theirs
    writes, error = write_slots([(slot.slot_address, slot.previous, slot.green) for slot in slots])
    if writes is None:
        raise SlotWriteError(f"{path}: {error}; nothing was unpatched", path)
    for i, slot in enumerate(slots):
        if not writes[i].written:
            log.warning("greenify: %s slot %#x of %s no longer holds the green twin (holds %#x): left as is",
                        path, slot.slot_address, slot.symbol, writes[i].previous)
        del record[slot.slot_address]
    if not record:
        _records.pop(key, None)
    return sum(writes[i].written for i in range(len(slots)))


def unpatch_library(target: Target) -> int:
    """Put back, in every loaded object ``target`` names, the value each
    patched slot held before greenify wrote it.  Returns how many slots were
    restored (a slot someone else re-hooked since is left alone)."""
    with _lock:
        _description, objects, _left_out = _resolve(target)
        objects = objects + [companion.obj for companion in companions.tls_companions_of(objects)
                             if companion.obj not in objects]
        return sum(_restore((obj.realpath, obj.base), obj.path, list(_records.get((obj.realpath, obj.base), {})))
                   for obj in objects)


def unpatch_report(report: PatchReport) -> int:
    """Undo exactly the slots ``report``'s call wrote (not earlier patches)."""
    restored = 0
    with _lock:
        for obj in report.objects:
            key = (os.path.realpath(obj.path), obj.base)
            restored += _restore(key, obj.path, [slot.slot_address for slot in obj.patched])
    return restored


@contextlib.contextmanager
def patched(target: Target, *, functions: Optional[Iterable[str]] = None) -> Iterator[PatchReport]:
    """Patch ``target`` for the block; on leaving, undo what this patched
    (slots patched before the block stay patched)."""
    report = patch_library(target, functions=functions)
    try:
        yield report
    finally:
        unpatch_report(report)


def patch_lib(path: "str | os.PathLike[str]") -> bool:
    """douban greenify's spelling: patch the loaded library at ``path``.
    True when it is patched; False, with a warning logged, when it cannot be."""
    try:
        return bool(patch_library(path))
    except GreenifyError as exc:
        log.warning("greenify: patch_lib(%r) failed: %s", os.fspath(path), exc)
        return False
