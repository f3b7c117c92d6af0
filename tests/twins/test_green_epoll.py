"""epoll_wait and epoll_pwait: the kernel's events, a cooperative wait on the
epoll fd itself, and the caller's deadline kept across wake-ups."""
from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
import time

import gevent
import pytest
from gevent._hub_local import get_hub_if_exists

from tests.support.green_support import libc, run_concurrently, send_later, socketpair
from greenify._green import ffi, lib


pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")


def epoll_on(*socks, mask=select.EPOLLIN):
    ep = select.epoll()
    for sock in socks:
        ep.register(sock.fileno(), mask)
    return ep


def events(n=8):
    return ffi.new("struct epoll_event[]", n)


def green_epoll_wait(epfd, maxevents=8, timeout=-1, buffer=None):
    buffer = buffer if buffer is not None else events(max(maxevents, 1))
    ffi.errno = 0
    result = lib.green_epoll_wait(epfd, buffer, maxevents, timeout)
    return result, ffi.errno, [(buffer[i].data.fd, buffer[i].events) for i in range(max(result, 0))]


def libc_epoll_wait(epfd, maxevents=8, timeout=0):
    buffer = ctypes.create_string_buffer(12 * max(maxevents, 1))  # packed struct epoll_event on x86-64
    ctypes.set_errno(0)
    result = libc.epoll_wait(epfd, buffer, maxevents, timeout)
    return result, ctypes.get_errno()


def test_ready_events_return_at_once_as_the_kernel_reports_them():
    a, b = socketpair()
    b.sendall(b"x")
    ep = epoll_on(a, mask=select.EPOLLIN | select.EPOLLOUT)
    expected = ep.poll(0)
    start = time.monotonic()
    result, err, got = green_epoll_wait(ep.fileno(), timeout=5000)
    assert time.monotonic() - start < 2.5  # not the 5 s timeout
    assert result == 1 and got == expected and err == 0


def test_epoll_waits_cooperatively_for_many_greenlets():
    pairs = [socketpair() for _ in range(10)]

    def wait_one(i):
        a, b = pairs[i]
        ep = epoll_on(a)
        send_later(b, b"x", 0.2)
        result, err, got = green_epoll_wait(ep.fileno(), timeout=5000)
        ep.close()
        return result, got

    values, took = run_concurrently(10, wait_one)
    assert values == [(1, [(pairs[i][0].fileno(), select.EPOLLIN)]) for i in range(10)]
    assert 0.19 <= took < 1.0


def test_epoll_pwait_with_a_signal_mask_waits_cooperatively():
    a, b = socketpair()
    ep = epoll_on(a)
    send_later(b, b"x", 0.1)
    mask = ffi.new("sigset_t *")
    buffer = events()
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(5)])
    assert lib.green_epoll_pwait(ep.fileno(), buffer, 8, 2000, mask) == 1
    assert buffer[0].data.fd == a.fileno()
    ticker.join()
    assert len(ticks) == 5


def test_timeout_returns_zero_after_the_timeout_and_leaves_errno():
    a, b = socketpair()
    ep = epoll_on(a)
    ffi.errno = errno.EBADF
    start = time.monotonic()
    assert lib.green_epoll_wait(ep.fileno(), events(), 8, 150) == 0
    assert 0.14 <= time.monotonic() - start < 1.5
    assert ffi.errno == errno.EBADF


def test_the_deadline_survives_spurious_wakeups():
    a, b = socketpair()
    ep = epoll_on(a)
    hub = gevent.get_hub()
    results = []
    g = gevent.spawn(lambda: results.append(green_epoll_wait(ep.fileno(), timeout=300)[0]))
    gevent.sleep(0.05)
    for _ in range(3):
        hub.loop.run_callback(g.switch, "spurious")
        gevent.sleep(0.02)
    assert not results
    g.join()
    assert results == [0]


def test_a_wakeup_that_finds_nothing_keeps_waiting():
    # the epoll fd turns readable, but another reader drains the data before
    # the probe: the wait goes on until the deadline
    a, b = socketpair()
    ep = epoll_on(a)

    def steal():
        b.sendall(b"x")
        a.recv(1)  # same greenlet run, before the waiter gets to probe

    gevent.spawn_later(0.05, steal)
    start = time.monotonic()
    result, err, got = green_epoll_wait(ep.fileno(), timeout=250)
    assert result == 0 and got == []
    assert time.monotonic() - start >= 0.24


def test_edge_triggered_events_are_delivered_once():
    a, b = socketpair()
    ep = epoll_on(a, mask=select.EPOLLIN | select.EPOLLET)
    send_later(b, b"x", 0.05)
    assert green_epoll_wait(ep.fileno(), timeout=1000)[0] == 1
    assert green_epoll_wait(ep.fileno(), timeout=100)[0] == 0  # no new edge


@pytest.mark.parametrize("case", ["bad fd", "not an epoll fd", "maxevents 0", "maxevents -1"])
def test_errors_are_the_kernels(case):
    r, w = os.pipe()
    ep = select.epoll()
    try:
        epfd, maxevents = {"bad fd": (9999, 8), "not an epoll fd": (r, 8),
                           "maxevents 0": (ep.fileno(), 0), "maxevents -1": (ep.fileno(), -1)}[case]
        green = green_epoll_wait(epfd, maxevents, timeout=100)[:2]
        assert green == libc_epoll_wait(epfd, maxevents, 100)
        assert green[0] == -1
    finally:
        os.close(r)
        os.close(w)
        ep.close()


def test_a_timeout_ends_the_wait_with_a_timeout_result():
    a, b = socketpair()
    ep = epoll_on(a)
    start = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.1) as timeout:
            lib.green_epoll_wait(ep.fileno(), events(), 8, -1)
            pytest.fail("the line after the call ran")
    assert caught.value is timeout
    assert time.monotonic() - start < 1.5


def test_in_a_plain_thread_epoll_blocks_natively_and_creates_no_hub():
    a, b = socketpair()
    ep = epoll_on(a)
    seen = {}

    def worker():
        start = time.monotonic()
        seen["timeout"] = green_epoll_wait(ep.fileno(), timeout=100)[0]
        seen["took"] = time.monotonic() - start
        b.sendall(b"x")
        seen["ready"] = green_epoll_wait(ep.fileno(), timeout=1000)[0]
        seen["hub"] = get_hub_if_exists()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert (seen["timeout"], seen["ready"], seen["hub"]) == (0, 1, None)
    assert seen["took"] >= 0.09
