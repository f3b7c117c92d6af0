"""greenify.patch_on_load(): libraries patched the moment they are loaded,
whether by ctypes, by importing an extension module or by a C library's own
dlopen; already loaded ones at once; others left alone; and the dlopen
hooks taken out again when the last registration is cancelled."""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import gevent
import pytest

import greenify
from tests.support.fixturelib import build_extension_module, build_library, compiler, maps_lines_of, slot_value
from tests.support.patch_support import hooked_slots
from greenify.patching import elf
from greenify.patching import loaded
from greenify.patching import onload
from greenify.patching import patcher
from greenify.patching import slots
from greenify._green import lib as green_lib

CONCURRENT = 10


@pytest.fixture(autouse=True)
def active():
    """greenify on; afterwards every registration cancelled and what it
    patched put back (other tests check no fixture library stays patched)."""
    greenify.greenify()
    yield
    for registration in onload.registrations():
        registration.cancel()
        for report in registration.reports:
            patcher.unpatch_report(report)
    greenify.cancel_patch_on_load()


def slots_of(path: Path) -> Dict[str, int]:
    """symbol -> slot address of the loaded ``path``'s imports that have twins."""
    (obj,) = loaded.find_loaded(str(path))
    twins = patcher.green_twins()
    imports = elf.read_blocking_imports(path, elf.BLOCKING_SYMBOLS | twins.keys()).imports
    return {imp.symbol: obj.base + imp.r_offset for imp in imports if imp.symbol in twins}


def holds_twins(path: Path) -> bool:
    twins = patcher.green_twins()
    slots = slots_of(path)
    assert slots, f"{path} imports no call with a twin"
    return all(slot_value(address) == twins[symbol] for symbol, address in slots.items())


def holds_no_twin(path: Path) -> bool:
    twins = patcher.green_twins()
    return all(slot_value(address) != twins[symbol] for symbol, address in slots_of(path).items())


def together(call: Callable[[], bytes]) -> float:
    """Run ``call`` in CONCURRENT greenlets; their wall time (each reply checked)."""
    start = time.perf_counter()
    greenlets = [gevent.spawn(call) for _ in range(CONCURRENT)]
    gevent.joinall(greenlets, raise_error=True)
    elapsed = time.perf_counter() - start
    assert [g.value for g in greenlets] == [b"pong:ping"] * CONCURRENT
    return elapsed


def requester(library: ctypes.CDLL, port: int) -> Callable[[], bytes]:
    def call() -> bytes:
        out = ctypes.create_string_buffer(64)
        got = library.fx_request(port, b"ping", out, 64)
        return out.raw[:got] if got >= 0 else b"error"
    return call


def build_loader(folder: Path) -> ctypes.CDLL:
    """fx_loader, whose RUNPATH is $ORIGIN/plugins, loaded through ctypes."""
    path = build_library("fx_loader", "default", folder, name="libfxol_loader.so",
                         extra=["-Wl,-rpath,$ORIGIN/plugins", "-Wl,--enable-new-dtags"])
    loader = ctypes.CDLL(str(path))
    loader.fx_load_error.restype = ctypes.c_char_p
    return loader


def file_mapping_perms() -> Dict[str, List[str]]:
    perms: Dict[str, List[str]] = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                perms.setdefault(fields[5], []).append(f"{fields[0]} {fields[1]}")
    return perms


def test_ctypes_load_is_patched_on_load_and_cooperative(tmp_path, slow_server):
    path = build_library("fx_client", "relro", tmp_path, name="libfxol_ctypes.so")
    registration = greenify.patch_on_load("libfxol_ctypes")
    assert not any(registration.reports)  # nothing of that name was loaded yet

    library = ctypes.CDLL(str(path))

    assert holds_twins(path)
    (report,) = [report for report in registration.reports if report]
    assert {slot.symbol for slot in report.patched_slots} == set(slots_of(path))
    assert together(requester(library, slow_server)) < 0.2 * CONCURRENT / 2


def test_a_library_an_import_loads_is_patched(tmp_path, slow_server):
    registration = greenify.patch_on_load("libfxol_module")

    module = build_extension_module(tmp_path, library="libfxol_module"[3:])

    assert holds_twins(tmp_path / "libfxol_module.so")
    assert any(report for report in registration.reports)
    assert together(lambda: module.request(slow_server)) < 0.2 * CONCURRENT / 2


def test_a_library_c_code_dlopens_is_patched_before_its_first_call(tmp_path, slow_server):
    (tmp_path / "plugins").mkdir()
    plugin = build_library("fx_client", "noplt", tmp_path / "plugins", name="libfxol_plugin.so")
    loader = build_loader(tmp_path)  # not a target: its dlopen is hooked all the same
    greenify.patch_on_load("libfxol_plugin")

    def call() -> bytes:
        out = ctypes.create_string_buffer(64)
        # A bare name, found only along the loader's own RUNPATH: the hook
        # must search as glibc would for the loader, not for greenify.
        got = loader.fx_load_and_request(b"libfxol_plugin.so", slow_server, out, 64)
        assert got >= 0, (got, loader.fx_load_error())
        return out.raw[:got]

    # fx_load_and_request calls the plugin straight after dlopen returns:
    # running together proves the slots were green before that first call.
    assert together(call) < 0.2 * CONCURRENT / 2
    assert holds_twins(plugin)


def test_a_library_loaded_in_a_plain_thread_is_patched(tmp_path, slow_server):
    (tmp_path / "plugins").mkdir()
    plugin = build_library("fx_client", "default", tmp_path / "plugins", name="libfxol_threaded.so")
    loader = build_loader(tmp_path)
    greenify.patch_on_load(str(plugin))  # a path target
    results = []

    def in_thread() -> None:  # ctypes releases the GIL around the call: the hook takes it back
        out = ctypes.create_string_buffer(64)
        got = loader.fx_load_and_request(str(plugin).encode(), slow_server, out, 64)
        results.append(out.raw[:got] if got >= 0 else got)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert results == [b"pong:ping"]  # no hub in that thread: it blocked natively, as libc would
    assert holds_twins(plugin)


def test_already_loaded_libraries_are_patched_at_once(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxol_early.so")
    ctypes.CDLL(str(path))
    assert holds_no_twin(path)

    registration = greenify.patch_on_load("libfxol_early")

    assert holds_twins(path)
    assert registration.reports[0] and registration.reports[0].target == "libfxol_early"


def test_a_load_that_matches_no_target_is_left_alone(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxol_other.so")
    registration = greenify.patch_on_load("libfxol_wanted")
    announced = green_lib.onload_announced()

    ctypes.CDLL(str(path))

    assert green_lib.onload_announced() > announced  # the load was seen...
    assert holds_no_twin(path)                        # ...and nothing written
    assert not any(registration.reports) and not registration.errors


def test_loading_an_already_loaded_library_does_not_enter_python(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxol_again.so",
                         extra=["-Wl,-soname,libfxol_again.so"])
    greenify.patch_on_load("libfxol_again")
    ctypes.CDLL(str(path))
    announced = green_lib.onload_announced()

    ctypes.CDLL(str(path))
    ctypes.CDLL("libfxol_again.so")  # its soname, already loaded: glibc's answer, no search

    assert green_lib.onload_announced() == announced


def test_cancel_puts_back_the_dlopen_slots_and_stops_patching(tmp_path):
    before = file_mapping_perms()
    registration = greenify.patch_on_load("libfxol_late")
    hooked = hooked_slots()
    assert any(path.endswith(".so") and "_ctypes" in path for path, _slot in hooked)
    assert all(slot_value(slot.slot_address) == slot.value for _path, slot in hooked)
    assert file_mapping_perms() == before  # RELRO pages went back to read-only

    registration.cancel()

    assert not registration.active and not onload.registrations()
    assert hooked_slots() == []
    assert all(slot_value(slot.slot_address) == slot.previous for _path, slot in hooked)
    assert file_mapping_perms() == before
    path = build_library("fx_client", "default", tmp_path, name="libfxol_late.so")
    ctypes.CDLL(str(path))
    assert holds_no_twin(path)


def test_several_registrations_share_the_hooks(tmp_path):
    first = greenify.patch_on_load("libfxol_one")
    second = greenify.patch_on_load("libfxol_two")
    first.cancel()
    assert hooked_slots()  # the second still needs them
    path = build_library("fx_client", "default", tmp_path, name="libfxol_two.so")
    ctypes.CDLL(str(path))
    assert holds_twins(path)
    assert any(second.reports) and not any(first.reports)


def test_protected_targets_and_bad_targets_are_refused():
    with pytest.raises(greenify.ProtectedTargetError, match="libc"):
        greenify.patch_on_load("libc")
    with pytest.raises(TypeError, match="patch_library"):
        greenify.patch_on_load(os)
    with pytest.raises(TypeError):
        greenify.patch_on_load()
    assert not onload.registrations() and hooked_slots() == []


def test_dlopen_errors_reach_the_caller_unchanged(tmp_path):
    greenify.patch_on_load("libfxol_missing")
    with pytest.raises(OSError, match="libfxol_missing.so: cannot open shared object file"):
        ctypes.CDLL("libfxol_missing.so")
    not_elf = tmp_path / "libfxol_missing.so"
    not_elf.write_text("not ELF")
    with pytest.raises(OSError, match="invalid ELF header|file too short"):
        ctypes.CDLL(str(not_elf))
    assert compiler()


def test_a_protection_change_inside_the_dlopen_hook_fails_the_test(tmp_path, monkeypatch):
    from tests.support import protections
    victim = build_library("fx_client", "default", tmp_path, name="libfxol_victim.so")
    ctypes.CDLL(str(victim))
    page = int(next(line for line in maps_lines_of(victim) if line.split()[1] == "r--p").split("-")[0], 16)
    mprotect = ctypes.CDLL(None).mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    greenify.patch_on_load("libfxol_nothing")
    write = slots.write_slots.__wrapped__  # the real write, under the suite's guard

    def write_and_open_a_page(*args, **kwargs):  # the fault to catch: a protection left changed
        result = write(*args, **kwargs)
        mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
        return result

    monkeypatch.setattr(slots, "write_slots", protections.guarded("injected", write_and_open_a_page))
    try:
        build_loader(tmp_path)  # it imports dlopen: the hook hooks it, through the injected write
        assert any(str(victim) in failure and "injected" in failure for failure in protections.failures)
    finally:
        mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)
    protections.failures.clear()  # caught: this test passes
