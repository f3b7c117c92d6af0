"""Issue 9: the server fails under greenlets waiting in a patched libmariadb.

MariaDB is SIGKILLed, or their queries or connections are ended with
`KILL QUERY <id>` / `KILL <id>` from another connection, while greenlets
wait in MySQLdb queries: each waiter gets MySQLdb's error promptly (FAULT_BOUND_S),
none hangs, the hub keeps running, and once the server is back new
connections work.  The module starts a MariaDB of its own (the session's is
shared with other tests and must not die), through tests/support/servers.py.
"""
from __future__ import annotations

import os
import signal
import time

import gevent
import pytest

from tests.support import servers
from tests.support.fault_support import FAULT_BOUND_S, LONG_WAIT_S, Ticker

pytestmark = [pytest.mark.compat("MySQLdb"), pytest.mark.usefixtures("patched_libmariadb")]

WAITERS = 100
WAITER_SLEEP_S = LONG_WAIT_S  # the queries that the fault ends: far longer than the test allows them
ERROR_BOUND_S = FAULT_BOUND_S  # each waiter's error arrives within this of the fault
# A blocked hub would stand still for the whole WAITER_SLEEP_S.
TICKER_GAP_BOUND_S = 1.0
# MySQLdb's codes for a connection that went away (CR_SERVER_LOST, CR_SERVER_GONE_ERROR).
CONNECTION_LOST = {2013, 2006}
QUERY_INTERRUPTED = 1317  # ER_QUERY_INTERRUPTED, what KILL QUERY gives the client


@pytest.fixture(scope="module")
def own_mariadb():
    """A MariaDB for this module alone, so that it may be killed."""
    yield from servers.serve(servers.start_mariadb)


@pytest.fixture
def mariadb_up(own_mariadb):
    """The module's MariaDB, restarted first if an earlier test killed it."""
    if own_mariadb.process.popen.poll() is not None:
        own_mariadb.restart()
    return own_mariadb


@pytest.fixture
def connections(MySQLdb):
    """connect(server) opens a connection; all are closed when the test ends."""
    opened = []

    def connect(server):
        connection = MySQLdb.connect(**server.connect_kwargs())
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        if connection.open:
            connection.close()


def waiter(MySQLdb, connection, sql: str):
    """A greenlet body: run `sql`; returns (result or None, MySQLdb error
    code or None, when it ended)."""
    cursor = connection.cursor()
    try:
        cursor.execute(sql)
        return cursor.fetchall(), None, time.monotonic()
    except MySQLdb.OperationalError as exc:
        return None, exc.args[0], time.monotonic()


def wait_until_running(admin, count: int, sql: str, deadline_s: float = 10.0) -> None:
    """Wait until the server runs `count` statements `sql`, as its process
    list shows them."""
    cursor = admin.cursor()
    deadline = time.monotonic() + deadline_s
    while True:
        cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = %s", (sql,))
        running = cursor.fetchall()[0][0]
        if running >= count:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"only {running} of {count} `{sql}` reached the server in {deadline_s:.0f} s")
        gevent.sleep(0.05)


def open_connections(connect, server, count: int) -> list:
    return servers.join_all([gevent.spawn(connect, server) for _ in range(count)])


def test_sigkilled_server_fails_100_waiting_queries_within_a_second_and_the_hub_keeps_running(
        MySQLdb, mariadb_up, connections):
    sql = f"SELECT SLEEP({WAITER_SLEEP_S})"
    waiting = open_connections(connections, mariadb_up, WAITERS)
    admin = connections(mariadb_up)
    ticker = Ticker()
    waiting_since = time.monotonic()
    try:
        greenlets = [gevent.spawn(waiter, MySQLdb, connection, sql) for connection in waiting]
        wait_until_running(admin, WAITERS, sql)
        os.kill(mariadb_up.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = servers.join_all(greenlets)
        gevent.sleep(0.1)  # the ticker goes on after the failures
        ticking_until = time.monotonic()
    finally:
        ticker.stop()
    mariadb_up.process.popen.wait(10)

    results = [result for result, _, _ in outcomes]
    codes = sorted({code for _, code, _ in outcomes})
    slowest = max(ended for _, _, ended in outcomes) - killed_at
    assert results == [None] * WAITERS, "a query finished although its server was killed"
    assert set(codes) <= CONNECTION_LOST, f"MySQLdb error codes: {codes}"
    assert slowest < ERROR_BOUND_S, f"the last waiter got its error {slowest:.2f} s after SIGKILL"
    gap = ticker.longest_gap(waiting_since, ticking_until)
    assert gap < TICKER_GAP_BOUND_S, f"the ticker (every 20 ms) stood still for {gap:.2f} s while 100 queries waited or failed"

    restart_s = mariadb_up.restart()
    fresh = open_connections(connections, mariadb_up, 10)
    started = time.monotonic()
    outcomes = servers.join_all([gevent.spawn(waiter, MySQLdb, connection, "SELECT SLEEP(0.5), 42")
                                 for connection in fresh])
    elapsed = time.monotonic() - started
    assert [(result, code) for result, code, _ in outcomes] == [(((0, 42),), None)] * 10, (
        f"after the restart ({restart_s:.2f} s): {outcomes}")
    assert elapsed < 2.5, f"10 patched SLEEP(0.5) after the restart took {elapsed:.2f} s"


def kill_from_another_connection(MySQLdb, server, connect, statement: str, count: int = 20):
    """`count` greenlets wait in SLEEP queries; another greenlet, on its own
    connection, ends each with `<statement> <thread id>`, a tenth of a
    second apart.  Returns [(result, error code, seconds from its KILL to
    its error)] and the waiters' connections."""
    sql = f"SELECT SLEEP({WAITER_SLEEP_S})"
    waiting = open_connections(connect, server, count)
    thread_ids = [connection.thread_id() for connection in waiting]  # before they are busy
    admin = connect(server)
    killed_at = {}

    def killer():
        wait_until_running(admin, count, sql)
        cursor = admin.cursor()
        for index, thread_id in enumerate(thread_ids):
            killed_at[index] = time.monotonic()
            cursor.execute(f"{statement} {thread_id}")
            gevent.sleep(0.1)

    greenlets = [gevent.spawn(waiter, MySQLdb, connection, sql) for connection in waiting]
    outcomes = servers.join_all([*greenlets, gevent.spawn(killer)], deadline_s=15)[:count]
    return [(result, code, ended - killed_at[index]) for index, (result, code, ended) in enumerate(outcomes)], waiting


def assert_each_error_follows_its_own_kill(outcomes, statement: str) -> None:
    # The kills come 0.1 s apart: an error before its own kill, or long after
    # it, would be some other waiter's wake-up.
    delays = [after for _, _, after in outcomes]
    assert min(delays) >= 0, f"a waiter failed {-min(delays):.2f} s before its {statement}"
    assert max(delays) < ERROR_BOUND_S, f"a waiter got its error {max(delays):.2f} s after its {statement}"


def test_kill_connection_from_another_connection_fails_each_waiter_promptly(MySQLdb, mariadb_up, connections):
    outcomes, waiting = kill_from_another_connection(MySQLdb, mariadb_up, connections, "KILL")
    assert [result for result, _, _ in outcomes] == [None] * len(outcomes)
    assert {code for _, code, _ in outcomes} <= CONNECTION_LOST, outcomes
    assert_each_error_follows_its_own_kill(outcomes, "KILL")


def test_kill_query_from_another_connection_fails_each_waiter_promptly_and_keeps_its_connection(
        MySQLdb, mariadb_up, connections):
    outcomes, waiting = kill_from_another_connection(MySQLdb, mariadb_up, connections, "KILL QUERY")
    assert [(result, code) for result, code, _ in outcomes] == [(None, QUERY_INTERRUPTED)] * len(outcomes), outcomes
    assert_each_error_follows_its_own_kill(outcomes, "KILL QUERY")
    # KILL QUERY ends the statement only: the connections go on working, together.
    started = time.monotonic()
    again = servers.join_all([gevent.spawn(waiter, MySQLdb, connection, "SELECT SLEEP(0.5), 7")
                              for connection in waiting])
    assert [(result, code) for result, code, _ in again] == [(((0, 7),), None)] * len(waiting)
    assert time.monotonic() - started < 2.5
