"""The common wait below Python (csrc/wait/green_fastwait.c): one descriptor, no
deadline, on gevent's default loop.  It must be taken where it applies and
give way to the general bridge everywhere else, with the same results."""
from __future__ import annotations

import errno
import gc
import socket
import struct
import threading
import time

import gevent
import pytest

import greenify
from gevent.hub import get_hub

from tests.support.green_support import buffer, call_green, socketpair
from greenify.waiting.bridge import SWEEP_INTERVAL_S
from greenify._green import lib

pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")


def ping_pong(rounds: int) -> None:
    """A green recv in a greenlet, fed one byte at a time by another."""
    a, b = socketpair()
    try:
        def reader():
            got = []
            for _ in range(rounds):
                got.append(call_green("recv", a.fileno(), buffer(1), 1, 0))
            return got

        glet = gevent.spawn(reader)
        for _ in range(rounds):
            gevent.sleep(0.001)
            b.send(b"x")
        assert glet.get(timeout=10) == [(1, 0)] * rounds
    finally:
        a.close()
        b.close()


def test_repeated_waits_on_a_socket_take_the_c_path():
    ping_pong(1)  # the first wait on a hub goes through the bridge, which attaches the hub
    before = lib.green_fast_waits()
    ping_pong(20)
    assert lib.green_fast_waits() - before >= 20


def test_a_wait_with_a_deadline_takes_the_c_path_and_ends_when_data_comes():
    ping_pong(1)
    a, b = socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))  # the wait has a deadline
    try:
        before = lib.green_fast_waits()
        glet = gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0)
        gevent.sleep(0.01)
        b.send(b"x")
        assert glet.get(timeout=10) == (1, 0)
        assert lib.green_fast_waits() > before
    finally:
        a.close()
        b.close()


def test_a_wait_with_a_deadline_times_out_as_the_kernel_does_while_others_run():
    """SO_RCVTIMEO of 0.3 s and nothing sent: EAGAIN after the timeout,
    not before, and the hub ran other greenlets meanwhile."""
    ping_pong(1)
    a, b = socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 300000))
    ticks = []

    def ticker():
        while True:
            ticks.append(time.perf_counter())
            gevent.sleep(0.01)

    try:
        before = lib.green_fast_waits()
        other = gevent.spawn(ticker)
        start = time.perf_counter()
        outcome = gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0).get(timeout=10)
        took = time.perf_counter() - start
        other.kill()
        assert outcome == (-1, errno.EAGAIN)
        assert 0.3 <= took < 3.0, took
        assert len(ticks) >= 5, "the hub did not run the other greenlet while the call waited"
        assert lib.green_fast_waits() > before
    finally:
        a.close()
        b.close()


def test_a_receive_timeout_shorter_than_its_lookup_still_ends_the_wait():
    """SO_RCVTIMEO is read only once a wait has lasted 3 ms (most never
    do): a 1 ms timeout then ends the call at once, with EAGAIN."""
    ping_pong(1)
    a, b = socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 1000))
    try:
        start = time.perf_counter()
        outcome = gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0).get(timeout=10)
        took = time.perf_counter() - start
    finally:
        a.close()
        b.close()
    assert outcome == (-1, errno.EAGAIN)
    assert 0.001 <= took < 0.5, took


def test_two_greenlets_waiting_on_one_socket_both_wake():
    ping_pong(1)
    a, b = socketpair()
    try:
        readers = [gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0) for _ in range(2)]
        gevent.sleep(0.01)
        b.send(b"x")
        gevent.sleep(0.01)
        b.send(b"y")
        assert sorted(r.get(timeout=10) for r in readers) == [(1, 0), (1, 0)]
    finally:
        a.close()
        b.close()


def test_close_twin_wakes_a_fast_waiter_with_ebadf():
    ping_pong(1)
    a, b = socketpair()
    fd = a.detach()
    try:
        reader = gevent.spawn(call_green, "recv", fd, buffer(1), 1, 0)
        gevent.sleep(0.01)
        assert call_green("close", fd) == (0, 0)
        assert reader.get(timeout=10) == (-1, errno.EBADF)
    finally:
        b.close()


def test_a_new_hub_after_the_old_one_was_destroyed_waits_correctly():
    """The attached hub is deallocated and another is made in the same
    thread: the C path must never use the old one's loop."""
    outcome = []

    def thread_body():
        for _ in range(3):
            ping_pong(5)
            hub = get_hub()
            hub.destroy(destroy_loop=True)
            del hub
            gc.collect()
        outcome.append("done")

    thread = threading.Thread(target=thread_body)
    thread.start()
    thread.join(60)
    assert outcome == ["done"]


def recv_calls_that_waited() -> int:
    figures = greenify.stats()
    return figures["recv"].calls if "recv" in figures else 0


def test_threads_with_hubs_of_their_own_each_wait_in_c():
    """Every recv that had to wait did so in C, but the first on each new
    hub (the bridge attaches it).  How many had to wait depends on the
    machine's pace (a reader scheduled after its byte came never waits), so
    the count of C waits is compared with the waits that happened."""
    before, waited_before = lib.green_fast_waits(), recv_calls_that_waited()
    errors = []

    def thread_body():
        try:
            ping_pong(30)
        except BaseException as exc:  # noqa: B902 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread_body) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    waited = recv_calls_that_waited() - waited_before
    assert waited >= 4  # each thread's reader waited at least once
    assert lib.green_fast_waits() - before >= waited - 4


def reuse_numbers(close, rounds: int = 3) -> "tuple[set, list]":
    """Wait on a socket, then close it with `close` and wait on a new one
    that gets its number, with no loop iteration in between: (the numbers,
    the seconds each wait after the first took)."""
    numbers, seconds = set(), []
    for round_number in range(rounds):
        a, b = socketpair()
        numbers.add(a.fileno())
        gevent.spawn_later(0.01, b.send, b"x")
        start = time.perf_counter()
        assert call_green("recv", a.fileno(), buffer(1), 1, 0) == (1, 0)
        if round_number:
            seconds.append(time.perf_counter() - start)
        close(a)
        b.close()
    return numbers, seconds


def test_a_number_closed_through_the_close_twin_and_reused_is_registered_at_once():
    """The close twin moves the number's generation: the next wait on it
    tells libev the fd anew and is woken by the new file's data at once."""
    ping_pong(1)

    def close_twin(sock):
        assert call_green("close", sock.detach()) == (0, 0)

    numbers, seconds = gevent.spawn(reuse_numbers, close_twin).get(timeout=10)
    assert len(numbers) == 1  # the number really was reused each time
    assert max(seconds) < SWEEP_INTERVAL_S / 2, seconds  # woken by the data (10 ms), not by a sweep


def test_numbers_other_greenlets_waited_on_closed_and_reused_are_registered_at_once():
    """Twenty readers woken together, their sockets closed by Python (not
    the close twin), and a new reader waiting on a reused number before the
    loop runs again: its watcher was last stopped in this iteration by
    another greenlet's wait, so libev is told the fd anew and the data
    wakes it, not a sweep."""
    ping_pong(1)
    for _ in range(3):
        pairs = [socketpair() for _ in range(20)]
        numbers = {a.fileno() for a, _ in pairs}
        for _, b in pairs:
            gevent.spawn_later(0.01, b.send, b"x")
        readers = [gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0) for a, _ in pairs]
        gevent.joinall(readers, raise_error=True)
        for a, b in pairs:
            a.close()
            b.close()
        a, b = socketpair()
        assert a.fileno() in numbers  # a number one of the readers waited on
        gevent.spawn_later(0.01, b.send, b"x")
        start = time.perf_counter()
        assert gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0).get(timeout=10) == (1, 0)
        took = time.perf_counter() - start
        a.close()
        b.close()
        assert took < SWEEP_INTERVAL_S / 2, f"woken after {took:.2f} s: by the sweep, not the data"


def test_a_number_closed_and_reused_behind_greenifys_back_is_registered_at_once():
    """Closed by Python (not the close twin) and reused by a new socket
    by the greenlet that waited on it, before the loop runs again: the
    number names another socket, so libev is told the fd anew and the data
    wakes the wait, not the hub's sweep (tests/wait/test_wake_after_reuse.py
    tries every other way of closing)."""
    ping_pong(1)
    numbers, seconds = gevent.spawn(reuse_numbers, lambda sock: sock.close()).get(timeout=10)
    assert len(numbers) == 1
    assert max(seconds) < SWEEP_INTERVAL_S / 2, seconds


def test_a_hub_replaced_while_still_referenced_is_let_go_safely():
    """The old hub outlives its replacement's attachment: when it finally
    goes, its callback must find its C state still there (it was released,
    not freed), and waits on the new hub go on."""
    outcome = []

    def thread_body():
        ping_pong(3)
        old_hub = get_hub()
        old_hub.destroy(destroy_loop=True)
        ping_pong(3)  # a new hub, attached while the old one is still referenced
        del old_hub
        gc.collect()
        ping_pong(3)
        outcome.append("done")

    thread = threading.Thread(target=thread_body)
    thread.start()
    thread.join(60)
    assert outcome == ["done"]
