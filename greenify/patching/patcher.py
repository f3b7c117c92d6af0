"""Pointing loaded libraries' imports of blocking calls at the green twins.

    report = patch_library("libmariadb.so.3")   # every loaded match
    unpatch_library("libmariadb.so.3")          # puts back what was there

The flow is one way: target -> loaded objects (greenify.patching.loaded) -> their
blocking imports, read from the file (greenify.patching.elf) -> checks -> slots
written -> PatchReport.  Checking, writing, recording and restoring are
greenify.patching.slots', the one write path patch_on_load's dlopen hooks use too,
under its one lock: before anything is written for an object, the file must
be the object that is loaded (same GNU build-id and PT_LOAD layout) and
every slot must lie in the object's own writable loaded segments; the object
is then patched all or nothing.  Every previous slot value is recorded, so
unpatching restores exactly what was there.
"""
from __future__ import annotations

import contextlib
import logging
import os
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from greenify import functions
from greenify.patching import companions
from greenify.patching import elf
from greenify.patching import loaded
from greenify.patching import slots
from greenify.patching.imports import planned_symbols, read_object, read_target_file
from greenify.errors import GreenifyError, ProtectedTargetError, UnknownFunctionError
from greenify.patching.loaded import LoadedObject, Target
from greenify.patching.slots import PatchedSlot

log = logging.getLogger("greenify")


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
    reason: Optional[str] = None  # why an object the target did not name was patched (greenify.patching.companions)

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
            if not (obj.patched or obj.already_patched or obj.skipped):
                lines.append("    nothing to patch: it imports no blocking call itself")
        lines += [f"  skipped object {path}: {reason}" for path, reason in self.skipped_objects]
        return "\n".join(lines) + ">"


@lru_cache(maxsize=None)
def green_twins() -> Dict[str, int]:
    """symbol -> address of its green twin, from the list of green
    functions (csrc/wait/green.h, read by greenify.functions)."""
    from greenify import functions as _functions

    return _functions.twins()


def _describe(target: Union[str, types.ModuleType]) -> str:
    if isinstance(target, types.ModuleType):
        return f"module {target.__name__}"
    return target


def wanted_functions(functions: "Optional[Iterable[str] | str]") -> Optional[FrozenSet[str]]:
    """``functions`` as a set of names that all have a green twin (None: all
    of them).  One string is one name.  Raises TypeError for a name that is
    not a string, UnknownFunctionError listing the names without a twin."""
    if functions is None:
        return None
    names = [functions] if isinstance(functions, str) else list(functions)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"functions: names of C functions (str), not {type(name).__name__} {name!r}")
    unknown = sorted(set(names) - green_twins().keys())
    if unknown:
        raise UnknownFunctionError(unknown, sorted(green_twins()))
    return frozenset(names)


def loaded_clients(objects: Sequence[LoadedObject]) -> List[str]:
    """The names of the loaded objects patch_all() would patch: what a user
    who named something not loaded most likely meant."""
    from greenify.patching import policy  # noqa: PLC0415 - policy reads objects through imports.py, as we do

    return [obj.name for obj in policy.candidates(objects)]


def ensure_active(caller: str) -> None:
    """Activate the green functions if nobody has: patching without them
    would change nothing, silently (greenify.greenify() stays the explicit,
    idempotent spelling)."""
    if not functions.is_active():
        functions.activate()
        log.info("greenify: %s activated the green functions (greenify.greenify() was not called)", caller)


def _plan(obj: LoadedObject, functions: Optional[FrozenSet[str]],
          twins: Optional[Dict[str, int]] = None) -> Tuple[ObjectReport, List[Tuple[elf.BlockingImport, int]]]:
    """Read, check and decide; writes nothing.  Returns the report so far
    and the (import, twin address) to write.  ``twins``: symbol -> twin
    address, green_twins() unless given."""
    imports = read_object(obj, None if twins is None else planned_symbols(frozenset(twins)))
    twins = green_twins() if twins is None else twins
    slots.check_object(obj, imports)
    report = ObjectReport(obj.path, obj.base, imports.build_id_hex)
    changes = []
    for imp in imports.imports:
        twin = twins.get(imp.symbol)
        reason = None
        if twin is None:
            reason = "no green twin"
        elif functions is not None and imp.symbol not in functions:
            reason = "not in functions"
        elif imp.r_addend != 0:
            reason = f"relocation has addend {imp.r_addend}"
        if reason is None:
            changes.append((imp, twin))
        else:
            report.skipped.append(SkippedImport(imp.symbol, imp.version, imp.relocation_type, obj.base + imp.r_offset,
                                                reason))
    for imp in imports.self_defined:
        report.skipped.append(SkippedImport(imp.symbol, imp.version, imp.relocation_type, obj.base + imp.r_offset,
                                            "defined by the object itself"))
    return report, changes


def _resolve(target: Union[str, types.ModuleType]) -> Tuple[str, List[LoadedObject], List[Tuple[str, str]]]:
    """(description, objects to patch, objects left out with reasons).  An
    explicit target that is protected raises ProtectedTargetError."""
    description = _describe(target)
    if isinstance(target, types.ModuleType):
        objects, left_out = loaded.module_objects(target)
        return description, objects, [(obj.path, reason) for obj, reason in left_out]
    if "/" in target:
        read_target_file(target, symbols=())  # a bad path or file says so before "not loaded"
    objects = loaded.find_loaded(target, loaded_clients)
    for obj in objects:
        reason = loaded.protected_reason(obj)
        if reason is not None:
            raise ProtectedTargetError(f"{description}: greenify never patches {obj.path}: {reason}", description)
    return description, objects, []


def patch_library(target: Target, *, functions: "Optional[Iterable[str] | str]" = None) -> PatchReport:
    """Point every blocking import that has a green twin, in every loaded
    object ``target`` names, at the twin; ``functions`` (names, or one name)
    narrows the symbols.  Each object is checked completely before anything
    is written, and the call patches all or nothing (a write the system
    refuses in one object puts back what it wrote in the others); patching
    again changes nothing.  Raises a GreenifyError subclass, naming the target, when it
    cannot patch (TypeError for a target or name of the wrong type)."""
    target = loaded.as_target(target, "patch_library")
    wanted = wanted_functions(functions)
    ensure_active("patch_library")
    with slots.locked():
        # plan: the objects the target names, then each one read and checked before any write
        description, objects, left_out = _resolve(target)
        report = PatchReport(description, skipped_objects=left_out)
        # The TLS libraries that do the objects' socket I/O, found among them (a module target) or
        # brought along, get twins of their own (greenify.patching.companions)
        tls = {companion.obj.realpath: companion for companion in companions.tls_companions_of(objects)}
        plans = [(obj,) + _plan(obj, wanted) for obj in objects if obj.realpath not in tls]
        for companion in tls.values():
            plans.append((companion.obj,) + _plan(companion.obj, wanted, companions.tls_twins()))
            plans[-1][1].reason = companion.reason
        results = slots.write_each([(obj, slots.TWIN, changes) for obj, _report, changes in plans])
        failure = next((result for result in results if isinstance(result, GreenifyError)), None)
        if failure is not None:  # all or nothing: what this call wrote in the other objects is put back
            for (obj, _report, _changes), result in zip(plans, results):
                if not isinstance(result, GreenifyError) and result[0]:
                    slots.restore(slots.object_key(obj), obj.path, [slot.slot_address for slot in result[0]])
            raise failure
        for (_obj, object_report, _changes), result in zip(plans, results):
            object_report.patched, object_report.already_patched = result
            report.objects.append(object_report)
        return report


def patch_objects(objects: Sequence[LoadedObject], reasons: Dict[str, str],
                  all_objects: Optional[Sequence[LoadedObject]] = None,
                  functions: Optional[FrozenSet[str]] = None) -> Tuple[List[ObjectReport], List[Tuple[str, str]]]:
    """Patch each of ``objects`` (already chosen: greenify.patching.policy) and the
    TLS libraries that do their socket I/O, each object all or nothing
    through the one write path.  One object that cannot be patched does not
    stop the others: it comes back in the second list with the error.
    ``reasons``: real path -> why it is patched, put in its ObjectReport."""
    done: List[ObjectReport] = []
    failed: List[Tuple[str, str]] = []
    with slots.locked():
        found = companions.tls_companions_of(objects, all_objects)
        plans: List[Tuple[LoadedObject, Optional[Dict[str, int]], str]] = [
            (obj, None, reasons.get(obj.realpath, "")) for obj in objects]
        plans += [(companion.obj, companions.tls_twins(), companion.reason) for companion in found
                  if companion.obj.realpath not in {obj.realpath for obj in objects}]
        ready = []  # (obj, report, changes) of the objects read and checked
        for obj, twins, reason in plans:
            try:
                object_report, changes = _plan(obj, functions, twins)
            except GreenifyError as exc:
                log.warning("greenify: could not patch %s: %s", obj.path, exc)
                failed.append((obj.path, str(exc)))
                continue
            object_report.reason = reason or None
            ready.append((obj, object_report, changes))
        results = slots.write_each([(obj, slots.TWIN, changes) for obj, _report, changes in ready])
        for (obj, object_report, _changes), result in zip(ready, results):
            if isinstance(result, GreenifyError):
                log.warning("greenify: could not patch %s: %s", obj.path, result)
                failed.append((obj.path, str(result)))
                continue
            object_report.patched, object_report.already_patched = result
            done.append(object_report)
    return done, failed


def unpatch_library(target: Target) -> int:
    """Put back, in every loaded object ``target`` names, the value each
    patched slot held before greenify wrote it.  Returns how many slots were
    restored (a slot someone else re-hooked since is left alone)."""
    target = loaded.as_target(target, "unpatch_library")
    with slots.locked():
        _description, objects, _left_out = _resolve(target)
        objects = objects + [companion.obj for companion in companions.tls_companions_of(objects)
                             if companion.obj not in objects]
        return sum(slots.restore_all(obj, slots.TWIN) for obj in objects)


def unpatch_report(report: PatchReport) -> int:
    """Undo exactly the slots ``report``'s call wrote (not earlier patches)."""
    restored = 0
    with slots.locked():
        for obj in report.objects:
            key = (os.path.realpath(obj.path), obj.base)
            restored += slots.restore(key, obj.path, [slot.slot_address for slot in obj.patched])
    return restored


@contextlib.contextmanager
def patched(target: Target, *, functions: "Optional[Iterable[str] | str]" = None) -> Iterator[PatchReport]:
    """Patch ``target`` for the block; on leaving, undo what this patched
    (slots patched before the block stay patched)."""
    report = patch_library(target, functions=functions)
    try:
        yield report
    finally:
        unpatch_report(report)


def patch_lib(path: "str | bytes | os.PathLike[str]") -> bool:
    """douban greenify's spelling: patch the loaded library at ``path``.
    True when it is patched; False, with a warning logged, when it cannot be."""
    try:
        return bool(patch_library(path))
    except GreenifyError as exc:
        log.warning("greenify: patch_lib(%r) failed: %s", path, exc)
        return False
