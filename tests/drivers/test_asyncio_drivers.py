"""The compatibility drivers under greenify.asyncio, against the real servers
that the session starts (tests/support/servers.py): MySQLdb, psycopg2, pylibmc and
pycurl, each awaited through ``greenify.asyncio.run`` on the default event
loop and on uvloop.

For each driver: concurrent slow operations finish together, with the same
results as stock; a timeout or a cancellation mid-operation ends it at once
and leaves nothing registered on the loop; for MySQLdb, a MariaDB killed
under waiting queries fails each of them promptly.  And a Starlette app
served by uvicorn answers 50 concurrent requests, each a 0.5 s MySQLdb
query, together, from one worker.

Each test counts for its driver's row of the compatibility table, in its
asyncio column (``@pytest.mark.compat(driver, "asyncio")``, tests/support/compat.py).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

import greenify
import greenify.asyncio as gasyncio
from greenify.waiting import asyncio_side
from tests.support import servers
from tests.support.green_support import pending_interruptions
from tests.wait.test_asyncio import Ticker, new_loop, run_on  # noqa: F401 - new_loop is a fixture
from tests.drivers.test_drivers import (expected_bodies, expected_round_trips, fetcher, late_memcached,  # noqa: F401 - fixture
                          memcached_round_trip, pg_sleeper)

CONCURRENT = 50
SLEEP_S = 0.5
# Serial, 50 x 0.5 s would take 25 s; together about one sleep plus
# connection set-up.  The bound leaves room for a loaded 2-core machine.
TOGETHER_BOUND_S = 5.0
LONG_S = 5  # operations that get interrupted: far longer than any timeout here
TIMEOUT_S = 0.3
INTERRUPT_BOUND_S = 1.5  # from the timeout until the coroutine has its TimeoutError
CONNECTION_LOST = {2013, 2006}  # CR_SERVER_LOST, CR_SERVER_GONE_ERROR


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert not pending_interruptions(), f"interruptions never delivered: {pending_interruptions()!r}"
    waiter = getattr(asyncio_side._local, "waiter", None)
    if waiter is not None:
        assert not waiter.readers and not waiter.writers, "descriptors left registered on the loop"


async def together(function, count: int):
    """Await function(index) through greenify.asyncio.run for each index at
    once; (seconds, results in index order)."""
    started = time.monotonic()
    results = await asyncio.gather(*(gasyncio.run(function, index) for index in range(count)))
    return time.monotonic() - started, results


def chain(exc: BaseException) -> list:
    """exc and the exceptions it was raised from or during, outermost first."""
    found = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


async def times_out(call, timeout_s: float = TIMEOUT_S) -> tuple:
    """Await gasyncio.run(call) under asyncio.wait_for: (the TimeoutError, seconds after the timeout)."""
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError) as caught:
        await asyncio.wait_for(gasyncio.run(call), timeout_s)
    return caught.value, time.monotonic() - started - timeout_s


# --- MySQLdb ------------------------------------------------------------------------

def mysql_query(MySQLdb, server, sql: str = "SELECT SLEEP(%s), %s, REPEAT('x', 2000 + %s)"):
    def query(index: int):
        connection = MySQLdb.connect(**server.connect_kwargs())
        try:
            cursor = connection.cursor()
            cursor.execute(sql, (SLEEP_S, index, index))
            return cursor.fetchall()
        finally:
            connection.close()
    return query


@pytest.mark.compat("MySQLdb", "asyncio")
def test_mysqldb_50_sleeps_finish_together_with_the_results_of_stock(MySQLdb, mariadb, patched_libmariadb, new_loop):
    query = mysql_query(MySQLdb, mariadb)

    async def main():
        with Ticker() as ticker:
            elapsed, results = await together(query, CONCURRENT)
        return elapsed, results, ticker.ticks

    elapsed, results, ticks = run_on(new_loop, main)
    stock = [query(index) for index in (0, 1, CONCURRENT - 1)]  # outside run: libmariadb blocks, as stock
    assert [results[0], results[1], results[-1]] == stock
    assert results == [((0, index, "x" * (2000 + index)),) for index in range(CONCURRENT)]
    assert elapsed < TOGETHER_BOUND_S, f"{CONCURRENT} SLEEP({SLEEP_S}) took {elapsed:.2f} s (serial: 25 s)"
    assert ticks >= 10


@pytest.mark.compat("MySQLdb", "asyncio")
def test_mysqldb_timeout_mid_query_fails_the_connection_and_others_go_on(MySQLdb, mariadb, patched_libmariadb,
                                                                         new_loop):
    connection = MySQLdb.connect(**mariadb.connect_kwargs())
    proxy = gasyncio.AsyncProxy(connection)

    async def main():
        other = asyncio.ensure_future(gasyncio.run(mysql_query(MySQLdb, mariadb), 7))
        timeout, late = await times_out(lambda: connection.query(f"SELECT SLEEP({LONG_S})"))
        with pytest.raises(MySQLdb.OperationalError) as after:
            await proxy.ping()
        return timeout, late, after.value, await other

    try:
        timeout, late, after, other = run_on(new_loop, main)
    finally:
        connection.close()
    assert late < INTERRUPT_BOUND_S, f"the TimeoutError came {late:.2f} s after the timeout"
    assert any(isinstance(exc, asyncio.CancelledError) for exc in chain(timeout))
    assert any(isinstance(exc, MySQLdb.OperationalError) for exc in chain(timeout)), (
        f"libmariadb did not see the call fail: {chain(timeout)!r}")
    assert after.args[0] in CONNECTION_LOST, f"the interrupted connection still answers: {after!r}"
    assert other == ((0, 7, "x" * 2007),)


@pytest.mark.compat("MySQLdb", "asyncio")
def test_mysqldb_task_cancel_mid_query_raises_cancelled_error_at_once(MySQLdb, mariadb, patched_libmariadb, new_loop):
    def long_query():
        connection = MySQLdb.connect(**mariadb.connect_kwargs())
        try:
            connection.query(f"SELECT SLEEP({LONG_S})")
        finally:
            connection.close()

    async def main():
        tasks = [asyncio.ensure_future(gasyncio.run(long_query)) for _ in range(10)]
        await asyncio.sleep(1.0)  # connected, each in its query
        cancelled_at = time.monotonic()
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes, time.monotonic() - cancelled_at

    outcomes, took = run_on(new_loop, main)
    assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes), outcomes
    assert took < INTERRUPT_BOUND_S, f"10 cancellations took {took:.2f} s"


@pytest.fixture(scope="module")
def own_mariadb():
    """A MariaDB for this module alone, so that it may be killed."""
    yield from servers.serve(servers.start_mariadb)


@pytest.mark.compat("MySQLdb", "asyncio")
def test_mariadb_killed_under_20_waiting_queries_fails_each_promptly_then_works_again(
        MySQLdb, own_mariadb, patched_libmariadb, new_loop):
    if own_mariadb.process.popen.poll() is not None:
        own_mariadb.restart()
    waiters = 20

    def waiting_query(connection):
        try:
            connection.query(f"SELECT SLEEP({LONG_S * 6})")
            return "finished", None, time.monotonic()
        except MySQLdb.OperationalError as exc:
            return "failed", exc.args[0], time.monotonic()
        finally:
            connection.close()

    def running_sleeps(admin) -> int:
        admin.query("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(%'")
        return int(admin.store_result().fetch_row()[0][0])

    async def main():
        connections = await asyncio.gather(*(gasyncio.run(MySQLdb.connect, **own_mariadb.connect_kwargs())
                                             for _ in range(waiters + 1)))
        admin = connections.pop()
        tasks = [asyncio.ensure_future(gasyncio.run(waiting_query, connection)) for connection in connections]
        deadline = time.monotonic() + 15
        while await gasyncio.run(running_sleeps, admin) < waiters and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        admin.close()
        os.kill(own_mariadb.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        return await asyncio.wait_for(asyncio.gather(*tasks), 10), killed_at

    outcomes, killed_at = run_on(new_loop, main)
    own_mariadb.process.popen.wait(10)
    assert {(what, code in CONNECTION_LOST) for what, code, _ in outcomes} == {("failed", True)}, outcomes
    slowest = max(ended for _, _, ended in outcomes) - killed_at
    assert slowest < 1.0, f"the last query failed {slowest:.2f} s after SIGKILL"
    own_mariadb.restart()
    elapsed, results = run_on(new_loop, lambda: together(mysql_query(MySQLdb, own_mariadb), 10))
    assert results == [((0, index, "x" * (2000 + index)),) for index in range(10)]
    assert elapsed < TOGETHER_BOUND_S


# --- psycopg2 ----------------------------------------------------------------------

@pytest.fixture
def patched_libpq(psycopg2, postgres):
    with greenify.patched("libpq") as report:
        assert report, repr(report)
        yield report


@pytest.mark.compat("psycopg2", "asyncio")
def test_psycopg2_50_pg_sleeps_finish_together_with_the_results_of_stock(psycopg2, postgres, patched_libpq,
                                                                         new_loop):
    query = pg_sleeper(psycopg2, postgres, SLEEP_S)
    elapsed, rows = run_on(new_loop, lambda: together(query, CONCURRENT))
    assert rows == [[(index,)] for index in range(CONCURRENT)]
    assert rows[:2] == [query(0), query(1)]  # outside run: libpq blocks, as stock
    assert elapsed < TOGETHER_BOUND_S, f"{CONCURRENT} pg_sleep({SLEEP_S}) took {elapsed:.2f} s"


@pytest.mark.compat("psycopg2", "asyncio")
def test_psycopg2_timeout_mid_query_returns_at_once_and_the_connection_is_lost(psycopg2, postgres,
                                                                              patched_libpq, new_loop):
    # The interrupted wait shuts the connection's socket down: its next query
    # fails at once instead of reading the interrupted query's late answer
    # (which it did while the wait only failed).
    connection = psycopg2.connect(postgres.dsn)

    def query(sleep_s: float):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s), 42", (sleep_s,))
            return cursor.fetchall()

    async def main():
        timeout, late = await times_out(lambda: query(2.0))
        started = time.monotonic()
        try:
            after = await gasyncio.run(query, 0)
        except psycopg2.Error as exc:
            after = exc
        return timeout, late, after, time.monotonic() - started

    try:
        timeout, late, after, after_took = run_on(new_loop, main)
    finally:
        connection.close()
    assert late < INTERRUPT_BOUND_S, f"the TimeoutError came {late:.2f} s after the timeout"
    assert any(isinstance(exc, asyncio.CancelledError) for exc in chain(timeout)), chain(timeout)
    assert isinstance(after, psycopg2.Error), f"the interrupted connection answered {after!r}"
    assert after_took < INTERRUPT_BOUND_S
    fresh = psycopg2.connect(postgres.dsn)
    try:
        with fresh.cursor() as cursor:
            cursor.execute("SELECT 42")
            assert cursor.fetchall() == [(42,)]
    finally:
        fresh.close()


def test_psycopg2_interrupted_by_gevent_timeout_loses_its_connection_as_under_asyncio(psycopg2, postgres,
                                                                                     patched_libpq):
    # The comparison the README makes: the same C path under gevent.Timeout.
    import gevent
    connection = psycopg2.connect(postgres.dsn)
    try:
        with connection.cursor() as cursor:
            with pytest.raises(gevent.Timeout):
                with gevent.Timeout(TIMEOUT_S):
                    cursor.execute("SELECT pg_sleep(2), 42")
        with pytest.raises(psycopg2.Error):
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(0), 42")
                cursor.fetchall()
    finally:
        connection.close()


# --- pylibmc -------------------------------------------------------------------------

@pytest.mark.compat("pylibmc", "asyncio")
def test_pylibmc_50_clients_round_trip_the_values_of_stock(pylibmc, memcached, new_loop):
    round_trip = memcached_round_trip(pylibmc, memcached.address)
    with greenify.patched("libmemcached") as report:
        assert report, repr(report)
        _, results = run_on(new_loop, lambda: together(round_trip, CONCURRENT))
    assert results == expected_round_trips(CONCURRENT)


@pytest.mark.compat("pylibmc", "asyncio")
def test_pylibmc_paused_server_neither_blocks_the_loop_nor_outlives_a_timeout(pylibmc, memcached, late_memcached,
                                                                              new_loop):
    late_client, timeout_client = (pylibmc.Client([late_memcached.address], binary=True) for _ in range(2))
    late_client.set("late", "answer")  # both connected before the pause
    timeout_client.get("late")
    round_trip = memcached_round_trip(pylibmc, memcached.address)

    async def main():
        started = time.monotonic()
        late = asyncio.ensure_future(gasyncio.run(late_client.get, "late"))
        _, others = await together(round_trip, 20)
        others_done = time.monotonic() - started
        timeout, late_s = await times_out(lambda: timeout_client.get("late"))
        value = await late
        answered = time.monotonic() - started
        return others, others_done, value, answered, timeout, late_s

    with greenify.patched("libmemcached"):
        with late_memcached.process.paused_for(2.0):
            others, others_done, value, answered, timeout, late_s = run_on(new_loop, main)
    late_client.disconnect_all()
    timeout_client.disconnect_all()
    assert others == expected_round_trips(20)
    assert value == "answer" and others_done < answered
    assert late_s < INTERRUPT_BOUND_S


# --- pycurl --------------------------------------------------------------------------

@pytest.mark.compat("pycurl", "asyncio")
def test_pycurl_50_transfers_finish_together_with_the_bodies_of_stock(pycurl, slow_http, new_loop):
    fetch = fetcher(pycurl, slow_http, SLEEP_S)
    with greenify.patched("libcurl"):
        elapsed, results = run_on(new_loop, lambda: together(fetch, CONCURRENT))
    assert results == expected_bodies(CONCURRENT, SLEEP_S)
    assert elapsed < TOGETHER_BOUND_S, f"{CONCURRENT} transfers of {SLEEP_S} s took {elapsed:.2f} s"


@pytest.mark.compat("pycurl", "asyncio")
def test_pycurl_by_host_name_resolves_on_the_executor_and_a_timeout_ends_a_transfer(pycurl, slow_http, new_loop):
    by_name = fetcher(pycurl, slow_http, SLEEP_S, host="localhost")
    slow = fetcher(pycurl, slow_http, LONG_S)

    async def main():
        elapsed, results = await together(by_name, 10)
        timeout, late = await times_out(lambda: slow(0))
        return elapsed, results, timeout, late

    with greenify.patched("libcurl"):
        elapsed, results, timeout, late = run_on(new_loop, main)
    assert results == expected_bodies(10, SLEEP_S)
    assert elapsed < TOGETHER_BOUND_S
    assert late < INTERRUPT_BOUND_S and any(isinstance(exc, pycurl.error) for exc in chain(timeout)), chain(timeout)


# --- a web framework: Starlette served by uvicorn, one worker --------------------------

@pytest.mark.compat("MySQLdb", "asyncio")
@pytest.mark.parametrize("loop_setting", ["asyncio", "uvloop"])
def test_starlette_under_uvicorn_answers_50_requests_of_a_half_second_query_together(
        MySQLdb, mariadb, patched_libmariadb, loop_setting):
    uvicorn = servers.require_module("uvicorn", "uvicorn")
    servers.require_module("starlette", "starlette")
    if loop_setting == "uvloop":
        servers.require_module("uvloop", "uvloop")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    query = mysql_query(MySQLdb, mariadb, "SELECT SLEEP(%s), %s, %s")

    async def endpoint(request):
        index = int(request.path_params["index"])
        rows = await gasyncio.run(query, index)
        return JSONResponse({"index": rows[0][1]})

    app = Starlette(routes=[Route("/query/{index}", endpoint)])
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=servers.HOST, port=port, loop=loop_setting,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"

        async def get(index: int) -> bytes:
            reader, writer = await asyncio.open_connection(servers.HOST, port)
            writer.write(f"GET /query/{index} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
            body = await reader.read()
            writer.close()
            return body

        async def main():
            started = time.monotonic()
            answers = await asyncio.gather(*(get(index) for index in range(CONCURRENT)))
            return time.monotonic() - started, answers

        elapsed, answers = run_on(asyncio.new_event_loop, main)  # no signal handlers touched
    finally:
        server.should_exit = True
        thread.join(20)
    for index, answer in enumerate(answers):
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(f'{{"index":{index}}}'.encode()), answer
    assert elapsed < TOGETHER_BOUND_S, f"{CONCURRENT} requests of a {SLEEP_S} s query took {elapsed:.2f} s (serial: 25 s)"
