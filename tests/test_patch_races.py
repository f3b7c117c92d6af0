"""Patching, unpatching and patch_on_load() from several threads at once,
while other threads call through the library and load libraries: one lock
serves every slot write, so nothing crashes, deadlocks or overlaps."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from fixturelib import build_library, maps_lines_of

DURATION = 8.0  # seconds of contention: main's code (two locks) crashed or overlapped well within it

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

    def load():
        assert library.fx_load(b"libm.so.6") == 0

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
    process = subprocess.run([sys.executable, "-c", RACE, str(path), str(DURATION)],
                             capture_output=True, text=True, timeout=DURATION + 120)
    assert process.returncode == 0, (process.returncode, process.stderr[-4000:])
    result = json.loads(process.stdout)
    assert not result["errors"], result
    assert result["overlaps"] == 0, result
    assert all(count > 0 for count in result["counts"].values()), result
