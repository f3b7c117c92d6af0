"""Differential test: every green twin against libc, on twin descriptors.

A Hypothesis state machine builds two identical worlds of descriptors (one
for libc, one for the green twins): Unix stream, datagram and seqpacket
pairs, TCP and UDP on loopback, both ends of pipes, a regular file,
/dev/null, an epoll and an event fd, a listening and an unconnected socket,
a closed number and -1.  Random rules feed data, urgent bytes and
connections from the peers, shut sockets down, close or reset the peers, and
run the same call through libc on one world and through its twin on the
other, with random flags (MSG_PEEK, MSG_WAITALL, MSG_DONTWAIT, MSG_OOB,
MSG_ERRQUEUE, MSG_TRUNC), lengths (0, 1, large, huge) and pointers (valid,
NULL, unmapped, kernel).  Result, errno, data, addresses, msg_flags,
revents, ready sets and select's time left must agree.

It runs in a greenlet with a hub (the twins wait on the hub) and in a plain
thread (no hub: the twins block natively).  A call that would block in libc
cannot hang the run: sockets carry a short SO_RCVTIMEO/SO_SNDTIMEO, so their
blocking calls end with the kernel's own timeout result; on other
descriptors a blocking call is issued only when the world says it will not
wait; poll, select and epoll get short timeouts, or none only when ready.

CI runs a bounded number of examples; `make fuzz` (GREENIFY_FUZZ_EXAMPLES)
runs many more.
"""
from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import tempfile
import threading
import time

import ctypes

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

import greenify
from tests.support.green_support import tcp_pair
from tests.support.libc_twins import BAD_POINTER, KERNEL_POINTER, call, ffi, iovec, msghdr

EXAMPLES = int(os.environ.get("GREENIFY_FUZZ_EXAMPLES", "0")) or None
STEPS = 30
# Shrinking a failure of many steps on real descriptors takes minutes: only where asked.
PHASES = [Phase.generate] + ([Phase.shrink] if os.environ.get("GREENIFY_FUZZ_SHRINK") else [])
TIMEOUT_S = 0.02  # sockets' SO_RCVTIMEO/SO_SNDTIMEO: a blocking socket call ends with the kernel's timeout result
SOCKET_TIMEOUT = struct.pack("ll", 0, int(TIMEOUT_S * 1e6))

SOCKET_KINDS = ["unix_stream", "unix_dgram", "unix_seqpacket", "tcp", "udp", "listener", "unconnected"]
STREAM_KINDS = ["unix_stream", "tcp"]
KINDS = SOCKET_KINDS + ["pipe_read", "pipe_write", "regular", "devnull", "epoll", "eventfd", "closed", "minus_one"]
PEER_KINDS = ["unix_stream", "unix_dgram", "unix_seqpacket", "tcp", "udp", "pipe_read", "eventfd"]

RECEIVE_FLAGS = [socket.MSG_PEEK, socket.MSG_WAITALL, socket.MSG_DONTWAIT, socket.MSG_OOB, socket.MSG_ERRQUEUE,
                 socket.MSG_TRUNC]
LENGTHS = [0, 1, 7, 100, 65536]
HUGE = 1 << 62
POINTERS = ["valid", "null", "unmapped", "kernel"]
PIPE_SIZE = 1 << 20
PIPE_ROOM = 256 << 10  # writes to the pipe stay far below its size, so none blocks

operations = {"count": 0}

# A number closed and reused before a wait starts on it, every way a process
# can: the wait must wake when the new file's data comes (WAKE_BOUND_S after
# the write, on a busy machine), whatever the number named before.
REUSE_WAYS = ["close-twin", "python-close", "os-close", "unpatched-library-close", "dup2", "dup3"]
REUSE_CLOSERS = ["this-greenlet", "another-greenlet", "another-thread"]
REUSE_KINDS = {"unix_stream": socket.socketpair, "tcp": lambda: tcp_pair()}
WAKE_DELAY_S = 0.01
WAKE_BOUND_S = 0.15
REUSE_TIMEOUT = struct.pack("ll", 1, 0)  # a missed wake ends with EAGAIN after 1 s instead of hanging
_libc_close = ctypes.CDLL(None, use_errno=True).close
CLOSE_NUMBER = {
    "close-twin": lambda fd: call("green", "close", fd),
    "python-close": lambda fd: socket.socket(fileno=fd).close(),
    "os-close": os.close,
    "unpatched-library-close": _libc_close,
}


def has_hub():
    from gevent._hub_local import get_hub_if_exists
    return get_hub_if_exists() is not None


def run_as(closer, action):
    """action() in this greenlet, another greenlet (where there is a hub) or another thread."""
    if closer == "another-greenlet" and has_hub():
        import gevent
        return gevent.spawn(action).get()
    if closer == "another-thread":
        worker = threading.Thread(target=action)
        worker.start()
        worker.join()
        return None
    return action()


def hub_waits():
    """Calls that waited on a hub so far (every twin, every thread)."""
    return sum(figures.calls for figures in greenify.stats().values())


def flags_from(bits):
    flags = 0
    for bit in bits:
        flags |= bit
    return flags


def free_number(start):
    for fd in range(start, 1024):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise RuntimeError("no free descriptor number below FD_SETSIZE")


class World:
    """One side's descriptors: kind -> (endpoint fd, peer object)."""

    def __init__(self, directory, closed_number):
        self.keep = []
        self.endpoints = {}
        self.peers = {}
        self.clients = []
        self.queued = {"pipe_read": 0, "pipe_write": 0}  # bytes in each pipe, kept below PIPE_ROOM
        for kind, family_type in (("unix_stream", socket.SOCK_STREAM), ("unix_dgram", socket.SOCK_DGRAM),
                                  ("unix_seqpacket", socket.SOCK_SEQPACKET)):
            a, b = socket.socketpair(socket.AF_UNIX, family_type)
            self.add(kind, a, b)
        self.add("tcp", *tcp_pair())
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        a.connect(b.getsockname())
        b.connect(a.getsockname())
        self.add("udp", a, b)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.add("listener", listener, None)
        self.add("unconnected", socket.socket(), None)
        for kind in SOCKET_KINDS:
            sock = self.endpoints[kind]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, SOCKET_TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, SOCKET_TIMEOUT)
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.add("pipe_read", r, w)
        r2, w2 = os.pipe()
        fcntl.fcntl(w2, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.add("pipe_write", w2, r2)
        path = os.path.join(directory, f"regular{closed_number}")
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * 16)
        self.add("regular", os.open(path, os.O_RDWR), None)
        self.add("devnull", os.open(os.devnull, os.O_RDWR), None)
        ep = select.epoll()
        ep.register(self.fd("unix_stream"), select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP)
        ep.register(self.fd("pipe_read"), select.EPOLLIN)
        self.add("epoll", ep, None)
        ev = os.eventfd(0)
        self.add("eventfd", ev, ev)
        self.endpoints["closed"] = closed_number
        self.endpoints["minus_one"] = -1

    def reuse(self, kind, way, closer):
        """Close ``kind``'s endpoint number the ``way`` way (by ``closer``)
        and give the same number a new connected socket of the same kind,
        with a new peer; the old peer goes."""
        number = self.endpoints[kind].detach()
        fresh, peer = REUSE_KINDS[kind]()

        def close_and_reuse():
            if way in ("dup2", "dup3"):
                os.dup2(fresh.fileno(), number, inheritable=way == "dup2")
            else:
                CLOSE_NUMBER[way](number)
                os.dup2(fresh.fileno(), number)  # the freed number, as the kernel's next socket would take it
            fresh.close()
        run_as(closer, close_and_reuse)
        endpoint = socket.socket(fileno=number)
        endpoint.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, REUSE_TIMEOUT)
        old_peer = self.peers[kind]
        if old_peer is not None:
            old_peer.close()
        self.add(kind, endpoint, peer)
        return number

    def settle(self, kind):
        """Back to the timeouts every other rule expects."""
        self.endpoints[kind].setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, SOCKET_TIMEOUT)
        self.endpoints[kind].setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, SOCKET_TIMEOUT)

    def add(self, kind, endpoint, peer):
        self.endpoints[kind] = endpoint
        self.peers[kind] = peer
        self.keep.extend(x for x in (endpoint, peer) if x is not None)

    def fd(self, kind):
        endpoint = self.endpoints[kind]
        return endpoint if isinstance(endpoint, int) else endpoint.fileno()

    def close(self):
        for thing in self.keep + self.clients:
            try:
                if isinstance(thing, int):
                    os.close(thing)
                else:
                    thing.close()
            except OSError:
                pass


def readable(fd, timeout_ms=0):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def wait_for(fd, events, timeout_ms=1000):
    """Loopback delivery is asynchronous in principle: let it land."""
    poller = select.poll()
    poller.register(fd, events)
    poller.poll(timeout_ms)


class Differential(RuleBasedStateMachine):
    """The same operations on two worlds: libc's and the twins'."""

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="greenify-differential-")
        first = free_number(900)
        self.worlds = {"libc": World(self.directory, first), "green": None}
        self.worlds["green"] = World(self.directory, free_number(first + 1))
        self.fed = 0

    def teardown(self):
        for world in self.worlds.values():
            world.close()
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    # ---- changing both worlds alike ----

    @rule(kind=st.sampled_from(PEER_KINDS + ["listener"]), size=st.sampled_from([1, 3, 10, 4096]))
    def feed(self, kind, size):
        data = bytes((self.fed + i) % 251 for i in range(size))
        self.fed += size
        for world in self.worlds.values():
            peer = world.peers[kind]
            if peer is None and kind != "listener":
                continue  # closed by close_peer
            if kind == "listener":
                client = socket.socket()
                client.setblocking(False)
                try:
                    client.connect(world.endpoints["listener"].getsockname())
                except BlockingIOError:
                    pass
                world.clients.append(client)
                wait_for(world.fd("listener"), select.POLLIN)
                continue
            if kind == "eventfd":
                os.eventfd_write(peer, 1)
                continue
            try:
                if isinstance(peer, int):
                    if world.queued["pipe_read"] + size > PIPE_ROOM:
                        continue
                    os.set_blocking(peer, False)
                    world.queued["pipe_read"] += os.write(peer, data)
                else:
                    peer.send(data, socket.MSG_DONTWAIT)
            except OSError:
                pass  # full, shut down or closed: the same in both worlds
            wait_for(world.fd(kind), select.POLLIN)

    @rule(kind=st.sampled_from(STREAM_KINDS))
    def feed_urgent(self, kind):
        for world in self.worlds.values():
            try:
                world.peers[kind].send(b"!", socket.MSG_OOB | socket.MSG_DONTWAIT)
            except (OSError, AttributeError):  # closed by the peer, or by close_peer
                pass
            wait_for(world.fd(kind), select.POLLPRI)

    @rule(kind=st.sampled_from(["unix_stream", "unix_dgram", "unix_seqpacket", "tcp", "udp", "listener"]),
          how=st.sampled_from([socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR]))
    def shut_down(self, kind, how):
        for world in self.worlds.values():
            try:
                world.endpoints[kind].shutdown(how)
            except OSError:
                pass


    @rule(kind=st.sampled_from(PEER_KINDS[:5] + ["pipe_read", "pipe_write"]), reset=st.booleans())
    def close_peer(self, kind, reset):
        for world in self.worlds.values():
            peer = world.peers[kind]
            if peer is None:
                continue
            if reset and kind == "tcp":
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if isinstance(peer, int):
                os.close(peer)
                world.keep.remove(peer)
            else:
                peer.close()
            world.peers[kind] = None
            wait_for(world.fd(kind), select.POLLIN | select.POLLHUP | select.POLLERR)

    @rule(kind=st.sampled_from(list(REUSE_KINDS)), way=st.sampled_from(REUSE_WAYS),
          closer=st.sampled_from(REUSE_CLOSERS), peer=st.sampled_from(["greenlet", "thread"]),
          name=st.sampled_from(["recv", "read", "poll"]))
    def reuse_number_then_wait(self, kind, way, closer, peer, name):
        """The number is closed and reused, then a blocking call waits on it
        and the peer writes shortly after: same results, and the twin wakes
        within WAKE_BOUND_S of the write (libc's side always has a thread
        peer: its call blocks the hub)."""
        observed = {}
        for side, world in self.worlds.items():
            fd = world.reuse(kind, way, closer)
            written = []
            writer = world.peers[kind]

            def write():
                written.append(time.monotonic())
                writer.send(b"w")
            timer = None
            if side == "green" and peer == "greenlet" and has_hub():
                import gevent
                gevent.spawn_later(WAKE_DELAY_S, write)
            else:
                timer = threading.Timer(WAKE_DELAY_S, write)
                timer.start()
            data = ffi.new("char[]", 1)
            if name == "poll":
                fds = ffi.new("struct pollfd[1]")
                fds[0].fd, fds[0].events = fd, select.POLLIN
                result, err = call(side, "poll", fds, 1, 2000)
                outputs = fds[0].revents
            else:
                result, err = call(side, name, *((fd, data, 1, 0) if name == "recv" else (fd, data, 1)))
                outputs = bytes(ffi.buffer(data, 1))
            returned = time.monotonic()
            if timer is not None:
                timer.join()
            observed[side] = (result, err, outputs)
            if side == "green":
                assert written, f"{name} on a reused number ({way}) returned {observed[side]} before the write"
                assert returned - written[0] < WAKE_BOUND_S, \
                    f"{name} on a number reused by {way} ({closer}) woke {returned - written[0]:.3f} s after the write"
            if name == "poll":
                call(side, "recv", fd, data, 1, 0)  # take the byte: later rules see the world as before
            world.settle(kind)
        operations["count"] += 1
        assert observed["green"] == observed["libc"], f"{name} after {way}: libc {observed['libc']} green {observed['green']}"

    @rule(kind=st.sampled_from(["pipe_read", "pipe_write"]))
    def drain_pipe(self, kind):
        for world in self.worlds.values():
            reader = world.fd("pipe_read") if kind == "pipe_read" else world.peers["pipe_write"]
            if reader is None:
                continue
            os.set_blocking(reader, False)
            try:
                while os.read(reader, 1 << 16):
                    pass
            except OSError:
                pass
            os.set_blocking(reader, True)
            world.queued[kind] = 0

    # ---- the same call through libc and through its twin ----

    def both(self, build, compare_time_left=False):
        """build(world) -> (name, args, outputs) where outputs() reads what the
        call wrote; run on each world, compare."""
        observed = {}
        for side, world in self.worlds.items():
            name, args, outputs = build(world)
            waits_before = hub_waits()
            started = time.monotonic()
            result, err = call(side, name, *args)
            took = time.monotonic() - started
            if side == "green" and hub_waits() > waits_before:
                # A call libc answered at once must not wait on the hub for
                # the socket timeout (both would then say EAGAIN alike).
                assert observed["libc"][4] >= TIMEOUT_S / 2 or took < TIMEOUT_S, \
                    f"{name}: libc answered at once ({observed['libc'][1:3]}), the twin waited {took:.3f} s"
            # errno after a success too: a twin may not leave its own attempts' errors behind
            observed[side] = (name, result if result < 0 or not name.startswith("accept") else "fd", err,
                              outputs(result), took)
            if name.startswith("accept") and result >= 0:
                os.close(result)
        operations["count"] += 1
        native, twin = observed["libc"], observed["green"]
        if compare_time_left:
            native, twin = self.time_left_agrees(native, twin)
        assert twin[:4] == native[:4], f"{native[0]}: libc {native[1:4]} green {twin[1:4]}"

    @staticmethod
    def time_left_agrees(native, twin):
        """select's written-back timeout: equal but for the time each call took."""
        left_native, left_twin = native[3][-1], twin[3][-1]
        if left_native is not None:
            slack = native[4] + twin[4] + 0.05
            assert abs(left_native - left_twin) <= slack, (left_native, left_twin)
        return native[:3] + (native[3][:-1],), twin[:3] + (twin[3][:-1],)

    def will_not_block(self, world, kind, name, length, flags):
        """On descriptors without a kernel timeout, libc's call must not wait."""
        if kind in SOCKET_KINDS or length == 0 or flags & socket.MSG_DONTWAIT:
            return True
        fd = world.fd(kind)
        if kind == "pipe_read" and name in RECEIVES:
            return readable(fd) or world.peers["pipe_read"] is None
        if kind == "pipe_write" and name in SENDS:
            return world.queued["pipe_write"] + length <= PIPE_ROOM or world.peers["pipe_write"] is None
        if kind == "eventfd" and name in RECEIVES:
            return readable(fd) or length < 8
        return True

    def buffer(self, world, kind, pointer, length):
        if pointer == "null":
            return ffi.NULL, None
        if pointer == "unmapped":
            return BAD_POINTER, None
        if pointer == "kernel":
            return KERNEL_POINTER, None
        if length == HUGE:
            data = ffi.new("char[]", b"abcdef")
            return data, data
        data = ffi.new("char[]", max(length, 1))
        if kind == "eventfd":
            data[0] = b"\x01"  # the counter grows by one: never near overflow
        else:
            for i in range(min(length, 64)):
                data[i] = bytes([65 + i % 26])
        return data, data

    @rule(kind=st.sampled_from(KINDS), name=st.sampled_from(["recv", "recvfrom", "recvmsg", "read", "readv",
                                                             "__read_chk", "__recv_chk", "__recvfrom_chk"]),
          flag_bits=st.lists(st.sampled_from(RECEIVE_FLAGS), max_size=3, unique=True),
          length=st.sampled_from(LENGTHS + [HUGE]), pointer=st.sampled_from(POINTERS),
          address=st.sampled_from(["none", "valid", "null_length", "bad_length"]),
          shape=st.sampled_from(["one", "two", "none", "null_iov", "null_msg", "bad_msg", "too_many"]))
    def receive(self, kind, name, flag_bits, length, pointer, address, shape):
        flags = flags_from(flag_bits)
        if length == HUGE and name not in ("read", "__read_chk"):
            length = 65536  # recv/readv clamp a huge length and would write past the buffer, in libc too
        if name in ("read", "readv", "__read_chk"):
            flags = 0
        for world in self.worlds.values():
            if not self.will_not_block(world, kind, name, length, flags):
                return
        self.both(lambda world: self.build_receive(world, kind, name, flags, length, pointer, address, shape))

    def build_receive(self, world, kind, name, flags, length, pointer, address, shape):
        fd = world.fd(kind)
        data, keep = self.buffer(world, kind, pointer, length)
        size = 6 if length == HUGE else length
        addr = addrlen = ffi.NULL
        if address != "none" and name in ("recvfrom", "__recvfrom_chk", "recvmsg"):
            addr = ffi.new("char[]", 128)
            addrlen = {"valid": ffi.new("socklen_t *", 128), "null_length": ffi.NULL,
                       "bad_length": ffi.cast("socklen_t *", BAD_POINTER)}[address]

        def read_back(result, msg=None):
            content = bytes(ffi.buffer(keep, size)) if keep is not None and size else b""
            length_written = addrlen[0] if address == "valid" and name != "recvmsg" and addr != ffi.NULL else None
            family = struct.unpack("H", ffi.buffer(addr, 2)[:])[0] if addr != ffi.NULL else None
            flags_out = msg.msg_flags if msg is not None else None
            namelen = msg.msg_namelen if msg is not None else None
            return content, length_written, family, flags_out, namelen

        if name in ("recv", "__recv_chk"):
            args = (fd, data, length, flags) if name == "recv" else (fd, data, length, length, flags)
            return name, args, read_back
        if name in ("recvfrom", "__recvfrom_chk"):
            if name == "recvfrom":
                args = (fd, data, length, flags, addr, addrlen)
            else:
                args = (fd, data, length, length, flags, addr, addrlen)
            return name, args, read_back
        if name in ("read", "__read_chk"):
            return name, ((fd, data, length) if name == "read" else (fd, data, length, length)), read_back
        iov, count = self.iov_of(data, length, shape)
        if name == "readv":
            return name, (fd, iov, count), read_back
        if shape == "null_msg":
            return name, (fd, ffi.NULL, flags), read_back
        if shape == "bad_msg":
            return name, (fd, ffi.cast("struct msghdr *", BAD_POINTER), flags), read_back
        msg = msghdr(iov, count, addr, 128 if addr != ffi.NULL else 0)
        if address == "bad_length":
            msg.msg_name = BAD_POINTER
        return name, (fd, msg, flags), lambda result: read_back(result, msg)

    @staticmethod
    def iov_of(data, length, shape):
        if shape == "null_iov":
            return ffi.NULL, 1
        if shape == "too_many":
            return iovec(*[(data, 0)] * 1025), 1025
        if shape == "none":
            return iovec(), 0
        if shape == "two" and length > 1:
            pointer = ffi.cast("char *", data)
            return iovec((pointer, length // 2), (pointer + length // 2 if data != ffi.NULL else ffi.NULL,
                                                   length - length // 2), keep=data), 2
        return iovec((data, length)), 1

    @rule(kind=st.sampled_from(KINDS), name=st.sampled_from(["send", "sendto", "sendmsg", "write", "writev"]),
          flag_bits=st.lists(st.sampled_from([socket.MSG_DONTWAIT, socket.MSG_OOB, socket.MSG_NOSIGNAL]),
                             max_size=2, unique=True),
          length=st.sampled_from(LENGTHS + [HUGE]), pointer=st.sampled_from(POINTERS),
          shape=st.sampled_from(["one", "two", "none", "null_iov", "too_many"]))
    def send(self, kind, name, flag_bits, length, pointer, shape):
        flags = flags_from(flag_bits) if name in ("send", "sendto", "sendmsg") else 0
        if length == HUGE and (name not in ("write",) or pointer != "valid"):
            length = 65536  # send/writev clamp a huge length and would read past the buffer, in libc too
        if kind in ("tcp",) and length == 65536:
            length = 4096  # loopback TCP's buffers grow on their own schedule: keep sends well inside them
        for world in self.worlds.values():
            if not self.will_not_block(world, kind, name, length, flags):
                return

        def build(world):
            fd = world.fd(kind)
            data, _keep = self.buffer(world, kind, pointer, length)
            peer_reader = self.peer_reader(world, kind)
            if name == "send":
                return name, (fd, data, length, flags), peer_reader
            if name == "sendto":
                return name, (fd, data, length, flags, ffi.NULL, 0), peer_reader
            if name == "write":
                return name, (fd, data, length), peer_reader
            iov, count = self.iov_of(data, length, shape)
            if name == "writev":
                return name, (fd, iov, count), peer_reader
            return name, (fd, msghdr(iov, count), flags), peer_reader
        self.both(build)
        for world in self.worlds.values():
            if kind == "pipe_write" and length != HUGE:
                world.queued["pipe_write"] += length

    @staticmethod
    def peer_reader(world, kind):
        """What arrived at the peer (packets kept apart), read after the call."""
        def read(result):
            peer = world.peers.get(kind)
            if peer is None or kind in ("eventfd", "pipe_read"):
                return None
            if isinstance(peer, int):
                return None  # the pipe's reader: drained by its own rule
            wait_for(peer.fileno(), select.POLLIN, 50 if result > 0 and kind in ("tcp", "udp") else 0)
            packets = []
            try:
                while True:
                    packets.append(peer.recv(1 << 17, socket.MSG_DONTWAIT))
                    if not packets[-1]:
                        break
            except OSError as exc:
                packets.append(exc.errno)
            return packets if kind != "tcp" else b"".join(p for p in packets if isinstance(p, bytes))
        return read

    @rule(kind=st.sampled_from(KINDS), name=st.sampled_from(["accept", "accept4"]),
          flags=st.sampled_from([0, socket.SOCK_NONBLOCK, socket.SOCK_CLOEXEC, 0x40000000]),
          address=st.sampled_from(["none", "valid", "bad_length"]))
    def accept(self, kind, name, flags, address):
        def build(world):
            addr = addrlen = ffi.NULL
            if address != "none":
                addr = ffi.new("char[]", 128)
                addrlen = ffi.new("socklen_t *", 128) if address == "valid" else ffi.cast("socklen_t *", BAD_POINTER)
            args = (world.fd(kind), addr, addrlen) + ((flags,) if name == "accept4" else ())
            return name, args, lambda result: addrlen[0] if address == "valid" and result >= 0 else None
        self.both(build)

    @rule(kind=st.sampled_from(["unconnected", "tcp", "udp", "unix_stream", "pipe_read", "closed", "minus_one"]),
          to=st.sampled_from(["listener", "null", "bad"]))
    def connect(self, kind, to):
        def build(world):
            if to == "listener":
                host, port = world.endpoints["listener"].getsockname()
                raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
                address = ffi.new("char[]", raw)
                return "connect", (world.fd(kind), address, 16), lambda result: None
            return "connect", (world.fd(kind), ffi.NULL if to == "null" else BAD_POINTER, 16), lambda result: None
        self.both(build)
        if to == "listener" and kind == "unconnected":
            for world in self.worlds.values():
                wait_for(world.fd("listener"), select.POLLIN)

    @rule(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=4),
          events=st.lists(st.sampled_from([select.POLLIN, select.POLLOUT, select.POLLPRI, select.POLLRDHUP,
                                           select.POLLERR, 0]), min_size=1, max_size=4),
          name=st.sampled_from(["poll", "ppoll", "__poll_chk", "__ppoll_chk"]),
          timeout_ms=st.sampled_from([0, 1, 15, -1]))
    def poll(self, kinds, events, name, timeout_ms):
        masks = [events[i % len(events)] for i in range(len(kinds))]
        if timeout_ms == -1 and not self.something_ready(kinds, masks):
            timeout_ms = 15

        def build(world):
            fds = ffi.new("struct pollfd[]", max(len(kinds), 1))
            for slot, kind, mask in zip(fds, kinds, masks):
                slot.fd = world.fd(kind)
                slot.events = mask
            fortified = (ffi.sizeof(fds),) if name.startswith("__") else ()
            if name in ("poll", "__poll_chk"):
                args = (fds, len(kinds), timeout_ms) + fortified
            else:
                timeout = ffi.NULL if timeout_ms < 0 else ffi.new("struct timespec *", (0, timeout_ms * 1000000))
                args = (fds, len(kinds), timeout, ffi.NULL) + fortified
            return name, args, lambda result: [fds[i].revents for i in range(len(kinds))]
        self.both(build)

    def something_ready(self, kinds, masks):
        world = self.worlds["libc"]
        fds = [(world.fd(kind), mask) for kind, mask in zip(kinds, masks)]
        result = call("libc", "poll", ffi.new("struct pollfd[]", [(fd, mask, 0) for fd, mask in fds] or [(0, 0, 0)]),
                      len(fds), 0)
        return result[0] != 0

    @rule(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=4),
          sets=st.lists(st.sampled_from(["read", "write", "except"]), min_size=1, max_size=3, unique=True),
          name=st.sampled_from(["select", "pselect"]),
          timeout=st.sampled_from([(0, 0), (0, 1000), (0, 15000), (1, 1500000), None]))
    def select(self, kinds, sets, name, timeout):
        build = self.select_call(kinds, sets, name)
        if timeout is None or timeout[0] >= 1:
            probe_name, probe_args, _ = build(self.worlds["libc"], (0, 0))
            if call("libc", probe_name, *probe_args)[0] == 0:
                timeout = (0, 15000)  # nothing ready: a long wait would only slow the run
        self.both(lambda world: build(world, timeout), compare_time_left=True)

    def select_call(self, kinds, sets, name):
        def build(world, timeout):
            numbers = [world.fd(kind) for kind in kinds if world.fd(kind) >= 0]
            nfds = max(numbers) + 1 if numbers else 0
            fd_sets = {}
            for which in ("read", "write", "except"):
                if which in sets:
                    fd_set = ffi.new("fd_set *")
                    for fd in numbers:
                        fd_set.fds_bits[fd // 64] |= 1 << (fd % 64)
                    fd_sets[which] = fd_set
                else:
                    fd_sets[which] = ffi.NULL
            if name == "select":
                tv = ffi.NULL if timeout is None else ffi.new("struct timeval *", timeout)
                args = (nfds, fd_sets["read"], fd_sets["write"], fd_sets["except"], tv)
            else:
                tv = ffi.NULL if timeout is None else ffi.new(
                    "struct timespec *", (timeout[0] + timeout[1] // 1000000, timeout[1] % 1000000 * 1000))
                args = (nfds, fd_sets["read"], fd_sets["write"], fd_sets["except"], tv, ffi.NULL)
            order = {fd: kinds.index(kind) for kind in kinds for fd in [world.fd(kind)]}

            def outputs(result):
                ready = {which: sorted(order[fd] for fd in numbers
                                       if fd_sets[which] != ffi.NULL and fd_sets[which].fds_bits[fd // 64] >> (fd % 64) & 1)
                         for which in fd_sets}
                left = None
                if name == "select" and tv != ffi.NULL:
                    left = tv.tv_sec + tv.tv_usec / 1e6
                    assert 0 <= tv.tv_usec < 1000000
                return ready, left
            return name, args, outputs
        return build

    @rule(kind=st.sampled_from(["epoll", "unix_stream", "closed", "minus_one", "pipe_read"]),
          name=st.sampled_from(["epoll_wait", "epoll_pwait"]), maxevents=st.sampled_from([1, 4, 0, -1]),
          timeout_ms=st.sampled_from([0, 1, 15, -1]), events=st.sampled_from(["valid", "null", "bad"]))
    def epoll(self, kind, name, maxevents, timeout_ms, events):
        if timeout_ms == -1 and not (kind == "epoll" and readable(self.worlds["libc"].fd("epoll"))):
            timeout_ms = 15

        def build(world):
            buffer = {"valid": ffi.new("struct epoll_event[]", 4), "null": ffi.NULL,
                      "bad": ffi.cast("struct epoll_event *", BAD_POINTER)}[events]
            args = (world.fd(kind), buffer, maxevents, timeout_ms) + ((ffi.NULL,) if name == "epoll_pwait" else ())
            order = {world.fd(k): k for k in ("unix_stream", "pipe_read")}

            def outputs(result):
                if events != "valid" or result <= 0:
                    return None
                return sorted((buffer[i].events, order.get(buffer[i].data)) for i in range(result))
            return name, args, outputs
        self.both(build)

    @rule(kind=st.sampled_from(["closed", "minus_one"]))
    def close(self, kind):
        self.both(lambda world: ("close", (world.fd(kind),), lambda result: None))

    @rule(name=st.sampled_from(["nanosleep", "clock_nanosleep", "usleep", "sleep"]),
          request=st.sampled_from([(0, 0), (0, 200000), (0, 1000000000), (-1, 0), (0, -1), None]),
          clock=st.sampled_from([time.CLOCK_MONOTONIC, time.CLOCK_REALTIME, 12345]),
          absolute=st.booleans())
    def sleep(self, name, request, clock, absolute):
        def build(world):
            if name == "sleep":
                return name, (0,), lambda result: None
            if name == "usleep":
                usec = 0 if request is None or request[1] < 0 or request[0] < 0 else request[1] // 1000 % 1000000
                return name, (usec,), lambda result: None
            req = ffi.NULL if request is None else ffi.new("struct timespec *", request)
            rem = ffi.new("struct timespec *", (7, 7))
            if name == "nanosleep":
                return name, (req, rem), lambda result: (rem.tv_sec, rem.tv_nsec)
            flags = 1 if absolute and request is not None and request[0] >= 0 and request[1] >= 0 else 0
            return name, (clock, flags, req, rem), lambda result: (rem.tv_sec, rem.tv_nsec)
        self.both(build)


RECEIVES = {"recv", "recvfrom", "recvmsg", "read", "readv", "__read_chk", "__recv_chk", "__recvfrom_chk"}
SENDS = {"send", "sendto", "sendmsg", "write", "writev"}


def run_machine(max_examples):
    run_state_machine_as_test(Differential, settings=settings(
        max_examples=EXAMPLES or max_examples, stateful_step_count=STEPS, deadline=None, database=None,
        phases=PHASES, suppress_health_check=list(HealthCheck)))


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


def test_twins_match_libc_in_a_greenlet_with_a_hub():
    import gevent
    gevent.get_hub()  # the twins wait on this thread's hub
    before = operations["count"]
    greenify.stats(reset=True)
    run_machine(40)
    waited = greenify.stats()
    print(f"\ndifferential: {operations['count'] - before} operations in a greenlet with a hub; "
          f"calls that waited on the hub: {sum(w.calls for w in waited.values())} ({', '.join(sorted(waited))})")
    assert operations["count"] > before
    assert waited, "no twin ever waited on the hub: the run did not test the green road"


def test_twins_match_libc_in_a_plain_thread():
    failure = []
    before = operations["count"]

    def run():
        try:
            run_machine(15)
        except BaseException as exc:  # noqa: B902 - carried to the test's thread
            failure.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    print(f"\ndifferential: {operations['count'] - before} operations in a plain thread")
    assert operations["count"] > before
