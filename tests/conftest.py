"""Shared fixtures: each concern lives in its own module beside this file."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

pytest_plugins = [name for name in ("fixturelib", "servers", "compat")
                  if os.path.exists(os.path.join(os.path.dirname(__file__), name + ".py"))]
