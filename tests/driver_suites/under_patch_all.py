"""The drivers' own test suites greenified by ``greenify.patch_all()``
instead of run.py's ``patch_library`` call, compared with the stock outcomes
run.py recorded (tests/driver_suites/results.json: run ``make driver-suites``
first).  Writes nothing in the repository; prints one line per suite.

    python -m tests.driver_suites.under_patch_all [--only mysqlclient|psycopg2|psycopg|python-ldap]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__:
    from tests.driver_suites import run as suites
else:  # a suite's child, run as a file: its folder is on the path
    import run as suites  # noqa: E402


def _greenify_with_patch_all(suite: "suites.Suite") -> None:
    """run.py's _greenify, with patch_all() for patch_library(suite's target)."""
    import gevent

    import greenify

    importlib.import_module(suite.module)
    report = greenify.patch_all()
    if not any(os.path.basename(path).startswith(suite.library) for path in report.patched_paths):
        raise SystemExit(f"patch_all() did not patch {suite.library}:\n{report}")
    print(report, flush=True)

    def tick() -> None:
        while True:
            gevent.sleep(suites.TICK_S)

    gevent.spawn(tick)


def child(suite: str, source: str, out_path: str) -> None:
    suites._greenify = _greenify_with_patch_all  # noqa: SLF001 - the one step that differs
    suites.child(suite, "greenified", source, out_path)


def run(suite: str) -> int:
    source, _tests_name = suites.suite_source(suites.SUITES[suite])
    stock = suites.load_results()["suites"][suite]["outcomes"]["stock"]
    with contextlib.ExitStack() as stack, tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = suites.prepare(suite, source, suites.Servers(stack))
        started = time.monotonic()
        log_path = os.path.join(suites.CACHE, f"{suite}-patch_all.log")
        with open(log_path, "w") as log:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", suite, source, out.name],
                           env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                           timeout=suites.SUITE_TIMEOUT_S)
        try:
            document = json.load(open(out.name))
        except ValueError:  # the child stopped first, saying why (e.g. patch_all() left the library alone)
            with open(log_path) as log:
                print(f"{suite} under patch_all(): no results; {log.readline().strip()} (log: {log_path})")
            return 1
    comparison = suites.compare(stock, document["outcomes"])
    print(f"{suite} under patch_all(): {suites.count(document['outcomes'])}; stock (recorded): "
          f"{suites.count(stock)}; {document.get('waits')} waits; {time.monotonic() - started:.0f} s; "
          f"passed stock, not under patch_all(): {comparison['regressions'] or 'none'} (log: {log_path})")
    return 1 if comparison["regressions"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # not the patch_on_load suites (pyodbc's): their library loads at the first connect, after patch_all()
    patch_library_suites = [name for name, suite in suites.SUITES.items() if not suite.on_load]
    parser.add_argument("--only", choices=patch_library_suites, action="append")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(*options.child)
        return 0
    return max(run(suite) for suite in options.only or patch_library_suites)


if __name__ == "__main__":
    sys.exit(main())
