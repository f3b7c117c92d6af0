"""Watching: what blocks an event loop's thread, read from outside.

blocked.py reads which native call a thread is blocked in (/proc: the
system call, the calling library found on the stack, the descriptor);
monitor.py is greenify.watch(), a thread that reports such calls when they
keep a hub or loop from running.  It observes and never patches.

May use: greenify.functions, greenify.patching (what objects import and
whether their slots are patched).
"""
