"""The README's generated parts, one rule for all of them.

Each lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, is
written by the script that owns its source (compat: tests/compat.py; tls:
tests/tls_results.py; driver-suites: tests/driver_suites/run.py; platforms:
ci/results.py; bench: bench/run.py; asyncio-bench: bench/asyncio_bench.py) and is checked against that source by
``make check-readme``, which CI runs: a figure in a generated part is never
edited by hand.
"""
from __future__ import annotations

import difflib
import os
from typing import List, Tuple


class MissingSection(Exception):
    """The file has no such pair of markers."""


def markers(name: str) -> Tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old or the new file)."""
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
