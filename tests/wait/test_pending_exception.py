"""Entering Python from a green function never changes the caller's error state.

A driver may call a blocking function while a Python exception is pending
(psycopg2 sets one, releases the GIL and drains the connection): the green
twin enters Python to wait, and the exception must be pending, the same type,
value and traceback objects, when the call returns; the exception being
handled and the recursion depth stay as they were.  With the GIL held or
released, in a greenlet with a hub or in a thread without one, whether the
call waited, was interrupted or blocked natively.  fixtures/pyext_pending.c
is the driver."""
from __future__ import annotations

import errno
import io
import socket
import threading

import gevent
import pytest

import greenify
from tests.support.fixturelib import build_library, build_python_extension
from tests.support.green_support import buffer, no_interruption_pending, socketpair, twin_address
from greenify._green import ffi, lib

# The state the fixture reports after its calls: type, value, traceback,
# handled exception, recursion depth, each the same as before.
UNCHANGED = (True, True, True, True, True)


class PendingError(Exception):
    """The exception the driver sets before calling."""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_python_extension("pyext_pending", tmp_path_factory.mktemp("pyext-pending"))


@pytest.fixture(autouse=True)
def active():
    greenify.greenify()
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending()


def raised() -> PendingError:
    try:
        raise PendingError("set by the driver before the call")
    except PendingError as exc:
        return exc


def call_pending(driver, kind: str, fd: int = -1, *, release_gil: bool, timeout_ms: int = -1,
                 host: str = None, calls: int = 1, address: int = None):
    """Call green <kind> through the driver with an exception pending, inside
    an except block: returns (the exception that came out, observations)."""
    exc = raised()
    observations = []
    try:
        raise KeyError("being handled")
    except KeyError:
        with pytest.raises(BaseException) as came_out:
            driver.call_pending(kind, address or twin_address(kind), fd, timeout_ms, host, release_gil, calls, exc,
                                observations)
    assert came_out.value is exc or came_out.value.__context__ is exc, came_out.value
    return came_out.value, exc, observations


def in_thread_without_hub(func):
    """Run func() in a plain OS thread (no hub there) and return its result."""
    result = {}

    def run():
        result["value"] = func()

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():  # the main thread's hub keeps running meanwhile
        gevent.sleep(0.01)
    return result["value"]


GIL = pytest.mark.parametrize("release_gil", [True, False], ids=["gil-released", "gil-held"])


def asked(slow_server: int) -> socket.socket:
    """A connection to the slow server with a request sent: the answer,
    b"pong:x", comes from another process 0.2 s later."""
    connection = socket.create_connection(("127.0.0.1", slow_server))
    connection.sendall(b"x")
    return connection


@GIL
def test_recv_that_waits_on_the_hub_keeps_the_pending_exception(driver, slow_server, release_gil):
    connection = asked(slow_server)
    waits_before = greenify.stats().get("recv")
    came_out, exc, observations = gevent.spawn(call_pending, driver, "recv", connection.fileno(),
                                               release_gil=release_gil).get()
    assert came_out is exc
    assert observations == [(len(b"pong:x"), 0), UNCHANGED]
    assert greenify.stats().get("recv") != waits_before, "the recv did not wait on the hub"
    connection.close()


@GIL
def test_recv_in_a_thread_without_hub_blocks_natively_and_keeps_the_pending_exception(driver, slow_server,
                                                                                      release_gil):
    connection = asked(slow_server)
    came_out, exc, observations = in_thread_without_hub(
        lambda: call_pending(driver, "recv", connection.fileno(), release_gil=release_gil))
    assert came_out is exc
    assert observations == [(len(b"pong:x"), 0), UNCHANGED]
    connection.close()


@GIL
def test_an_interrupted_recv_keeps_the_pending_exception_until_the_timeout_replaces_it(driver, release_gil):
    # The second call fails fast (the interruption check enters Python too);
    # back in Python the timeout is raised with the pending exception as its context.
    a, b = socketpair()

    def interrupted():
        with gevent.Timeout(0.05) as timeout:
            return call_pending(driver, "recv", a.fileno(), release_gil=release_gil, calls=2), timeout

    (came_out, exc, observations), timeout = gevent.spawn(interrupted).get()
    assert came_out is timeout
    assert came_out.__context__ is exc
    interrupted_call = (-1, errno.ETIMEDOUT)  # GREEN_INTERRUPTED_ERRNO
    assert observations == [interrupted_call, interrupted_call, UNCHANGED]
    a.close(), b.close()


@GIL
@pytest.mark.parametrize("where", ["hub", "thread"])
def test_poll_that_times_out_keeps_the_pending_exception(driver, release_gil, where):
    a, b = socketpair()

    def run():
        return call_pending(driver, "poll", a.fileno(), release_gil=release_gil, timeout_ms=50)

    came_out, exc, observations = gevent.spawn(run).get() if where == "hub" else in_thread_without_hub(run)
    assert came_out is exc
    assert observations == [(0, 0), UNCHANGED]
    a.close(), b.close()


@GIL
@pytest.mark.parametrize("where", ["hub", "thread"])
def test_close_that_wakes_waiters_keeps_the_pending_exception(driver, release_gil, where):
    # Another greenlet waits (in green recv) so that close enters Python to wake waiters.
    waited_on, _peer = socketpair()
    closed, _closed_peer = socketpair()
    into = buffer(1)
    waiter = gevent.spawn(lib.green_recv, waited_on.fileno(), into, 1, 0)
    gevent.sleep(0.02)
    assert waiter.dead is False

    def run():
        return call_pending(driver, "close", closed.detach(), release_gil=release_gil)

    came_out, exc, observations = gevent.spawn(run).get() if where == "hub" else in_thread_without_hub(run)
    assert came_out is exc
    assert observations == [(0, 0), UNCHANGED]
    waiter.kill()
    waited_on.close(), _peer.close(), _closed_peer.close()


@GIL
@pytest.mark.parametrize("where", ["hub", "thread"])
def test_getaddrinfo_handed_to_a_worker_keeps_the_pending_exception(driver, release_gil, where):
    def run():
        return call_pending(driver, "getaddrinfo", release_gil=release_gil, host="localhost")

    came_out, exc, observations = gevent.spawn(run).get() if where == "hub" else in_thread_without_hub(run)
    assert came_out is exc
    assert observations == [(0, 0), UNCHANGED]


@GIL
def test_a_load_that_patches_on_load_keeps_the_pending_exception(driver, release_gil, tmp_path):
    # The dlopen hook enters Python to patch the new library.
    name = f"libfx_pending_{'released' if release_gil else 'held'}"
    path = build_library("fx_client", "default", tmp_path, name=name + ".so")
    hook = int(ffi.cast("uintptr_t", ffi.addressof(lib, "greenify_dlopen_hook")))
    with greenify.patch_on_load(name) as registration:
        came_out, exc, observations = call_pending(driver, "dlopen", release_gil=release_gil, host=str(path),
                                                   address=hook)
    assert came_out is exc
    assert observations == [(1, 0), UNCHANGED]
    assert [report.target for report in registration.reports if report], "the load was not patched"
    greenify.unpatch_library(str(path))


@pytest.mark.parametrize("where", ["hub", "thread"])
def test_a_failed_copy_raises_the_same_error_stock_and_greenified(psycopg2, postgres, where):
    """psycopg2 sets the error, releases the GIL and drains the connection
    through libpq's poll: greenified, the error must still come out."""
    def failed_copy() -> BaseException:
        connection = psycopg2.connect(postgres.dsn)
        try:
            cursor = connection.cursor()
            cursor.execute("CREATE TEMPORARY TABLE tcopy (id integer, name text)")
            with pytest.raises(psycopg2.Error) as failure:
                cursor.copy_from(io.StringIO("aaa\tx\n"), "tcopy")
            connection.rollback()
            cursor.execute("SELECT 1")  # the connection is usable afterwards
            assert cursor.fetchone() == (1,)
            return failure.value
        finally:
            connection.close()

    def run():
        return failed_copy() if where == "thread" else gevent.spawn(failed_copy).get()

    stock = in_thread_without_hub(run) if where == "thread" else run()
    report = greenify.patch_library("libpq")
    try:
        assert report, "libpq was not patched"
        greenified = in_thread_without_hub(run) if where == "thread" else run()
    finally:
        greenify.unpatch_library("libpq")
    assert type(stock).__name__ == "InvalidTextRepresentation"
    assert type(greenified) is type(stock)
    assert greenified.pgcode == stock.pgcode
