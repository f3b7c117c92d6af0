"""Damaged copies of a real ELF library, and a runner that reads each one
with greenify.patching.elf and reports how it went, one JSON line per copy.

    python tests/support/elf_mutations.py --seed 13 LIBRARY...

Every copy is written to one scratch file and read with
``read_blocking_imports``; a line ``{"start": name}`` is printed before the
read and ``{"case": name, ...}`` after it, so a run killed for taking too long
names the copy it was reading.  The damage (seeded, so a failure repeats):

* truncations: in the ELF header, in the program headers, in and after the
  dynamic segment, at random places, and at the end of the last PT_LOAD
  (which leaves all the reader needs: the result must not change);
* every byte of the ELF header and of every program header flipped (xor with
  a random non-zero byte), and the header fields set to huge values;
* bytes flipped in every dynamic entry's d_tag and d_val, and every d_val set
  to 0, 1, 2**31-1, 2**32-1, 2**63-1, 2**64-1 and the file size;
* the fields of the first version entries (Elf_Verneed, Elf_Vernaux,
  Elf_Verdef, Elf_Verdaux) set to 0 and huge values;
* random flips in the dynamic symbols, versions, strings, relocations and
  notes; and flips in .text and in the section headers, which the reader
  never reads: those copies must give the original's result.

Each copy is read a second time with the relocations walked by elf.py's
careful path alone: a record with "fast_differs" is one where the C walk
(csrc/patch/relocs.c) gave another result or error.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

from elftools.elf.elffile import ELFFile

HUGE_VALUES = (0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1)
# A mutated copy: (name, bytes, whether its result must equal the original's)
Mutation = Tuple[str, bytes, bool]


class Regions:
    """Where the structures are in the original (read with pyelftools, from
    the section headers the original still has)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as file:
            self.data = file.read()
            elffile = ELFFile(file)
            self.little = elffile.little_endian
            self.is64 = elffile.elfclass == 64
            self.ehsize = elffile["e_ehsize"]
            self.phoff, self.phentsize, self.phnum = elffile["e_phoff"], elffile["e_phentsize"], elffile["e_phnum"]
            self.shoff, self.shentsize, self.shnum = elffile["e_shoff"], elffile["e_shentsize"], elffile["e_shnum"]
            segments = [(segment["p_type"], segment["p_offset"], segment["p_filesz"])
                        for segment in elffile.iter_segments()]
            self.sections = {section.name: (section["sh_offset"], section["sh_size"], section["sh_type"])
                             for section in elffile.iter_sections()}
        self.dynamic = next((offset, size) for p_type, offset, size in segments if p_type == "PT_DYNAMIC")
        self.notes = [(offset, size) for p_type, offset, size in segments if p_type == "PT_NOTE"]
        self.loads_end = max(offset + size for p_type, offset, size in segments if p_type == "PT_LOAD")

    def section(self, name: str) -> Optional[Tuple[int, int]]:
        entry = self.sections.get(name)
        if entry is None or entry[2] == "SHT_NOBITS" or entry[1] == 0:
            return None
        return entry[0], entry[1]

    def put(self, data: bytearray, offset: int, code: str, value: int) -> None:
        size = struct.calcsize(code)
        value &= (1 << (8 * size)) - 1
        if code.islower():  # signed
            value = value - (1 << (8 * size)) if value >= 1 << (8 * size - 1) else value
        struct.pack_into(("<" if self.little else ">") + code, data, offset, value)


def _flip(data: bytes, offset: int, rng: random.Random) -> bytes:
    copy = bytearray(data)
    copy[offset] ^= rng.randrange(1, 256)
    return bytes(copy)


def _flips(name: str, data: bytes, region: Optional[Tuple[int, int]], count: int,
           rng: random.Random, same: bool = False) -> Iterator[Mutation]:
    if region is None:
        return
    offset, size = region
    for _ in range(count):
        at = offset + rng.randrange(size)
        yield f"{name}: flip at {at:#x}", _flip(data, at, rng), same


def _set_fields(name: str, regions: Regions, offset: int, fields: List[Tuple[str, str]]) -> Iterator[Mutation]:
    """Each field of the structure at ``offset`` set to each huge value."""
    at = offset
    for field_name, code in fields:
        for value in HUGE_VALUES + (len(regions.data),):
            copy = bytearray(regions.data)
            regions.put(copy, at, code, value)
            yield f"{name}.{field_name} = {value:#x}", bytes(copy), False
        at += struct.calcsize(code)


def mutations(path: str, rng: random.Random) -> Iterator[Mutation]:
    regions = Regions(path)
    data = regions.data
    word = "Q" if regions.is64 else "I"
    sword = "q" if regions.is64 else "i"

    # truncations
    ends = {0, 1, 4, 5, 6, 16, 17, regions.ehsize - 1, regions.ehsize, regions.phoff + regions.phentsize // 2,
            regions.phoff + regions.phentsize * regions.phnum - 1}
    dyn_offset, dyn_size = regions.dynamic
    ends |= {dyn_offset, dyn_offset + dyn_size // 2, dyn_offset + dyn_size - 1}
    ends |= {rng.randrange(len(data)) for _ in range(12)}
    for end in sorted(ends):
        yield f"truncated to {end} bytes", data[:end], False
    if regions.loads_end < len(data):
        yield f"truncated after the last PT_LOAD ({regions.loads_end} bytes)", data[:regions.loads_end], True

    # the ELF header and the program headers, byte by byte
    for at in range(4, regions.ehsize):
        yield f"ELF header: flip at {at:#x}", _flip(data, at, rng), False
    for at in range(regions.phoff, regions.phoff + regions.phentsize * regions.phnum):
        yield f"program header {(at - regions.phoff) // regions.phentsize}: flip at {at:#x}", \
            _flip(data, at, rng), False

    # header fields with huge values; the section header fields are never read
    header_fields = [("e_type", "H"), ("e_machine", "H"), ("e_version", "I"), ("e_entry", word), ("e_phoff", word),
                     ("e_shoff", word), ("e_flags", "I"), ("e_ehsize", "H"), ("e_phentsize", "H"),
                     ("e_phnum", "H"), ("e_shentsize", "H"), ("e_shnum", "H"), ("e_shstrndx", "H")]
    for name, copy, _same in _set_fields("e", regions, 16, header_fields):
        field_name = name.split(" ")[0][2:]
        # PN_XNUM in e_phnum sends the reader to section 0; the others never do
        same = field_name in ("e_shoff", "e_shentsize", "e_shnum", "e_shstrndx", "e_entry", "e_flags",
                              "e_version", "e_ehsize")
        yield name, copy, same
    if regions.is64:
        phdr_fields = [("p_type", "I"), ("p_flags", "I"), ("p_offset", "Q"), ("p_vaddr", "Q"), ("p_paddr", "Q"),
                       ("p_filesz", "Q"), ("p_memsz", "Q"), ("p_align", "Q")]
    else:
        phdr_fields = [("p_type", "I"), ("p_offset", "I"), ("p_vaddr", "I"), ("p_paddr", "I"),
                       ("p_filesz", "I"), ("p_memsz", "I"), ("p_flags", "I"), ("p_align", "I")]
    for index in range(regions.phnum):
        yield from _set_fields(f"phdr{index}", regions, regions.phoff + index * regions.phentsize, phdr_fields)

    # the dynamic segment, entry by entry
    entry_size = 16 if regions.is64 else 8
    half = entry_size // 2
    for at in range(dyn_offset, dyn_offset + dyn_size, entry_size):
        (d_tag,) = struct.unpack_from(("<" if regions.little else ">") + sword, data, at)
        yield f"dynamic tag {d_tag:#x}: d_tag flip", _flip(data, at + rng.randrange(half), rng), False
        yield f"dynamic tag {d_tag:#x}: d_val flip", _flip(data, at + half + rng.randrange(half), rng), False
        for value in HUGE_VALUES + (len(data),):
            copy = bytearray(data)
            regions.put(copy, at + half, word, value)
            yield f"dynamic tag {d_tag:#x}: d_val = {value:#x}", bytes(copy), False
        if d_tag == 0:
            break

    # the first version entries, field by field
    version_layouts = {
        ".gnu.version_r": [[("vn_version", "H"), ("vn_cnt", "H"), ("vn_file", "I"), ("vn_aux", "I"),
                            ("vn_next", "I")],
                           [("vna_hash", "I"), ("vna_flags", "H"), ("vna_other", "H"), ("vna_name", "I"),
                            ("vna_next", "I")]],
        ".gnu.version_d": [[("vd_version", "H"), ("vd_flags", "H"), ("vd_ndx", "H"), ("vd_cnt", "H"),
                            ("vd_hash", "I"), ("vd_aux", "I"), ("vd_next", "I")],
                           [("vda_name", "I"), ("vda_next", "I")]],
    }
    for section_name, (entry, aux) in version_layouts.items():
        region = regions.section(section_name)
        if region is None:
            continue
        yield from _set_fields(section_name, regions, region[0], entry)
        aux_offset_field = 3 if section_name == ".gnu.version_r" else 5
        aux_at = region[0] + struct.unpack_from(("<" if regions.little else ">") + "".join(c for _n, c in entry),
                                                data, region[0])[aux_offset_field]
        yield from _set_fields(section_name + " aux", regions, aux_at, aux)

    # random flips in the tables the reader walks
    for section_name, count in ((".dynsym", 40), (".gnu.version", 15), (".gnu.version_r", 15),
                                (".gnu.version_d", 10), (".dynstr", 25), (".rela.plt", 30), (".rela.dyn", 30),
                                (".rel.plt", 30), (".rel.dyn", 30), (".gnu.hash", 5)):
        yield from _flips(section_name, data, regions.section(section_name), count, rng)
    for note in regions.notes:
        yield from _flips("PT_NOTE", data, note, 10, rng)

    # what the reader never reads: the result must not change
    yield from _flips(".text", data, regions.section(".text"), 10, rng, same=True)
    section_headers = (regions.shoff, regions.shentsize * regions.shnum)
    if regions.shoff and regions.shoff + section_headers[1] <= len(data):
        yield from _flips("section headers", data, section_headers, 20, rng, same=True)


def describe(result) -> Dict[str, object]:
    """What the suite compares between a copy's result and the original's."""
    return {"e_machine": result.e_machine, "elf_class": result.elf_class, "e_type": result.e_type,
            "build_id": result.build_id_hex, "soname": result.soname, "needed": list(result.needed),
            "segments": [[seg.p_type, seg.p_offset, seg.p_vaddr, seg.p_filesz, seg.p_memsz, seg.p_flags]
                         for seg in result.segments],
            "imports": [[imp.symbol, imp.version, imp.relocation_type, imp.r_offset, imp.r_addend]
                        for imp in result.imports],
            "self_defined": [[imp.symbol, imp.version, imp.relocation_type, imp.r_offset]
                             for imp in result.self_defined]}


def run(paths: List[str], seed: int, scratch: str) -> None:
    from greenify.patching import elf
    from greenify.errors import GreenifyError

    def emit(record: Dict[str, object]) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    for path in paths:
        original = describe(elf.read_blocking_imports(path))
        rng = random.Random(f"{seed}:{os.path.basename(path)}")
        for name, copy, same in mutations(path, rng):
            case = f"{os.path.basename(path)}: {name}"
            with open(scratch, "wb") as file:
                file.write(copy)
            emit({"start": case})
            start = time.perf_counter()
            record: Dict[str, object] = {"case": case, "must_equal_original": same}
            try:
                result = describe(elf.read_blocking_imports(scratch))
            except GreenifyError as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - exactly what the suite looks for
                record["unexpected"] = f"{type(exc).__name__}: {exc}"
            else:
                record["equal_to_original"] = result == original
                record["imports"] = len(result["imports"])
            record["elapsed"] = time.perf_counter() - start
            careful = careful_read(scratch)  # the C walk of the relocations must change nothing
            fast = record["error"] if "error" in record else None if "unexpected" in record else result
            if careful != fast:
                record["fast_differs"] = careful
            emit(record)


def careful_read(path: str):
    """read_blocking_imports(path) with the relocations walked by elf.py's
    careful path only (never csrc/patch/relocs.c): its describe()d result,
    or the error as run() records it."""
    from greenify.patching import elf
    from greenify.errors import GreenifyError

    fast = elf._wanted_relocations_fast
    elf._wanted_relocations_fast = lambda *args: None
    try:
        return describe(elf.read_blocking_imports(path))
    except GreenifyError as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - run() reports the fast read's; this one's differs or not
        return None
    finally:
        elf._wanted_relocations_fast = fast


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("libraries", nargs="+")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--scratch", required=True, help="the file each damaged copy is written to")
    args = parser.parse_args(argv)
    run(args.libraries, args.seed, args.scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
