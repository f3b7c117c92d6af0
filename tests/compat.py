"""Issue 5's compatibility table, generated from the driver tests.

A test marked ``@pytest.mark.compat("psycopg2")`` (or a module with
``pytestmark = pytest.mark.compat("MySQLdb")``) counts for that driver's row
of ROWS.  When a session in which marked tests ran ends, this plugin writes
each row's driver and C library versions and its tests' outcomes to
tests/compat-results.json, one outcome per test; tests that did not run
this time keep the outcome the file gave them before, so running one test
file, or one test, updates only what ran.

As a script it renders that file as the README's Markdown table:

    python tests/compat.py                    # print the table
    python tests/compat.py --readme README.md # rewrite it between the markers
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat-results.json")
README_START = "<!-- compat:start -->"
README_END = "<!-- compat:end -->"


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


ROWS: Dict[str, Row] = {row.driver: row for row in [
    Row("MySQLdb", ("mysqlclient",), "libmariadb.so.3 (Debian's), as `MySQLdb._mysql` or `\"libmariadb\"`",
        "MySQLdb", lambda MySQLdb: MySQLdb._mysql.get_client_info()),
    Row("MySQLdb under gunicorn", ("gunicorn", "mysqlclient"), "libmariadb.so.3, patched in `post_fork` of the gevent worker",
        "MySQLdb", lambda MySQLdb: MySQLdb._mysql.get_client_info()),
    Row("psycopg2", ("psycopg2-binary",), "libpq bundled in `psycopg2_binary.libs`, as `\"libpq\"`",
        "psycopg2", _libpq_version),
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


def row_result(passed: int, failed: int, skipped: int) -> str:
    if failed:
        return "failed"
    if passed:
        return "passed"
    return "skipped"


# --- the pytest plugin ---------------------------------------------------------

_row_of_test: Dict[str, str] = {}   # nodeid -> row name, for marked tests
_outcomes: Dict[str, str] = {}      # nodeid -> passed / failed / skipped / xfailed, this session
_collected_files: set = set()       # test files collected this session, before any -k deselection


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "compat(driver): the test counts for that driver's row of the "
                                       "README's compatibility table (tests/compat.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    for item in items:
        _collected_files.add(_file_of(item.nodeid))
        marker = item.get_closest_marker("compat")
        if marker is None:
            continue
        driver = marker.args[0]
        if driver not in ROWS:
            raise ValueError(f"{item.nodeid}: compat({driver!r}) names no row of tests/compat.py's ROWS "
                             f"({', '.join(ROWS)})")
        _row_of_test[item.nodeid] = driver


def pytest_runtest_logreport(report) -> None:
    if report.nodeid in _row_of_test:
        record_outcome(_outcomes, report)


def record_outcome(outcomes: Dict[str, str], report) -> None:
    """Keep in `outcomes` what the report says of its test (tests/compat_asyncio.py uses it too)."""
    if hasattr(report, "wasxfail"):
        outcomes[report.nodeid] = "xfailed"
    elif report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.skipped:
        outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call" and outcomes.get(report.nodeid) != "failed":
        outcomes[report.nodeid] = "passed"


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _outcomes:
        return
    results = load_results()
    for driver, row in ROWS.items():
        ran = {nodeid: outcome for nodeid, outcome in _outcomes.items() if _row_of_test[nodeid] == driver}
        earlier = results["rows"].get(driver, {})
        # Merge with earlier runs: a test that did not run this time keeps its
        # outcome, unless its file was collected and it was not in it
        # (renamed, removed or no longer marked) or its file is gone.
        tests = {nodeid: outcome for nodeid, outcome in earlier.get("tests", {}).items()
                 if (_file_of(nodeid) not in _collected_files or _row_of_test.get(nodeid) == driver)
                 and os.path.exists(os.path.join(session.config.rootpath, _file_of(nodeid)))}
        tests.update(ran)
        if not tests:
            results["rows"].pop(driver, None)
            continue
        if not ran and tests == earlier.get("tests"):
            continue  # nothing new: keep the versions it was recorded with
        counts = {kind: sum(1 for outcome in tests.values() if outcome == kind)
                  for kind in ("passed", "failed", "skipped", "xfailed")}
        entry = dict(earlier) if not ran else {
            "versions": {package: _package_version(package) for package in row.packages},
            "library_version": _library_version(row),
            "python": platform.python_version(),
            "gevent": _package_version("gevent"),
            "machine": platform.machine(),
        }
        entry.update(driver=driver, library=row.library, **counts, tests=dict(sorted(tests.items())),
                     result=row_result(counts["passed"], counts["failed"], counts["skipped"]))
        results["rows"][driver] = entry
    with open(RESULTS_PATH + ".tmp", "w") as out:
        json.dump(results, out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(RESULTS_PATH + ".tmp", RESULTS_PATH)


def load_results(path: str = RESULTS_PATH) -> dict:
    try:
        with open(path) as results_file:
            results = json.load(results_file)
    except (OSError, ValueError):
        results = {}
    results.setdefault("rows", {})
    return results


# --- the Markdown table ----------------------------------------------------------

def markdown_table(results: dict) -> str:
    rows = results["rows"]
    lines = ["| driver | version | C library greenify patches | library version | tests | result |",
             "|---|---|---|---|---|---|"]
    environments = set()
    for driver in list(ROWS) + sorted(set(rows) - set(ROWS)):
        if driver not in rows:
            continue
        row = rows[driver]
        environments.add(f"Python {row['python']}, gevent {row['gevent']}, {row['machine']}")
        total = row["passed"] + row["failed"] + row["skipped"]
        tests = f"{row['passed']} of {total} passed"
        if row["skipped"]:
            tests += f", {row['skipped']} skipped"
        if row["xfailed"]:
            tests += f", {row['xfailed']} known failures"
        versions = ", ".join(f"{package} {version}" for package, version in row["versions"].items())
        lines.append(f"| {row['driver']} | {versions} | {row['library']} "
                     f"| {row['library_version']} | {tests} | **{row['result']}** |")
    lines.append("")
    lines.append(f"Generated by `python tests/compat.py` from `tests/compat-results.json`, which the driver tests "
                 f"write ({'; '.join(sorted(environments)) or 'no results yet'}).")
    return "\n".join(lines)


def rewrite_readme(readme_path: str, table: str) -> None:
    """Replace what lies between README_START and README_END with `table`."""
    with open(readme_path) as readme:
        text = readme.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme_path}: no {README_START} ... {README_END} markers to write the table between")
    text = text[:start + len(README_START)] + "\n" + table + "\n" + text[end:]
    with open(readme_path + ".tmp", "w") as out:
        out.write(text)
    os.replace(readme_path + ".tmp", readme_path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render tests/compat-results.json as a Markdown table.")
    parser.add_argument("--results", default=RESULTS_PATH, help="the results file (default: %(default)s)")
    parser.add_argument("--readme", help="rewrite this file between the compat markers instead of printing")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    if not results["rows"]:
        print(f"{args.results}: no results; run the driver tests first (make test)", file=sys.stderr)
        return 1
    table = markdown_table(results)
    if args.readme:
        rewrite_readme(args.readme, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
