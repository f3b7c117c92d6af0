"""Patching, unpatching and patch_on_load() from several threads at once,
while other threads call through the library and load libraries: one lock
serves every slot write, so nothing crashes, deadlocks or overlaps."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys
import textwrap

from fixturelib import build_library
from greenify import elf

PAGE = mmap.PAGESIZE
# Seconds of contention.  The code before the one lock (commit 3cac549) had
# writes overlap 4, 6 and 7 times in three runs of this length, and died with
# SIGSEGV in about one run in five.
DURATION = 8.0

RACE = textwrap.dedent("""
    import ctypes, faulthandler, json, os, socket, sys, threading, time
    faulthandler.enable()
    import greenify
    from greenify import slots

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
    import ctypes, faulthandler, json, sys, threading
    faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)  # a deadlock shows every thread's stack
    import greenify
    from greenify import slots

    folder, count = sys.argv[1], int(sys.argv[2])
    greenify.greenify()
    other = f"{folder}/libfxdlother.so"
    ctypes.CDLL(other)
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
        for _ in range(10):
            greenify.patch_library(other)
            greenify.unpatch_library(other)

    def registering():
        registrations.append(greenify.patch_on_load("libfxdl.so"))
        for _ in range(5):
            greenify.patch_on_load("libfxdl_never").cancel()

    bodies = [lambda first=first: loads(first) for first in range(4)] + [patching, registering]
    threads = [threading.Thread(target=started(body)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    patched = sorted(key[0] for key in slots.written_slots(purpose=slots.TWIN) if key[0].endswith("libfxdl.so"))
    registrations[0].cancel()
    print(json.dumps({"errors": errors, "patched": patched,
                      "written": sum(bool(obj.patched) for report in registrations[0].reports for obj in report.objects)}))
""")


def test_patch_and_patch_on_load_with_concurrent_dlopens_finish(tmp_path):
    count = 12
    for i in range(count):
        (tmp_path / str(i)).mkdir()
        build_library("fx_client", "default", tmp_path / str(i), name="libfxdl.so")
    build_library("fx_client", "default", tmp_path, name="libfxdlother.so")
    deadline = 120  # seconds: the work takes a few; a deadlock never ends
    process = subprocess.run([sys.executable, "-c", CONCURRENT_LOADS, str(tmp_path), str(count), str(deadline)],
                             capture_output=True, text=True, timeout=deadline + 60)
    assert process.returncode == 0, (process.returncode, process.stderr[-6000:])
    result = json.loads(process.stdout)
    assert not result["errors"], result
    # loaded before the registration or after it: every one patched, once
    assert result["patched"] == sorted(str(tmp_path / str(i) / "libfxdl.so") for i in range(count)), result
    assert result["written"] == count, result
