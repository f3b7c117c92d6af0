"""Holding under load and faults: many waiters, dying peers, closed fds,
signals, threads, and no leaks.  `STRESS=1` runs the same tests larger."""
from __future__ import annotations

import ctypes
import gc
import os
import random
import resource
import select
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import gevent
import pytest
from gevent import socket as gsocket

import greenify
from tests.support.green_support import (buffer, call_green, memory_growth_unmeasurable_under_asan, no_interruption_pending, open_fds,
                           rss_kb, run_concurrently, socketpair, sweep_interval_s, tcp_pair)
from tests.support.fault_support import FAULT_BOUND_S
from tests.support.servers import missing
from greenify.tools import demo
from greenify._green import ffi, lib

STRESS = os.environ.get("STRESS") == "1"


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError):
            missing(f"needs {needed} file descriptors; the hard limit is {hard} (raise it: ulimit -Hn {needed})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# ---- load ----

def test_many_greenlets_wait_at_once_and_wake_in_random_order_with_their_data():
    # one UDP socket per waiter (one fd each), woken by datagrams from one sender
    count = 10000 if STRESS else 1000
    raise_fd_limit(count + 256)
    waiters = []
    for _ in range(count):
        waiter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        waiter.bind(("127.0.0.1", 0))
        waiters.append(waiter)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    before = rss_kb()

    def wait_one(i):
        buf = buffer(8)
        n = lib.green_recv(waiters[i].fileno(), buf, 8, 0)
        return ffi.buffer(buf, n)[:]

    greenlets = [gevent.spawn(wait_one, i) for i in range(count)]
    gevent.sleep(0.2)
    waiting_kb = (rss_kb() - before) / count
    assert not any(g.dead for g in greenlets)
    order = list(range(count))
    random.shuffle(order)
    for i in order:
        sender.sendto(struct.pack("!I", i), waiters[i].getsockname())
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    assert [struct.unpack("!I", g.value)[0] for g in greenlets] == list(range(count))
    print(f"\n  {count} waiting greenlets: {waiting_kb:.1f} KiB resident each")
    for waiter in waiters:
        waiter.close()
    sender.close()


# ---- peer faults ----

def test_a_peer_reset_mid_wait_gives_econnreset_promptly():
    client, conn = tcp_pair()

    def reset():
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    gevent.spawn_later(0.1, reset)
    start = time.monotonic()
    assert call_green("recv", client.fileno(), buffer(8), 8, 0) == (-1, __import__("errno").ECONNRESET)
    assert time.monotonic() - start < FAULT_BOUND_S


def test_a_peer_close_mid_wait_reads_eof():
    client, conn = tcp_pair()
    gevent.spawn_later(0.1, conn.close)
    assert call_green("recv", client.fileno(), buffer(8), 8, 0) == (0, 0)


def test_a_peer_half_close_mid_wait_reads_eof_and_writes_still_work():
    client, conn = tcp_pair()
    gevent.spawn_later(0.1, conn.shutdown, socket.SHUT_WR)
    assert call_green("recv", client.fileno(), buffer(8), 8, 0) == (0, 0)
    assert call_green("send", client.fileno(), b"late", 4, 0) == (4, 0)
    assert conn.recv(8) == b"late"


def test_an_fd_closed_by_another_greenlet_wakes_its_waiter_with_an_error():
    a, b = socketpair()
    fd = a.detach()
    gevent.spawn_later(0.1, lib.green_close, fd)
    start = time.monotonic(), time.process_time()
    result, err = call_green("recv", fd, buffer(8), 8, 0)
    assert (result, err) == (-1, __import__("errno").EBADF)
    assert time.monotonic() - start[0] < FAULT_BOUND_S
    # the hub goes on, without spinning on a dead descriptor (a spinning hub
    # would take most of the second's CPU, even sharing a loaded core)
    cpu = time.process_time()
    gevent.sleep(1.0)
    assert time.process_time() - cpu < 0.25


def test_an_fd_closed_behind_greenifys_back_wakes_its_waiter_within_the_sweep_interval():
    # os.close is not greenify's close twin: epoll drops the fd silently, and
    # only the once-a-second sweep finds the waiter's descriptor gone
    a, b = socketpair()
    fd = a.detach()
    gevent.spawn_later(0.1, os.close, fd)
    start = time.monotonic()
    assert call_green("recv", fd, buffer(8), 8, 0) == (-1, __import__("errno").EBADF)
    assert time.monotonic() - start < sweep_interval_s() + FAULT_BOUND_S


def test_a_closed_fd_in_a_poll_set_wakes_the_poll_with_pollnval():
    a, b = socketpair()
    fd = a.detach()
    fds = ffi.new("struct pollfd[1]")
    fds[0].fd = fd
    fds[0].events = select.POLLIN
    gevent.spawn_later(0.1, lib.green_close, fd)
    assert lib.green_poll(fds, 1, 5000) == 1
    assert fds[0].revents == select.POLLNVAL


# ---- signals ----

def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_sigint_while_the_main_greenlet_waits_in_c_raises_keyboardinterrupt_there():
    proc = run_python("""
        import os, signal, socket, threading, time, gevent, greenify
        from greenify._green import ffi, lib
        # Python's own handler, whatever was inherited: a shell starts a
        # background job (`make test &`) with SIGINT ignored, which Python keeps
        signal.signal(signal.SIGINT, signal.default_int_handler)
        greenify.greenify()
        a, b = socket.socketpair()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            lib.green_recv(a.fileno(), ffi.new("char[]", 4), 4, 0)
            print("no exception")
        except KeyboardInterrupt:
            print("KeyboardInterrupt after", round(time.monotonic() - start, 1))
    """)
    assert proc.stdout.strip() == "KeyboardInterrupt after 0.2", proc.stderr


@pytest.mark.parametrize("restart", [False, True], ids=["no-SA_RESTART", "SA_RESTART"])
def test_a_handled_signal_during_a_native_wait_behaves_as_libc(restart):
    # greenify is active but the thread has no hub: the call blocks natively,
    # and a signal interrupts it exactly as it interrupts libc's recv
    proc = run_python(f"""
        import ctypes, signal, socket, threading, greenify
        from greenify._green import ffi, lib
        greenify.greenify()
        libc = ctypes.CDLL(None, use_errno=True)
        signal.signal(signal.SIGALRM, lambda *args: None)
        signal.siginterrupt(signal.SIGALRM, {not restart})
        results = []
        for call in ("green", "libc"):
            a, b = socket.socketpair()
            threading.Timer(0.4, b.sendall, (b"x",)).start()
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            if call == "green":
                ffi.errno = 0
                results.append((lib.green_recv(a.fileno(), ffi.new("char[]", 4), 4, 0), ffi.errno))
            else:
                ctypes.set_errno(0)
                results.append((libc.recv(a.fileno(), ctypes.create_string_buffer(4), 4, 0), ctypes.get_errno()))
        print(results)
    """)
    expected = "[(1, 0), (1, 0)]" if restart else "[(-1, 4), (-1, 4)]"
    assert proc.stdout.strip() == expected, proc.stderr


# ---- threads ----

def test_threads_with_their_own_hubs_and_plain_threads_share_a_patched_library():
    client = demo.demo_client()
    server, port = demo.start_server(0.2)
    try:
        with greenify.patched(client._name):
            def fetch(i):
                reply = ctypes.create_string_buffer(64)
                assert client.demo_fetch(port, b"r%d" % i, reply, 64) > 0
                return reply.value

            hub_results, plain_results = {}, {}

            def with_hub(t):
                start = time.monotonic()
                values, _ = run_concurrently(20, fetch)
                hub_results[t] = (values, time.monotonic() - start)
                gevent.get_hub().destroy(destroy_loop=True)

            def plain(t):
                plain_results[t] = fetch(t)

            threads = [threading.Thread(target=with_hub, args=(t,)) for t in range(4)]
            threads += [threading.Thread(target=plain, args=(t,)) for t in range(2)]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            took = time.monotonic() - start
        assert sorted(hub_results) == [0, 1, 2, 3]
        for values, seconds in hub_results.values():
            assert values == [b"echo: r%d" % i for i in range(20)]
            assert seconds < 2.0  # 20 x 0.2 s serial would be 4 s per thread
        assert plain_results == {0: b"echo: r0", 1: b"echo: r1"}
        assert took < 3.0
    finally:
        server.kill()
        server.wait()


# ---- leaks ----

@memory_growth_unmeasurable_under_asan
def test_fast_path_calls_and_waits_leave_memory_watchers_and_fds_where_they_were():
    fast_calls = 1_000_000 if STRESS else 100_000
    waits = 100_000 if STRESS else 5_000
    a, b = socketpair()
    b.sendall(b"x")
    peek = buffer(1)
    loop = gevent.get_hub().loop
    w1, plain = socketpair()
    w2 = gsocket.socket(fileno=plain.detach())  # the echo side is gevent's own

    def fast(n):
        for _ in range(n):
            lib.green_recv(a.fileno(), peek, 1, socket.MSG_PEEK)

    def ping_pong(n):
        def echo():
            for _ in range(n):
                w2.sendall(w2.recv(1))

        echoer = gevent.spawn(echo)
        out = buffer(1)
        for _ in range(n):
            lib.green_send(w1.fileno(), b"p", 1, 0)
            lib.green_recv(w1.fileno(), out, 1, 0)
        echoer.join()

    fast(10_000)
    ping_pong(500)
    gc.collect()
    rss, fds, active = rss_kb(), open_fds(), loop.activecnt
    fast(fast_calls)
    ping_pong(waits)
    gc.collect()
    assert rss_kb() - rss < 1024, f"resident memory grew by {rss_kb() - rss} KiB"
    assert open_fds() == fds
    assert loop.activecnt == active
    assert no_interruption_pending()
