"""The suite's protection guard (tests/protections.py) itself: a protection
change made by a slot write inside the dlopen hook, where greenify logs the
failure and goes on, is still charged to the test during which it happened."""
from __future__ import annotations

import ctypes
import mmap
import os

import pytest

import greenify
import protections
from fixturelib import build_library, maps_lines_of
from greenify import patcher

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def first_page(path) -> int:
    """The start of the first (read-only, ELF header) mapping of ``path``."""
    line = maps_lines_of(path)[0]
    assert line.split()[1] == "r--p", line
    return int(line.split("-")[0], 16)


def test_a_protection_change_made_inside_the_dlopen_hook_fails_the_test(tmp_path, monkeypatch):
    path = build_library("fx_client", "default", tmp_path, name="libfxguarded.so")
    guarded_write = patcher.write_slots
    real_write = guarded_write.__wrapped__
    changed, undo = [], []

    def write_then_change_a_protection(changes):
        # the fault injected: a write that leaves a page of the new library writable
        writes, error = real_write(changes)
        if not changed and maps_lines_of(path):
            changed.append(first_page(path))
            assert libc.mprotect(changed[0], mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) == 0
            # the guard's failure leaves these slots unrecorded: put back at the end
            undo.extend((change[0], entry.previous, change[1]) for change, entry in zip(changes, writes))
        return writes, error

    registration = greenify.patch_on_load("libfxguarded")
    monkeypatch.setattr(patcher, "write_slots", protections.guarded("patcher.write_slots",
                                                                    write_then_change_a_protection))
    try:
        library = ctypes.CDLL(str(path))  # the hook patches it, and the guard's check fails inside
    finally:
        monkeypatch.setattr(patcher, "write_slots", guarded_write)
        if changed:
            libc.mprotect(changed[0], mmap.PAGESIZE, mmap.PROT_READ)
        registration.cancel()
        greenify.cancel_patch_on_load()
        if undo:  # other tests check that no fixture library stays patched
            assert real_write(undo)[1] is None
    assert changed, "the hook wrote no slot of the new library"
    failures = protections.take_failures()  # charged to this test: taken, so that it passes
    assert len(failures) == 1, failures
    assert "changed page protections" in failures[0] and os.path.realpath(path) in failures[0]
    assert "r--p -> rw-p" in failures[0]
    del library
