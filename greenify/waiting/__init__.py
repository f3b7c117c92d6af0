"""Waiting: how a green twin's wait is carried out, below and in Python.

entries.py is the one door from C into Python (the callbacks the C wait
layer calls); bridge.py chooses the waiter and keeps interruptions;
gevent_side.py waits on a gevent hub, with fastwait.py attaching the hub for
the wait below Python; asyncio_side.py waits on an asyncio loop; offload.py
hands resolver jobs to worker threads; stats.py reads the wait statistics.
The gevent and asyncio sides share the green functions and differ only in
how a wait is carried out.

May use: greenify.errors, greenify.functions, the cffi module; patching
only through entries.py's one callback for objects loaded by a hooked
dlopen.
"""
