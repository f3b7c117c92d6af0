"""greenify-inspect: which library holds the blocking calls, and can greenify patch it?

    greenify-inspect libmariadb               a stem, a soname or a path
    greenify-inspect --import MySQLdb         what importing modules loads
    greenify-inspect --pid 1234               what a running process has loaded
    greenify-inspect --json ...               the same facts as one JSON document

Files are read with the patcher's own reader (greenify.patching.elf); nothing is
loaded into this process, and another process is only read through
/proc/PID/maps.  Exit status: 0 when something can be patched, 1 when
nothing can, 2 on bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

from greenify.watching import blocked
from greenify.patching import loaded
from greenify import functions
from greenify.patching import companions, elf
from greenify.patching.companions import is_tls_library
from greenify.patching.imports import read_object
from greenify.errors import GreenifyError
from greenify.patching.loaded import LoadedObject
from greenify.patching.inventory import LibraryReport, inspect_file, inspect_objects, objects_from_maps
from greenify.patching.report_text import Painter, render_file, render_process

PROGRAM = "greenify-inspect"
EXIT_OK, EXIT_NOTHING_TO_PATCH, EXIT_BAD_INPUT = 0, 1, 2
IMPORT_TIMEOUT = 120.0  # seconds a child may take to import the modules

class BadInput(Exception):
    """What the user asked for cannot be inspected: one line for stderr."""


# ---------------------------------------------------------------- targets

def _search_path() -> List[LoadedObject]:
    """Where the dynamic loader looks for a bare name (loaded.search_path:
    the patcher resolves names that are not loaded the same way)."""
    return loaded.search_path()


def resolve_target(target: str) -> str:
    """The file a TARGET names: a path as is; a file name, soname or stem
    (``libmariadb``, ``mariadb``) found the way the dynamic loader would."""
    if "/" in target:
        return target
    candidates = _search_path()
    names = [target] if target.startswith("lib") else [target, "lib" + target]
    for name in names + [other for name in names for other in loaded.same_client_as(name)]:
        found = loaded.match_name(name, candidates)
        if found:
            return found[0].path
    hint = f"; to read the file in this folder, write ./{target}" if os.path.exists(target) else ""
    if not hint and "." in target and ".so" not in target and not target.startswith("lib"):
        hint = f"; for a Python module, import it and list what it loads: {PROGRAM} --import {target}"
    raise BadInput(f"{target}: no library of that name in LD_LIBRARY_PATH, the ldconfig cache "
                   f"or the default folders{hint}")


# -------------------------------------------------------------- processes

def process_objects(pid: int) -> Tuple[List[LoadedObject], str]:
    """The objects another process has mapped (read from /proc, nothing
    attached), and a description of it."""
    if pid <= 0:
        raise BadInput(f"--pid {pid}: not a process id")
    try:
        with open(f"/proc/{pid}/maps") as maps_file:
            maps = maps_file.read()
    except FileNotFoundError:
        raise BadInput(f"--pid {pid}: no process with that id") from None
    except PermissionError:
        raise BadInput(f"--pid {pid}: cannot read /proc/{pid}/maps: permission denied (run as its user)") from None
    except OSError as exc:
        raise BadInput(f"--pid {pid}: cannot read /proc/{pid}/maps: {exc.strerror}") from None
    try:
        executable: Optional[str] = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        executable = None
    return objects_from_maps(maps, executable), f"pid {pid}"


# The child imports the modules, then sends its own /proc/self/maps on a pipe
# of its own (the modules may print on stdout), and exits.
_CHILD = """
import importlib, json, os, sys
out = os.fdopen(int(sys.argv[1]), "w")
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        message = (str(exc).strip().splitlines() or [""])[0]
        json.dump({"failed": name, "error": type(exc).__name__ + (": " + message if message else "")}, out)
        sys.exit(0)
with open("/proc/self/maps") as maps:
    json.dump({"maps": maps.read(), "executable": os.path.realpath("/proc/self/exe"), "pid": os.getpid()}, out)
"""


def imported_objects(modules: Sequence[str]) -> Tuple[List[LoadedObject], str, int]:
    """The objects a fresh interpreter has loaded once it imported ``modules``
    (this interpreter, its environment), a description, and the child's pid."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(write_end), *modules], pass_fds=(write_end,),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = _read_until_eof(pipe, child)
        status = child.wait()
        errors.seek(0)
        last_error = (errors.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1]
    what = "--import " + " ".join(modules)
    try:
        result: Dict[str, Any] = json.loads(message)
    except ValueError:
        detail = f"signal {-status}" if status < 0 else f"status {status}"
        raise BadInput(f"{what}: the importing interpreter exited with {detail}"
                       + (f": {last_error}" if last_error else "")) from None
    if "failed" in result:
        raise BadInput(f"--import {result['failed']}: cannot import it: {result['error']}")
    return objects_from_maps(result["maps"], result["executable"]), "import " + " ".join(modules), result["pid"]


def _read_until_eof(pipe: Any, child: "subprocess.Popen[bytes]") -> bytes:
    deadline = time.monotonic() + IMPORT_TIMEOUT
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
            child.kill()
            child.wait()
            raise BadInput(f"importing took longer than {IMPORT_TIMEOUT:.0f} s; gave up")
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ------------------------------------------------------------ TLS below

# What a TLS library calls to move a connection's bytes or wait for them:
@dataclass(frozen=True)
class TlsIo:
    """A TLS library that does a client's socket I/O over encrypted
    connections, as the patcher decides it (greenify.patching.companions: the
    library that gets the TLS twins), and the calls it imports for that."""

    name: str
    path: str
    io_calls: Tuple[str, ...]

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "path": self.path, "io_calls": list(self.io_calls)}


# ---------------------------------------------------------------- output

@dataclass(frozen=True)
class PatchAllVerdict:
    """What greenify.patch_all() would do to one object (greenify.patching.policy)."""

    patch: bool
    text: str   # "patches it (...)", "TLS twins, as the TLS I/O of ...", "leaves it: ..."

    def to_dict(self) -> Dict[str, Any]:
        return {"patch": self.patch, "verdict": self.text}


def patch_all_verdicts(objects: Sequence[LoadedObject]) -> Dict[str, PatchAllVerdict]:
    """path -> what patch_all() would do to each of ``objects`` (loaded in
    this process or another), by greenify.patching.policy's rule and the TLS
    companions of the objects it would patch."""
    from greenify.patching import companions
    from greenify.patching import policy

    decisions = {obj.path: policy.decide(obj, objects=objects) for obj in objects}
    chosen = [obj for obj in objects if decisions[obj.path].patch]
    verdicts = {path: PatchAllVerdict(decision.patch, ("patches it (" + decision.reason + ")") if decision.patch
                                      else "leaves it: " + decision.reason)
                for path, decision in decisions.items()}
    for companion in companions.tls_companions_of(chosen, objects):
        verdicts[companion.obj.path] = PatchAllVerdict(True, "TLS twins, as the " + companion.reason)
    return verdicts


# ------------------------------------------------------------------- main

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line, like every other bad input (argparse prints the usage too)
        self.exit(EXIT_BAD_INPUT, f"{PROGRAM}: {message} (see {PROGRAM} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROGRAM, description="Show which libraries import blocking functions, whether greenify "
                     "has green twins for them, and what to pass to greenify.patch_library.",
                     epilog="Exit status: 0 something can be patched, 1 nothing can, 2 bad input.")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="a library: a path, a soname (libmariadb.so.3) or a stem (libmariadb, mariadb)")
    parser.add_argument("--import", dest="modules", nargs="+", metavar="MODULE",
                        help="import these modules in a child interpreter and list what they loaded")
    parser.add_argument("--pid", type=int, metavar="PID", help="list what a running process has loaded")
    parser.add_argument("--blocked", action="store_true",
                        help="with --pid: the native call each thread is blocked in right now, its library and "
                        "descriptor (reads /proc; needs ptrace permission on the process)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("-v", "--verbose", action="store_true", help="with --import/--pid: every import's row")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the text (auto: on a terminal, unless NO_COLOR is set)")
    return parser


def _inspect_files(targets: Sequence[str], as_json: bool, painter: Painter) -> int:
    status = EXIT_OK
    entries: List[Dict[str, Any]] = []
    blocks: List[List[str]] = []
    search_path: List[LoadedObject] = []  # where the loader would find a DT_NEEDED name, read once

    for target in targets:
        try:
            path = resolve_target(target)
            library = inspect_file(path)
        except (BadInput, GreenifyError) as exc:
            print(f"{PROGRAM}: {exc}", file=sys.stderr)
            entries.append({"target": target, "bad_input": True, "error": str(exc)})
            status = EXIT_BAD_INPUT
            continue
        if not library.can_patch:
            status = max(status, EXIT_NOTHING_TO_PATCH)
        if not search_path:
            search_path.extend(_search_path())
        tls = _tls_of(library, search_path)
        entries.append({"target": target, "bad_input": False, **library.to_dict(),
                        "tls": [entry.to_dict() for entry in tls]})
        blocks.append(render_file(target, library, painter, tls))
    if as_json:
        _print_json({"mode": "files", "targets": entries, "exit_status": status})
    else:
        if blocks:
            print("\n\n".join("\n".join(block) for block in blocks))
    return status


def _inspect_process(args: argparse.Namespace, painter: Painter) -> int:
    modules: List[str] = args.modules or []
    if modules:
        objects, source, pid = imported_objects(modules)
    else:
        objects, source = process_objects(args.pid)
        pid = args.pid
    process = inspect_objects(objects, source, pid)
    status = EXIT_OK if process.recommended else EXIT_NOTHING_TO_PATCH
    tls = {library.path: _tls_of(library, objects) for library in process.libraries}
    patch_all = patch_all_verdicts(objects)
    if args.json:
        mode = "import" if modules else "pid"
        document = process.to_dict()
        for entry in document["libraries"]:
            entry["tls"] = [item.to_dict() for item in tls[entry["path"]]]
            entry["patch_all"] = patch_all[entry["path"]].to_dict()
        _print_json({"mode": mode, "modules": modules, **document, "exit_status": status})
    else:
        print("\n".join(render_process(process, painter, args.verbose, tls, patch_all)))
    return status


def _tls_of(library: LibraryReport, objects: Sequence[LoadedObject]) -> List[TlsIo]:
    """For a library (not itself TLS) that greenify could patch: the TLS
    libraries that do its encrypted connections' socket I/O, found among
    ``objects`` by the patcher's own rule (greenify.patching.companions), with
    the calls each imports that their TLS twins replace."""
    if library.error is not None or library.protected is not None or is_tls_library(library.path):
        return []
    real = os.path.realpath(library.path)
    client = next((obj for obj in objects if obj.realpath == real), None) or loaded.unloaded_object(library.path)
    twinned = frozenset(functions.tls_twins()) & elf.BLOCKING_SYMBOLS  # the I/O calls (close is no I/O)
    found = []
    for companion in companions.tls_companions(client, objects):
        try:
            calls = sorted({imp.symbol for imp in read_object(companion.obj, twinned).imports})
        except GreenifyError:
            continue  # unreadable: its own entry (if listed) says why
        found.append(TlsIo(companion.obj.name, companion.obj.path, tuple(calls)))
    return found


def _print_json(document: Dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run greenify-inspect; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    modes = sum((bool(args.targets), args.modules is not None, args.pid is not None))
    if modes != 1:
        parser.error("give TARGET..., --import MODULE... or --pid PID (exactly one of them)")
    if args.blocked and args.pid is None:
        parser.error("--blocked goes with --pid PID")
    painter = Painter.for_stream(sys.stdout, args.color)
    try:
        if args.blocked:
            document, lines = blocked.pid_report(args.pid)
            _print_json(document) if args.json else print("\n".join(lines))
            return EXIT_OK
        if args.targets:
            return _inspect_files(args.targets, args.json, painter)
        return _inspect_process(args, painter)
    except (BadInput, GreenifyError) as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # `greenify-inspect ... | head`: the reader left; flushing at exit must not complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
