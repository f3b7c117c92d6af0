"""gevent.Timeout and Greenlet.kill reach a greenlet waiting inside C.

The exception cannot travel through C frames: the wait ends at once, the
green call fails in a way libraries do not retry, and the very exception is
raised in the greenlet when the call is back in Python, with the library's
own error as its __context__."""
from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import gevent
import pytest

import greenify
from tests.support.fault_support import INTERRUPT_BOUND_S
from tests.support.green_support import buffer, memory_growth_unmeasurable_under_asan, no_interruption_pending, open_fds, rss_kb, socketpair
from greenify._green import ffi, lib

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """fixtures/pyext_driver.c built as a real extension module."""
    out = tmp_path_factory.mktemp("pyext") / ("pyext_driver" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-I", sysconfig.get_paths()["include"],
                    str(FIXTURES / "pyext_driver.c"), "-o", str(out)], check=True)
    spec = importlib.util.spec_from_file_location("pyext_driver", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def address_of(name: str) -> int:
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    trace_before = sys.gettrace()
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending(), "an interruption was never delivered"
    assert sys.gettrace() is trace_before


@pytest.mark.parametrize("release_gil", [True, False], ids=["gil-released", "gil-held"])
def test_timeout_raises_itself_with_the_drivers_error_as_context(driver, release_gil):
    a, b = socketpair()
    start = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.3) as timeout:
            driver.recv_via(address_of("green_recv"), a.fileno(), 16, release_gil)
    took = time.monotonic() - start
    assert caught.value is timeout
    assert isinstance(caught.value.__context__, driver.DriverError)
    assert "timed out" in str(caught.value.__context__)
    assert 0.29 <= took < 0.3 + INTERRUPT_BOUND_S


def test_a_silent_timeout_stays_silent(driver):
    a, b = socketpair()
    start = time.monotonic()
    with gevent.Timeout(0.2, False):
        driver.recv_via(address_of("green_recv"), a.fileno(), 16, True)
        pytest.fail("the call went on after the timeout")
    assert time.monotonic() - start < 0.2 + INTERRUPT_BOUND_S


def test_a_timeout_around_a_cffi_call_raises_at_the_next_line():
    a, b = socketpair()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.2) as timeout:
            result = lib.green_recv(a.fileno(), buffer(8), 8, 0)
            pytest.fail(f"the line after the call ran (result {result})")
    assert caught.value is timeout


def test_kill_ends_the_greenlet_at_once(driver):
    a, b = socketpair()
    g = gevent.spawn(lambda: driver.recv_via(address_of("green_recv"), a.fileno(), 16, True))
    gevent.sleep(0.05)
    start = time.monotonic()
    g.kill()
    assert time.monotonic() - start < INTERRUPT_BOUND_S
    assert g.dead and g.successful()
    assert isinstance(g.value, gevent.GreenletExit)


def test_kill_with_an_exception_of_choice_raises_it(driver):
    a, b = socketpair()

    class Cancelled(Exception):
        pass

    g = gevent.spawn(lambda: driver.recv_via(address_of("green_recv"), a.fileno(), 16, True))
    gevent.sleep(0.05)
    g.kill(Cancelled, block=True, timeout=1)
    assert g.dead and isinstance(g.exception, Cancelled)
    assert isinstance(g.exception.__context__, driver.DriverError)


def test_nested_timeouts_where_the_outer_fires(driver):
    a, b = socketpair()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.2) as outer:
            with gevent.Timeout(5) as inner:
                driver.recv_via(address_of("green_recv"), a.fileno(), 16, True)
    assert caught.value is outer and caught.value is not inner


def test_a_timeout_in_one_greenlet_leaves_another_mid_call_alone(driver):
    a1, b1 = socketpair()
    a2, b2 = socketpair()
    gevent.spawn_later(0.3, b2.sendall, b"fine")

    def bounded():
        with gevent.Timeout(0.1, False):
            driver.recv_via(address_of("green_recv"), a1.fileno(), 16, True)
        return "timed out"

    g1 = gevent.spawn(bounded)
    g2 = gevent.spawn(driver.recv_via, address_of("green_recv"), a2.fileno(), 16, True)
    gevent.joinall([g1, g2], timeout=2, raise_error=True)
    assert (g1.value, g2.value) == ("timed out", b"fine")


def test_a_further_call_before_returning_to_python_fails_without_waiting(driver):
    a, b = socketpair()
    ready, peer = socketpair()
    peer.sendall(b"ready data")
    result = []
    with gevent.Timeout(0.1, False):
        result.append(driver.two_recvs(address_of("green_recv"), a.fileno(), ready.fileno()))
    assert result == []  # the timeout was raised after two_recvs returned
    # the second recv had data, yet failed at once: the library unwinds
    assert ready.recv(64) == b"ready data"


def test_two_recvs_report_the_failures_the_library_sees(driver):
    a, b = socketpair()
    ready, peer = socketpair()
    peer.sendall(b"ready data")
    seen = {}

    def call():
        try:
            seen["value"] = driver.two_recvs(address_of("green_recv"), a.fileno(), ready.fileno())
        finally:
            seen["values_after"] = True

    g = gevent.spawn(call)
    gevent.sleep(0.05)
    g.kill()
    assert "value" not in seen and seen["values_after"]


def test_poll_interrupted_returns_a_timeout_result():
    import select
    a, b = socketpair()
    fds = ffi.new("struct pollfd[1]")
    fds[0].fd = a.fileno()
    fds[0].events = select.POLLIN
    results = []

    def call():
        results.append(lib.green_poll(fds, 1, -1))

    g = gevent.spawn(call)
    gevent.sleep(0.05)
    g.kill()
    assert results == []  # GreenletExit raised at the next line


@memory_growth_unmeasurable_under_asan
def test_a_thousand_cancellations_leave_nothing_behind(driver):
    a, b = socketpair()
    loop = gevent.get_hub().loop
    address = address_of("green_recv")

    def cancel_many(count):
        for i in range(count):
            with gevent.Timeout(0.0005, False):
                driver.recv_via(address, a.fileno(), 16, True)
            if i % 2:
                g = gevent.spawn(lambda: driver.recv_via(address, a.fileno(), 16, True))
                gevent.sleep(0)
                g.kill()

    cancel_many(200)  # warm up allocators
    gc.collect()
    fds, rss, active = open_fds(), rss_kb(), loop.activecnt
    cancel_many(1000)
    gc.collect()
    assert open_fds() == fds
    assert loop.activecnt == active
    assert rss_kb() - rss < 2048
    assert no_interruption_pending() and lib.green_is_active()


def test_no_stray_exception_surfaces_later_in_other_greenlets(driver):
    a, b = socketpair()
    hub = gevent.get_hub()
    reported = []  # every error the hub is handed: from its callbacks, watchers and dying greenlets
    hub.handle_error = lambda context, kind, value, tb: reported.append((context, kind, value))
    try:
        for _ in range(20):
            with gevent.Timeout(0.001, False):
                driver.recv_via(address_of("green_recv"), a.fileno(), 16, True)
        survivors = gevent.joinall([gevent.spawn(gevent.sleep, 0.02) for _ in range(20)], raise_error=True)
        gevent.sleep(0.05)
    finally:
        del hub.handle_error  # back to the class's
    assert len(survivors) == 20 and all(g.successful() for g in survivors)
    assert reported == []
    assert sys.exc_info() == (None, None, None)


def test_an_existing_trace_function_keeps_working_through_a_delivery(driver):
    a, b = socketpair()
    calls = []

    def tracer(frame, event, arg):
        calls.append(event)
        return None

    sys.settrace(tracer)
    try:
        with gevent.Timeout(0.1, False):
            driver.recv_via(address_of("green_recv"), a.fileno(), 16, True)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert "call" in calls
