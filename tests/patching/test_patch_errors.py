"""Bad input: every refusal raises a GreenifyError subclass naming the
target, and writes nothing."""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
import sys
from typing import Dict, Iterator

import pytest

import greenify
from tests.support.fixturelib import build_library, slot_value
from tests.support.patch_support import imports_matching_the_loaded_object, recorded_slots
from tests.support.servers import missing
from greenify.patching import elf
from greenify.patching import loaded
from greenify.patching import patcher
from greenify.errors import (BuildIdMismatchError, NotElfError, NotLoadedError, ProtectedTargetError,
                             SlotOutsideSegmentsError, StaticExecutableError, TargetNotFoundError, UnknownFunctionError,
                             WrongMachineError)


def all_slots() -> Dict[int, int]:
    """slot address -> value, for every blocking import of every loaded fixture library."""
    values = {}
    for obj in loaded.loaded_objects():
        if obj.name.startswith("libfx"):
            imports = imports_matching_the_loaded_object(obj)
            if imports is None:
                continue  # a file a test replaced on purpose: its offsets mean nothing here
            for imp in imports.imports:
                if obj.holds_slot(obj.base + imp.r_offset, 8):
                    values[obj.base + imp.r_offset] = slot_value(obj.base + imp.r_offset)
    return values


@pytest.fixture
def nothing_written(fixture_libs) -> Iterator[None]:
    """Load every fixture library; fail if the test changed any slot or record."""
    for libs in fixture_libs.values():
        for path in libs.values():
            ctypes.CDLL(str(path))
    slots, records = all_slots(), recorded_slots()
    yield
    after = all_slots()
    assert {address: after[address] for address in slots} == slots
    # libraries the test loaded itself: no slot may point at a twin either
    assert not set(after.values()) & set(patcher.green_twins().values())
    assert recorded_slots() == records


def refused(target, error: type, *words: str) -> None:
    """patch_library raises ``error`` naming the target; patch_lib says False."""
    with pytest.raises(error) as caught:
        greenify.patch_library(target)
    described = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    for word in (described, *words):
        assert word in str(caught.value), (word, str(caught.value))
    if isinstance(target, str):
        assert greenify.patch_lib(target) is False


def test_missing_path(nothing_written, tmp_path):
    refused(str(tmp_path / "libmissing.so"), TargetNotFoundError, "no such file")


def test_directory(nothing_written, tmp_path):
    refused(str(tmp_path), TargetNotFoundError, "directory")


def test_file_that_is_not_elf(nothing_written, tmp_path):
    text = tmp_path / "libtext.so"
    text.write_text("not a library\n")
    refused(str(text), NotElfError, "not an ELF")


def test_elf_for_another_machine(nothing_written, fixture_libs, tmp_path):
    # e_machine of the other one of x86-64 (62) and aarch64 (183)
    native, other, other_number = (("EM_AARCH64", "EM_X86_64", 62) if platform.machine() == "aarch64"
                                   else ("EM_X86_64", "EM_AARCH64", 183))
    foreign = tmp_path / "libforeign.so"
    shutil.copy(fixture_libs["default"]["fx_client"], foreign)
    with open(foreign, "r+b") as file:
        file.seek(18)  # e_machine
        file.write(struct.pack("<H", other_number))
    refused(str(foreign), WrongMachineError, other, native)


def test_elf_of_another_class(nothing_written, tmp_path):
    elf32 = tmp_path / "lib32.so"
    ident = b"\x7fELF\x01\x01\x01" + b"\0" * 9
    # Elf32_Ehdr of an i386 shared object with no program or section headers
    elf32.write_bytes(ident + struct.pack("<HHIIIIIHHHHHH", 3, 3, 1, 0, 0, 0, 0, 52, 32, 0, 40, 0, 0))
    refused(str(elf32), WrongMachineError, "ELF32")


def test_static_executable(nothing_written, tmp_path):
    source = tmp_path / "main.c"
    source.write_text("int main(void) { return 0; }\n")
    static = tmp_path / "static-main"
    if subprocess.run(["cc", "-static", "-o", str(static), str(source)], capture_output=True).returncode != 0:
        missing("no static libc (libc.a) to link a static executable: apt-get install libc6-dev")
    refused(str(static), StaticExecutableError, "static")


def test_library_not_loaded_by_path(nothing_written, tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxnever.so")
    refused(str(path), NotLoadedError, "not loaded", "import")


def test_library_not_loaded_by_name_names_similar_ones(nothing_written):
    refused("libfx_client_defaul", NotLoadedError, "not loaded", "import", "libfx_client_default.so")
    refused("libgreenify-nowhere.so.9", NotLoadedError, "not loaded")


def test_module_without_a_shared_library(nothing_written):
    refused(sys, TargetNotFoundError, "sys")


# the loader this process runs under: ld-linux-x86-64.so.2, ld-linux-aarch64.so.1, ...
LOADER = next(obj.name for obj in loaded.loaded_objects() if obj.name.startswith("ld-"))


@pytest.mark.parametrize("target", ["libc.so.6", "libc", LOADER])
def test_libc_and_the_loader_are_never_patched(nothing_written, target):
    if not loaded.match_name(target):
        missing(f"{target} is not loaded under that name here")
    refused(target, ProtectedTargetError, "never patches")


def test_libpython_and_greenify_itself_are_never_patched(nothing_written):
    from greenify import _green

    refused(_green.__file__, ProtectedTargetError, "never patches", "_green")
    libpython = [obj.path for obj in loaded.loaded_objects() if obj.name.startswith("libpython")]
    for path in libpython:
        refused(path, ProtectedTargetError, "libpython")
    refused(os.path.realpath(sys.executable), ProtectedTargetError, "main program")


def test_replaced_file_with_another_build_id_is_refused(nothing_written, tmp_path):
    path = build_library("fx_client", "relro", tmp_path, name="libfxrebuilt.so")
    ctypes.CDLL(str(path))
    rebuilt = build_library("fx_client", "relro", tmp_path, name="rebuilt.so",
                            extra=["-Wl,--build-id=0x" + "ab" * 20])
    os.replace(rebuilt, path)  # what a package upgrade does under a running process
    refused(str(path), BuildIdMismatchError, "build-id", "ab" * 20)
    refused("libfxrebuilt.so", BuildIdMismatchError, "build-id")
    (library,) = [library for library in greenify.report().libraries if library.path == str(path)]
    assert "build-id" in library.error and not library.imports  # report() applies the patcher's own check


def test_same_build_id_but_another_layout_is_refused(nothing_written, tmp_path):
    same_id = "-Wl,--build-id=0x" + "cd" * 20
    path = build_library("fx_client", "default", tmp_path, name="libfxlayout.so", extra=[same_id])
    ctypes.CDLL(str(path))
    other = build_library("fx_client", "default", tmp_path, name="other.so", extra=[same_id, "-O0", "-g0"])
    os.replace(other, path)
    refused(str(path), BuildIdMismatchError, "PT_LOAD")
    (library,) = [library for library in greenify.report().libraries if library.path == str(path)]
    assert "PT_LOAD" in library.error


def test_relocation_naming_a_slot_outside_the_object_is_refused(nothing_written, tmp_path):
    path = build_library("fx_client", "noplt", tmp_path, name="libfxcrafted.so")
    ctypes.CDLL(str(path))
    data = bytearray(path.read_bytes())
    recv = next(imp for imp in elf.read_blocking_imports(path).imports if imp.symbol == "recv")
    # the Elf64_Rela of recv: r_offset, then r_info whose type is GLOB_DAT
    glob_dat = {"R_X86_64_GLOB_DAT": 6, "R_AARCH64_GLOB_DAT": 1025}[recv.relocation_type]
    at = 0
    while True:
        at = data.index(struct.pack("<Q", recv.r_offset), at + 1)
        if struct.unpack_from("<Q", data, at + 8)[0] & 0xFFFFFFFF == glob_dat:
            break
    struct.pack_into("<Q", data, at, 0x10_0000_0000)  # far outside the library's segments
    crafted = tmp_path / "crafted.so"
    crafted.write_bytes(bytes(data))
    os.replace(crafted, path)  # same build-id, same layout: only the relocation lies
    refused(str(path), SlotOutsideSegmentsError, "outside")


def test_unpatch_refuses_the_same_bad_input(nothing_written, tmp_path):
    with pytest.raises(TargetNotFoundError, match="libgone.so"):
        greenify.unpatch_library(str(tmp_path / "libgone.so"))
    with pytest.raises(NotLoadedError, match="libgreenify-nowhere"):
        greenify.unpatch_library("libgreenify-nowhere")


@pytest.mark.parametrize("target", [None, 42, ["libfx_client_default.so"]])
def test_a_target_of_another_type_is_named_in_a_type_error(nothing_written, target):
    with pytest.raises(TypeError, match=f"patch_library\\(\\) takes a path.*not {type(target).__name__}"):
        greenify.patch_library(target)
    with pytest.raises(TypeError, match="unpatch_library"):
        greenify.unpatch_library(target)
    with pytest.raises(ValueError, match="empty target"):
        greenify.patch_library("")


def test_a_bytes_path_or_name_works_as_douban_greenify_callers_pass_it(fixture_libs):
    path = fixture_libs["noplt"]["fx_client"]
    ctypes.CDLL(str(path))
    with greenify.patched(os.fsencode(path)) as report:
        assert report.target == str(path) and {"recv", "send"} <= {slot.symbol for slot in report.patched_slots}
        assert greenify.patch_library(os.fsencode(path.name)).objects[0].already_patched == report.patched_slots
    assert greenify.patch_lib(os.fsencode(path)) is True
    assert greenify.unpatch_library(os.fsencode(path)) == len(report.patched_slots)


def test_a_pure_python_module_is_not_a_c_extension(nothing_written):
    refused(os, NotElfError, "module os is not a C extension module", os.__file__, "MySQLdb._mysql")


def test_unknown_function_names_are_listed_with_the_known_ones(nothing_written, fixture_libs):
    path = str(fixture_libs["default"]["fx_client"])
    with pytest.raises(UnknownFunctionError) as caught:
        greenify.patch_library(path, functions=["recv", "nonexistent", "strlen"])
    message = str(caught.value)
    assert "'nonexistent', 'strlen'" in message and "recv" not in message.split(";")[0]
    assert "greenify has twins for: " in message and "poll" in message.split(";")[1]
    assert isinstance(caught.value, ValueError) and caught.value.unknown == ("nonexistent", "strlen")
    with pytest.raises(UnknownFunctionError, match="nonexistent"):
        greenify.patch_on_load("libfx_never_loaded", functions=["nonexistent"])


def test_functions_must_be_names(nothing_written, fixture_libs):
    path = str(fixture_libs["default"]["fx_client"])
    with pytest.raises(TypeError, match="functions: names of C functions \\(str\\), not NoneType None"):
        greenify.patch_library(path, functions=[None])
    with pytest.raises(TypeError, match="not bytes b'recv'"):
        greenify.patch_library(path, functions=[b"recv"])


def test_functions_given_as_one_string_is_one_name(fixture_libs):
    path = fixture_libs["relro"]["fx_client"]
    ctypes.CDLL(str(path))
    with greenify.patched(str(path), functions="recv") as report:
        assert [slot.symbol for slot in report.patched_slots] == ["recv"]


def test_a_write_refused_in_one_object_puts_back_what_the_call_wrote_in_the_others(monkeypatch, tmp_path):
    """patch_library writes all the objects its target names with one call
    (slots.write_slots, one group per object); when the system refuses the
    writes of one, the call raises and leaves no slot of the others written.
    The target: one name, two copies of a library loaded from two folders."""
    from greenify.errors import SlotWriteError
    from greenify.patching import slots

    name = "libfxtwo_refused.so"
    libraries = []
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        libraries.append(ctypes.CDLL(str(build_library("fx_client", "default", folder, name=name))))
    objects = [obj for obj in loaded.loaded_objects() if obj.name == name]
    assert len(objects) == 2, objects
    records = recorded_slots()
    before = {obj.path: [slot_value(obj.base + imp.r_offset) for imp in imports_matching_the_loaded_object(obj).imports]
              for obj in objects}
    real = slots.write_slots
    refused = []

    def refuse_the_last_object(groups):
        if refused:  # once: the putting back goes through
            return real(groups)
        refused.append(len(groups))
        return real(groups[:-1]) + [(None, "refused by the test")]

    monkeypatch.setattr(slots, "write_slots", refuse_the_last_object)
    with pytest.raises(SlotWriteError, match="refused by the test"):
        greenify.patch_library(name)
    assert refused == [2]
    assert recorded_slots() == records
    assert {obj.path: [slot_value(obj.base + imp.r_offset) for imp in imports_matching_the_loaded_object(obj).imports]
            for obj in objects} == before
    monkeypatch.setattr(slots, "write_slots", real)
    with greenify.patched(name) as report:  # and without the refusal, both are written
        assert len([obj for obj in report.objects if obj.patched]) == 2, repr(report)
    del libraries
