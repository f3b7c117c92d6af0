"""The drivers' own test suites, as their maintainers wrote them, stock and greenified.

    python -m tests.driver_suites.run                     # all suites (make driver-suites)
    python -m tests.driver_suites.run --only psycopg2     # one of them
    python -m tests.driver_suites.run --readme docs/platforms.md  # render results.json into the README
    python -m tests.driver_suites.run --check docs/platforms.md   # exit 1 if the README's table is not results.json's
    python -m tests.driver_suites.run --fresh --check docs/platforms.md  # ... not the last run's
    python -m tests.driver_suites.run --record docs/platforms.md  # record the last run, render it into the README

For psycopg2 (the psycopg2-binary installed) and mysqlclient: downloads the
sdist of the installed version from PyPI (``pip download --no-binary :all:
--no-deps``, kept in build/driver-suites/) and extracts its tests.  For
psycopg 3, whose sdist ships no tests: a named subset of its GitHub tests,
copied into psycopg-tests/ (its README says from where).  Starts the test
suite's own PostgreSQL and MariaDB (tests/support/servers.py), and runs each
suite twice, each time in a fresh interpreter:

* stock: the suite as its maintainers run it;
* greenified: ``greenify.greenify()``, the driver's C library patched
  (``patch_library("libpq")`` / ``patch_library("libmariadb")`` /
  ``patch_library(psycopg._cmodule._psycopg)``, as SUITES says), a greenlet
  that ticks every millisecond, and the suite run inside a greenlet, so that
  every wait in the C library really switches to the hub and back.

A test that fails is run once more, alone, in a fresh interpreter of the
same mode (second_try): the peers' suites hold timing-dependent tests that a
busy machine fails now and then, stock as much as greenified.  It counts as
passed if it passes then, and results.json names it with its first failure.

Every test's outcome goes to .results/tests/driver_suites/results.json (the
fresh results, started from the recorded tests/driver_suites/results.json,
which only `make record` replaces).  The run fails (exit 1) if a test that
passed stock does not pass greenified.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
RESULTS_PATH = os.path.join(HERE, "results.json")  # recorded


def _sections():
    """tests/support/readme_sections.py, for the parent (run as `python -m
    tests.driver_suites.run`).  Not imported at the top: a suite's child runs
    this file as a script, where `tests` must be the driver's own package."""
    from tests.support import readme_sections

    return readme_sections


CACHE = os.path.join(ROOT, "build", "driver-suites")
README_SECTION = "driver-suites"  # the README's generated part (tests/support/readme_sections.py)
SUITE_TIMEOUT_S = 900
# What psycopg2's suite needs beyond the defaults: two-phase commit
# (test_tpc) and logical replication (test_replication).
POSTGRES_SETTINGS = ("max_prepared_transactions=10", "wal_level=logical", "max_wal_senders=10",
                     "max_replication_slots=10")
TICK_S = 0.001


@dataclass(frozen=True)
class Suite:
    installed: str  # the distribution whose version is tested
    sdist: Optional[str]  # the sdist whose tests run; None: a copy in this folder (copy)
    module: str  # imported before patching
    target: str  # what patch_library patches: a library name, or a module's attribute path
    library: str  # the file patching it must reach (under_patch_all checks patch_all reaches it)
    runner: str  # "unittest": the sdist's tests.test_suite(); "discover": Tests/t_*.py; "pytest": pytest_paths
    pytest_paths: Tuple[str, ...] = ("tests",)  # the files or folders pytest runs
    pytest_options: Tuple[str, ...] = ()  # the selection within them (-m, -k)
    copy: Optional[str] = None  # the folder under this one holding the tests
    # pytest: which parametrized cases (their params) are left out, by name in the docs
    deselect: Optional[Callable[[Dict[str, object]], bool]] = None
    # patch_on_load(target), not patch_library: the library is dlopened at the first connect
    on_load: bool = False
    label: str = ""  # which of the suite's tests, where the docs' table must say

    @property
    def patched(self) -> str:
        """The call, as the docs show it."""
        call = "patch_on_load" if self.on_load else "patch_library"
        return f'{call}("{self.target}")' if "." not in self.target else f"{call}({self.target})"


# psycopg 3's files (psycopg-tests/): connecting, cursors, COPY, transactions,
# pipelines, notifications, cancellation and closing across threads, and its
# wait functions.  Deselected, to keep the run near 35 s a mode:
# * tests marked `proxy` (they need pproxy and a tools/ script outside tests/),
#   `timing` (timed assertions, which a busy machine breaks; psycopg's own way
#   to turn them off) and `subprocess` (psycopg in a child interpreter, stock
#   in both modes, behind 2 s start-up deadlines);
# * test_cursor's test_leak (72 cases counting objects after a gc);
# * test_waiting's cases of the pure-Python wait functions (wait_select,
#   wait_epoll, ...), which greenify does not touch, and of `wait`, which is
#   wait_c again; and its 2 s intervals (the 0.2 s ones take the same paths).
#   Its cases of wait_c, the compiled wait loop that calls poll() (what
#   greenify patches), stay.
PSYCOPG_FILES = ("test_connection.py", "test_cursor.py", "test_copy.py", "test_transaction.py",
                 "test_pipeline.py", "test_notify.py", "test_concurrency.py", "test_waiting.py")
PSYCOPG_MARKS = "not proxy and not timing and not subprocess"
PSYCOPG_NAMES = "not test_leak"


def psycopg_case_deselected(params: Dict[str, object]) -> bool:
    """test_waiting's parametrized cases left out (see above)."""
    return params.get("waitfn", "wait_c") != "wait_c" or params.get("interval") == 2

SUITES = {
    "psycopg2": Suite("psycopg2-binary", "psycopg2", "psycopg2", "libpq", "libpq", "unittest"),
    "mysqlclient": Suite("mysqlclient", "mysqlclient", "MySQLdb", "libmariadb", "libmariadb", "pytest"),
    # the whole of python-ldap's Tests/, as its tox.ini runs them; they start their own slapd (slapdtest)
    "python-ldap": Suite("python-ldap", "python-ldap", "ldap", "ldap._ldap", "libldap", "discover"),
    # pyodbc's tests of MariaDB and of PostgreSQL, through unixODBC and Debian's
    # ODBC drivers, which unixODBC dlopens at connect time
    "pyodbc-mariadb": Suite("pyodbc", "pyodbc", "pyodbc", "libmariadb", "libmariadb", "pytest",
                            ("tests/mysql_test.py",), on_load=True, label="tests/mysql_test.py, MariaDB"),
    "pyodbc-postgresql": Suite("pyodbc", "pyodbc", "pyodbc", "libpq", "libpq", "pytest",
                               ("tests/postgresql_test.py",), on_load=True,
                               label="tests/postgresql_test.py, PostgreSQL"),
    "psycopg": Suite("psycopg", None, "psycopg", "psycopg._cmodule._psycopg", "_psycopg", "pytest",
                     tuple(f"tests/{name}" for name in PSYCOPG_FILES), ("-m", PSYCOPG_MARKS, "-k", PSYCOPG_NAMES),
                     copy="psycopg-tests", deselect=psycopg_case_deselected),
}


# --- preparing a suite ------------------------------------------------------------

def fetch_sdist(name: str, version: str) -> str:
    """The extracted sdist folder of name==version, downloaded once."""
    folder = os.path.join(CACHE, f"{name}-{version}")
    if os.path.isdir(folder):
        return folder
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        "--no-build-isolation", "--dest", download, f"{name}=={version}"], check=True)
        (archive,) = [os.path.join(download, entry) for entry in os.listdir(download)]
        extracted = os.path.join(download, "extracted")
        with tarfile.open(archive) as tar:
            tar.extractall(extracted, filter="data")
        (top,) = os.listdir(extracted)  # name-version, or its normalized spelling (python_ldap-3.4.8)
        shutil.move(os.path.join(extracted, top), folder)
    return folder


# --- running a suite (in the child interpreter) -----------------------------------

def patch_target(suite: Suite):
    """What patch_library is given: a library name, or the module attribute named."""
    import importlib

    module = importlib.import_module(suite.module)
    if "." not in suite.target:
        return suite.target
    target = module
    for attribute in suite.target.split(".")[1:]:
        target = getattr(target, attribute)
    return target


def _greenify(suite: Suite):
    """greenify active, the suite's target patched, a ticker; patch_on_load's handle, if that is the call."""
    import gevent

    import greenify

    target = patch_target(suite)
    greenify.greenify()
    handle = None
    if suite.on_load:
        handle = greenify.patch_on_load(target)  # checked after the run (child): patched at the first connect
    else:
        report = greenify.patch_library(target)
        if not report:
            raise SystemExit(f"nothing patched for {suite.target}: {report!r}")

    def tick() -> None:
        while True:
            gevent.sleep(TICK_S)

    gevent.spawn(tick)
    return handle


def _run_unittest(source: str, discover: bool, only: Optional[List[str]] = None) -> Dict[str, str]:
    """psycopg2's tests.test_suite(), or (discover) the t_*.py of python-ldap's Tests/ as its tox.ini runs them;
    with ``only``, just those tests (by id)."""
    import unittest

    outcomes: Dict[str, str] = {}

    class Result(unittest.TextTestResult):
        def addSuccess(self, test):  # noqa: N802 - unittest's names
            super().addSuccess(test)
            outcomes[test.id()] = "passed"

        def addFailure(self, test, err):  # noqa: N802
            super().addFailure(test, err)
            outcomes[test.id()] = "failed: " + _first_line(self.failures[-1][1])

        def addError(self, test, err):  # noqa: N802
            super().addError(test, err)
            outcomes[getattr(test, "id", lambda: str(test))()] = "failed: " + _first_line(self.errors[-1][1])

        def addSkip(self, test, reason):  # noqa: N802
            super().addSkip(test, reason)
            outcomes[test.id()] = "skipped: " + reason

        def addExpectedFailure(self, test, err):  # noqa: N802
            super().addExpectedFailure(test, err)
            outcomes[test.id()] = "xfailed"

        def addUnexpectedSuccess(self, test):  # noqa: N802
            super().addUnexpectedSuccess(test)
            outcomes[test.id()] = "passed"

    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=1, resultclass=Result)
    if discover:
        os.chdir(source)
        if only is not None:
            sys.path.insert(0, os.path.join(source, "Tests"))  # where discover() finds the t_*.py modules
            runner.run(unittest.defaultTestLoader.loadTestsFromNames(only))
        else:
            runner.run(unittest.defaultTestLoader.discover("Tests", pattern="t_*"))
    else:
        sys.path.insert(0, source)
        import tests  # the sdist's tests package

        runner.run(unittest.defaultTestLoader.loadTestsFromNames(only) if only is not None else tests.test_suite())
    return outcomes


def _run_pytest(source: str, args: Tuple[str, ...],
                deselect: Optional[Callable[[Dict[str, object]], bool]]) -> Dict[str, str]:
    import pytest

    outcomes: Dict[str, str] = {}

    class Recorder:
        def pytest_collectreport(self, report):
            if report.skipped:  # a module skipped as a whole (importorskip)
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                outcomes[report.nodeid] = "skipped: " + reason
            elif report.failed:
                outcomes[report.nodeid] = "failed: " + _first_line(str(report.longrepr))

        def pytest_runtest_logreport(self, report):
            if report.failed:
                outcomes[report.nodeid] = "failed: " + _first_line(str(report.longrepr))
            elif report.skipped and report.nodeid not in outcomes:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                outcomes[report.nodeid] = ("xfailed" if hasattr(report, "wasxfail") else "skipped: " + reason)
            elif report.when == "call" and report.passed:
                outcomes[report.nodeid] = "passed"

        def pytest_collection_modifyitems(self, config, items):
            if deselect is None:
                return
            kept, deselected = [], []
            for item in items:
                params = getattr(getattr(item, "callspec", None), "params", {})
                (deselected if deselect(params) else kept).append(item)
            if deselected:
                config.hook.pytest_deselected(items=deselected)
                items[:] = kept

    # A fresh folder for the settings and the cache (psycopg's conftest uses
    # the cache to notice a crashed run): the sdist's own settings stay out,
    # so do ours, and nothing is written into the source.
    scratch = tempfile.mkdtemp(prefix="driver-suite-")
    config = os.path.join(scratch, "pytest.ini")
    with open(config, "w") as ini:
        ini.write("[pytest]\n")
    os.chdir(source)
    sys.path.insert(0, source)  # its `tests` before any other (greenify's own, on PYTHONPATH)
    pytest.main(["-c", config, "--rootdir", source, "--confcutdir", source, "-o", f"cache_dir={scratch}/cache", "-q", *args],
                plugins=[Recorder()])
    shutil.rmtree(scratch, ignore_errors=True)
    return outcomes


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def child(name: str, mode: str, source: str, out_path: str, only_path: Optional[str] = None) -> None:
    import gevent

    suite = SUITES[name]
    only: Optional[List[str]] = None
    if only_path is not None:  # a second try: just these tests
        with open(only_path) as only_file:
            only = json.load(only_file)
    handle = _greenify(suite) if mode == "greenified" else None
    if suite.runner in ("unittest", "discover"):
        def run() -> Dict[str, str]:
            return _run_unittest(source, suite.runner == "discover", only)
    else:
        def run() -> Dict[str, str]:
            return _run_pytest(source, (*suite.pytest_options, *(suite.pytest_paths if only is None else only)),
                               suite.deselect)
    started = time.monotonic()
    outcomes = gevent.spawn(run).get() if mode == "greenified" else run()
    document = {"seconds": round(time.monotonic() - started, 1), "outcomes": outcomes}
    if mode == "greenified":
        import greenify

        if handle is not None and only is None and not any(handle.reports):
            raise SystemExit(f"patch_on_load({suite.target!r}) patched nothing during the run")

        document["waits"] = sum(entry.calls for entry in greenify.stats().values())
    with open(out_path, "w") as out:
        json.dump(document, out, indent=1, sort_keys=True)


# --- the parent: servers, runs, comparison -----------------------------------------

def _prepare_postgres(postgres) -> Dict[str, str]:
    import psycopg2

    admin = psycopg2.connect(f"host={postgres.host} port={postgres.port} user=postgres dbname=postgres "
                             "sslmode=disable")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS psycopg2_test")
        cursor.execute("CREATE DATABASE psycopg2_test")
    admin.close()
    test_db = psycopg2.connect(f"host={postgres.host} port={postgres.port} user=postgres dbname=psycopg2_test "
                               "sslmode=disable")
    test_db.autocommit = True
    with test_db.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'hstore'")
        if cursor.fetchall():  # the hstore tests; Debian's postgresql package ships it
            cursor.execute("CREATE EXTENSION hstore")
    test_db.close()
    return {"PSYCOPG2_TESTDB": "psycopg2_test", "PSYCOPG2_TESTDB_HOST": postgres.host,
            "PSYCOPG2_TESTDB_PORT": str(postgres.port), "PSYCOPG2_TESTDB_USER": "postgres",
            "PSYCOPG2_TEST_REPL_DSN": "",  # replicate over the test DSN itself (trust, superuser)
            # plain TCP, as the suite's own CI connects; libpq would otherwise prefer TLS
            "PGSSLMODE": "disable"}


def _prepare_mariadb(mariadb, source: str) -> Dict[str, str]:
    import MySQLdb

    admin = MySQLdb.connect(unix_socket=mariadb.unix_socket, user="root")
    cursor = admin.cursor()
    cursor.execute("DROP DATABASE IF EXISTS mysqldb_test")
    cursor.execute("CREATE DATABASE mysqldb_test DEFAULT CHARACTER SET utf8mb4")
    cursor.execute(f"GRANT ALL ON mysqldb_test.* TO '{mariadb.user}'@'%'")
    admin.close()
    config = os.path.join(source, "tests", "driver-suites.cnf")
    with open(config, "w") as cnf:
        cnf.write(f"[MySQLdb-tests]\nhost = {mariadb.host}\nport = {mariadb.port}\nuser = {mariadb.user}\n"
                  f"password = {mariadb.password}\ndatabase = mysqldb_test\ndefault-character-set = utf8mb4\n")
    return {"TESTDB": "driver-suites.cnf"}


def _prepare_psycopg(postgres) -> Dict[str, str]:
    import psycopg2

    admin = psycopg2.connect(f"host={postgres.host} port={postgres.port} user=postgres dbname=postgres "
                             "sslmode=disable")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS psycopg_test")
        cursor.execute("CREATE DATABASE psycopg_test")
    admin.close()
    # plain TCP, as psycopg's own CI connects
    return {"PSYCOPG_TEST_DSN": f"host={postgres.host} port={postgres.port} user=postgres dbname=psycopg_test "
                                "sslmode=disable"}


def _prepare_ldap(scratch: str) -> Dict[str, str]:
    """slapdtest's settings: Debian keeps slapd and slapadd in /usr/sbin, the ldap* clients in /usr/bin."""
    from tests.support import servers

    slapd = servers.find_binary(["slapd"], "slapd", ["/usr/sbin"])
    ldapadd = servers.find_binary(["ldapadd"], "ldap-utils", ["/usr/bin"])
    sbin = os.path.dirname(slapd)
    return {"SBIN": sbin, "BIN": f"{os.path.dirname(ldapadd)}:{sbin}", "SCHEMA": "/etc/ldap/schema",
            "TMP": scratch}  # where slapdtest makes each server's folder


def _prepare_pyodbc(server, kind: str) -> Dict[str, str]:
    """A pyodbc_test database and a DSN-less connection string naming Debian's ODBC driver."""
    from tests.support import servers

    if kind == "mariadb":
        import MySQLdb

        admin = MySQLdb.connect(unix_socket=server.unix_socket, user="root")
        cursor = admin.cursor()
        cursor.execute("DROP DATABASE IF EXISTS pyodbc_test")
        cursor.execute("CREATE DATABASE pyodbc_test DEFAULT CHARACTER SET utf8mb4")
        cursor.execute(f"GRANT ALL ON pyodbc_test.* TO '{server.user}'@'%'")
        admin.close()
        driver = servers.odbc_driver("libmaodbc.so", "odbc-mariadb")
        return {"PYODBC_MYSQL": f"DRIVER={driver};SERVER={server.host};PORT={server.port};DATABASE=pyodbc_test;"
                                f"UID={server.user};PWD={server.password};charset=utf8mb4"}
    import psycopg2

    admin = psycopg2.connect(f"host={server.host} port={server.port} user=postgres dbname=postgres sslmode=disable")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS pyodbc_test")
        cursor.execute("CREATE DATABASE pyodbc_test")
    admin.close()
    driver = servers.odbc_driver("psqlodbcw.so", "odbc-postgresql")
    return {"PYODBC_POSTGRESQL": f"DRIVER={driver};SERVER={server.host};PORT={server.port};DATABASE=pyodbc_test;"
                                 "UID=postgres;SSLMODE=disable"}


def suite_source(suite: Suite) -> Tuple[str, str]:
    """The folder holding the suite's `tests`, and how the docs name it."""
    version = importlib.metadata.version(suite.installed)
    if suite.copy:
        return os.path.join(HERE, suite.copy), f"{suite.installed} {version} (its GitHub tests, a subset)"
    return fetch_sdist(suite.sdist, version), f"{suite.sdist} {version} (tests of the sdist)"


def run_suite(suite: str, source: str, env: Dict[str, str], mode: str, only: Optional[List[str]] = None) -> dict:
    """One run of the suite (with ``only``: of those tests) in a fresh interpreter."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out, \
            tempfile.NamedTemporaryFile("w", suffix=".json") as only_file:
        command = [sys.executable, os.path.abspath(__file__), "--child", suite, mode, source, out.name]
        if only is not None:
            json.dump(only, only_file)
            only_file.flush()
            command.append(only_file.name)
        print(f"--- {suite}, {mode}" + ("" if only is None else f", a second try of {len(only)} test(s)"), flush=True)
        started = time.monotonic()
        os.makedirs(CACHE, exist_ok=True)
        log_path = os.path.join(CACHE, f"{suite}-{mode}{'' if only is None else '-second-try'}.log")
        with open(log_path, "w") as log:
            process = subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                     timeout=SUITE_TIMEOUT_S)
        try:
            with open(out.name) as result:
                document = json.load(result)
        except ValueError:
            raise SystemExit(f"{suite} {mode}: the suite ended (status {process.returncode}) without results; "
                             f"see {log_path}") from None
    counts = count(document["outcomes"])
    print(f"    {counts} in {time.monotonic() - started:.0f} s (log: {os.path.relpath(log_path, ROOT)})", flush=True)
    return document


def second_try(suite: str, source: str, env: Dict[str, str], mode: str, document: dict) -> None:
    """Run the tests that failed once more, alone, in a fresh interpreter:
    a peer's suite has timing-dependent tests that fail now and then on a busy
    machine, stock as much as greenified.  A test that passes on its second
    try counts as passed; document["second_try"] names it, with its first
    failure.  (A test that failed outside any test id, a class's or module's
    set-up, is not tried again: it keeps its outcome.)"""
    outcomes = document["outcomes"]
    failed = sorted(test for test, outcome in outcomes.items() if outcome.startswith("failed") and
                    ("::" in test if SUITES[suite].runner == "pytest" else " " not in test))
    document["second_try"] = {}
    if not failed:
        return
    again = run_suite(suite, source, env, mode, failed)["outcomes"]
    for test in failed:
        if again.get(test) == "passed":
            document["second_try"][test] = outcomes[test]
            outcomes[test] = "passed"


def count(outcomes: Dict[str, str]) -> Dict[str, int]:
    kinds = ("passed", "failed", "skipped", "xfailed")
    return {kind: sum(1 for outcome in outcomes.values() if outcome.split(":")[0] == kind) for kind in kinds}


def compare(stock: Dict[str, str], greenified: Dict[str, str]) -> dict:
    passed_stock = {test for test, outcome in stock.items() if outcome == "passed"}
    regressions = sorted(test for test in passed_stock if greenified.get(test) != "passed")
    failed_both = sorted(test for test, outcome in stock.items()
                         if outcome.startswith("failed") and greenified.get(test, "").startswith("failed"))
    return {"regressions": {test: greenified.get(test, "did not run") for test in regressions},
            "failed_both_ways": {test: stock[test] for test in failed_both},
            "fixed_greenified": sorted(test for test, outcome in stock.items() if outcome.startswith("failed")
                                       and greenified.get(test) == "passed")}


class Servers:
    """One PostgreSQL and one MariaDB for all the suites, started when first needed, stopped with `stack`."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack = stack
        self.started: Dict[str, object] = {}

    def get(self, kind: str):
        from tests.support import servers

        if kind not in self.started:
            start = servers.start_postgres(POSTGRES_SETTINGS) if kind == "postgres" else servers.start_mariadb()
            self.started[kind] = self.stack.enter_context(start)
        return self.started[kind]


def prepare(suite: str, source: str, running: Servers) -> Dict[str, str]:
    """The suite's server and database ready; the environment its tests read them from."""
    if suite == "psycopg2":
        return _prepare_postgres(running.get("postgres"))
    if suite == "psycopg":
        return _prepare_psycopg(running.get("postgres"))
    if suite == "pyodbc-mariadb":
        return _prepare_pyodbc(running.get("mariadb"), "mariadb")
    if suite == "pyodbc-postgresql":
        return _prepare_pyodbc(running.get("postgres"), "postgresql")
    if suite == "python-ldap":  # no server: slapdtest starts its own, in this folder
        return _prepare_ldap(running.stack.enter_context(tempfile.TemporaryDirectory(prefix="greenify-slapdtest-")))
    return _prepare_mariadb(running.get("mariadb"), source)


def main_run(only: Optional[List[str]]) -> int:
    results = load_results(_sections().latest(RESULTS_PATH))
    status = 0
    with contextlib.ExitStack() as stack:
        running = Servers(stack)
        for suite in only or list(SUITES):
            source, tests_name = suite_source(SUITES[suite])
            version = importlib.metadata.version(SUITES[suite].installed)
            env = prepare(suite, source, running)
            runs = {mode: run_suite(suite, source, env, mode) for mode in ("stock", "greenified")}
            for mode, document in runs.items():
                second_try(suite, source, env, mode, document)
            comparison = compare(runs["stock"]["outcomes"], runs["greenified"]["outcomes"])
            results["suites"][suite] = {
                "sdist": tests_name, "installed": f"{SUITES[suite].installed} {version}",
                "patched": SUITES[suite].patched,
                "stock": count(runs["stock"]["outcomes"]), "greenified": count(runs["greenified"]["outcomes"]),
                "seconds": {mode: runs[mode]["seconds"] for mode in runs},
                "greenified_waits": runs["greenified"].get("waits"),
                "passed_on_a_second_try": {mode: runs[mode]["second_try"] for mode in runs},
                **comparison,
                "outcomes": {mode: runs[mode]["outcomes"] for mode in runs},
            }
            results["environment"] = (f"Python {platform.python_version()}, gevent "
                                      f"{importlib.metadata.version('gevent')}, {platform.machine()}")
            save_results(results)
            if comparison["regressions"]:
                status = 1
                print(f"{suite}: {len(comparison['regressions'])} test(s) pass stock and fail greenified:")
                for test, outcome in comparison["regressions"].items():
                    print(f"    {test}: {outcome}")
    return status


def load_results(path: str = RESULTS_PATH) -> dict:
    try:
        with open(path) as results_file:
            results = json.load(results_file)
    except (OSError, ValueError):
        results = {}
    results.setdefault("suites", {})
    return results


def save_results(results: dict) -> None:
    _sections().replace_file(_sections().fresh_path(RESULTS_PATH), json.dumps(results, indent=1, sort_keys=True) + "\n")


# --- the README table --------------------------------------------------------------

def markdown_table(results: dict) -> str:
    lines = ["| suite | the greenify call | stock | greenified | passed stock, not greenified |",
             "|---|---|---|---|---|"]

    def counts(entry: Dict[str, int]) -> str:
        text = f"{entry['passed']} passed, {entry['failed']} failed, {entry['skipped']} skipped"
        return text + (f", {entry['xfailed']} expected failures" if entry["xfailed"] else "")

    for suite, row in results["suites"].items():
        tests_name = row["sdist"] if "(" in row["sdist"] else f"{row['sdist']} (tests of the sdist)"
        if suite in SUITES and SUITES[suite].label:
            tests_name += f": {SUITES[suite].label}"
        lines.append(f"| {tests_name} | `{row['patched']}` | {counts(row['stock'])} "
                     f"| {counts(row['greenified'])} | {len(row['regressions'])} |")
    for suite, row in results["suites"].items():
        for test, outcome in row["regressions"].items():
            lines.append(f"\n{suite}: `{test}` passes stock, greenified {outcome}")
    lines.append("")
    lines.append("Generated by `python -m tests.driver_suites.run --readme docs/platforms.md` from "
                 f"`tests/driver_suites/results.json`, which `make driver-suites` writes "
                 f"({results.get('environment', 'no results yet')}).")
    return "\n".join(lines)


def rewrite_readme(path: str) -> None:
    _sections().write(path, README_SECTION, markdown_table(load_results()))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(SUITES), help="run only this suite (repeatable)")
    parser.add_argument("--readme", help="only render results.json into this README between the markers")
    parser.add_argument("--check", metavar="README", help="only check that this README's table is results.json's")
    parser.add_argument("--fresh", action="store_const", dest="results", const=_sections().latest(RESULTS_PATH),
                        default=RESULTS_PATH, help=f"--check against the last run's results ({_sections().fresh_path(RESULTS_PATH)}, while "
                                                   f"there are some), not the recorded ones")
    parser.add_argument("--record", metavar="README", help="record the last run's results (make record) and "
                                                           "render them into this README")
    args = parser.parse_args(argv)
    if args.record:
        _sections().record(RESULTS_PATH)
        args.readme = args.record
    if args.readme:
        rewrite_readme(args.readme)
        return 0
    if args.check:
        differences = _sections().differences(args.check, README_SECTION,
                                                  markdown_table(load_results(args.results)), args.results)
        print("\n".join(differences), file=sys.stderr)
        return 1 if differences else 0
    return main_run(args.only)


if __name__ == "__main__":
    sys.exit(main())
