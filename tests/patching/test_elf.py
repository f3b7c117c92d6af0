"""greenify.patching.elf: blocking imports read through the dynamic segment."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE

from tests.support.elf_fixtures import (CROSS_MACHINES, CROSS_SYMBOLS, CROSS_VARIANTS, cross_libs,  # noqa: F401 - a fixture
                          dynamic_symbol_value, section_scan)
from tests.support.fixturelib import build_library
from greenify.patching import elf
from greenify.errors import NotElfError, StaticExecutableError, TargetNotFoundError
from tests.support.servers import missing

LIBMARIADB = Path("/usr/lib/x86_64-linux-gnu/libmariadb.so.3")
LIBCRYPTO = Path("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")


def imports_by_symbol(path: Path) -> Dict[str, Tuple[str, str]]:
    info = elf.read_blocking_imports(path)
    return {imp.symbol: (imp.relocation_type, imp.version) for imp in info.imports}


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


def system_library(path: Path) -> Path:
    if not path.exists():
        missing(f"{path} is not installed (Debian: libmariadb3, libssl3)")
    return path


def test_imports_match_a_section_based_scan(fixture_libs):
    paths = [lib for libs in fixture_libs.values() for lib in libs.values()]
    paths += [system_library(LIBMARIADB), system_library(LIBCRYPTO)]
    for path in paths:
        info = elf.read_blocking_imports(path)
        assert {(imp.symbol, imp.relocation_type, imp.r_offset) for imp in info.imports} == section_scan(path), path


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
        missing("no static libc (libc.a) to link a static executable: apt install libc6-dev")
    with pytest.raises(StaticExecutableError, match="static-main"):
        elf.read_blocking_imports(static)


def test_system_libraries_import_their_socket_calls():
    # (how fast they are read is bench/elf_read.py's business)
    mariadb = elf.read_blocking_imports(system_library(LIBMARIADB))
    assert {"recv", "send", "connect", "poll"} <= {imp.symbol for imp in mariadb.imports}
    assert mariadb.soname == "libmariadb.so.3" and "libssl.so.3" in mariadb.needed
    crypto = elf.read_blocking_imports(system_library(LIBCRYPTO))
    assert {"read", "write"} <= {imp.symbol for imp in crypto.imports}


def test_needed_libraries_are_dt_needed_in_order(fixture_libs):
    assert elf.needed_libraries(system_library(LIBMARIADB)) == elf.read_blocking_imports(LIBMARIADB).needed
    with open(LIBMARIADB, "rb") as file:
        dynamic = ELFFile(file).get_section_by_name(".dynamic")
        expected = tuple(tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED")
    assert elf.needed_libraries(LIBMARIADB) == expected and "libcrypto.so.3" in expected


# --- other machines' files: cross-compiled fixtures, read statically ---------

@pytest.mark.parametrize("machine", list(CROSS_MACHINES))
@pytest.mark.parametrize("variant", list(CROSS_VARIANTS))
def test_other_machines_imports_match_a_section_based_scan(cross_libs, machine, variant):
    path = cross_libs[machine][variant]
    info = elf.read_blocking_imports(path)
    target = CROSS_MACHINES[machine]
    assert (info.e_machine, info.elf_class, info.e_type) == (target.e_machine, target.elf_class, "ET_DYN")
    found = {(imp.symbol, imp.relocation_type, imp.r_offset) for imp in info.imports}
    assert found == section_scan(path)
    assert {imp.symbol for imp in info.imports} == CROSS_SYMBOLS
    assert info.soname == path.name and len(info.build_id) == 20
    assert elf.read_identity(path) == (target.e_machine, target.elf_class, "ET_DYN")


AARCH64_CALLS = {"default": "R_AARCH64_JUMP_SLOT", "noplt": "R_AARCH64_GLOB_DAT", "relro": "R_AARCH64_JUMP_SLOT"}


@pytest.mark.parametrize("variant", list(CROSS_VARIANTS))
def test_aarch64_relocation_types_and_versions(cross_libs, variant):
    path = cross_libs["aarch64"][variant]
    info = elf.read_blocking_imports(path)
    kinds = {(imp.symbol, imp.relocation_type) for imp in info.imports}
    assert {(symbol, AARCH64_CALLS[variant]) for symbol in CROSS_SYMBOLS} <= kinds
    # the function-pointer table's one entry: an absolute relocation at the table
    (table_slot,) = [imp for imp in info.imports if imp.relocation_type == "R_AARCH64_ABS64"]
    assert table_slot.symbol == "recv" and table_slot.r_offset == dynamic_symbol_value(path, "fx_receivers")
    if "libc.so.6" in info.needed:  # linked against the cross libc: versioned imports
        assert {imp.version for imp in info.imports} == {"GLIBC_2.17"}
    assert [seg.p_type for seg in info.segments] == ["PT_LOAD"] * len(info.segments)


def test_i386_relocations_are_rel_entries_of_elf32(cross_libs):
    path = cross_libs["i386"]["default"]
    info = elf.read_blocking_imports(path)
    assert {imp.relocation_type for imp in info.imports if imp.symbol != "recv"} == {"R_386_JMP_SLOT"}
    (table_slot,) = [imp for imp in info.imports if imp.relocation_type == "R_386_32"]
    assert table_slot.r_offset == dynamic_symbol_value(path, "fx_receivers") and table_slot.r_addend == 0
