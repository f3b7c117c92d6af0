"""A suite-wide guard (a pytest plugin): every GOT write greenify makes, to
patch or to unpatch, must leave page protections exactly as they were.

Around slots.write_slots, the one function through which greenify writes
slots (patching, unpatching, hooking dlopen for patch_on_load), it reads
/proc/self/maps and checks that every file-backed mapping that existed
before keeps its protection, and that no mapping is writable and executable
at once.  A failure fails the test that caused it, even when the write ran
inside the dlopen hook, whose errors are otherwise only logged."""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import pytest


def file_mappings() -> Dict[Tuple[int, int], Tuple[str, str]]:
    mappings = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                start, end = (int(part, 16) for part in fields[0].split("-"))
                mappings[(start, end)] = (fields[1], fields[5])
    return mappings


def check_unchanged(before, after, step: str) -> None:
    for (start, end), (perms, path) in after.items():
        assert not ("w" in perms and "x" in perms), f"{step} left {path} {start:#x}-{end:#x} {perms}"
    # compare by address: a protection changed on part of a mapping splits it
    changed = [f"{path} {start:#x}-{end:#x}: {perms} -> {after_perms} at {after_start:#x}-{after_end:#x}"
               for (start, end), (perms, path) in before.items()
               for (after_start, after_end), (after_perms, after_path) in after.items()
               if after_start < end and start < after_end and after_path == path and after_perms != perms]
    assert not changed, f"{step} changed page protections: {changed}"


# What the guard found, kept until the test ends: a write inside the dlopen
# hook runs under the hook's error handler, which only logs.
failures: List[str] = []


def guarded(step: str, write):
    @functools.wraps(write)
    def wrapper(*args, **kwargs):
        before = file_mappings()
        try:
            return write(*args, **kwargs)
        finally:
            try:
                check_unchanged(before, file_mappings(), step)
            except AssertionError as exc:
                failures.append(str(exc))
                raise
    return wrapper


@pytest.fixture(autouse=True)
def no_protection_changed_during_the_test():
    """Fail the test that made a write change protections, wherever it ran."""
    failures.clear()
    yield
    assert not failures, failures


@pytest.fixture(autouse=True, scope="session")
def page_protections_restored_after_every_write():
    from greenify.patching import slots
    saved = {"write_slots": slots.write_slots}
    for name, write in saved.items():
        setattr(slots, name, guarded(f"slots.{name}", write))
    yield
    for name, write in saved.items():
        setattr(slots, name, write)
