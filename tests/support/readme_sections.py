"""The generated parts of the README and the documentation, one rule for all.

Each lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in the
file that shows it, is written by the script that owns its source, and is
checked against that source by ``make check-readme``, which CI runs: a
figure in a generated part is never edited by hand.  The Makefile's
``record`` and ``check-readme`` targets name each part's file:

    compat          README.md           tests/support/compat.py
    tls             docs/guide.md       tests/support/tls_results.py
    driver-suites   docs/platforms.md   tests/driver_suites/run.py
    platforms       docs/platforms.md   ci/results.py
    bench           docs/benchmarks.md  bench/run.py
    asyncio-bench   docs/benchmarks.md  bench/asyncio_bench.py

Fresh and recorded results: a run (the tests, `make bench`, the platform
targets) writes its results under ``.results/`` (ignored by git), at the path
of the committed file they may replace (``fresh_path``), so that running
anything leaves the checkout as it was.  ``make record`` copies them over the
committed files and renders the README from those (``record``): recording a
run is a decision, taken on its own.
"""
from __future__ import annotations

import difflib
import os
import shutil
import sys
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRESH_DIR = os.path.join(REPO, ".results")


class MissingSection(Exception):
    """The file has no such pair of markers."""


def markers(name: str) -> Tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old or the new
    file), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)


def _split(path: str, name: str) -> Tuple[str, str, str]:
    start_marker, end_marker = markers(name)
    with open(path) as readme:
        text = readme.read()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise MissingSection(f"{path}: no {start_marker} ... {end_marker} markers")
    start += len(start_marker)
    return text[:start], text[start:end], text[end:]


def write(path: str, name: str, generated: str) -> None:
    """Put ``generated`` between the markers of section ``name``."""
    before, _current, after = _split(path, name)
    replace_file(path, before + "\n" + generated.strip("\n") + "\n" + after)


def differences(path: str, name: str, generated: str, source: str) -> List[str]:
    """How section ``name`` differs from ``generated`` (rendered from
    ``source``), as a unified diff; [] when it does not."""
    try:
        _before, current, _after = _split(path, name)
    except MissingSection as missing:
        return [str(missing)]
    return list(difflib.unified_diff(current.strip("\n").splitlines(), generated.strip("\n").splitlines(),
                                     f"{path} (section {name})", source, lineterm=""))


def fresh_path(recorded_path: str) -> str:
    """Where a run writes the results that ``make record`` copies to
    ``recorded_path`` (a committed file): the same path under .results/."""
    return os.path.join(FRESH_DIR, os.path.relpath(os.path.abspath(recorded_path), REPO))


def latest(recorded_path: str) -> str:
    """The fresh results when a run has written some, else the recorded ones:
    for results that a run adds to (one entry per driver, suite or platform)
    rather than rewrites whole."""
    fresh = fresh_path(recorded_path)
    return fresh if os.path.exists(fresh) else recorded_path


def record(recorded_path: str) -> bool:
    """Copy this checkout's fresh results over the committed ``recorded_path``
    (and say so); False, saying so, when no run wrote any."""
    fresh = fresh_path(recorded_path)
    recorded = os.path.relpath(recorded_path, REPO)
    if not os.path.exists(fresh):
        print(f"record: {recorded} stays as it is (no fresh results in {os.path.relpath(fresh, REPO)})",
              file=sys.stderr)
        return False
    shutil.copyfile(fresh, recorded_path + ".tmp")
    os.replace(recorded_path + ".tmp", recorded_path)
    print(f"record: {recorded} <- {os.path.relpath(fresh, REPO)}", file=sys.stderr)
    return True
