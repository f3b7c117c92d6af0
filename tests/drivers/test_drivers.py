"""Issue 5's driver matrix, against real servers that the session starts
(tests/support/servers.py): psycopg2-binary over its bundled libpq, pylibmc over its
bundled libmemcached, pycurl over its bundled libcurl.

For each driver, patched, greenlets blocked in the driver's C library wait on
the gevent hub together; unpatched, the same calls run one after another, and
the results are the same either way.  Every patched test patches inside
`greenify.patched()`, so the library is unpatched again when the test ends.
"""
from __future__ import annotations

import io
import os
import re
import time

import gevent
import gevent.socket
import pytest

import greenify
from tests.support import servers
CONCURRENT = 50
SLEEP_S = 0.5
# Serial, 50 x 0.5 s would take 25 s; together about one sleep plus
# connection set-up.  The bound leaves room for a loaded 2-core machine.
TOGETHER_BOUND_S = 4.0

# Unpatched runs stay small: they cost their full serial time.
UNPATCHED = 4
UNPATCHED_SLEEP_S = 0.3


@pytest.fixture(scope="module", autouse=True)
def active():
    greenify.greenify()


def run_together(function, count: int):
    """Run function(index) in `count` greenlets at once; returns (seconds
    taken, results in index order)."""
    started = time.monotonic()
    results = servers.join_all([gevent.spawn(function, index) for index in range(count)])
    return time.monotonic() - started, results


def assert_serial(elapsed: float, count: int, sleep_s: float, what: str) -> None:
    assert elapsed >= count * sleep_s, (
        f"{count} unpatched {what} of {sleep_s} s took only {elapsed:.2f} s: the library should block "
        "the process; was it left patched by an earlier test?")


def assert_together(elapsed: float, count: int, sleep_s: float, what: str) -> None:
    assert elapsed < TOGETHER_BOUND_S, (
        f"{count} patched {what} of {sleep_s} s took {elapsed:.2f} s (serial: {count * sleep_s:.0f} s)")


# --- psycopg2-binary: libpq-<hash>.so.5 in psycopg2_binary.libs --------------------

def pg_sleeper(psycopg2, postgres, sleep_s: float):
    def query(index: int):
        connection = psycopg2.connect(postgres.dsn)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s FROM pg_sleep(%s)", (index, sleep_s))
                return cursor.fetchall()
        finally:
            connection.close()
    return query


@pytest.mark.compat("psycopg2")
def test_patch_library_libpq_finds_the_copy_bundled_in_psycopg2_binary(psycopg2):
    libs_dir = os.path.realpath(os.path.join(os.path.dirname(psycopg2.__file__), os.pardir, "psycopg2_binary.libs"))
    if not os.path.isdir(libs_dir):
        servers.missing(f"psycopg2 at {psycopg2.__file__} is not the psycopg2-binary wheel: pip install psycopg2-binary")
    with greenify.patched("libpq") as report:
        patched_paths = [os.path.realpath(obj.path) for obj in report.objects if obj]
        symbols = {slot.symbol for slot in report.patched_slots}
    # auditwheel renames the bundled copy libpq-<hash>.so.5[.minor].
    bundled = [path for path in patched_paths if os.path.dirname(path) == libs_dir
               and re.fullmatch(r"libpq-[0-9a-f]+\.so\.5(\.\d+)*", os.path.basename(path))]
    assert bundled, f"no libpq-<hash>.so.5 from {libs_dir} patched: {report!r}"
    # libpq waits in poll() (POLLIN|POLLERR) and reads with recv().
    assert {"poll", "recv", "send", "connect"} <= symbols, repr(report)


@pytest.mark.compat("psycopg2")
def test_unpatched_pg_sleeps_run_one_after_another(psycopg2, postgres):
    elapsed, rows = run_together(pg_sleeper(psycopg2, postgres, UNPATCHED_SLEEP_S), UNPATCHED)
    assert rows == [[(index,)] for index in range(UNPATCHED)]
    assert_serial(elapsed, UNPATCHED, UNPATCHED_SLEEP_S, "pg_sleep")


@pytest.mark.compat("psycopg2")
def test_patched_pg_sleeps_on_50_connections_finish_together(psycopg2, postgres):
    with greenify.patched("libpq"):
        elapsed, rows = run_together(pg_sleeper(psycopg2, postgres, SLEEP_S), CONCURRENT)
    assert rows == [[(index,)] for index in range(CONCURRENT)]
    assert_together(elapsed, CONCURRENT, SLEEP_S, "pg_sleep")


def copy_in_and_out(psycopg2, postgres, rows: int):
    """COPY `rows` rows into a table and back out; returns (sent, received)."""
    sent = "".join(f"{index}\tlabel {index} {'x' * (index % 97)}\n" for index in range(rows))
    connection = psycopg2.connect(postgres.dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE copied (id integer, label text)")
            cursor.copy_expert("COPY copied FROM STDIN", io.StringIO(sent))
            received = io.StringIO()
            cursor.copy_expert("COPY (SELECT * FROM copied ORDER BY id) TO STDOUT", received)
        connection.rollback()
        return sent, received.getvalue()
    finally:
        connection.close()


@pytest.mark.compat("psycopg2")
def test_copy_in_and_out_returns_the_same_rows_patched_and_unpatched(psycopg2, postgres):
    rows = 20_000  # about 1.3 MB each way: many partial reads and writes
    unpatched_sent, unpatched_received = copy_in_and_out(psycopg2, postgres, rows)
    assert unpatched_received == unpatched_sent
    with greenify.patched("libpq"):
        _, results = run_together(lambda index: copy_in_and_out(psycopg2, postgres, rows), 5)
    for sent, received in results:
        assert received == unpatched_received


def notify_and_listen(psycopg2, postgres, count: int, delay_s: float):
    """`count` greenlets each wait `delay_s` in the server, then NOTIFY;
    a listener collects the payloads.  Returns (seconds taken, payloads)."""
    listener = psycopg2.connect(postgres.dsn)
    listener.autocommit = True
    try:
        with listener.cursor() as cursor:
            cursor.execute("LISTEN greenify")

        def notify(index: int) -> None:
            connection = psycopg2.connect(postgres.dsn)
            connection.autocommit = True
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_notify('greenify', %s) FROM pg_sleep(%s)", (f"payload {index}", delay_s))
            finally:
                connection.close()

        started = time.monotonic()
        notifiers = [gevent.spawn(notify, index) for index in range(count)]
        payloads = []
        deadline = started + 30
        while len(payloads) < count:
            gevent.socket.wait_read(listener.fileno(), timeout=max(deadline - time.monotonic(), 0.01))
            listener.poll()
            while listener.notifies:
                payloads.append(listener.notifies.pop(0).payload)
        servers.join_all(notifiers)
        return time.monotonic() - started, sorted(payloads)
    finally:
        listener.close()


def payloads(count: int):
    return sorted(f"payload {index}" for index in range(count))


@pytest.mark.compat("psycopg2")
def test_listen_notify_delivers_every_payload_patched_and_unpatched(psycopg2, postgres):
    elapsed, received = notify_and_listen(psycopg2, postgres, UNPATCHED, UNPATCHED_SLEEP_S)
    assert received == payloads(UNPATCHED)
    assert_serial(elapsed, UNPATCHED, UNPATCHED_SLEEP_S, "pg_sleep + NOTIFY")
    with greenify.patched("libpq"):
        elapsed, received = notify_and_listen(psycopg2, postgres, 10, SLEEP_S)
    assert received == payloads(10)
    assert_together(elapsed, 10, SLEEP_S, "pg_sleep + NOTIFY")


@pytest.mark.compat("psycopg2")
def test_patched_listener_blocked_in_a_query_receives_notifications_sent_meanwhile(psycopg2, postgres):
    count = 5
    listener = psycopg2.connect(postgres.dsn)
    listener.autocommit = True
    try:
        with greenify.patched("libpq"):
            with listener.cursor() as cursor:
                cursor.execute("LISTEN greenify_meanwhile")
                notifier_done = []

                def notify(index: int) -> None:
                    connection = psycopg2.connect(postgres.dsn)
                    connection.autocommit = True
                    try:
                        with connection.cursor() as notify_cursor:
                            notify_cursor.execute("SELECT pg_notify('greenify_meanwhile', %s)", (f"payload {index}",))
                    finally:
                        connection.close()
                    notifier_done.append(time.monotonic())

                notifiers = [gevent.spawn(notify, index) for index in range(count)]
                # The listener blocks in libpq for 2 s; the notifiers run
                # meanwhile, and libpq keeps what arrives for psycopg2.
                with gevent.Timeout(servers.GREENLET_DEADLINE_S):
                    cursor.execute("SELECT pg_sleep(2)")
                query_done = time.monotonic()
            servers.join_all(notifiers)
        assert len(notifier_done) == count and max(notifier_done) < query_done, \
            "the notifiers waited for the listener's blocking query"
        assert sorted(notify.payload for notify in listener.notifies) == payloads(count)
    finally:
        listener.close()


# --- pylibmc: libmemcached-<hash>.so in pylibmc.libs -------------------------------

def memcached_round_trip(pylibmc, address: str):
    def client_work(index: int):
        client = pylibmc.Client([address], binary=True)
        try:
            key = f"greenify:{index}"
            value = {"index": index, "blob": bytes([index % 256]) * (index * 3989 % 300_000)}
            client.set(key, value)
            client.set_multi({f"{key}:{part}": f"part {part} of {index}" for part in range(5)})
            return client.get(key), client.get_multi([f"{key}:{part}" for part in range(5)])
        finally:
            client.disconnect_all()
    return client_work


def expected_round_trips(count: int):
    return [({"index": index, "blob": bytes([index % 256]) * (index * 3989 % 300_000)},
             {f"greenify:{index}:{part}": f"part {part} of {index}" for part in range(5)})
            for index in range(count)]


@pytest.mark.compat("pylibmc")
def test_50_clients_round_trip_the_same_values_patched_and_unpatched(pylibmc, memcached):
    _, unpatched = run_together(memcached_round_trip(pylibmc, memcached.address), CONCURRENT)
    assert unpatched == expected_round_trips(CONCURRENT)
    with greenify.patched("libmemcached") as report:
        assert report, repr(report)
        _, patched = run_together(memcached_round_trip(pylibmc, memcached.address), CONCURRENT)
    assert patched == unpatched


@pytest.fixture
def late_memcached():
    """A second memcached, for a test to pause."""
    yield from servers.serve(servers.start_memcached)


def late_answer_and_others(pylibmc, memcached, late_memcached, pause_s: float = 1.0, others: int = 20):
    """One greenlet asks the paused `late_memcached` for a key; `others`
    greenlets then use the healthy one.  Returns (late value, when it came,
    when each other greenlet finished), times from the start."""
    late_client = pylibmc.Client([late_memcached.address], binary=True)
    late_client.set("late", "answer")  # connected before the pause
    started = time.monotonic()
    round_trip = memcached_round_trip(pylibmc, memcached.address)

    def late():
        return late_client.get("late"), time.monotonic() - started

    def other(index: int):
        assert round_trip(index) == expected_round_trips(index + 1)[index]
        return time.monotonic() - started

    with late_memcached.process.paused_for(pause_s):
        late_greenlet = gevent.spawn(late)  # runs first: spawned first
        other_greenlets = [gevent.spawn(other, index) for index in range(others)]
        (value, answered_at), *others_done = servers.join_all([late_greenlet, *other_greenlets])
    late_client.disconnect_all()
    return value, answered_at, others_done


@pytest.mark.compat("pylibmc")
def test_unpatched_late_memcached_blocks_every_other_greenlet(pylibmc, memcached, late_memcached):
    value, answered_at, others_done = late_answer_and_others(pylibmc, memcached, late_memcached)
    assert value == "answer"
    assert answered_at >= 1.0
    assert min(others_done) >= answered_at, "other greenlets ran while libmemcached blocked, unpatched"


@pytest.mark.compat("pylibmc")
def test_patched_late_memcached_does_not_block_other_greenlets(pylibmc, memcached, late_memcached):
    with greenify.patched("libmemcached"):
        value, answered_at, others_done = late_answer_and_others(pylibmc, memcached, late_memcached)
    assert value == "answer"
    assert answered_at >= 1.0, "the paused server answered early?"
    assert max(others_done) < answered_at, (
        f"other greenlets finished at up to {max(others_done):.2f} s, after the late answer at {answered_at:.2f} s")


# --- pycurl: libcurl-<hash>.so in pycurl.libs --------------------------------------

def fetcher(pycurl, slow_http, delay_s: float, host: str = servers.HOST, https: bool = False):
    """function(index): one pycurl transfer from the slow server (over TLS,
    its certificate verified, with ``https``): (status, body)."""
    def fetch(index: int):
        body = io.BytesIO()
        curl = pycurl.Curl()
        try:
            url = slow_http.https_url(delay_s, str(index)) if https else slow_http.url(delay_s, str(index))
            curl.setopt(pycurl.URL, url.replace(servers.HOST, host, 1))
            if https:
                curl.setopt(pycurl.CAINFO, slow_http.tls.certificate)
            curl.setopt(pycurl.WRITEDATA, body)
            curl.setopt(pycurl.NOSIGNAL, 1)
            curl.setopt(pycurl.TIMEOUT, 30)
            curl.perform()
            return curl.getinfo(pycurl.RESPONSE_CODE), body.getvalue().decode()
        finally:
            curl.close()
    return fetch


def expected_bodies(count: int, delay_s: float):
    return [(200, f"slept {delay_s} for {index}") for index in range(count)]


@pytest.mark.compat("pycurl")
def test_unpatched_transfers_run_one_after_another(pycurl, slow_http):
    elapsed, results = run_together(fetcher(pycurl, slow_http, UNPATCHED_SLEEP_S), UNPATCHED)
    assert results == expected_bodies(UNPATCHED, UNPATCHED_SLEEP_S)
    assert_serial(elapsed, UNPATCHED, UNPATCHED_SLEEP_S, "transfers")


@pytest.mark.compat("pycurl")
def test_patched_50_transfers_finish_together(pycurl, slow_http):
    with greenify.patched("libcurl"):
        elapsed, results = run_together(fetcher(pycurl, slow_http, SLEEP_S), CONCURRENT)
    assert results == expected_bodies(CONCURRENT, SLEEP_S)
    assert_together(elapsed, CONCURRENT, SLEEP_S, "transfers")


@pytest.mark.compat("pycurl")
def test_patched_transfers_by_host_name_finish_together(pycurl, slow_http):
    count = 10
    with greenify.patched("libcurl"):
        elapsed, results = run_together(fetcher(pycurl, slow_http, SLEEP_S, host="localhost"), count)
    assert results == expected_bodies(count, SLEEP_S)
    assert_together(elapsed, count, SLEEP_S, "transfers to localhost")
