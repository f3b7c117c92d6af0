"""The suite's support package: real servers started on free ports (servers.py), the fixture
libraries (fixturelib.py), helpers that call the twins and libc side by side, and the recorded
results the README and docs are generated from.  Tests use these instead of greenify's internals."""

import os
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]


def module_command(module: str, *args: str) -> List[str]:
    """``python -m module args`` with this interpreter: a support module run in
    a child process (children_env() puts the repository on its path)."""
    return [sys.executable, "-m", module, *args]


def children_env(**extra: str) -> Dict[str, str]:
    """The environment for such a child: the repository after whatever
    PYTHONPATH already holds (a sanitized build stays first)."""
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    return {**os.environ, "PYTHONPATH": path, **extra}
