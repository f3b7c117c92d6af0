"""The interpreter in which tests/drivers/test_clients_mysql_connector.py runs each
scenario of mysql-connector-python's C extension, printing what it found as
one JSON line:

    python -m tests.support.mysql_connector_child SCENARIO '{"host": ..., "port": ..., "user": ..., ...}'

Why a child: the wheel links its MySQL client library statically into
``_mysql_connector.so`` and needs the OpenSSL 3.2+ it bundles in
``mysql/vendor`` (found through RUNPATH ``$ORIGIN/mysql/vendor``).  Once
Python's ``ssl`` module has loaded an older system ``libssl.so.3`` (Debian
12's 3.0, as the test session has), the extension no longer loads
("version `OPENSSL_3.2.0' not found") and ``mysql.connector`` silently falls
back to pure Python.  Here ``_mysql_connector`` is imported first.
"""
import _mysql_connector  # noqa: I001 - first: before anything loads the system's libssl.so.3

import asyncio
import json
import os
import sys
import time

import gevent

import greenify
import greenify.asyncio as gasyncio
import mysql.connector
from tests.support import servers
from tests.support.fault_support import LONG_WAIT_S, Ticker

SLEEP_S = 0.3
WAITERS = 20


def connect(server: dict):
    return mysql.connector.connect(use_pure=False, **server)


def sleeper(server: dict, sleep_s: float = SLEEP_S):
    def query(index: int):
        connection = connect(server)
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT %s, SLEEP(%s)", (index, sleep_s))
            return [list(row) for row in cursor.fetchall()]
        finally:
            connection.close()
    return query


def together(function, count: int) -> dict:
    started = time.monotonic()
    rows = servers.join_all([gevent.spawn(function, index) for index in range(count)])
    return {"elapsed": time.monotonic() - started, "rows": rows}


def fresh_query_works(server: dict) -> bool:
    return sleeper(server, 0)(7) == [[7, 0]]


def scenario_unpatched(server: dict, count: int) -> dict:
    return together(sleeper(server), count)


def scenario_patched(server: dict, count: int) -> dict:
    with greenify.patched(_mysql_connector) as report:
        own = [obj for obj in report.objects if obj.path.endswith(_mysql_connector.__file__.rsplit("/", 1)[-1])]
        result = together(sleeper(server), count)
    return {**result, "own_symbols": sorted(slot.symbol for obj in own for slot in obj.patched),
            "connection_class": type(connect(server)).__name__}


def scenario_recommended(server: dict, count: int) -> dict:
    import subprocess
    inspected = subprocess.run([sys.executable, "-m", "greenify.tools.inspector", "--json", "--import",
                                "_mysql_connector", "mysql.connector"], capture_output=True, text=True, timeout=120)
    names = json.loads(inspected.stdout)["patch_library"]
    reports = [greenify.patch_library(name) for name in names]
    try:
        return {**together(sleeper(server), count), "names": names}
    finally:
        for report in reports:
            greenify.patching.patcher.unpatch_report(report)


def scenario_timeout(server: dict, count: int) -> dict:
    with greenify.patched(_mysql_connector):
        connection = connect(server)
        cursor = connection.cursor()
        started = time.monotonic()
        try:
            with gevent.Timeout(0.2) as timeout:
                cursor.execute(f"SELECT SLEEP({LONG_WAIT_S})")
            raised = None
        except BaseException as exc:  # noqa: BLE001 - what was raised is the finding
            raised = exc
        took = time.monotonic() - started
        try:
            connection.close()
        except mysql.connector.Error:
            pass
        return {"raised_is_timeout": raised is timeout, "raised": repr(raised), "took": took,
                "context": type(getattr(raised, "__context__", None)).__name__, "fresh": fresh_query_works(server)}


def scenario_kill(server: dict, count: int) -> dict:
    with greenify.patched(_mysql_connector):
        connection = connect(server)
        cursor = connection.cursor()
        waiting = gevent.spawn(cursor.execute, f"SELECT SLEEP({LONG_WAIT_S})")
        gevent.sleep(0.3)
        was_waiting = not waiting.ready()
        started = time.monotonic()
        waiting.kill(block=True, timeout=LONG_WAIT_S)
        took = time.monotonic() - started
        return {"was_waiting": was_waiting, "took": took,
                "ended_with": type(waiting.value).__name__, "fresh": fresh_query_works(server)}


def scenario_fault(server: dict, count: int) -> dict:
    """WAITERS long sleeps; an admin connection KILLs each one's connection."""
    with greenify.patched(_mysql_connector):
        connections = [connect(server) for _ in range(WAITERS)]
        ids = [connection.connection_id for connection in connections]

        def wait(index: int):
            try:
                cursor = connections[index].cursor()
                cursor.execute(f"SELECT SLEEP({LONG_WAIT_S})")
                cursor.fetchall()
                return time.monotonic(), None
            except mysql.connector.Error as exc:
                return time.monotonic(), type(exc).__name__

        ticker = Ticker()
        since = time.monotonic()
        greenlets = [gevent.spawn(wait, index) for index in range(WAITERS)]
        admin = connect(server)
        cursor = admin.cursor()
        deadline = time.monotonic() + 10
        while True:
            cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(%'")
            if cursor.fetchone()[0] >= WAITERS or time.monotonic() > deadline:
                break
            gevent.sleep(0.05)
        for session_id in ids:
            cursor.execute(f"KILL CONNECTION {int(session_id)}")
        fault_at = time.monotonic()
        admin.close()
        outcomes = servers.join_all(greenlets)
        until = time.monotonic()
        ticker.stop()
        return {"errors": [error for _, error in outcomes], "last_after_fault": max(end for end, _ in outcomes) - fault_at,
                "hub_gap": ticker.longest_gap(since, until), "fresh": fresh_query_works(server)}


def scenario_asyncio(server: dict, count: int) -> dict:
    loops = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
        loops["uvloop"] = uvloop.new_event_loop
    except ImportError:
        pass
    if os.environ.get("CHILD_LOOPS"):
        loops = {name: loops[name] for name in os.environ["CHILD_LOOPS"].split(",")}
    query, slow = sleeper(server), sleeper(server, LONG_WAIT_S)

    async def main():
        started = time.monotonic()
        rows = await asyncio.gather(*(gasyncio.run(query, index) for index in range(count)))
        elapsed = time.monotonic() - started
        timeout_at = time.monotonic()
        try:
            await asyncio.wait_for(gasyncio.run(slow, 0), 0.3)
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        return {"elapsed": elapsed, "rows": rows, "timed_out": timed_out,
                "late": time.monotonic() - timeout_at - 0.3}

    results = {}
    with greenify.patched(_mysql_connector):
        for name, new_loop in loops.items():
            loop = new_loop()
            try:
                results[name] = loop.run_until_complete(main())
            finally:
                loop.close()
    return {"loops": results, "fresh": fresh_query_works(server)}


def main() -> None:
    scenario, server, count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    greenify.greenify()
    result = globals()[f"scenario_{scenario}"](server, count)
    print(json.dumps({"have_cext": mysql.connector.HAVE_CEXT, **result}))


if __name__ == "__main__":
    main()
