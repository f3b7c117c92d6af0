"""Patching libraries the moment they are loaded: ``greenify.patch_on_load()``.

    handle = greenify.patch_on_load("libpq", "libmariadb.so.3")
    ...                       # import psycopg2, ctypes.CDLL(...), a driver's own dlopen
    handle.cancel()           # stop (what was patched stays patched)

How: while a registration is active, the ``dlopen`` and ``dlmopen`` GOT
slots (every symbol version) of each loaded object that imports them point
at ``greenify_dlopen_hook``/``greenify_dlmopen_hook`` (csrc/onload.c): the
interpreter (its import machinery), ``_ctypes``, drivers, and every object
loaded later.  The hook calls glibc's function and, when the load added
objects, calls ``patch_what_was_loaded`` below before returning to the caller:
new objects get their own dlopen hooked, and those that match a registered
target are patched by the patcher.  So a library is patched before the code
that loaded it can call it; only its own constructors run unpatched.

These hook slots are kept apart from the patcher's twin table: the patcher
never patches the interpreter, libc or the loader, and the hooks never make
anything wait.  When the last registration is cancelled every hooked slot
gets back the value it held (unless someone re-hooked it meanwhile).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

from greenify._native import get_original

from greenify import elf, loaded, patcher
from greenify._green import ffi, lib
from greenify.errors import GreenifyError, ProtectedTargetError
from greenify.loaded import LoadedObject
from greenify.patcher import PatchReport

log = logging.getLogger("greenify")

# symbol -> the hook in greenify._green.lib that replaces it
_HOOKS = {"dlopen": "greenify_dlopen_hook", "dlmopen": "greenify_dlmopen_hook"}
_POINTER_SIZE = ffi.sizeof("void *")
_get_ident = get_original("_thread", "get_ident")

ObjectKey = Tuple[str, int]  # (real path, load base), as the patcher keys its records


@dataclass(frozen=True)
class HookedSlot:
    """A dlopen/dlmopen slot that holds a hook of greenify's."""

    path: str
    symbol: str
    version: Optional[str]
    slot_address: int
    previous: int  # restored when the last registration is cancelled
    hook: int


@dataclass(eq=False)
class OnLoadPatch:
    """One ``patch_on_load()`` registration.  ``reports`` holds a PatchReport
    per target for what was loaded at registration, then one per library
    patched as it loaded; ``errors`` the (path, message) of matching
    libraries that could not be patched."""

    targets: Tuple[str, ...]
    functions: Optional[FrozenSet[str]] = None
    reports: List[PatchReport] = field(default_factory=list)
    errors: List[Tuple[str, str]] = field(default_factory=list)
    active: bool = True

    def matches(self, obj: LoadedObject) -> bool:
        return any(_target_matches(target, obj) for target in self.targets)

    def cancel(self) -> None:
        """Stop patching on load for these targets (idempotent).  Slots
        already patched stay patched: unpatch_library() puts them back."""
        cancel_patch_on_load(self)

    def __enter__(self) -> "OnLoadPatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def __repr__(self) -> str:
        state = "active" if self.active else "cancelled"
        patched = sum(bool(report) for report in self.reports)
        return f"<OnLoadPatch {', '.join(self.targets)}: {state}, {patched} patched report(s), {len(self.errors)} error(s)>"


# A native re-entrant lock: the callback may run in a thread that already
# holds it (patch_on_load() itself importing something through a hooked dlopen).
_lock = get_original("threading", "RLock")()
_registrations: List[OnLoadPatch] = []
_seen: Set[ObjectKey] = set()           # objects already looked at while active
_hooked: Dict[ObjectKey, Dict[int, HookedSlot]] = {}
_busy_thread: Optional[int] = None     # the thread inside _catch_up()


def _key(obj: LoadedObject) -> ObjectKey:
    return obj.realpath, obj.base


def _target_matches(target: str, obj: LoadedObject) -> bool:
    if "/" in target:
        return bool(loaded.match_path(target, [obj]))
    return bool(loaded.match_name(target, [obj]))


def _hook_address(symbol: str) -> int:
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, _HOOKS[symbol])))


def _may_hook(obj: LoadedObject) -> bool:
    """Every object that can load libraries, the interpreter included;
    never libc, the loader or greenify's own module (they call glibc's)."""
    reason = loaded.protected_reason(obj)
    return reason is None or obj.is_main_program or obj.name.startswith("libpython")


def _install_hooks(objects: Iterable[LoadedObject]) -> None:
    for obj in objects:
        key = _key(obj)
        if key in _hooked or not _may_hook(obj):
            continue
        try:
            imports = elf.read_blocking_imports(obj.path, _HOOKS.keys())
        except GreenifyError as exc:
            log.debug("greenify: cannot read %s for its dlopen: %s", obj.path, exc)
            continue
        wanted = [imp for imp in imports.imports if imp.r_addend == 0]
        if not wanted:
            continue
        if imports.build_id != obj.build_id:
            log.warning("greenify: %s changed on disk since it was loaded: its dlopen is not hooked", obj.path)
            continue
        slots = [(imp, obj.base + imp.r_offset) for imp in wanted]
        if not all(obj.holds_slot(address, _POINTER_SIZE) for _imp, address in slots):
            log.warning("greenify: %s names a dlopen slot outside its writable segments: not hooked", obj.path)
            continue
        writes, error = patcher.write_slots([(address, _hook_address(imp.symbol), 0) for imp, address in slots])
        if writes is None:
            log.warning("greenify: %s: %s; its dlopen is not hooked", obj.path, error)
            continue
        _hooked[key] = {address: HookedSlot(obj.path, imp.symbol, imp.version, address, writes[i].previous,
                                            writes[i].value)
                        for i, (imp, address) in enumerate(slots)}
        log.debug("greenify: hooked %s of %s", ", ".join(sorted({imp.symbol for imp in wanted})), obj.path)


def _remove_hooks() -> None:
    current = {_key(obj) for obj in loaded.loaded_objects()}
    for key, record in list(_hooked.items()):
        del _hooked[key]
        if key not in current:
            continue  # unloaded: nothing to put back
        slots = list(record.values())
        # expected: our hook; someone who hooked it after us keeps theirs
        writes, error = patcher.write_slots([(slot.slot_address, slot.previous, slot.hook) for slot in slots])
        if writes is None:
            log.warning("greenify: %s: %s; its dlopen stays hooked", slots[0].path, error)


def _patch_new(obj: LoadedObject, registration: OnLoadPatch) -> None:
    reason = loaded.protected_reason(obj)
    if reason is not None:
        registration.errors.append((obj.path, f"greenify never patches it: {reason}"))
        log.warning("greenify: %s matches %s but is not patched: %s", obj.path, registration.targets, reason)
        return
    try:
        report = patcher.patch_library(obj.path, functions=registration.functions)
    except GreenifyError as exc:
        registration.errors.append((obj.path, str(exc)))
        log.error("greenify: could not patch %s as it loaded: %s", obj.path, exc)
        return
    registration.reports.append(report)


def _catch_up() -> None:
    """Look at every object not seen yet: hook its dlopen, patch it for each
    registration it matches.  Repeats while loads happen meanwhile."""
    for _round in range(16):
        adds = lib.onload_adds()
        objects = loaded.loaded_objects()
        keys = {_key(obj) for obj in objects}
        new = [obj for obj in objects if _key(obj) not in _seen]
        _seen.intersection_update(keys)  # an unloaded object's base may be reused
        _seen.update(keys)
        for key in [key for key in _hooked if key not in keys]:
            del _hooked[key]
        _install_hooks(new)
        for obj in new:
            for registration in _registrations:
                if registration.matches(obj):
                    _patch_new(obj, registration)
        if lib.onload_adds() == adds:
            return


@contextlib.contextmanager
def _working() -> Iterator[bool]:
    """Hold the lock; yields False when this thread is already working (a
    load caused by the work itself: the outer work's _catch_up sees it)."""
    global _busy_thread
    with _lock:
        if _busy_thread == _get_ident():
            yield False
            return
        _busy_thread = _get_ident()
        try:
            yield True
        finally:
            _busy_thread = None


def patch_what_was_loaded() -> None:
    """After a hooked load added objects (entry greenify_loaded, greenify/_entries.py)."""
    with _working() as first:
        if first and _registrations:
            _catch_up()


def _check_target(target: object) -> str:
    if isinstance(target, types.ModuleType):
        raise TypeError(f"patch_on_load() takes library names, stems or paths; module {target.__name__} is "
                        "already loaded: use patch_library(module)")
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"patch_on_load() takes library names, stems or paths, not {type(target).__name__}")
    name = os.fspath(target)
    if not name:
        raise ValueError("patch_on_load(): an empty target")
    return name


def patch_on_load(*targets: "str | os.PathLike[str]", functions: Optional[Iterable[str]] = None) -> OnLoadPatch:
    """Patch every library a target names (file name, soname, stem or path,
    as for patch_library) now if it is loaded, and from now on the moment it
    is loaded: by an import, ``ctypes.CDLL`` or a C library's ``dlopen``,
    before the loading code's next step.  Returns the registration: its
    ``reports`` say what was patched, ``cancel()`` stops it.  Raises
    ProtectedTargetError for a target that names libc, the loader, libpython
    or the interpreter."""
    if not targets:
        raise TypeError("patch_on_load() needs at least one target")
    names = tuple(_check_target(target) for target in targets)
    registration = OnLoadPatch(names, None if functions is None else frozenset(functions))
    with _working():
        objects = loaded.loaded_objects()
        now: Dict[str, List[LoadedObject]] = {}
        for name in names:
            now[name] = [obj for obj in objects if _target_matches(name, obj)]
            for obj in now[name]:
                reason = loaded.protected_reason(obj)
                if reason is not None:
                    raise ProtectedTargetError(f"{name}: greenify never patches {obj.path}: {reason}", name)
        first = not _registrations
        _registrations.append(registration)
        if first:
            lib.onload_set_enabled(1)
        try:
            _install_hooks(objects)
            _seen.update(_key(obj) for obj in objects)
            for name in names:
                if now[name]:
                    registration.reports.append(
                        patcher.patch_library(name, functions=registration.functions))
                else:
                    registration.reports.append(PatchReport(name))
            _catch_up()  # loaded meanwhile, through slots not hooked yet
        except BaseException:
            _cancel(registration)
            raise
    log.info("greenify: patching on load: %s", ", ".join(names))
    return registration


def _cancel(registration: OnLoadPatch) -> None:
    registration.active = False
    if registration in _registrations:
        _registrations.remove(registration)
    if not _registrations:
        lib.onload_set_enabled(0)
        _remove_hooks()
        _seen.clear()


def cancel_patch_on_load(registration: Optional[OnLoadPatch] = None) -> None:
    """Stop ``registration`` (every registration when None).  Libraries it
    patched stay patched; once none is left, every hooked dlopen slot gets
    back its previous value."""
    with _working():
        for each in [registration] if registration is not None else list(_registrations):
            _cancel(each)


def registrations() -> Tuple[OnLoadPatch, ...]:
    """The active registrations."""
    with _lock:
        return tuple(_registrations)


def hooked_slots() -> Dict[ObjectKey, Tuple[HookedSlot, ...]]:
    """(real path, load base) -> the dlopen/dlmopen slots hooked in it now."""
    with _lock:
        return {key: tuple(record.values()) for key, record in _hooked.items()}


def _reset_after_fork() -> None:
    # A lock held by another thread at fork() time would stay held forever
    # in the child; the state it guards was copied consistent or not at all.
    global _lock, _busy_thread
    _lock = get_original("threading", "RLock")()
    _busy_thread = None


os.register_at_fork(after_in_child=_reset_after_fork)
# Loads during interpreter shutdown do not enter Python.
atexit.register(lib.onload_set_enabled, 0)

__all__ = ["patch_on_load", "cancel_patch_on_load", "OnLoadPatch", "HookedSlot", "registrations", "hooked_slots"]
