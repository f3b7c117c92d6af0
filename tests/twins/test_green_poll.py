"""poll, ppoll, select and pselect: any mask, exact revents, kernel timeouts."""
from __future__ import annotations

import errno
import os
import select
import socket
import time

import gevent
import pytest

import greenify
from tests.support.green_support import run_concurrently, send_later, socketpair, tcp_pair
from greenify._green import ffi, lib


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


def pollfds(*entries):
    fds = ffi.new("struct pollfd[]", max(len(entries), 1))
    for slot, (fd, events) in zip(fds, entries):
        slot.fd = fd
        slot.events = events
    return fds


def kernel_revents(entries, timeout=0):
    """What the kernel's own poll reports for the same fds and masks."""
    poller = select.poll()
    for fd, events in entries:
        if fd >= 0:
            poller.register(fd, events)
    return dict(poller.poll(timeout))


def test_ready_fd_returns_at_once_with_the_kernels_revents():
    a, b = socketpair()
    b.sendall(b"x")
    fds = pollfds((a.fileno(), select.POLLIN | select.POLLOUT))
    assert lib.green_poll(fds, 1, 1000) == 1
    assert fds[0].revents == kernel_revents([(a.fileno(), select.POLLIN | select.POLLOUT)])[a.fileno()]


def test_poll_waits_cooperatively_for_pollin():
    a, b = socketpair()
    send_later(b, b"x", 0.1)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(5)])
    fds = pollfds((a.fileno(), select.POLLIN))
    assert lib.green_poll(fds, 1, -1) == 1
    assert fds[0].revents == select.POLLIN
    ticker.join()
    assert len(ticks) == 5


def test_libpq_mask_pollin_pollerr_waits_cooperatively():
    # libpq asks for POLLIN|POLLERR: the seed's greenify blocked the hub here
    pairs = [socketpair() for _ in range(10)]

    def wait_one(i):
        a, b = pairs[i]
        send_later(b, b"x", 0.2)
        fds = pollfds((a.fileno(), select.POLLIN | select.POLLERR))
        return lib.green_poll(fds, 1, 5000), fds[0].revents

    values, took = run_concurrently(10, wait_one)
    assert values == [(1, select.POLLIN)] * 10
    assert took < 1.0


@pytest.mark.parametrize("mask", [select.POLLPRI, select.POLLRDHUP, select.POLLERR, select.POLLHUP, 0])
def test_unusual_masks_wait_without_spinning_and_time_out(mask):
    # readable data must not wake a poll that did not ask for POLLIN
    a, b = socket.socketpair()
    b.sendall(b"plain data")
    fds = pollfds((a.fileno(), mask))
    start = time.process_time(), time.monotonic()
    assert lib.green_poll(fds, 1, 1000) == 0
    cpu, wall = time.process_time() - start[0], time.monotonic() - start[1]
    assert 0.99 <= wall < 3.0
    # spinning would take most of the second, even sharing a loaded core
    assert cpu < 0.25, f"poll spun: {cpu:.2f} s of CPU in {wall:.2f} s"


def test_pollpri_reports_out_of_band_data():
    client, conn = tcp_pair()
    gevent.spawn_later(0.1, client.send, b"!", socket.MSG_OOB)
    fds = pollfds((conn.fileno(), select.POLLPRI))
    assert lib.green_poll(fds, 1, 2000) == 1
    assert fds[0].revents & select.POLLPRI


def test_pollrdhup_reports_the_peer_half_closing():
    a, b = socketpair()
    gevent.spawn_later(0.1, b.shutdown, socket.SHUT_WR)
    fds = pollfds((a.fileno(), select.POLLRDHUP))
    assert lib.green_poll(fds, 1, 2000) == 1
    assert fds[0].revents == kernel_revents([(a.fileno(), select.POLLRDHUP)])[a.fileno()]


def test_pollerr_only_mask_reports_a_reset_peer():
    a, b = socketpair()
    gevent.spawn_later(0.1, b.close)
    fds = pollfds((a.fileno(), select.POLLERR))
    assert lib.green_poll(fds, 1, 2000) == 1
    assert fds[0].revents & select.POLLHUP


def test_negative_fds_are_ignored_and_closed_fds_get_pollnval():
    a, b = socketpair()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    fds = pollfds((-1, select.POLLIN), (r, select.POLLIN), (a.fileno(), select.POLLIN))
    assert lib.green_poll(fds, 3, 1000) == 1
    assert (fds[0].revents, fds[1].revents, fds[2].revents) == (0, select.POLLNVAL, 0)


def test_many_fds_at_once_wake_on_the_one_that_becomes_ready():
    pairs = [socketpair() for _ in range(100)]
    send_later(pairs[57][1], b"x", 0.1)
    fds = pollfds(*[(a.fileno(), select.POLLIN) for a, _ in pairs])
    assert lib.green_poll(fds, 100, 3000) == 1
    assert [i for i in range(100) if fds[i].revents] == [57]


def test_the_same_fd_twice_with_different_masks():
    a, b = socketpair()
    send_later(b, b"x", 0.1)
    fds = pollfds((a.fileno(), select.POLLPRI), (a.fileno(), select.POLLIN))
    assert lib.green_poll(fds, 2, 2000) == 1
    assert (fds[0].revents, fds[1].revents) == (0, select.POLLIN)


def test_poll_timeout_survives_spurious_wakeups():
    # A gevent reader on a dup of the fd takes every byte first: our watcher
    # wakes each time, finds nothing, and must go on until its own deadline.
    from gevent import socket as gsocket
    a, b = socketpair()
    thief = gsocket.socket(fileno=os.dup(a.fileno()))
    stolen = []
    thief_greenlet = gevent.spawn(lambda: [stolen.append(thief.recv(16)) for _ in range(5)])
    gevent.sleep(0)
    for i in range(5):
        send_later(b, b"x", 0.04 * (i + 1))
    fds = pollfds((a.fileno(), select.POLLIN))
    start = time.monotonic()
    assert lib.green_poll(fds, 1, 300) == 0
    assert time.monotonic() - start >= 0.299
    thief_greenlet.join(timeout=1)
    assert len(stolen) == 5


def test_poll_with_no_fds_is_a_cooperative_sleep():
    def nap(i):
        return lib.green_poll(ffi.NULL, 0, 200)

    values, took = run_concurrently(10, nap)
    assert values == [0] * 10
    assert 0.19 <= took < 0.8


def test_poll_zero_timeout_returns_at_once():
    a, b = socketpair()
    fds = pollfds((a.fileno(), select.POLLIN))
    assert lib.green_poll(fds, 1, 0) == 0


def test_poll_bad_pointer_fails_with_efault():
    ffi.errno = 0
    assert lib.green_poll(ffi.cast("struct pollfd *", 8), 1, 100) == -1
    assert ffi.errno == errno.EFAULT


def test_ppoll_waits_with_a_timespec_and_null_waits_for_ever_until_ready():
    a, b = socketpair()
    timeout = ffi.new("struct timespec *", {"tv_sec": 0, "tv_nsec": 150_000_000})
    fds = pollfds((a.fileno(), select.POLLIN))
    start = time.monotonic()
    assert lib.green_ppoll(fds, 1, timeout, ffi.NULL) == 0
    assert 0.14 <= time.monotonic() - start < 1.5
    assert (timeout.tv_sec, timeout.tv_nsec) == (0, 150_000_000)  # glibc's ppoll leaves it alone
    send_later(b, b"x", 0.1)
    assert lib.green_ppoll(fds, 1, ffi.NULL, ffi.NULL) == 1


def test_poll_chk_and_ppoll_chk_pass_through():
    a, b = socketpair()
    b.sendall(b"x")
    fds = pollfds((a.fileno(), select.POLLIN))
    assert lib.green___poll_chk(fds, 1, 100, ffi.sizeof("struct pollfd")) == 1
    assert lib.green___ppoll_chk(fds, 1, ffi.NULL, ffi.NULL, ffi.sizeof("struct pollfd")) == 1


# ---- select ----

def fdset(*fds):
    s = ffi.new("fd_set *")
    words = ffi.cast("unsigned long *", s)
    for fd in fds:
        words[fd // 64] |= 1 << (fd % 64)
    return s


def members(s, nfds):
    words = ffi.cast("unsigned long *", s)
    return [fd for fd in range(nfds) if words[fd // 64] >> (fd % 64) & 1]


def test_select_ready_fd_returns_at_once():
    a, b = socketpair()
    b.sendall(b"x")
    nfds = a.fileno() + 1
    r, w = fdset(a.fileno()), fdset(a.fileno())
    timeout = ffi.new("struct timeval *", {"tv_sec": 5, "tv_usec": 0})
    assert lib.green_select(nfds, r, w, ffi.NULL, timeout) == 2
    assert members(r, nfds) == [a.fileno()] and members(w, nfds) == [a.fileno()]


def test_select_null_timeout_waits_for_ever_until_ready():
    # the seed's greenify crashed here
    a, b = socketpair()
    send_later(b, b"x", 0.15)
    nfds = a.fileno() + 1
    r = fdset(a.fileno())
    start = time.monotonic()
    assert lib.green_select(nfds, r, ffi.NULL, ffi.NULL, ffi.NULL) == 1
    assert time.monotonic() - start >= 0.14
    assert members(r, nfds) == [a.fileno()]


def test_select_updates_the_timeval_like_linux():
    a, b = socketpair()
    send_later(b, b"x", 0.1)
    nfds = a.fileno() + 1
    r = fdset(a.fileno())
    timeout = ffi.new("struct timeval *", {"tv_sec": 5, "tv_usec": 0})
    assert lib.green_select(nfds, r, ffi.NULL, ffi.NULL, timeout) == 1
    left = timeout.tv_sec + timeout.tv_usec / 1e6
    assert 2.5 < left <= 4.91  # the data came after 0.1 s (later on a loaded machine)


def test_select_times_out_with_empty_sets_and_zero_timeval():
    a, b = socketpair()
    nfds = a.fileno() + 1
    r = fdset(a.fileno())
    timeout = ffi.new("struct timeval *", {"tv_sec": 0, "tv_usec": 120_000})
    start = time.monotonic()
    assert lib.green_select(nfds, r, ffi.NULL, ffi.NULL, timeout) == 0
    assert 0.11 <= time.monotonic() - start < 1.5
    assert members(r, nfds) == []
    assert (timeout.tv_sec, timeout.tv_usec) == (0, 0)


def test_select_except_set_reports_out_of_band_data():
    client, conn = tcp_pair()
    gevent.spawn_later(0.1, client.send, b"!", socket.MSG_OOB)
    nfds = conn.fileno() + 1
    e = fdset(conn.fileno())
    assert lib.green_select(nfds, ffi.NULL, ffi.NULL, e, ffi.NULL) == 1
    assert members(e, nfds) == [conn.fileno()]


def test_select_bad_fd_fails_with_ebadf():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    ffi.errno = 0
    assert lib.green_select(r + 1, fdset(r), ffi.NULL, ffi.NULL, ffi.NULL) == -1
    assert ffi.errno == errno.EBADF


def test_select_negative_timeout_fails_with_einval():
    timeout = ffi.new("struct timeval *", {"tv_sec": -1, "tv_usec": 0})
    ffi.errno = 0
    assert lib.green_select(0, ffi.NULL, ffi.NULL, ffi.NULL, timeout) == -1
    assert ffi.errno == errno.EINVAL


def test_select_with_no_fds_is_a_cooperative_sleep():
    def nap(i):
        timeout = ffi.new("struct timeval *", {"tv_sec": 0, "tv_usec": 200_000})
        return lib.green_select(0, ffi.NULL, ffi.NULL, ffi.NULL, timeout)

    values, took = run_concurrently(10, nap)
    assert values == [0] * 10 and 0.19 <= took < 0.8


def test_pselect_waits_and_leaves_its_timespec_alone():
    a, b = socketpair()
    send_later(b, b"x", 0.1)
    nfds = a.fileno() + 1
    r = fdset(a.fileno())
    timeout = ffi.new("struct timespec *", {"tv_sec": 2, "tv_nsec": 0})
    assert lib.green_pselect(nfds, r, ffi.NULL, ffi.NULL, timeout, ffi.NULL) == 1
    assert (timeout.tv_sec, timeout.tv_nsec) == (2, 0)
    assert members(r, nfds) == [a.fileno()]
