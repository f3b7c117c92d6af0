"""getaddrinfo, getnameinfo, gethostbyname, gethostbyname_r: numeric ones
answered by libc in place (compared with libc over a table of inputs), the
others libc's own call on gevent's thread pool, libc's own results, nothing
written after an interrupted caller has left, nothing kept for it, and the
number of pending lookups and their descriptors bounded under a storm.

The slow-DNS tests point the resolver at a responder of their own on
127.0.0.77:53 (resolv.conf has no port).  They never write the system's
/etc/resolv.conf: each runs again in a child pytest inside a mount namespace
of its own, where a temporary file is bind-mounted over /etc/resolv.conf
(see `in_private_resolver`)."""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import gevent
import pytest

from tests.support import children_env, module_command
from gevent._hub_local import get_hub_if_exists

from tests.support.green_support import libc, no_interruption_pending, open_fds, run_concurrently
from tests.support.servers import RUNNING_AS_ROOT, _die_with_parent, missing
from greenify._green import ffi, lib

EAI_SYSTEM = socket.EAI_SYSTEM
NETDB_INTERNAL = -1
HOST_NOT_FOUND = 1

libc.gethostbyname.restype = ctypes.c_void_p
libc.__h_errno_location.restype = ctypes.POINTER(ctypes.c_int)


pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")


def h_errno() -> int:
    return libc.__h_errno_location().contents.value


# ---- calling the green functions and reading their results ----

def hints(family=0, socktype=0, flags=0):
    h = ffi.new("struct addrinfo *")
    h.ai_family, h.ai_socktype, h.ai_flags = family, socktype, flags
    return h


def addrinfo_list(head):
    out = []
    ai = head
    while ai != ffi.NULL:
        out.append((ai.ai_family, ai.ai_socktype, ai.ai_protocol, bytes(ffi.buffer(ai.ai_addr, ai.ai_addrlen)),
                    ffi.string(ai.ai_canonname) if ai.ai_canonname != ffi.NULL else None))
        ai = ai.ai_next
    return out


def green_getaddrinfo(node, service, h=ffi.NULL):
    res = ffi.new("struct addrinfo **")
    ffi.errno = 0
    rc = lib.green_getaddrinfo(node if node is not None else ffi.NULL,
                               service if service is not None else ffi.NULL, h, res)
    err = ffi.errno
    listing = []
    if rc == 0:
        listing = addrinfo_list(res[0])
        lib.freeaddrinfo(res[0])  # libc's own list: freed the usual way
    return rc, listing, err if rc == EAI_SYSTEM else 0


def libc_getaddrinfo(node, service, h=ffi.NULL):
    # the same call through the very same cffi declarations, to libc
    res = ffi.new("struct addrinfo **")
    lib.green_set_active(0)
    try:
        rc = lib.green_getaddrinfo(node if node is not None else ffi.NULL,
                                   service if service is not None else ffi.NULL, h, res)
    finally:
        lib.green_set_active(1)
    listing = []
    if rc == 0:
        listing = addrinfo_list(res[0])
        lib.freeaddrinfo(res[0])
    return rc, listing, 0


def sockaddr_in(host: str, port: int):
    raw = struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(host))
    raw = struct.pack("=H", socket.AF_INET) + raw[2:]
    return ffi.from_buffer("struct sockaddr *", bytearray(raw)), len(raw)


def getnameinfo_via(active_flag, host, port, hostlen=1025, servlen=32, flags=0):
    sa, salen = sockaddr_in(host, port)
    hostbuf = ffi.new("char[]", max(hostlen, 1))
    servbuf = ffi.new("char[]", max(servlen, 1))
    lib.green_set_active(active_flag)
    try:
        rc = lib.green_getnameinfo(sa, salen, hostbuf, hostlen, servbuf, servlen, flags)
    finally:
        lib.green_set_active(1)
    return rc, ffi.string(hostbuf), ffi.string(servbuf)


def hostent_fields(h):
    def strings(array):
        out, i = [], 0
        while array[i] != ffi.NULL:
            out.append(ffi.string(array[i]))
            i += 1
        return out

    def addresses(array, length):
        out, i = [], 0
        while array[i] != ffi.NULL:
            out.append(bytes(ffi.buffer(array[i], length)))
            i += 1
        return out

    return (ffi.string(h.h_name), strings(h.h_aliases), h.h_addrtype, h.h_length,
            addresses(h.h_addr_list, h.h_length))


def gethostbyname_r_via(active_flag, name, buflen=1024):
    ret = ffi.new("struct hostent *")
    buf = ffi.new("char[]", buflen)
    result = ffi.new("struct hostent **")
    herr = ffi.new("int *")
    lib.green_set_active(active_flag)
    try:
        rc = lib.green_gethostbyname_r(name, ret, buf, buflen, result, herr)
    finally:
        lib.green_set_active(1)
    fields = hostent_fields(result[0]) if result[0] != ffi.NULL else None
    inside = None
    if fields is not None:
        start = int(ffi.cast("uintptr_t", buf))
        inside = all(start <= int(ffi.cast("uintptr_t", p)) < start + buflen
                     for p in (result[0].h_name, result[0].h_aliases, result[0].h_addr_list))
    return rc, result[0] == ret if result[0] != ffi.NULL else None, herr[0], fields, inside


# ---- results are libc's ----

@pytest.mark.parametrize("node,service,h", [
    (b"localhost", b"80", None),
    (b"localhost", b"http", {"socktype": socket.SOCK_STREAM}),
    (b"127.0.0.1", None, {"family": socket.AF_INET}),
    (b"localhost", None, {"flags": socket.AI_CANONNAME}),
    (None, b"5432", {"flags": socket.AI_PASSIVE}),
    (None, None, None),                                       # EAI_NONAME
    (b"localhost", b"no-such-service-here", None),            # EAI_SERVICE
    (b"localhost", b"80", {"family": 12345}),                 # EAI_FAMILY
    (b"localhost", b"80", {"flags": 0x7fff0000}),             # EAI_BADFLAGS
])
def test_getaddrinfo_gives_libcs_results(node, service, h):
    h_struct = hints(**h) if h is not None else ffi.NULL
    assert green_getaddrinfo(node, service, h_struct) == libc_getaddrinfo(node, service, h_struct)


def test_getaddrinfo_leaves_errno_alone_on_success():
    res = ffi.new("struct addrinfo **")
    ffi.errno = errno.EBADF
    assert lib.green_getaddrinfo(b"localhost", b"80", ffi.NULL, res) == 0
    assert ffi.errno == errno.EBADF
    lib.freeaddrinfo(res[0])


# ---- numeric lookups: libc's answer, in the caller's thread ----

NUMERIC_NODES = [b"127.0.0.1", b"0.0.0.0", b"127.1", b"0x7f.0.0.1", b"017.0.0.1", b"255.255.255.255",
                 b"::1", b"::", b"::ffff:127.0.0.1", b"fe80::1%lo", b"fe80::1%1", b"2001:db8::5", None]
NUMERIC_SERVICES = [None, b"3306", b"0", b"65535", b"99999"]
FAMILIES = [socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6]
SOCKTYPES = [0, socket.SOCK_STREAM, socket.SOCK_DGRAM]
FLAG_SETS = [0, socket.AI_NUMERICHOST, socket.AI_NUMERICSERV, socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
             socket.AI_PASSIVE, socket.AI_CANONNAME, socket.AI_V4MAPPED, socket.AI_V4MAPPED | socket.AI_ALL,
             socket.AI_ADDRCONFIG, socket.AI_PASSIVE | socket.AI_NUMERICSERV]


def getaddrinfo_via(active_flag, node, service, h=ffi.NULL):
    """rc, the list, and errno when rc is EAI_SYSTEM: green (1) or libc's (0)."""
    lib.green_set_active(active_flag)
    try:
        return green_getaddrinfo(node, service, h)
    finally:
        lib.green_set_active(1)


def numeric_cases():
    for node in NUMERIC_NODES:
        for service in NUMERIC_SERVICES:
            yield node, service, None
            for family in FAMILIES:
                for socktype in SOCKTYPES:
                    for flags in FLAG_SETS:
                        yield node, service, (family, socktype, flags)


def test_numeric_getaddrinfo_is_libcs_answer_and_never_waits():
    greenify_stats = __import__("greenify").stats
    greenify_stats(reset=True)
    differences, answered = [], 0
    for node, service, h in numeric_cases():
        h_struct = hints(*h) if h is not None else ffi.NULL
        green = getaddrinfo_via(1, node, service, h_struct)
        native = getaddrinfo_via(0, node, service, h_struct)
        answered += green[0] == 0
        if green != native:
            differences.append((node, service, h, green[0], native[0]))
    assert differences == []
    assert answered > 1000  # the table is mostly answers, not only errors
    assert "getaddrinfo" not in greenify_stats()  # no lookup waited for a worker thread
    assert lib.green_offload_live_jobs() == 0


@pytest.mark.parametrize("name", [b"127.0.0.1", b"10.1", b"4294967295", b"1.2.3.4.5", b"256.1.1.1"])
def test_gethostbyname_of_a_dotted_address_is_libcs_answer(name):
    # the last two are no addresses: libc says so without NSS (on a worker: they are not numeric)
    greenify_stats = __import__("greenify").stats
    greenify_stats(reset=True)
    green = lib.green_gethostbyname(name)
    green_fields, green_herrno = (hostent_fields(green) if green != ffi.NULL else None), h_errno()
    lib.green_set_active(0)
    try:
        native = lib.green_gethostbyname(name)
        native_fields, native_herrno = (hostent_fields(native) if native != ffi.NULL else None), h_errno()
    finally:
        lib.green_set_active(1)
    assert (green_fields, green_herrno) == (native_fields, native_herrno)
    assert gethostbyname_r_via(1, name) == gethostbyname_r_via(0, name)
    if green_fields is not None:
        assert "gethostbyname" not in greenify_stats() and "gethostbyname_r" not in greenify_stats()


@pytest.mark.parametrize("node,service,flags,expected", [
    (b"localhost", None, socket.AI_NUMERICHOST, socket.EAI_NONAME),      # the caller's flag: no lookup
    (b"127.0.0.1", b"http", socket.AI_NUMERICSERV, socket.EAI_NONAME),
    (b"127.0.0.1", b"http", 0, 0),                                        # the service from /etc/services
    (b"localhost", b"3306", 0, 0),                                        # the host from /etc/hosts
    (None, None, 0, socket.EAI_NONAME),
    (None, b"http", socket.AI_PASSIVE, 0),
])
def test_what_is_not_numeric_is_looked_up_and_agrees_with_libc(node, service, flags, expected):
    h = hints(socktype=socket.SOCK_STREAM, flags=flags)
    green = getaddrinfo_via(1, node, service, h)
    assert green == getaddrinfo_via(0, node, service, h)
    assert green[0] == expected


def test_a_numeric_lookup_leaves_errno_alone_on_success():
    res = ffi.new("struct addrinfo **")
    ffi.errno = errno.EBADF
    assert lib.green_getaddrinfo(b"127.0.0.1", b"3306", ffi.NULL, res) == 0
    assert ffi.errno == errno.EBADF
    lib.freeaddrinfo(res[0])


@pytest.mark.parametrize("host,port,hostlen,servlen,flags", [
    ("127.0.0.1", 80, 1025, 32, 0),
    ("127.0.0.1", 22, 1025, 32, socket.NI_NAMEREQD),
    ("127.0.0.1", 80, 3, 32, 0),                  # EAI_OVERFLOW
    ("127.0.0.1", 80, 1025, 32, socket.NI_NUMERICHOST),
    ("127.0.0.1", 65000, 1025, 32, socket.NI_DGRAM),
])
def test_getnameinfo_gives_libcs_results(host, port, hostlen, servlen, flags):
    assert getnameinfo_via(1, host, port, hostlen, servlen, flags) == \
        getnameinfo_via(0, host, port, hostlen, servlen, flags)


def test_gethostbyname_gives_libcs_fields():
    green = lib.green_gethostbyname(b"localhost")
    green_fields = hostent_fields(green)
    lib.green_set_active(0)
    try:
        native = lib.green_gethostbyname(b"localhost")
    finally:
        lib.green_set_active(1)
    assert green_fields == hostent_fields(native)
    assert green != native  # not libc's static storage: this thread's own


def test_gethostbyname_result_is_not_overwritten_by_lookups_in_other_threads():
    green = lib.green_gethostbyname(b"localhost")
    before = hostent_fields(green)
    thread = threading.Thread(target=lambda: [libc.gethostbyname(b"127.0.0.2") for _ in range(50)])
    thread.start()
    thread.join()
    assert hostent_fields(green) == before


@pytest.mark.parametrize("buflen", [8, 64, 1024])  # small ones: libc's ERANGE
def test_gethostbyname_r_gives_libcs_results_inside_the_callers_buffer(buflen):
    green = gethostbyname_r_via(1, b"localhost", buflen)
    assert green == gethostbyname_r_via(0, b"localhost", buflen)
    rc, is_ret, herr, fields, inside = green
    if rc == 0:
        assert is_ret and inside
    else:
        assert rc == errno.ERANGE


def test_lookups_run_while_other_greenlets_progress():
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.001)) for _ in range(3)])
    values, took = run_concurrently(20, lambda i: green_getaddrinfo(b"localhost", b"80")[0])
    ticker.join()
    assert values == [0] * 20 and len(ticks) == 3


def test_in_a_plain_thread_lookups_call_libc_and_create_no_hub():
    seen = {}

    def worker():
        seen["gai"] = green_getaddrinfo(b"localhost", b"80")
        seen["ghbn"] = hostent_fields(lib.green_gethostbyname(b"localhost"))
        seen["gni"] = getnameinfo_via(1, "127.0.0.1", 80)
        seen["hub"] = get_hub_if_exists()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["hub"] is None
    assert seen["gai"] == libc_getaddrinfo(b"localhost", b"80")
    assert seen["gni"] == getnameinfo_via(0, "127.0.0.1", 80)
    assert seen["ghbn"][0] == b"localhost"


def test_inside_the_hub_lookups_call_libc():
    results = []
    gevent.get_hub().loop.run_callback(lambda: results.append(green_getaddrinfo(b"localhost", b"80")[0]))
    gevent.sleep(0.05)
    assert results == [0]


# ---- a slow DNS server of our own ----

FAKE_DNS_ADDRESS = "127.0.0.77"
ANSWER = "10.1.2.3"


class SlowDNS:
    """Answers A queries with ANSWER after `delay`, each on its own timer;
    NXDOMAIN for names starting with "missing"; an empty answer otherwise."""

    def __init__(self, delay: float):
        self.delay = delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((FAKE_DNS_ADDRESS, 53))
        self.sock.settimeout(0.05)  # so that close() can stop the server promptly
        self.queries = 0
        self.stopping = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping:
            try:
                query, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            self.queries += 1
            timer = threading.Timer(self.delay, self.answer, (query, peer))
            timer.daemon = True
            timer.start()

    def answer(self, query: bytes, peer):
        (qid,) = struct.unpack("!H", query[:2])
        end, labels = 12, []
        while query[end]:
            labels.append(query[end + 1:end + 1 + query[end]].decode())
            end += 1 + query[end]
        question = query[12:end + 5]
        qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
        missing = labels[0].startswith("missing")
        answers = b""
        if qtype == 1 and not missing:
            answers = struct.pack("!HHHIH4s", 0xC00C, 1, 1, 60, 4, socket.inet_aton(ANSWER))
        flags = 0x8183 if missing else 0x8180
        header = struct.pack("!HHHHHH", qid, flags, 1, 1 if answers else 0, 0, 0)
        try:
            self.sock.sendto(header + question + answers, peer)
        except OSError:
            pass

    def close(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


# ---- a private resolver configuration for the slow-DNS tests ----

RESOLV_CONF = f"nameserver {FAKE_DNS_ADDRESS}\noptions timeout:3 attempts:1\n"
PRIVATE_RESOLVER_ENV = "GREENIFY_TEST_PRIVATE_RESOLV_CONF"  # set in the child: the file mounted there
CHILD_TIMEOUT_S = 120


def namespace_command(resolv_conf_path: str) -> list:
    """The command prefix that runs what follows it in a mount namespace of its
    own with `resolv_conf_path` bind-mounted over /etc/resolv.conf.  The mount
    lives and dies with the namespace: nothing is left to restore, whatever
    kills the child.  A network namespace of its own (its loopback brought
    up) gives each child port 53 to itself, so that test runs side by side
    (other checkouts on the same machine) do not collide; without root, a
    user namespace makes us root inside it."""
    if shutil.which("unshare") is None:
        missing("the slow-DNS tests need unshare(1) for a private /etc/resolv.conf: apt-get install util-linux")
    if RUNNING_AS_ROOT:
        unshare = ["unshare", "--mount", "--propagation", "private", "--net"]
    else:
        unshare = ["unshare", "--user", "--map-root-user", "--mount", "--net"]
    setup = "ip link set lo up && "
    return unshare + ["--", "sh", "-c", setup + 'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf_path]


@functools.lru_cache(maxsize=None)
def private_resolver_problem() -> str:
    """Why no private resolver configuration can be made here ("" if one can)."""
    with tempfile.NamedTemporaryFile("w", prefix="greenify-resolv-", suffix=".conf") as conf:
        conf.write(RESOLV_CONF)
        conf.flush()
        probe = subprocess.run(namespace_command(conf.name) + ["cat", "/etc/resolv.conf"],
                               capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or probe.stdout != RESOLV_CONF:
        return (f"cannot bind-mount a private /etc/resolv.conf in a mount namespace "
                f"(exit code {probe.returncode}): {probe.stderr.strip() or probe.stdout.strip()}")
    return ""


def in_private_resolver(test):
    """Run `test` in a child pytest whose /etc/resolv.conf names the slow DNS
    server; this test passes when the child's does and shows its output when
    it does not.  In the child (PRIVATE_RESOLVER_ENV set) the test just runs."""
    if os.environ.get(PRIVATE_RESOLVER_ENV):
        return test

    def run_in_child():
        problem = private_resolver_problem()
        if problem:
            missing(f"the slow-DNS tests need a private resolver configuration: {problem}")
        with tempfile.NamedTemporaryFile("w", prefix="greenify-resolv-", suffix=".conf") as conf:
            conf.write(RESOLV_CONF)
            conf.flush()
            env = dict(os.environ, **{PRIVATE_RESOLVER_ENV: conf.name})
            child = subprocess.run(
                namespace_command(conf.name) + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                f"{os.path.abspath(__file__)}::{test.__name__}"],
                env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                preexec_fn=_die_with_parent)
        assert child.returncode == 0, \
            f"{test.__name__} failed in its private resolver namespace:\n{child.stdout[-6000:]}{child.stderr[-2000:]}"

    run_in_child.__name__, run_in_child.__doc__ = test.__name__, test.__doc__
    return run_in_child


@contextmanager
def slow_dns(delay: float):
    """The slow DNS server, in the child that in_private_resolver started."""
    with open("/etc/resolv.conf") as resolv_conf:
        assert resolv_conf.read() == RESOLV_CONF, "not in in_private_resolver's namespace"
    server = SlowDNS(delay)
    try:
        yield server
    finally:
        server.close()


@in_private_resolver
def test_slow_lookups_overlap_on_the_thread_pool():
    delay, count = 0.5, 8  # in a row: 4 s; side by side on the pool's 10 threads: about 0.5 s
    with slow_dns(delay):
        def lookup(i):
            return green_getaddrinfo(f"slow-{i}.greenify.test".encode(), None,
                                     hints(family=socket.AF_INET, socktype=socket.SOCK_STREAM))

        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(4)])
        values, took = run_concurrently(count, lookup)
        ticker.join()
    for rc, listing, err in values:
        assert rc == 0
        assert [entry[3][4:8] for entry in listing] == [socket.inet_aton(ANSWER)]
    assert took < delay * count / 2
    assert len(ticks) == 4


@in_private_resolver
def test_slow_gethostbyname_and_r_and_libcs_not_found():
    delay, count = 0.5, 8
    with slow_dns(delay):
        values, took = run_concurrently(count, lambda i: hostent_fields(
            lib.green_gethostbyname(f"ghbn-{i}.greenify.test".encode()))[4])
        assert values == [[socket.inet_aton(ANSWER)]] * count
        assert took < delay * count / 2  # side by side, not in a row
        rc, is_ret, herr, fields, inside = gethostbyname_r_via(1, b"r.greenify.test", 1024)
        assert (rc, is_ret, inside, fields[4]) == (0, True, True, [socket.inet_aton(ANSWER)])
        assert lib.green_gethostbyname(b"missing.greenify.test") == ffi.NULL
        green_herrno = h_errno()
        assert libc.gethostbyname(b"missing2.greenify.test") is None
        assert green_herrno == h_errno() == HOST_NOT_FOUND
        assert green_getaddrinfo(b"missing.greenify.test", None)[0] == \
            libc_getaddrinfo(b"missing3.greenify.test", None)[0] == socket.EAI_NONAME


@in_private_resolver
def test_a_timeout_abandons_the_lookup_and_the_pool_frees_it():
    answer_delay = 3.0
    with slow_dns(answer_delay) as server:
        assert lib.green_offload_live_jobs() == 0
        start = time.monotonic()
        with pytest.raises(gevent.Timeout) as caught:
            with gevent.Timeout(0.1) as timeout:
                green_getaddrinfo(b"abandoned.greenify.test", None, hints(family=socket.AF_INET))
                pytest.fail("the line after the call ran")
        assert caught.value is timeout
        assert time.monotonic() - start < answer_delay / 2  # did not wait for the answer
        assert lib.green_offload_live_jobs() == 1  # still in the pool's hands
        deadline = time.monotonic() + answer_delay + 5
        while lib.green_offload_live_jobs() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        # the pool finished it and freed it, its getaddrinfo list included
        assert lib.green_offload_live_jobs() == 0
        assert server.queries >= 1


@in_private_resolver
def test_a_hundred_abandoned_lookups_leave_nothing_behind():
    with slow_dns(0.05):
        green_getaddrinfo(b"warm-up.greenify.test", None)  # the hub's thread pool, and its fds, exist now
        fds = open_fds()
        for i in range(100):
            with gevent.Timeout(0.001 * (i % 5), False):
                green_getaddrinfo(f"many-{i}.greenify.test".encode(), None, hints(family=socket.AF_INET))
        deadline = time.monotonic() + 3
        while lib.green_offload_live_jobs() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert lib.green_offload_live_jobs() == 0
        assert no_interruption_pending()
        # kept eventfds, one per lookup that was in flight at once (a dozen or two,
        # as the machine's speed allows); a leak would keep one per abandoned lookup
        abandoned = 100  # each gives up after 0-4 ms of the answer's 50
        assert open_fds() - fds < abandoned / 2


@in_private_resolver
def test_an_interrupted_gethostbyname_r_never_writes_into_the_callers_buffer():
    with slow_dns(0.3):
        ret = ffi.new("struct hostent *")
        buf = ffi.new("char[]", 1024)
        ffi.memmove(buf, b"\xaa" * 1024, 1024)
        result = ffi.new("struct hostent **")
        herr = ffi.new("int *")
        with gevent.Timeout(0.05, False):
            lib.green_gethostbyname_r(b"late.greenify.test", ret, buf, 1024, result, herr)
        gevent.sleep(0.5)
        assert bytes(ffi.buffer(buf)) == b"\xaa" * 1024
        assert ret.h_name == ffi.NULL


@in_private_resolver
def test_a_killed_lookup_ends_the_greenlet_at_once():
    answer_delay = 3.0
    with slow_dns(answer_delay):
        g = gevent.spawn(lambda: green_getaddrinfo(b"killed.greenify.test", None))
        gevent.sleep(0.05)
        start = time.monotonic()
        g.kill()
        assert time.monotonic() - start < answer_delay / 2  # did not wait for the answer
        assert isinstance(g.value, gevent.GreenletExit)
        deadline = time.monotonic() + answer_delay + 5
        while lib.green_offload_live_jobs() and time.monotonic() < deadline:
            gevent.sleep(0.05)


# ---- bounds: pending lookups, their descriptors, a storm ----

def slow_lookups(count: int, prefix: str):
    """count greenlets, each looking up a name of its own (the slow DNS answers late)."""
    return [gevent.spawn(green_getaddrinfo, f"{prefix}-{i}.greenify.test".encode(), None,
                         hints(family=socket.AF_INET)) for i in range(count)]


def settle(deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while (lib.green_offload_live_jobs() or lib.green_offload_pending()) and time.monotonic() < deadline:
        gevent.sleep(0.05)


@in_private_resolver
def test_beyond_the_bound_lookups_wait_their_turn_and_the_hub_runs_on():
    answer_delay, count = 0.2, 100
    bound = lib.green_offload_max_pending()
    with slow_dns(answer_delay):
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(20)])
        fds = open_fds()
        lookups = slow_lookups(count, "turn")
        most_pending = most_fds = 0
        while not all(g.dead for g in lookups):
            most_pending = max(most_pending, lib.green_offload_pending())
            most_fds = max(most_fds, open_fds() - fds)
            gevent.sleep(0.005)
        ticker.join()
        assert [g.value[0] for g in lookups] == [0] * count  # every one answered, none refused
        assert most_pending == bound  # the bound was reached, and held
        # an eventfd per pending lookup, one for those waiting a turn, each runner's DNS socket
        assert most_fds <= bound + 1 + lib.green_offload_max_runners()
        assert len(ticks) == 20  # the hub ran on meanwhile
        settle(5)
        assert lib.green_offload_pending() == 0


@in_private_resolver
def test_a_numeric_lookup_is_answered_at_once_while_every_slot_is_taken():
    answer_delay = 2.0
    with slow_dns(answer_delay):
        lookups = slow_lookups(lib.green_offload_max_pending() + 20, "full")
        gevent.sleep(0.2)
        assert lib.green_offload_pending() == lib.green_offload_max_pending()
        start = time.monotonic()
        assert green_getaddrinfo(b"127.0.0.1", b"3306")[0] == 0
        assert green_getaddrinfo(b"::1", None)[0] == 0
        assert time.monotonic() - start < answer_delay / 4
        gevent.killall(lookups)
        settle(answer_delay + 10)
        assert lib.green_offload_live_jobs() == 0


@in_private_resolver
def test_interrupted_queued_lookups_are_never_started():
    answer_delay = 1.0
    with slow_dns(answer_delay) as server:
        runners = lib.green_offload_max_runners()
        first = slow_lookups(runners, "running")  # every runner busy with these
        deadline = time.monotonic() + 10
        while server.queries < runners and time.monotonic() < deadline:
            gevent.sleep(0.01)
        queries = server.queries
        assert queries == runners
        for i in range(40):
            with gevent.Timeout(0.01, False):
                green_getaddrinfo(f"gone-{i}.greenify.test".encode(), None, hints(family=socket.AF_INET))
        assert lib.green_offload_live_jobs() <= runners  # the 40 gone at once, not when a runner frees
        gevent.joinall(first)
        settle(answer_delay + 5)
        assert lib.green_offload_live_jobs() == 0
        assert server.queries == queries  # none of the 40 reached the DNS server


def run_storm(*args: str) -> dict:
    """tests/support/resolver_storm.py in a process of its own; its JSON report."""
    done = subprocess.run(module_command("tests.support.resolver_storm", *args), capture_output=True, text=True,
                          timeout=120, preexec_fn=_die_with_parent, env=children_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def assert_storm_left_nothing(report: dict, fds_per_greenlet: int = 0) -> None:
    """No failure but interruptions; at most max_pending lookups pending; the
    descriptors within the resolver's bound (plus `fds_per_greenlet` for each
    of the storm's greenlets: their connections); all back once it is over."""
    failures = {outcome: n for outcome, n in report["outcomes"].items() if outcome not in ("answered", "interrupted")}
    assert failures == {}, report  # no EMFILE, from the lookups or the sockets after them
    assert report["outcomes"].get("interrupted", 0) > 0, report  # the storm did interrupt lookups
    assert report["most_pending"] <= report["max_pending"], report
    # each pending lookup holds one eventfd; one more for callers waiting a turn; each runner's DNS
    # socket; a few for gevent's pool
    resolver_fds = report["max_pending"] + 1 + report["max_runners"] + 4
    assert report["most_fds"] <= report["baseline_fds"] + resolver_fds + fds_per_greenlet * report["greenlets"], report
    assert report["after_live_jobs"] == report["after_pending"] == 0, report
    # back to the baseline, but for the eventfds kept for reuse (at most max_pending) and the turn's
    kept = report["after_spare_fds"] - report["baseline_spare_fds"]
    assert report["after_fds"] - kept <= report["baseline_fds"] + 4, report


@in_private_resolver
def test_a_storm_of_interrupted_slow_lookups_stays_within_the_descriptor_limit():
    with slow_dns(0.05):
        report = run_storm("--host", "greenify.test", "--unique-names", "--nofile", "128",
                           "--greenlets", "300", "--seconds", "3", "--timeouts-ms", "5", "150")
    assert_storm_left_nothing(report)
    assert report["outcomes"].get("answered", 0) > 0, report


@in_private_resolver
def test_a_child_forked_amid_lookups_resolves_and_its_parent_finishes_them():
    answer_delay = 0.5
    with slow_dns(answer_delay):
        lookups = slow_lookups(lib.green_offload_max_runners() + 10, "forked")  # running and queued
        gevent.sleep(0.1)
        pid = os.fork()
        if pid == 0:  # the child: none of the parent's runners came along, nor the DNS server's thread
            status = 1
            try:
                with gevent.Timeout(20):
                    gevent.killall(lookups)  # the copies of the parent's callers
                    green = [green_getaddrinfo(b"localhost", b"80")[0] for _ in range(3)]
                    numeric = green_getaddrinfo(b"127.0.0.1", None)[0]
                    settle(10)
                    left = lib.green_offload_live_jobs(), lib.green_offload_pending()
                    status = 0 if (green, numeric, left) == ([0, 0, 0], 0, (0, 0)) else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        gevent.joinall(lookups, timeout=30)
        assert [g.value[0] for g in lookups] == [0] * len(lookups)
        settle(5)
        assert lib.green_offload_live_jobs() == 0
