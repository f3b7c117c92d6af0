"""Patching, unpatching and patch_on_load() from several threads at once,
while other threads call through the library and load libraries: one lock
serves every slot write, so nothing crashes, deadlocks or overlaps."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys
import textwrap

from tests.support.fixturelib import build_library
from greenify.patching import elf

PAGE = mmap.PAGESIZE
# Seconds of contention.  The code before the one lock (commit 3cac549) had
# writes overlap 4, 6 and 7 times in three runs of this length, and died with
# SIGSEGV in about one run in five.
DURATION = 8.0

RACE = textwrap.dedent("""
    import ctypes, faulthandler, json, os, socket, sys, threading, time
    faulthandler.enable()
    import greenify
    from greenify.patching import slots

    path, duration = sys.argv[1], float(sys.argv[2])
    greenify.greenify()
    library = ctypes.CDLL(path)
    name = os.path.basename(path)

    # Watch the one function that stores into slots: no two threads inside at once.
    guard = threading.Lock()
    state = {"inside": 0, "overlaps": 0}
    write_slots = slots.write_slots

    def watched(*args, **kwargs):
        with guard:
            state["inside"] += 1
            state["overlaps"] += state["inside"] > 1
        try:
            time.sleep(0.001)  # a wide window for another writer to enter
            return write_slots(*args, **kwargs)
        finally:
            with guard:
                state["inside"] -= 1

    slots.write_slots = watched
    stop = time.monotonic() + duration
    counts, errors = {}, []

    def forever(key, body):
        counts[key] = 0
        try:
            while time.monotonic() < stop:
                body()
                counts[key] += 1
        except BaseException as exc:
            errors.append(f"{key}: {exc!r}")

    def on_load():
        greenify.patch_on_load(name).cancel()

    def call():
        a, b = socket.socketpair()
        with a, b:
            got = library.fx_roundtrip(a.fileno(), b.fileno())
            assert got == 4, got
        time.sleep(0.001)  # keep the machine usable: the writers are what race

    def load():  # through the hooked dlopen slot on the shared page
        assert library.fx_load(b"libm.so.6") == 0
        time.sleep(0.001)

    bodies = {"on_load": on_load, "patch": lambda: greenify.patch_library(path),
              "unpatch": lambda: greenify.unpatch_library(path), "call-1": call, "call-2": call, "load": load}
    threads = [threading.Thread(target=forever, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    greenify.unpatch_library(path)
    print(json.dumps({"counts": counts, "errors": errors, "overlaps": state["overlaps"]}))
""")


def test_patch_unpatch_and_on_load_hooks_never_write_at_once(tmp_path):
    # The dlopen slot (hooked by patch_on_load) and the I/O slots (patched by
    # patch_library) of this library share one read-only GOT page.
    path = build_library("fx_loader_io", "relro", tmp_path, name="libfxrace.so")
    slots = {imp.symbol: imp.r_offset for imp in elf.read_blocking_imports(path, {"dlopen", "recv", "send", "poll"}).imports}
    assert {offset // PAGE for offset in slots.values()} == {slots["dlopen"] // PAGE}, slots
    process = subprocess.run([sys.executable, "-c", RACE, str(path), str(DURATION)],
                             capture_output=True, text=True, timeout=DURATION + 120)
    assert process.returncode == 0, (process.returncode, process.stderr[-4000:])
    result = json.loads(process.stdout)
    assert not result["errors"], result
    assert result["overlaps"] == 0, result
    assert all(count > 0 for count in result["counts"].values()), result


CONCURRENT_LOADS = textwrap.dedent("""
    import collections, ctypes, faulthandler, json, sys, threading, time
    faulthandler.dump_traceback_later(float(sys.argv[4]), exit=True)  # a deadlock shows every thread's stack
    import greenify
    from greenify.patching import elf
    from greenify.patching import slots

    folder, count, inner = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    greenify.greenify()
    other = f"{folder}/libfxdlother.so"
    ctypes.CDLL(other)

    # A library loaded while patch_library() reads a file, as when pyelftools
    # imports a module: its dlopen enters the hook in the thread that patches.
    pending = []  # the next library to load so
    read = elf.read_blocking_imports

    def read_and_load(path, *args, **kwargs):
        if str(path) == other and pending:
            ctypes.CDLL(f"{folder}/{pending.pop()}/libfxdl.so")
        return read(path, *args, **kwargs)

    elf.read_blocking_imports = read_and_load
    barrier = threading.Barrier(6)
    errors, registrations = [], []

    def started(body):
        def run():
            try:
                barrier.wait()
                body()
            except BaseException as exc:
                errors.append(repr(exc))
        return run

    def loads(first):  # each a library of its own, by path, through ctypes' (hooked) dlopen
        for i in range(first, count, 4):
            ctypes.CDLL(f"{folder}/{i}/libfxdl.so")

    def patching():
        while not registrations:  # loads are announced once a registration is active
            time.sleep(0.001)
        for i in range(count, count + inner):
            pending.append(i)
            greenify.patch_library(other)
            greenify.unpatch_library(other)

    def registering():  # each registration patches what is loaded, under the on-load work
        registrations.append(greenify.patch_on_load("libfxdl.so"))
        for _ in range(inner):
            registrations.append(greenify.patch_on_load("libfxdl.so"))
            registrations[-1].cancel()

    bodies = [lambda first=first: loads(first) for first in range(4)] + [patching, registering]
    threads = [threading.Thread(target=started(body)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = collections.Counter(obj.path for registration in registrations for report in registration.reports
                                  for obj in report.objects if obj.patched)
    recorded = sorted(key[0] for key in slots.written_slots(purpose=slots.TWIN) if key[0].endswith("libfxdl.so"))
    registrations[0].cancel()
    print(json.dumps({"errors": errors, "written": written, "recorded": recorded}))
""")


def test_patch_and_patch_on_load_with_concurrent_dlopens_finish(tmp_path):
    count, inner = 12, 6
    for i in range(count + inner):
        (tmp_path / str(i)).mkdir()
        build_library("fx_client", "default", tmp_path / str(i), name="libfxdl.so")
    build_library("fx_client", "default", tmp_path, name="libfxdlother.so")
    # Seconds: the work takes a few; a deadlock never ends.  The code before
    # the one lock (commit 3cac549) deadlocked here in three runs of three.
    deadline = 120
    process = subprocess.run([sys.executable, "-c", CONCURRENT_LOADS, str(tmp_path), str(count), str(inner),
                              str(deadline)], capture_output=True, text=True, timeout=deadline + 60)
    assert process.returncode == 0, (process.returncode, process.stderr[-6000:])
    result = json.loads(process.stdout)
    assert not result["errors"], result
    # loaded before a registration, after it or inside patch_library: every one patched, and written once
    libraries = sorted(str(tmp_path / str(i) / "libfxdl.so") for i in range(count + inner))
    assert result["recorded"] == libraries, result
    assert sorted(result["written"]) == libraries and set(result["written"].values()) == {1}, result
