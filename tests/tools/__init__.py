"""Tests of the tools (greenify/tools/, greenify/watching/) and of the documentation's examples."""
