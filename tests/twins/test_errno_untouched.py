"""Exactly libc: a call that succeeds leaves ``errno`` as it found it, and a
blocking call never answers EAGAIN unless the socket has a timeout.

Code that clears ``errno`` before a call and looks at it after breaks when a
twin's internal attempts (a ``send`` that finds a pipe, a probe that finds
nothing ready) leave their errors behind.  Each call below succeeds on each
kind of descriptor, once with the descriptor ready and once after a wait,
and ``errno`` must come back as it was set, as libc's does.
"""
from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import tempfile
from typing import Callable, Dict, Tuple

import gevent
import pytest

from tests.support.green_support import libc, tcp_pair
from greenify._green import ffi, lib

pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")

SENTINEL = 4242  # no errno has this value


def green_errno_after(name: str, *args) -> Tuple[int, int]:
    ffi.errno = SENTINEL
    result = getattr(lib, "green_" + name)(*args)
    return result, ffi.errno


def libc_errno_after(name: str, restype, *args) -> Tuple[int, int]:
    func = getattr(libc, name)
    func.restype = restype
    ctypes.set_errno(SENTINEL)
    result = func(*args)
    return result, ctypes.get_errno()


# descriptor kind -> () -> (the end to read, the end to write, cleanup)
def _socketpair():
    a, b = socket.socketpair()
    return a.detach(), b.detach()


def _tcp():
    client, server = tcp_pair()
    return client.detach(), server.detach()


def _pipe():
    read_end, write_end = os.pipe()
    return read_end, write_end


def _devnull():
    return os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_WRONLY)


def _file():
    fd, path = tempfile.mkstemp()
    os.write(fd, b"x" * 64)
    os.unlink(path)
    return os.dup(fd), fd


def _eventfd():
    fd = os.eventfd(0)
    return fd, os.dup(fd)


KINDS: Dict[str, Callable[[], Tuple[int, int]]] = {
    "unix-socket": _socketpair, "tcp": _tcp, "pipe": _pipe, "dev-null": _devnull, "file": _file,
    "eventfd": _eventfd,
}

DATA = (1).to_bytes(8, "little")  # what an eventfd takes: one 8-byte count


def _buffer(size: int):
    return ffi.new("char[]", size)


def _iovec(buf, size: int):
    iov = ffi.new("struct iovec *")
    iov.iov_base = buf
    iov.iov_len = size
    return iov


def green_write(call: str, fd: int, data: bytes) -> Tuple[int, int]:
    if call == "write":
        return green_errno_after("write", fd, data, len(data))
    buf = ffi.from_buffer(data)
    iov = _iovec(buf, len(data))
    return green_errno_after("writev", fd, iov, 1)


def libc_write(call: str, fd: int, data: bytes) -> Tuple[int, int]:
    if call == "write":
        return libc_errno_after("write", ctypes.c_ssize_t, fd, data, len(data))
    buf = ctypes.create_string_buffer(data, len(data))

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    iov = Iovec(ctypes.addressof(buf), len(data))
    return libc_errno_after("writev", ctypes.c_ssize_t, fd, ctypes.byref(iov), 1)


def green_read(call: str, fd: int, size: int) -> Tuple[int, int]:
    buf = _buffer(size)
    if call == "read":
        return green_errno_after("read", fd, buf, size)
    iov = _iovec(buf, size)
    return green_errno_after("readv", fd, iov, 1)


def libc_read(call: str, fd: int, size: int) -> Tuple[int, int]:
    buf = ctypes.create_string_buffer(size)
    if call == "read":
        return libc_errno_after("read", ctypes.c_ssize_t, fd, buf, size)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    iov = Iovec(ctypes.addressof(buf), size)
    return libc_errno_after("readv", ctypes.c_ssize_t, fd, ctypes.byref(iov), 1)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("call", ["write", "writev"])
def test_a_write_that_succeeds_leaves_errno_as_libc_does(kind, call):
    outcomes = {}
    for side, write in (("libc", libc_write), ("green", green_write)):
        read_end, write_end = KINDS[kind]()
        try:
            outcomes[side] = gevent.spawn(write, call, write_end, DATA).get(timeout=10)
        finally:
            os.close(read_end)
            os.close(write_end)
    assert outcomes["green"] == outcomes["libc"]
    assert outcomes["green"][1] == SENTINEL


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("call", ["read", "readv"])
@pytest.mark.parametrize("ready", [True, False], ids=["ready", "after-a-wait"])
def test_a_read_that_succeeds_leaves_errno_as_libc_does(kind, call, ready):
    if not ready and kind in ("dev-null", "file"):
        pytest.skip("always ready: no wait to make")
    outcomes = {}
    for side, read in (("libc", libc_read), ("green", green_read)):
        read_end, write_end = KINDS[kind]()
        try:
            if ready:
                os.write(write_end, DATA)
                outcomes[side] = gevent.spawn(read, call, read_end, 8).get(timeout=10)
            elif side == "libc":
                os.write(write_end, DATA)  # libc would block the test: its answer once data is there
                outcomes[side] = read(call, read_end, 8)
            else:
                later = gevent.spawn_later(0.05, os.write, write_end, DATA)
                outcomes[side] = gevent.spawn(read, call, read_end, 8).get(timeout=10)
                later.join()
        finally:
            os.close(read_end)
            os.close(write_end)
    assert outcomes["green"] == outcomes["libc"]
    assert outcomes["green"][1] == SENTINEL


@pytest.mark.parametrize("kind", ["unix-socket", "tcp"])
@pytest.mark.parametrize("call", ["recv", "recvfrom", "send", "sendto", "poll"])
@pytest.mark.parametrize("ready", [True, False], ids=["ready", "after-a-wait"])
def test_socket_calls_that_succeed_leave_errno_untouched(kind, call, ready):
    a, b = KINDS[kind]()
    try:
        buf = _buffer(8)
        if call in ("send", "sendto"):
            args = (b, DATA, 8, 0) if call == "send" else (b, DATA, 8, 0, ffi.NULL, 0)
            expected = 8
        elif call == "poll":
            fds = ffi.new("struct pollfd[1]")
            fds[0].fd, fds[0].events = a, select.POLLIN
            args, expected = (fds, 1, -1), 1
        else:
            args = (a, buf, 8, 0) if call == "recv" else (a, buf, 8, 0, ffi.NULL, ffi.NULL)
            expected = 8
        if call not in ("send", "sendto"):
            if ready:
                os.write(b, DATA)
            else:
                gevent.spawn_later(0.05, os.write, b, DATA)
        assert gevent.spawn(green_errno_after, call, *args).get(timeout=10) == (expected, SENTINEL)
    finally:
        os.close(a)
        os.close(b)


@pytest.mark.parametrize("call", ["recv", "recvfrom", "read"])
def test_a_zero_length_receive_on_a_blocking_tcp_socket_waits_for_data_then_returns_zero(call):
    """libc's recv(fd, buf, 0, 0) on a blocking TCP socket sleeps until data
    arrives and returns 0 (the data stays queued); it never says EAGAIN."""
    client, server = tcp_pair()
    try:
        buf = _buffer(1)
        args = {"recv": (client.fileno(), buf, 0, 0), "recvfrom": (client.fileno(), buf, 0, 0, ffi.NULL, ffi.NULL),
                "read": (client.fileno(), buf, 0)}[call]
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
        later = gevent.spawn_later(0.2, server.send, b"x")
        result = gevent.spawn(green_errno_after, call, *args).get(timeout=10)
        ticker.kill()
        later.join()
        if call == "read":  # read(fd, buf, 0) never waits: libc returns 0 at once
            assert result == (0, SENTINEL)
            return
        assert result == (0, SENTINEL)
        assert len(ticks) >= 5, "the hub ran other greenlets while the call waited"
        assert client.recv(1) == b"x"  # nothing was consumed
    finally:
        client.close()
        server.close()


def test_a_zero_length_receive_answers_as_libc_when_data_is_there():
    client, server = tcp_pair()
    try:
        server.send(b"x")
        gevent.sleep(0.01)
        green = gevent.spawn(green_errno_after, "recv", client.fileno(), _buffer(1), 0, 0).get(timeout=10)
        native = libc_errno_after("recv", ctypes.c_ssize_t, client.fileno(), ctypes.create_string_buffer(1), 0, 0)
        assert green == native == (0, SENTINEL)
    finally:
        client.close()
        server.close()


def test_connect_accept_close_and_sleeps_that_succeed_leave_errno_untouched():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        def accept_later():
            gevent.sleep(0.05)
            return green_errno_after("accept", listener.fileno(), ffi.NULL, ffi.NULL)

        acceptor = gevent.spawn(accept_later)
        client = socket.socket()
        sockaddr_in = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton("127.0.0.1")
        address = ffi.from_buffer(bytearray(sockaddr_in + bytes(8)))
        connected = gevent.spawn(green_errno_after, "connect", client.fileno(),
                                 ffi.cast("struct sockaddr *", address), len(address))
        assert connected.get(timeout=10) == (0, SENTINEL)
        accepted, accept_errno = acceptor.get(timeout=10)
        assert accepted >= 0 and accept_errno == SENTINEL
        assert green_errno_after("close", accepted) == (0, SENTINEL)
        client.close()
        later = gevent.spawn(green_errno_after, "accept", listener.fileno(), ffi.NULL, ffi.NULL)  # waits
        gevent.sleep(0.05)
        other = socket.create_connection(("127.0.0.1", port))
        accepted, accept_errno = later.get(timeout=10)
        assert accepted >= 0 and accept_errno == SENTINEL
        os.close(accepted)
        other.close()
    finally:
        listener.close()
    assert gevent.spawn(green_errno_after, "usleep", 20000).get(timeout=10) == (0, SENTINEL)
    request = ffi.new("struct timespec *", {"tv_sec": 0, "tv_nsec": 20_000_000})
    assert gevent.spawn(green_errno_after, "nanosleep", request, ffi.NULL).get(timeout=10) == (0, SENTINEL)


@pytest.mark.parametrize("flags", [0, socket.MSG_WAITALL], ids=["plain", "waitall"])
@pytest.mark.parametrize("kind", ["tcp", "unix-socket"])
def test_a_zero_length_receive_at_the_socket_timeout_answers_as_the_kernel(kind, flags):
    """At SO_RCVTIMEO, TCP's zero-length receive returns 0 (its loop ends
    with the wait), a Unix socket's says EAGAIN: the twin as libc."""
    outcomes = {}
    for side in ("libc", "green"):
        a, b = KINDS[kind]()
        sock = socket.socket(fileno=os.dup(a))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50000))
        sock.close()
        try:
            if side == "libc":
                outcomes[side] = libc_errno_after("recv", ctypes.c_ssize_t, a, ctypes.create_string_buffer(1), 0,
                                                  flags)
            else:
                outcomes[side] = gevent.spawn(green_errno_after, "recv", a, _buffer(1), 0, flags).get(timeout=10)
        finally:
            os.close(a)
            os.close(b)
    assert outcomes["green"] == outcomes["libc"]


def test_a_send_on_a_non_blocking_socket_returns_what_one_attempt_took_while_the_peer_drains():
    """libc's send on a non-blocking socket returns after the kernel's one
    attempt; the twin may not go on sending what the draining peer makes
    room for (psycopg2's flush loop never saw a partial write)."""
    import threading
    a, b = socket.socketpair()
    a.setblocking(False)
    data = b"x" * (64 << 20)
    stop = threading.Event()

    def drain():
        b.settimeout(0.2)
        while not stop.is_set():
            try:
                b.recv(1 << 20)
            except (socket.timeout, OSError):
                pass
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        sent, err = gevent.spawn(green_errno_after, "send", a.fileno(), data, len(data), 0).get(timeout=30)
    finally:
        stop.set()
        reader.join()
        a.close()
        b.close()
    assert 0 < sent < len(data), sent  # one attempt: at most what the socket buffers held
    assert err == SENTINEL
