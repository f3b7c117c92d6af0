"""What a loaded object imports, read once for every reader.

The patcher, patch_all's policy, the TLS companions and the dlopen hooks all
ask which blocking (and hand-over, and dlopen) calls an object imports;
read_object reads each loaded file once for all of them.  Uses elf.py,
loaded.py and the list of green functions.
"""
from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from typing import FrozenSet, Iterable, Optional, Set, Tuple

from greenify import functions
from greenify.errors import WrongMachineError
from greenify.patching import elf
from greenify.patching.loaded import LoadedObject


@lru_cache(maxsize=None)
def _host() -> Tuple[str, int]:
    """(e_machine, ELF class) of this process, from its own executable."""
    e_machine, elf_class, _e_type = elf.read_identity("/proc/self/exe")
    return e_machine, elf_class


def read_target_file(path: str, symbols: Optional[Iterable[str]] = None) -> elf.ElfImports:
    """Read and check an ELF file: it must be for this machine and class."""
    e_machine, elf_class, _e_type = elf.read_identity(path)
    host_machine, host_class = _host()
    if (e_machine, elf_class) != (host_machine, host_class):
        raise WrongMachineError(
            f"{path}: ELF{elf_class} {e_machine}, but this process is ELF{host_class} {host_machine}", path)
    return elf.read_blocking_imports(path, symbols)


@lru_cache(maxsize=None)
def planned_symbols(twins: Optional[FrozenSet[str]] = None) -> FrozenSet[str]:
    """The symbols _plan reads: every blocking one, and every one with a twin."""
    return elf.BLOCKING_SYMBOLS | (frozenset(functions.twins()) if twins is None else twins)


# Symbols other readers of loaded objects ask for (the TLS hand-over imports,
# greenify.patching.companions; the dlopen hooks, greenify.patching.onload),
# registered as they are imported.
_also_read: Set[str] = set()


def also_read(symbols: Iterable[str]) -> None:
    """Have every read of a loaded object find ``symbols`` too."""
    _also_read.update(symbols)


def _shared_symbols() -> FrozenSet[str]:
    # Every symbol some reader of a loaded object asks for: the patcher's, the
    # TLS twins' and those registered with also_read().  One walk of the
    # relocations finds them all: its cost hardly depends on how many names
    # are wanted.
    return planned_symbols() | frozenset(functions.tls_twins()) | frozenset(_also_read)


@lru_cache(maxsize=2048)
def _read_object(path: str, build_id: Optional[bytes], identity: Tuple[int, int, int],
                 shared: FrozenSet[str]) -> elf.ElfImports:
    return read_target_file(path, shared)


def read_object(obj: LoadedObject, symbols: Optional[FrozenSet[str]] = None) -> elf.ElfImports:
    """``read_target_file(obj.path, symbols)`` (default: what _plan reads),
    the file read once for every reader: keyed by the loaded build-id and the
    file's inode, size and mtime, so a file replaced on disk is read again
    (and then fails check_object).  patch_all() looks at every loaded object,
    and patch_on_load's hooks read each one too; this reads each once."""
    symbols = planned_symbols() if symbols is None else symbols
    try:
        info = os.stat(obj.path)
    except OSError:
        return read_target_file(obj.path, symbols)  # says why, naming the file
    shared = _shared_symbols()
    if not symbols <= shared:
        return read_target_file(obj.path, symbols)
    imports = _read_object(obj.path, obj.build_id, (info.st_ino, info.st_size, info.st_mtime_ns), shared)
    return dataclasses.replace(imports, imports=tuple(imp for imp in imports.imports if imp.symbol in symbols),
                               self_defined=tuple(imp for imp in imports.self_defined if imp.symbol in symbols))
