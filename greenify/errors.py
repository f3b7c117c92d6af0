"""The exceptions greenify raises; every one names its target."""
from __future__ import annotations


class GreenifyError(Exception):
    """Base class of greenify's errors."""
