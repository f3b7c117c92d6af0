"""Where a wait is impossible the green functions block natively, like libc:
before activation, in threads with no hub, inside the hub, at shutdown.
And the wait works whether the caller holds the GIL or released it."""
from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
import threading
import time

import gevent
import pytest
from gevent._hub_local import get_hub_if_exists

import greenify
from tests.support.green_support import buffer, green_module_path, run_concurrently, send_later, socketpair
from greenify._green import ffi, lib


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


def send_from_thread(sock, data, delay):
    def later():
        time.sleep(delay)
        sock.sendall(data)
    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_a_plain_thread_blocks_natively_and_gets_no_hub():
    a, b = socketpair()
    seen = {}

    def worker():
        buf = buffer(8)
        seen["result"] = lib.green_recv(a.fileno(), buf, 8, 0)
        seen["data"] = ffi.buffer(buf, 4)[:]
        seen["hub"] = get_hub_if_exists()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.1)
    b.sendall(b"thrd")
    thread.join(5)
    assert seen == {"result": 4, "data": b"thrd", "hub": None}


def test_a_threadpool_worker_blocks_natively_while_the_hub_runs_on():
    a, b = socketpair()
    send_later(b, b"pool", 0.2)

    def in_worker():
        buf = buffer(8)
        n = lib.green_recv(a.fileno(), buf, 8, 0)
        return n, ffi.buffer(buf, n)[:], get_hub_if_exists()

    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
    result = gevent.get_hub().threadpool.spawn(in_worker).get(timeout=5)
    assert result == (4, b"pool", None)
    ticker.join()
    assert len(ticks) == 10


def test_inside_the_hub_the_call_blocks_natively():
    a, b = socketpair()
    results = []

    def in_hub():
        results.append(lib.green_recv(a.fileno(), buffer(8), 8, 0))

    send_from_thread(b, b"hub!", 0.1)
    gevent.get_hub().loop.run_callback(in_hub)
    gevent.sleep(0.01)
    assert results == [4]


def test_waits_work_with_the_gil_held_through_pydll():
    green = ctypes.PyDLL(green_module_path()).green_recv
    green.restype = ctypes.c_ssize_t
    green.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    pairs = [socketpair() for _ in range(10)]

    def wait_one(i):
        a, b = pairs[i]
        send_later(b, b"x", 0.2)
        return green(a.fileno(), ctypes.create_string_buffer(4), 4, 0)

    values, took = run_concurrently(10, wait_one)
    assert values == [1] * 10
    assert took < 1.0


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("activate, expected", [(False, ["1", "0"]), (True, ["1", "True"])],
                         ids=["before-activation-blocks-like-libc", "after-activation-lets-the-hub-run"])
def test_activation_decides_whether_the_call_blocks_the_hub(activate, expected):
    proc = run_python(f"""
        import socket, threading, time, gevent, greenify
        from greenify._green import ffi, lib
        if {activate}:
            greenify.greenify()
        a, b = socket.socketpair()
        ticks = []
        gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(100)])
        gevent.sleep(0)
        threading.Timer(0.3, b.sendall, (b"x",)).start()
        n = lib.green_recv(a.fileno(), ffi.new("char[]", 4), 4, 0)
        print(n, len(ticks) > 10 if {activate} else len(ticks))
    """)
    assert proc.stdout.split() == expected, proc.stderr


def test_a_green_call_during_interpreter_shutdown_blocks_natively():
    proc = run_python("""
        import atexit, time
        def at_shutdown():
            # runs after greenify's own exit hook (atexit is last-in, first-out)
            from greenify._green import lib, ffi
            start = time.monotonic()
            n = lib.green_poll(ffi.NULL, 0, 100)
            print("slept", n, round(time.monotonic() - start, 1))
        atexit.register(at_shutdown)
        import gevent, greenify
        greenify.greenify()
        gevent.get_hub()
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["slept", "0", "0.1"], proc.stderr
