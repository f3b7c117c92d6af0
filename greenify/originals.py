"""The standard library's own objects, whether gevent monkey-patched them or
not, without importing gevent."""
from __future__ import annotations

import importlib
import sys


def get_original(module_name: str, item_name: str):
    """``module_name.item_name`` as it was before any monkey patching."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module_name, item_name)
    # nothing can have been patched without gevent.monkey
    return getattr(importlib.import_module(module_name), item_name)
