"""greenify.elf: blocking imports read through the dynamic segment."""
from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE
from elftools.elf.relocation import RelocationSection

from fixturelib import build_library
from greenify import elf
from greenify.errors import NotElfError, StaticExecutableError, TargetNotFoundError

LIBMARIADB = Path("/usr/lib/x86_64-linux-gnu/libmariadb.so.3")
LIBCRYPTO = Path("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")


def imports_by_symbol(path: Path) -> Dict[str, Tuple[str, str]]:
    info = elf.read_blocking_imports(path)
    return {imp.symbol: (imp.relocation_type, imp.version) for imp in info.imports}


def naive_scan(path: Path) -> Set[Tuple[str, str, int]]:
    """The same question answered the slow, section-based way, to compare."""
    wanted = elf.BLOCKING_SYMBOLS
    kinds = elf.RELOCATION_TYPES[ENUM_E_MACHINE["EM_X86_64"]]
    found = set()
    with open(path, "rb") as file:
        elffile = ELFFile(file)
        for section in elffile.iter_sections():
            if not isinstance(section, RelocationSection):
                continue
            symtab = elffile.get_section(section["sh_link"])
            for reloc in section.iter_relocations():
                kind = kinds.get(reloc["r_info_type"])
                symbol = symtab.get_symbol(reloc["r_info_sym"])
                if kind and symbol.name in wanted and symbol["st_shndx"] == "SHN_UNDEF":
                    found.add((symbol.name, kind, reloc["r_offset"]))
    return found


@pytest.mark.parametrize("variant, kind", [("default", "R_X86_64_JUMP_SLOT"), ("noplt", "R_X86_64_GLOB_DAT"),
                                           ("relro", "R_X86_64_JUMP_SLOT")])
def test_client_imports_are_found_with_their_relocation_type(fixture_libs, variant, kind):
    found = imports_by_symbol(fixture_libs[variant]["fx_client"])
    assert found == {name: (kind, "GLIBC_2.2.5") for name in ("connect", "send", "poll", "recv")}


def test_fortified_build_imports_the_chk_forms(fixture_libs):
    client = imports_by_symbol(fixture_libs["fortify"]["fx_client"])
    assert client["__recv_chk"] == ("R_X86_64_JUMP_SLOT", "GLIBC_2.4")
    assert client["__poll_chk"] == ("R_X86_64_JUMP_SLOT", "GLIBC_2.16")
    assert "recv" not in client and "poll" not in client
    io = imports_by_symbol(fixture_libs["fortify"]["fx_io"])
    assert set(io) == {"__read_chk", "write", "select", "flock"}


def test_imports_match_a_section_based_scan(fixture_libs):
    paths = [lib for libs in fixture_libs.values() for lib in libs.values()]
    paths += [path for path in (LIBMARIADB, LIBCRYPTO) if path.exists()]
    for path in paths:
        info = elf.read_blocking_imports(path)
        assert {(imp.symbol, imp.relocation_type, imp.r_offset) for imp in info.imports} == naive_scan(path), path


def test_section_stripped_library_reads_the_same(fixture_libs, tmp_path):
    original = fixture_libs["fortify"]["fx_client"]
    stripped = tmp_path / "stripped.so"
    shutil.copy(original, stripped)
    with open(stripped, "r+b") as file:  # e_shoff, e_shnum, e_shstrndx = 0: no section headers at all
        file.seek(0x28)
        file.write(struct.pack("<Q", 0))
        file.seek(0x3C)
        file.write(struct.pack("<HH", 0, 0))
    with open(stripped, "rb") as file:
        assert ELFFile(file).num_sections() == 0
    before, after = elf.read_blocking_imports(original), elf.read_blocking_imports(stripped)
    assert after.imports == before.imports and after.imports
    assert after.build_id == before.build_id and after.segments == before.segments


def test_header_build_id_segments_soname_and_needed(tmp_path):
    build_id = "0123456789abcdef0123456789abcdef01234567"
    path = build_library("fx_client", "default", tmp_path, name="libfxid.so",
                         extra=[f"-Wl,--build-id=0x{build_id}", "-Wl,-soname,libfxid.so.7"])
    info = elf.read_blocking_imports(path)
    assert (info.e_machine, info.elf_class, info.e_type) == ("EM_X86_64", 64, "ET_DYN")
    assert info.build_id_hex == build_id
    assert info.soname == "libfxid.so.7"
    assert "libc.so.6" in info.needed
    assert [seg.flags for seg in info.segments] == ["r--", "r-x", "r--", "rw-"]
    assert all(seg.p_type == "PT_LOAD" for seg in info.segments)


def test_symbol_defined_by_the_object_is_reported_apart(tmp_path):
    info = elf.read_blocking_imports(build_library("fx_self", "default", tmp_path))
    assert [imp.symbol for imp in info.self_defined] == ["readv"]
    assert "readv" not in {imp.symbol for imp in info.imports}
    assert "read" in {imp.symbol for imp in info.imports}


def test_relocation_table_covers_aarch64():
    aarch64 = elf.RELOCATION_TYPES[ENUM_E_MACHINE["EM_AARCH64"]]
    assert set(aarch64.values()) == {"R_AARCH64_JUMP_SLOT", "R_AARCH64_GLOB_DAT", "R_AARCH64_ABS64"}


def test_fortified_forms_are_blocking_symbols():
    assert {"__recv_chk", "__read_chk", "__poll_chk", "__ppoll_chk", "__recvfrom_chk"} <= elf.BLOCKING_SYMBOLS


def test_bad_files_raise_errors_naming_them(tmp_path):
    with pytest.raises(TargetNotFoundError, match="nowhere.so"):
        elf.read_blocking_imports(tmp_path / "nowhere.so")
    with pytest.raises(TargetNotFoundError, match="directory"):
        elf.read_blocking_imports(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(NotElfError, match="notes.txt"):
        elf.read_blocking_imports(text)
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 20)
    with pytest.raises(NotElfError, match="truncated.so"):
        elf.read_blocking_imports(truncated)


def test_static_executable_is_refused(tmp_path):
    source = tmp_path / "main.c"
    source.write_text("int main(void) { return 0; }\n")
    static = tmp_path / "static-main"
    result = subprocess.run(["cc", "-static", "-o", str(static), str(source)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("no static libc (libc.a) to link a static executable: install libc6-dev")
    with pytest.raises(StaticExecutableError, match="static-main"):
        elf.read_blocking_imports(static)


def best_time(path: Path, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        elf.read_blocking_imports(path)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.skipif(not LIBCRYPTO.exists(), reason="libcrypto.so.3 not installed (apt install libssl3)")
def test_libcrypto_reads_in_under_50_ms():
    assert best_time(LIBCRYPTO) < 0.050


@pytest.mark.skipif(not LIBMARIADB.exists(), reason="libmariadb.so.3 not installed (apt install libmariadb3)")
def test_libmariadb_reads_in_under_10_ms():
    info = elf.read_blocking_imports(LIBMARIADB)
    assert {"recv", "send", "connect", "poll"} <= {imp.symbol for imp in info.imports}
    assert best_time(LIBMARIADB) < 0.010
