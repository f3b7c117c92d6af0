"""What greenify could patch: the facts behind ``greenify.report()`` and the
greenify-inspect command.  (Not named report.py: ``greenify.report`` is the
function, and a submodule of the same name would be shadowed by it.)

For each library: its imports of blocking functions (read by greenify.patching.elf,
the patcher's reader), which of them have a green twin, and, in this process,
which slots the patcher has written.  For a set of loaded objects (this
process, another one, a child that imported some modules): the same per
object, ranked, with the ones a user should pass to ``patch_library``
marked as recommended.

Recommendation: among the objects greenify may patch, those importing a
network call (connect, recv, send, poll, ...) that has a green twin, reached
from a library that is not part of Python's standard library or of gevent,
and not merely a dependency (DT_NEEDED) of another such object.  For MySQLdb that
is libmariadb: _mysql.so imports no blocking call, and libcrypto's sockets
sit under libmariadb.  A driver that waits on such a library's sockets in
its own code (psycopg 3's _psycopg.so calls poll over a non-blocking libpq)
is recommended with it.  Clients that patching cannot help (their own
threads do the network I/O: librdkafka, grpcio's core, libzmq; or their
client library is loaded at connect time: unixODBC) are listed with why and
what to use instead, never recommended (_KNOWN_CLIENTS).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from greenify import functions as _functions
from greenify.patching import elf
from greenify.patching import loaded, policy
from greenify.patching.imports import read_target_file
from greenify.patching import slots
from greenify.errors import GreenifyError, StaticExecutableError, WrongMachineError
from greenify.patching.loaded import LoadedObject
from greenify.patching.report_text import Painter, render_process

# The network side of BLOCKING_CALLS, which is what greenify is for:
# read/write/sleeps alone usually mean files or timers and rank lower.  A
# library counts as a network client only if it imports a socket call;
# poll/select alone are as often waits on a terminal or a pipe (libtinfo).
SOCKET_CALLS: FrozenSet[str] = _functions.blocking_calls("socket", "resolver")
NETWORK_CALLS: FrozenSet[str] = _functions.blocking_calls("socket", "resolver", "poll")
SOCKET_SYMBOLS: FrozenSet[str] = elf.with_fortified_forms(SOCKET_CALLS)
NETWORK_SYMBOLS: FrozenSet[str] = elf.with_fortified_forms(NETWORK_CALLS)


@dataclass(frozen=True)
class ImportReport:
    """One blocking import: the slot at ``slot_offset`` from the load base."""

    symbol: str
    version: Optional[str]
    relocation_type: str
    slot_offset: int
    green_twin: bool
    network: bool
    slot_address: Optional[int] = None  # known in this process only
    patched: Optional[bool] = None      # known in this process only

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LibraryReport:
    """One library: its blocking imports and what greenify can do with them."""

    path: str
    soname: Optional[str] = None
    build_id: Optional[str] = None
    needed: Tuple[str, ...] = ()
    imports: Tuple[ImportReport, ...] = ()
    error: Optional[str] = None       # why its imports could not be read
    protected: Optional[str] = None   # why greenify never patches it
    recommended: bool = False
    note: Optional[str] = None        # why it ranks where it does, in a listing

    @property
    def patchable(self) -> List[ImportReport]:
        return [imp for imp in self.imports if imp.green_twin] if self.protected is None else []

    @property
    def can_patch(self) -> bool:
        return self.error is None and bool(self.patchable)

    @property
    def holds_network_calls(self) -> bool:
        """Whether it is a network client (imports a socket call) and
        patching it would make some of its network calls cooperative."""
        return any(imp.symbol in SOCKET_SYMBOLS for imp in self.imports) and any(imp.network for imp in self.patchable)

    @property
    def missing_twins(self) -> List[str]:
        return sorted({imp.symbol for imp in self.imports if not imp.green_twin})

    @property
    def patch_name(self) -> str:
        """What to pass to patch_library for it."""
        return self.soname or os.path.basename(self.path)

    @property
    def verdict(self) -> str:
        """One line: can greenify patch it, how much, and what is missing."""
        if self.error is not None:
            return f"not patchable: {self.error}"
        if self.protected is not None:
            return f"never patched: {self.protected}"
        total = len(self.imports)
        if total == 0:
            return "nothing to patch: no imports of blocking functions"
        missing = ", ".join(f"`{symbol}`" for symbol in self.missing_twins)
        if not self.patchable:
            return f"nothing to patch: none of its {total} blocking imports has a green twin yet ({missing})"
        line = f"patchable: {len(self.patchable)} of {total} blocking imports"
        if missing:
            line += f"; {missing} {'has' if len(self.missing_twins) == 1 else 'have'} no green twin yet"
        if any(imp.patched is not None for imp in self.patchable):
            line += f"; {sum(bool(imp.patched) for imp in self.patchable)} patched now"
        return line

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path, "realpath": os.path.realpath(self.path), "soname": self.soname,
            "build_id": self.build_id, "needed": list(self.needed),
            "imports": [imp.to_dict() for imp in self.imports],
            "blocking_imports": len(self.imports), "patchable_imports": len(self.patchable),
            "missing_twins": self.missing_twins, "network": self.holds_network_calls,
            "error": self.error, "protected": self.protected,
            "recommended": self.recommended, "note": self.note, "verdict": self.verdict,
        }


@dataclass(frozen=True)
class ProcessReport:
    """The loaded objects of one process that import blocking functions,
    best candidates first, plus how many objects were looked at."""

    source: str                    # "this process", "pid 1234", "import MySQLdb"
    pid: Optional[int]
    executable: Optional[str]
    libraries: Tuple[LibraryReport, ...]
    objects_inspected: int

    @property
    def recommended(self) -> List[LibraryReport]:
        return [library for library in self.libraries if library.recommended]

    @property
    def can_patch(self) -> bool:
        return any(library.can_patch for library in self.libraries)

    def __str__(self) -> str:
        """The text greenify-inspect prints for it, without colour."""
        return "\n".join(render_process(self, Painter(False), verbose=False))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source, "pid": self.pid, "executable": self.executable,
            "objects_inspected": self.objects_inspected,
            "recommended": [library.path for library in self.recommended],
            "patch_library": [library.patch_name for library in self.recommended],
            "libraries": [library.to_dict() for library in self.libraries],
        }


def _wanted_symbols() -> FrozenSet[str]:
    # What the patcher reads (_plan): a twin with no entry in BLOCKING_SYMBOLS still shows
    return elf.BLOCKING_SYMBOLS | frozenset(_functions.twins())


def _imports_of(imports: elf.ElfImports, base: Optional[int] = None,
                patched_slots: Optional[Mapping[int, Any]] = None) -> Tuple[ImportReport, ...]:
    twins = _functions.twins()
    rows = []
    for imp in imports.imports:
        slot_address = None if base is None else base + imp.r_offset
        patched = None if patched_slots is None else slot_address in patched_slots
        rows.append(ImportReport(imp.symbol, imp.version, imp.relocation_type, imp.r_offset,
                                 imp.symbol in twins, imp.symbol in NETWORK_SYMBOLS, slot_address, patched))
    return tuple(rows)


def _read_for_report(path: str) -> Tuple[Optional[elf.ElfImports], Optional[str]]:
    """The file's imports (None for a static executable) and why this process
    cannot patch it (None when it can).  Another machine's or class's library
    is still read and listed: only this process cannot patch it."""
    try:
        return read_target_file(path, _wanted_symbols()), None
    except StaticExecutableError as exc:
        return None, _without_path(str(exc), path)
    except WrongMachineError as exc:
        reason = _without_path(str(exc), path) + ", and greenify patches only the process it runs in"
        return elf.read_blocking_imports(path, _wanted_symbols()), reason


def inspect_file(path: str) -> LibraryReport:
    """The report for the ELF file at ``path``, as a library on disk.  Raises
    TargetNotFoundError or NotElfError for bad input; a file greenify cannot
    patch for another reason (static, another machine) comes back with
    ``error`` set (and another machine's imports listed)."""
    protected = loaded.protected_reason(LoadedObject(path, 0, (), None))
    imports, error = _read_for_report(path)
    if imports is None:
        return LibraryReport(path, error=error, protected=protected)
    return LibraryReport(path, imports.soname, imports.build_id_hex, imports.needed, _imports_of(imports),
                         error=error, protected=protected)


def _without_path(message: str, path: str) -> str:
    # the errors start with "<path>: "; the report already names the path
    return message[len(path) + 2:] if message.startswith(path + ": ") else message


def _inspect_loaded(obj: LoadedObject, in_this_process: bool) -> LibraryReport:
    protected = loaded.protected_reason(obj)
    try:
        imports, error = _read_for_report(obj.path)
    except GreenifyError as exc:
        return LibraryReport(obj.path, error=_without_path(str(exc), obj.path), protected=protected)
    if imports is None:
        return LibraryReport(obj.path, error=error, protected=protected)
    if not in_this_process or error is not None:
        return LibraryReport(obj.path, imports.soname, imports.build_id_hex, imports.needed, _imports_of(imports),
                             error=error, protected=protected)
    try:
        slots.check_object(obj, imports)  # the patcher's own check: else its relocations describe another layout
    except GreenifyError as exc:
        return LibraryReport(obj.path, imports.soname, imports.build_id_hex, imports.needed, protected=protected,
                             error=_without_path(str(exc), obj.path))
    patched_slots = slots.written_slots(obj, slots.TWIN).get(slots.object_key(obj), {})  # {slot address: PatchedSlot}
    return LibraryReport(obj.path, imports.soname, imports.build_id_hex, imports.needed,
                         _imports_of(imports, obj.base, patched_slots), protected=protected)


# Folders of the interpreter's and the event loop's own extension modules:
# gevent already makes the stdlib's sockets cooperative, and the hub's own
# waits (libev's epoll_wait, greenlet's libstdc++) must stay native.
_RUNTIME_FOLDERS = frozenset({"lib-dynload", "gevent", "gevent.libs", "greenlet"})


def _is_runtime(library: LibraryReport) -> bool:
    return not _RUNTIME_FOLDERS.isdisjoint(os.path.dirname(library.path).split(os.sep))


# Clients greenify cannot help as a patch would suggest, known by file name
# (auditwheel's hashed copies included): why, and what to use instead.
_KNOWN_CLIENTS: Tuple[Tuple["re.Pattern[str]", str], ...] = tuple((re.compile(pattern), note) for pattern, note in (
    (r"librdkafka[-.]", "librdkafka (confluent-kafka) does its network I/O in threads of its own, and "
     "Python's calls wait on its queues' condition variables: patching gains nothing. Instead call "
     "poll()/consume()/flush() with a short timeout and gevent.sleep() between, or through gevent's "
     "threadpool; under asyncio, aiokafka"),
    (r"cygrpc\.", "grpcio's core does its network I/O in threads of its own (completion queues and "
     "pollers): patching gains nothing. Instead call grpc.experimental.gevent.init_gevent() before "
     "any channel exists; under asyncio, grpc.aio"),
    (r"libzmq[-.]", "libzmq (pyzmq) does its network I/O in its own I/O threads; a socket's send/recv "
     "waits on a mailbox: patching gains nothing. Instead import zmq.green as zmq under gevent, "
     "zmq.asyncio under asyncio"),
    (r"libodbc\.so", "unixODBC's driver manager loads each ODBC driver, and the client library the "
     "driver needs (libmariadb, libpq, ...), at connect time: name that client library in "
     'greenify.patch_on_load("libmariadb", "libpq") before the first connect, or inspect a '
     "connected process with --pid"),
))


def known_client_note(library: LibraryReport) -> Optional[str]:
    """Why patching `library` does not help and what to do instead, for the
    clients of _KNOWN_CLIENTS; None for any other library."""
    name = os.path.basename(library.path)
    return next((note for pattern, note in _KNOWN_CLIENTS if pattern.match(name)), None)


def _rank(libraries: Sequence[LibraryReport]) -> List[LibraryReport]:
    """Mark the recommended libraries, say why the others are not, and sort:
    recommended, other network libraries, other patchable, the rest."""
    index: Dict[str, int] = {}
    for position, library in enumerate(libraries):
        index.setdefault(os.path.basename(library.path), position)
        if library.soname:
            index.setdefault(library.soname, position)
    may_patch = [library.protected is None for library in libraries]
    children: List[List[int]] = [[index[name] for name in library.needed if name in index] for library in libraries]

    def below(start: Iterable[int]) -> Set[int]:
        seen: Set[int] = set()
        pending = list(start)
        while pending:
            position = pending.pop()
            if position not in seen and may_patch[position]:
                seen.add(position)
                pending.extend(children[position])
        return seen

    needed_by_others = {child for position, kids in enumerate(children) if may_patch[position]
                        for child in kids if child != position}
    roots = [position for position in range(len(libraries)) if may_patch[position] and position not in needed_by_others]
    users_reach = below(position for position in roots if not _is_runtime(libraries[position]))
    candidates = [position for position in users_reach if libraries[position].holds_network_calls]
    descendants = {position: below(children[position]) for position in candidates}
    under: Dict[int, int] = {}  # candidate -> a candidate it is a dependency of (not in a DT_NEEDED cycle)
    for position in candidates:
        for other in candidates:
            if other != position and position in descendants[other] and other not in descendants[position]:
                under[position] = other
                break

    ranked = []
    for position, library in enumerate(libraries):
        note: Optional[str] = None
        recommended = False
        if known_client_note(library) is not None:
            note = known_client_note(library)
        elif library.protected is not None or library.error is not None or not library.imports:
            pass
        elif not library.patchable:
            note = "no green twin for any of its blocking imports"
        elif not library.holds_network_calls:
            note = "not a network client: it imports no socket call (connect, recv, send, ...)"
        elif position not in users_reach:
            note = "needed only by Python's standard library or gevent itself, whose waits gevent already handles"
        elif position in under:
            note = f"a dependency of {libraries[under[position]].patch_name}, which is recommended instead"
        else:
            recommended = True
            note = f'pass it to patch_library("{library.patch_name}")'
        ranked.append(dataclasses.replace(library, recommended=recommended, note=note))
    ranked = _recommend_drivers_that_wait(ranked, children, users_reach)

    def order(library: LibraryReport) -> Tuple[int, int, str]:
        group = 0 if library.recommended else 1 if library.holds_network_calls else 2 if library.can_patch else 3
        return group, -len(library.patchable), library.path

    return sorted(ranked, key=order)


def _recommend_drivers_that_wait(ranked: List[LibraryReport], children: Sequence[Sequence[int]],
                                 users_reach: Set[int]) -> List[LibraryReport]:
    """Recommend too an object outside Python and gevent that waits on the
    sockets of a recommended network client it directly needs
    (policy.waits_on_clients, patch_all()'s rule)."""
    result = list(ranked)
    for position, library in enumerate(ranked):
        if library.recommended or position not in users_reach or _is_runtime(library):
            continue
        clients = [ranked[child].patch_name for child in children[position] if ranked[child].recommended]
        waiter = policy.waits_on_clients((imp.symbol for imp in library.patchable), clients)
        if waiter is not None:
            result[position] = dataclasses.replace(library, recommended=True, note=f"{waiter}: patch it too")
    return result


def inspect_objects(objects: Sequence[LoadedObject], source: str, pid: Optional[int],
                    in_this_process: bool = False) -> ProcessReport:
    """The ranked report of ``objects``; only those that import blocking
    functions (or could not be read, or are known clients) are kept in it."""
    reports = [_inspect_loaded(obj, in_this_process) for obj in objects]
    ranked = _rank(reports)
    kept = tuple(library for library in ranked
                 if library.imports or library.error is not None or known_client_note(library) is not None)
    executable = next((obj.path for obj in objects if obj.is_main_program), None)
    return ProcessReport(source, pid, executable, kept, len(objects))


def objects_from_maps(maps: str, executable: Optional[str]) -> List[LoadedObject]:
    """The files mapped executable in a /proc/PID/maps text, in address
    order, as LoadedObjects (base and segments unknown: another process)."""
    paths: Dict[str, None] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
            paths.setdefault(fields[5].removesuffix(" (deleted)"), None)
    main = os.path.realpath(executable) if executable else None
    return [LoadedObject(path, 0, (), None, is_main_program=os.path.realpath(path) == main) for path in paths]


def report() -> ProcessReport:
    """Every object loaded in this process that imports blocking functions:
    its imports, which have a green twin, which slots greenify has patched,
    and which objects to pass to ``patch_library``.  Reads files and the
    patcher's records; changes nothing."""
    return inspect_objects(loaded.loaded_objects(), "this process", os.getpid(), in_this_process=True)
