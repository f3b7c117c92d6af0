"""The one list of green functions (csrc/wait/green.h) and what is derived from it."""
from __future__ import annotations

import ctypes

import greenify
from greenify import functions as _functions
from greenify.patching import elf
from greenify.patching import inventory
from greenify.patching import patcher
from tests.support.green_support import green_module_path
from greenify._green import ffi, lib

ROWS = {row.name: row for row in _functions.GREEN_FUNCTIONS}


def test_every_twin_is_green_name_and_libc_exports_the_name():
    libc = ctypes.CDLL(None)
    module = ctypes.CDLL(green_module_path())
    for name, address in patcher.green_twins().items():
        assert address == ctypes.cast(getattr(module, "green_" + name), ctypes.c_void_p).value, name
        assert hasattr(libc, name), f"libc exports no {name}"


def test_a_fortified_form_has_the_family_of_its_plain_function_and_both_have_twins():
    fortified = [row for row in ROWS.values() if row.fortified_of]
    assert {row.name for row in fortified} >= {"__read_chk", "__recv_chk", "__recvfrom_chk", "__poll_chk"}
    for row in fortified:
        plain = ROWS[row.fortified_of]
        assert row.twin and plain.twin and row.family == plain.family, row


def test_statistics_name_each_plain_function_with_a_twin_once():
    names = [ffi.string(lib.green_stats_name(i)).decode() for i in range(lib.green_stats_count())]
    assert len(names) == len(set(names))
    assert set(names) == {row.name for row in ROWS.values() if row.twin and not row.fortified_of}


def test_what_the_patcher_the_elf_reader_and_the_inspector_use_comes_from_the_list():
    assert set(patcher.green_twins()) == {row.name for row in ROWS.values() if row.twin}
    assert elf.BLOCKING_CALLS == {row.name for row in ROWS.values() if row.family != "descriptor"
                                  and not row.fortified_of}
    assert {"recvmmsg", "flock", "waitpid"} <= elf.BLOCKING_CALLS - set(patcher.green_twins())
    assert inventory.SOCKET_CALLS == {row.name for row in ROWS.values()
                                      if row.family in ("socket", "resolver") and not row.fortified_of}
    assert "getnameinfo" in inventory.SOCKET_CALLS and "poll" in inventory.NETWORK_CALLS - inventory.SOCKET_CALLS


def test_control_functions_named_green_are_not_twins():
    twins = patcher.green_twins()
    assert not {"set_active", "is_active", "set_finalizing", "wait", "stats_count"} & set(twins)
    assert greenify.is_active() in (True, False)
