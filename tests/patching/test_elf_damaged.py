"""Damaged and odd files given to the ELF reader: each gets a GreenifyError
in process (exit status 2 and one line on stderr from greenify-inspect) or
a correct result, in bounded time.  Reads that once hung run in a child
process with a timeout, so a regression fails instead of hanging the suite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from elftools.elf.elffile import ELFFile

import greenify
from tests.support.elf_fixtures import cross_libs  # noqa: F401 - a fixture
from tests.support.elf_mutations import Regions, describe
from greenify.patching import elf
from greenify.errors import GreenifyError, NotElfError, TargetNotFoundError
from tests.support import children_env
from tests.support.servers import missing

ROOT = Path(__file__).resolve().parents[2]
LIBMARIADB = Path("/usr/lib/x86_64-linux-gnu/libmariadb.so.3")
LIBZ = Path("/usr/lib/x86_64-linux-gnu/libz.so.1")
CHILD_TIMEOUT = 60  # s; an undamaged read takes about 1 ms, the reported hang took over 20 s
MUTATION_SEED = 13
MUTATION_RUN_TIMEOUT = 900  # s for the whole seeded run (about 10 s of CPU)
ONE_READ_BOUND = 5.0  # s for the slowest damaged copy: a bound on runaway loops, not a speed target
MUTATED_COPIES_AT_LEAST = 6000


def system_library(path: Path) -> Path:
    if not path.exists():
        missing(f"{path} is not installed (Debian: libmariadb3, zlib1g)")
    return path


def read_in_child(path: Path) -> Dict[str, object]:
    """read_blocking_imports(path) in a child process, bounded by CHILD_TIMEOUT:
    {"result": describe(...)} or {"error": "Class: message"}."""
    script = ("import json, sys\nfrom tests.support.elf_mutations import describe\nfrom greenify import errors\nfrom greenify.patching import elf\n"
              "try:\n    print(json.dumps({'result': describe(elf.read_blocking_imports(sys.argv[1]))}))\n"
              "except errors.GreenifyError as exc:\n    print(json.dumps({'error': f'{type(exc).__name__}: {exc}'}))\n")
    try:
        child = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                               timeout=CHILD_TIMEOUT, env=children_env())
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} took over {CHILD_TIMEOUT} s", pytrace=False)
    assert child.returncode == 0 and child.stderr == "", child.stderr
    return json.loads(child.stdout)


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greenify.tools.inspector", *args], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)


def assert_one_line_exit_2(path: Path, *words: str) -> None:
    """greenify-inspect, text and JSON: exit 2, one line on stderr naming the file."""
    for args in ([str(path)], ["--json", str(path)]):
        result = inspect(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"greenify-inspect: {path}") and all(word in line for word in words), line
        assert "Traceback" not in result.stdout + result.stderr
    assert json.loads(inspect("--json", str(path)).stdout)["targets"][0]["bad_input"] is True


def damaged_copy(original: Path, folder: Path, name: str, edits: List[tuple]) -> Path:
    """A copy of ``original`` with (offset, struct code, value) edits packed in its byte order."""
    regions = Regions(str(original))
    data = bytearray(regions.data)
    for offset, code, value in edits:
        regions.put(data, offset, code, value)
    copy = folder / name
    copy.write_bytes(bytes(data))
    return copy


def dynamic_entry_offset(path: Path, tag: str) -> int:
    """File offset of the d_val of the first ``tag`` entry of the dynamic segment."""
    with open(path, "rb") as file:
        elffile = ELFFile(file)
        dynamic = next(segment for segment in elffile.iter_segments() if segment["p_type"] == "PT_DYNAMIC")
        entry_size = 16 if elffile.elfclass == 64 else 8
        for index, entry in enumerate(dynamic.iter_tags()):
            if entry.entry.d_tag == tag:
                return dynamic["p_offset"] + index * entry_size + entry_size // 2
    raise AssertionError(f"{path} has no {tag}")


# --- the cases reported, one by one ---------------------------------------------

def test_huge_dt_verneednum_reads_like_the_original(tmp_path):
    library = system_library(LIBMARIADB)
    copy = damaged_copy(library, tmp_path, "verneednum.so",
                        [(dynamic_entry_offset(library, "DT_VERNEEDNUM"), "Q", 2**64 - 1)])
    # vn_next == 0 ends the list whatever the count says
    assert read_in_child(copy) == {"result": describe(elf.read_blocking_imports(library))}
    assert inspect(str(copy)).returncode == 0


def test_looping_version_chain_is_an_error(tmp_path):
    library = system_library(LIBMARIADB)
    with open(library, "rb") as file:
        verneed = ELFFile(file).get_section_by_name(".gnu.version_r")["sh_offset"]
    copy = damaged_copy(library, tmp_path, "vnnext.so", [(dynamic_entry_offset(library, "DT_VERNEEDNUM"), "Q", 2**40),
                                                         (verneed + 12, "I", 1)])  # vn_next = 1
    assert "vn_next 1 overlaps the entry" in read_in_child(copy)["error"]


def test_huge_e_phoff_is_one_error_line(tmp_path):
    copy = damaged_copy(system_library(LIBMARIADB), tmp_path, "phoff.so", [(0x20, "Q", 2**63)])
    with pytest.raises(NotElfError, match="program headers .e_phoff. at file offset 0x8000000000000000"):
        elf.read_blocking_imports(copy)
    assert_one_line_exit_2(copy, "damaged ELF file", "program headers")


def test_section_headers_are_never_read(tmp_path):
    library = system_library(LIBMARIADB)
    original = describe(elf.read_blocking_imports(library))
    with open(library, "rb") as file:
        elffile = ELFFile(file)
        index = next(i for i, section in enumerate(elffile.iter_sections()) if section.name == ".dynamic")
        sh_link_at = elffile["e_shoff"] + index * elffile["e_shentsize"] + 40  # Elf64_Shdr.sh_link
    huge_shoff = damaged_copy(library, tmp_path, "shoff.so", [(0x28, "Q", 2**63)])
    no_link = damaged_copy(library, tmp_path, "shlink.so", [(sh_link_at, "I", 0)])
    for copy in (huge_shoff, no_link):
        assert read_in_child(copy) == {"result": original}
        assert inspect(str(copy)).returncode == 0


def test_huge_dt_syment_is_one_error_line(tmp_path):
    library = system_library(LIBMARIADB)
    copy = damaged_copy(library, tmp_path, "syment.so", [(dynamic_entry_offset(library, "DT_SYMENT"), "Q", 2**62)])
    with pytest.raises(NotElfError, match="DT_SYMENT is 4611686018427387904, not 24"):
        elf.read_blocking_imports(copy)
    assert_one_line_exit_2(copy, "DT_SYMENT")


def test_truncated_library_is_one_error_line(tmp_path):
    library = system_library(LIBMARIADB)
    copy = tmp_path / "truncated.so"
    copy.write_bytes(library.read_bytes()[:0x100])  # in the program headers
    with pytest.raises(NotElfError, match="lies beyond the end of the file"):
        elf.read_blocking_imports(copy)
    assert_one_line_exit_2(copy, "damaged ELF file")


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "lib.so"
    os.mkfifo(fifo)
    assert read_in_child(fifo) == {"error": f"TargetNotFoundError: {fifo}: not a regular file"}
    assert_one_line_exit_2(fifo, "not a regular file")
    with pytest.raises(TargetNotFoundError, match="not a regular file"):
        greenify.patch_library(str(fifo))


def test_proc_self_mem_is_a_clean_error():
    with pytest.raises(NotElfError, match="/proc/self/mem: not an ELF file"):
        elf.read_blocking_imports("/proc/self/mem")
    with pytest.raises(GreenifyError, match="/proc/self/mem"):
        greenify.patch_library("/proc/self/mem")
    assert_one_line_exit_2(Path("/proc/self/mem"), "not an ELF file")


def test_device_and_nul_in_path_are_clean_errors():
    with pytest.raises(TargetNotFoundError, match="/dev/zero: not a regular file"):
        elf.read_blocking_imports("/dev/zero")
    with pytest.raises(TargetNotFoundError, match="not a file name"):
        elf.read_blocking_imports("lib\0.so")


# --- the seeded mutation run -------------------------------------------------------

def test_seeded_damaged_copies_give_an_error_or_a_correct_result_in_bounded_time(fixture_libs, cross_libs, tmp_path):
    libraries = [system_library(LIBMARIADB), system_library(LIBZ), fixture_libs["fortify"]["fx_client"]]
    libraries += filter(None, [cross_libs.optional("aarch64", "relro"), cross_libs.optional("i386", "default")])
    command = [sys.executable, str(ROOT / "tests" / "support" / "elf_mutations.py"), "--seed", str(MUTATION_SEED),
               "--scratch", str(tmp_path / "damaged.so"), *map(str, libraries)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=MUTATION_RUN_TIMEOUT)
        output, errors = run.stdout, run.stderr
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        started = [json.loads(line)["start"] for line in output.splitlines() if line.startswith('{"start"')]
        pytest.fail(f"the mutation run took over {MUTATION_RUN_TIMEOUT} s; last copy read: "
                    f"{started[-1] if started else 'none'}", pytrace=False)
    assert run.returncode == 0, errors
    records = [json.loads(line) for line in output.splitlines() if line.startswith('{"case"')]
    unexpected = [(r["case"], r["unexpected"]) for r in records if "unexpected" in r]
    unchecked = [(r["case"], r["error"]) for r in records if "unchecked" in r.get("error", "")]
    changed = [(r["case"], r.get("error")) for r in records
               if r["must_equal_original"] and not r.get("equal_to_original")]
    slow = [(r["case"], r["elapsed"]) for r in records if r["elapsed"] > ONE_READ_BOUND]
    fast_differs = [(r["case"], r.get("error"), r["fast_differs"]) for r in records if "fast_differs" in r]
    assert not fast_differs, fast_differs[:5]  # csrc/patch/relocs.c answered otherwise than the careful path
    assert not unexpected, unexpected[:10]   # an exception outside the GreenifyError family
    assert not unchecked, unchecked[:10]     # a damage the reader's checks missed
    assert not changed, changed[:10]         # bytes the reader never reads changed its result
    assert not slow, slow[:10]
    assert len(records) >= MUTATED_COPIES_AT_LEAST if len(libraries) == 5 else len(records) > 0
    errors_seen = sum("error" in r for r in records)
    assert 0 < errors_seen < len(records)  # both outcomes happen: the damage reaches what is read
    print(f"{len(records)} damaged copies of {len(libraries)} libraries: {errors_seen} GreenifyErrors, "
          f"{len(records) - errors_seen} results; slowest read {max(r['elapsed'] for r in records) * 1000:.1f} ms")
