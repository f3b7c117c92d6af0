"""greenify.stats(): per green function, the calls that waited and for how long."""
from __future__ import annotations

import select

import gevent
import pytest

import greenify
from tests.support.green_support import buffer, run_concurrently, send_later, socketpair
from greenify._green import ffi, lib


@pytest.fixture(autouse=True)
def fresh_counters():
    greenify.greenify()
    greenify.stats(reset=True)


def test_calls_that_waited_are_counted_once_with_the_time_they_waited():
    pairs = [socketpair() for _ in range(5)]

    def wait_one(i):
        a, b = pairs[i]
        send_later(b, b"x", 0.1)
        return lib.green_recv(a.fileno(), buffer(4), 4, 0)

    run_concurrently(5, wait_one)
    figures = greenify.stats()
    assert figures["recv"].calls == 5
    assert 0.45 <= figures["recv"].seconds < 1.5
    assert "recvfrom" not in figures  # recv is counted as itself


def test_ready_calls_do_not_count_and_reset_clears():
    a, b = socketpair()
    b.sendall(b"xyz")
    lib.green_recv(a.fileno(), buffer(1), 1, 0)
    fds = ffi.new("struct pollfd[1]")
    fds[0].fd = a.fileno()
    fds[0].events = select.POLLIN
    lib.green_poll(fds, 1, 100)
    assert greenify.stats() == {}
    lib.green_poll(ffi.NULL, 0, 50)  # a cooperative sleep waits
    assert greenify.stats(reset=True)["poll"].calls == 1
    assert greenify.stats() == {}


def test_a_wait_split_by_spurious_wakeups_is_one_call():
    a, b = socketpair()
    fds = ffi.new("struct pollfd[1]")
    fds[0].fd = a.fileno()
    fds[0].events = select.POLLPRI
    gevent.spawn_later(0.05, b.sendall, b"not urgent")
    assert lib.green_poll(fds, 1, 150) == 0
    assert greenify.stats()["poll"].calls == 1
