"""The common wait below Python (csrc/green_fastwait.c): one descriptor, no
deadline, on gevent's default loop.  It must be taken where it applies and
give way to the general bridge everywhere else, with the same results."""
from __future__ import annotations

import errno
import gc
import socket
import struct
import threading

import gevent
import pytest
from gevent.hub import get_hub

from green_support import buffer, call_green, socketpair
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


def test_a_wait_with_a_deadline_takes_the_bridge():
    ping_pong(1)
    a, b = socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))  # the wait has a deadline
    try:
        before = lib.green_fast_waits()
        glet = gevent.spawn(call_green, "recv", a.fileno(), buffer(1), 1, 0)
        gevent.sleep(0.01)
        b.send(b"x")
        assert glet.get(timeout=10) == (1, 0)
        assert lib.green_fast_waits() == before
    finally:
        a.close()
        b.close()


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


def test_threads_with_hubs_of_their_own_each_wait_in_c():
    before = lib.green_fast_waits()
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
    assert lib.green_fast_waits() - before >= 4 * 29


def test_a_number_closed_and_reused_behind_greenifys_back_is_registered_anew():
    """Woken, then the socket is closed by Python (not the close twin) and
    its number reused by a new socket before the loop runs again: the next
    wait on that number must be registered with the kernel anew, or it
    would never wake."""
    ping_pong(1)

    def reuse_numbers():
        numbers = set()
        for _ in range(5):
            a, b = socketpair()
            numbers.add(a.fileno())
            gevent.spawn_later(0.01, b.send, b"x")
            assert call_green("recv", a.fileno(), buffer(1), 1, 0) == (1, 0)
            a.close()
            b.close()
        return numbers

    numbers = gevent.spawn(reuse_numbers).get(timeout=10)
    assert len(numbers) == 1  # the number really was reused each time


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
