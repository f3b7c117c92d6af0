"""psycopg 3 (``psycopg[binary]``) against the session's PostgreSQL.

Where psycopg 3 waits: libpq runs non-blocking under it, and the waiting is
done by ``psycopg.waiting.wait``, chosen when psycopg is imported.  With the
compiled module loaded and ``select`` not monkey-patched by gevent, that is
``wait_c``: Cython code in ``psycopg_binary/_psycopg.so`` that calls libc's
``poll()`` itself, with the GIL released.  So patching libpq alone leaves it
serial (the issue measured 3.07 s for 10 x 0.3 s); patching the compiled
module, ``greenify.patch_library(psycopg._cmodule._psycopg)``, points its
``poll`` and, following DT_NEEDED, the bundled libpq's calls at the twins.

Under ``gevent.monkey.patch_all()`` *before* psycopg is imported, psycopg
picks ``wait_poll`` on gevent's ``select.poll`` and is cooperative without
greenify; monkey-patched after the import it keeps ``wait_c`` and is serial
(`test_monkey_patching_*`).  The patch covers both orders.

An interrupted call in wait_c: the green poll answers the interrupted wait
with 0 (a timeout, which wait_c takes for its 0.1 s tick) and the next poll
with -1/ETIMEDOUT, which takes wait_c back to Python, where the interruption
is delivered (csrc/wait/green_wait.c, green_interrupted_readiness).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gevent
import pytest

import greenify
import greenify.asyncio as gasyncio
from tests.support import children_env, module_command, servers
from tests.support.client_support import patched_as_recommended
from tests.support.fault_support import INTERRUPT_BOUND_S, LONG_WAIT_S
from tests.wait.test_asyncio import run_on
from tests.drivers.test_driver_faults import WAITERS, faulted_waiters, interrupted_by_timeout, killed_while_waiting
from tests.drivers.test_drivers import UNPATCHED, assert_serial, run_together

pytestmark = pytest.mark.compat("psycopg")

COUNT = 10
SLEEP_S = 0.3
# Serial, 10 x 0.3 s take 3 s; together about one sleep plus connecting.
TOGETHER_BOUND_S = 1.5


@pytest.fixture(scope="module", autouse=True)
def active():
    greenify.greenify()


@pytest.fixture
def patched_psycopg(psycopg_c_module):
    """The call a user writes: the compiled module, its DT_NEEDED libpq with it."""
    with greenify.patched(psycopg_c_module) as report:
        assert report, repr(report)
        yield report


def sleeper(psycopg, postgres, sleep_s: float = SLEEP_S):
    def query(index: int):
        with psycopg.connect(postgres.dsn) as connection:
            return connection.execute("SELECT %s, pg_sleep(%s)::text", (index, sleep_s)).fetchall()
    return query


def expected_rows(count: int):
    return [[(index, "")] for index in range(count)]


def assert_together(elapsed: float, count: int) -> None:
    assert elapsed < TOGETHER_BOUND_S, (
        f"{count} patched pg_sleep({SLEEP_S}) took {elapsed:.2f} s (serial: {count * SLEEP_S:.1f} s)")


# --- where it waits --------------------------------------------------------------

def test_psycopg_waits_in_wait_c_whose_poll_is_the_compiled_modules_own_import(psycopg, psycopg_c_module):
    assert psycopg.waiting.wait is psycopg_c_module.wait_c, (
        f"psycopg chose {psycopg.waiting.wait.__name__}: is select monkey-patched, or PSYCOPG_WAIT_FUNC set?")
    module_path = os.path.realpath(psycopg_c_module.__file__)
    with greenify.patched(psycopg_c_module) as report:
        own = [obj for obj in report.objects if os.path.realpath(obj.path) == module_path]
        libpq = [obj for obj in report.objects if os.path.basename(obj.path).startswith("libpq")]
    assert own and {slot.symbol for slot in own[0].patched} == {"poll"}, repr(report)
    assert libpq and {"connect", "recv", "send"} <= {slot.symbol for slot in libpq[0].patched}, repr(report)


def test_unpatched_psycopg_sleeps_run_one_after_another(psycopg, postgres):
    elapsed, rows = run_together(sleeper(psycopg, postgres), UNPATCHED)
    assert rows == expected_rows(UNPATCHED)
    assert_serial(elapsed, UNPATCHED, SLEEP_S, "psycopg pg_sleep")


def test_patching_libpq_alone_leaves_psycopg_serial_as_its_wait_is_not_in_libpq(psycopg, postgres,
                                                                                psycopg_c_module):
    with greenify.patched("libpq") as report:
        assert report, repr(report)
        elapsed, rows = run_together(sleeper(psycopg, postgres), UNPATCHED)
    assert rows == expected_rows(UNPATCHED)
    assert_serial(elapsed, UNPATCHED, SLEEP_S, "psycopg pg_sleep with libpq alone patched")


def test_patched_psycopg_10_sleeps_finish_together_with_the_rows_of_stock(psycopg, postgres, patched_psycopg):
    query = sleeper(psycopg, postgres)
    elapsed, rows = run_together(query, COUNT)
    assert rows == expected_rows(COUNT)
    assert_together(elapsed, COUNT)


def test_patch_all_patches_psycopgs_own_wait_and_its_sleeps_finish_together(psycopg, postgres, psycopg_c_module):
    """patch_all()'s rule takes a driver that waits in poll on the sockets of
    a network client it needs (_psycopg.so over libpq), not libpq alone."""
    report = greenify.patch_all()
    try:
        assert any("_psycopg" in path for path in report.patched_paths), str(report)
        elapsed, rows = run_together(sleeper(psycopg, postgres), COUNT)
    finally:
        greenify.unpatch_all()
    assert rows == expected_rows(COUNT)
    assert_together(elapsed, COUNT)


def test_patched_psycopg_copy_and_server_side_cursor_return_the_rows_of_stock(psycopg, postgres, psycopg_c_module):
    def work(index: int):
        with psycopg.connect(postgres.dsn) as connection:
            with connection.cursor() as cursor:
                cursor.execute("CREATE TEMP TABLE copied (id integer, label text)")
                with cursor.copy("COPY copied FROM STDIN") as copy:
                    for row in range(5000):
                        copy.write_row((row, f"label {row} {'x' * (row % 97)} {index}"))
                copied = cursor.execute("SELECT count(*), sum(length(label)) FROM copied").fetchone()
            with connection.cursor(name="server_side") as named:
                named.itersize = 100
                named.execute("SELECT id FROM copied ORDER BY id")
                ids = [row for row, in named]
            return copied, ids[:3], len(ids)

    stock = work(0)
    with greenify.patched(psycopg_c_module):
        _, results = run_together(work, 5)
    assert results[0] == stock and all(result[2] == 5000 for result in results), results


MONKEY_SCRIPT = """
import json, sys, time
from gevent import monkey
if sys.argv[2] == "before":
    monkey.patch_all()
import psycopg
if sys.argv[2] == "after":
    monkey.patch_all()
import gevent

def query(index):
    with psycopg.connect(sys.argv[1]) as connection:
        return connection.execute("SELECT %s, pg_sleep(0.3)::text", (index,)).fetchone()[0]

started = time.monotonic()
greenlets = [gevent.spawn(query, index) for index in range(int(sys.argv[3]))]
gevent.joinall(greenlets, raise_error=True)
print(json.dumps({"wait": psycopg.waiting.wait.__name__, "elapsed": time.monotonic() - started,
                  "rows": [glet.value for glet in greenlets]}))
"""


def monkey_patched_run(postgres, order: str, count: int) -> dict:
    """Run MONKEY_SCRIPT without greenify: gevent.monkey.patch_all() `order`
    ("before"/"after") psycopg's import, `count` pg_sleep(0.3) in greenlets."""
    result = subprocess.run([sys.executable, "-c", MONKEY_SCRIPT, postgres.dsn, order, str(count)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_monkey_patching_before_the_import_makes_psycopg_cooperative_without_greenify(postgres, psycopg):
    run = monkey_patched_run(postgres, "before", COUNT)
    assert run["wait"] == "wait_poll" and run["rows"] == list(range(COUNT))
    assert run["elapsed"] < TOGETHER_BOUND_S, run


def test_monkey_patching_after_the_import_leaves_psycopg_in_wait_c_and_serial(postgres, psycopg_c_module):
    run = monkey_patched_run(postgres, "after", UNPATCHED)
    assert run["wait"] == "wait_c" and run["rows"] == list(range(UNPATCHED))
    assert run["elapsed"] >= UNPATCHED * SLEEP_S, run


# --- timeouts, kills and faults --------------------------------------------------------

def fresh_query_works(psycopg, postgres) -> None:
    with psycopg.connect(postgres.dsn) as connection:
        assert connection.execute("SELECT 42").fetchone() == (42,)


def test_a_timeout_in_pg_sleep_raises_itself_at_once(psycopg, postgres, patched_psycopg):
    connection = psycopg.connect(postgres.dsn)
    raised, timeout, took = interrupted_by_timeout(lambda: connection.execute(f"SELECT pg_sleep({LONG_WAIT_S})"))
    assert raised is timeout
    assert took < INTERRUPT_BOUND_S
    connection.close()
    fresh_query_works(psycopg, postgres)


def test_a_greenlet_killed_in_pg_sleep_ends_at_once(psycopg, postgres, patched_psycopg):
    connection = psycopg.connect(postgres.dsn)
    assert killed_while_waiting(lambda: connection.execute(f"SELECT pg_sleep({LONG_WAIT_S})")) < INTERRUPT_BOUND_S
    connection.close()
    fresh_query_works(psycopg, postgres)


def pg_sleep_on(psycopg, connection):
    """A waiter: pg_sleep(LONG_WAIT_S); returns (when it ended, its error)."""
    try:
        connection.execute(f"SELECT pg_sleep({LONG_WAIT_S})")
        return time.monotonic(), None
    except psycopg.Error as exc:
        return time.monotonic(), exc


def wait_until_sleeping(psycopg, postgres, count: int) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity "
                            "WHERE query LIKE 'SELECT pg_sleep(%%'").fetchone()[0] < count:
            assert time.monotonic() < deadline, f"fewer than {count} pg_sleep running after 10 s"
            gevent.sleep(0.05)


def test_pg_terminate_backend_fails_each_waiter_promptly(psycopg, postgres, patched_psycopg):
    connections = [psycopg.connect(postgres.dsn) for _ in range(WAITERS)]
    pids = [connection.info.backend_pid for connection in connections]

    def terminate():
        wait_until_sleeping(psycopg, postgres, WAITERS)
        with psycopg.connect(postgres.dsn, autocommit=True) as admin:
            assert admin.execute("SELECT bool_and(pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid",
                                 (pids,)).fetchone() == (True,)
        return time.monotonic()

    outcomes = faulted_waiters(lambda index: pg_sleep_on(psycopg, connections[index]), terminate)
    assert all(isinstance(error, psycopg.OperationalError) for _, error in outcomes), outcomes
    for connection in connections:
        connection.close()
    fresh_query_works(psycopg, postgres)


@pytest.fixture
def own_postgres():
    """A PostgreSQL for this test alone, so that it may be killed."""
    yield from servers.serve(servers.start_postgres)


def test_a_killed_postgres_fails_each_waiter_promptly(psycopg, own_postgres, patched_psycopg):
    connections = [psycopg.connect(own_postgres.dsn) for _ in range(WAITERS)]

    def kill_server():
        wait_until_sleeping(psycopg, own_postgres, WAITERS)
        os.kill(own_postgres.process.pid, signal.SIGKILL)  # the postmaster: its backends follow
        return time.monotonic()

    outcomes = faulted_waiters(lambda index: pg_sleep_on(psycopg, connections[index]), kill_server)
    assert all(isinstance(error, psycopg.OperationalError) for _, error in outcomes), outcomes


# --- asyncio: the sync driver awaited through greenify.asyncio.run ---------------------------

def asyncio_loop(kind: str):
    import asyncio
    return servers.require_module("uvloop", "uvloop").new_event_loop if kind == "uvloop" else asyncio.new_event_loop


@pytest.mark.compat("psycopg", "asyncio")
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_under_asyncio_10_sleeps_finish_together(psycopg, postgres, patched_psycopg, loop_kind):
    import asyncio
    query = sleeper(psycopg, postgres)

    async def main():
        started = time.monotonic()
        rows = await asyncio.gather(*(gasyncio.run(query, index) for index in range(COUNT)))
        return time.monotonic() - started, rows

    elapsed, rows = run_on(asyncio_loop(loop_kind), main)
    assert rows == expected_rows(COUNT)
    assert_together(elapsed, COUNT)


@pytest.mark.compat("psycopg", "asyncio")
def test_under_asyncio_a_timeout_ends_a_pg_sleep_at_once(psycopg, postgres, patched_psycopg):
    import asyncio
    connection = psycopg.connect(postgres.dsn)

    async def main():
        timeout_at = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gasyncio.run(connection.execute, f"SELECT pg_sleep({LONG_WAIT_S})"), 0.3)
        return time.monotonic() - timeout_at - 0.3

    try:
        late = run_on(asyncio_loop("asyncio"), main)
    finally:
        connection.close()
    assert late < INTERRUPT_BOUND_S, f"the TimeoutError came {late:.2f} s after the timeout"


def test_what_greenify_inspect_recommends_for_psycopg_makes_it_concurrent(psycopg, postgres, psycopg_c_module):
    with patched_as_recommended("psycopg") as names:
        elapsed, rows = run_together(sleeper(psycopg, postgres), COUNT)
    assert any(name.startswith("_psycopg") for name in names), names
    assert rows == expected_rows(COUNT)
    assert_together(elapsed, COUNT)


# --- psycopg[c]: the implementation built from source, against Debian's libpq ---------

def impl_run(postgres, impl: str, scenario: str, count: int = COUNT) -> dict:
    """tests/support/psycopg_impl_child.py with PSYCOPG_IMPL=impl."""
    result = subprocess.run(module_command("tests.support.psycopg_impl_child", scenario, postgres.dsn, str(count)),
                            capture_output=True, text=True, timeout=120,
                            env={**children_env(), "PSYCOPG_IMPL": impl})
    assert result.returncode == 0, f"{impl} {scenario}: {result.stderr[-4000:]}"
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["impl"] == impl and found["wait"] == "wait_c", found
    return found


@pytest.fixture(scope="module")
def psycopg_c_built(psycopg):
    """psycopg[c] installed: psycopg_c, compiled on this machine against the system's libpq."""
    import importlib.util
    if importlib.util.find_spec("psycopg_c") is None:
        servers.missing("psycopg_c is not installed: pip install 'psycopg[c]' (and apt-get install libpq-dev "
                        "gcc to build it)")


@pytest.mark.compat("psycopg[c]")
def test_psycopg_c_waits_in_its_own_wait_c_over_the_systems_libpq_and_unpatched_is_serial(postgres,
                                                                                        psycopg_c_built):
    found = impl_run(postgres, "c", "unpatched", UNPATCHED)
    assert "psycopg_c" in found["module"], found
    assert found["libpq"] and all(path.startswith(("/usr/lib", "/lib")) for path in found["libpq"]), found
    assert found["rows"] == [[[index, ""]] for index in range(UNPATCHED)]
    assert_serial(found["elapsed"], UNPATCHED, SLEEP_S, "psycopg[c] pg_sleep")


@pytest.mark.compat("psycopg[c]")
@pytest.mark.parametrize("scenario", ["patch_library", "recommended", "patch_all"])
def test_psycopg_c_patched_sleeps_finish_together_and_a_timeout_ends_one_at_once(postgres, psycopg_c_built,
                                                                                  scenario):
    """The same call as for psycopg[binary]: the compiled module (its poll),
    and the libpq it needs (here Debian's libpq.so.5) with it."""
    found = impl_run(postgres, "c", scenario)
    assert any("psycopg_c" in path for path in found["patched"]), found
    assert any("libpq" in os.path.basename(path) for path in found["patched"]), found
    assert found["rows"] == [[[index, ""]] for index in range(COUNT)]
    assert_together(found["elapsed"], COUNT)
    assert found["timeout_late"] < INTERRUPT_BOUND_S, found
    if scenario == "recommended":
        assert any(name.startswith("_psycopg") or "psycopg_c" in name for name in found["names"]), found
