"""README claims about signals and glibc's fortified entry points, each
tested against what libc does:

* a sleep on the hub is not ended by signals (handled ones arrive meanwhile);
* `ppoll`/`pselect` apply their signal mask to a native wait exactly as
  libc does, and not while the greenlet waits on the hub, leaving the
  thread's own mask as it was;
* `__read_chk`, `__recvfrom_chk`, `__poll_chk` and `__ppoll_chk` abort
  through `__chk_fail` where glibc's own do, and pass through where they fit.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import gevent
import pytest

from greenify._green import ffi, lib

pytestmark = pytest.mark.usefixtures("greenified", "no_interruption_left_behind")

libc = ctypes.CDLL(None, use_errno=True)
POLLIN = 1


@pytest.fixture
def usr1_handled():
    """SIGUSR1 handled by a Python handler that counts; yields the count list."""
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(time.monotonic()))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGUSR1, previous)


def send_usr1_later(thread_id: int, delays) -> threading.Thread:
    """From an OS thread: SIGUSR1 to `thread_id` after each of `delays` (seconds from now)."""
    def run():
        started = time.monotonic()
        for delay in delays:
            time.sleep(max(0.0, started + delay - time.monotonic()))
            signal.pthread_kill(thread_id, signal.SIGUSR1)
    sender = threading.Thread(target=run, daemon=True)
    sender.start()
    return sender


def sigset(*signals):
    mask = ffi.new("sigset_t *")
    address = ctypes.c_void_p(int(ffi.cast("uintptr_t", mask)))
    libc.sigemptyset(address)
    for signum in signals:
        libc.sigaddset(address, signum)
    return mask


# ---- sleeps on the hub ----

def test_a_sleep_on_the_hub_is_not_ended_by_handled_signals(usr1_handled):
    gevent.get_hub()  # without a hub the sleep is libc's, which a handled signal ends with EINTR
    sender = send_usr1_later(threading.get_ident(), [0.1, 0.2, 0.3])
    remaining = ffi.new("struct timespec *")
    request = ffi.new("struct timespec *", {"tv_sec": 0, "tv_nsec": 500_000_000})
    started = time.monotonic()
    ffi.errno = 0
    result = lib.green_nanosleep(request, remaining)
    took = time.monotonic() - started
    sender.join()
    gevent.sleep(0)  # the handler runs at the next Python instruction at the latest
    assert (result, ffi.errno) == (0, 0)
    assert took >= 0.5, f"the sleep ended after {took:.3f} s of 0.5"
    assert len(usr1_handled) == 3, "the signals were not delivered during the sleep"
    assert all(moment < started + took for moment in usr1_handled[:2])


# ---- the signal masks of ppoll and pselect ----

def native_ppoll_in_a_plain_thread(thread_mask_blocks_usr1: bool, call_mask, seconds: int):
    """green_ppoll in an OS thread with no hub (the native wait), on a pipe
    nothing is written to, for `seconds`; SIGUSR1 is sent to that thread at
    0.1 s.  Returns (result, errno, seconds taken)."""
    read_end, write_end = os.pipe()
    outcome = {}

    def run():
        if thread_mask_blocks_usr1:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        fds = ffi.new("struct pollfd[1]")
        fds[0].fd, fds[0].events = read_end, POLLIN
        timeout = ffi.new("struct timespec *", {"tv_sec": seconds, "tv_nsec": 0})
        outcome["ready"] = time.monotonic()
        started = time.monotonic()
        ffi.errno = 0
        result = lib.green_ppoll(fds, 1, timeout, call_mask)
        outcome["call"] = (result, ffi.errno, time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    while "ready" not in outcome:
        time.sleep(0.001)
    send_usr1_later(thread.ident, [0.1]).join()
    thread.join()
    os.close(read_end)
    os.close(write_end)
    return outcome["call"]


def test_ppoll_unblocking_a_signal_for_a_native_wait_is_ended_by_it_with_eintr(usr1_handled):
    result, err, took = native_ppoll_in_a_plain_thread(True, sigset(), seconds=5)
    assert (result, err) == (-1, errno.EINTR)
    assert took < 2.5, f"ppoll went on to {took:.2f} s after the signal its mask let through at 0.1 s"


def test_ppoll_blocking_a_signal_for_a_native_wait_is_not_ended_by_it(usr1_handled):
    result, err, took = native_ppoll_in_a_plain_thread(False, sigset(signal.SIGUSR1), seconds=1)
    assert (result, err) == (0, 0)
    assert took >= 1
    time.sleep(0.05)
    assert len(usr1_handled) == 1, "the signal blocked during ppoll was not delivered after it"


@pytest.mark.parametrize("call", ["ppoll", "pselect"])
def test_on_the_hub_the_call_mask_does_not_apply_and_the_threads_mask_is_kept(usr1_handled, call):
    # The README's limit: the mask applies to probes and native waits only.
    # A signal it would block arrives during the hub wait; the call still
    # runs to its timeout, and the thread's mask is what it was.
    read_end, write_end = os.pipe()
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    timeout = ffi.new("struct timespec *", {"tv_sec": 0, "tv_nsec": 500_000_000})
    sender = send_usr1_later(threading.get_ident(), [0.1])
    started = time.monotonic()
    ffi.errno = 0
    if call == "ppoll":
        fds = ffi.new("struct pollfd[1]")
        fds[0].fd, fds[0].events = read_end, POLLIN
        result = lib.green_ppoll(fds, 1, timeout, sigset(signal.SIGUSR1))
    else:
        readable = ffi.new("fd_set *")
        ffi.cast("unsigned long *", readable)[read_end // 64] |= 1 << (read_end % 64)
        result = lib.green_pselect(read_end + 1, readable, ffi.NULL, ffi.NULL, timeout, sigset(signal.SIGUSR1))
    took = time.monotonic() - started
    sender.join()
    os.close(read_end)
    os.close(write_end)
    assert (result, ffi.errno) == (0, 0)
    assert took >= 0.5
    assert len(usr1_handled) == 1 and usr1_handled[0] < started + took, "SIGUSR1 was held back during the hub wait"
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask_before


# ---- fortified entry points: green against glibc's own ----

FORTIFY_CHILD = textwrap.dedent("""
    import socket, sys
    import cffi, greenify
    from greenify._green import ffi, lib

    which, case, fits = sys.argv[1], sys.argv[2], sys.argv[3] == "fits"
    raw = cffi.FFI()
    raw.cdef('''
        long __read_chk(int, void *, size_t, size_t);
        long __recvfrom_chk(int, void *, size_t, size_t, int, void *, void *);
        int __poll_chk(void *, unsigned long, int, size_t);
        int __ppoll_chk(void *, unsigned long, void *, void *, size_t);
    ''')
    glibc = raw.dlopen(None)
    greenify.greenify()
    a, b = socket.socketpair()
    b.sendall(b"x" * 64)
    buf = ffi.new("char[]", 16)
    fds = ffi.new("struct pollfd[2]")
    for entry in fds:
        entry.fd, entry.events = a.fileno(), 1
    zero = ffi.new("struct timespec *")
    size = 16 if fits else 4                      # the buffer the caller claims, in bytes
    fdslen = ffi.sizeof("struct pollfd") * (2 if fits else 1)
    call = getattr(lib, "green_" + case) if which == "green" else getattr(glibc, case)
    args = {
        "__read_chk": (a.fileno(), buf, 16, size),
        "__recvfrom_chk": (a.fileno(), buf, 16, size, 0, ffi.NULL, ffi.NULL),
        "__poll_chk": (fds, 2, 0, fdslen),
        "__ppoll_chk": (fds, 2, zero, ffi.NULL, fdslen),
    }[case]
    print(call(*args), [entry.revents for entry in fds])
""")


def fortified_call(which: str, case: str, fits: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FORTIFY_CHILD, which, case, "fits" if fits else "overflows"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["__read_chk", "__recvfrom_chk", "__poll_chk", "__ppoll_chk"])
def test_fortified_twins_abort_where_glibcs_do_and_pass_where_they_fit(case):
    for which in ("green", "glibc"):
        overflow = fortified_call(which, case, fits=False)
        assert overflow.returncode == -signal.SIGABRT, (which, overflow.returncode, overflow.stdout, overflow.stderr)
        assert "buffer overflow detected" in overflow.stderr, (which, overflow.stderr)
    green, glibc = fortified_call("green", case, fits=True), fortified_call("glibc", case, fits=True)
    assert green.returncode == glibc.returncode == 0, (green.stderr, glibc.stderr)
    assert green.stdout == glibc.stdout
