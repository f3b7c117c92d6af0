"""The README's compatibility table, generated from the driver tests.

A test marked ``@pytest.mark.compat("psycopg2")`` (or a module with
``pytestmark = pytest.mark.compat("MySQLdb")``) counts for that driver's row
of ROWS.

Honest by construction:

* A session that runs any marked test owns .results/tests/compat-results.json
  (its fresh results; tests/compat-results.json is the recorded run the
  README's table comes from, replaced only by `make record`): it marks the
  file "running" before the first test and rewrites it whole when it
  finishes.  Nothing is merged with earlier runs, so a crashed session leaves
  a file that says so, and rendering or checking it fails.  So running one
  driver test file leaves the other rows "not run": record the README's table
  from a whole `make test` only.
* Every row of ROWS is in the table.  A marked test that was collected but
  did not run (an interrupted session) counts as not run; a test file that
  names a row in a compat mark but failed to import puts that row's result
  at "not run" with the file named.
* ``python -m tests.support.compat --check README.md`` (``make check-readme``) fails
  when the README's table is not exactly the one the recorded results render;
  with ``--fresh`` (CI, after ``make test``) the one this checkout's last run
  renders.

Adding a column: append a Column to COLUMNS.  Its ``cell`` gets the row's
entry from the results file (see ``_row_entry``) and returns the Markdown for
the cell.  A column about an aspect of the drivers (TLS, asyncio, ...) is
``aspect_column("TLS", "tls")``: mark the tests that prove that aspect
``@pytest.mark.compat("psycopg2", "tls")``; the cell then summarizes those
tests' outcomes ("3 of 3 passed", or "not tested").  Aspect tests count in the
row's tests and result too.  Rerun the driver tests and ``make record``.

As a script it renders that file as the README's Markdown table:

    python -m tests.support.compat                    # print the table
    python -m tests.support.compat --readme README.md # rewrite it between the markers
    python -m tests.support.compat --check README.md  # exit 1 if the README's table differs
    python -m tests.support.compat --fresh ...        # from the last run's results, not the recorded ones
    python -m tests.support.compat --record README.md # record the last run's results, rewrite the table
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple


from tests.support import readme_sections
RESULTS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "compat-results.json")  # recorded
FRESH_PATH = readme_sections.fresh_path(RESULTS_PATH)  # what the last session wrote
README_SECTION = "compat"  # the README's generated part (tests/support/readme_sections.py)
RUNNING, COMPLETE = "running", "complete"
NOT_RUN = "not run"


@dataclass(frozen=True)
class Row:
    """One line of the table: a driver and the C library the tests patch."""

    driver: str               # what an application imports
    packages: Tuple[str, ...]  # the PyPI distributions whose versions are shown
    library: str              # the C library greenify patches, and how
    module: str               # imported to ask for the library's version
    library_version: Callable[[object], str]


def _libpq_version(psycopg2) -> str:
    number = psycopg2.extensions.libpq_version()  # major * 10000 + minor since PostgreSQL 10
    return f"{number // 10000}.{number % 10000}"


def _psycopg3_libpq_version(psycopg) -> str:
    number = psycopg.pq.version()
    return f"{number // 10000}.{number % 10000}"


def _debian_versions(*packages: str) -> Callable[[object], str]:
    """library_version for a row whose libraries come from Debian's packages."""
    def versions(_module) -> str:
        import subprocess
        found = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *packages],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return ", ".join(found.splitlines()) or "unknown"
    return versions


def _mysql_connector_client_version(_module) -> str:
    # In a child: the extension does not load once `ssl` has loaded an older
    # system OpenSSL (tests/support/mysql_connector_child.py).
    import subprocess
    found = subprocess.run([sys.executable, "-c", "import _mysql_connector; "
                            "print(_mysql_connector.MySQL().get_client_info())"],
                           capture_output=True, text=True, timeout=60)
    return found.stdout.strip() or "unknown (the C extension does not load)"


def _openldap_version(ldap) -> str:
    number = ldap.get_option(ldap.OPT_API_INFO)["vendor_version"]  # 20513: 2.5.13
    return f"OpenLDAP {number // 10000}.{number // 100 % 100}.{number % 100}"


def _bundled_version(libs_folder: str, stem: str) -> str:
    """A bundled library's version, from its file name (libssh2-<hash>.so.1.0.1: 1.0.1, the soname's)."""
    import glob
    import site
    for folder in site.getsitepackages():
        for path in glob.glob(os.path.join(folder, libs_folder, f"{stem}-*.so.*")):
            return "so." + os.path.basename(path).split(".so.", 1)[1]
    return "unknown"


ROWS: Dict[str, Row] = {row.driver: row for row in [
    Row("MySQLdb", ("mysqlclient",), "libmariadb.so.3 (Debian's), as `MySQLdb._mysql` or `\"libmariadb\"`",
        "MySQLdb", lambda MySQLdb: MySQLdb._mysql.get_client_info()),
    Row("MySQLdb under gunicorn", ("gunicorn", "mysqlclient"), "libmariadb.so.3, patched in `post_fork` of the gevent worker",
        "MySQLdb", lambda MySQLdb: MySQLdb._mysql.get_client_info()),
    Row("psycopg2", ("psycopg2-binary",), "libpq bundled in `psycopg2_binary.libs`, as `\"libpq\"`",
        "psycopg2", _libpq_version),
    Row("psycopg", ("psycopg", "psycopg-binary"),
        "`psycopg_binary/_psycopg.so` (its `wait_c` calls `poll` itself) and the libpq it needs, as "
        "`psycopg._cmodule._psycopg`", "psycopg", _psycopg3_libpq_version),
    Row("psycopg[c]", ("psycopg", "psycopg-c"),
        "`psycopg_c/_psycopg.so`, built from source on this machine (its `wait_c` calls `poll` itself), and "
        "Debian's libpq.so.5 it links, as `psycopg._cmodule._psycopg` (tests in children with "
        "`PSYCOPG_IMPL=c`)", "psycopg", _debian_versions("libpq5")),
    Row("pyodbc, MariaDB ODBC", ("pyodbc",),
        "libmariadb.so.3, which unixODBC's `dlopen` of the driver `libmaodbc.so` loads at connect time, as "
        "`greenify.patch_on_load(\"libmariadb\")` before the first connect",
        "pyodbc", _debian_versions("odbc-mariadb", "unixodbc")),
    Row("pyodbc, PostgreSQL ODBC", ("pyodbc",),
        "libpq.so.5, which unixODBC's `dlopen` of the driver `psqlodbcw.so` loads at connect time, as "
        "`greenify.patch_on_load(\"libpq\")` before the first connect",
        "pyodbc", _debian_versions("odbc-postgresql", "unixodbc")),
    Row("mysql.connector (C extension)", ("mysql-connector-python",),
        "its MySQL client, linked statically into `_mysql_connector.so`, as `_mysql_connector` "
        "(imported before `ssl`)", "mysql.connector", _mysql_connector_client_version),
    Row("python-ldap", ("python-ldap",),
        "libldap-2.5.so.0 and liblber (Debian's; GnuTLS below them), as `ldap._ldap`",
        "ldap", _openldap_version),
    Row("ssh2-python", ("ssh2-python",), "libssh2 bundled in `ssh2_python.libs`, as `\"libssh2\"`",
        "ssh2.session", lambda session: _bundled_version("ssh2_python.libs", "libssh2")),
    Row("gssapi", ("gssapi",), "libkrb5.so.3 (Debian's MIT krb5: KDC exchanges over UDP and TCP), as "
        "`gssapi.raw.creds` (or `\"libkrb5\"`)", "gssapi", _debian_versions("libkrb5-3")),
    Row("pylibmc", ("pylibmc",), "libmemcached bundled in `pylibmc.libs`, as `\"libmemcached\"`",
        "pylibmc", lambda pylibmc: pylibmc.libmemcached_version),
    Row("pycurl", ("pycurl",), "libcurl bundled in `pycurl.libs`, as `\"libcurl\"`",
        "pycurl", lambda pycurl: pycurl.version_info()[1]),
]}


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _library_version(row: Row) -> str:
    try:
        return str(row.library_version(importlib.import_module(row.module)))
    except Exception as exc:  # noqa: BLE001 - a missing driver is a fact for the table, not an error
        return f"unknown ({type(exc).__name__})"


# --- outcomes and cells ------------------------------------------------------------

def tests_cell(outcomes: Iterable[str]) -> str:
    """"5 of 6 passed, 1 skipped": every outcome counted, none hidden."""
    outcomes = list(outcomes)
    if not outcomes:
        return "not tested"
    count = {kind: outcomes.count(kind) for kind in ("passed", "failed", "skipped", "xfailed", NOT_RUN)}
    text = f"{count['passed']} of {len(outcomes)} passed"
    for kind, label in (("failed", "failed"), ("skipped", "skipped"), ("xfailed", "known failures"),
                        (NOT_RUN, "not run")):
        if count[kind]:
            text += f", {count[kind]} {label}"
    return text


def row_result(entry: dict) -> str:
    outcomes = [test["outcome"] for test in entry["tests"].values()]
    if "failed" in outcomes:
        return "failed"
    if entry["not_collected"] or not outcomes or NOT_RUN in outcomes:
        return NOT_RUN if "passed" not in outcomes else "incomplete"
    if "passed" not in outcomes:
        return "skipped"
    return "passed"


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]


def aspect_column(header: str, aspect: str) -> Column:
    """A column summarizing the row's tests marked ``compat(driver, aspect)``."""
    return Column(header, lambda entry: tests_cell(test["outcome"] for test in entry["tests"].values()
                                                   if aspect in test["aspects"]))


def _not_collected_note(entry: dict) -> str:
    return "".join(f"; {path} did not import" for path in entry["not_collected"])


COLUMNS: List[Column] = [
    Column("driver", lambda entry: entry["driver"]),
    Column("version", lambda entry: ", ".join(f"{package} {version}"
                                              for package, version in entry["versions"].items())),
    Column("C library greenify patches", lambda entry: entry["library"]),
    Column("library version", lambda entry: entry["library_version"]),
    Column("tests", lambda entry: tests_cell(test["outcome"] for test in entry["tests"].values())
           + _not_collected_note(entry)),
    Column("result", lambda entry: f"**{row_result(entry)}**"),
    aspect_column("under asyncio (greenify.asyncio)", "asyncio"),
]


# --- the pytest plugin ---------------------------------------------------------

class _Session:
    """What this pytest session records: set up when it collects a marked test."""

    def __init__(self) -> None:
        self.tests: Dict[str, Tuple[str, Tuple[str, ...]]] = {}  # nodeid -> (row, aspects)
        self.outcomes: Dict[str, str] = {}
        self.not_collected: Dict[str, List[str]] = {}            # row -> test files that did not import
        self.started = ""
        self.rootpath = ""


_session = _Session()
_COMPAT_MARK = re.compile(r"""mark\.compat\(\s*(['"])(.+?)\1""")


def pytest_configure(config) -> None:
    _session.rootpath = str(config.rootpath)
    config.addinivalue_line("markers", "compat(driver, *aspects): the test counts for that driver's row of the "
                                       "README's compatibility table, and for each aspect's column (tests/support/compat.py)")


def pytest_collectreport(report) -> None:
    if not report.failed or not report.nodeid.endswith(".py"):
        return
    try:
        with open(os.path.join(_session.rootpath, report.nodeid)) as source:
            rows = {match.group(2) for match in _COMPAT_MARK.finditer(source.read())}
    except OSError:
        return
    for row in rows & set(ROWS):
        _session.not_collected.setdefault(row, []).append(report.nodeid)


def pytest_collection_finish(session) -> None:
    for item in session.items:
        marker = item.get_closest_marker("compat")
        if marker is None:
            continue
        driver, *aspects = marker.args
        if driver not in ROWS:
            raise ValueError(f"{item.nodeid}: compat({driver!r}) names no row of tests/support/compat.py's ROWS "
                             f"({', '.join(ROWS)})")
        _session.tests[item.nodeid] = (driver, tuple(aspects))
    if _session.tests or _session.not_collected:
        _session.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write({"status": RUNNING, "started": _session.started, "rows": {}})


def pytest_runtest_logreport(report) -> None:
    if report.nodeid not in _session.tests:
        return
    if hasattr(report, "wasxfail"):
        _session.outcomes[report.nodeid] = "xfailed"
    elif report.failed:
        _session.outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _session.outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call" and _session.outcomes.get(report.nodeid) != "failed":
        _session.outcomes[report.nodeid] = "passed"


def _row_entry(driver: str, row: Row) -> dict:
    """A row as the results file keeps it, and as Column.cell receives it."""
    return {
        "driver": driver,
        "library": row.library,
        "versions": {package: _package_version(package) for package in row.packages},
        "library_version": _library_version(row),
        "tests": {nodeid: {"outcome": _session.outcomes.get(nodeid, NOT_RUN), "aspects": list(aspects)}
                  for nodeid, (test_row, aspects) in sorted(_session.tests.items()) if test_row == driver},
        "not_collected": sorted(_session.not_collected.get(driver, [])),
    }


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _session.started:
        return  # no marked test in this session: the file is another session's
    _write({
        "status": COMPLETE,
        "started": _session.started,
        "environment": f"Python {platform.python_version()}, gevent {_package_version('gevent')}, "
                       f"{platform.machine()}",
        "rows": {driver: _row_entry(driver, row) for driver, row in ROWS.items()},
    })


def _write(results: dict) -> None:
    readme_sections.replace_file(FRESH_PATH, json.dumps(results, indent=2, sort_keys=True) + "\n")


def load_results(path: str = RESULTS_PATH) -> dict:
    """The results of the last session that ran marked tests; SystemExit when
    there are none or that session did not finish."""
    try:
        with open(path) as results_file:
            results = json.load(results_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: no results ({exc}); run the driver tests first (make test)") from None
    if results.get("status") != COMPLETE:
        raise SystemExit(f"{path}: the session that started writing it at {results.get('started', '?')} did not "
                         f"finish (crashed, killed or still running): run the driver tests again (make test)")
    return results


# --- the Markdown table ----------------------------------------------------------

def markdown_table(results: dict) -> str:
    lines = ["| " + " | ".join(column.header for column in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    rows = results["rows"]
    for driver in [driver for driver in ROWS if driver in rows] + sorted(set(rows) - set(ROWS)):
        entry = rows[driver]
        lines.append("| " + " | ".join(column.cell(entry) for column in COLUMNS) + " |")
    lines.append("")
    lines.append(f"Generated by `python -m tests.support.compat` from `tests/compat-results.json`, which the driver tests "
                 f"write ({results['environment']}).")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render tests/compat-results.json as a Markdown table.")
    parser.add_argument("--results", default=RESULTS_PATH, help="the results file (default: %(default)s)")
    parser.add_argument("--fresh", action="store_const", dest="results", const=FRESH_PATH,
                        help=f"the last session's results ({FRESH_PATH}), not the recorded ones")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--readme", metavar="README", help="rewrite this file between the compat markers")
    action.add_argument("--check", metavar="README", help="exit 1 if this file's table differs from the results")
    action.add_argument("--record", metavar="README", help="record the last session's results (make record) "
                                                           "and rewrite this file's table from them")
    args = parser.parse_args(argv)
    if args.record:
        if os.path.exists(FRESH_PATH):
            load_results(FRESH_PATH)  # a crashed or unfinished session is not recorded
        readme_sections.record(RESULTS_PATH)
        args.readme = args.record
    table = markdown_table(load_results(args.results))
    if args.readme:
        readme_sections.write(args.readme, README_SECTION, table)
    elif args.check:
        differences = readme_sections.differences(args.check, README_SECTION, table, args.results)
        if differences:
            print("\n".join(differences), file=sys.stderr)
            print(f"{args.check}: the compatibility table differs from what {args.results} records; "
                  f"after a full `make test`, `make record` records that run", file=sys.stderr)
            return 1
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
