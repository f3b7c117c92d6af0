"""A process that patches and then forks (gunicorn --preload, multiprocessing
with fork) keeps working in the child: with gevent.reinit() its greenlets
run a patched library's calls together; without a hub it blocks natively."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import gevent

import greenify
from tests.support.fixturelib import build_library
from tests.support.patch_support import slot_lock_held_by_another_thread

CONCURRENT = 10
DELAY = 0.2  # the slow_server's answer time


def in_child(body) -> dict:
    """Run ``body()`` in a forked child; its JSON-able result, read from a pipe."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(reader)
            result = body()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": repr(exc)}
        try:
            os.write(writer, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    result = json.loads(output or b'{"error": "no output"}')
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def together(call) -> float:
    start = time.perf_counter()
    greenlets = [gevent.spawn(call) for _ in range(CONCURRENT)]
    gevent.joinall(greenlets, raise_error=True)
    assert [g.value for g in greenlets] == [b"pong:ping"] * CONCURRENT
    return time.perf_counter() - start


def requester(library: ctypes.CDLL, port: int):
    def call() -> bytes:
        out = ctypes.create_string_buffer(64)
        got = library.fx_request(port, b"ping", out, 64)
        return out.raw[:got] if got >= 0 else b"error"
    return call


def test_greenlets_in_a_forked_child_run_the_patched_library_together(tmp_path, slow_server):
    greenify.greenify()
    path = build_library("fx_client", "default", tmp_path, name="libfxfork_hub.so")
    library = ctypes.CDLL(str(path))
    assert greenify.patch_library(str(path))
    later = build_library("fx_client", "default", tmp_path, name="libfxfork_later.so")
    registration = greenify.patch_on_load("libfxfork_later")
    gevent.sleep(0)  # the parent has a running hub, as a preloading master may
    try:
        def child() -> dict:
            gevent.reinit()  # what gevent's fork() does in the child
            patched = together(requester(library, slow_server))
            # a registration made before the fork still patches on load
            late_library = ctypes.CDLL(str(later))
            on_load = together(requester(late_library, slow_server))
            return {"patched": patched, "on_load": on_load, "reports": sum(map(bool, registration.reports))}

        result = in_child(child)
    finally:
        registration.cancel()
    try:
        assert together(requester(library, slow_server)) < DELAY * CONCURRENT / 2  # the parent is unaffected
    finally:
        greenify.unpatch_library(str(path))  # other tests check no fixture library stays patched
    assert result["patched"] < DELAY * CONCURRENT / 2, result
    assert result["on_load"] < DELAY * CONCURRENT / 2, result
    assert result["reports"] == 1, result


CHILD_WITHOUT_HUB = textwrap.dedent("""
    import ctypes, json, os, sys, time
    import greenify
    from gevent._hub_local import get_hub_if_exists

    path, port = sys.argv[1], int(sys.argv[2])
    greenify.greenify()
    library = ctypes.CDLL(path)
    assert greenify.patch_library(path)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = ctypes.create_string_buffer(64)
        start = time.perf_counter()
        replies = []
        for _ in range(3):
            got = library.fx_request(port, b"ping", out, 64)
            replies.append(out.raw[:got].decode() if got >= 0 else "error")
        os.write(writer, json.dumps({"replies": replies, "elapsed": time.perf_counter() - start,
                                     "hub": get_hub_if_exists() is not None}).encode())
        os._exit(0)
    os.close(writer)
    output = os.fdopen(reader, "rb").read()
    _pid, status = os.waitpid(pid, 0)
    print(json.dumps({"child": json.loads(output or b"null"), "status": os.waitstatus_to_exitcode(status)}))
""")


def test_a_forked_child_without_a_hub_blocks_natively(tmp_path, slow_server):
    path = build_library("fx_client", "default", tmp_path, name="libfxfork_plain.so")
    process = subprocess.run([sys.executable, "-c", CHILD_WITHOUT_HUB, str(path), str(slow_server)],
                             capture_output=True, text=True, timeout=20)
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    assert result["status"] == 0, result
    child = result["child"]
    assert child["replies"] == ["pong:ping"] * 3 and not child["hub"], result
    assert child["elapsed"] >= 3 * DELAY * 0.9, result  # one after another, natively


def test_a_slot_lock_another_thread_holds_at_fork_is_replaced_in_the_child(tmp_path):
    # That thread does not exist in the child: the lock it held would never
    # be released there, and the child's first patch would hang.
    path = build_library("fx_client", "relro", tmp_path, name="libfxfork_lock.so")
    ctypes.CDLL(str(path))

    def child() -> dict:
        signal.alarm(30)  # a hang kills the child, which fails the test
        report = greenify.patch_library(str(path))
        greenify.patch_on_load("libfxfork_lock_never").cancel()  # the dlopen hooks take the same lock
        return {"patched": len(report.patched_slots), "restored": greenify.unpatch_library(str(path))}

    with slot_lock_held_by_another_thread():
        result = in_child(child)
    assert result["patched"] > 0 and result["restored"] == result["patched"], result
