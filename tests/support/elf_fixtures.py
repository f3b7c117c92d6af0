"""ELF files for other machines, for the reader's static tests in the ordinary
suite: fixtures/fx_cross.c built for aarch64 with the cross compiler
(Debian: gcc-aarch64-linux-gnu) and for 32-bit x86 with ``cc -m32``.

Neither needs the target's C library headers: the fixture declares what it
calls.  Where the target's libc.so.6 is installed (libc6-arm64-cross comes
with the cross compiler), the library links against it and its imports carry
glibc's versions.  A missing compiler skips, or fails under
GREENIFY_REQUIRE_SERVERS=1 (servers.missing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE
from elftools.elf.relocation import RelocationSection

from tests.support.fixturelib import FIXTURES
from greenify.patching import elf
from tests.support.servers import missing, servers_required


@dataclass(frozen=True)
class CrossMachine:
    compiler: str             # program name, looked up on PATH
    flags: Tuple[str, ...]
    e_machine: str
    elf_class: int
    glibc_version: Optional[str]  # of every import, when linked against the target's libc.so.6
    debian_package: str


CROSS_MACHINES: Dict[str, CrossMachine] = {
    "aarch64": CrossMachine("aarch64-linux-gnu-gcc", (), "EM_AARCH64", 64, "GLIBC_2.17", "gcc-aarch64-linux-gnu"),
    "i386": CrossMachine("cc", ("-m32",), "EM_386", 32, None, "gcc (with binutils' elf_i386 linker)"),
}

# Link-time choices that decide the relocation types, as in fixturelib.VARIANTS
CROSS_VARIANTS: Dict[str, Tuple[str, ...]] = {
    "default": ("-O1", "-Wl,-z,lazy"),
    "noplt": ("-O1", "-fno-plt"),
    "relro": ("-O1", "-Wl,-z,relro,-z,now"),
}
CROSS_SYMBOLS = {"connect", "send", "poll", "recv", "__recv_chk"}


def cross_compiler(machine: str) -> str:
    """The compiler for ``machine``, or skip (fail under CI) naming the package."""
    target = CROSS_MACHINES[machine]
    found = shutil.which(target.compiler)
    if found is None:
        missing(f"no {target.compiler} to build the {machine} ELF fixtures: apt install {target.debian_package}")
    return found


def target_libc(machine: str) -> Optional[str]:
    """The target's libc.so.6, if the compiler finds one."""
    target = CROSS_MACHINES[machine]
    result = subprocess.run([cross_compiler(machine), *target.flags, "-print-file-name=libc.so.6"],
                            capture_output=True, text=True)
    path = result.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def build_cross_library(machine: str, variant: str, folder: Path, name: Optional[str] = None) -> Path:
    """fixtures/fx_cross.c as a shared library for ``machine``, built the
    ``variant`` way, in ``folder``."""
    target = CROSS_MACHINES[machine]
    output = folder / (name or f"libfxcross_{machine}_{variant}.so")
    libc = target_libc(machine)
    command = [cross_compiler(machine), *target.flags, "-shared", "-fPIC", "-nostdlib", "-Wl,--build-id=sha1",
               f"-Wl,-soname,{output.name}", *CROSS_VARIANTS[variant], "-o", str(output),
               str(FIXTURES / "fx_cross.c"), *([libc] if libc else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"building the {machine} fixture failed: {' '.join(command)}\n{result.stderr}", pytrace=False)
    return output


class CrossLibraries:
    """fx_cross built for each machine and variant on first use, once per
    session: ``libs[machine][variant]`` skips (fails under CI) without the
    machine's compiler; ``libs.optional(machine, variant)`` gives None then,
    for a test that also has other files to work on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.built: Dict[str, Dict[str, Path]] = {}

    def __getitem__(self, machine: str) -> Dict[str, Path]:
        if machine not in self.built:
            self.built[machine] = {variant: build_cross_library(machine, variant, self.folder)
                                   for variant in CROSS_VARIANTS}
        return self.built[machine]

    def optional(self, machine: str, variant: str) -> Optional[Path]:
        if shutil.which(CROSS_MACHINES[machine].compiler) is None and not servers_required():
            return None
        return self[machine][variant]


@pytest.fixture(scope="session")
def cross_libs(tmp_path_factory: pytest.TempPathFactory) -> CrossLibraries:
    """fx_cross for other machines (see CrossLibraries)."""
    return CrossLibraries(tmp_path_factory.mktemp("cross-libs"))


def section_scan(path: Path, wanted=elf.BLOCKING_SYMBOLS) -> Set[Tuple[str, str, int]]:
    """(symbol, relocation type, r_offset) of the undefined blocking imports,
    found the slow, section-based way with pyelftools, to compare with the
    reader's dynamic-segment answer."""
    found = set()
    with open(path, "rb") as file:
        elffile = ELFFile(file)
        kinds = elf.RELOCATION_TYPES[ENUM_E_MACHINE[elffile["e_machine"]]]
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


def dynamic_symbol_value(path: Path, name: str) -> int:
    """st_value of a symbol the library defines (from .dynsym)."""
    with open(path, "rb") as file:
        (symbol,) = ELFFile(file).get_section_by_name(".dynsym").get_symbol_by_name(name)
        return symbol["st_value"]
