"""MySQLdb (the `mysqlclient` package, over Debian's libmariadb) against a
real MariaDB server that the test session starts (tests/support/servers.py).

Unpatched, libmariadb blocks the whole process in recv(), so greenlets run
their queries one after another; patched, they wait on the gevent hub and
finish together.  Every patched test patches inside `greenify.patched()`, so
the library is unpatched again when it ends and no state leaks between tests.
"""
from __future__ import annotations

import os
import time

import gevent
import pytest

import greenify
from tests.support import servers
pytestmark = pytest.mark.compat("MySQLdb")

CONCURRENT_CONNECTIONS = 100
SLEEP_S = 0.5
# Serial, 100 x 0.5 s would take 50 s; together they take about one SLEEP
# plus connection set-up.  The bound leaves room for a loaded 2-core machine.
CONCURRENT_BOUND_S = 3.0

# Unpatched runs stay small: they cost their full serial time.
UNPATCHED_CONNECTIONS = 4
UNPATCHED_SLEEP_S = 0.3


def sleep_on_own_connections(MySQLdb, mariadb, count: int, sleep_s: float):
    """Run `count` greenlets, each connecting on its own and running
    ``SELECT SLEEP(sleep_s), <its index>``.  Returns (seconds taken, rows)."""

    def query(index: int):
        connection = MySQLdb.connect(**mariadb.connect_kwargs())
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT SLEEP(%s), %s", (sleep_s, index))
            return cursor.fetchall()
        finally:
            connection.close()

    started = time.monotonic()
    rows = servers.join_all([gevent.spawn(query, index) for index in range(count)])
    return time.monotonic() - started, rows


def expected_rows(count: int):
    return [((0, index),) for index in range(count)]


@pytest.fixture(scope="module")
def active():
    greenify.greenify()
    assert greenify.is_active()


def target_for(kind: str, MySQLdb):
    if kind == "module":
        return MySQLdb._mysql  # the extension module object; libmariadb is found through DT_NEEDED
    return kind


# --- unpatched first: nothing has been patched yet in this module ------------

def test_unpatched_queries_run_one_after_another(MySQLdb, mariadb, active):
    elapsed, rows = sleep_on_own_connections(MySQLdb, mariadb, UNPATCHED_CONNECTIONS, UNPATCHED_SLEEP_S)
    assert rows == expected_rows(UNPATCHED_CONNECTIONS)
    assert elapsed >= UNPATCHED_CONNECTIONS * UNPATCHED_SLEEP_S, (
        f"{UNPATCHED_CONNECTIONS} unpatched SLEEP({UNPATCHED_SLEEP_S}) took only {elapsed:.2f} s: "
        "libmariadb should block the process, was it left patched by an earlier test?")


def test_unpatched_query_starves_other_greenlets(MySQLdb, mariadb, active):
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.05)

    ticking = gevent.spawn(ticker)
    gevent.sleep(0)
    try:
        elapsed, rows = sleep_on_own_connections(MySQLdb, mariadb, 1, 1.0)
    finally:
        ticking.kill()
    assert rows == expected_rows(1)
    # The connect and the query block the hub: the ticker, due every 50 ms,
    # gets at most a few turns in the gaps between libmariadb's calls.
    assert len(ticks) <= 4, f"the ticker ran {len(ticks)} times during a blocking 1 s query"


# --- patched -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["libmariadb", "module"],
                         ids=["patch_library('libmariadb')", "patch_library(MySQLdb._mysql)"])
def test_patched_queries_on_100_connections_finish_together(MySQLdb, mariadb, active, kind):
    with greenify.patched(target_for(kind, MySQLdb)):
        elapsed, rows = sleep_on_own_connections(MySQLdb, mariadb, CONCURRENT_CONNECTIONS, SLEEP_S)
    assert rows == expected_rows(CONCURRENT_CONNECTIONS)
    assert elapsed < CONCURRENT_BOUND_S, (
        f"{CONCURRENT_CONNECTIONS} patched SLEEP({SLEEP_S}) took {elapsed:.2f} s "
        f"(serial: {CONCURRENT_CONNECTIONS * SLEEP_S:.0f} s)")


def test_patch_report_names_libmariadb_and_its_blocking_imports(MySQLdb, active):
    with greenify.patched(MySQLdb._mysql) as report:
        assert report, f"nothing patched under MySQLdb._mysql: {report!r}"
        libmariadb = [obj for obj in report.objects if "libmariadb" in os.path.basename(obj.path)]
        assert libmariadb, f"libmariadb not found through MySQLdb._mysql's DT_NEEDED: {report!r}"
        symbols = {slot.symbol for obj in libmariadb for slot in obj.patched + obj.already_patched}
        # libmariadb's blocking network I/O: recv/send on the socket, poll for timeouts.
        assert {"recv", "send", "connect", "poll"} <= symbols, f"libmariadb's patched imports: {sorted(symbols)}"


def test_patched_query_lets_other_greenlets_run(MySQLdb, mariadb, active):
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.05)

    with greenify.patched("libmariadb"):
        ticking = gevent.spawn(ticker)
        try:
            elapsed, rows = sleep_on_own_connections(MySQLdb, mariadb, 1, 1.0)
        finally:
            ticking.kill()
    assert rows == expected_rows(1)
    # Due every 50 ms for 1 s: 20 turns when nothing blocks; ask for half.
    assert len(ticks) >= 10, f"the ticker ran only {len(ticks)} times during a patched 1 s query"


def test_unpatching_restores_the_serial_behaviour(MySQLdb, mariadb, active):
    with greenify.patched("libmariadb"):
        pass
    elapsed, rows = sleep_on_own_connections(MySQLdb, mariadb, UNPATCHED_CONNECTIONS, UNPATCHED_SLEEP_S)
    assert rows == expected_rows(UNPATCHED_CONNECTIONS)
    assert elapsed >= UNPATCHED_CONNECTIONS * UNPATCHED_SLEEP_S, (
        f"after unpatching, {UNPATCHED_CONNECTIONS} SLEEP({UNPATCHED_SLEEP_S}) took only {elapsed:.2f} s")


def mixed_workload(MySQLdb, mariadb, index: int):
    """Transactions, executemany, a large result set and a server-side
    cursor on one connection; returns what each of them returned."""
    connection = MySQLdb.connect(**mariadb.connect_kwargs())
    try:
        cursor = connection.cursor()
        table = f"workload_{index}"
        cursor.execute(f"CREATE TEMPORARY TABLE {table} (id INT PRIMARY KEY, label VARCHAR(64)) ENGINE=InnoDB")
        cursor.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(row, f"row {row}") for row in range(2000)])
        connection.commit()
        cursor.execute(f"INSERT INTO {table} VALUES (-1, 'rolled back')")
        connection.rollback()
        cursor.execute(f"SELECT COUNT(*), SUM(id), MIN(label) FROM {table}")
        after_rollback = cursor.fetchall()
        # MariaDB's Sequence engine generates the rows: about 6 MB of results.
        cursor.execute("SELECT seq, REPEAT(CHAR(65 + seq % 26), seq % 100) FROM seq_1_to_100000")
        large = cursor.fetchall()
        server_side = connection.cursor(MySQLdb.cursors.SSCursor)
        server_side.execute("SELECT seq, MD5(seq) FROM seq_1_to_50000")
        streamed = list(server_side)
        server_side.close()
        return after_rollback, large, streamed
    finally:
        connection.close()


def test_transactions_executemany_large_results_and_server_side_cursors_match_unpatched(MySQLdb, mariadb, active):
    import MySQLdb.cursors  # noqa: F401 - SSCursor

    unpatched = mixed_workload(MySQLdb, mariadb, 0)
    after_rollback, large, streamed = unpatched
    assert after_rollback == ((2000, sum(range(2000)), "row 0"),)
    assert len(large) == 100_000 and len(streamed) == 50_000
    with greenify.patched("libmariadb"):
        results = servers.join_all([gevent.spawn(mixed_workload, MySQLdb, mariadb, index) for index in range(5)])
    for result in results:
        assert result == unpatched
