"""Tests of the wait (csrc/wait/, greenify/waiting/): the fast wait, the bridge, interruptions, asyncio."""
