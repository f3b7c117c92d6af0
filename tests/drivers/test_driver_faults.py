"""Timeouts, kills and server faults under psycopg2, pylibmc and pycurl,
patched, against real servers that each test starts for itself (it may kill
them; tests/support/servers.py).

For each driver: a `gevent.Timeout` and a `kill()` end a greenlet waiting in
the driver's C library at once, with the timeout itself raised; the
connection can be closed and a new one works.  A
server-side end (`pg_terminate_backend`) or the server killed gives every
waiter the driver's own error promptly, while the hub keeps running.
"""
from __future__ import annotations

import io
import os
import signal
import time

import gevent
import pytest

import greenify
from tests.support import servers
from tests.support.fault_support import FAULT_BOUND_S, INTERRUPT_BOUND_S, LONG_WAIT_S, Ticker

WAITERS = 20
# A blocked hub would stand still for the whole LONG_WAIT_S.
TICKER_GAP_BOUND_S = 1.0


@pytest.fixture(scope="module", autouse=True)
def active():
    greenify.greenify()


def interrupted_by_timeout(call) -> tuple:
    """Run call() under gevent.Timeout(0.2); returns (the exception raised,
    the Timeout, seconds taken)."""
    started = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.2) as timeout:
            call()
            pytest.fail("the call returned although its timeout fired")
    return caught.value, timeout, time.monotonic() - started


def killed_while_waiting(call) -> float:
    """Start call() in a greenlet, kill it once it waits; returns the seconds
    the kill took.  The greenlet ends with GreenletExit."""
    waiting = gevent.spawn(call)
    gevent.sleep(0.3)
    assert not waiting.ready(), f"the call ended before it was killed: {waiting.value!r} {waiting.exception!r}"
    started = time.monotonic()
    waiting.kill(block=True, timeout=LONG_WAIT_S)
    took = time.monotonic() - started
    assert isinstance(waiting.value, gevent.GreenletExit), (waiting.value, waiting.exception)
    return took


def faulted_waiters(start_waiter, fault) -> list:
    """WAITERS greenlets run start_waiter(index); once `fault()` has run (it
    returns when the fault happened), returns [(seconds from the fault to
    the waiter's end, what it returned)].  Checks the hub kept running."""
    ticker = Ticker()
    since = time.monotonic()
    try:
        greenlets = [gevent.spawn(start_waiter, index) for index in range(WAITERS)]
        fault_at = fault()
        outcomes = servers.join_all(greenlets)
        ended = [glet_end for glet_end, _ in outcomes]
        until = time.monotonic()
    finally:
        ticker.stop()
    gap = ticker.longest_gap(since, until)
    assert gap < TICKER_GAP_BOUND_S, f"the hub stood still for {gap:.2f} s while {WAITERS} waiters waited or failed"
    assert max(ended) - fault_at < FAULT_BOUND_S, f"the last waiter ended {max(ended) - fault_at:.2f} s after the fault"
    return [(end - fault_at, value) for end, value in outcomes]


# --- psycopg2 over libpq -----------------------------------------------------------

@pytest.fixture
def own_postgres():
    """A PostgreSQL for this test alone, so that it may be killed."""
    yield from servers.serve(servers.start_postgres)


@pytest.fixture
def libpq_patched(psycopg2):
    with greenify.patched("libpq") as report:
        assert report, repr(report)
        yield


def wait_until_sleeping(psycopg2, postgres, count: int) -> None:
    admin = psycopg2.connect(postgres.dsn)
    admin.autocommit = True
    try:
        deadline = time.monotonic() + 10
        with admin.cursor() as cursor:
            while True:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%'")
                if cursor.fetchone()[0] >= count:
                    return
                assert time.monotonic() < deadline, f"fewer than {count} pg_sleep running after 10 s"
                gevent.sleep(0.05)
    finally:
        admin.close()


def pg_sleep_on(psycopg2, connection):
    """A waiter: pg_sleep(LONG_WAIT_S); returns (when it ended, its error)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT pg_sleep({LONG_WAIT_S})")
        return time.monotonic(), None
    except psycopg2.Error as exc:
        return time.monotonic(), exc


def fresh_query_works(psycopg2, postgres) -> None:
    connection = psycopg2.connect(postgres.dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 42")
            assert cursor.fetchone() == (42,)
    finally:
        connection.close()


@pytest.mark.compat("psycopg2")
def test_a_timeout_in_pg_sleep_raises_itself_at_once(psycopg2, own_postgres, libpq_patched):
    connection = psycopg2.connect(own_postgres.dsn)
    with connection.cursor() as cursor:
        raised, timeout, took = interrupted_by_timeout(lambda: cursor.execute(f"SELECT pg_sleep({LONG_WAIT_S})"))
    assert raised is timeout
    assert took < INTERRUPT_BOUND_S
    connection.close()
    fresh_query_works(psycopg2, own_postgres)


@pytest.mark.compat("psycopg2")
def test_a_greenlet_killed_in_pg_sleep_ends_at_once(psycopg2, own_postgres, libpq_patched):
    connection = psycopg2.connect(own_postgres.dsn)
    assert killed_while_waiting(lambda: pg_sleep_on(psycopg2, connection)) < INTERRUPT_BOUND_S
    connection.close()
    fresh_query_works(psycopg2, own_postgres)


@pytest.mark.compat("psycopg2")
def test_pg_terminate_backend_fails_each_waiter_promptly(psycopg2, own_postgres, libpq_patched):
    connections = [psycopg2.connect(own_postgres.dsn) for _ in range(WAITERS)]
    pids = [connection.get_backend_pid() for connection in connections]

    def terminate():
        wait_until_sleeping(psycopg2, own_postgres, WAITERS)
        admin = psycopg2.connect(own_postgres.dsn)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("SELECT bool_and(pg_terminate_backend(pid)) FROM unnest(%s) AS pid", (pids,))
            assert cursor.fetchone() == (True,)
        admin.close()
        return time.monotonic()

    outcomes = faulted_waiters(lambda index: pg_sleep_on(psycopg2, connections[index]), terminate)
    assert all(isinstance(error, psycopg2.OperationalError) for _, error in outcomes), outcomes
    fresh_query_works(psycopg2, own_postgres)


@pytest.mark.compat("psycopg2")
def test_a_killed_postgres_fails_each_waiter_promptly(psycopg2, own_postgres, libpq_patched):
    connections = [psycopg2.connect(own_postgres.dsn) for _ in range(WAITERS)]

    def kill_server():
        wait_until_sleeping(psycopg2, own_postgres, WAITERS)
        # the postmaster: its backends end as soon as they see it gone
        os.kill(own_postgres.process.pid, signal.SIGKILL)
        return time.monotonic()

    outcomes = faulted_waiters(lambda index: pg_sleep_on(psycopg2, connections[index]), kill_server)
    assert all(isinstance(error, psycopg2.OperationalError) for _, error in outcomes), outcomes


# --- pylibmc over libmemcached -------------------------------------------------------

@pytest.fixture
def own_memcached():
    """A memcached for this test alone, so that it may be paused and killed."""
    yield from servers.serve(servers.start_memcached)


def memcached_client(pylibmc, memcached):
    client = pylibmc.Client([memcached.address], binary=True)
    client.set("key", "value")  # connected, before any pause
    return client


@pytest.mark.compat("pylibmc")
def test_a_timeout_in_a_get_from_a_paused_memcached_raises_itself_at_once(pylibmc, own_memcached):
    client = memcached_client(pylibmc, own_memcached)
    with greenify.patched("libmemcached"):
        with own_memcached.process.paused_for(LONG_WAIT_S):
            raised, timeout, took = interrupted_by_timeout(lambda: client.get("key"))
    assert raised is timeout
    assert took < INTERRUPT_BOUND_S
    client.disconnect_all()
    assert memcached_client(pylibmc, own_memcached).get("key") == "value"


@pytest.mark.compat("pylibmc")
def test_a_greenlet_killed_in_a_get_from_a_paused_memcached_ends_at_once(pylibmc, own_memcached):
    client = memcached_client(pylibmc, own_memcached)
    with greenify.patched("libmemcached"):
        with own_memcached.process.paused_for(LONG_WAIT_S):
            assert killed_while_waiting(lambda: client.get("key")) < INTERRUPT_BOUND_S
    client.disconnect_all()
    assert memcached_client(pylibmc, own_memcached).get("key") == "value"


@pytest.mark.compat("pylibmc")
def test_a_killed_memcached_fails_each_waiter_promptly(pylibmc, own_memcached):
    clients = [memcached_client(pylibmc, own_memcached) for _ in range(WAITERS)]

    def get(index: int):
        try:
            value = clients[index].get("key")
        except pylibmc.Error as exc:
            value = exc
        return time.monotonic(), value

    def kill_server():
        gevent.sleep(0.3)  # every get is waiting on the stopped server
        os.kill(own_memcached.process.pid, signal.SIGKILL)
        return time.monotonic()

    with greenify.patched("libmemcached"):
        servers.stop_process(own_memcached.process.pid)
        outcomes = faulted_waiters(get, kill_server)
    # pylibmc's get gives None for a server that went away mid-read, as unpatched
    assert all(value is None or isinstance(value, pylibmc.Error) for _, value in outcomes), outcomes


# --- pycurl over libcurl ---------------------------------------------------------------

@pytest.fixture
def own_slow_http():
    """A slow HTTP server for this test alone, so that it may be killed."""
    yield from servers.serve(servers.start_slow_http)


def transfer(pycurl, url: str):
    """A waiter: fetch `url`; returns (when it ended, the body or the error)."""
    body = io.BytesIO()
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.WRITEDATA, body)
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.TIMEOUT, 60)
        curl.perform()
        return time.monotonic(), body.getvalue().decode()
    except pycurl.error as exc:
        return time.monotonic(), exc
    finally:
        curl.close()


@pytest.mark.compat("pycurl")
def test_a_timeout_mid_transfer_raises_itself_at_once(pycurl, own_slow_http):
    with greenify.patched("libcurl"):
        started = time.monotonic()
        with pytest.raises(gevent.Timeout) as caught:
            with gevent.Timeout(0.2) as timeout:
                transfer(pycurl, own_slow_http.url(LONG_WAIT_S, "late"))
                pytest.fail("the transfer returned although its timeout fired")
        took = time.monotonic() - started
        assert caught.value is timeout and took < INTERRUPT_BOUND_S
        assert transfer(pycurl, own_slow_http.url(0, "after"))[1] == "slept 0.0 for after"


@pytest.mark.compat("pycurl")
def test_a_greenlet_killed_mid_transfer_ends_at_once(pycurl, own_slow_http):
    with greenify.patched("libcurl"):
        assert killed_while_waiting(lambda: transfer(pycurl, own_slow_http.url(LONG_WAIT_S, "late"))) \
            < INTERRUPT_BOUND_S
        assert transfer(pycurl, own_slow_http.url(0, "after"))[1] == "slept 0.0 for after"


@pytest.mark.compat("pycurl")
def test_a_killed_http_server_fails_each_transfer_promptly(pycurl, own_slow_http):
    def kill_server():
        gevent.sleep(0.5)  # every request has reached the server, which sleeps on it
        os.kill(own_slow_http.process.pid, signal.SIGKILL)
        return time.monotonic()

    with greenify.patched("libcurl"):
        outcomes = faulted_waiters(lambda index: transfer(pycurl, own_slow_http.url(LONG_WAIT_S, str(index))),
                                   kill_server)
    assert all(isinstance(error, pycurl.error) for _, error in outcomes), outcomes
