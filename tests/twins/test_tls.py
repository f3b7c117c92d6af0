"""Encrypted connections stay cooperative (issue 12, part 2), against the
session's servers with their self-signed certificates (tests/support/servers.py):
MySQLdb with ssl_mode="REQUIRED" as a user MariaDB accepts only over TLS,
psycopg2 with sslmode=verify-full, pycurl over https://.

With OpenSSL, libmariadb hands its socket to OpenSSL (SSL_set_fd) and every
byte then moves in libcrypto's socket BIO; patch_library brings libcrypto
along (greenify.patching.companions), narrowed to its I/O calls.  libpq and libcurl
keep their TLS I/O in their own BIOs, so patching them suffices.  pylibmc's
libmemcached 1.0.16 has no TLS at all.

Each driver is tested with the call the README shows and with the call that
`greenify-inspect --import DRIVER` recommends (its human and --json output
must agree).  Timings go to .results/tests/tls-results.json (tests/support/tls_results.py).

Python's ssl module shares the system's libcrypto with libmariadb: libcrypto
gets twins that go green only on descriptors a patched library connected
(csrc/twins/green_tls.c), so gevent's SSL sockets, blocking ssl in a plain thread
and urllib over https behave as before (same results, no wait on a hub).
"""
from __future__ import annotations

import ctypes
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, List

import gevent
import pytest

import greenify
from tests.support import servers
from tests.support import tls_results
from greenify.patching import companions
from tests.support.green_support import no_interruption_pending, pending_interruptions
from tests.drivers.test_drivers import fetcher

COUNT = 10
SLEEP_S = 0.3
SERIAL_S = COUNT * SLEEP_S
# Together: one sleep plus ten TLS handshakes; serial would be 3.0 s.
TOGETHER_BOUND_S = SERIAL_S / 2
LONG_SLEEP_S = 3
TIMEOUT_S = 0.3


@pytest.fixture(scope="module", autouse=True)
def active():
    greenify.greenify()


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending(), f"interruptions never delivered: {pending_interruptions()!r}"


@dataclass(frozen=True)
class Driver:
    name: str          # as in the compatibility table
    module: str        # what greenify-inspect --import imports
    readme_call: str   # the README's patch_library target for it
    connection: str    # how the tests connect

    def sleeper(self, request, sleep_s: float) -> Callable[[int], object]:
        """A function(index) that opens a TLS connection, waits `sleep_s`
        in the server and returns what it answered (index included)."""
        return getattr(self, "_" + self.module.lower())(request, sleep_s)

    @staticmethod
    def _mysqldb(request, sleep_s):
        MySQLdb, mariadb = request.getfixturevalue("MySQLdb"), request.getfixturevalue("mariadb")
        return _querier(lambda: MySQLdb.connect(**mariadb.tls_connect_kwargs()), "SELECT %s, SLEEP(%s)", sleep_s)

    @staticmethod
    def _psycopg2(request, sleep_s):
        psycopg2, postgres = request.getfixturevalue("psycopg2"), request.getfixturevalue("postgres")
        return _querier(lambda: psycopg2.connect(postgres.tls_dsn), "SELECT %s FROM pg_sleep(%s)", sleep_s)

    @staticmethod
    def _pycurl(request, sleep_s):
        pycurl, slow_http = request.getfixturevalue("pycurl"), request.getfixturevalue("slow_http")

        return fetcher(pycurl, slow_http, sleep_s, https=True)


def _querier(connect, sql: str, sleep_s: float):
    """function(index): a new connection runs `sql` with (index, sleep_s),
    returns its rows and is closed."""
    def query(index):
        connection = connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, (index, sleep_s))
            return cursor.fetchall()
        finally:
            connection.close()
    return query


DRIVERS = [
    Driver("MySQLdb", "MySQLdb", "libmariadb", 'ssl_mode="REQUIRED", as a user the server accepts only over TLS'),
    Driver("psycopg2", "psycopg2", "libpq", "sslmode=verify-full"),
    Driver("pycurl", "pycurl", "libcurl", "https://, certificate verified"),
]


def slot_value(slot_address: int) -> int:
    """What a GOT slot holds now."""
    return ctypes.c_void_p.from_address(slot_address).value or 0


def run_together(function, count: int = COUNT):
    started = time.monotonic()
    results = servers.join_all([gevent.spawn(function, index) for index in range(count)])
    return time.monotonic() - started, results


_recommended: Dict[str, List[str]] = {}


def inspector_recommendation(module: str) -> List[str]:
    """What `greenify-inspect --import MODULE` recommends passing to
    patch_library; its text and --json outputs must say the same."""
    if module not in _recommended:
        command = [sys.executable, "-m", "greenify.tools.inspector", "--import", module]
        document = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, check=True,
                                             timeout=180).stdout)
        text = subprocess.run(command + ["--color", "never"], capture_output=True, text=True, check=True,
                              timeout=180).stdout
        in_text = re.findall(r'^\s+greenify\.patch_library\("([^"]+)"\)$', text, re.MULTILINE)
        assert in_text == document["patch_library"], (text, document["patch_library"])
        assert in_text, f"greenify-inspect --import {module} recommends nothing:\n{text}"
        _recommended[module] = in_text
    return _recommended[module]


def record_greenified(driver: Driver, call: str, elapsed: float) -> None:
    entry = tls_results.load().get("drivers", {}).get(driver.name, {})
    tls_results.record(driver.name, "greenified_s", {**entry.get("greenified_s", {}), call: round(elapsed, 3)})
    tls_results.record(driver.name, "connection", driver.connection)


# --- the connections are encrypted ----------------------------------------------

def test_mysqldb_tls_connection_is_encrypted_and_the_user_refused_without(MySQLdb, mariadb):
    connection = MySQLdb.connect(**mariadb.tls_connect_kwargs())
    try:
        cursor = connection.cursor()
        cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        assert cursor.fetchall()[0][1], "no TLS cipher on a ssl_mode=REQUIRED connection"
    finally:
        connection.close()
    with pytest.raises(MySQLdb.OperationalError):
        MySQLdb.connect(**dict(mariadb.connect_kwargs(), user=mariadb.tls_user, ssl_mode="DISABLED"))


def test_psycopg2_tls_connection_is_encrypted(psycopg2, postgres):
    connection = psycopg2.connect(postgres.tls_dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cursor.fetchall() == [(True,)]
    finally:
        connection.close()


def test_libmariadb_brings_libcrypto_and_libpq_libcurl_bring_nothing(MySQLdb, psycopg2, pycurl):
    by_name = {}
    for target in ("libmariadb", "libpq", "libcurl"):
        clients = greenify.patching.loaded.find_loaded(target)
        by_name[target] = companions.tls_companions_of(clients)
    assert [companion.obj.name for companion in by_name["libmariadb"]] == ["libcrypto.so.3"]
    assert by_name["libmariadb"][0].reason == \
        "TLS I/O of libmariadb.so.3 (it hands its socket to OpenSSL: SSL_set_fd)"
    assert by_name["libpq"] == [] and by_name["libcurl"] == [], by_name  # their own BIOs call recv/send
    with greenify.patched("libmariadb") as report:
        (crypto,) = [obj for obj in report.objects if obj.reason]
        slots = crypto.patched + crypto.already_patched
        holds = {slot.symbol: slot_value(slot.slot_address) for slot in slots}
    assert crypto.path.endswith("libcrypto.so.3") and "TLS I/O of libmariadb.so.3" in repr(report)
    assert {"read", "write"} <= set(holds) <= set(companions.tls_twins()), holds
    assert holds == {symbol: companions.tls_twins()[symbol] for symbol in holds}
    assert all(slot_value(slot.slot_address) == slot.previous for slot in slots)


# --- 10 x 0.3 s over TLS: serial stock, together greenified -------------------------

@pytest.mark.parametrize("driver", DRIVERS, ids=lambda driver: driver.name)
def test_stock_tls_sleeps_run_one_after_another(driver, request):
    elapsed, results = run_together(driver.sleeper(request, SLEEP_S))
    assert len(results) == COUNT
    tls_results.record(driver.name, "stock_s", round(elapsed, 3))
    assert elapsed >= SERIAL_S, f"stock {driver.name} over TLS took only {elapsed:.2f} s: was it left patched?"


@pytest.mark.parametrize("how", ["readme", "inspector"])
@pytest.mark.parametrize("driver", DRIVERS, ids=lambda driver: driver.name)
def test_greenified_tls_sleeps_finish_together(driver, how, request):
    calls = [driver.readme_call] if how == "readme" else inspector_recommendation(driver.module)
    function = driver.sleeper(request, SLEEP_S)
    _, stock_results = run_together(function, 1)
    with contextlib_patched(calls):
        elapsed, results = run_together(function)
    assert [result for result in results[:1]] == stock_results
    label = " + ".join(f'patch_library("{call}")' for call in calls)
    record_greenified(driver, label, elapsed)
    assert elapsed < TOGETHER_BOUND_S, f"{COUNT} x {SLEEP_S} s over TLS after {label} took {elapsed:.2f} s"


class contextlib_patched:
    """greenify.patched() for several targets at once."""

    def __init__(self, targets):
        self.targets = targets
        self.reports = []

    def __enter__(self):
        self.reports = [greenify.patch_library(target) for target in self.targets]
        return self.reports

    def __exit__(self, *exc_info):
        for report in reversed(self.reports):
            greenify.patching.patcher.unpatch_report(report)


# --- timeouts and kills mid-query over TLS --------------------------------------------

def _interrupt_mid_query(driver: Driver, request, interrupt: str):
    """One greenlet waits LONG_SLEEP_S over TLS and is interrupted after
    TIMEOUT_S (gevent.Timeout or kill); another, on its own TLS connection,
    waits 2 x TIMEOUT_S meanwhile.  Returns (seconds until the interrupted
    one ended, the other's result, whether the interrupted connection still
    answered (its rows, None when it raised), a new connection's result)."""
    module = request.getfixturevalue(driver.module)
    if driver.module == "MySQLdb":
        mariadb = request.getfixturevalue("mariadb")
        connect = lambda: module.connect(**mariadb.tls_connect_kwargs())  # noqa: E731
        errors = (module.OperationalError, module.InterfaceError)
    else:
        postgres = request.getfixturevalue("postgres")
        connect = lambda: module.connect(postgres.tls_dsn)  # noqa: E731
        errors = (module.OperationalError, module.InterfaceError)
    victim, other = connect(), connect()
    ended = []

    def long_query():
        started = time.monotonic()
        try:
            cursor = victim.cursor()
            if interrupt == "timeout":
                with gevent.Timeout(TIMEOUT_S, False):
                    cursor.execute(f"SELECT 1 FROM (SELECT SLEEP({LONG_SLEEP_S})) AS s" if driver.module == "MySQLdb"
                                   else f"SELECT pg_sleep({LONG_SLEEP_S})")
            else:
                cursor.execute(f"SELECT SLEEP({LONG_SLEEP_S})" if driver.module == "MySQLdb"
                               else f"SELECT pg_sleep({LONG_SLEEP_S})")
        finally:
            ended.append(time.monotonic() - started)

    def other_query():
        cursor = other.cursor()
        cursor.execute("SELECT 7, SLEEP(%s)" if driver.module == "MySQLdb" else "SELECT 7, pg_sleep(%s)",
                       (2 * TIMEOUT_S,))
        return cursor.fetchall()[0][0]

    try:
        victim_greenlet = gevent.spawn(long_query)
        other_greenlet = gevent.spawn(other_query)
        if interrupt == "kill":
            gevent.sleep(TIMEOUT_S)
            victim_greenlet.kill(block=True, timeout=5)
        servers.join_all([victim_greenlet, other_greenlet])
        try:
            cursor = victim.cursor()
            cursor.execute("SELECT 1")
            victim_answered = cursor.fetchall()
        except errors:
            victim_answered = None
        fresh = connect()
        try:
            cursor = fresh.cursor()
            cursor.execute("SELECT 42")
            fresh_result = cursor.fetchall()[0][0]
        finally:
            fresh.close()
        return ended[0], other_greenlet.value, victim_answered, fresh_result
    finally:
        for connection in (victim, other):
            try:
                connection.close()
            except errors:
                pass


@pytest.mark.parametrize("interrupt", ["timeout", "kill"])
@pytest.mark.parametrize("driver", DRIVERS[:2], ids=lambda driver: driver.name)
def test_interrupted_tls_query_ends_at_once_and_only_its_connection_is_lost(driver, interrupt, request):
    with greenify.patched(driver.readme_call):
        took, other_result, victim_answered, fresh_result = _interrupt_mid_query(driver, request, interrupt)
    assert took < LONG_SLEEP_S / 2, f"the interrupted {driver.name} query over TLS took {took:.2f} s"
    assert other_result == 7
    assert fresh_result == 42
    entry = tls_results.load().get("drivers", {}).get(driver.name, {})
    outcomes = dict(entry.get("interrupted", {}))
    outcomes[interrupt] = "passed" if victim_answered is None else f"next query answered {victim_answered!r}"
    tls_results.record(driver.name, "interrupted", outcomes)
    tls_results.record(driver.name, "interruptions", "; ".join(f"{kind}: {outcome}" for kind, outcome
                                                               in sorted(outcomes.items())))
    assert victim_answered is None, f"the interrupted TLS connection still answered a query: {victim_answered!r}"


def test_timed_out_https_transfer_ends_at_once_and_others_go_on(pycurl, slow_http, request):
    driver = DRIVERS[2]
    with greenify.patched(driver.readme_call):
        slow = gevent.spawn(driver.sleeper(request, LONG_SLEEP_S), 0)
        others = [gevent.spawn(driver.sleeper(request, 2 * TIMEOUT_S), index) for index in range(1, 4)]
        gevent.sleep(TIMEOUT_S)
        started = time.monotonic()
        slow.kill(block=True, timeout=5)
        took = time.monotonic() - started
        results = servers.join_all(others)
        again = driver.sleeper(request, 0.0)(9)
    assert took < LONG_SLEEP_S / 2
    assert results == [(200, f"slept {2 * TIMEOUT_S} for {index}") for index in range(1, 4)]
    assert again == (200, "slept 0.0 for 9")
    tls_results.record(driver.name, "interruptions", "kill: passed")


# --- the shared libcrypto: Python's ssl behaves as before -------------------------------

@pytest.fixture
def libcrypto_patched_for_libmariadb(MySQLdb):
    """libmariadb patched, and with it the system's libcrypto that Python's
    ssl module links too (asserted)."""
    import _ssl
    ssl_libs = {obj.realpath for obj in greenify.patching.loaded.loaded_objects() if obj.name.startswith("libcrypto")}
    with greenify.patched("libmariadb") as report:
        crypto = [obj for obj in report.objects if obj.reason]
        assert crypto and any(greenify.patching.loaded.LoadedObject(obj.path, 0, (), None).realpath in ssl_libs
                              for obj in crypto), repr(report)
        assert _ssl.OPENSSL_VERSION_NUMBER  # the module whose libcrypto this is
        yield


def _https_get(slow_http, url: str, timeout=None) -> bytes:
    context = ssl.create_default_context(cafile=slow_http.tls.certificate)
    kwargs = {} if timeout is None else {"timeout": timeout}
    with urllib.request.urlopen(url, context=context, **kwargs) as answer:
        return answer.read()


def _waits(stats) -> int:
    return sum(entry.calls for entry in stats.values())


def test_blocking_ssl_in_a_plain_thread_blocks_natively(slow_http, libcrypto_patched_for_libmariadb):
    from gevent._hub_local import get_hub_if_exists
    from gevent.monkey import get_original

    start_new_thread = get_original("_thread", "start_new_thread")
    results = []
    done = get_original("threading", "Event")()

    def in_thread():
        try:
            results.append(_https_get(slow_http, slow_http.https_url(SLEEP_S, "thread")))
            results.append(get_hub_if_exists())
        finally:
            done.set()

    greenify.stats(reset=True)
    start_new_thread(in_thread, ())
    assert done.wait(30)
    assert results == [f"slept {SLEEP_S} for thread".encode(), None]
    assert _waits(greenify.stats()) == 0, greenify.stats()


def test_urllib_over_https_with_a_timeout_keeps_pythons_own_waits(slow_http, libcrypto_patched_for_libmariadb):
    # A socket with a timeout is O_NONBLOCK: libcrypto's read gets EAGAIN at
    # once, patched or not, and Python's _ssl waits in its own poll().
    greenify.stats(reset=True)
    body = _https_get(slow_http, slow_http.https_url(SLEEP_S, "urllib"), timeout=10)
    assert body == f"slept {SLEEP_S} for urllib".encode()
    assert _waits(greenify.stats()) == 0, greenify.stats()


def _gevent_https_get(slow_http, index: int) -> bytes:
    import gevent.socket
    import gevent.ssl

    context = gevent.ssl.create_default_context(cafile=slow_http.tls.certificate)
    with gevent.socket.create_connection((slow_http.host, slow_http.https_port)) as raw:
        with context.wrap_socket(raw, server_hostname=slow_http.host) as tls:
            tls.sendall(f"GET /?delay={SLEEP_S}&tag={index} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    return data.split(b"\r\n\r\n", 1)[1]
                data += chunk


def test_gevent_ssl_sockets_and_blocking_urllib_in_a_greenlet_behave_as_before(slow_http, MySQLdb):
    # Descriptors without O_NONBLOCK in a thread with a hub, where a green
    # twin would wait on the hub: gevent 26.9's SSLSocket made from a
    # connected socket is one (stock, ten such requests run one after
    # another), urllib without a timeout another.  libcrypto's twins are
    # libc's calls on them: no wait on the hub, the same results.
    def both():
        greenify.stats(reset=True)
        bodies = run_together(lambda index: _gevent_https_get(slow_http, index))[1]
        plain = _https_get(slow_http, slow_http.https_url(SLEEP_S, "greenlet"))
        return bodies, plain, _waits(greenify.stats())

    expected = ([f"slept {SLEEP_S} for {index}".encode() for index in range(COUNT)],
                f"slept {SLEEP_S} for greenlet".encode(), 0)
    assert both() == expected
    with greenify.patched("libmariadb") as report:
        assert any(obj.reason for obj in report.objects), repr(report)
        assert both() == expected


def test_unpatching_the_client_puts_its_tls_library_back(MySQLdb):
    report = greenify.patch_library("libmariadb")
    (crypto,) = [obj for obj in report.objects if obj.reason]
    assert crypto.patched, "libcrypto was patched before the test"
    assert all(slot_value(slot.slot_address) == companions.tls_twins()[slot.symbol] for slot in crypto.patched)
    greenify.unpatch_library("libmariadb")
    assert all(slot_value(slot.slot_address) == slot.previous for slot in crypto.patched)


def test_a_module_target_gives_its_tls_library_the_tls_twins(MySQLdb):
    with greenify.patched(MySQLdb._mysql) as report:
        (crypto,) = [obj for obj in report.objects if obj.path.endswith("libcrypto.so.3")]
        holds = {slot.symbol: slot_value(slot.slot_address) for slot in crypto.patched + crypto.already_patched}
    assert crypto.reason == "TLS I/O of libmariadb.so.3 (it hands its socket to OpenSSL: SSL_set_fd)"
    assert {"read", "write"} <= set(holds)
    assert holds == {symbol: companions.tls_twins()[symbol] for symbol in holds}


def test_companions_are_found_in_another_process_s_objects_too(MySQLdb):
    # What greenify-inspect reads: /proc/PID/maps of a child that imported MySQLdb.
    from greenify.tools.inspector import imported_objects

    objects, _source, _pid = imported_objects(["MySQLdb"])
    (client,) = [obj for obj in objects if obj.name == "libmariadb.so.3"]
    assert [(companion.obj.name, companion.reason) for companion in companions.tls_companions(client, objects)] == [
        ("libcrypto.so.3", "TLS I/O of libmariadb.so.3 (it hands its socket to OpenSSL: SSL_set_fd)")]


def test_pylibmcs_libmemcached_has_no_tls(pylibmc):
    import _pylibmc

    under, _left_out = greenify.patching.loaded.module_objects(_pylibmc)
    tls_stacks = [obj.name for obj in under for stack in companions.TLS_STACKS if stack.does_io_in(obj.name)]
    tls_stacks += [obj.name for obj in under if obj.name.startswith(("libssl", "libnss3", "libwolfssl", "libmbedtls"))]
    assert any(obj.name.startswith("libmemcached") for obj in under), under
    assert tls_stacks == [], f"pylibmc now loads a TLS library ({tls_stacks}): test TLS for it"
