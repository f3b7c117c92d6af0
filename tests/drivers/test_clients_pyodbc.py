"""pyodbc over unixODBC, with the MariaDB (odbc-mariadb) and PostgreSQL
(odbc-postgresql) ODBC drivers, against the session's MariaDB and PostgreSQL.

What is new: nothing that does I/O is loaded when pyodbc is imported.
unixODBC's driver manager (libodbc.so.2) dlopens the driver named by the
connection string (through libltdl) at the first connect, and the driver
brings its client library as a DT_NEEDED dependency: libmaodbc.so needs
libmariadb.so.3, psqlodbcw.so needs libpq.so.5.  Neither driver imports a
blocking call itself; their client libraries do all the socket I/O.  So the
call a user writes, before the first connect, names the client library:

    greenify.patch_on_load("libmariadb", "libpq")

and the library is patched the moment unixODBC's dlopen loads it
(`test_*_is_patched_when_unixodbc_loads_the_driver_at_connect_time`, in a
fresh interpreter).  Patching the driver file itself does nothing: it
imports no blocking call.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List

import gevent
import pytest

import greenify
import greenify.asyncio as gasyncio
from tests.support import servers
from tests.support.fault_support import INTERRUPT_BOUND_S, LONG_WAIT_S
from tests.wait.test_asyncio import run_on
from tests.drivers.test_driver_faults import WAITERS, faulted_waiters, interrupted_by_timeout, killed_while_waiting
from tests.drivers.test_drivers import UNPATCHED, assert_serial, run_together

COUNT = 10
SLEEP_S = 0.3
# Serial, 10 x 0.3 s take 3 s; together about one sleep plus connecting.
TOGETHER_BOUND_S = 1.5

MARIADB_ROW, POSTGRES_ROW = "pyodbc, MariaDB ODBC", "pyodbc, PostgreSQL ODBC"


@dataclass
class Backend:
    """One ODBC driver and the server it reaches."""

    name: str
    connection_string: str       # DSN-less: DRIVER=/path/to/driver.so;...
    client_library: str          # what the driver needs for its I/O: the name to patch_on_load
    sleep_sql: str               # one parameter (the index), then a sleep of {seconds}
    slept: object                # the sleep's column, as the driver returns it
    session_id_sql: str
    terminate: Callable[[object, List[int]], None]  # (admin cursor, session ids)
    running_sleeps_sql: str

    def sleep(self, seconds: float) -> str:
        return self.sleep_sql.format(seconds=seconds)


def _kill_mariadb_connections(cursor, ids: List[int]) -> None:
    for session_id in ids:
        cursor.execute(f"KILL CONNECTION {int(session_id)}")


def _terminate_postgres_backends(cursor, ids: List[int]) -> None:
    cursor.execute("SELECT bool_and(pg_terminate_backend(pid)) FROM unnest(ARRAY["
                   + ", ".join(str(int(session_id)) for session_id in ids) + "]) AS pid")
    assert cursor.fetchone()[0] in (True, 1, "1")  # psqlodbc returns a bool as text by default


def mariadb_backend(mariadb) -> Backend:
    driver = servers.odbc_driver("libmaodbc.so", "odbc-mariadb")
    return Backend("mariadb", f"DRIVER={driver};SERVER={mariadb.host};PORT={mariadb.port};DATABASE={mariadb.database};"
                   f"UID={mariadb.user};PWD={mariadb.password}", "libmariadb",
                   "SELECT CAST(? AS SIGNED), SLEEP({seconds})", 0, "SELECT CONNECTION_ID()",
                   _kill_mariadb_connections,
                   "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT CAST(%'")


def postgres_backend(postgres) -> Backend:
    driver = servers.odbc_driver("psqlodbcw.so", "odbc-postgresql")
    return Backend("postgresql", f"DRIVER={driver};SERVER={postgres.host};PORT={postgres.port};"
                   f"DATABASE={postgres.database};UID={postgres.user};SSLMODE=disable", "libpq",
                   "SELECT CAST(? AS integer), pg_sleep({seconds})::text", "", "SELECT pg_backend_pid()",
                   _terminate_postgres_backends,
                   "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT CAST(%'")


def backends(*aspects: str):
    """Parametrize a test over both drivers, each counting for its row."""
    return pytest.mark.parametrize("backend", [
        pytest.param("mariadb", marks=pytest.mark.compat(MARIADB_ROW, *aspects), id="mariadb"),
        pytest.param("postgresql", marks=pytest.mark.compat(POSTGRES_ROW, *aspects), id="postgresql"),
    ], indirect=True)


@pytest.fixture(scope="module", autouse=True)
def active():
    greenify.greenify()


@pytest.fixture
def backend(request, pyodbc) -> Backend:
    if request.param == "mariadb":
        return mariadb_backend(request.getfixturevalue("mariadb"))
    return postgres_backend(request.getfixturevalue("postgres"))


@pytest.fixture
def patched_on_load(backend):
    """The call a user writes, undone afterwards: the slots it wrote are put back."""
    handle = greenify.patch_on_load(backend.client_library)
    try:
        yield handle
    finally:
        handle.cancel()
        for report in handle.reports:
            greenify.patching.patcher.unpatch_report(report)


def sleeper(pyodbc, backend: Backend, sleep_s: float = SLEEP_S):
    def query(index: int):
        connection = pyodbc.connect(backend.connection_string)
        try:
            return [tuple(row) for row in connection.cursor().execute(backend.sleep(sleep_s), index).fetchall()]
        finally:
            connection.close()
    return query


def expected_rows(backend: Backend, count: int):
    return [[(index, backend.slept)] for index in range(count)]


def assert_together(elapsed: float, count: int) -> None:
    assert elapsed < TOGETHER_BOUND_S, (
        f"{count} patched sleeps of {SLEEP_S} s took {elapsed:.2f} s (serial: {count * SLEEP_S:.1f} s)")


# --- loaded at connect time --------------------------------------------------------

ON_LOAD_SCRIPT = """
import json, subprocess, sys, time
import gevent, greenify
from greenify.patching import loaded
connection_string, client_library, sql, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
greenify.greenify()
handle = greenify.patch_on_load(client_library)
import pyodbc
loaded_at_import = [obj.path for obj in loaded.match_name(client_library)]

def query(index):
    connection = pyodbc.connect(connection_string)
    try:
        return [list(row) for row in connection.cursor().execute(sql, index).fetchall()]
    finally:
        connection.close()

started = time.monotonic()
greenlets = [gevent.spawn(query, index) for index in range(count)]
gevent.joinall(greenlets, raise_error=True)
elapsed = time.monotonic() - started
inspected = subprocess.run([sys.executable, "-m", "greenify.tools.inspector", "--json", "--pid", str(__import__("os").getpid())],
                           capture_output=True, text=True, timeout=60)
print(json.dumps({"loaded_at_import": loaded_at_import, "elapsed": elapsed,
                  "rows": [glet.value for glet in greenlets],
                  "patched_on_load": [obj.path for report in handle.reports for obj in report.objects
                                      if obj.patched],
                  "inspect_recommends": json.loads(inspected.stdout)["patch_library"]}))
"""


@backends()
def test_the_client_library_is_patched_when_unixodbc_loads_the_driver_at_connect_time(backend):
    result = subprocess.run([sys.executable, "-c", ON_LOAD_SCRIPT, backend.connection_string,
                             backend.client_library, backend.sleep(SLEEP_S), str(COUNT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["loaded_at_import"] == [], f"{backend.client_library} was loaded by `import pyodbc` already: {run}"
    assert any(backend.client_library in path for path in run["patched_on_load"]), run
    assert run["rows"] == [[[index, backend.slept]] for index in range(COUNT)]
    assert run["elapsed"] < TOGETHER_BOUND_S, run
    # greenify-inspect --pid of a process that has connected names the same library
    assert any(name.startswith(backend.client_library) for name in run["inspect_recommends"]), run


@backends()
def test_patched_10_sleeps_finish_together_with_the_rows_of_stock(pyodbc, backend, patched_on_load):
    elapsed, rows = run_together(sleeper(pyodbc, backend), COUNT)
    assert rows == expected_rows(backend, COUNT)
    assert_together(elapsed, COUNT)


@backends()
def test_unpatched_sleeps_run_one_after_another(pyodbc, backend):
    elapsed, rows = run_together(sleeper(pyodbc, backend), UNPATCHED)
    assert rows == expected_rows(backend, UNPATCHED)
    assert_serial(elapsed, UNPATCHED, SLEEP_S, f"ODBC {backend.name} sleeps")


@backends()
def test_patching_the_odbc_driver_file_itself_patches_nothing(pyodbc, backend):
    sleeper(pyodbc, backend, 0)(0)  # loaded now
    driver_path = backend.connection_string.split(";")[0].split("=", 1)[1]
    with greenify.patched(driver_path) as report:
        assert not report, f"the driver imports blocking calls after all: {report!r}"


# --- timeouts, kills and faults --------------------------------------------------------

def fresh_query_works(pyodbc, backend: Backend) -> None:
    assert sleeper(pyodbc, backend, 0)(7) == [(7, backend.slept)]


@backends()
def test_a_timeout_in_a_sleep_raises_itself_at_once(pyodbc, backend, patched_on_load):
    connection = pyodbc.connect(backend.connection_string)
    cursor = connection.cursor()
    raised, timeout, took = interrupted_by_timeout(lambda: cursor.execute(backend.sleep(LONG_WAIT_S), 0))
    # pyodbc decodes the driver's message with a Python codec on its way
    # out: the timeout must not fire (and be swallowed) there, but here,
    # with the driver's own error as its context.
    assert raised is timeout
    assert isinstance(raised.__context__, pyodbc.Error), repr(raised.__context__)
    assert took < INTERRUPT_BOUND_S
    with contextlib.suppress(pyodbc.Error):
        connection.close()
    fresh_query_works(pyodbc, backend)


@backends()
def test_a_greenlet_killed_in_a_sleep_ends_at_once(pyodbc, backend, patched_on_load):
    connection = pyodbc.connect(backend.connection_string)
    cursor = connection.cursor()
    assert killed_while_waiting(lambda: cursor.execute(backend.sleep(LONG_WAIT_S), 0)) < INTERRUPT_BOUND_S
    with contextlib.suppress(pyodbc.Error):
        connection.close()
    fresh_query_works(pyodbc, backend)


@backends()
def test_connections_ended_by_the_server_fail_each_waiter_promptly(pyodbc, backend, patched_on_load):
    connections = [pyodbc.connect(backend.connection_string, autocommit=True) for _ in range(WAITERS)]
    ids = [connection.cursor().execute(backend.session_id_sql).fetchone()[0] for connection in connections]

    def wait(index: int):
        try:
            connections[index].cursor().execute(backend.sleep(LONG_WAIT_S), index).fetchall()
            return time.monotonic(), None
        except pyodbc.Error as exc:
            return time.monotonic(), exc

    def end_them():
        admin = pyodbc.connect(backend.connection_string, autocommit=True)
        try:
            cursor = admin.cursor()
            deadline = time.monotonic() + 10
            while cursor.execute(backend.running_sleeps_sql).fetchone()[0] < WAITERS:
                assert time.monotonic() < deadline, f"fewer than {WAITERS} sleeps running after 10 s"
                gevent.sleep(0.05)
            backend.terminate(cursor, ids)
        finally:
            admin.close()
        return time.monotonic()

    outcomes = faulted_waiters(wait, end_them)
    assert all(isinstance(error, pyodbc.Error) for _, error in outcomes), outcomes
    for connection in connections:
        with contextlib.suppress(pyodbc.Error):
            connection.close()
    fresh_query_works(pyodbc, backend)


# --- asyncio: awaited through greenify.asyncio.run --------------------------------------

@backends("asyncio")
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_under_asyncio_10_sleeps_finish_together_and_a_timeout_ends_one_at_once(pyodbc, backend, patched_on_load,
                                                                                loop_kind):
    import asyncio
    new_loop = asyncio.new_event_loop
    if loop_kind == "uvloop":
        new_loop = servers.require_module("uvloop", "uvloop").new_event_loop
    query = sleeper(pyodbc, backend)
    slow = sleeper(pyodbc, backend, LONG_WAIT_S)

    async def main():
        started = time.monotonic()
        rows = await asyncio.gather(*(gasyncio.run(query, index) for index in range(COUNT)))
        elapsed = time.monotonic() - started
        timeout_at = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gasyncio.run(slow, 0), 0.3)
        return elapsed, rows, time.monotonic() - timeout_at - 0.3

    elapsed, rows, late = run_on(new_loop, main)
    assert rows == expected_rows(backend, COUNT)
    assert_together(elapsed, COUNT)
    assert late < INTERRUPT_BOUND_S, f"the TimeoutError came {late:.2f} s after the timeout"
    fresh_query_works(pyodbc, backend)
