"""Calling the green functions and libc's originals side by side.

The green twins are called through cffi (which releases the GIL, as drivers
do around their network calls) or through ctypes.PyDLL (which keeps it).
libc's originals are called through ctypes with errno captured, so a test
can compare results and errno exactly.
"""
from __future__ import annotations

import ctypes
import os
import resource
import socket
import time
from typing import Callable, Tuple

import gevent
import pytest

from greenify._green import ffi, lib

libc = ctypes.CDLL(None, use_errno=True)


def green_module_path() -> str:
    import greenify._green as module
    return module.__file__


INT_RESULTS = {"connect", "accept", "accept4", "poll", "ppoll", "select", "pselect"}


def call_libc(name: str, *args) -> Tuple[int, int]:
    """Call libc's `name`, returning (result, errno)."""
    func = getattr(libc, name)
    func.restype = ctypes.c_int if name in INT_RESULTS else ctypes.c_ssize_t
    ctypes.set_errno(0)
    result = func(*args)
    return result, ctypes.get_errno()


def call_green(name: str, *args) -> Tuple[int, int]:
    """Call green_`name` through cffi (GIL released), returning (result, errno)."""
    ffi.errno = 0
    result = getattr(lib, "green_" + name)(*args)
    return result, ffi.errno


def buffer(size: int):
    return ffi.new("char[]", size)


def socketpair(blocking: bool = True) -> Tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(blocking)
    b.setblocking(True)
    return a, b


def tcp_pair() -> Tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: (client, server side)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    listener.close()
    return client, conn


def elapsed(func: Callable[[], object]) -> float:
    start = time.monotonic()
    func()
    return time.monotonic() - start


def run_concurrently(count: int, func: Callable[[int], object]) -> Tuple[list, float]:
    """Spawn `count` greenlets of func(i); return their values and the wall time."""
    start = time.monotonic()
    greenlets = [gevent.spawn(func, i) for i in range(count)]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets], time.monotonic() - start


def send_later(sock: socket.socket, data: bytes, delay: float) -> gevent.Greenlet:
    """Send from a plain socket after a delay, from a hub timer (never blocks)."""
    return gevent.spawn_later(delay, sock.sendall, data)


def drain_in_background(sock: socket.socket, total: int) -> Tuple[gevent.Greenlet, bytearray]:
    """A greenlet that reads `total` bytes from a plain socket without ever
    blocking the hub, into the returned bytearray."""
    received = bytearray()

    def drain():
        sock.setblocking(False)
        while len(received) < total:
            try:
                received.extend(sock.recv(1 << 16))
            except BlockingIOError:
                gevent.sleep(0.001)

    return gevent.spawn(drain), received


def open_fds() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def rss_kb() -> int:
    """This process's resident memory, in KiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def _asan_loaded() -> bool:
    with open("/proc/self/maps") as maps:
        return "/libasan" in maps.read()


# Under AddressSanitizer (`make sanitize`) freed memory waits in a quarantine
# of up to 256 MiB before it is reused, so resident memory grows with every
# allocation whatever the code does: a test that measures its growth cannot
# hold there and skips, saying so.
memory_growth_unmeasurable_under_asan = pytest.mark.skipif(
    _asan_loaded(), reason="resident memory cannot be measured under ASan: its quarantine keeps freed memory")


def fd_flags(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def errno_name(code: int) -> str:
    import errno
    return errno.errorcode.get(code, str(code))


def twin_address(name: str) -> int:
    """The address of libc's `name`'s green twin, as a library's patched slot holds it."""
    from greenify.patching import patcher
    return patcher.green_twins()[name]


def pending_interruptions() -> dict:
    """Interruptions thrown into green waits and not delivered yet: greenlet -> exception."""
    from greenify.waiting import bridge as _bridge
    return _bridge.pending_interruptions()


def no_interruption_pending() -> bool:
    """Every interruption thrown into a green wait was delivered (what each
    test should leave behind)."""
    return not pending_interruptions()


def sweep_interval_s() -> float:
    """How often the hub's waiter looks for waits on descriptors closed behind greenify's back."""
    from greenify.waiting.bridge import SWEEP_INTERVAL_S
    return SWEEP_INTERVAL_S
