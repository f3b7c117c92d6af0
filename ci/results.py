"""Where greenify was run: the results of `make test-versions` and
`make test-aarch64`, and the README's statement generated from them.

Each run of those targets records one entry of the fresh results,
.results/ci/results.json (started from the recorded ci/results.json, which
only `make record` replaces), from the JUnit XML pytest wrote:

    python -m ci.results record --name 3.10 --junit run.xml --python 3.10.13 --machine x86_64

and the README's paragraph between the platforms markers is rendered from the
whole file:

    python -m ci.results readme docs/platforms.md           # rewrite it
    python -m ci.results readme docs/platforms.md --check   # fail if it says anything else
    python -m ci.results --fresh readme ...         # from the fresh results, not the recorded ones
    python -m ci.results readme docs/platforms.md --record  # record the fresh results, then rewrite it

`--check` also compares pyproject.toml's requires-python and its
"Programming Language :: Python :: 3.N" classifiers with the versions that
passed (plus the interpreter that runs the whole suite, which is not
recorded here), so that neither can claim a version no run proved.

The statement names the versions, the machine, the test files and the
verdict; counts and timings stay in the JSON (they change with every test
added, the verdict does not).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

from tests.support import readme_sections  # run as `python -m ci.results` from the root

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_PATH = os.path.join(HERE, "results.json")  # recorded
FRESH_PATH = readme_sections.fresh_path(RESULTS_PATH)
PYPROJECT_PATH = os.path.join(os.path.dirname(HERE), "pyproject.toml")
README_SECTION = "platforms"  # the README's generated part (tests/support/readme_sections.py)


def load(path: str = RESULTS_PATH) -> Dict[str, dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as results:
        return json.load(results)


def load_fresh() -> Dict[str, dict]:
    """The fresh results, or the recorded ones while no run has written any."""
    return load(readme_sections.latest(RESULTS_PATH))


def save(results: Dict[str, dict], path: str = FRESH_PATH) -> None:
    readme_sections.replace_file(path, json.dumps(results, indent=2, sort_keys=True) + "\n")


def _test_file(classname: str) -> str:
    """tests/test_x.py from pytest's classname tests.test_x(.TestClass)."""
    parts = classname.split(".")
    for i, part in enumerate(parts):
        if part.startswith("test_"):
            return "/".join(parts[:i + 1]) + ".py"
    return classname or "?"


def summarize_junit(path: str) -> dict:
    """Counts per outcome, the test files and the seconds pytest measured."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    files = set()
    failures: List[str] = []
    seconds = 0.0
    for suite in suites:
        seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            classname = case.get("classname", "")
            files.add(_test_file(classname))
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                failures.append(f"{classname}::{case.get('name')}")
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return {"counts": counts, "files": sorted(files), "failures": failures, "seconds": round(seconds, 1)}


def read_deselect(path: str) -> List[List[str]]:
    """[node id, reason] per line of a deselect list (ci/aarch64-deselect.txt)."""
    found = []
    with open(path) as listing:
        for line in listing:
            if line.strip() and not line.startswith("#"):
                nodeid, _, reason = line.strip().partition(" ")
                found.append([nodeid, reason.strip()])
    return found


def record(name: str, junit: str, python: str, machine: str, note: str, deselect: Optional[str] = None,
           path: Optional[str] = None) -> dict:
    """Add this run's entry to the results in `path` (default: the fresh ones)."""
    entry = summarize_junit(junit)
    entry.update(python=python, machine=machine, note=note, date=time.strftime("%Y-%m-%d", time.gmtime()),
                 deselected=read_deselect(deselect) if deselect else [])
    results = load(path) if path else load_fresh()
    results[name] = entry
    save(results, path or FRESH_PATH)
    return entry


def verdict(entry: dict) -> str:
    counts = entry["counts"]
    if counts["failed"]:
        return "failed"
    if not counts["passed"]:
        return "nothing ran"
    return f"passed, {counts['skipped']} skipped" if counts["skipped"] else "passed"


def _files(entry: dict) -> str:
    """The test modules' names, in order of name (not of the folders they sit in)."""
    return ", ".join(f"`{name}`" for name in sorted(path.rsplit("/", 1)[-1][:-3] for path in entry["files"]))


def statement(results: Dict[str, dict]) -> str:
    """The README's paragraph: one line per recorded run."""
    lines = ["Generated by `python -m ci.results readme docs/platforms.md` from `ci/results.json`, which",
             "`make test-versions` and `make test-aarch64` write:", ""]
    for name in sorted(results):
        entry = results[name]
        where = entry["machine"] + (f" ({entry['note']})" if entry.get("note") else "")
        lines.append(f"- `{name}`: CPython {entry['python']} on {where}: **{verdict(entry)}**; "
                     f"{_files(entry)}")
        for nodeid, reason in entry.get("deselected", []):
            lines.append(f"  - not run there: `{nodeid.split('/')[-1]}`: {reason}")
    return "\n".join(lines)


def passed_minor_versions(results: Dict[str, dict]) -> List[str]:
    return sorted({".".join(entry["python"].split(".")[:2]) for entry in results.values()
                   if verdict(entry).startswith("passed")}, key=lambda v: tuple(map(int, v.split("."))))


def pyproject_problems(results: Dict[str, dict], suite_python: str, path: str = PYPROJECT_PATH) -> List[str]:
    """What pyproject.toml claims beyond (or short of) the versions that passed."""
    with open(path) as pyproject:
        text = pyproject.read()
    proven = sorted(set(passed_minor_versions(results)) | {suite_python},
                    key=lambda v: tuple(map(int, v.split("."))))
    claimed = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)
    problems = []
    if sorted(claimed, key=lambda v: tuple(map(int, v.split(".")))) != proven:
        problems.append(f"{path}: classifiers name Python {', '.join(claimed) or 'nothing'}; "
                        f"the runs proved {', '.join(proven)}")
    requires = re.search(r'requires-python\s*=\s*"([^"]*)"', text)
    wanted = f">={proven[0]}"
    if requires is None or requires.group(1) != wanted:
        problems.append(f"{path}: requires-python is {requires.group(1) if requires else 'missing'!r}; "
                        f"the oldest version proven is {proven[0]} ({wanted!r})")
    return problems


def readme(path: str, check: bool, results: Dict[str, dict], source: str = RESULTS_PATH) -> List[str]:
    if check:
        differences = readme_sections.differences(path, README_SECTION, statement(results), source)
        return differences + ([f"{path}: after the runs, `make record` records them into {path}; commit both"]
                              if differences else [])
    readme_sections.write(path, README_SECTION, statement(results))
    return []


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", help=f"the results file (record: default {FRESH_PATH}; "
                                          f"readme: default {RESULTS_PATH})")
    parser.add_argument("--fresh", action="store_true", help="readme from the fresh results, not the recorded ones")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="record one run from pytest's JUnit XML")
    rec.add_argument("--name", required=True)
    rec.add_argument("--junit", required=True)
    rec.add_argument("--python", required=True, help="the interpreter's full version, e.g. 3.10.13")
    rec.add_argument("--machine", required=True, help="e.g. x86_64, aarch64")
    rec.add_argument("--note", default="", help="how it ran, e.g. 'Debian 12 arm64 under qemu-user'")
    rec.add_argument("--deselect", help="the list of tests deselected in this run, with reasons")
    text = commands.add_parser("readme", help="write (or --check) the README's statement")
    text.add_argument("path")
    text.add_argument("--check", action="store_true")
    text.add_argument("--record", action="store_true", help="first record the fresh results (make record)")
    text.add_argument("--suite-python", default="%d.%d" % sys.version_info[:2],
                      help="the version the whole suite runs on (default: this interpreter's)")
    args = parser.parse_args(argv)

    if args.command == "record":
        entry = record(args.name, args.junit, args.python, args.machine, args.note, args.deselect, args.results)
        print(f"{args.name}: {entry['counts']} in {entry['seconds']} s -> {args.results or FRESH_PATH}")
        for failure in entry["failures"]:
            print(f"  failed: {failure}")
        return 1 if entry["counts"]["failed"] else 0

    if args.record:
        readme_sections.record(RESULTS_PATH)
    if args.results:
        source, results = args.results, load(args.results)
    elif args.fresh:
        source = readme_sections.latest(RESULTS_PATH)
        results = load(source)
    else:
        source, results = RESULTS_PATH, load(RESULTS_PATH)
    problems = readme(args.path, args.check, results, source)
    if args.check:
        problems += pyproject_problems(results, args.suite_python)
        problems += [f"{source}: run {name} {verdict(entry)}" for name, entry in sorted(results.items())
                     if not verdict(entry).startswith("passed")]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
