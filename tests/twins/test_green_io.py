"""The socket and file twins: fast path, cooperative waits, libc's results."""
from __future__ import annotations

import errno
import os
import socket
import struct
import time

import gevent
import pytest

import greenify
from tests.support.green_support import (buffer, call_green, call_libc, drain_in_background, fd_flags, run_concurrently, send_later,
                           socketpair)
from greenify._green import ffi, lib


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


def test_recv_ready_returns_data_and_leaves_errno_alone():
    a, b = socketpair()
    b.sendall(b"hello")
    ffi.errno = 1234
    buf = buffer(16)
    assert lib.green_recv(a.fileno(), buf, 16, 0) == 5
    assert ffi.buffer(buf, 5)[:] == b"hello"
    assert ffi.errno == 1234


def test_recv_waits_on_the_hub_and_leaves_errno_alone_after_waiting():
    a, b = socketpair()
    send_later(b, b"late", 0.1)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(5)])
    buf = buffer(16)
    ffi.errno = 77
    assert lib.green_recv(a.fileno(), buf, 16, 0) == 4
    assert ffi.errno == 77
    assert ffi.buffer(buf, 4)[:] == b"late"
    ticker.join()
    assert len(ticks) == 5  # the hub kept running other greenlets during the wait


def test_twenty_recv_waits_run_concurrently():
    pairs = [socketpair() for _ in range(20)]

    def wait_one(i):
        a, b = pairs[i]
        send_later(b, b"x", 0.2)
        buf = buffer(4)
        return lib.green_recv(a.fileno(), buf, 4, 0)

    values, took = run_concurrently(20, wait_one)
    assert values == [1] * 20
    assert took < 1.0, f"20 waits of 0.2 s took {took:.2f} s: they did not overlap (serial: 4 s)"


def test_nonblocking_fd_gets_eagain_at_once():
    a, b = socketpair(blocking=False)
    start = time.monotonic()
    assert call_green("recv", a.fileno(), buffer(4), 4, 0) == (-1, errno.EAGAIN)
    assert time.monotonic() - start < 1.0


def test_msg_dontwait_gets_eagain_at_once():
    a, b = socketpair()
    assert call_green("recv", a.fileno(), buffer(4), 4, socket.MSG_DONTWAIT) == (-1, errno.EAGAIN)


def test_so_rcvtimeo_ends_the_wait_with_eagain():
    a, b = socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 150000))
    start = time.monotonic()
    assert call_green("recv", a.fileno(), buffer(4), 4, 0) == (-1, errno.EAGAIN)
    took = time.monotonic() - start
    assert 0.14 <= took < 1.5


def test_so_sndtimeo_ends_a_full_send_with_eagain_or_partial_count():
    a, b = socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 100000))
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = b"x" * (4 << 20)
    result, err = call_green("send", a.fileno(), data, len(data), 0)
    assert 0 < result < len(data)  # as the kernel: the count sent before the timeout
    result, err = call_green("send", a.fileno(), data, len(data), 0)
    assert (result, err) == (-1, errno.EAGAIN)


def test_partial_read_returns_what_is_there():
    a, b = socketpair()
    b.sendall(b"abc")
    assert call_green("recv", a.fileno(), buffer(100), 100, 0)[0] == 3


def test_blocking_send_of_a_large_buffer_sends_all_while_the_peer_drains():
    a, b = socketpair()
    data = os.urandom(3 << 20)
    drainer, received = drain_in_background(b, len(data))
    assert call_green("send", a.fileno(), data, len(data), 0) == (len(data), 0)
    drainer.join(timeout=10)
    assert bytes(received) == data


def test_msg_waitall_waits_for_every_byte():
    a, b = socketpair()
    send_later(b, b"ab", 0.05)
    send_later(b, b"cd", 0.15)
    buf = buffer(4)
    assert call_green("recv", a.fileno(), buf, 4, socket.MSG_WAITALL) == (4, 0)
    assert ffi.buffer(buf, 4)[:] == b"abcd"


def test_msg_waitall_returns_the_short_count_at_eof():
    a, b = socketpair()
    b.sendall(b"ab")
    gevent.spawn_later(0.05, b.shutdown, socket.SHUT_WR)
    assert call_green("recv", a.fileno(), buffer(8), 8, socket.MSG_WAITALL) == (2, 0)


def test_recv_returns_zero_at_eof():
    a, b = socketpair()
    gevent.spawn_later(0.05, b.close)
    assert call_green("recv", a.fileno(), buffer(8), 8, 0) == (0, 0)


def test_recvfrom_and_sendto_on_datagrams_keep_addresses():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    gevent.spawn_later(0.05, client.sendto, b"ping", server.getsockname())
    addr = ffi.new("char[]", 128)
    addrlen = ffi.new("socklen_t *", 128)
    buf = buffer(16)
    n = lib.green_recvfrom(server.fileno(), buf, 16, 0, ffi.cast("struct sockaddr *", addr), addrlen)
    assert n == 4 and ffi.buffer(buf, 4)[:] == b"ping"
    family, port = struct.unpack("!xxH", ffi.buffer(addr, 4)[:])[0:1] * 0 or (None, None)
    port = struct.unpack("!H", ffi.buffer(addr, 4)[2:4])[0]
    assert port == client.getsockname()[1]
    assert addrlen[0] == 16
    sockaddr = ffi.new("char[]", ffi.buffer(addr, 16)[:])
    assert lib.green_sendto(server.fileno(), b"pong", 4, 0, ffi.cast("struct sockaddr *", sockaddr), 16) == 4
    assert client.recv(16) == b"pong"


def test_recvmsg_and_sendmsg_move_scattered_buffers():
    a, b = socketpair()
    parts = [buffer(3), buffer(5)]
    iov = ffi.new("struct iovec[2]")
    for slot, part in zip(iov, parts):
        slot.iov_base = part
        slot.iov_len = len(ffi.buffer(part))
    msg = ffi.new("struct msghdr *")
    msg.msg_iov = iov
    msg.msg_iovlen = 2
    send_later(b, b"abcdefgh", 0.05)
    assert lib.green_recvmsg(a.fileno(), msg, 0) == 8
    assert ffi.buffer(parts[0])[:] + ffi.buffer(parts[1])[:] == b"abcdefgh"
    out = [ffi.new("char[]", b"xy"), ffi.new("char[]", b"zw")]
    send_iov = ffi.new("struct iovec[2]")
    for slot, part in zip(send_iov, out):
        slot.iov_base = part
        slot.iov_len = 2
    send_msg = ffi.new("struct msghdr *")
    send_msg.msg_iov = send_iov
    send_msg.msg_iovlen = 2
    assert lib.green_sendmsg(a.fileno(), send_msg, 0) == 4
    assert b.recv(8) == b"xyzw"


def test_sendmsg_sends_a_large_scattered_message_in_full():
    a, b = socketpair()
    chunks = [os.urandom(1 << 20) for _ in range(3)]
    keep = [ffi.from_buffer(c) for c in chunks]
    iov = ffi.new("struct iovec[3]")
    for slot, part, c in zip(iov, keep, chunks):
        slot.iov_base = part
        slot.iov_len = len(c)
    msg = ffi.new("struct msghdr *")
    msg.msg_iov = iov
    msg.msg_iovlen = 3
    drainer, received = drain_in_background(b, 3 << 20)
    assert lib.green_sendmsg(a.fileno(), msg, 0) == 3 << 20
    drainer.join(timeout=10)
    assert bytes(received) == b"".join(chunks)


def test_read_and_write_on_sockets_wait_cooperatively():
    a, b = socketpair()
    send_later(b, b"sock", 0.05)
    buf = buffer(8)
    assert call_green("read", a.fileno(), buf, 8) == (4, 0)
    assert call_green("write", a.fileno(), b"back", 4) == (4, 0)
    assert b.recv(8) == b"back"


def test_read_of_zero_bytes_does_not_consume_a_datagram():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.send(b"dgram")
    assert call_green("read", a.fileno(), buffer(1), 0) == call_libc("read", a.fileno(), None, 0)
    assert a.recv(16) == b"dgram"


def test_read_on_a_pipe_waits_cooperatively():
    r, w = os.pipe()
    try:
        gevent.spawn_later(0.1, os.write, w, b"pipe")
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(5)])
        buf = buffer(8)
        assert call_green("read", r, buf, 8) == (4, 0)
        assert ffi.buffer(buf, 4)[:] == b"pipe"
        ticker.join()
        assert len(ticks) == 5
    finally:
        os.close(r)
        os.close(w)


def test_write_to_a_full_pipe_waits_cooperatively():
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, b"x" * 65536)
        except BlockingIOError:
            pass
        os.set_blocking(w, True)
        gevent.spawn_later(0.1, os.read, r, 1 << 20)
        start = time.monotonic()
        assert call_green("write", w, b"y", 1) == (1, 0)
        assert time.monotonic() - start >= 0.09
    finally:
        os.close(r)
        os.close(w)


def test_read_of_a_nonblocking_pipe_gets_eagain():
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        assert call_green("read", r, buffer(4), 4) == (-1, errno.EAGAIN)
    finally:
        os.close(r)
        os.close(w)


def test_read_and_write_on_regular_files(tmp_path):
    path = tmp_path / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert call_green("write", fd, b"file data", 9) == (9, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        buf = buffer(32)
        assert call_green("read", fd, buf, 32) == (9, 0)
        assert call_green("read", fd, buf, 32) == (0, 0)
    finally:
        os.close(fd)


def test_readv_and_writev_on_pipes_and_sockets():
    for make in (lambda: os.pipe(), lambda: tuple(s.detach() for s in socket.socketpair())):
        r, w = make()
        try:
            out = [ffi.new("char[]", b"ab"), ffi.new("char[]", b"cde")]
            iov = ffi.new("struct iovec[2]")
            for slot, part, size in zip(iov, out, (2, 3)):
                slot.iov_base = part
                slot.iov_len = size
            gevent.spawn_later(0.05, lib.green_writev, w, iov, 2)
            parts = [buffer(1), buffer(4)]
            riov = ffi.new("struct iovec[2]")
            for slot, part, size in zip(riov, parts, (1, 4)):
                slot.iov_base = part
                slot.iov_len = size
            assert lib.green_readv(r, riov, 2) == 5
            assert ffi.buffer(parts[0], 1)[:] + ffi.buffer(parts[1], 4)[:] == b"abcde"
        finally:
            os.close(r)
            os.close(w)


def listening_socket():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


def sockaddr_of(address):
    raw = socket.inet_aton(address[0])
    data = struct.pack("=H", socket.AF_INET) + struct.pack("!H", address[1]) + raw + b"\0" * 8
    return ffi.new("char[]", data), len(data)


def test_connect_succeeds_and_restores_the_socket_flags():
    server = listening_socket()
    client = socket.socket()
    before = fd_flags(client.fileno())
    addr, size = sockaddr_of(server.getsockname())
    assert call_green("connect", client.fileno(), ffi.cast("struct sockaddr *", addr), size) == (0, 0)
    assert fd_flags(client.fileno()) == before
    conn, _ = server.accept()
    conn.sendall(b"hi")
    assert client.recv(2) == b"hi"


def test_connect_reports_econnrefused_like_libc():
    server = listening_socket()
    address = server.getsockname()
    server.close()
    addr, size = sockaddr_of(address)
    green_client, libc_client = socket.socket(), socket.socket()
    green = call_green("connect", green_client.fileno(), ffi.cast("struct sockaddr *", addr), size)
    native = call_libc("connect", libc_client.fileno(), ffi.buffer(addr)[:], size)
    assert green == native == (-1, errno.ECONNREFUSED)


def test_connect_on_a_nonblocking_socket_is_the_callers_own():
    server = listening_socket()
    client = socket.socket()
    client.setblocking(False)
    addr, size = sockaddr_of(server.getsockname())
    result, err = call_green("connect", client.fileno(), ffi.cast("struct sockaddr *", addr), size)
    assert (result, err) in ((-1, errno.EINPROGRESS), (0, 0))


def test_accept_waits_cooperatively_and_accept4_applies_flags():
    server = listening_socket()
    address = server.getsockname()
    gevent.spawn_later(0.05, lambda: socket.create_connection(address))
    fd = lib.green_accept(server.fileno(), ffi.NULL, ffi.NULL)
    assert fd >= 0
    assert not fd_flags(fd) & os.O_NONBLOCK
    os.close(fd)
    keep = []
    gevent.spawn_later(0.05, lambda: keep.append(socket.create_connection(address)))
    fd = lib.green_accept4(server.fileno(), ffi.NULL, ffi.NULL, socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    assert fd >= 0
    assert fd_flags(fd) & os.O_NONBLOCK
    os.close(fd)


def test_accept_on_a_nonblocking_listener_gets_eagain():
    server = listening_socket()
    server.setblocking(False)
    assert call_green("accept", server.fileno(), ffi.NULL, ffi.NULL) == (-1, errno.EAGAIN)


BAD_FD = 987


@pytest.mark.parametrize("name, args", [
    ("recv", (BAD_FD, None, 4, 0)),
    ("send", (BAD_FD, b"abcd", 4, 0)),
    ("read", (BAD_FD, None, 4)),
    ("write", (BAD_FD, b"abcd", 4)),
    ("accept", (BAD_FD, None, None)),
    ("connect", (BAD_FD, None, 16)),
])
def test_a_bad_fd_fails_as_libc_does(name, args):
    green_args = [ffi.NULL if a is None else a for a in args]
    if name in ("recv", "read"):
        green_args[1] = buffer(4)
    native_args = [ctypes_arg(a) for a in args]
    assert call_green(name, *green_args) == call_libc(name, *native_args)


def ctypes_arg(value):
    import ctypes
    if value is None:
        return None
    if isinstance(value, bytes):
        return ctypes.c_char_p(value)
    return value


def test_a_bad_pointer_fails_with_efault_as_libc_does():
    a, b = socketpair()
    b.sendall(b"data" * 2)
    bad = ffi.cast("void *", 8)
    assert call_green("recv", a.fileno(), bad, 4, 0) == call_libc("recv", a.fileno(), 8, 4, 0) == (-1, errno.EFAULT)
    assert call_green("send", a.fileno(), bad, 4, 0) == (-1, errno.EFAULT)


def test_a_huge_length_fails_as_libc_does():
    a, b = socketpair()
    b.sendall(b"z")
    huge = (1 << 64) - 1  # a negative length, as a size_t
    green = call_green("recv", a.fileno(), ffi.NULL, huge, 0)
    native = call_libc("recv", a.fileno(), None, ctypes_size(huge), 0)
    assert green[0] == native[0] == -1
    assert green[1] == native[1]


def ctypes_size(value):
    import ctypes
    return ctypes.c_size_t(value)


def test_a_closed_socket_reads_eof_and_writes_epipe_as_libc_does():
    import signal
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        a, b = socketpair()
        b.close()
        assert call_green("recv", a.fileno(), buffer(4), 4, 0) == (0, 0)
        assert call_green("send", a.fileno(), b"x", 1, 0) == (-1, errno.EPIPE)
    finally:
        signal.signal(signal.SIGPIPE, old)


def test_fortified_recv_chk_passes_through_when_sizes_fit():
    a, b = socketpair()
    b.sendall(b"chk")
    buf = buffer(8)
    assert lib.green___recv_chk(a.fileno(), buf, 8, 8, 0) == 3
    b.sendall(b"read")
    assert lib.green___read_chk(a.fileno(), buf, 8, 8) == 4
    b.sendall(b"from")
    assert lib.green___recvfrom_chk(a.fileno(), buf, 8, 8, 0, ffi.NULL, ffi.NULL) == 4


def test_fortified_recv_chk_aborts_like_glibc_on_overflow():
    import subprocess
    import sys
    code = (
        "import socket, greenify\n"
        "from greenify._green import ffi, lib\n"
        "greenify.greenify()\n"
        "a, b = socket.socketpair(); b.sendall(b'x' * 16)\n"
        "lib.green___recv_chk(a.fileno(), ffi.new('char[]', 4), 16, 4, 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert proc.returncode == -6  # SIGABRT from __chk_fail, as glibc's own __recv_chk
    assert b"buffer overflow detected" in proc.stderr


def full_unix_listener(tmp_path):
    """A Unix listener whose backlog is full: a non-blocking connect to it gets EAGAIN."""
    path = str(tmp_path / "listener.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break
        queued.append(client)
    sockaddr = ffi.new("char[]", struct.pack("=H", socket.AF_UNIX) + path.encode() + b"\0")
    return listener, queued, sockaddr, len(ffi.buffer(sockaddr))


def test_connect_to_a_full_unix_backlog_waits_cooperatively_for_room(tmp_path):
    listener, queued, sockaddr, size = full_unix_listener(tmp_path)
    gevent.get_hub().loop.update_now()  # libev times from its cached clock, stale after a long test
    gevent.spawn_later(0.2, listener.accept)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    start = time.monotonic()
    assert call_green("connect", client.fileno(), ffi.cast("struct sockaddr *", sockaddr), size) == (0, 0)
    assert 0.19 <= time.monotonic() - start < 3.0
    ticker.join()
    assert len(ticks) == 10  # the hub ran while connect waited for room
    assert not fd_flags(client.fileno()) & os.O_NONBLOCK


def test_connect_to_a_full_unix_backlog_ends_with_eagain_at_so_sndtimeo(tmp_path):
    listener, queued, sockaddr, size = full_unix_listener(tmp_path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 150000))
    start = time.monotonic()
    assert call_green("connect", client.fileno(), ffi.cast("struct sockaddr *", sockaddr), size) == (-1, errno.EAGAIN)
    assert 0.14 <= time.monotonic() - start < 1.5
    # libc's own blocking connect reports the same
    native = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    native.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 150000))
    assert call_libc("connect", native.fileno(), ffi.buffer(sockaddr)[:], size) == (-1, errno.EAGAIN)
