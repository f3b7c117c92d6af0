"""Blocking imports of an ELF shared object, read through its dynamic segment.

Everything here is found from the program headers (PT_LOAD, PT_DYNAMIC,
PT_NOTE) and the dynamic tags, never from section headers, so libraries whose
sections were stripped read the same.  pyelftools parses the ELF header, the
program headers and the dynamic tags; the large tables (relocations, symbols)
are read with ``struct`` straight from a memory map, and a symbol's name is
looked up only for relocations whose type could hold a function address.

    imports = read_blocking_imports("/usr/lib/x86_64-linux-gnu/libmariadb.so.3")
    for imp in imports.imports:
        print(imp.symbol, imp.version, imp.relocation_type, hex(imp.r_offset))
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE

from greenify import _functions
from greenify.errors import NotElfError, StaticExecutableError, TargetNotFoundError

# e_machine -> {relocation type number: name}: the relocations whose slot
# holds the plain address of an imported function, per architecture.
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
}

# libc calls that can block a thread, from the list of green functions
# (csrc/green.h).  Only those with a green twin get patched; the others are
# read so a report can say they were left alone.
BLOCKING_CALLS: FrozenSet[str] = _functions.blocking_calls()


def with_fortified_forms(names: Iterable[str]) -> FrozenSet[str]:
    """``names`` plus glibc's _FORTIFY_SOURCE forms (read -> __read_chk)."""
    names = set(names)
    return frozenset(names | {f"__{name}_chk" for name in names if not name.startswith("__")})


BLOCKING_SYMBOLS: FrozenSet[str] = with_fortified_forms(BLOCKING_CALLS)

# Dynamic tags (ELF gABI); pyelftools gives them by name.
_PT_LOAD, _PT_DYNAMIC, _PT_NOTE = "PT_LOAD", "PT_DYNAMIC", "PT_NOTE"
_DT_RELA, _DT_REL = 7, 17
_NT_GNU_BUILD_ID = 3
_SHN_UNDEF = 0
_VERSYM_HIDDEN = 0x8000

PF_X, PF_W, PF_R = 1, 2, 4


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
    """The file's bytes plus the vaddr -> file offset mapping of its PT_LOADs."""

    def __init__(self, data: "mmap.mmap | bytes", loads: Tuple[Segment, ...], path: str) -> None:
        self.data = data
        self.loads = loads
        self.path = path

    def offset(self, vaddr: int, size: int = 1) -> int:
        for seg in self.loads:
            if seg.p_vaddr <= vaddr and vaddr + size <= seg.p_vaddr + seg.p_filesz:
                return vaddr - seg.p_vaddr + seg.p_offset
        raise NotElfError(f"{self.path}: dynamic table at {vaddr:#x} lies outside the file's PT_LOAD segments",
                          self.path)

    def string(self, offset: int) -> str:
        end = self.data.find(b"\0", offset)
        if end < 0:
            raise NotElfError(f"{self.path}: unterminated string in the dynamic string table", self.path)
        return self.data[offset:end].decode("utf-8", "replace")


def read_blocking_imports(path: "str | os.PathLike[str]",
                          symbols: Optional[Iterable[str]] = None) -> ElfImports:
    """Read the ELF file at ``path``: machine, class, build-id, PT_LOAD
    segments, DT_SONAME/DT_NEEDED and every dynamic relocation that imports
    one of ``symbols`` (default: BLOCKING_SYMBOLS) into a function-address
    slot.  Raises TargetNotFoundError, NotElfError or StaticExecutableError."""
    path = os.fspath(path)
    wanted = BLOCKING_SYMBOLS if symbols is None else frozenset(symbols)
    with _open_elf(path) as file:
        try:
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _read(ELFFile(file), data, path, wanted)
        except (ELFError, struct.error, ValueError, IndexError, KeyError) as exc:
            raise NotElfError(f"{path}: damaged ELF file ({exc})", path) from None


def read_identity(path: "str | os.PathLike[str]") -> Tuple[str, int, str]:
    """(e_machine, ELF class, e_type) of the ELF file at ``path``, from its
    header alone: enough to refuse a file for another machine early."""
    path = os.fspath(path)
    with _open_elf(path) as file:
        try:
            header = ELFFile(file)
            return header["e_machine"], header.elfclass, header["e_type"]
        except (ELFError, struct.error, ValueError) as exc:
            raise NotElfError(f"{path}: damaged ELF file ({exc})", path) from None


@contextlib.contextmanager
def _open_elf(path: str) -> Iterator[BinaryIO]:
    """The file opened for reading, once it is known to be a regular file
    that starts with the ELF magic."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise TargetNotFoundError(f"{path}: no such file", path) from None
    except IsADirectoryError:
        raise TargetNotFoundError(f"{path}: is a directory, not a shared library", path) from None
    except OSError as exc:
        raise TargetNotFoundError(f"{path}: cannot open: {exc.strerror}", path) from None
    with file:
        if not os.path.isfile(path):
            raise TargetNotFoundError(f"{path}: not a regular file", path)
        if file.read(4) != b"\x7fELF":
            raise NotElfError(f"{path}: not an ELF file", path)
        file.seek(0)
        yield file


def _read(elf: ELFFile, data: mmap.mmap, path: str, wanted: FrozenSet[str]) -> ElfImports:
    e_machine: str = elf["e_machine"]
    little = elf.little_endian
    end = "<" if little else ">"
    is64 = elf.elfclass == 64

    loads: List[Segment] = []
    notes: List[Segment] = []
    dynamic = None
    for segment in elf.iter_segments():
        p_type = segment["p_type"]
        if p_type == _PT_LOAD or p_type == _PT_NOTE:
            entry = Segment(p_type, segment["p_offset"], segment["p_vaddr"], segment["p_filesz"],
                            segment["p_memsz"], segment["p_flags"])
            (loads if p_type == _PT_LOAD else notes).append(entry)
        elif p_type == _PT_DYNAMIC:
            dynamic = segment
    image = _Image(data, tuple(loads), path)
    build_id = _build_id(data, notes, end)

    if dynamic is None:
        raise StaticExecutableError(f"{path}: no PT_DYNAMIC segment (a static executable): nothing to patch", path)
    tags: Dict[str, int] = {}
    needed_offsets: List[int] = []
    for tag in dynamic.iter_tags():
        d_tag = tag.entry.d_tag
        if d_tag == "DT_NEEDED":
            needed_offsets.append(tag.entry.d_val)
        elif isinstance(d_tag, str):
            tags.setdefault(d_tag, tag.entry.d_val)

    strtab = image.offset(tags["DT_STRTAB"]) if "DT_STRTAB" in tags else None

    def dynstr(offset: int) -> str:
        if strtab is None:
            raise NotElfError(f"{path}: dynamic segment has no DT_STRTAB", path)
        return image.string(strtab + offset)

    soname = dynstr(tags["DT_SONAME"]) if "DT_SONAME" in tags else None
    needed = tuple(dynstr(offset) for offset in needed_offsets)

    reloc_types = RELOCATION_TYPES.get(ENUM_E_MACHINE.get(e_machine, -1), {})
    imports: List[BlockingImport] = []
    self_defined: List[BlockingImport] = []
    if wanted and reloc_types and "DT_SYMTAB" in tags and strtab is not None:
        symbols = _Symbols(image, tags, strtab, end, is64)
        seen: Set[int] = set()
        for r_offset, r_sym, r_type, r_addend in _relocations(image, tags, end, is64):
            type_name = reloc_types.get(r_type)
            if type_name is None or r_sym == 0 or r_offset in seen:
                continue
            name = symbols.name(r_sym)
            if name not in wanted:
                continue
            seen.add(r_offset)
            defined = symbols.is_defined(r_sym)
            entry = BlockingImport(name, symbols.version(r_sym, defined), type_name, r_offset, r_addend)
            (self_defined if defined else imports).append(entry)

    return ElfImports(path=path, e_machine=e_machine, elf_class=elf.elfclass, e_type=elf["e_type"],
                      build_id=build_id, segments=tuple(loads), soname=soname, needed=needed,
                      imports=tuple(imports), self_defined=tuple(self_defined))


def _relocations(image: _Image, tags: Dict[str, int], end: str, is64: bool) -> Iterator[Tuple[int, int, int, int]]:
    """(r_offset, r_info_sym, r_info_type, r_addend) of DT_JMPREL, DT_RELA and DT_REL."""
    tables: List[Tuple[int, int, bool]] = []  # (vaddr, size, is_rela)
    if "DT_JMPREL" in tags and tags.get("DT_PLTRELSZ"):
        tables.append((tags["DT_JMPREL"], tags["DT_PLTRELSZ"], tags.get("DT_PLTREL", _DT_RELA) == _DT_RELA))
    if "DT_RELA" in tags and tags.get("DT_RELASZ"):
        tables.append((tags["DT_RELA"], tags["DT_RELASZ"], True))
    if "DT_REL" in tags and tags.get("DT_RELSZ"):
        tables.append((tags["DT_REL"], tags["DT_RELSZ"], False))
    sym_shift, type_mask = (32, 0xFFFFFFFF) if is64 else (8, 0xFF)
    word = "Q" if is64 else "I"
    for vaddr, size, is_rela in tables:
        entry_format = end + (word + word + ("q" if is64 else "i") if is_rela else word + word)
        entry_size = struct.calcsize(entry_format)
        size -= size % entry_size
        start = image.offset(vaddr, size)
        view = memoryview(image.data)[start:start + size]
        try:
            if is_rela:
                for r_offset, r_info, r_addend in struct.iter_unpack(entry_format, view):
                    yield r_offset, r_info >> sym_shift, r_info & type_mask, r_addend
            else:
                for r_offset, r_info in struct.iter_unpack(entry_format, view):
                    yield r_offset, r_info >> sym_shift, r_info & type_mask, 0
        finally:
            view.release()


class _Symbols:
    """DT_SYMTAB entries, their names (DT_STRTAB) and versions (DT_VERSYM with
    DT_VERNEED for imports, DT_VERDEF for definitions), decoded on demand."""

    def __init__(self, image: _Image, tags: Dict[str, int], strtab: int, end: str, is64: bool) -> None:
        self.image = image
        self.tags = tags
        self.strtab = strtab
        self.end = end
        self.symtab = image.offset(tags["DT_SYMTAB"])
        self.syment = tags.get("DT_SYMENT") or (24 if is64 else 16)
        # (st_name, st_shndx) positions differ between Elf64_Sym and Elf32_Sym
        self.sym_format = end + ("IBBHQQ" if is64 else "IIIBBH")
        self.shndx_index = 3 if is64 else 5
        self._names: Dict[int, str] = {}
        self._version_names: Optional[Dict[int, str]] = None

    def _entry(self, index: int) -> Tuple[int, ...]:
        return struct.unpack_from(self.sym_format, self.image.data, self.symtab + index * self.syment)

    def name(self, index: int) -> str:
        name = self._names.get(index)
        if name is None:
            name = self._names[index] = self.image.string(self.strtab + self._entry(index)[0])
        return name

    def is_defined(self, index: int) -> bool:
        return self._entry(index)[self.shndx_index] != _SHN_UNDEF

    def version(self, index: int, defined: bool) -> Optional[str]:
        if "DT_VERSYM" not in self.tags:
            return None
        versym_at = self.image.offset(self.tags["DT_VERSYM"] + 2 * index, 2)
        (versym,) = struct.unpack_from(self.end + "H", self.image.data, versym_at)
        versym &= ~_VERSYM_HIDDEN
        if versym <= 1:  # VER_NDX_LOCAL, VER_NDX_GLOBAL: unversioned
            return None
        if self._version_names is None:
            self._version_names = self._read_versions()
        return self._version_names.get(versym)

    def _read_versions(self) -> Dict[int, str]:
        names: Dict[int, str] = {}
        data, end, string = self.image.data, self.end, self.image.string
        if "DT_VERNEED" in self.tags:
            at = self.image.offset(self.tags["DT_VERNEED"])
            for _ in range(self.tags.get("DT_VERNEEDNUM", 0)):
                _vn_version, vn_cnt, _vn_file, vn_aux, vn_next = struct.unpack_from(end + "HHIII", data, at)
                aux = at + vn_aux
                for _ in range(vn_cnt):
                    _hash, _flags, vna_other, vna_name, vna_next = struct.unpack_from(end + "IHHII", data, aux)
                    names[vna_other] = string(self.strtab + vna_name)
                    aux += vna_next
                at += vn_next
        if "DT_VERDEF" in self.tags:
            at = self.image.offset(self.tags["DT_VERDEF"])
            for _ in range(self.tags.get("DT_VERDEFNUM", 0)):
                _vd_version, _flags, vd_ndx, vd_cnt, _hash, vd_aux, vd_next = \
                    struct.unpack_from(end + "HHHHIII", data, at)
                if vd_cnt:
                    (vda_name,) = struct.unpack_from(end + "I", data, at + vd_aux)
                    names.setdefault(vd_ndx, string(self.strtab + vda_name))
                at += vd_next
        return names


def _build_id(data: "mmap.mmap | bytes", notes: List[Segment], end: str) -> Optional[bytes]:
    """The NT_GNU_BUILD_ID descriptor of the first PT_NOTE that has one."""
    for note in notes:
        at, stop = note.p_offset, note.p_offset + note.p_filesz
        while at + 12 <= stop:
            namesz, descsz, n_type = struct.unpack_from(end + "III", data, at)
            name_at = at + 12
            desc_at = name_at + _align4(namesz)
            if n_type == _NT_GNU_BUILD_ID and data[name_at:name_at + namesz] == b"GNU\0":
                return bytes(data[desc_at:desc_at + descsz])
            at = desc_at + _align4(descsz)
    return None


def _align4(size: int) -> int:
    # GNU notes pad name and descriptor to 4 bytes, also in ELF64 files
    return (size + 3) & ~3
