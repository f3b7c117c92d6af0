"""The objects loaded in this process, and matching a target to them.

``loaded_objects()`` asks the dynamic loader (dl_iterate_phdr, in
csrc/patch/loaded.c) for every loaded object: its path, load base, PT_LOAD segments
as mapped and GNU build-id as found in memory.  ``find_loaded(target)``
resolves what a user names to those objects:

* a path (contains "/"): the object loaded from that file;
* a file name or soname: ``libmariadb.so.3``;
* a stem: ``libpq`` matches ``libpq.so.5`` and auditwheel's ``libpq-a17e3caa.so.5.17``;
* a Python extension module object (``MySQLdb._mysql``): its .so and, following
  DT_NEEDED, every loaded library under it, except the ones greenify never
  patches (see ``protected_reason``).
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import types
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from greenify.patching import elf
from greenify.errors import NotElfError, NotLoadedError, TargetNotFoundError

log = logging.getLogger("greenify")

Target = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]", types.ModuleType]

# Parts of glibc besides libc itself: they issue their system calls directly,
# so following DT_NEEDED into them would only add risk.
_GLIBC_PARTS = re.compile(r"^(libm|libpthread|libdl|librt|libutil|libmvec)\.so(\.|$)")


@dataclass(frozen=True)
class LoadedSegment:
    """A PT_LOAD as mapped in this process: [start, end) and PF_* flags."""

    start: int
    end: int
    flags: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & elf.PF_W)


@dataclass(frozen=True)
class LoadedObject:
    """One object the dynamic loader reports (dl_iterate_phdr)."""

    path: str                 # the file it was loaded from (/proc/self/exe's target for the main program)
    base: int                 # dlpi_addr: load base, added to a file's vaddrs
    segments: Tuple[LoadedSegment, ...]
    build_id: Optional[bytes]
    is_main_program: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @functools.cached_property
    def realpath(self) -> str:
        return _realpath(self.path, self.base, self.build_id)

    def holds_slot(self, address: int, size: int) -> bool:
        """Whether [address, address+size) lies inside one of its writable
        PT_LOAD segments (RELRO slots belong to the writable PT_LOAD too)."""
        return any(seg.writable and seg.start <= address and address + size <= seg.end for seg in self.segments)


@lru_cache(maxsize=1024)
def _realpath(path: str, base: int, build_id: Optional[bytes]) -> str:
    # One resolution per loaded object, not per LoadedObject made of it:
    # patch_all() lists the loaded objects several times and asks each its
    # real path (its records' key) again and again.
    return os.path.realpath(path)


def loaded_objects(with_missing_files: bool = False) -> List[LoadedObject]:
    """Every object loaded in this process that has a file (the vDSO has
    none); with ``with_missing_files``, also those whose file is gone."""
    from greenify._green import ffi, lib

    capacity = lib.loaded_list_objects(ffi.NULL, 0)
    while True:
        buffer = ffi.new("struct loaded_object[]", capacity)
        count = lib.loaded_list_objects(buffer, capacity)
        if count <= capacity:
            break
        capacity = count  # objects loaded meanwhile: again, with room for all of them
    objects = []
    for i in range(count):
        entry = buffer[i]
        name = ffi.string(entry.path).decode("utf-8", "surrogateescape")
        is_main = i == 0 and not name  # glibc lists the main program first, without a name
        path = os.path.realpath("/proc/self/exe") if is_main else name
        if not path or not (with_missing_files or os.path.isfile(path)):
            continue
        segments = tuple(LoadedSegment(seg.start, seg.end, seg.flags) for seg in entry.segments[0:entry.nsegments])
        build_id = bytes(ffi.buffer(entry.build_id, entry.build_id_size)) if entry.build_id_size else None
        objects.append(LoadedObject(path, entry.base, segments, build_id, is_main))
    return objects


@lru_cache(maxsize=None)
def _green_module_path() -> str:
    from greenify import _green

    return os.path.realpath(_green.__file__)


def protected_reason(obj: LoadedObject) -> Optional[str]:
    """Why greenify never patches ``obj`` (None when it may)."""
    name = obj.name
    if obj.is_main_program:
        return f"the main program ({obj.name})"
    if name.startswith("libc.so") or name.startswith("libc-"):
        return "libc itself: its calls are what the green functions use"
    if name.startswith("ld-linux") or name.startswith("ld64.so") or name.startswith("ld-"):
        return "the dynamic loader (ld.so)"
    if name.startswith("libpython"):
        return "libpython: the interpreter must keep its own blocking semantics"
    if obj.realpath == _green_module_path():
        return "greenify's own _green module: the green functions call the real libc"
    return None


def _stem_pattern(stem: str) -> "re.Pattern[str]":
    # libpq -> libpq.so, libpq.so.5, libpq-a17e3caa.so.5.17 (auditwheel adds a hash)
    return re.compile(re.escape(stem) + r"(-[0-9a-f]{6,})?\.so(\.|$)")


@lru_cache(maxsize=512)
def _soname(obj: LoadedObject) -> Optional[str]:
    try:
        return elf.read_blocking_imports(obj.path, symbols=()).soname
    except Exception:  # noqa: BLE001 - an unreadable file simply has no soname here
        return None


def _similar(target: str, objects: Sequence[LoadedObject]) -> List[str]:
    """Loaded objects whose names look like ``target``, for error messages."""
    wanted = os.path.basename(target.rstrip("/"))
    stem = re.split(r"[.-]", wanted, maxsplit=1)[0].lower()
    names = sorted({obj.name for obj in objects})
    close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.6)
    close += [name for name in names if stem and len(stem) > 2 and stem in name.lower() and name not in close]
    return close[:8]


def match_name(target: str, objects: Optional[Sequence[LoadedObject]] = None) -> List[LoadedObject]:
    """Loaded objects whose file name, soname or stem is ``target``."""
    objects = loaded_objects() if objects is None else objects
    found = [obj for obj in objects if obj.name == target]
    if not found and ".so" in target:
        found = [obj for obj in objects if _soname(obj) == target]
    if not found:
        pattern = _stem_pattern(target)
        found = [obj for obj in objects if pattern.match(obj.name)]
    return found


def match_path(path: str, objects: Optional[Sequence[LoadedObject]] = None) -> List[LoadedObject]:
    """Loaded objects loaded from the file at ``path`` (same real path or same file)."""
    objects = loaded_objects() if objects is None else objects
    real = os.path.realpath(path)
    found = []
    for obj in objects:
        if obj.realpath == real:
            found.append(obj)
            continue
        try:
            if os.path.samefile(obj.path, path):
                found.append(obj)
        except OSError:
            pass
    return found


def module_objects(module: types.ModuleType,
                   objects: Optional[Sequence[LoadedObject]] = None) -> Tuple[List[LoadedObject], List[Tuple[LoadedObject, str]]]:
    """An extension module's .so and every loaded library it needs, directly
    or not (DT_NEEDED), minus the protected ones and glibc's parts, which are
    returned with the reason they were left out."""
    target = getattr(module, "__name__", repr(module))
    file = getattr(module, "__file__", None)
    if not file or not os.path.isfile(file):
        raise TargetNotFoundError(f"module {target} has no shared-library file (__file__={file!r})", target)
    try:
        elf.read_identity(file)
    except NotElfError:
        raise NotElfError(f"module {target} is not a C extension module: {file} is not a shared library; pass the "
                          "extension module that wraps the C library (such as MySQLdb._mysql) or the library's "
                          "name", target) from None
    objects = loaded_objects() if objects is None else objects
    roots = match_path(file, objects)
    if not roots:
        raise NotLoadedError(f"module {target} ({file})", _similar(file, objects))
    chosen: List[LoadedObject] = []
    left_out: List[Tuple[LoadedObject, str]] = []

    def enter(obj: LoadedObject) -> bool:
        reason = protected_reason(obj)
        if reason is None and _GLIBC_PARTS.match(obj.name):
            reason = "part of glibc"
        if reason is not None:
            left_out.append((obj, reason))
            return False
        chosen.append(obj)
        return True

    needed_closure(roots, objects, enter=enter)
    return chosen, left_out


def _needed_of_file(obj: LoadedObject) -> Tuple[str, ...]:
    return elf.read_blocking_imports(obj.path, symbols=()).needed


def needed_closure(roots: Sequence[LoadedObject], objects: Sequence[LoadedObject],
                   needed_of: Callable[[LoadedObject], Sequence[str]] = _needed_of_file,
                   enter: Callable[[LoadedObject], bool] = lambda obj: True) -> List[LoadedObject]:
    """``roots`` and the objects among ``objects`` they need, directly or
    not (DT_NEEDED, found as the loader found them), breadth-first, each
    once: the one walk of DT_NEEDED.  An object for which ``enter(obj)`` is
    false is listed but not walked into; one whose DT_NEEDED cannot be read
    is listed, and its own error is reported by whoever reads it next."""
    seen: Dict[str, LoadedObject] = {}
    pending = list(roots)
    while pending:
        obj = pending.pop(0)
        if obj.realpath in seen:
            continue
        seen[obj.realpath] = obj
        if not enter(obj):
            continue
        try:
            needed = needed_of(obj)
        except Exception as exc:  # noqa: BLE001 - the patcher reports the file's own error later
            log.debug("greenify: cannot read DT_NEEDED of %s: %s", obj.path, exc)
            continue
        for name in needed:
            pending.extend(needed_objects(name, objects))
    return list(seen.values())


def needed_objects(name: str, objects: Sequence[LoadedObject]) -> List[LoadedObject]:
    """The objects among ``objects`` that the DT_NEEDED ``name`` loaded."""
    # The loader records the path it found for a DT_NEEDED name, so the
    # file name usually equals it; otherwise compare sonames.
    found = [obj for obj in objects if obj.name == name]
    return found or [obj for obj in objects if _soname(obj) == name]


def as_target(target: object, caller: str) -> Union[str, types.ModuleType]:
    """``target`` as a module or a str (a bytes path, as code written for
    douban's greenify passes, decoded as the file system does).  Raises
    TypeError naming ``caller`` for anything else, ValueError for ""."""
    if isinstance(target, types.ModuleType):
        return target
    if not isinstance(target, (str, bytes, os.PathLike)):
        raise TypeError(f"{caller}() takes a path, a library name (file name, soname or stem) or an extension "
                        f"module, not {type(target).__name__} {target!r}")
    name = os.fsdecode(target)
    if not name:
        raise ValueError(f"{caller}(): an empty target")
    return name


# The MySQL client library and MariaDB Connector/C are one client under two
# names: Debian and Ubuntu ship MariaDB's as "the MySQL client library"
# (libmariadb-dev-compat links libmysqlclient.so to libmariadb.so.3).
_CLIENT_PAIRS = (("libmysqlclient", "libmariadb"),)
# ldconfig -p tags a library with its ABI, e.g. "(libc6,x86-64)": keep this machine's.
_LDCONFIG_ABI = {"x86_64": "x86-64", "aarch64": "AArch64"}
_LDCONFIG_ENTRY = re.compile(r"^\s*(\S+) \(([^)]*)\)(?: OS ABI: [^=]*)? => (.+)$")
_DEFAULT_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib")


def unloaded_object(path: str) -> LoadedObject:
    """A file described as a loaded object would be, without loading it
    (base 0, no segments): what the readers of loaded objects take."""
    return LoadedObject(path, 0, (), None)


def _library_files(folder: str) -> List[LoadedObject]:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [unloaded_object(os.path.join(folder, name)) for name in names if ".so" in name]


def _ldconfig_cache() -> List[LoadedObject]:
    import platform
    import shutil
    import subprocess

    ldconfig = shutil.which("ldconfig") or next(
        (path for path in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(path)), None)
    if ldconfig is None:
        return []
    try:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    entries = [match.groups() for match in map(_LDCONFIG_ENTRY.match, listing.splitlines()) if match]
    abi = _LDCONFIG_ABI.get(platform.machine())
    if abi and any(abi in tags for _name, tags, _path in entries):
        entries = [entry for entry in entries if abi in entry[1]]
    return [unloaded_object(path) for _name, _tags, path in entries]


def search_path() -> List[LoadedObject]:
    """The files where the dynamic loader looks for a bare name, in its
    order: LD_LIBRARY_PATH, the ldconfig cache, the default folders (as
    LoadedObjects with base 0, so match_name's rules apply to them)."""
    import platform

    folders = [folder for folder in os.environ.get("LD_LIBRARY_PATH", "").split(":") if folder]
    candidates = [candidate for folder in folders for candidate in _library_files(folder)]
    candidates += _ldconfig_cache()
    multiarch = f"{platform.machine()}-linux-gnu"
    for folder in (f"/lib/{multiarch}", f"/usr/lib/{multiarch}") + _DEFAULT_DIRS:
        candidates += _library_files(folder)
    return candidates


def _resolved_on_disk(target: str, objects: Sequence[LoadedObject]) -> Tuple[List[LoadedObject], str]:
    """For a name that matches no loaded object by itself: the loaded
    objects it stands for, and how.  A name that resolves on disk, along the
    loader's search path, to the file of a loaded object (a symlink such as
    libmysqlclient.so -> libmariadb.so.3) names that object; the MySQL and
    MariaDB client libraries name each other."""
    loaded_by_file = {obj.realpath: obj for obj in objects}
    for candidate in match_name(target, search_path()):
        obj = loaded_by_file.get(candidate.realpath)
        if obj is not None:
            return [obj], f"{candidate.path} is {obj.path}"
    stem = target.split(".so")[0]
    for other in same_client_as(target):
        found = [obj for obj in objects if _stem_pattern(other).match(obj.name)]
        if found:
            return found, f"{other} is the same client as {stem} (MySQL/MariaDB Connector/C)"
    return [], ""


def same_client_as(name: str) -> List[str]:
    """The stems of the libraries that are the same client under another
    name (libmysqlclient <-> libmariadb), for a name, soname or stem."""
    stem = name.split(".so")[0]
    return [other for pair in _CLIENT_PAIRS if stem in pair for other in pair if other != stem]


def imported_module(name: str) -> Optional[types.ModuleType]:
    """The imported extension module (or package) a dotted name such as
    ``MySQLdb._mysql`` names, or None: a library's name (``libpq.so.5``) is
    never one, since modules are looked up only where ``sys.modules`` has
    the name and the module has a file."""
    import sys

    module = sys.modules.get(name) if "/" not in name else None
    return module if module is not None and getattr(module, "__file__", None) else None


def find_loaded(target: Target,
                clients: Optional[Callable[[Sequence[LoadedObject]], List[str]]] = None) -> List[LoadedObject]:
    """The loaded objects ``target`` names (see the module docstring).  Raises
    TargetNotFoundError for a path that is missing or not a file, and
    NotLoadedError, naming what is loaded instead (``clients(objects)``: the
    loaded clients a user most likely meant), when nothing matches."""
    if isinstance(target, types.ModuleType):
        return module_objects(target)[0]
    target_str = os.fspath(target)
    module = imported_module(target_str)
    if module is not None:  # "MySQLdb._mysql": the dotted name of an imported extension module
        return module_objects(module)[0]
    objects = loaded_objects()
    if "/" in target_str:
        check_path(target_str)
        found = match_path(target_str, objects)
    else:
        found = match_name(target_str, objects)
        if not found:
            found, how = _resolved_on_disk(target_str, objects)
            if found:
                log.info("greenify: %r names %s: %s", target_str, ", ".join(obj.path for obj in found), how)
    if not found:
        raise NotLoadedError(target_str, _similar(target_str, objects), _hint(clients, objects))
    return found


def _hint(clients: Optional[Callable[[Sequence[LoadedObject]], List[str]]],
          objects: Sequence[LoadedObject]) -> List[str]:
    if clients is None:
        return []
    try:
        return clients(objects)
    except Exception as exc:  # noqa: BLE001 - a hint for an error message must not replace the error
        log.debug("greenify: cannot list the loaded clients: %s", exc)
        return []


def check_path(path: str) -> None:
    """Raise TargetNotFoundError unless ``path`` is an existing regular file
    (the one check of a target's path: greenify.patching.elf.check_file)."""
    elf.check_file(path)