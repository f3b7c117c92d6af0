"""What ``greenify.patch_all()`` patches: the one rule.

``decide(obj)`` says, for one loaded object, whether patch_all() patches it
and why (or why not).  patch_all() applies it to the objects loaded when it
is called and, through its on-load registration, to every object loaded
later; greenify-inspect shows it per object ("patch_all: ...").  Nothing
else decides.

The rule, in order (the first that applies wins):

1. ``exclude=`` names it: left alone.
2. Never touched, whatever ``include=`` says:
   * the main program, libc, the dynamic loader, libpython and greenify's
     own ``_green`` module (``loaded.protected_reason``): the green functions
     call libc, and the interpreter keeps its own blocking semantics;
   * glibc's other parts (libm, libpthread, libdl, librt, libresolv,
     libnss_*, libanl, libutil, libmvec, ...): they issue their system calls
     themselves, for libc;
   * the interpreter's own extension modules (everything in the standard
     library's ``lib-dynload``: ``_socket``, ``_ssl``, ``select``,
     ``_posixsubprocess``, ...): gevent's monkey patching already makes
     Python's own I/O cooperative, and without it Python's I/O must block as
     it always did;
   * the event loop's runtime: gevent, greenlet, uvloop, cffi's backend,
     libffi, and the loop libraries they use (libev, libuv, c-ares): the
     hub's own waits must stay native;
   * TLS libraries (libssl, libcrypto, libgnutls, NSS, wolfSSL, mbed TLS)
     are never patched wholesale: Python's ``ssl`` shares them.  The one
     that does a patched client's socket I/O gets the TLS twins, as that
     client's companion (greenify.patching.companions), which are green only on the
     client's own descriptors.
3. ``include=`` names it: patched if it imports any blocking call that has a
   green twin.
4. A network client: it imports a socket or resolver call (``connect``,
   ``recv``, ``send``, ``getaddrinfo``, ...) that has a green twin:
   patched.  libmariadb, libpq, libmemcached, libcurl, and what they bring
   (libkrb5, libldap, libsasl2, libssh2).
5. A driver that waits on a client's sockets in its own code: it imports a
   readiness call (``poll``, ``select``, ``epoll_wait``) with a twin and
   directly needs (DT_NEEDED) a network client of rule 4: patched with it
   (psycopg 3's ``_psycopg.so`` over libpq).
6. Everything else is left alone: a library whose blocking imports are only
   ``read``/``write``/``poll``/sleeps (libz, libstdc++, libffi, numpy's
   OpenBLAS, nghttp2's helpers) works on files, pipes and timers.  The twins
   would behave as libc there, but patching them would change nothing a
   client waits for, cost slots, and put greenify under code (libstdc++)
   that greenlet and gevent run on.  ``include=`` patches one anyway.
"""
from __future__ import annotations

import logging
import os
import re
import sysconfig
import types
from dataclasses import dataclass
from functools import lru_cache
from typing import FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple, Union

from greenify import functions as _functions
from greenify.patching import companions
from greenify.patching import elf
from greenify.patching import loaded
from greenify.patching.imports import read_object
from greenify.errors import GreenifyError
from greenify.patching.loaded import LoadedObject

log = logging.getLogger("greenify")

# The calls that make a library a network client (rule 4).
NETWORK_CLIENT_CALLS: FrozenSet[str] = elf.with_fortified_forms(_functions.blocking_calls("socket", "resolver"))
# Readiness waits: a driver that waits on its client library's sockets in
# its own code (psycopg 3's _psycopg.so calls poll over a non-blocking libpq).
READINESS_CALLS: FrozenSet[str] = elf.with_fortified_forms(_functions.blocking_calls("poll"))

# glibc's libraries besides libc (rule 2), by file name.
_GLIBC_PARTS = re.compile(r"^(libm|libmvec|libpthread|libdl|librt|libresolv|libanl|libutil|libnsl|libBrokenLocale|"
                          r"libthread_db|libc_malloc_debug|libmemusage|libpcprofile|libnss_[a-z0-9_]+)\.so(\.|$)")
# The event loop's runtime (rule 2): folders (a path component) and library stems.
# (greenify's own _green is loaded.protected_reason's; the demo's blocking
# client beside it is a client like any other.)
_RUNTIME_FOLDERS = frozenset({"gevent", "gevent.libs", "greenlet", "greenlet.libs", "uvloop", "uvloop.libs"})
_RUNTIME_STEMS = frozenset({"libev", "libuv", "libcares", "libffi", "_cffi_backend"})

# Decision.kind values
PATCH = "patch"          # patch_all() patches it
INCLUDED = "included"    # patched because include= names it
EXCLUDED = "excluded"    # exclude= names it
NEVER = "never"          # rule 2: never touched
TLS = "tls"              # rule 2: only as a companion
NOT_A_CLIENT = "not a client"  # rule 5
NO_BLOCKING = "no blocking imports"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Decision:
    """Whether patch_all() patches an object, and why (or why not)."""

    patch: bool
    kind: str
    reason: str


@lru_cache(maxsize=None)
def _stdlib_extension_folders() -> Tuple[str, ...]:
    folders = {sysconfig.get_config_var("DESTSHARED"), os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload"),
               os.path.join(sysconfig.get_path("stdlib"), "lib-dynload")}
    return tuple(sorted({os.path.realpath(folder) + os.sep for folder in folders if folder}))


def never_reason(obj: LoadedObject) -> Optional[str]:
    """Why patch_all() never touches ``obj`` (rule 2, TLS aside), or None."""
    reason = loaded.protected_reason(obj)
    if reason is not None:
        return reason
    name = obj.name
    if _GLIBC_PARTS.match(name):
        return "part of glibc: it makes its system calls for libc"
    real = obj.realpath
    if real.startswith(_stdlib_extension_folders()) or "lib-dynload" in real.split(os.sep):
        return "one of the interpreter's own extension modules (lib-dynload): Python's I/O is gevent's to make cooperative"
    folders = set(os.path.dirname(real).split(os.sep)) | set(os.path.dirname(obj.path).split(os.sep))
    runtime = sorted(folders & _RUNTIME_FOLDERS)
    if runtime:
        return f"part of the event loop's runtime ({runtime[0]}): the hub's own waits stay native"
    if companions.library_stem(name).split(".")[0] in _RUNTIME_STEMS:
        return "a library the event loop runs on (libev, libuv, c-ares, libffi, cffi): its waits stay native"
    return None


def tls_reason(obj: LoadedObject) -> Optional[str]:
    if companions.is_tls_library(obj.name):
        return ("a TLS library, shared with Python's ssl: never patched wholesale; the TLS twins go into it only "
                "as the companion of a client that hands it its socket")
    return None


def _twinned(imports: elf.ElfImports) -> List[str]:
    twins = _functions.twins()
    return sorted({imp.symbol for imp in imports.imports if imp.symbol in twins and imp.r_addend == 0})


class Selection:
    """What ``include=``/``exclude=`` name: library names, sonames, stems,
    paths, and modules (a C extension: its file and the libraries under it;
    a package: the objects in its folder, its wheel's ``.libs`` folder, and
    the libraries under them)."""

    def __init__(self, items: "Iterable[Union[str, os.PathLike[str], types.ModuleType]] | str | None",
                 what: str) -> None:
        if items is None:
            items = ()
        elif isinstance(items, (str, bytes, os.PathLike, types.ModuleType)):
            items = (items,)
        self.what = what
        self.names: List[str] = []
        self.modules: List[types.ModuleType] = []
        for item in items:
            if isinstance(item, types.ModuleType):
                self.modules.append(item)
            else:
                self.names.append(loaded.as_target(item, what))
        self._module_paths: Optional[Set[str]] = None
        self._module_folders: Tuple[str, ...] = tuple(self._folders())

    def _folders(self) -> Iterable[str]:
        for module in self.modules:
            file = getattr(module, "__file__", None)
            if file and getattr(module, "__path__", None):  # a package: its folder and its wheel's .libs
                folder = os.path.realpath(os.path.dirname(file))
                yield folder + os.sep
                parent, name = os.path.split(folder)
                for libs in os.listdir(parent) if os.path.isdir(parent) else ():
                    if libs.endswith(".libs") and libs[:-5].lower().replace("-", "_").startswith(name.lower()):
                        yield os.path.join(parent, libs) + os.sep

    def __bool__(self) -> bool:
        return bool(self.names or self.modules)

    def describe(self) -> str:
        return ", ".join(self.names + [f"module {module.__name__}" for module in self.modules])

    def module_paths(self, objects: Sequence[LoadedObject]) -> Set[str]:
        """Real paths of the loaded objects the modules name (read once per call of patch_all)."""
        if self._module_paths is None:
            self._module_paths = set()
            for module in self.modules:
                roots: List[LoadedObject] = []
                file = getattr(module, "__file__", None)
                if file and not getattr(module, "__path__", None):
                    roots = loaded.match_path(file, objects)
                roots += [obj for obj in objects if obj.realpath.startswith(self._module_folders)]
                for root in roots:
                    self._module_paths.add(root.realpath)
                    self._module_paths.update(obj.realpath for obj in companions.needed_below(root, objects))
        return self._module_paths

    def names_object(self, obj: LoadedObject, objects: Sequence[LoadedObject]) -> Optional[str]:
        """Which item names ``obj`` (None: none)."""
        for name in self.names:
            if loaded.match_path(name, [obj]) if "/" in name else loaded.match_name(name, [obj]):
                return name
        if self.modules:
            if obj.realpath.startswith(self._module_folders) or obj.realpath in self.module_paths(objects):
                return "a module's library"
        return None


def decide(obj: LoadedObject, include: Optional[Selection] = None, exclude: Optional[Selection] = None,
           objects: Sequence[LoadedObject] = ()) -> Decision:
    """Whether patch_all() patches ``obj`` (the rule in the module docstring)."""
    if exclude:
        named = exclude.names_object(obj, objects)
        if named is not None:
            return Decision(False, EXCLUDED, f"exclude= names it ({named})")
    reason = never_reason(obj)
    if reason is not None:
        return Decision(False, NEVER, f"never patched: {reason}")
    reason = tls_reason(obj)
    if reason is not None:
        return Decision(False, TLS, reason)
    try:
        imports = read_object(obj)
    except (GreenifyError, OSError) as exc:
        return Decision(False, UNREADABLE, f"cannot read it: {exc}")
    twinned = _twinned(imports)
    if include:
        named = include.names_object(obj, objects)
        if named is not None:
            if twinned:
                return Decision(True, INCLUDED, f"include= names it ({named}): {', '.join(twinned)}")
            return Decision(False, NO_BLOCKING, f"include= names it ({named}), but it imports no blocking call "
                                                "that has a green twin")
    network = sorted(set(twinned) & NETWORK_CLIENT_CALLS)
    if network:
        return Decision(True, PATCH, f"network client: imports {', '.join(network)}")
    client = _needed_network_client(imports, objects) if set(twinned) & READINESS_CALLS else None
    waiter = waits_on_clients(twinned, [client] if client else [])
    if waiter is not None:
        return Decision(True, PATCH, waiter)
    if twinned:
        return Decision(False, NOT_A_CLIENT, f"not a network client: imports only {', '.join(twinned)} (files, pipes, "
                                             "timers); include= it to patch it")
    return Decision(False, NO_BLOCKING, "imports no blocking call that has a green twin")


def waits_on_clients(twinned: Iterable[str], clients: Sequence[str]) -> Optional[str]:
    """Why an object that imports ``twinned`` (its blocking calls with a
    twin) and directly needs the network clients ``clients`` is patched with
    them, or None: a driver that waits on its client library's sockets in
    its own code (psycopg 3's ``wait_c`` calls ``poll`` in ``_psycopg.so``
    over a non-blocking libpq).  The one statement of the rule, for
    patch_all() (decide) and greenify-inspect's recommendations."""
    waits = sorted(set(twinned) & READINESS_CALLS)
    if not waits or not clients:
        return None
    return f"waits ({', '.join(waits)}) on the sockets of {', '.join(clients)}, a network client it needs"


def _needed_network_client(imports: elf.ElfImports, objects: Sequence[LoadedObject]) -> Optional[str]:
    """The name of a network client among the objects ``imports``' object
    needs directly (DT_NEEDED), which patch_all() patches, or None."""
    for name in imports.needed:
        for dependency in loaded.needed_objects(name, objects):
            if never_reason(dependency) is not None or tls_reason(dependency) is not None:
                continue
            try:
                twinned = _twinned(read_object(dependency))
            except (GreenifyError, OSError):
                continue
            if set(twinned) & NETWORK_CLIENT_CALLS:
                return dependency.name
    return None


def candidates(objects: Sequence[LoadedObject]) -> List[LoadedObject]:
    """The objects patch_all() would patch among ``objects`` (no include/exclude)."""
    return [obj for obj in objects if decide(obj, objects=objects).patch]

