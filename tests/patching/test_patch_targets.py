"""What a target may be: a path, a file name, a soname, a stem, an extension module."""
from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import List

import gevent
import pytest

import greenify
from tests.support.fixturelib import build_extension_module, build_library, slot_value
from greenify.patching import loaded
from greenify.patching import patcher


@pytest.fixture(autouse=True)
def active() -> None:
    greenify.greenify()


def patched_paths(report: greenify.PatchReport) -> List[str]:
    return sorted(obj.path for obj in report.objects if obj)


def test_file_name_matches_the_loaded_library(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxbyname.so")
    ctypes.CDLL(str(path))
    with greenify.patched("libfxbyname.so") as report:
        assert patched_paths(report) == [str(path)]


def test_soname_matches_a_library_loaded_under_another_file_name(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxfile.so",
                         extra=["-Wl,-soname,libfxsoname.so.3"])
    ctypes.CDLL(str(path))
    with greenify.patched("libfxsoname.so.3") as report:
        assert patched_paths(report) == [str(path)]


def test_stem_matches_plain_and_auditwheel_mangled_names(tmp_path):
    mangled = build_library("fx_client", "default", tmp_path, name="libfxstem-a17e3caa.so.5.17")
    other = build_library("fx_client", "default", tmp_path, name="libfxstemmore.so.1")
    ctypes.CDLL(str(mangled))
    ctypes.CDLL(str(other))
    with greenify.patched("libfxstem") as report:
        assert patched_paths(report) == [str(mangled)]
    with greenify.patched("libfxstemmore") as report:
        assert patched_paths(report) == [str(other)]


def test_a_name_patches_every_loaded_match(tmp_path):
    paths = []
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        paths.append(build_library("fx_client", "relro", tmp_path / folder, name="libfxtwice.so"))
        ctypes.CDLL(str(paths[-1]))
    with greenify.patched("libfxtwice.so") as report:
        assert patched_paths(report) == sorted(map(str, paths))
        assert len(report.patched_slots) == 2 * len(report.objects[0].patched)
    assert greenify.unpatch_library("libfxtwice.so") == 0


def test_symlinked_path_matches_the_loaded_file(tmp_path):
    path = build_library("fx_client", "default", tmp_path, name="libfxlinked.so.1.0")
    link = tmp_path / "libfxlinked.so.1"
    link.symlink_to(path.name)
    ctypes.CDLL(str(link))
    with greenify.patched(str(path)) as report:
        assert {"connect", "send", "poll", "recv"} <= {slot.symbol for slot in report.patched_slots}


def test_extension_module_follows_dt_needed_down_to_its_library(tmp_path, slow_server):
    module = build_extension_module(tmp_path)
    with greenify.patched(module) as report:
        paths = [obj.path for obj in report.objects]
        # the loader reuses a libfxmod.so that an earlier test loaded from its own folder
        library = next(path for path in paths if Path(path).name == "libfxmod.so")
        assert module.__file__ in paths
        assert patched_paths(report) == [library]  # the module itself calls no blocking function
        lines = repr(report).splitlines()  # an object with nothing under it says why
        row = next(i for i, line in enumerate(lines) if line.startswith(f"  {module.__file__} "))
        assert lines[row + 1] == "    nothing to patch: it imports no blocking call itself"
        assert any(Path(path).name.startswith("libc.so") and "libc" in reason
                   for path, reason in report.skipped_objects)
        assert not any("_green" in path or "libpython" in path for path in paths)

        start = time.perf_counter()
        calls = [gevent.spawn(module.request, slow_server) for _ in range(10)]
        gevent.joinall(calls, raise_error=True)
        assert [call.value for call in calls] == [b"pong:ping"] * 10
        assert time.perf_counter() - start < 1.5
    for slot in report.patched_slots:
        assert slot_value(slot.slot_address) == slot.previous


def test_extension_module_dependencies_are_found_and_protected_ones_left_out(tmp_path):
    module = build_extension_module(tmp_path)
    objects, left_out = loaded.module_objects(module)
    assert [obj.name for obj in objects] == [Path(module.__file__).name, "libfxmod.so"]
    assert {obj.name.split(".so")[0] for obj, _reason in left_out} == {"libc"}


def test_green_twins_are_discovered_by_name():
    twins = patcher.green_twins()
    expected = {"connect", "accept", "accept4", "recv", "recvfrom", "recvmsg", "send", "sendto", "sendmsg", "read",
                "write", "readv", "writev", "poll", "ppoll", "select", "pselect", "__read_chk", "__recv_chk",
                "__recvfrom_chk", "__poll_chk", "__ppoll_chk"}
    assert expected <= set(twins)
    assert not {"set_active", "is_active", "set_finalizing"} & set(twins)


def test_the_dotted_name_of_an_imported_module_names_what_the_module_does(tmp_path):
    """patch_library("MySQLdb._mysql") as patch_library(MySQLdb._mysql): the
    target's one resolution (greenify.patching.loaded.find_loaded) takes the
    dotted name of an imported extension module."""
    import sys

    module = build_extension_module(tmp_path, library="fxdotted")
    sys.modules["fx_dotted.ext"] = module
    try:
        by_module = [obj.path for obj in loaded.find_loaded(module)]
        assert [obj.path for obj in loaded.find_loaded("fx_dotted.ext")] == by_module
        with greenify.patched("fx_dotted.ext") as report:
            assert any(Path(path).name == "libfxdotted.so" for path in patched_paths(report))
    finally:
        del sys.modules["fx_dotted.ext"]
