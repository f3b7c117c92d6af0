"""greenify-inspect, run as a user runs it (a subprocess), and greenify.report()
in process: the fixture libraries and Debian's libmariadb, libcurl, libcrypto."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

import greenify
from tests.support.fixturelib import build_extension_module, build_library, compiler
from greenify.patching import companions, elf, loaded
from greenify.tools import inspector as inspect_module
from greenify.patching.inventory import LibraryReport
from greenify.patching.patcher import green_twins
from tests.support.elf_fixtures import CROSS_MACHINES, CROSS_SYMBOLS, cross_libs  # noqa: F401 - a fixture
from tests.support.servers import missing, require_module

MARIADB = Path("/usr/lib/x86_64-linux-gnu/libmariadb.so.3")
CURL = Path("/usr/lib/x86_64-linux-gnu/libcurl.so.4")
CRYPTO = Path("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")
SOCKET_CALLS = {"recv", "send", "connect", "poll"}


def inspect(*args: str, env: Optional[Dict[str, str]] = None, **kwargs) -> subprocess.CompletedProcess:
    """greenify-inspect ARGS in a subprocess, output captured (not a tty)."""
    environment = dict(os.environ, **(env or {}))
    environment.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "greenify.tools.inspector", *args], capture_output=True, text=True,
                          env=environment, timeout=60, **kwargs)


def inspect_json(*args: str, env: Optional[Dict[str, str]] = None) -> dict:
    return json.loads(inspect("--json", *args, env=env).stdout)


def system_library(path: Path) -> Path:
    if not path.exists():
        missing(f"{path} is not installed (Debian: libmariadb3, libcurl4, libssl3)")
    return path


def expected_verdict(path: Path) -> str:
    """The verdict from the patcher's own reader and twin list."""
    imports = elf.read_blocking_imports(path, elf.BLOCKING_SYMBOLS | green_twins().keys()).imports
    missing = sorted({imp.symbol for imp in imports if imp.symbol not in green_twins()})
    patchable = sum(imp.symbol in green_twins() for imp in imports)
    verdict = f"patchable: {patchable} of {len(imports)} blocking imports"
    if missing:
        names = ", ".join(f"`{name}`" for name in missing)
        verdict += f"; {names} {'has' if len(missing) == 1 else 'have'} no green twin yet"
    return verdict


def joined(text: str) -> str:
    """Text output with wrapped lines joined back, to find a sentence in it."""
    return " ".join(text.split())


# --- one library --------------------------------------------------------------

def test_path_lists_every_blocking_import_with_version_relocation_slot_and_twin(fixture_libs):
    path = fixture_libs["default"]["fx_client"]
    result = inspect(str(path))
    assert result.returncode == 0, result.stderr
    imports = elf.read_blocking_imports(path, elf.BLOCKING_SYMBOLS | green_twins().keys()).imports
    assert {"connect", "send", "poll", "recv"} <= {imp.symbol for imp in imports}
    for imp in imports:
        row = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == [imp.symbol]]
        assert row == [[imp.symbol, imp.version or "-", imp.relocation_type, f"{imp.r_offset:#x}", "yes"]]
    assert joined(expected_verdict(path)) in joined(result.stdout)


# Blocking calls that may not have a green twin yet; the test reads which ones don't.
NO_TWIN_SOURCE = """
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>
int fx_lock(int fd) { return flock(fd, LOCK_EX) + lockf(fd, F_LOCK, 0) + fcntl(fd, F_GETFL); }
int fx_reap(int pid) { int status; return waitpid(pid, &status, 0) + wait(&status) + (int)sleep(0); }
long fx_positioned(int fd, char *buffer) { return pread(fd, buffer, 1, 0) + pwrite(fd, buffer, 1, 0); }
"""
NO_TWIN_CANDIDATES = {"flock", "lockf", "fcntl", "waitpid", "wait", "sleep", "pread", "pwrite", "pread64", "pwrite64"}


def test_verdict_names_the_imports_without_a_green_twin(fixture_libs, tmp_path):
    source = tmp_path / "fx_notwin.c"
    source.write_text(NO_TWIN_SOURCE)
    library = tmp_path / "libfxnotwin.so"
    subprocess.run([compiler(), "-shared", "-fPIC", "-O0", "-o", str(library), str(source)], check=True)
    imported = {imp.symbol for imp in elf.read_blocking_imports(library).imports}
    assert imported & {"waitpid", "flock", "lockf"}
    missing_twins = sorted(imported - green_twins().keys())
    if not missing_twins:
        missing(f"{', '.join(sorted(imported))} all have green twins now: write a library importing a blocking "
                "call that has none, or this verdict goes untested")
    for path in (library, fixture_libs["default"]["fx_io"]):
        result = inspect(str(path))
        assert joined(expected_verdict(path)) in joined(result.stdout)
    result = inspect(str(library))
    names = ", ".join(f"`{name}`" for name in missing_twins)
    assert f"{names} {'has' if len(missing_twins) == 1 else 'have'} no green twin yet" in joined(result.stdout)
    assert result.returncode == (0 if len(missing_twins) < len(imported) else 1)


def test_fortified_and_no_plt_builds_show_their_relocations(fixture_libs):
    fortified = inspect_json(str(fixture_libs["fortify"]["fx_client"]))["targets"][0]
    assert {"__recv_chk", "__poll_chk"} <= {imp["symbol"] for imp in fortified["imports"]}
    no_plt = inspect_json(str(fixture_libs["noplt"]["fx_client"]))["targets"][0]
    assert {imp["relocation_type"] for imp in no_plt["imports"]} == {"R_X86_64_GLOB_DAT"}


@pytest.mark.parametrize("target", ["/usr/lib/x86_64-linux-gnu/libmariadb.so.3", "libmariadb.so.3", "libmariadb",
                                    "mariadb"])
def test_path_soname_and_stem_name_the_same_library(target):
    system_library(MARIADB)
    document = inspect_json(target)
    entry = document["targets"][0]
    assert document["exit_status"] == 0
    assert os.path.realpath(entry["path"]) == os.path.realpath(MARIADB)
    assert entry["soname"] == "libmariadb.so.3"
    assert entry["verdict"] == expected_verdict(MARIADB)


def test_curl_and_crypto_sonames_in_one_call():
    system_library(CURL), system_library(CRYPTO)
    result = inspect("libcurl.so.4", "libcrypto.so.3")
    assert result.returncode == 0, result.stderr
    text = joined(result.stdout)
    assert "libcurl.so.4 -> " in text and "libcrypto.so.3 -> " in text
    assert joined(expected_verdict(CURL)) in text and joined(expected_verdict(CRYPTO)) in text


def test_ld_library_path_is_searched_before_the_ldconfig_cache(tmp_path):
    library = build_library("fx_client", "default", tmp_path, name="libfxinspect.so.7")
    document = inspect_json("libfxinspect", env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert document["targets"][0]["path"] == str(library)
    assert inspect("libfxinspect").returncode == 2  # not found without it


def test_json_document_holds_the_same_facts():
    system_library(MARIADB)
    document = inspect_json(str(MARIADB))
    assert document["mode"] == "files" and document["exit_status"] == 0
    (entry,) = document["targets"]
    assert entry["target"] == str(MARIADB) and entry["bad_input"] is False
    assert {"path", "soname", "build_id", "needed", "imports", "blocking_imports", "patchable_imports",
            "missing_twins", "verdict", "protected", "recommended"} <= entry.keys()
    imports = elf.read_blocking_imports(MARIADB, elf.BLOCKING_SYMBOLS | green_twins().keys()).imports
    assert [(imp["symbol"], imp["version"], imp["relocation_type"], imp["slot_offset"], imp["green_twin"])
            for imp in entry["imports"]] == \
        [(imp.symbol, imp.version, imp.relocation_type, imp.r_offset, imp.symbol in green_twins())
         for imp in imports]
    assert entry["missing_twins"] == sorted({imp.symbol for imp in imports} - green_twins().keys())
    assert SOCKET_CALLS <= {imp["symbol"] for imp in entry["imports"] if imp["network"]}


def test_exit_status_1_when_the_library_holds_nothing_to_patch(tmp_path):
    source = tmp_path / "pure.c"
    source.write_text("int pure_add(int a, int b) { return a + b; }\n")
    library = tmp_path / "libpure.so"
    subprocess.run([compiler(), "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    result = inspect(str(library))
    assert result.returncode == 1 and result.stderr == ""
    assert "nothing to patch: no imports of blocking functions" in result.stdout

    libc = inspect("libc.so.6")
    assert libc.returncode == 1
    assert "never patched: libc itself" in joined(libc.stdout)


def test_static_executable_has_nothing_to_patch(tmp_path):
    source = tmp_path / "static.c"
    source.write_text("int main(void) { return 0; }\n")
    executable = tmp_path / "static"
    built = subprocess.run([compiler(), "-static", "-o", str(executable), str(source)], capture_output=True)
    if built.returncode != 0:
        missing("cannot link statically here (Debian: libc6-dev brings libc.a)")
    result = inspect(str(executable))
    assert result.returncode == 1 and result.stderr == ""
    assert "not patchable: no PT_DYNAMIC segment" in result.stdout


def test_one_bad_target_among_good_ones_still_reports_the_good_ones(fixture_libs, tmp_path):
    result = inspect(str(fixture_libs["default"]["fx_client"]), str(tmp_path / "missing.so"))
    assert result.returncode == 2
    assert "patchable:" in result.stdout
    assert result.stderr.strip().splitlines() == [f"greenify-inspect: {tmp_path / 'missing.so'}: no such file"]


# {tmp} is the test's temporary folder, which holds notes.txt and broken.py
BAD_INPUTS: Dict[str, List[str]] = {
    "missing file": ["{tmp}/nope.so"],
    "directory": ["{tmp}"],
    "non-ELF file": ["{tmp}/notes.txt"],
    "unknown stem": ["libgreenifynosuchthing"],
    "module that does not exist": ["--import", "greenify_no_such_module"],
    "module that fails to import": ["--import", "broken"],
    "pid that does not exist": ["--pid", "4194305"],  # above the largest pid_max
    "pid that is not a number": ["--pid", "twelve"],
    "no target at all": [],
    "two modes at once": ["libmariadb", "--pid", "1"],
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(case, tmp_path):
    (tmp_path / "notes.txt").write_text("not a library\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('driver is broken')\n")
    args = [arg.format(tmp=tmp_path) for arg in BAD_INPUTS[case]]
    result = inspect(*args, cwd=tmp_path)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("greenify-inspect: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if case == "module that fails to import":
        assert "broken" in lines[0] and "driver is broken" in lines[0]


# --- what a set of modules or a process loaded --------------------------------

def test_import_of_an_extension_module_recommends_the_library_under_it(tmp_path):
    module = build_extension_module(tmp_path)
    document = inspect_json("--import", "fx_module", env={"PYTHONPATH": str(tmp_path)})
    assert document["mode"] == "import" and document["exit_status"] == 0
    assert document["recommended"] == [str(tmp_path / "libfxmod.so")]
    assert document["patch_library"] == ["libfxmod.so"]
    listed = {Path(library["path"]).name for library in document["libraries"]}
    assert Path(module.__file__).name not in listed  # it imports no blocking function itself


def test_import_mysqldb_recommends_libmariadb_not_its_extension_module():
    require_module("MySQLdb", "mysqlclient")
    result = inspect("--import", "MySQLdb")
    assert result.returncode == 0, result.stderr
    document = inspect_json("--import", "MySQLdb")
    recommended = [Path(path).name for path in document["recommended"]]
    assert recommended == [os.path.basename(os.path.realpath(MARIADB))]
    by_name = {Path(library["path"]).name: library for library in document["libraries"]}
    assert not any(name.startswith("_mysql") for name in by_name)
    if "libcrypto.so.3" in by_name:  # listed, ranked below, and says why
        assert not by_name["libcrypto.so.3"]["recommended"]
        assert "dependency of libmariadb.so.3" in by_name["libcrypto.so.3"]["note"]
    assert 'greenify.patch_library("libmariadb.so.3")' in result.stdout.split("recommended:")[1]
    assert result.stdout.index("libmariadb.so.3") < result.stdout.index("libcrypto.so.3")


@contextlib.contextmanager
def process_that_loaded(*libraries: Path) -> Iterator[int]:
    """The pid of a python that loaded ``libraries`` with ctypes and sleeps."""
    loads = "".join(f"ctypes.CDLL({str(library)!r})\n" for library in libraries)
    child = subprocess.Popen([sys.executable, "-c", f"import ctypes, time\n{loads}print('ready', flush=True)\n"
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_pid_of_a_running_process_that_loaded_libmariadb():
    system_library(MARIADB)
    with process_that_loaded(MARIADB) as pid:
        result = inspect("--pid", str(pid))
        document = inspect_json("--pid", str(pid))
    assert result.returncode == 0, result.stderr
    assert f"pid {pid}" in result.stdout
    assert document["mode"] == "pid" and document["pid"] == pid
    assert [os.path.realpath(path) for path in document["recommended"]] == [os.path.realpath(MARIADB)]
    for library in document["libraries"]:
        name = Path(library["path"]).name
        if name.startswith(("libc.so", "ld-linux", "libpython")) or library["path"] == document["executable"]:
            assert library["protected"] and not library["recommended"]


def test_file_io_library_is_listed_below_the_network_client(fixture_libs):
    client, files = fixture_libs["relro"]["fx_client"], fixture_libs["relro"]["fx_io"]
    with process_that_loaded(files, client) as pid:
        document = inspect_json("--pid", str(pid))
    assert document["recommended"] == [str(client)] and document["exit_status"] == 0
    paths = [library["path"] for library in document["libraries"]]
    assert paths.index(str(client)) < paths.index(str(files))
    (io_library,) = [library for library in document["libraries"] if library["path"] == str(files)]
    assert not io_library["recommended"] and "not a network client" in io_library["note"]


def test_exit_status_1_when_no_loaded_library_is_a_network_client(fixture_libs):
    with process_that_loaded(fixture_libs["relro"]["fx_io"]) as pid:
        result = inspect("--pid", str(pid))
    assert result.returncode == 1 and result.stderr == ""
    assert "nothing to recommend" in result.stdout


def test_file_and_listing_output_fit_80_columns():
    system_library(MARIADB)
    for args in ([str(MARIADB), str(CRYPTO)], ["--pid", str(os.getpid())]):
        for line in inspect(*args).stdout.splitlines():
            if not line.strip().startswith("/"):  # a long path is what it is
                assert len(line) <= 80, line


# --- colour -------------------------------------------------------------------

def _on_a_terminal(args: Sequence[str], env: Dict[str, str]) -> str:
    """Output of greenify-inspect ARGS written to a pseudo-terminal."""
    main, terminal = os.openpty()
    try:
        process = subprocess.run([sys.executable, "-m", "greenify.tools.inspector", *args], stdout=terminal,
                                 stderr=subprocess.PIPE, env=env, timeout=60)
        assert process.returncode == 0, process.stderr
    finally:
        os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(fixture_libs):
    path = str(fixture_libs["default"]["fx_client"])
    assert "\033[" not in inspect(path).stdout
    plain_env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    assert "\033[" in _on_a_terminal([path], plain_env)
    assert "\033[" not in _on_a_terminal([path], dict(plain_env, NO_COLOR="1"))


# --- in process -----------------------------------------------------------------

def test_report_in_process_shows_slots_patched_after_patch_library(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxreport.so")
    ctypes.CDLL(str(path))
    greenify.greenify()

    def library_report() -> LibraryReport:
        (library,) = [entry for entry in greenify.report().libraries if entry.path == str(path)]
        return library

    before = library_report()
    assert before.patchable and not any(imp.patched for imp in before.imports)
    with greenify.patched(str(path)) as patch:
        during = library_report()
        patched_addresses = {slot.slot_address for slot in patch.patched_slots}
        assert {imp.slot_address for imp in during.imports if imp.patched} == patched_addresses
        assert all(imp.patched for imp in during.patchable)
        assert during.verdict.endswith(f"{len(during.patchable)} patched now")
        assert during.to_dict()["imports"][0]["slot_address"] is not None
    assert not any(imp.patched for imp in library_report().imports)


def test_report_in_process_never_recommends_libc_libpython_gevent_or_greenify():
    document = greenify.report().to_dict()
    json.dumps(document)  # JSON-ready
    for library in document["libraries"]:
        name = Path(library["path"]).name
        parts = Path(library["path"]).parts
        if name.startswith(("libc.so", "ld-linux", "libpython", "_green")) or "gevent" in parts:
            assert not library["recommended"], library


def test_console_script_is_installed_and_runs(fixture_libs):
    script = Path(sys.executable).parent / "greenify-inspect"
    if not script.exists():
        missing(f"{script} is missing: run `make build` (pip install -e .)")
    result = subprocess.run([str(script), str(fixture_libs["default"]["fx_client"])], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "patchable:" in result.stdout


# --- another machine's library --------------------------------------------------

@pytest.mark.parametrize("machine", list(CROSS_MACHINES))
def test_another_machines_library_lists_its_imports_and_says_why_it_cannot_be_patched(cross_libs, machine):
    path = cross_libs[machine]["default"]
    target = CROSS_MACHINES[machine]
    result = inspect(str(path))
    assert result.returncode == 1 and result.stderr == ""  # nothing patchable here; not bad input
    rows = {line.split()[0] for line in result.stdout.splitlines()[2:] if line.startswith("  ") and
            not line.strip().startswith("not patchable")}
    assert CROSS_SYMBOLS <= rows
    reason = (f"not patchable: ELF{target.elf_class} {target.e_machine}, but this process is ELF64 EM_X86_64, "
              "and greenify patches only the process it runs in")
    assert reason in joined(result.stdout)
    (entry,) = inspect_json(str(path))["targets"]
    assert entry["bad_input"] is False and entry["verdict"] == reason
    assert {imp["symbol"] for imp in entry["imports"]} == CROSS_SYMBOLS
    assert not entry["recommended"] and entry["error"] == reason[len("not patchable: "):]


# --- TLS: where an encrypted connection's socket calls happen -----------------------

TLS_CLIENTS = {  # client -> the TLS library doing its socket I/O and a call it makes there; None: the client's own
    "libmariadb.so.3": ("libcrypto.so.3", "read"),  # SSL_set_fd: OpenSSL's socket BIO reads and writes the socket
    "libpq.so.5": None,             # its own BIO: encrypted bytes go through libpq's recv/send
    "libcurl.so.4": None,           # its own BIO, as libpq
    "libcurl-gnutls.so.4": None,    # gnutls_transport_set_push_function: curl's own send/recv
}


@pytest.mark.parametrize("client", list(TLS_CLIENTS))
def test_tls_client_says_which_library_does_its_socket_io(client):
    """The inspector's TLS line is the patcher's own decision
    (greenify.patching.companions): the library that gets the TLS twins."""
    path = system_library(Path("/usr/lib/x86_64-linux-gnu") / client)
    (entry,) = inspect_json(str(path))["targets"]
    text = joined(inspect(str(path)).stdout)
    decided = companions.tls_companions(loaded.unloaded_object(str(path)), loaded.search_path())
    assert [(item["name"], os.path.realpath(item["path"])) for item in entry["tls"]] == \
        [(companion.obj.name, os.path.realpath(companion.obj.path)) for companion in decided]
    if TLS_CLIENTS[client] is None:
        assert entry["tls"] == [] and "TLS:" not in text
        return
    tls_library, call = TLS_CLIENTS[client]
    io_library = elf.read_blocking_imports(system_library(Path("/usr/lib/x86_64-linux-gnu") / tls_library))
    assert [item["name"] for item in entry["tls"]] == [tls_library]
    assert call in entry["tls"][0]["io_calls"]
    assert set(entry["tls"][0]["io_calls"]) <= {imp.symbol for imp in io_library.imports}
    assert tls_library in elf.needed_libraries(path)
    assert f"TLS: encrypted connections read and write the socket in {tls_library} (" in text
    assert f"not in {entry['soname']}" in text


def test_library_without_tls_dependency_has_no_tls_line(fixture_libs):
    path = fixture_libs["default"]["fx_client"]
    assert inspect_json(str(path))["targets"][0]["tls"] == []
    assert "TLS:" not in inspect(str(path)).stdout


def test_import_mysqldb_explains_tls_under_the_recommended_library():
    require_module("MySQLdb", "mysqlclient")
    document = inspect_json("--import", "MySQLdb")
    by_name = {Path(library["path"]).name: library for library in document["libraries"]}
    mariadb = by_name[os.path.basename(os.path.realpath(MARIADB))]
    assert mariadb["recommended"] and [item["name"] for item in mariadb["tls"]] == ["libcrypto.so.3"]
    assert by_name["libcrypto.so.3"]["tls"] == []  # a TLS library is not explained by itself
    text = joined(inspect("--import", "MySQLdb").stdout)
    assert "TLS: encrypted connections read and write the socket in libcrypto.so.3 (" in text


# --- the main program of another process --------------------------------------------

def test_pid_of_a_shell_names_its_main_program_as_what_it_is():
    shell = subprocess.Popen(["bash", "-c", "read line"], stdin=subprocess.PIPE)
    try:
        document = inspect_json("--pid", str(shell.pid))
        text = inspect("--pid", str(shell.pid)).stdout
    finally:
        shell.kill()
        shell.wait()
        shell.stdin.close()
    assert "Python interpreter" not in text
    executable = os.path.basename(document["executable"])
    (main_program,) = [library for library in document["libraries"] if library["path"] == document["executable"]]
    assert main_program["protected"] == f"the main program ({executable})" and executable.startswith("bash")


def test_wheel_bundled_tls_libraries_are_recognised_under_their_hashed_names():
    require_module("psycopg2", "psycopg2-binary")
    document = inspect_json("--import", "psycopg2")
    names = [Path(library["path"]).name for library in document["libraries"]]
    hashed = [name for name in names if name.startswith(("libssl-", "libcrypto-"))]
    assert hashed and all(inspect_module.is_tls_library(name) for name in hashed)
    (libpq,) = [library for library in document["libraries"] if Path(library["path"]).name.startswith("libpq")]
    assert libpq["recommended"]
    assert libpq["tls"] == []  # libpq's own BIO: its encrypted bytes go through libpq's recv/send, patched with it


@pytest.mark.parametrize("name, tls", [("libssl.so.3", True), ("libcrypto-fb8d5b21.so.3", True),
                                       ("libgnutls.so.30", True), ("libssl3.so", True), ("libsslx.so.1", False),
                                       ("libmariadb.so.3", False), ("libcrypt.so.1", False)])
def test_tls_libraries_are_known_by_stem(name, tls):
    assert inspect_module.is_tls_library(name) is tls


def test_a_python_module_name_points_to_import():
    result = inspect("MySQLdb._mysql")
    assert result.returncode == 2
    assert "greenify-inspect --import MySQLdb._mysql" in joined(result.stderr)
