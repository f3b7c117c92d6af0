"""A driver's wait as libmariadb makes it: recv refused with EAGAIN, then
poll on that one descriptor.  The green poll starts waiting without asking
the kernel first (csrc/twins/green_poll.c, refused_just_now), so these tests hold
its answers to libc's: the pointer judged as the kernel judges it, revents
overwritten, timeouts, hang-ups and interruptions as before."""
from __future__ import annotations

import ctypes
import mmap
import select
import time

import gevent
import pytest

import greenify
from tests.support.fixturelib import build_library
from tests.support.green_support import socketpair

pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")

WAIT_S = 0.2


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """(patched, stock): two copies of fixtures/fx_refused.c, one patched."""
    folder = tmp_path_factory.mktemp("refused")
    paths = [build_library("fx_refused", "default", folder, name=f"libfxrefused_{which}.so")
             for which in ("patched", "stock")]
    patched, stock = (ctypes.CDLL(str(path)) for path in paths)
    greenify.greenify()
    for lib in (patched, stock):
        lib.fx_refused_then_poll.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                             ctypes.POINTER(ctypes.c_int)]
    with greenify.patched(str(paths[0])) as report:  # unpatched after the module: later tests expect no twins
        assert report
        yield patched, stock


def refused_then_poll_here(lib, fd: int, events: int, timeout_ms: int):
    revents, error = ctypes.c_int(), ctypes.c_int()
    ready = lib.fx_refused_then_poll_here(fd, events, timeout_ms, ctypes.byref(revents), ctypes.byref(error))
    return ready, error.value, revents.value & 0xFFFF


def test_driver_reads_wait_on_the_hub_together(clients):
    patched, _ = clients
    pairs = [socketpair() for _ in range(20)]

    def read(a) -> bytes:
        out = ctypes.create_string_buffer(16)
        got = patched.fx_recv_polled(a.fileno(), out, 16)
        return out.raw[:got]

    try:
        for _, b in pairs:
            gevent.spawn_later(WAIT_S, b.send, b"answer")
        start = time.perf_counter()
        readers = [gevent.spawn(read, a) for a, _ in pairs]
        gevent.joinall(readers, raise_error=True)
        took = time.perf_counter() - start
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert [r.value for r in readers] == [b"answer"] * 20
    assert took < 5 * WAIT_S, f"20 waits of {WAIT_S} s took {took:.2f} s: serial would be {20 * WAIT_S} s"


@pytest.fixture(scope="module")
def bad_pages():
    """{protection name: address} of one page each, mapped PROT_NONE and PROT_READ."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = {name: libc.mmap(None, mmap.PAGESIZE, protection, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
             for name, protection in (("inaccessible", 0), ("read-only", mmap.PROT_READ))}  # 0: PROT_NONE
    assert all(address not in (None, ctypes.c_void_p(-1).value) for address in pages.values())
    yield pages
    for address in pages.values():
        libc.munmap(address, mmap.PAGESIZE)


@pytest.mark.parametrize("where", ["NULL", "inaccessible", "read-only", "heap"])
def test_pollfds_anywhere_after_a_refusal_are_judged_as_libc_judges_them(clients, bad_pages, where):
    """EFAULT for NULL, an inaccessible page and a read-only one (poll
    writes revents); a timeout for a good pointer off the stack."""
    a, b = socketpair()
    # struct pollfd {a, POLLIN, garbage} in Python's heap
    heap = ctypes.create_string_buffer(a.fileno().to_bytes(4, "little") + select.POLLIN.to_bytes(2, "little")
                                       + b"\xff\xff")
    address = {"NULL": None, "heap": ctypes.addressof(heap)}.get(where, bad_pages.get(where))
    try:
        answers = []
        for lib in clients:
            error = ctypes.c_int()
            ready = lib.fx_refused_then_poll(a.fileno(), address, 1, 50, ctypes.byref(error))
            answers.append((ready, error.value, heap.raw[6:8] if where == "heap" else None))
    finally:
        a.close()
        b.close()
    patched, stock = answers
    assert stock == ((0, 0, b"\0\0") if where == "heap" else (-1, 14, None))  # 14: EFAULT
    assert patched == stock


@pytest.mark.parametrize("events", [select.POLLIN, select.POLLIN | select.POLLERR, select.POLLIN | select.POLLPRI,
                                    select.POLLOUT | select.POLLIN])
@pytest.mark.parametrize("then", ["data", "hang-up", "nothing"])
def test_a_stack_pollfd_after_a_refusal_gets_libcs_answer(clients, events, then):
    """Data arriving, the peer closing, or the timeout passing while the
    green poll waits: the result and revents libc gives in the same state."""
    patched, _ = clients
    a, b = socketpair()
    try:
        if then == "data":
            gevent.spawn_later(0.05, b.send, b"x")
        elif then == "hang-up":
            gevent.spawn_later(0.05, b.close)
        ready, error, revents = refused_then_poll_here(patched, a.fileno(), events, 300)
        expected = select.poll()
        expected.register(a.fileno(), events)
        libc_says = expected.poll(0)
    finally:
        a.close()
        b.close()
    assert (ready, error) == (len(libc_says), 0)
    assert revents == (libc_says[0][1] if libc_says else 0)
    if then == "nothing" and events & select.POLLOUT == 0:
        assert ready == 0


def test_an_interrupted_wait_after_a_refusal_leaves_no_garbage_in_revents(clients):
    """The call ends as an interrupted poll does (0, nothing ready), and the
    Timeout is raised when it returns to Python."""
    patched, _ = clients
    a, b = socketpair()
    revents, error = ctypes.c_int(-1), ctypes.c_int(-1)
    try:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.05):
                patched.fx_refused_then_poll_here(a.fileno(), select.POLLIN, -1, ctypes.byref(revents),
                                                  ctypes.byref(error))
    finally:
        a.close()
        b.close()
    assert revents.value & 0xFFFF == 0
