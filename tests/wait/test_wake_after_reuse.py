"""A wait wakes when its descriptor is ready, whatever happened to the
number before.

Descriptor numbers are shared by everything in the process: a gevent server
closes its client sockets in Python while C clients open theirs, and the
kernel hands out the lowest free number.  A number closed behind greenify's
back leaves the kernel's epoll set with its old file; a wait that trusted the
old registration would sleep until something else woke it.  These tests close
and reuse numbers every way a process can (the close twin, Python's close,
``os.close``, ``dup2``/``dup3`` onto the number, an unpatched library's
``close``), from the waiting greenlet, another greenlet and another thread,
with the data written by a greenlet or an OS thread, and assert that every
wait ends within a wide bound of its data's arrival.
"""
from __future__ import annotations

import ctypes
import os
import select
import socket
import threading
import time
from typing import Callable, Dict, List, Tuple

import gevent
import pytest

import greenify
from tests.support.green_support import buffer, call_green, socketpair
from greenify.waiting.bridge import SWEEP_INTERVAL_S
from greenify._green import ffi, lib

pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")

# A wake is on time within this bound on a busy 2-core machine; a wake that
# waited for the hub's once-a-second sweep takes 0.2-1 s.
WAKE_BOUND_S = 0.15
PEER_DELAY_S = 0.02
GREENLETS = 20
ROUNDS = 5

_libc = ctypes.CDLL(None, use_errno=True)


# --- the ways a number is closed and reused -----------------------------------

def _new_pair_by_dup(old: socket.socket, inheritable: bool) -> Tuple[socket.socket, socket.socket]:
    """A new socket pair whose first end takes ``old``'s number through
    dup2 (dup3 when not inheritable), as a library's dup2 would."""
    fresh, peer = socketpair()
    number = old.detach()  # the number stays open until dup2 replaces its file
    os.dup2(fresh.fileno(), number, inheritable=inheritable)
    fresh.close()
    return socket.socket(fileno=number), peer


def close_then_open(kind: str) -> Callable[[socket.socket], Tuple[socket.socket, socket.socket]]:
    """How a worker ends its socket and gets the next pair, for each way of
    closing; the next pair reuses the number whenever it is the lowest free."""
    def by_closing(close: Callable[[socket.socket], None]):
        def next_pair(old: socket.socket) -> Tuple[socket.socket, socket.socket]:
            close(old)
            return socketpair()
        return next_pair

    return {
        "close-twin": by_closing(lambda sock: lib.green_close(sock.detach())),
        "python-close": by_closing(lambda sock: sock.close()),
        "os-close": by_closing(lambda sock: os.close(sock.detach())),
        "unpatched-library-close": by_closing(lambda sock: _libc.close(sock.detach())),
        "dup2": lambda old: _new_pair_by_dup(old, inheritable=True),
        "dup3": lambda old: _new_pair_by_dup(old, inheritable=False),
    }[kind]


def run_closer(closer: str, action: Callable[[], object]) -> object:
    """Run the close (and reopen) in this greenlet, another greenlet or another thread."""
    if closer == "this-greenlet":
        return action()
    if closer == "another-greenlet":
        return gevent.spawn(action).get()
    result: List[object] = []
    thread = threading.Thread(target=lambda: result.append(action()))
    thread.start()
    thread.join()  # brief: closing and opening never block
    return result[0]


# --- the ways a C call waits ------------------------------------------------------

def fast_recv(fd: int) -> int:
    """One descriptor, no deadline: the wait below Python (csrc/wait/green_fastwait.c)."""
    return call_green("recv", fd, buffer(1), 1, 0)[0]


def bridge_recv(fd: int, idle: int) -> int:
    """Two descriptors: poll takes the general bridge, then recv."""
    fds = ffi.new("struct pollfd[2]")
    fds[0].fd, fds[0].events = fd, select.POLLIN
    fds[1].fd, fds[1].events = idle, select.POLLIN
    assert call_green("poll", fds, 2, -1) == (1, 0)
    return call_green("recv", fd, buffer(1), 1, 0)[0]


@pytest.fixture(scope="module")
def patched_recv(fixture_libs) -> Dict[str, Callable[[int], int]]:
    """fx_recv of fx_client through a patched PLT slot and a full-RELRO GOT."""
    calls = {}
    for variant in ("default", "relro"):
        path = str(fixture_libs[variant]["fx_client"])
        handle = ctypes.CDLL(path)
        greenify.patch_library(path)
        fx_recv = handle.fx_recv
        fx_recv.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int)

        def call(fd: int, fx_recv=fx_recv) -> int:
            return fx_recv(fd, ctypes.create_string_buffer(1), 1)
        calls[variant] = call
    yield calls
    for variant in ("default", "relro"):
        greenify.unpatch_library(str(fixture_libs[variant]["fx_client"]))


# --- the scenario ------------------------------------------------------------------

def write_later(peer: str, sock: socket.socket, written: List[float]) -> None:
    """Write one byte after PEER_DELAY_S from a greenlet or an OS thread,
    noting when."""
    def write() -> None:
        written.append(time.perf_counter())
        sock.send(b"x")

    if peer == "greenlet":
        gevent.spawn_later(PEER_DELAY_S, write)
    else:
        timer = threading.Timer(PEER_DELAY_S, write)
        timer.daemon = True
        timer.start()


def wake_latencies(receive: Callable[[int], int], kind: str) -> List[float]:
    """GREENLETS workers, each waiting ROUNDS times on a socket whose number
    was closed and reused the ``kind`` way (closers and peers varied among
    the workers); the seconds from each write to its call's return."""
    idle_a, idle_b = socketpair()
    next_pair = close_then_open(kind)
    latencies: List[float] = []

    def worker(index: int) -> None:
        closer = ("this-greenlet", "another-greenlet", "another-thread")[index % 3]
        peer = ("greenlet", "thread")[index // 3 % 2]
        a, b = socketpair()
        for _ in range(ROUNDS):
            written: List[float] = []
            write_later(peer, b, written)
            got = receive(a.fileno()) if receive is not bridge_recv else bridge_recv(a.fileno(), idle_a.fileno())
            returned = time.perf_counter()
            assert got == 1
            latencies.append(returned - written[0])
            old_b = b
            a, b = run_closer(closer, lambda old=a: next_pair(old))
            old_b.close()
        a.close()
        b.close()

    try:
        gevent.joinall([gevent.spawn(worker, i) for i in range(GREENLETS)], raise_error=True, timeout=60)
    finally:
        idle_a.close()
        idle_b.close()
    return latencies


CLOSE_KINDS = ["close-twin", "python-close", "os-close", "unpatched-library-close", "dup2", "dup3"]


def assert_woken_on_time(latencies: List[float]) -> None:
    assert len(latencies) == GREENLETS * ROUNDS
    late = sorted(latency for latency in latencies if latency > WAKE_BOUND_S)
    assert not late, (f"{len(late)} of {len(latencies)} waits woke late (worst {late[-1]:.3f} s; "
                      f"the sweep runs every {SWEEP_INTERVAL_S} s)")


@pytest.mark.parametrize("kind", CLOSE_KINDS)
def test_a_wait_below_python_wakes_on_a_reused_number_at_once(kind):
    assert_woken_on_time(wake_latencies(fast_recv, kind))


@pytest.mark.parametrize("kind", CLOSE_KINDS)
def test_a_wait_through_the_bridge_wakes_on_a_reused_number_at_once(kind):
    assert_woken_on_time(wake_latencies(bridge_recv, kind))


@pytest.mark.parametrize("variant", ["default", "relro"])
@pytest.mark.parametrize("kind", CLOSE_KINDS)
def test_a_patched_librarys_recv_wakes_on_a_reused_number_at_once(patched_recv, variant, kind):
    assert_woken_on_time(wake_latencies(patched_recv[variant], kind))
