"""The C walk of the relocations (csrc/patch/relocs.c, elf.py's
_wanted_relocations_fast) against elf.py's careful path: the same answer on
every file, or None and the careful path's error.  Damaged files are
compared the same way by test_elf_damaged.py's seeded run."""
from __future__ import annotations

import glob
import os
import platform
import re
import struct
from typing import List

import pytest
from elftools.elf.elffile import ELFFile

from greenify.errors import GreenifyError
from greenify.patching import elf, imports, loaded
from tests.support.elf_fixtures import CROSS_VARIANTS, cross_libs  # noqa: F401 - a fixture
from tests.support.elf_mutations import describe

SYSTEM_LIBRARIES = f"/usr/lib/{platform.machine()}-linux-gnu/*.so*"


def fast_read(path: str, wanted):
    """The read as greenify makes it, and whether the C walk gave the answer."""
    used = []
    walk = elf._wanted_relocations_fast

    def watched(*args):
        found = walk(*args)
        used.append(found is not None)
        return found

    elf._wanted_relocations_fast = watched
    try:
        return describe(elf.read_blocking_imports(path, wanted)), all(used)
    finally:
        elf._wanted_relocations_fast = walk


def careful(path: str, wanted):
    walk = elf._wanted_relocations_fast
    elf._wanted_relocations_fast = lambda *args: None
    try:
        return describe(elf.read_blocking_imports(path, wanted))
    finally:
        elf._wanted_relocations_fast = walk


def elf_files(pattern: str) -> List[str]:
    found = []
    for path in sorted(glob.glob(pattern)):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as file:
                if file.read(4) == b"\x7fELF":
                    found.append(path)
    return found


@pytest.mark.parametrize("wanted", ["blocking", "everything patch_all reads"])
def test_every_loaded_object_reads_the_same_both_ways(wanted):
    symbols = elf.BLOCKING_SYMBOLS if wanted == "blocking" else imports._shared_symbols()
    objects = loaded.loaded_objects()
    assert len(objects) > 20
    for obj in objects:
        result, by_c = fast_read(obj.path, symbols)
        assert result == careful(obj.path, symbols), obj.path
        assert by_c, f"{obj.path}: the C walk gave up on an undamaged file"


def test_every_system_library_reads_the_same_both_ways():
    paths = elf_files(SYSTEM_LIBRARIES)
    if len(paths) < 50:
        pytest.skip(f"only {len(paths)} libraries match {SYSTEM_LIBRARIES}")
    symbols = imports._shared_symbols()
    compared = 0
    for path in paths:
        try:
            result, by_c = fast_read(path, symbols)
        except GreenifyError as exc:  # e.g. a static executable: the careful read says the same
            with pytest.raises(type(exc), match=re.escape(str(exc))):
                careful(path, symbols)
            continue
        assert result == careful(path, symbols), path
        assert by_c, f"{path}: the C walk gave up on an undamaged file"
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("machine", ["aarch64", "i386"])
def test_other_machines_read_the_same_both_ways(cross_libs, machine):  # noqa: F811 - the fixture
    for variant in CROSS_VARIANTS:
        path = cross_libs.optional(machine, variant)
        if path is None:
            pytest.skip(f"no {machine} compiler")
        result, by_c = fast_read(str(path), elf.BLOCKING_SYMBOLS)
        assert result == careful(str(path), elf.BLOCKING_SYMBOLS)
        assert result["imports"], path  # the fixture imports blocking calls: the comparison compares something
        assert by_c


def test_two_relocations_of_one_slot_count_once_as_in_the_careful_path(fixture_libs, tmp_path):
    """The first relocation of an r_offset wins, in table order; real files
    never repeat one, so a copy is made that does."""
    original = fixture_libs["default"]["fx_client"]
    with open(original, "rb") as file:
        elffile = ELFFile(file)
        table = elffile.get_section_by_name(".rela.plt")
        symbols = elffile.get_section(table["sh_link"])
        wanted = [(i, relocation) for i, relocation in enumerate(table.iter_relocations())
                  if symbols.get_symbol(relocation["r_info_sym"]).name in elf.BLOCKING_SYMBOLS]
        assert len(wanted) >= 2
        (_first, first), (second, _relocation) = wanted[0], wanted[1]
        entry_at = table["sh_offset"] + second * table["sh_entsize"]
    data = bytearray(original.read_bytes())
    struct.pack_into("<Q", data, entry_at, first["r_offset"])  # the second now names the first's slot
    copy = tmp_path / "libfx_twice.so"
    copy.write_bytes(bytes(data))
    result, by_c = fast_read(str(copy), elf.BLOCKING_SYMBOLS)
    assert by_c
    assert result == careful(str(copy), elf.BLOCKING_SYMBOLS)
    assert [imp[3] for imp in result["imports"]].count(first["r_offset"]) == 1
