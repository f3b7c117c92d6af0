"""mysql-connector-python's C extension (``use_pure=False``) against the
session's MariaDB.

What is new: the wheel has no client library to name.  Its MySQL client is
linked statically into the extension module ``_mysql_connector.so`` itself,
whose own imports are the blocking calls (``connect``, ``recv``, ``send``,
``ppoll``, ``getaddrinfo``); the wheel's ``mysql/vendor`` folder holds only
OpenSSL and plugins.  The call a user writes is

    import _mysql_connector            # before anything imports ssl (below)
    greenify.patch_library(_mysql_connector)

The extension needs the OpenSSL >= 3.2 it bundles; once Python's ``ssl`` has
loaded an older system ``libssl.so.3`` (Debian 12's 3.0) it no longer loads
and ``mysql.connector`` silently uses its pure-Python protocol (gevent's
monkey-patched sockets serve that one).  The test session has loaded the
system OpenSSL long before, so each scenario runs in a child interpreter
that imports ``_mysql_connector`` first (tests/support/mysql_connector_child.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import children_env, module_command

from tests.support import servers
from tests.support.fault_support import FAULT_BOUND_S, INTERRUPT_BOUND_S
from tests.drivers.test_driver_faults import TICKER_GAP_BOUND_S
from tests.drivers.test_drivers import UNPATCHED

pytestmark = pytest.mark.compat("mysql.connector (C extension)")

COUNT = 10
SLEEP_S = 0.3
TOGETHER_BOUND_S = 1.5  # serial, 10 x 0.3 s take 3 s


@pytest.fixture(scope="module")
def connector_c_extension():
    """Skips (fails under GREENIFY_REQUIRE_SERVERS=1) unless a fresh
    interpreter loads mysql-connector-python's C extension."""
    probe = subprocess.run([sys.executable, "-c", "import _mysql_connector, mysql.connector; "
                            "print(mysql.connector.HAVE_CEXT)"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.strip() != "True":
        servers.missing("mysql-connector-python's C extension does not load: pip install mysql-connector-python "
                        f"({(probe.stderr.strip().splitlines() or ['HAVE_CEXT is False'])[-1]})")


def run_child(scenario: str, mariadb, count: int = COUNT) -> dict:
    server = dict(host=mariadb.host, port=mariadb.port, user=mariadb.user, password=mariadb.password,
                  database=mariadb.database)
    result = subprocess.run(module_command("tests.support.mysql_connector_child", scenario, json.dumps(server),
                                           str(count)), capture_output=True, text=True, timeout=120, env=children_env())
    assert result.returncode == 0, f"{scenario}: {result.stderr[-4000:]}"
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["have_cext"] is True, found
    return found


def expected_rows(count: int):
    return [[[index, 0]] for index in range(count)]


def test_unpatched_c_extension_sleeps_run_one_after_another(mariadb, connector_c_extension):
    run = run_child("unpatched", mariadb, UNPATCHED)
    assert run["rows"] == expected_rows(UNPATCHED)
    assert run["elapsed"] >= UNPATCHED * SLEEP_S, run


def test_patched_extension_module_runs_10_sleeps_together_with_the_rows_of_stock(mariadb, connector_c_extension):
    run = run_child("patched", mariadb)
    assert run["connection_class"] == "CMySQLConnection", run
    assert {"connect", "recv", "send", "ppoll"} <= set(run["own_symbols"]), run
    assert run["rows"] == expected_rows(COUNT)
    assert run["elapsed"] < TOGETHER_BOUND_S, run


def test_what_greenify_inspect_recommends_makes_it_concurrent(mariadb, connector_c_extension):
    run = run_child("recommended", mariadb)
    assert any(name.startswith("_mysql_connector") for name in run["names"]), run
    assert run["rows"] == expected_rows(COUNT)
    assert run["elapsed"] < TOGETHER_BOUND_S, run


def test_a_timeout_in_a_sleep_raises_itself_at_once_with_the_drivers_error_as_context(mariadb,
                                                                                     connector_c_extension):
    run = run_child("timeout", mariadb)
    assert run["raised_is_timeout"], run
    assert run["context"] in ("MySQLInterfaceError", "OperationalError", "DatabaseError"), run
    assert run["took"] < INTERRUPT_BOUND_S and run["fresh"], run


def test_a_greenlet_killed_in_a_sleep_ends_at_once(mariadb, connector_c_extension):
    run = run_child("kill", mariadb)
    assert run["was_waiting"] and run["ended_with"] == "GreenletExit", run
    assert run["took"] < INTERRUPT_BOUND_S and run["fresh"], run


def test_connections_killed_by_the_server_fail_each_waiter_promptly_while_the_hub_runs(mariadb,
                                                                                      connector_c_extension):
    run = run_child("fault", mariadb)
    assert run["errors"] and all(error is not None for error in run["errors"]), run
    assert run["last_after_fault"] < FAULT_BOUND_S, run
    assert run["hub_gap"] < TICKER_GAP_BOUND_S and run["fresh"], run


@pytest.mark.compat("mysql.connector (C extension)", "asyncio")
def test_under_asyncio_10_sleeps_finish_together_and_a_timeout_ends_one_at_once(mariadb, connector_c_extension):
    run = run_child("asyncio", mariadb)
    assert run["loops"], run
    for loop, found in run["loops"].items():
        assert found["rows"] == expected_rows(COUNT), loop
        assert found["elapsed"] < TOGETHER_BOUND_S, (loop, found["elapsed"])
        assert found["timed_out"] and found["late"] < INTERRUPT_BOUND_S, (loop, found)
    assert run["fresh"]
