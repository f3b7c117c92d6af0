"""Patching real, loaded fixture libraries: slots, memory protection,
cooperation under gevent, unpatching, repeated and concurrent patching."""
from __future__ import annotations

import _ctypes
import ctypes
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import gevent
import pytest

import greenify
from tests.support.fixturelib import VARIANTS, build_library, maps_lines_of, slot_value
from tests.support.patch_support import no_slot_recorded, rewrite_slot
from greenify.patching import elf
from greenify.patching import loaded
from greenify.patching import patcher

LOADERS = {"CDLL": ctypes.CDLL, "PyDLL": ctypes.PyDLL}


@pytest.fixture(autouse=True)
def active() -> None:
    greenify.greenify()


def twin(symbol: str) -> int:
    return patcher.green_twins()[symbol]


def libc_address(symbol: str) -> int:
    return ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value


def slots_of(path: Path) -> Dict[str, int]:
    """symbol -> slot address, for every import of the loaded ``path`` that
    has a green twin (the twins grow: never hard-code their list here)."""
    (obj,) = loaded.find_loaded(str(path))
    twins = patcher.green_twins()
    imports = elf.read_blocking_imports(path, elf.BLOCKING_SYMBOLS | twins.keys()).imports
    return {imp.symbol: obj.base + imp.r_offset for imp in imports if imp.symbol in twins}


def request_all(lib: ctypes.CDLL, port: int, count: int) -> List[bytes]:
    """``count`` greenlets, each one fx_request() round trip; their replies."""
    def one() -> bytes:
        out = ctypes.create_string_buffer(64)
        got = lib.fx_request(port, b"ping", out, 64)
        return out.raw[:got] if got >= 0 else b"error"

    greenlets = [gevent.spawn(one) for _ in range(count)]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]


def load_lazily(path: Path) -> ctypes.CDLL:
    """Load ``path`` with RTLD_LAZY: ctypes itself always adds RTLD_NOW."""
    dlopen = ctypes.CDLL(None).dlopen
    dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    handle = dlopen(os.fsencode(path), os.RTLD_LAZY)
    assert handle, f"dlopen({path}) failed"
    return ctypes.CDLL(str(path), handle=handle)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patch_points_slots_at_twins_and_unpatch_restores_them(fixture_libs, variant):
    path = fixture_libs[variant]["fx_client"]
    ctypes.CDLL(str(path))
    slots = slots_of(path)
    before = {symbol: slot_value(address) for symbol, address in slots.items()}
    maps_before = maps_lines_of(path)

    report = greenify.patch_library(str(path))

    assert report and len(report.objects) == 1
    assert {slot.symbol for slot in report.patched_slots} == set(slots)
    for slot in report.patched_slots:
        assert slot.slot_address == slots[slot.symbol]
        assert slot_value(slot.slot_address) == twin(slot.symbol) == slot.value
        assert slot.previous == before[slot.symbol]
    assert maps_lines_of(path) == maps_before

    assert greenify.unpatch_library(str(path)) == len(slots)
    assert {symbol: slot_value(address) for symbol, address in slots.items()} == before
    assert maps_lines_of(path) == maps_before


@pytest.mark.parametrize("variant", ["noplt", "relro"])
def test_bound_slots_held_libc_before_patching(fixture_libs, variant):
    # with -fno-plt or -z now the loader bound every slot at load: the
    # recorded previous value must be libc's own function
    path = fixture_libs[variant]["fx_client"]
    ctypes.CDLL(str(path))
    with greenify.patched(str(path)) as report:
        previous = {slot.symbol: slot.previous for slot in report.patched_slots}
    assert {"connect", "send", "poll", "recv"} <= set(previous)
    assert previous == {symbol: libc_address(symbol) for symbol in previous}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_recv_lets_twenty_greenlets_wait_together(fixture_libs, slow_server, variant, loader):
    path = fixture_libs[variant]["fx_client"]
    lib = LOADERS[loader](str(path))
    with greenify.patched(str(path)):
        replies: List[bytes] = []
        elapsed = timed(lambda: replies.extend(request_all(lib, slow_server, 20)))
    assert replies == [b"pong:ping"] * 20
    assert elapsed < 1.5  # serially: 20 x 0.2 s = 4 s


def test_unpatched_recv_blocks_the_hub(fixture_libs, slow_server):
    lib = ctypes.CDLL(str(fixture_libs["default"]["fx_client"]))
    replies: List[bytes] = []
    elapsed = timed(lambda: replies.extend(request_all(lib, slow_server, 5)))
    assert replies == [b"pong:ping"] * 5
    assert elapsed >= 0.9  # 5 x 0.2 s, one after the other


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_select_and_read_cooperate(fixture_libs, variant):
    path = fixture_libs[variant]["fx_io"]
    lib = ctypes.CDLL(str(path))
    pairs = [socket.socketpair() for _ in range(10)]

    def reader(sock: socket.socket) -> bytes:
        out = ctypes.create_string_buffer(64)
        got = lib.fx_select_read(sock.fileno(), 3000, out, 64)
        return out.raw[:got] if got > 0 else b""

    def writer() -> None:
        gevent.sleep(0.2)  # only runs if the readers yield to the hub
        for _, peer in pairs:
            peer.send(b"data")

    try:
        with greenify.patched(str(path)) as report:
            assert {"select", "write"} <= {slot.symbol for slot in report.patched_slots}
            start = time.perf_counter()
            readers = [gevent.spawn(reader, sock) for sock, _ in pairs]
            gevent.joinall(readers + [gevent.spawn(writer)], raise_error=True)
            elapsed = time.perf_counter() - start
    finally:
        for sock, peer in pairs:
            sock.close()
            peer.close()
    assert [g.value for g in readers] == [b"data"] * 10
    assert elapsed < 1.5


def test_lazy_binding_slot_still_in_the_plt_is_patched_and_restored(tmp_path, slow_server):
    path = build_library("fx_client", "default", tmp_path, name="libfxlazy.so")
    lib = load_lazily(path)  # nothing called yet: JUMP_SLOTs point back into the PLT
    (obj,) = loaded.find_loaded(str(path))
    with greenify.patched(str(path)) as report:
        for slot in report.patched_slots:
            assert any(seg.start <= slot.previous < seg.end for seg in obj.segments), slot
            assert slot.previous != libc_address(slot.symbol)
        assert request_all(lib, slow_server, 5) == [b"pong:ping"] * 5
        restored_to = {slot.slot_address: slot.previous for slot in report.patched_slots}
    assert {address: slot_value(address) for address in restored_to} == restored_to
    # the lazy resolver still works behind the restored PLT slot
    assert request_all(lib, slow_server, 1) == [b"pong:ping"]
    assert slot_value(slots_of(path)["recv"]) == libc_address("recv")


def test_patching_twice_changes_nothing(fixture_libs):
    path = fixture_libs["relro"]["fx_io"]
    ctypes.CDLL(str(path))
    maps_before = maps_lines_of(path)
    first = greenify.patch_library(str(path))
    try:
        values = {slot.slot_address: slot_value(slot.slot_address) for slot in first.patched_slots}
        second = greenify.patch_library(str(path))
        assert second and second.objects[0].patched == []
        assert second.objects[0].already_patched == first.objects[0].patched
        assert {address: slot_value(address) for address in values} == values
        assert maps_lines_of(path) == maps_before
    finally:
        greenify.unpatch_library(str(path))
    assert greenify.unpatch_library(str(path)) == 0
    for slot in first.patched_slots:
        assert slot_value(slot.slot_address) == slot.previous


def test_functions_narrows_the_patched_symbols(fixture_libs):
    path = fixture_libs["noplt"]["fx_client"]
    ctypes.CDLL(str(path))
    with greenify.patched(str(path), functions=["recv"]) as report:
        assert [slot.symbol for slot in report.patched_slots] == ["recv"]
        skipped = {skip.symbol: skip.reason for skip in report.objects[0].skipped}
        assert skipped == {symbol: "not in functions" for symbol in slots_of(path) if symbol != "recv"}
        assert {"connect", "send", "poll"} <= set(skipped)
        assert slot_value(slots_of(path)["send"]) == libc_address("send")


def test_report_says_what_was_skipped_and_why(fixture_libs, tmp_path):
    path = fixture_libs["fortify"]["fx_io"]
    ctypes.CDLL(str(path))
    with greenify.patched(str(path)) as report:
        skipped = {skip.symbol: skip.reason for skip in report.objects[0].skipped}
        blocking = {imp.symbol for imp in elf.read_blocking_imports(path).imports}
        assert skipped == {symbol: "no green twin" for symbol in blocking - patcher.green_twins().keys()}
        assert {slot.symbol for slot in report.patched_slots} == set(slots_of(path)) >= {"__read_chk", "select"}
        text = repr(report)
        (read_chk,) = [imp for imp in elf.read_blocking_imports(path).imports if imp.symbol == "__read_chk"]
        assert str(path) in text and f"__read_chk@{read_chk.version}" in text
        if "flock" not in patcher.green_twins():
            assert "flock" in skipped and "flock" in text

    self_defining = build_library("fx_self", "default", tmp_path)
    ctypes.CDLL(str(self_defining))
    with greenify.patched(str(self_defining)) as report:
        skipped = {skip.symbol: skip.reason for skip in report.objects[0].skipped}
        assert skipped == {"readv": "defined by the object itself"}
        assert [slot.symbol for slot in report.patched_slots] == ["read"]


def test_patched_context_keeps_earlier_patches(fixture_libs):
    path = fixture_libs["default"]["fx_io"]
    ctypes.CDLL(str(path))
    outer = greenify.patch_library(str(path), functions=["select"])
    try:
        with greenify.patched(str(path)) as inner:
            assert {slot.symbol for slot in inner.objects[0].patched} == set(slots_of(path)) - {"select"}
        select_slot = outer.patched_slots[0]
        assert slot_value(select_slot.slot_address) == twin("select")
    finally:
        greenify.unpatch_library(str(path))
    assert slot_value(select_slot.slot_address) == select_slot.previous


def test_patch_from_four_threads_at_once(tmp_path):
    path = build_library("fx_client", "relro", tmp_path, name="libfxthreads.so")
    ctypes.CDLL(str(path))
    maps_before = maps_lines_of(path)
    barrier = threading.Barrier(4)
    reports: List[greenify.PatchReport] = []
    errors: List[BaseException] = []

    def patch() -> None:
        try:
            barrier.wait()
            reports.append(greenify.patch_library(str(path)))
        except BaseException as exc:  # noqa: B902 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=patch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    count = len(slots_of(path))
    assert sorted(len(report.objects[0].patched) for report in reports) == [0, 0, 0, count]
    assert all(len(report.patched_slots) == count for report in reports)
    for slot in reports[0].patched_slots:
        assert slot_value(slot.slot_address) == twin(slot.symbol)
        assert slot.previous == libc_address(slot.symbol)
    assert maps_lines_of(path) == maps_before

    restored: List[int] = []
    threads = [threading.Thread(target=lambda: restored.append(greenify.unpatch_library(str(path))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(restored) == [0, 0, 0, count]
    for slot in reports[0].patched_slots:
        assert slot_value(slot.slot_address) == libc_address(slot.symbol)
    assert maps_lines_of(path) == maps_before


def test_patch_lib_keeps_douban_greenify_spelling(fixture_libs, tmp_path):
    path = fixture_libs["noplt"]["fx_io"]
    ctypes.CDLL(str(path))
    try:
        assert greenify.patch_lib(str(path)) is True
        assert greenify.patch_lib(str(path)) is True
        assert slot_value(slots_of(path)["select"]) == twin("select")
    finally:
        greenify.unpatch_library(str(path))
    assert greenify.patch_lib(str(tmp_path / "missing.so")) is False
    assert greenify.patch_lib(str(tmp_path)) is False


def test_a_stale_record_whose_slot_no_longer_holds_the_twin_is_patched_again(tmp_path):
    # as when a library is unloaded and another is loaded at the same base:
    # the record says "patched", the slot says otherwise, and the slot wins
    path = build_library("fx_client", "relro", tmp_path, name="libfxstale.so")
    ctypes.CDLL(str(path))
    with greenify.patched(str(path)) as report:
        slot = report.objects[0].patched[0]
        rewrite_slot(slot.slot_address, slot.previous)  # libc's address, behind greenify
        again = greenify.patch_library(str(path))
        assert [s.slot_address for s in again.objects[0].patched] == [slot.slot_address]
        assert slot_value(slot.slot_address) == slot.value


def test_an_unloaded_library_leaves_no_record_and_patches_anew_when_loaded_again(tmp_path):
    path = build_library("fx_client", "relro", tmp_path, name="libfxunload.so")
    handle = _ctypes.dlopen(str(path), os.RTLD_NOW)  # the only reference: dlclose unloads it
    report = greenify.patch_library(str(path))
    assert report and not no_slot_recorded(path)

    _ctypes.dlclose(handle)

    assert not loaded.match_path(str(path)), "the fixture library stayed loaded"
    assert no_slot_recorded(path)
    with pytest.raises(greenify.NotLoadedError):  # true: nothing of it is left to put back
        greenify.unpatch_library(str(path))

    handle = _ctypes.dlopen(str(path), os.RTLD_NOW)  # often at the same base: a new object all the same
    try:
        again = greenify.patch_library(str(path))
        assert len(again.objects[0].patched) == len(report.objects[0].patched)
        assert greenify.unpatch_library(str(path)) == len(report.objects[0].patched)
        for slot in again.patched_slots:
            assert slot_value(slot.slot_address) == libc_address(slot.symbol)
        assert no_slot_recorded(path)
    finally:
        _ctypes.dlclose(handle)


def test_report_prints_what_greenify_inspect_prints(fixture_libs):
    path = fixture_libs["noplt"]["fx_client"]
    ctypes.CDLL(str(path))
    with greenify.patched(str(path)) as patch:
        text = str(greenify.report())
    lines = text.splitlines()
    assert lines[0].startswith("this process: ") and "import blocking functions" in lines[0]
    assert "    " + str(path) in lines
    row = lines.index("    " + str(path))
    assert f"{len(patch.patched_slots)} patched now" in " ".join(lines[row:row + 4])
    assert all(len(line) <= 80 for line in lines if not line.strip().startswith("/")), text
    assert "LibraryReport(" not in text
