"""Blocking imports of an ELF shared object, read through its dynamic segment.

Everything here is found from the program headers (PT_LOAD, PT_DYNAMIC,
PT_NOTE) and the dynamic tags, never from section headers, so libraries whose
sections were stripped read the same.  The structures are read with ``struct``
from a memory map, in the layouts the ELF specification gives them (named
below, field by field); a symbol's name is looked up only for relocations
whose type could hold a function address.  pyelftools supplies the names of
the spec's numbers (EM_*, ET_*, PT_*, DT_*).

The file may be damaged or hostile: every read is checked against the end of
the file (or of the table it belongs to), every loop is bounded by the bytes
it walks, and what does not fit raises NotElfError naming the file and the
structure, never another exception, in time proportional to the file's size.

    imports = read_blocking_imports("/usr/lib/x86_64-linux-gnu/libmariadb.so.3")
    for imp in imports.imports:
        print(imp.symbol, imp.version, imp.relocation_type, hex(imp.r_offset))
"""
from __future__ import annotations

import collections
import contextlib
import mmap
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

from elftools.elf.enums import ENUM_D_TAG, ENUM_E_MACHINE, ENUM_E_TYPE, ENUM_P_TYPE_BASE

from greenify import functions as _functions
from greenify.errors import NotElfError, StaticExecutableError, TargetNotFoundError

# e_machine -> {relocation type number: name}: the relocations whose slot
# holds the plain address of an imported function, per architecture.  The
# patcher writes slots on this machine only; the others are read so that the
# inspector can list another machine's library.
RELOCATION_TYPES: Dict[int, Dict[int, str]] = {
    ENUM_E_MACHINE["EM_X86_64"]: {
        7: "R_X86_64_JUMP_SLOT",
        6: "R_X86_64_GLOB_DAT",
        1: "R_X86_64_64",
    },
    ENUM_E_MACHINE["EM_AARCH64"]: {
        1026: "R_AARCH64_JUMP_SLOT",
        1025: "R_AARCH64_GLOB_DAT",
        257: "R_AARCH64_ABS64",
    },
    ENUM_E_MACHINE["EM_386"]: {
        7: "R_386_JMP_SLOT",
        6: "R_386_GLOB_DAT",
        1: "R_386_32",
    },
    ENUM_E_MACHINE["EM_ARM"]: {
        22: "R_ARM_JUMP_SLOT",
        21: "R_ARM_GLOB_DAT",
        2: "R_ARM_ABS32",
    },
}

# libc calls that can block a thread, from the list of green functions
# (csrc/wait/green.h).  Only those with a green twin get patched; the others are
# read so a report can say they were left alone.
BLOCKING_CALLS: FrozenSet[str] = _functions.blocking_calls()


def with_fortified_forms(names: Iterable[str]) -> FrozenSet[str]:
    """``names`` plus glibc's _FORTIFY_SOURCE forms (read -> __read_chk)."""
    names = set(names)
    return frozenset(names | {f"__{name}_chk" for name in names if not name.startswith("__")})


BLOCKING_SYMBOLS: FrozenSet[str] = with_fortified_forms(BLOCKING_CALLS)

PF_X, PF_W, PF_R = 1, 2, 4

# e_ident (ELF gABI): magic, class, data encoding
ELFMAG = b"\x7fELF"
EI_CLASS, EI_DATA, EI_NIDENT = 4, 5, 16
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
PN_XNUM = 0xFFFF          # e_phnum overflow: the count is in section 0's sh_info
SHN_UNDEF = 0
NT_GNU_BUILD_ID = 3
VERSYM_HIDDEN = 0x8000    # high bit of a DT_VERSYM entry
VER_NDX_GLOBAL = 1        # versym indexes <= this are unversioned
NOTE_ALIGN = 4            # GNU notes pad name and descriptor to 4 bytes, also in ELF64 files

# The structures read, field by field as the gABI names them, with their
# struct codes (byte order is the file's, added when a class is bound).
# Elf32_Phdr and Elf32_Sym order their fields differently from ELF64.
Layout = Tuple[Tuple[str, str], ...]
ELF64_EHDR: Layout = (("e_type", "H"), ("e_machine", "H"), ("e_version", "I"), ("e_entry", "Q"),
                      ("e_phoff", "Q"), ("e_shoff", "Q"), ("e_flags", "I"), ("e_ehsize", "H"),
                      ("e_phentsize", "H"), ("e_phnum", "H"), ("e_shentsize", "H"), ("e_shnum", "H"),
                      ("e_shstrndx", "H"))
ELF32_EHDR: Layout = (("e_type", "H"), ("e_machine", "H"), ("e_version", "I"), ("e_entry", "I"),
                      ("e_phoff", "I"), ("e_shoff", "I"), ("e_flags", "I"), ("e_ehsize", "H"),
                      ("e_phentsize", "H"), ("e_phnum", "H"), ("e_shentsize", "H"), ("e_shnum", "H"),
                      ("e_shstrndx", "H"))
ELF64_PHDR: Layout = (("p_type", "I"), ("p_flags", "I"), ("p_offset", "Q"), ("p_vaddr", "Q"), ("p_paddr", "Q"),
                      ("p_filesz", "Q"), ("p_memsz", "Q"), ("p_align", "Q"))
ELF32_PHDR: Layout = (("p_type", "I"), ("p_offset", "I"), ("p_vaddr", "I"), ("p_paddr", "I"), ("p_filesz", "I"),
                      ("p_memsz", "I"), ("p_flags", "I"), ("p_align", "I"))
ELF64_SHDR: Layout = (("sh_name", "I"), ("sh_type", "I"), ("sh_flags", "Q"), ("sh_addr", "Q"), ("sh_offset", "Q"),
                      ("sh_size", "Q"), ("sh_link", "I"), ("sh_info", "I"), ("sh_addralign", "Q"),
                      ("sh_entsize", "Q"))
ELF32_SHDR: Layout = (("sh_name", "I"), ("sh_type", "I"), ("sh_flags", "I"), ("sh_addr", "I"), ("sh_offset", "I"),
                      ("sh_size", "I"), ("sh_link", "I"), ("sh_info", "I"), ("sh_addralign", "I"),
                      ("sh_entsize", "I"))
ELF64_DYN: Layout = (("d_tag", "q"), ("d_val", "Q"))
ELF32_DYN: Layout = (("d_tag", "i"), ("d_val", "I"))
ELF64_SYM: Layout = (("st_name", "I"), ("st_info", "B"), ("st_other", "B"), ("st_shndx", "H"), ("st_value", "Q"),
                     ("st_size", "Q"))
ELF32_SYM: Layout = (("st_name", "I"), ("st_value", "I"), ("st_size", "I"), ("st_info", "B"), ("st_other", "B"),
                     ("st_shndx", "H"))
ELF64_REL: Layout = (("r_offset", "Q"), ("r_info", "Q"))
ELF64_RELA: Layout = (("r_offset", "Q"), ("r_info", "Q"), ("r_addend", "q"))
ELF32_REL: Layout = (("r_offset", "I"), ("r_info", "I"))
ELF32_RELA: Layout = (("r_offset", "I"), ("r_info", "I"), ("r_addend", "i"))
# The same in both classes:
ELF_NHDR: Layout = (("n_namesz", "I"), ("n_descsz", "I"), ("n_type", "I"))
ELF_VERNEED: Layout = (("vn_version", "H"), ("vn_cnt", "H"), ("vn_file", "I"), ("vn_aux", "I"), ("vn_next", "I"))
ELF_VERNAUX: Layout = (("vna_hash", "I"), ("vna_flags", "H"), ("vna_other", "H"), ("vna_name", "I"),
                       ("vna_next", "I"))
ELF_VERDEF: Layout = (("vd_version", "H"), ("vd_flags", "H"), ("vd_ndx", "H"), ("vd_cnt", "H"), ("vd_hash", "I"),
                      ("vd_aux", "I"), ("vd_next", "I"))
ELF_VERDAUX: Layout = (("vda_name", "I"), ("vda_next", "I"))
ELF_VERSYM: Layout = (("vs_index", "H"),)

# r_info = (symbol index << shift) | type, per class
R_SYM_SHIFT = {64: 32, 32: 8}

# The dynamic tags read, by number (names from pyelftools' table of the gABI's)
_DT_READ = ("DT_NEEDED", "DT_PLTRELSZ", "DT_STRTAB", "DT_SYMTAB", "DT_RELA", "DT_RELASZ", "DT_STRSZ", "DT_SYMENT",
            "DT_SONAME", "DT_REL", "DT_RELSZ", "DT_PLTREL", "DT_JMPREL", "DT_VERSYM", "DT_VERDEF", "DT_VERDEFNUM",
            "DT_VERNEED", "DT_VERNEEDNUM", "DT_RELACOUNT", "DT_RELCOUNT")
_DT_NAMES: Dict[int, str] = {ENUM_D_TAG[name]: name for name in _DT_READ}
DT_NULL = ENUM_D_TAG["DT_NULL"]
DT_RELA = ENUM_D_TAG["DT_RELA"]
_E_MACHINE_NAMES: Dict[int, str] = {number: name for name, number in ENUM_E_MACHINE.items() if isinstance(number, int)}
_E_TYPE_NAMES: Dict[int, str] = {number: name for name, number in ENUM_E_TYPE.items() if isinstance(number, int)}
_P_TYPE_NAMES: Dict[int, str] = {number: name for name, number in ENUM_P_TYPE_BASE.items() if isinstance(number, int)}
PT_LOAD, PT_DYNAMIC, PT_NOTE = "PT_LOAD", "PT_DYNAMIC", "PT_NOTE"


class Structure:
    """One ELF structure bound to a byte order: ``read`` gives its fields by
    name, ``struct`` unpacks it as a plain tuple where speed matters."""

    def __init__(self, name: str, layout: Layout, byte_order: str) -> None:
        self.name = name
        self.struct = struct.Struct(byte_order + "".join(code for _field, code in layout))
        self.size = self.struct.size
        self.tuple = collections.namedtuple(name, [field_name for field_name, _code in layout])
        self.index = {field_name: i for i, (field_name, _code) in enumerate(layout)}

    def read(self, image: "_Image", offset: int):  # -> a named tuple of the fields
        return self.tuple._make(image.unpack(self, offset))


class ElfClass:
    """The structures of one ELF class (32 or 64) in one byte order."""

    def __init__(self, bits: int, byte_order: str) -> None:
        is64 = bits == 64
        self.bits = bits
        # in this machine's byte order: csrc/patch/relocs.c can read it
        self.native = (byte_order == "<") == (sys.byteorder == "little")

        def bind(name: str, layout64: Layout, layout32: Optional[Layout] = None) -> Structure:
            return Structure(name, layout64 if is64 or layout32 is None else layout32, byte_order)

        self.ehdr = bind(f"Elf{bits}_Ehdr", ELF64_EHDR, ELF32_EHDR)
        self.phdr = bind(f"Elf{bits}_Phdr", ELF64_PHDR, ELF32_PHDR)
        self.shdr = bind(f"Elf{bits}_Shdr", ELF64_SHDR, ELF32_SHDR)
        self.dyn = bind(f"Elf{bits}_Dyn", ELF64_DYN, ELF32_DYN)
        self.sym = bind(f"Elf{bits}_Sym", ELF64_SYM, ELF32_SYM)
        self.rel = bind(f"Elf{bits}_Rel", ELF64_REL, ELF32_REL)
        self.rela = bind(f"Elf{bits}_Rela", ELF64_RELA, ELF32_RELA)
        self.nhdr = bind("Elf_Nhdr", ELF_NHDR)
        self.verneed = bind("Elf_Verneed", ELF_VERNEED)
        self.vernaux = bind("Elf_Vernaux", ELF_VERNAUX)
        self.verdef = bind("Elf_Verdef", ELF_VERDEF)
        self.verdaux = bind("Elf_Verdaux", ELF_VERDAUX)
        self.versym = bind("Elf_Versym", ELF_VERSYM)
        self.r_sym_shift = R_SYM_SHIFT[bits]
        self.r_type_mask = (1 << self.r_sym_shift) - 1


_CLASSES = {(elf_class, data): ElfClass(64 if elf_class == ELFCLASS64 else 32,
                                        "<" if data == ELFDATA2LSB else ">")
            for elf_class in (ELFCLASS32, ELFCLASS64) for data in (ELFDATA2LSB, ELFDATA2MSB)}


@dataclass(frozen=True)
class Segment:
    """One program header, with the fields of Elf64_Phdr that matter here."""

    p_type: str
    p_offset: int
    p_vaddr: int
    p_filesz: int
    p_memsz: int
    p_flags: int

    @property
    def flags(self) -> str:
        return ("r" if self.p_flags & PF_R else "-") + ("w" if self.p_flags & PF_W else "-") + \
            ("x" if self.p_flags & PF_X else "-")


@dataclass(frozen=True)
class BlockingImport:
    """One relocation of a blocking symbol: the slot at ``r_offset`` (relative
    to the load base) receives the symbol's address (+ ``r_addend``)."""

    symbol: str
    version: Optional[str]
    relocation_type: str
    r_offset: int
    r_addend: int = 0


@dataclass(frozen=True)
class ElfImports:
    """What greenify needs to know of one ELF file."""

    path: str
    e_machine: str            # e.g. "EM_X86_64"
    elf_class: int            # 32 or 64
    e_type: str               # "ET_DYN", "ET_EXEC"
    build_id: Optional[bytes]
    segments: Tuple[Segment, ...]  # the PT_LOAD segments, in file order
    soname: Optional[str]
    needed: Tuple[str, ...]   # DT_NEEDED, in order
    imports: Tuple[BlockingImport, ...]   # undefined blocking symbols: what may be patched
    self_defined: Tuple[BlockingImport, ...] = field(default=())  # relocations against symbols it defines

    @property
    def build_id_hex(self) -> Optional[str]:
        return self.build_id.hex() if self.build_id is not None else None


class _Image:
    """The file's bytes, its class, and the vaddr -> file offset mapping of
    its PT_LOADs; every read is checked against the end of the file."""

    def __init__(self, data: "mmap.mmap | bytes", path: str) -> None:
        self.data = data
        self.size = len(data)
        self.path = path
        self.loads: Tuple[Segment, ...] = ()
        if self.size < EI_NIDENT or data[:len(ELFMAG)] != ELFMAG:
            raise NotElfError(f"{path}: not an ELF file", path)
        elf_class, data_encoding = data[EI_CLASS], data[EI_DATA]
        if (elf_class, data_encoding) not in _CLASSES:
            raise self.damaged(f"unknown ELF class {elf_class} or data encoding {data_encoding} in e_ident")
        self.elf = _CLASSES[elf_class, data_encoding]

    def damaged(self, what: str) -> NotElfError:
        return NotElfError(f"{self.path}: damaged ELF file: {what}", self.path)

    def check_range(self, what: str, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise self.damaged(f"{what} at file offset {offset:#x} (+{size:#x} bytes) lies beyond the end of "
                               f"the file ({self.size:#x} bytes)")

    def unpack(self, structure: Structure, offset: int) -> Tuple[int, ...]:
        self.check_range(structure.name, offset, structure.size)
        return structure.struct.unpack_from(self.data, offset)

    def _segment(self, what: str, vaddr: int, size: int) -> Segment:
        for seg in self.loads:
            if seg.p_vaddr <= vaddr and vaddr + size <= seg.p_vaddr + seg.p_filesz:
                return seg
        raise self.damaged(f"{what} at {vaddr:#x} (+{size:#x} bytes) lies outside the file's PT_LOAD segments")

    def offset(self, what: str, vaddr: int, size: int = 1) -> int:
        """The file offset of ``size`` bytes at ``vaddr``, which must lie
        within the file part of one PT_LOAD."""
        seg = self._segment(what, vaddr, size)
        return vaddr - seg.p_vaddr + seg.p_offset

    def offset_and_end(self, what: str, vaddr: int) -> Tuple[int, int]:
        """The file offset of ``vaddr`` and of the end of its PT_LOAD's file part."""
        seg = self._segment(what, vaddr, 1)
        return vaddr - seg.p_vaddr + seg.p_offset, seg.p_offset + seg.p_filesz

    def string(self, what: str, offset: int, end: int) -> str:
        """The NUL-terminated string at ``offset``, which must end before ``end``."""
        stop = self.data.find(b"\0", offset, end) if 0 <= offset < end else -1
        if stop < 0:
            raise self.damaged(f"{what}: no string at offset {offset:#x} within its table")
        return self.data[offset:stop].decode("utf-8", "replace")


def _open_regular(path: str) -> Tuple[int, os.stat_result]:
    """A descriptor of ``path`` and its status, once it is known to be a
    regular file: the one check of a target's path (greenify.patching.loaded
    uses it too).  The type is checked on the open descriptor, which is
    opened without blocking: a FIFO or a device is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise TargetNotFoundError(f"{path}: no such file", path) from None
    except IsADirectoryError:
        raise TargetNotFoundError(f"{path}: is a directory, not a shared library", path) from None
    except OSError as exc:
        raise TargetNotFoundError(f"{path}: cannot open: {exc.strerror}", path) from None
    except ValueError as exc:  # a NUL byte in the path
        raise TargetNotFoundError(f"{path!r}: not a file name: {exc}", path) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise TargetNotFoundError(f"{path}: is a directory, not a shared library", path)
        if not stat.S_ISREG(info.st_mode):
            raise TargetNotFoundError(f"{path}: not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def check_file(path: str) -> None:
    """Raise TargetNotFoundError unless ``path`` is an existing regular file."""
    fd, _info = _open_regular(path)
    os.close(fd)


@contextlib.contextmanager
def _open_elf(path: str) -> Iterator["mmap.mmap | bytes"]:
    """The bytes of ``path``, mapped, once it is known to be a non-empty
    regular file (_open_regular)."""
    fd, info = _open_regular(path)
    try:
        if info.st_size == 0:  # also what /proc/self/mem and other /proc files report
            raise NotElfError(f"{path}: not an ELF file: it is empty (or a /proc file, which has no size)", path)
        try:
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise NotElfError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}", path) from None
        with data:
            yield data
    finally:
        os.close(fd)


def read_blocking_imports(path: "str | os.PathLike[str]",
                          symbols: Optional[Iterable[str]] = None) -> ElfImports:
    """Read the ELF file at ``path``: machine, class, build-id, PT_LOAD
    segments, DT_SONAME/DT_NEEDED and every dynamic relocation that imports
    one of ``symbols`` (default: BLOCKING_SYMBOLS) into a function-address
    slot.  Raises TargetNotFoundError, NotElfError (also for any damage) or
    StaticExecutableError."""
    path = os.fspath(path)
    wanted = BLOCKING_SYMBOLS if symbols is None else frozenset(symbols)
    with _open_elf(path) as data:
        image = _Image(data, path)
        try:
            return _read(image, wanted)
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            # every read is checked first: reaching this is a gap in the checks,
            # which the mutation test looks for (the word "unchecked")
            raise image.damaged(f"unchecked {type(exc).__name__}: {exc}") from None


def read_identity(path: "str | os.PathLike[str]") -> Tuple[str, int, str]:
    """(e_machine, ELF class, e_type) of the ELF file at ``path``, from its
    header alone: enough to refuse a file for another machine early."""
    path = os.fspath(path)
    with _open_elf(path) as data:
        image = _Image(data, path)
        header = image.elf.ehdr.read(image, EI_NIDENT)
        return _e_machine_name(header.e_machine), image.elf.bits, _E_TYPE_NAMES.get(header.e_type, str(header.e_type))


def needed_libraries(path: "str | os.PathLike[str]") -> Tuple[str, ...]:
    """DT_NEEDED of the ELF file at ``path``, in order (the names, as the
    dynamic loader will look them up).  Raises as read_blocking_imports."""
    return read_blocking_imports(path, symbols=()).needed


def _e_machine_name(e_machine: int) -> str:
    return _E_MACHINE_NAMES.get(e_machine, f"EM_{e_machine}")


def _program_headers(image: _Image, header) -> List:
    """The Elf_Phdr entries, with e_phnum's PN_XNUM escape resolved."""
    elf = image.elf
    phnum = header.e_phnum
    if phnum == PN_XNUM:  # the real count is in section header 0's sh_info
        if header.e_shentsize != elf.shdr.size:
            raise image.damaged(f"e_phnum is PN_XNUM but e_shentsize is {header.e_shentsize}, "
                                f"not {elf.shdr.size}")
        phnum = elf.shdr.read(image, header.e_shoff).sh_info
    if phnum and header.e_phentsize != elf.phdr.size:
        raise image.damaged(f"e_phentsize is {header.e_phentsize}, not {elf.phdr.size} ({elf.phdr.name})")
    image.check_range(f"{phnum} program headers (e_phoff)", header.e_phoff, phnum * elf.phdr.size)
    return [elf.phdr.read(image, header.e_phoff + i * elf.phdr.size) for i in range(phnum)]


def _read(image: _Image, wanted: FrozenSet[str]) -> ElfImports:
    elf, path = image.elf, image.path
    header = elf.ehdr.read(image, EI_NIDENT)
    e_machine = _e_machine_name(header.e_machine)

    loads: List[Segment] = []
    notes: List[Segment] = []
    dynamic = None
    for number, phdr in enumerate(_program_headers(image, header)):
        p_type = _P_TYPE_NAMES.get(phdr.p_type)
        if p_type in (PT_LOAD, PT_NOTE, PT_DYNAMIC):
            image.check_range(f"{p_type} segment {number}", phdr.p_offset, phdr.p_filesz)
        if p_type == PT_LOAD or p_type == PT_NOTE:
            entry = Segment(p_type, phdr.p_offset, phdr.p_vaddr, phdr.p_filesz, phdr.p_memsz, phdr.p_flags)
            (loads if p_type == PT_LOAD else notes).append(entry)
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = phdr
    image.loads = tuple(loads)
    build_id = _build_id(image, notes)

    if dynamic is None:
        raise StaticExecutableError(f"{path}: no PT_DYNAMIC segment (a static executable): nothing to patch", path)
    tags: Dict[str, int] = {}
    needed_offsets: List[int] = []
    for at in range(dynamic.p_offset, dynamic.p_offset + dynamic.p_filesz - elf.dyn.size + 1, elf.dyn.size):
        d_tag, d_val = image.unpack(elf.dyn, at)
        if d_tag == DT_NULL:
            break
        name = _DT_NAMES.get(d_tag)
        if name == "DT_NEEDED":
            needed_offsets.append(d_val)
        elif name is not None:
            tags.setdefault(name, d_val)

    strings = _StringTable(image, tags)
    soname = strings.get("DT_SONAME", tags["DT_SONAME"]) if "DT_SONAME" in tags else None
    needed = tuple(strings.get("DT_NEEDED", offset) for offset in needed_offsets)

    reloc_types = RELOCATION_TYPES.get(header.e_machine, {})
    imports: List[BlockingImport] = []
    self_defined: List[BlockingImport] = []
    # The relocations of wanted symbols, walked in C where every check it
    # makes holds, else the careful way, which names what is wrong.
    if wanted and reloc_types and "DT_SYMTAB" in tags:
        symbols = _Symbols(image, tags, strings)
        found = _wanted_relocations_fast(image, tags, strings, symbols, wanted, reloc_types)
        if found is None:  # a bulk check failed: the careful path reads it entry by entry, and says what is wrong
            found = list(_wanted_relocations(image, tags, strings, symbols, wanted, reloc_types))
        for name, r_offset, r_sym, type_name, r_addend in found:
            defined = symbols.is_defined(r_sym)
            entry = BlockingImport(name, symbols.version(r_sym, defined), type_name, r_offset, r_addend)
            (self_defined if defined else imports).append(entry)

    return ElfImports(path=path, e_machine=e_machine, elf_class=elf.bits,
                      e_type=_E_TYPE_NAMES.get(header.e_type, str(header.e_type)),
                      build_id=build_id, segments=tuple(loads), soname=soname, needed=needed,
                      imports=tuple(imports), self_defined=tuple(self_defined))


@lru_cache(maxsize=16)
def _wanted_bytes(names: FrozenSet[str]) -> Tuple[Dict[bytes, str], int]:
    """The wanted names as bytes -> name, and the longest one's length."""
    encoded = {name.encode(): name for name in names}
    return encoded, max(map(len, encoded), default=0)


class _StringTable:
    """DT_STRTAB, bounded by DT_STRSZ and by the PT_LOAD that holds it."""

    def __init__(self, image: _Image, tags: Dict[str, int]) -> None:
        self.image = image
        self.start: Optional[int] = None
        self.end = 0
        if "DT_STRTAB" in tags:
            self.start, self.end = image.offset_and_end("DT_STRTAB", tags["DT_STRTAB"])
            if tags.get("DT_STRSZ"):
                self.end = min(self.end, self.start + tags["DT_STRSZ"])

    def raw(self, what: str, offset: int, longest: int) -> Optional[bytes]:
        """The bytes of the string at ``offset`` if it is at most ``longest``
        long, else None (no wanted name is longer)."""
        if self.start is None:
            raise self.image.damaged(f"{what} names a string, but the dynamic segment has no DT_STRTAB")
        at = self.start + offset
        if not 0 <= offset or at >= self.end:
            raise self.image.damaged(f"{what}: no string at offset {offset:#x} within its table")
        stop = self.image.data.find(b"\0", at, min(self.end, at + longest + 1))
        if stop < 0:
            if self.image.data.find(b"\0", at, self.end) < 0:
                raise self.image.damaged(f"{what}: no string at offset {offset:#x} within its table")
            return None
        return self.image.data[at:stop]

    def get(self, what: str, offset: int) -> str:
        if self.start is None:
            raise self.image.damaged(f"{what} names a string, but the dynamic segment has no DT_STRTAB")
        return self.image.string(what, self.start + offset, self.end)


# One relocation of a wanted symbol: (name, r_offset, symbol index, type name, r_addend)
_Wanted = Tuple[str, int, int, str, int]


def _wanted_relocations(image: _Image, tags: Dict[str, int], strings: "_StringTable", symbols: "_Symbols",
                        wanted: FrozenSet[str], reloc_types: Dict[int, str]) -> Iterator[_Wanted]:
    """The relocations of a known type that name a wanted symbol, in table
    order, the first one of each r_offset: the careful path, one relocation
    and one symbol at a time, each checked as it is read."""
    by_bytes, longest = _wanted_bytes(wanted)
    wanted_name: Dict[int, Optional[str]] = {}  # symbol index -> its name if wanted, else None
    seen: Set[int] = set()
    for r_offset, r_sym, r_type, r_addend in _relocations(image, tags):
        type_name = reloc_types.get(r_type)
        if type_name is None or r_sym == 0 or r_offset in seen:
            continue
        if r_sym in wanted_name:
            name = wanted_name[r_sym]
        else:  # the symbol's name compared as bytes, never decoded: most are not wanted
            name = wanted_name[r_sym] = by_bytes.get(strings.raw(f"name of symbol {r_sym}",
                                                                 symbols.name_offset(r_sym), longest))
        if name is None:
            continue
        seen.add(r_offset)
        yield name, r_offset, r_sym, type_name, r_addend


def _wanted_relocations_fast(image: _Image, tags: Dict[str, int], strings: "_StringTable", symbols: "_Symbols",
                             wanted: FrozenSet[str], reloc_types: Dict[int, str]) -> Optional[List[_Wanted]]:
    """_wanted_relocations' answer from csrc/patch/relocs.c, which walks the
    tables in C (patch_all() reads every loaded object: tens of thousands of
    relocations).  It makes the careful path's checks on everything it reads
    and gives exactly its answer, or None where a check fails (or the file is
    not in this machine's byte order): the careful path then reads the file
    and names what is wrong (tests/patching/test_elf_fast_read.py compares
    the two on every loaded object and on damaged files)."""
    if not image.elf.native or strings.start is None:
        return None
    from greenify._green import ffi, lib

    try:
        tables = list(_relocation_tables(image, tags))
    except NotElfError:
        return None  # the careful path raises it, where it would
    names, c_names, known, _buffers = _c_wanted(wanted, tuple(sorted(reloc_types)))
    c_tables = ffi.new("struct relocs_table[]", max(len(tables), 1))
    for entry, (_tag, start, size, is_rela) in zip(c_tables, tables):
        entry.offset, entry.size, entry.is_rela = start, size, is_rela
    layout = ffi.new("struct relocs_layout *", {
        "is64": image.elf.bits == 64, "symtab": symbols._table_at, "symtab_end": symbols._table_end,
        "strtab": strings.start, "strtab_end": strings.end})
    data = ffi.from_buffer("unsigned char[]", image.data)
    capacity = 256
    while True:
        found = ffi.new("struct relocs_found[]", capacity)
        count = lib.relocs_find_wanted(data, len(image.data), c_tables, len(tables), layout, c_names, len(names),
                                       known, len(known), found, capacity)
        if count < 0:
            return None
        if count <= capacity:
            break
        capacity = count
    return [(names[entry.name], entry.r_offset, entry.symbol, reloc_types[entry.type], entry.r_addend)
            for entry in found[0:count]]


@lru_cache(maxsize=16)
def _c_wanted(wanted: FrozenSet[str], types: Tuple[int, ...]):
    """The wanted names in strcmp's order, as a C array of strings, the
    known types as a table indexed by type, and the buffers the strings
    point into (cached with the array, so they live as long as it does)."""
    from greenify._green import ffi

    names = sorted(wanted, key=lambda name: name.encode())
    buffers = [ffi.new("char[]", name.encode()) for name in names]
    c_names = ffi.new("const char *[]", buffers)
    known = ffi.new("unsigned char[]", (max(types) + 1) if types else 1)
    for r_type in types:
        known[r_type] = 1
    return names, c_names, known, buffers


def _relocation_tables(image: _Image, tags: Dict[str, int]) -> Iterator[Tuple[str, int, int, bool]]:
    """(tag, file offset, size, is_rela) of DT_JMPREL, DT_RELA and DT_REL,
    each checked to lie in the file part of one PT_LOAD, less their leading
    relative relocations."""
    elf = image.elf
    tables: List[Tuple[str, int, int, bool]] = []  # (tag, vaddr, size, is_rela)
    if "DT_JMPREL" in tags and tags.get("DT_PLTRELSZ"):
        tables.append(("DT_JMPREL", tags["DT_JMPREL"], tags["DT_PLTRELSZ"], tags.get("DT_PLTREL", DT_RELA) == DT_RELA))
    if "DT_RELA" in tags and tags.get("DT_RELASZ"):
        tables.append(("DT_RELA", tags["DT_RELA"], tags["DT_RELASZ"], True))
    if "DT_REL" in tags and tags.get("DT_RELSZ"):
        tables.append(("DT_REL", tags["DT_REL"], tags["DT_RELSZ"], False))
    for tag, vaddr, size, is_rela in tables:
        structure = elf.rela if is_rela else elf.rel
        size -= size % structure.size
        start = image.offset(tag, vaddr, size)
        # The first DT_RELACOUNT (DT_RELCOUNT) entries are relative
        # relocations, which name no symbol: the loader applies them as such
        # without reading their type, so they import nothing here either.
        relative = tags.get("DT_RELACOUNT" if is_rela else "DT_RELCOUNT", 0) if tag != "DT_JMPREL" else 0
        skipped = min(relative * structure.size, size)
        yield tag, start + skipped, size - skipped, is_rela


def _relocations(image: _Image, tags: Dict[str, int]) -> Iterator[Tuple[int, int, int, int]]:
    """(r_offset, r_info_sym, r_info_type, r_addend) of DT_JMPREL, DT_RELA and DT_REL."""
    elf = image.elf
    sym_shift, type_mask = elf.r_sym_shift, elf.r_type_mask
    for _tag, start, size, is_rela in _relocation_tables(image, tags):
        structure = elf.rela if is_rela else elf.rel
        view = memoryview(image.data)[start:start + size]
        try:
            if is_rela:
                for r_offset, r_info, r_addend in structure.struct.iter_unpack(view):
                    yield r_offset, r_info >> sym_shift, r_info & type_mask, r_addend
            else:
                for r_offset, r_info in structure.struct.iter_unpack(view):
                    yield r_offset, r_info >> sym_shift, r_info & type_mask, 0
        finally:
            view.release()


class _Symbols:
    """DT_SYMTAB entries, their names (DT_STRTAB) and versions (DT_VERSYM with
    DT_VERNEED for imports, DT_VERDEF for definitions), decoded on demand."""

    def __init__(self, image: _Image, tags: Dict[str, int], strings: _StringTable) -> None:
        self.image = image
        self.tags = tags
        self.strings = strings
        sym = image.elf.sym
        self.sym = sym
        syment = tags.get("DT_SYMENT", sym.size)
        if syment != sym.size:
            raise image.damaged(f"DT_SYMENT is {syment}, not {sym.size} ({sym.name})")
        self.symtab = tags["DT_SYMTAB"]
        # the file part of the PT_LOAD that holds the table's start: entries
        # within it are located without a segment search each
        self._table_at, self._table_end = image.offset_and_end("DT_SYMTAB", self.symtab)
        self.st_name = sym.index["st_name"]
        self.st_shndx = sym.index["st_shndx"]
        self._names: Dict[int, str] = {}
        self._name_offsets: Dict[int, int] = {}
        self._version_names: Optional[Dict[int, str]] = None

    def _entry(self, index: int) -> Tuple[int, ...]:
        at = self._table_at + index * self.sym.size
        if not (self._table_at <= at and at + self.sym.size <= self._table_end):  # beyond the table's PT_LOAD
            at = self.image.offset(f"DT_SYMTAB entry {index}", self.symtab + index * self.sym.size, self.sym.size)
        return self.sym.struct.unpack_from(self.image.data, at)

    def name_offset(self, index: int) -> int:
        """st_name of symbol ``index``: where its name starts in DT_STRTAB."""
        offset = self._name_offsets.get(index)
        if offset is None:
            offset = self._name_offsets[index] = self._entry(index)[self.st_name]
        return offset

    def name(self, index: int) -> str:
        name = self._names.get(index)
        if name is None:
            name = self._names[index] = self.strings.get(f"name of symbol {index}", self._entry(index)[self.st_name])
        return name

    def is_defined(self, index: int) -> bool:
        return self._entry(index)[self.st_shndx] != SHN_UNDEF

    def version(self, index: int, defined: bool) -> Optional[str]:
        if "DT_VERSYM" not in self.tags:
            return None
        versym_struct = self.image.elf.versym
        at = self.image.offset(f"DT_VERSYM entry {index}", self.tags["DT_VERSYM"] + versym_struct.size * index,
                               versym_struct.size)
        (versym,) = versym_struct.struct.unpack_from(self.image.data, at)
        versym &= ~VERSYM_HIDDEN
        if versym <= VER_NDX_GLOBAL:  # VER_NDX_LOCAL, VER_NDX_GLOBAL: unversioned
            return None
        if self._version_names is None:
            self._version_names = self._read_versions()
        return self._version_names.get(versym)

    def _read_versions(self) -> Dict[int, str]:
        """Version index -> name, from DT_VERNEED and DT_VERDEF."""
        names: Dict[int, str] = {}
        elf, image = self.image.elf, self.image
        tags = self.tags
        if "DT_VERNEED" in tags:
            start = image.offset("DT_VERNEED", tags["DT_VERNEED"], elf.verneed.size)
            for at in _chain(image, elf.verneed, "vn_next", start, tags.get("DT_VERNEEDNUM", 0)):
                verneed = elf.verneed.read(image, at)
                for aux in _chain(image, elf.vernaux, "vna_next", at + verneed.vn_aux, verneed.vn_cnt):
                    vernaux = elf.vernaux.read(image, aux)
                    names[vernaux.vna_other] = self.strings.get("vna_name", vernaux.vna_name)
        if "DT_VERDEF" in tags:
            start = image.offset("DT_VERDEF", tags["DT_VERDEF"], elf.verdef.size)
            for at in _chain(image, elf.verdef, "vd_next", start, tags.get("DT_VERDEFNUM", 0)):
                verdef = elf.verdef.read(image, at)
                if verdef.vd_cnt:
                    verdaux = elf.verdaux.read(image, at + verdef.vd_aux)
                    names.setdefault(verdef.vd_ndx, self.strings.get("vda_name", verdaux.vda_name))
        return names


def _chain(image: _Image, structure: Structure, next_field: str, start: int, count: int) -> Iterator[int]:
    """File offsets of a linked list of version entries (Elf_Verneed, ...):
    ``count`` entries (DT_VERNEEDNUM, DT_VERDEFNUM, vn_cnt) from ``start``,
    each ``<next_field>`` bytes after the one before, 0 ending the list early.
    Each entry must lie in the file and after the previous one, so a huge
    count or a looping chain stops at the end of the file."""
    next_index = structure.index[next_field]
    at = start
    for _ in range(count):
        entry = image.unpack(structure, at)
        yield at
        step = entry[next_index]
        if step == 0:
            return
        if step < structure.size:
            raise image.damaged(f"{structure.name} at {at:#x}: {next_field} {step} overlaps the entry")
        at += step


def _build_id(image: _Image, notes: List[Segment]) -> Optional[bytes]:
    """The NT_GNU_BUILD_ID descriptor of the first PT_NOTE that has one."""
    nhdr = image.elf.nhdr
    for note in notes:
        at, stop = note.p_offset, note.p_offset + note.p_filesz
        while at + nhdr.size <= stop:
            n_namesz, n_descsz, n_type = image.unpack(nhdr, at)
            name_at = at + nhdr.size
            desc_at = name_at + _align_note(n_namesz)
            next_at = desc_at + _align_note(n_descsz)
            if desc_at + n_descsz > stop:
                raise image.damaged(f"note at {at:#x} runs past the end of its PT_NOTE segment")
            if n_type == NT_GNU_BUILD_ID and image.data[name_at:name_at + n_namesz] == b"GNU\0":
                return bytes(image.data[desc_at:desc_at + n_descsz])
            at = next_at
    return None


def _align_note(size: int) -> int:
    return (size + NOTE_ALIGN - 1) & ~(NOTE_ALIGN - 1)
