"""What the tests of issue 27's clients (tests/test_clients_*.py) share:
greenify-inspect's recommendation, applied as a user would apply it."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from typing import Iterator, List

import greenify


def recommended_calls(*modules: str) -> List[str]:
    """The names `greenify-inspect --json --import MODULES` tells a user to
    pass to greenify.patch_library, in its order."""
    result = subprocess.run([sys.executable, "-m", "greenify.tools.inspector", "--json", "--import", *modules],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"greenify-inspect --import {' '.join(modules)}: {result.stderr}"
    names = json.loads(result.stdout)["patch_library"]
    assert names, f"greenify-inspect recommends nothing for {' '.join(modules)}"
    return names


@contextlib.contextmanager
def patched_as_recommended(*modules: str) -> Iterator[List[str]]:
    """greenify.patch_library(name) for each name the inspector recommends
    for MODULES (imported in this process already), undone afterwards."""
    names = recommended_calls(*modules)
    with contextlib.ExitStack() as stack:
        for name in names:
            assert stack.enter_context(greenify.patched(name)), f"patch_library({name!r}) patched nothing"
        yield names
