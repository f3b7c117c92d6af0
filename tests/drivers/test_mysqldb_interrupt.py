"""gevent.Timeout and Greenlet.kill interrupt MySQLdb queries waiting in a
patched libmariadb, against the real MariaDB that the session starts
(tests/support/servers.py).

test_interrupt.py proves the mechanism with a fixture extension, the GIL held
and released; MySQLdb releases the GIL around its calls into libmariadb.
Here: the very exception is raised about when the timer fires, with MySQLdb's
OperationalError as its __context__; nothing is left behind after a thousand
interruptions; other greenlets, mid-query or not, never notice.  An
interrupted connection is unusable, as after any lost connection, and is
closed and replaced.
"""
from __future__ import annotations

import gc
import sys
import time

import gevent
import pytest

from tests.support import servers
from tests.support.fault_support import INTERRUPT_BOUND_S, LONG_WAIT_S
from tests.support.green_support import (memory_growth_unmeasurable_under_asan, no_interruption_pending, open_fds, pending_interruptions,
                           rss_kb)

pytestmark = [pytest.mark.compat("MySQLdb"), pytest.mark.usefixtures("patched_libmariadb")]

LONG_SLEEP_S = LONG_WAIT_S  # the queries that get interrupted: far longer than any timeout here
TIMEOUT_S = 0.3
# The exception arrives once libmariadb has unwound, just after the timer; a
# wait that missed the interruption would last the whole LONG_SLEEP_S.
DELIVERY_BOUND_S = INTERRUPT_BOUND_S




@pytest.fixture(autouse=True)
def nothing_left_behind():
    trace_before = sys.gettrace()
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending(), f"interruptions never delivered: {pending_interruptions()!r}"
    assert sys.gettrace() is trace_before


@pytest.fixture
def connect(MySQLdb, mariadb):
    """connect() opens a connection to the session's MariaDB; every one is
    closed when the test ends."""
    opened = []

    def open_connection():
        connection = MySQLdb.connect(**mariadb.connect_kwargs())
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        if connection.open:  # mysqlclient raises on closing a closed connection
            connection.close()


def test_timeout_raises_itself_soon_after_firing_with_operational_error_as_context(MySQLdb, connect):
    cursor = connect().cursor()
    started = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(TIMEOUT_S) as timeout:
            cursor.execute(f"SELECT SLEEP({LONG_SLEEP_S})")
    took = time.monotonic() - started
    assert caught.value is timeout
    assert isinstance(caught.value.__context__, MySQLdb.OperationalError), repr(caught.value.__context__)
    assert TIMEOUT_S - 0.01 <= took < TIMEOUT_S + DELIVERY_BOUND_S, f"raised after {took:.3f} s"


def test_silent_timeout_ends_the_query_without_raising(connect):
    cursor = connect().cursor()
    started = time.monotonic()
    with gevent.Timeout(TIMEOUT_S, False):
        cursor.execute(f"SELECT SLEEP({LONG_SLEEP_S})")
        pytest.fail("execute() went on after the timeout")
    took = time.monotonic() - started
    assert took < TIMEOUT_S + DELIVERY_BOUND_S, f"the silent timeout ended the query after {took:.3f} s"


def test_killed_greenlet_mid_query_ends_at_once_and_successfully(connect):
    cursor = connect().cursor()
    greenlet = gevent.spawn(cursor.execute, f"SELECT SLEEP({LONG_SLEEP_S})")
    gevent.sleep(0.1)  # well inside the query
    assert not greenlet.dead
    started = time.monotonic()
    greenlet.kill()
    took = time.monotonic() - started
    assert took < DELIVERY_BOUND_S, f"kill() took {took:.3f} s"
    assert greenlet.dead and greenlet.successful()
    assert isinstance(greenlet.value, gevent.GreenletExit)


def test_nested_timeouts_raise_the_outer_one_when_it_fires_first(MySQLdb, connect):
    cursor = connect().cursor()
    started = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(TIMEOUT_S) as outer:
            with gevent.Timeout(LONG_SLEEP_S * 2) as inner:
                cursor.execute(f"SELECT SLEEP({LONG_SLEEP_S})")
    took = time.monotonic() - started
    assert caught.value is outer and caught.value is not inner
    assert isinstance(caught.value.__context__, MySQLdb.OperationalError)
    assert took < TIMEOUT_S + DELIVERY_BOUND_S, f"raised after {took:.3f} s"


def test_timeout_in_one_greenlet_leaves_another_mid_query_to_complete(connect):
    interrupted_cursor = connect().cursor()
    other_connection = connect()
    other_sleep_s = 0.6  # still in the server when the first greenlet's timeout fires

    def interrupted():
        with gevent.Timeout(0.2, False):
            interrupted_cursor.execute(f"SELECT SLEEP({LONG_SLEEP_S})")
            return "went on"
        return "timed out", time.monotonic()

    def other():
        cursor = other_connection.cursor()
        cursor.execute("SELECT SLEEP(%s), %s", (other_sleep_s, "other"))
        first = cursor.fetchall()
        cursor.execute("SELECT 6 * 7")  # the connection is still fine afterwards
        return first, cursor.fetchall(), time.monotonic()

    started = time.monotonic()
    (outcome, timed_out_at), (first, second, other_done_at) = servers.join_all(
        [gevent.spawn(interrupted), gevent.spawn(other)])
    assert outcome == "timed out"
    assert first == ((0, "other"),) and second == ((42,),)
    assert timed_out_at - started < 0.2 + DELIVERY_BOUND_S
    assert other_done_at - started >= other_sleep_s


def test_interrupted_connection_can_be_closed_and_a_new_one_works(MySQLdb, connect):
    connection = connect()
    with gevent.Timeout(0.1, False):
        connection.cursor().execute(f"SELECT SLEEP({LONG_SLEEP_S})")
    # Unusable, as after any lost connection: the next query fails, it does not hang.
    with gevent.Timeout(5):
        with pytest.raises(MySQLdb.Error):
            cursor = connection.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
    connection.close()
    assert not connection.open
    cursor = connect().cursor()
    cursor.execute("SELECT 1")
    assert cursor.fetchall() == ((1,),)


def cancel_queries(MySQLdb, mariadb, workers: int, per_worker: int) -> int:
    """`workers` greenlets each interrupt `per_worker` short queries, by a
    tiny timeout or by killing the greenlet that runs it, on a fresh
    connection each time (an interrupted one is unusable).  Returns how
    many queries were interrupted rather than finished."""
    interrupted = []

    def query(cursor) -> None:
        cursor.execute("SELECT SLEEP(0.05)")

    def worker(index: int) -> None:
        for round_number in range(per_worker):
            connection = MySQLdb.connect(**mariadb.connect_kwargs())
            try:
                cursor = connection.cursor()
                if (index + round_number) % 2:
                    timed_out = True
                    with gevent.Timeout(0.005, False):
                        query(cursor)
                        timed_out = False
                    interrupted.append(timed_out)
                else:
                    greenlet = gevent.spawn(query, cursor)
                    gevent.sleep(0.005)
                    greenlet.kill()
                    assert greenlet.successful(), repr(greenlet.exception)
                    interrupted.append(isinstance(greenlet.value, gevent.GreenletExit))
            finally:
                connection.close()

    servers.join_all([gevent.spawn(worker, index) for index in range(workers)])
    return sum(interrupted)


@memory_growth_unmeasurable_under_asan
def test_a_thousand_cancellations_leave_no_memory_fds_or_watchers_behind(MySQLdb, mariadb):
    loop = gevent.get_hub().loop
    cancel_queries(MySQLdb, mariadb, workers=10, per_worker=20)  # warm up allocators and caches
    gc.collect()
    fds, rss, active_watchers = open_fds(), rss_kb(), loop.activecnt
    interrupted = cancel_queries(MySQLdb, mariadb, workers=10, per_worker=100)
    gc.collect()
    # Nearly all are interrupted mid-query; a few may lose the race to a slow connect.
    assert interrupted >= 900, f"only {interrupted} of 1000 queries were interrupted"
    assert open_fds() == fds
    assert loop.activecnt == active_watchers
    assert rss_kb() - rss < 4096, f"resident memory grew by {rss_kb() - rss} KiB over 1000 cancellations"
    assert no_interruption_pending()


def test_no_stray_exception_surfaces_in_other_greenlets_after_interruptions(MySQLdb, mariadb, connect):
    for _ in range(20):
        connection = connect()
        with gevent.Timeout(0.01, False):
            connection.cursor().execute(f"SELECT SLEEP({LONG_SLEEP_S})")
        connection.close()

    def bystander(index: int):
        gevent.sleep(0.02)
        cursor = connect().cursor()
        cursor.execute("SELECT SLEEP(0.1), %s", (index,))
        return cursor.fetchall()

    greenlets = [gevent.spawn(bystander, index) for index in range(20)]
    assert servers.join_all(greenlets) == [((0, index),) for index in range(20)]
    assert all(greenlet.successful() for greenlet in greenlets)
