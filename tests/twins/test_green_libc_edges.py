"""libc's results on the edges where the green twins once differed (issue 13).

Each case runs the call through libc and through its green twin, on twin
descriptors in the same state, in a greenlet with a hub (where the twin may
wait), and compares result, errno and data.  A twin that waited where libc
fails at once would hang: every call runs under a gevent.Timeout, so such a
regression fails instead.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time

import gevent
import pytest

import greenify
from tests.support.green_support import tcp_pair
from tests.support.libc_twins import BAD_POINTER, KERNEL_POINTER, call, ffi, iovec, msghdr

GUARD_S = 5.0  # far longer than any case takes; a twin that waits for ever fails here


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


@pytest.fixture(autouse=True)
def no_bridge_failure(caplog):
    """No case may reach the wait bridge with a descriptor it cannot watch."""
    with caplog.at_level(logging.ERROR, logger="greenify"):
        yield
    assert not [r for r in caplog.records if "bridge" in r.getMessage()], caplog.text


def green(name, *args):
    with gevent.Timeout(GUARD_S):
        return call("green", name, *args)


def libc(name, *args):
    return call("libc", name, *args)


def same(make, name, args_of):
    """The same call through libc and through the twin, each on a fresh state
    from make() (the descriptors), with args_of(*descriptors) as arguments;
    the results must agree."""
    fds = make()
    native = libc(name, *args_of(*fds))
    fds = make()
    twin = green(name, *args_of(*fds))
    assert twin == native
    return twin


def buf(size):
    return ffi.new("char[]", size)


# ---- accept on what cannot accept ----

def connected_pair():
    return socket.socketpair()


def datagram_socket():
    return (socket.socket(socket.AF_INET, socket.SOCK_DGRAM),)


def pipe_ends():
    return os.pipe()


def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    return (server,)


def fileno(thing):
    return thing if isinstance(thing, int) else thing.fileno()


@pytest.mark.parametrize("make, expected", [
    (connected_pair, errno.EINVAL),
    (datagram_socket, errno.EOPNOTSUPP),
    (pipe_ends, errno.ENOTSOCK),
    (lambda: (-1,), errno.EBADF),
], ids=["connected", "datagram", "pipe", "minus-one"])
@pytest.mark.parametrize("name", ["accept", "accept4"])
def test_accept_fails_at_once_where_libc_does(make, expected, name):
    extra = (socket.SOCK_CLOEXEC,) if name == "accept4" else ()
    result = same(make, name, lambda *fds: (fileno(fds[0]), ffi.NULL, ffi.NULL) + extra)
    assert result == (-1, expected)


def test_accept4_with_unknown_flags_fails_at_once_on_a_listener():
    result = same(listener, "accept4", lambda s: (s.fileno(), ffi.NULL, ffi.NULL, 0x4000_0000))
    assert result == (-1, errno.EINVAL)


# ---- reads and writes on the wrong kind of descriptor ----

def test_read_and_readv_on_a_pipes_write_end_fail_with_ebadf():
    assert same(pipe_ends, "read", lambda r, w: (w, buf(4), 4)) == (-1, errno.EBADF)
    assert same(pipe_ends, "readv", lambda r, w: (w, iovec(buf(4)), 1)) == (-1, errno.EBADF)


def test_write_and_writev_on_a_pipes_read_end_fail_with_ebadf():
    assert same(pipe_ends, "write", lambda r, w: (r, buf(4), 4)) == (-1, errno.EBADF)
    assert same(pipe_ends, "writev", lambda r, w: (r, iovec(buf(4)), 1)) == (-1, errno.EBADF)


def epoll_fd():
    return (select.epoll(),)


@pytest.mark.parametrize("name", ["read", "write", "readv", "writev"])
def test_reads_and_writes_on_an_epoll_fd_fail_with_einval(name):
    if name in ("read", "write"):
        args_of = lambda ep: (ep.fileno(), buf(8), 8)  # noqa: E731
    else:
        args_of = lambda ep: (ep.fileno(), iovec(buf(8)), 1)  # noqa: E731
    assert same(epoll_fd, name, args_of) == (-1, errno.EINVAL)


def test_an_eventfd_read_shorter_than_its_counter_fails_with_einval():
    assert same(lambda: (os.eventfd(0),), "read", lambda fd: (fd, buf(4), 4)) == (-1, errno.EINVAL)


# ---- receives that never wait in libc ----

@pytest.mark.parametrize("name", ["recv", "recvmsg"])
def test_recv_from_an_empty_error_queue_fails_with_eagain(name):
    def args_of(a, b):
        if name == "recv":
            return a.fileno(), buf(16), 16, socket.MSG_ERRQUEUE
        return a.fileno(), msghdr(iovec(buf(16)), 1), socket.MSG_ERRQUEUE
    assert same(tcp_pair, name, args_of) == (-1, errno.EAGAIN)


@pytest.mark.parametrize("flags", [socket.MSG_OOB, socket.MSG_OOB | socket.MSG_WAITALL, socket.MSG_OOB | socket.MSG_PEEK,
                                   socket.MSG_ERRQUEUE | socket.MSG_WAITALL],
                         ids=["oob", "oob-waitall", "oob-peek", "errqueue-waitall"])
@pytest.mark.parametrize("make", [tcp_pair, socket.socketpair], ids=["tcp", "unix_stream"])
def test_out_of_band_and_error_queue_receives_never_wait(make, flags):
    if make is socket.socketpair and flags & socket.MSG_ERRQUEUE:
        pytest.skip("AF_UNIX takes MSG_ERRQUEUE for an ordinary receive")

    def args_of(a, b):
        b.sendall(b"in band")
        select.select([a], [], [], GUARD_S)
        return a.fileno(), buf(16), 16, flags
    same(make, "recv", args_of)


def test_msg_errqueue_on_a_unix_socket_is_an_ordinary_receive_that_waits_on_the_hub():
    a, b = socket.socketpair()  # AF_UNIX has no error queue: libc blocks here until data comes
    gevent.spawn_later(0.05, b.sendall, b"data")
    data = buf(16)
    assert green("recv", a.fileno(), data, 16, socket.MSG_ERRQUEUE) == (4, 0)
    assert ffi.buffer(data, 4)[:] == b"data"


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET])
def test_datagram_recv_after_shut_rd_returns_zero(family):
    def make():
        if family == socket.AF_UNIX:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        else:
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            a.bind(("127.0.0.1", 0))
            a.connect(a.getsockname())
            b = None
        a.shutdown(socket.SHUT_RD)
        return a, b
    for name in ("recv", "read"):
        args_of = (lambda a, b: (a.fileno(), buf(8), 8, 0)) if name == "recv" else (lambda a, b: (a.fileno(), buf(8), 8))
        assert same(make, name, args_of) == (0, 0)


# ---- select on numbers the kernel ignores ----

def highest_free_select_number():
    for fd in range(1023, 0, -1):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    pytest.skip("no free descriptor number below FD_SETSIZE")


def fd_set_with(fd):
    sets = ffi.new("fd_set *")
    sets.fds_bits[fd // 64] |= 1 << (fd % 64)
    return sets


def test_select_on_a_closed_number_fails_or_times_out_as_libc_does_without_blocking_the_hub():
    fd = highest_free_select_number()
    native = libc("select", fd + 1, fd_set_with(fd), ffi.NULL, ffi.NULL, ffi.new("struct timeval *", (0, 200000)))
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(5)])
    timeout = ffi.new("struct timeval *", (0, 200000))
    twin = green("select", fd + 1, fd_set_with(fd), ffi.NULL, ffi.NULL, timeout)
    assert twin == native  # EBADF inside the descriptor table, 0 after the timeout beyond it
    if native == (0, 0):
        ticker.join()
        assert len(ticks) == 5  # other greenlets ran while it waited
    ticker.kill()


def test_select_writes_back_the_time_left_when_something_is_ready_at_once():
    a, b = socket.socketpair()
    b.sendall(b"x")
    for side in ("libc", "green"):
        timeout = ffi.new("struct timeval *", (5, 1500000))  # unnormalized: 6.5 s
        assert call(side, "select", a.fileno() + 1, fd_set_with(a.fileno()), ffi.NULL, ffi.NULL, timeout) == (1, 0)
        left = timeout.tv_sec + timeout.tv_usec / 1e6
        assert timeout.tv_usec < 1000000 and 6.0 < left <= 6.5, (side, timeout.tv_sec, timeout.tv_usec)


# ---- MSG_WAITALL: the kernel's own call, never an imitation ----

def stream_with(data, close=False):
    def make():
        a, b = socket.socketpair()
        b.sendall(data)
        if close:
            b.close()
        return a, b
    return make


def test_recvmsg_waitall_with_a_null_iovec_fails_with_efault():
    msg_of = lambda a, b: (a.fileno(), msghdr(iov=ffi.NULL, iovlen=1), socket.MSG_WAITALL)  # noqa: E731
    assert same(stream_with(b"abcd"), "recvmsg", msg_of) == (-1, errno.EFAULT)


def test_recvmsg_waitall_with_an_unreadable_msghdr_fails_with_efault():
    args_of = lambda a, b: (a.fileno(), ffi.cast("struct msghdr *", BAD_POINTER), socket.MSG_WAITALL)  # noqa: E731
    assert same(stream_with(b"abcd"), "recvmsg", args_of) == (-1, errno.EFAULT)


def test_recvfrom_waitall_with_a_bad_or_null_address_length_fails_with_efault():
    for addrlen in (ffi.cast("socklen_t *", BAD_POINTER), ffi.NULL):
        args_of = lambda a, b: (a.fileno(), buf(4), 4, socket.MSG_WAITALL, buf(64), addrlen)  # noqa: E731
        assert same(stream_with(b"abcd"), "recvfrom", args_of) == (-1, errno.EFAULT)


def test_recvmsg_waitall_with_a_bad_address_fails_as_libc_does():
    args_of = lambda a, b: (a.fileno(), msghdr(iovec(buf(4)), 1, BAD_POINTER, 16), socket.MSG_WAITALL)  # noqa: E731
    same(stream_with(b"abcd"), "recvmsg", args_of)


def test_peek_waitall_returns_the_data_once_at_eof():
    out = {}

    def args_of(a, b):
        out["buf"] = buf(30)
        return a.fileno(), out["buf"], 30, socket.MSG_PEEK | socket.MSG_WAITALL
    for side in ("libc", "green"):
        a, b = stream_with(b"0123456789", close=True)()
        assert (green if side == "green" else libc)("recv", *args_of(a, b)) == (10, 0)
        assert ffi.buffer(out["buf"], 30)[:] == b"0123456789" + b"\0" * 20


def urgent_stream(family):
    def make():
        if family == "tcp":
            a, b = tcp_pair()
        else:
            a, b = socket.socketpair()
        b.send(b"abc")
        try:
            b.send(b"!", socket.MSG_OOB)
        except OSError as exc:
            pytest.skip(f"this kernel has no out-of-band data on {family} sockets: {exc}")
        b.send(b"def")
        deadline = time.monotonic() + GUARD_S  # loopback delivers at once; wait for the urgent byte to be there
        while not select.select([], [], [a], 0)[2] and time.monotonic() < deadline:
            time.sleep(0.001)
        return a, b
    return make


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_waitall_stops_at_the_urgent_mark(family):
    results = []
    for side in ("libc", "green"):
        a, b = urgent_stream(family)()
        data = buf(6)
        result = (green if side == "green" else libc)("recv", a.fileno(), data, 6, socket.MSG_WAITALL)
        results.append((result, ffi.buffer(data, max(result[0], 0))[:]))
    assert results[1] == results[0]
    assert results[0][1] == b"abc"


def test_recvmsg_waitall_with_no_buffers_returns_zero_once_data_arrives():
    a, b = socket.socketpair()
    gevent.spawn_later(0.05, b.sendall, b"x")
    assert green("recvmsg", a.fileno(), msghdr(iovec(), 0), socket.MSG_WAITALL) == (0, 0)
    assert a.recv(4) == b"x"


def test_waitall_waits_on_the_hub_for_the_whole_length_and_keeps_peeked_data():
    a, b = socket.socketpair()
    gevent.spawn_later(0.02, b.sendall, b"ab")
    gevent.spawn_later(0.08, b.sendall, b"cd")
    peeked = buf(4)
    assert green("recv", a.fileno(), peeked, 4, socket.MSG_PEEK | socket.MSG_WAITALL) == (4, 0)
    assert ffi.buffer(peeked)[:] == b"abcd"
    assert a.recv(8) == b"abcd"


# ---- lengths the kernel refuses ----

HUGE = 1 << 62


@pytest.mark.parametrize("name", ["read", "write", "__read_chk"])
def test_a_huge_read_or_write_length_fails_with_efault(name):
    def args_of(a, b):
        data = ffi.new("char[]", b"abcdef")
        if name == "__read_chk":
            return a.fileno(), data, HUGE, HUGE
        return a.fileno(), data, HUGE
    results = []
    for side in ("libc", "green"):
        a, b = stream_with(b"0123456789")()
        result = (green if side == "green" else libc)(name, *args_of(a, b))
        b.setblocking(False)
        try:
            sent = b.recv(1 << 20)
        except BlockingIOError:
            sent = b""
        results.append((result, sent))
    assert results[1] == results[0] == ((-1, errno.EFAULT), b"")


@pytest.mark.parametrize("name", ["readv", "writev"])
def test_more_than_iov_max_buffers_fail_with_einval(name):
    parts = [buf(1) for _ in range(1025)]
    array = iovec(*parts)
    assert same(stream_with(b"x"), name, lambda a, b: (a.fileno(), array, 1025)) == (-1, errno.EINVAL)


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
@pytest.mark.parametrize("peer_closed", [False, True])
def test_a_zero_length_writev_on_a_packet_socket_sends_nothing(kind, peer_closed):
    results = []
    for side in ("libc", "green"):
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        if peer_closed:
            b.close()
        result = (green if side == "green" else libc)("writev", a.fileno(), iovec((ffi.NULL, 0)), 1)
        if not peer_closed:
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(16)
        results.append(result)
    assert results[1] == results[0] == (0, 0)


def test_a_bad_iovec_array_fails_with_efault_and_does_not_crash():
    for name in ("readv", "writev"):
        args_of = lambda a, b: (a.fileno(), ffi.cast("struct iovec *", BAD_POINTER), 2)  # noqa: E731
        assert same(stream_with(b"abcd"), name, args_of) == (-1, errno.EFAULT)
        args_of = lambda a, b: (a.fileno(), ffi.cast("struct iovec *", KERNEL_POINTER), 2)  # noqa: E731
        assert same(stream_with(b"abcd"), name, args_of) == (-1, errno.EFAULT)


def test_connected_twins_in_struct_layout():
    # the ABI-mode declarations match the compiled module's
    from greenify._green import ffi as green_ffi
    for name in ("struct msghdr", "struct iovec", "struct pollfd", "fd_set", "struct timeval", "struct timespec"):
        assert ffi.sizeof(name) == green_ffi.sizeof(name), name
    assert struct.calcsize("P") == 8


def test_a_pipe_write_larger_than_its_room_completes_on_the_hub():
    r, w = os.pipe()
    try:
        data = os.urandom(1 << 20)  # sixteen times the pipe's default size
        received = bytearray()

        def drain():
            os.set_blocking(r, False)
            while len(received) < len(data):
                try:
                    received.extend(os.read(r, 1 << 16))
                except BlockingIOError:
                    gevent.sleep(0.001)
        reader = gevent.spawn(drain)
        # only the reader greenlet makes room: the write completes only if the hub ran while it waited
        assert green("write", w, ffi.from_buffer(data), len(data)) == (len(data), 0)
        reader.join(timeout=GUARD_S)
        assert bytes(received) == data
    finally:
        os.close(r)
        os.close(w)


# ---- shut-down and reset sockets ----

def socket_in_state(kind, state):
    """A socket of `kind` in `state`, with a little data queued each way, and
    a short SO_RCVTIMEO/SO_SNDTIMEO so that a call libc blocks in ends."""
    def make():
        if kind == "tcp":
            a, b = tcp_pair()
        else:
            a, b = socket.socketpair(socket.AF_UNIX, kind)
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 20000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 20000))
        b.send(b"queued")
        if state in ("shut_rd", "shut_wr", "shut_rdwr"):
            a.shutdown({"shut_rd": socket.SHUT_RD, "shut_wr": socket.SHUT_WR, "shut_rdwr": socket.SHUT_RDWR}[state])
        elif state == "peer_closed":
            b.close()
        elif state == "peer_reset":
            b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            b.close()
        select.select([a], [], [], 0.5)  # let loopback deliver the FIN or RST
        return a, b
    return make


@pytest.mark.parametrize("state", ["shut_rd", "shut_wr", "shut_rdwr", "peer_closed", "peer_reset"])
@pytest.mark.parametrize("kind", ["tcp", socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
                         ids=["tcp", "unix_stream", "unix_seqpacket", "unix_dgram"])
@pytest.mark.parametrize("name", ["read", "readv", "__read_chk", "write", "writev"])
def test_reads_and_writes_on_shut_down_and_reset_sockets_fail_as_libc_does(name, kind, state):
    if state == "peer_reset" and kind != "tcp":
        pytest.skip("only TCP resets")

    def args_of(a, b):
        data = ffi.new("char[]", b"0123456789abcdef")
        return {"read": (a.fileno(), data, 16), "__read_chk": (a.fileno(), data, 16, 16),
                "write": (a.fileno(), data, 16), "readv": (a.fileno(), iovec((data, 16)), 1),
                "writev": (a.fileno(), iovec((data, 16)), 1)}[name]
    for repeat in range(2):  # the first call may consume the error the second then does not see
        make = socket_in_state(kind, state)
        pairs = {side: make() for side in ("libc", "green")}
        for _ in range(repeat + 1):
            results = [call(side, name, *args_of(*pairs[side])) if side == "libc" else green(name, *args_of(*pairs[side]))
                       for side in ("libc", "green")]
            assert results[1] == results[0]
