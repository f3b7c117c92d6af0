"""The interpreter in which tests/drivers/test_clients_psycopg3.py runs a
scenario with one of psycopg 3's compiled implementations, printing what it
found as one JSON line:

    PSYCOPG_IMPL=c python -m tests.support.psycopg_impl_child SCENARIO DSN COUNT

Why a child: psycopg picks its implementation (``c``: psycopg_c, built from
source against the system's libpq; ``binary``: psycopg_binary, with the
libpq its wheel bundles) once, when it is imported, from PSYCOPG_IMPL; the
test session has imported the binary one.

SCENARIO: ``unpatched``, ``patch_library`` (the compiled module, as
greenify-inspect recommends), ``recommended`` (each name ``greenify-inspect
--import psycopg`` recommends, read in this child), or ``patch_all``.
"""
import json
import os
import subprocess
import sys
import time

import gevent

import greenify
import psycopg

SLEEP_S = 0.3
TIMEOUT_S = 0.2
LONG_SLEEP_S = 5


def sleeps(dsn: str, count: int):
    def query(index: int):
        with psycopg.connect(dsn) as connection:
            return connection.execute("SELECT %s, pg_sleep(%s)::text", (index, SLEEP_S)).fetchall()

    started = time.monotonic()
    greenlets = [gevent.spawn(query, index) for index in range(count)]
    gevent.joinall(greenlets, raise_error=True)
    return time.monotonic() - started, [[list(row) for row in greenlet.value] for greenlet in greenlets]


def timed_out(dsn: str) -> float:
    """How long after its deadline a gevent.Timeout ended a long pg_sleep."""
    connection = psycopg.connect(dsn)
    try:
        started = time.monotonic()
        try:
            with gevent.Timeout(TIMEOUT_S):
                connection.execute(f"SELECT pg_sleep({LONG_SLEEP_S})")
        except gevent.Timeout:
            return time.monotonic() - started - TIMEOUT_S
        return float("inf")
    finally:
        connection.close()


def recommended() -> list:
    result = subprocess.run([sys.executable, "-m", "greenify.tools.inspector", "--json", "--import", "psycopg"],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)["patch_library"]


def main(scenario: str, dsn: str, count: int) -> dict:
    module = psycopg._cmodule._psycopg
    found = {"impl": psycopg.pq.__impl__, "module": module.__file__ if module else None,
             "libpq": sorted({line.split()[-1] for line in open("/proc/self/maps") if "libpq" in line}),
             "wait": psycopg.waiting.wait.__name__}
    greenify.greenify()
    if scenario == "patch_library":
        found["patched"] = [obj.path for obj in greenify.patch_library(module).objects]
    elif scenario == "recommended":
        found["names"] = recommended()
        found["patched"] = [obj.path for name in found["names"] for obj in greenify.patch_library(name).objects]
    elif scenario == "patch_all":
        found["patched"] = greenify.patch_all().patched_paths
    found["elapsed"], found["rows"] = sleeps(dsn, count)
    if scenario != "unpatched":
        found["timeout_late"] = timed_out(dsn)
    return found


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
