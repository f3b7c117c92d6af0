"""Patching loaded libraries (placeholder: being written for issue 3)."""
