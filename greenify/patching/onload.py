"""Patching libraries the moment they are loaded: ``greenify.patch_on_load()``.

    handle = greenify.patch_on_load("libpq", "libmariadb.so.3")
    ...                       # import psycopg2, ctypes.CDLL(...), a driver's own dlopen
    handle.cancel()           # stop (what was patched stays patched)

How: while a registration is active, the ``dlopen`` and ``dlmopen`` GOT
slots (every symbol version) of each loaded object that imports them point
at ``greenify_dlopen_hook``/``greenify_dlmopen_hook`` (csrc/patch/onload.c): the
interpreter (its import machinery), ``_ctypes``, drivers, and every object
loaded later.  The hook calls glibc's function and, when the load added
objects, calls ``on_loaded`` below before returning to the caller:
new objects get their own dlopen hooked, and those that match a registered
target are patched by the patcher.  So a library is patched before the code
that loaded it can call it; only its own constructors run unpatched.

The hooks are written, recorded and put back by greenify.patching.slots, the same
write path and lock as the patcher's twins (purpose DLOPEN_HOOK), with the
same checks of the file against the loaded object.  They are not twins: the
patcher never patches the interpreter, libc or the loader, and the hooks
never make anything wait.  When the last registration is cancelled every
hooked slot gets back the value it held (unless someone re-hooked it
meanwhile).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

from greenify.originals import get_original

from greenify.patching import elf
from greenify.patching import loaded
from greenify.patching import patcher
from greenify.patching import slots
from greenify._green import ffi, lib
from greenify.errors import GreenifyError, ProtectedTargetError
from greenify.patching.imports import also_read, read_object
from greenify.patching.loaded import LoadedObject
from greenify.patching.patcher import PatchReport

log = logging.getLogger("greenify")

# symbol -> the hook in greenify._green.lib that replaces it
_HOOKS = {"dlopen": "greenify_dlopen_hook", "dlmopen": "greenify_dlmopen_hook"}
HOOKED_SYMBOLS = frozenset(_HOOKS)
also_read(HOOKED_SYMBOLS)
# Rounds of _catch_up: loads its own work causes (an import by pyelftools)
# settle within one or two; every other thread's load is announced by its own hook.
_CATCH_UP_ROUNDS = 16


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
    # watch_loads(): called with each batch of new objects instead of matching targets
    on_new: Optional[Callable[[List[LoadedObject]], None]] = field(default=None, repr=False)

    def matches(self, obj: LoadedObject) -> bool:
        return self.on_new is None and any(_target_matches(target, obj) for target in self.targets)

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


_registrations: List[OnLoadPatch] = []
_seen: Set[slots.ObjectKey] = set()  # objects already looked at while active
# Whether this thread is inside _catch_up() (or patch_on_load()'s own work).
# Thread-local, so a fork needs no reset: only the forking thread lives on,
# in the middle of whatever it was doing.
_busy = get_original("threading", "local")()


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


def _dlopen_imports(obj: LoadedObject) -> elf.ElfImports:
    # patcher.read_object reads each file once for every reader (keyed by the
    # loaded build-id too): registering again reads no file twice.
    return read_object(obj, HOOKED_SYMBOLS)


def _install_hooks(objects: Iterable[LoadedObject]) -> None:
    """Point the dlopen/dlmopen slots of each object that may be hooked at
    the hooks, through the one write path (plan, check, write, record)."""
    hooked = slots.written_slots(purpose=slots.DLOPEN_HOOK)
    planned = []
    with slots.locked():
        for obj in objects:
            if slots.object_key(obj) in hooked or not _may_hook(obj):
                continue
            try:
                imports = _dlopen_imports(obj)
            except GreenifyError as exc:
                log.debug("greenify: cannot read %s for its dlopen: %s", obj.path, exc)
                continue
            changes = [(imp, _hook_address(imp.symbol)) for imp in imports.imports if imp.r_addend == 0]
            if not changes:
                continue
            try:
                slots.check_object(obj, imports)
            except GreenifyError as exc:
                log.warning("greenify: %s; its dlopen is not hooked", exc)
                continue
            planned.append((obj, slots.DLOPEN_HOOK, changes))
        for result in slots.write_each(planned):  # each object all or nothing, one read of the maps
            if isinstance(result, GreenifyError):
                log.warning("greenify: %s; its dlopen is not hooked", result)


def _remove_hooks() -> None:
    try:
        slots.restore_all(purpose=slots.DLOPEN_HOOK)
    except GreenifyError as exc:
        log.warning("greenify: %s; some dlopen stays hooked", exc)


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
    for _round in range(_CATCH_UP_ROUNDS):
        adds = lib.loaded_adds()
        objects = loaded.loaded_objects()
        keys = {slots.object_key(obj) for obj in objects}
        new = [obj for obj in objects if slots.object_key(obj) not in _seen]
        _seen.intersection_update(keys)  # an unloaded object's base may be reused
        _seen.update(keys)
        _install_hooks(new)
        for obj in new:
            for registration in _registrations:
                if registration.matches(obj):
                    _patch_new(obj, registration)
        for registration in list(_registrations):
            if registration.on_new is not None and new:
                _call_watcher(registration, new)
        if lib.loaded_adds() == adds:
            return


@contextlib.contextmanager
def _working() -> Iterator[bool]:
    """Hold the one slot lock; yields False when this thread is already
    working (a load caused by the work itself: the outer work's _catch_up
    sees it)."""
    with slots.locked():
        if getattr(_busy, "working", False):
            yield False
            return
        _busy.working = True
        try:
            yield True
        finally:
            _busy.working = False


def on_loaded() -> None:
    """What the dlopen hook runs after a load added objects (through the
    entry greenify_loaded, greenify/entries.py): hook the new objects' dlopen,
    patch those a registration names."""
    with _working() as first:
        if first and _registrations:
            _catch_up()




def _call_watcher(registration: OnLoadPatch, objects: List[LoadedObject]) -> None:
    try:
        registration.on_new(objects)
    except Exception as exc:  # noqa: BLE001 - a load must never fail because patching did
        registration.errors.append((", ".join(obj.path for obj in objects), f"{type(exc).__name__}: {exc}"))
        log.exception("greenify: %s failed on newly loaded objects", registration.targets[0])


def watch_loads(name: str, on_new: Callable[[List[LoadedObject]], None]) -> OnLoadPatch:
    """Call ``on_new(objects)`` with every object loaded now, then with
    every batch of objects loaded later (by an import, ctypes or a library's
    dlopen, before the loading code's next step), under the slot lock:
    greenify.patch_all()'s registration.  Cancel it like any other."""
    registration = OnLoadPatch((name,), on_new=on_new)
    with _working():
        objects = loaded.loaded_objects()
        _register(registration, objects, lambda: on_new(objects))  # on_new's errors are the caller's to see
    log.info("greenify: %s: watching loads", name)
    return registration


def _register(registration: OnLoadPatch, objects: List[LoadedObject], now: Callable[[], None]) -> None:
    """Add ``registration``, hook every loaded object's dlopen, do ``now()``
    (what it asks of the objects loaded already), then catch up with what was
    loaded meanwhile; undone if any of it raises.  Called under _working()."""
    first = not _registrations
    _registrations.append(registration)
    if first:
        lib.onload_set_enabled(1)
    try:
        _install_hooks(objects)
        _seen.update(slots.object_key(obj) for obj in objects)
        now()
        _catch_up()  # loaded meanwhile, through slots not hooked yet
    except BaseException:
        _cancel(registration)
        raise


def _check_target(target: object) -> str:
    if isinstance(target, types.ModuleType):
        raise TypeError(f"patch_on_load() takes library names, stems or paths; module {target.__name__} is "
                        "already loaded: use patch_library(module)")
    return loaded.as_target(target, "patch_on_load")


def patch_on_load(*targets: "str | bytes | os.PathLike[str]",
                  functions: "Optional[Iterable[str] | str]" = None) -> OnLoadPatch:
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
    registration = OnLoadPatch(names, patcher.wanted_functions(functions))
    with _working():
        objects = loaded.loaded_objects()
        now: Dict[str, List[LoadedObject]] = {}
        for name in names:
            now[name] = [obj for obj in objects if _target_matches(name, obj)]
            for obj in now[name]:
                reason = loaded.protected_reason(obj)
                if reason is not None:
                    raise ProtectedTargetError(f"{name}: greenify never patches {obj.path}: {reason}", name)

        def patch_loaded_now() -> None:
            for name in names:
                registration.reports.append(patcher.patch_library(name, functions=registration.functions)
                                            if now[name] else PatchReport(name))
        _register(registration, objects, patch_loaded_now)
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
    """Stop ``registration`` (every patch_on_load() registration when None;
    patch_all()'s is unpatch_all()'s to stop).  Libraries it patched stay
    patched; once none is left, every hooked dlopen slot gets back its
    previous value."""
    with _working():
        everyone = [each for each in _registrations if each.on_new is None]
        for each in [registration] if registration is not None else everyone:
            _cancel(each)


def registrations() -> Tuple[OnLoadPatch, ...]:
    """The active registrations."""
    with slots.locked():
        return tuple(_registrations)


# Loads during interpreter shutdown do not enter Python.
atexit.register(lib.onload_set_enabled, 0)

__all__ = ["patch_on_load", "cancel_patch_on_load", "OnLoadPatch", "registrations", "watch_loads"]
