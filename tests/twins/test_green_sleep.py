"""sleep, usleep, nanosleep, clock_nanosleep: hub timers with libc's results."""
from __future__ import annotations

import ctypes
import errno
import subprocess
import threading
import time

import gevent
import pytest
from gevent._hub_local import get_hub_if_exists

import greenify
from tests.support.green_support import libc, no_interruption_pending, run_concurrently
from greenify._green import ffi, lib

CLOCK_REALTIME = lib.CLOCK_REALTIME
CLOCK_MONOTONIC = lib.CLOCK_MONOTONIC
CLOCK_THREAD_CPUTIME_ID = 3
TIMER_ABSTIME = lib.TIMER_ABSTIME


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


def timespec(seconds: float):
    ts = ffi.new("struct timespec *")
    ts.tv_sec = int(seconds)
    ts.tv_nsec = int(round((seconds - int(seconds)) * 1e9))
    return ts


def clock_now(clock: int) -> float:
    return time.clock_gettime(clock)


class CTimespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def libc_nanosleep(sec: int, nsec: int):
    ctypes.set_errno(0)
    result = libc.nanosleep(ctypes.byref(CTimespec(sec, nsec)), None)
    return result, ctypes.get_errno()


def libc_clock_nanosleep(clock: int, flags: int, sec: int, nsec: int):
    ctypes.set_errno(0)
    result = libc.clock_nanosleep(clock, flags, ctypes.byref(CTimespec(sec, nsec)), None)
    return result, ctypes.get_errno()


def green_nanosleep(sec: int, nsec: int):
    ts = ffi.new("struct timespec *", {"tv_sec": sec, "tv_nsec": nsec})
    ffi.errno = 0
    return lib.green_nanosleep(ts, ffi.NULL), ffi.errno


def green_clock_nanosleep(clock: int, flags: int, sec: int, nsec: int):
    ts = ffi.new("struct timespec *", {"tv_sec": sec, "tv_nsec": nsec})
    ffi.errno = 0
    return lib.green_clock_nanosleep(clock, flags, ts, ffi.NULL), ffi.errno


SLEEPS = {
    "usleep": lambda: lib.green_usleep(200000),
    "nanosleep": lambda: lib.green_nanosleep(timespec(0.2), ffi.NULL),
    "clock_nanosleep-relative": lambda: lib.green_clock_nanosleep(CLOCK_MONOTONIC, 0, timespec(0.2), ffi.NULL),
    "clock_nanosleep-abs-monotonic": lambda: lib.green_clock_nanosleep(
        CLOCK_MONOTONIC, TIMER_ABSTIME, timespec(clock_now(CLOCK_MONOTONIC) + 0.2), ffi.NULL),
    "clock_nanosleep-abs-realtime": lambda: lib.green_clock_nanosleep(
        CLOCK_REALTIME, TIMER_ABSTIME, timespec(clock_now(CLOCK_REALTIME) + 0.2), ffi.NULL),
}


@pytest.mark.parametrize("name", sorted(SLEEPS))
def test_twenty_sleeps_of_200ms_run_concurrently(name):
    values, took = run_concurrently(20, lambda i: SLEEPS[name]())
    assert values == [0] * 20
    assert 0.19 <= took < 1.0  # in a row: 4 s


def test_sleep_takes_whole_seconds_and_returns_zero():
    values, took = run_concurrently(5, lambda i: lib.green_sleep(1))
    assert values == [0] * 5
    assert 0.99 <= took < 2.5  # in a row: 5 s


def test_other_greenlets_run_while_a_sleep_waits():
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
    assert lib.green_usleep(300000) == 0
    ticker.join()
    assert len(ticks) == 10


@pytest.mark.parametrize("sec,nsec", [(0, -1), (0, 1000000000), (-1, 0), (0, 2 ** 40)])
def test_invalid_nanosleep_gives_libcs_einval(sec, nsec):
    assert green_nanosleep(sec, nsec) == libc_nanosleep(sec, nsec) == (-1, errno.EINVAL)


@pytest.mark.parametrize("clock,flags,sec,nsec", [
    (CLOCK_MONOTONIC, 0, 0, -1),
    (CLOCK_REALTIME, TIMER_ABSTIME, 0, 1000000000),
    (CLOCK_MONOTONIC, 0, -1, 0),
    (12345, 0, 0, 1000),                      # no such clock
    (CLOCK_THREAD_CPUTIME_ID, 0, 0, 1000),    # Linux refuses to sleep on it
])
def test_invalid_clock_nanosleep_returns_libcs_error_number_and_leaves_errno(clock, flags, sec, nsec):
    green = green_clock_nanosleep(clock, flags, sec, nsec)
    assert green == libc_clock_nanosleep(clock, flags, sec, nsec)
    assert green[0] == errno.EINVAL and green[1] == 0


def test_success_leaves_errno_and_rem_untouched():
    rem = ffi.new("struct timespec *", {"tv_sec": 7, "tv_nsec": 7})
    ffi.errno = errno.EBADF
    assert lib.green_nanosleep(timespec(0.02), rem) == 0
    assert ffi.errno == errno.EBADF
    assert (rem.tv_sec, rem.tv_nsec) == (7, 7)
    ffi.errno = errno.EBADF
    assert lib.green_clock_nanosleep(CLOCK_MONOTONIC, 0, timespec(0.02), rem) == 0
    assert lib.green_usleep(20000) == 0 and lib.green_sleep(0) == 0
    assert ffi.errno == errno.EBADF
    assert (rem.tv_sec, rem.tv_nsec) == (7, 7)


def test_zero_and_past_sleeps_return_at_once():
    start = time.monotonic()
    assert green_nanosleep(0, 0) == (0, 0)
    assert lib.green_usleep(0) == 0
    assert lib.green_clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, timespec(1.0), ffi.NULL) == 0
    assert lib.green_clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME,
                                     timespec(clock_now(CLOCK_REALTIME) - 5), ffi.NULL) == 0
    assert time.monotonic() - start < 1.0


def test_a_sleep_survives_spurious_wakeups():
    hub = gevent.get_hub()
    done = []
    spawned = time.monotonic()
    g = gevent.spawn(lambda: done.append(lib.green_nanosleep(timespec(1.0), ffi.NULL)))
    gevent.sleep(0.05)
    for _ in range(3):
        hub.loop.run_callback(g.switch, "spurious")
        gevent.sleep(0.02)
    assert not done
    g.join()
    assert done == [0]
    assert 1.0 <= time.monotonic() - spawned < 2.5


def test_absolute_sleep_ends_at_its_time():
    target = clock_now(CLOCK_MONOTONIC) + 0.15
    assert lib.green_clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, timespec(target), ffi.NULL) == 0
    assert 0 <= clock_now(CLOCK_MONOTONIC) - target < 1.0


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending(), "an interruption was never delivered"


@pytest.mark.parametrize("name", ["sleep", "nanosleep", "clock_nanosleep"])
def test_a_timeout_ends_a_sleep_at_once_and_raises_itself(name):
    call = {
        "sleep": lambda: lib.green_sleep(5),
        "nanosleep": lambda: lib.green_nanosleep(timespec(5), ffi.NULL),
        "clock_nanosleep": lambda: lib.green_clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME,
                                                             timespec(clock_now(CLOCK_REALTIME) + 5), ffi.NULL),
    }[name]
    start = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.1) as timeout:
            call()
            pytest.fail("the line after the sleep ran")
    assert caught.value is timeout
    assert time.monotonic() - start < 1.5  # not the 5 s sleep


def test_kill_ends_a_sleeping_greenlet():
    g = gevent.spawn(lambda: lib.green_usleep(5000000))  # a Python frame to raise in
    gevent.sleep(0.05)
    start = time.monotonic()
    g.kill()
    assert time.monotonic() - start < 1.5  # not the 5 s sleep
    assert isinstance(g.value, gevent.GreenletExit)


EINTR_LOOP_C = r"""
#include <errno.h>
#include <time.h>
typedef int (*nanosleep_fn)(const struct timespec *, struct timespec *);
int last_result = -2, retries = 0;
/* What careful C code does: sleep through signals, resuming with the time left. */
int sleep_through_signals(nanosleep_fn fn, long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    int result;
    retries = 0;
    while ((result = fn(&t, &t)) == -1 && errno == EINTR)
        retries++;
    last_result = result;
    return result;
}
"""


@pytest.fixture(scope="module")
def eintr_loop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eintr")
    (folder / "loop.c").write_text(EINTR_LOOP_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", str(folder / "loop.c"), "-o", str(folder / "loop.so")],
                   check=True)
    return ctypes.CDLL(str(folder / "loop.so"))


def test_an_interrupted_sleep_looks_finished_so_an_eintr_loop_stops(eintr_loop):
    address = int(ffi.cast("uintptr_t", ffi.addressof(lib, "green_nanosleep")))
    start = time.monotonic()
    with gevent.Timeout(0.1, False):
        eintr_loop.sleep_through_signals(ctypes.c_void_p(address), ctypes.c_long(5000))
    assert time.monotonic() - start < 1.5  # not the 5 s sleep
    assert ctypes.c_int.in_dll(eintr_loop, "last_result").value == 0
    assert ctypes.c_int.in_dll(eintr_loop, "retries").value == 0


def test_in_a_plain_thread_sleeps_block_natively_and_create_no_hub():
    seen = {}

    def worker():
        start = time.monotonic()
        seen["results"] = (lib.green_usleep(100000), lib.green_nanosleep(timespec(0.05), ffi.NULL),
                           lib.green_clock_nanosleep(CLOCK_MONOTONIC, 0, timespec(0.05), ffi.NULL))
        seen["took"] = time.monotonic() - start
        seen["hub"] = get_hub_if_exists()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["results"] == (0, 0, 0)
    assert seen["took"] >= 0.2
    assert seen["hub"] is None


def test_inside_the_hub_a_sleep_blocks_natively():
    results = []
    gevent.get_hub().loop.run_callback(lambda: results.append(lib.green_usleep(50000)))
    gevent.sleep(0.1)
    assert results == [0]


def test_before_activation_a_sleep_is_libcs():
    lib.green_set_active(0)
    try:
        ticks = []
        ticker = gevent.spawn(lambda: ticks.append(1))
        assert lib.green_usleep(50000) == 0
        assert ticks == []  # blocked the hub: the ticker never ran
        ticker.join()
    finally:
        lib.green_set_active(1)
