"""Waiters: how a greenlet's green calls wait, chosen per greenlet (greenify.waiting.bridge).

A greenlet registered with use_waiter waits through its waiter instead of a
gevent hub; greenify itself never imports gevent."""
from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import threading

import pytest
from greenlet import greenlet

import greenify
from tests.support.green_support import buffer, no_interruption_pending, socketpair
from greenify.waiting import bridge as _bridge
from greenify._green import ffi, lib


class SelectWaiter:
    """A waiter that blocks the thread in select(): enough to see what the
    bridge asks of a waiter."""

    def __init__(self, offload_to_thread: bool = True):
        self.waits = []
        self.closed = []
        self.offload_to_thread = offload_to_thread
        self.offloaded = 0
        self.workers = []
        self.ran_in = []  # the threads job runners ran in

    def wait(self, watches, timeout):
        self.waits.append((list(watches), timeout))
        readers = [fd for fd, events in watches if events & _bridge.READ]
        writers = [fd for fd, events in watches if events & _bridge.WRITE]
        ready = select.select(readers, writers, [], timeout)
        return _bridge.WOKEN if any(ready) else _bridge.TIMED_OUT

    def closing(self, fd):
        self.closed.append(fd)

    def offload(self, job_runner):
        self.offloaded += 1
        if not self.offload_to_thread:
            return False
        def run():
            self.ran_in.append(threading.get_ident())
            job_runner()

        worker = threading.Thread(target=run)
        worker.start()
        self.workers.append(worker)
        return True


@pytest.fixture(autouse=True)
def active():
    greenify.greenify()
    yield
    assert no_interruption_pending()


def run_with(waiter, func, *args):
    glet = greenlet(func)
    _bridge.use_waiter(glet, waiter)
    try:
        return glet.switch(*args)
    finally:
        _bridge.drop_waiter(glet)


def test_a_registered_waiter_serves_the_greenlets_waits():
    a, b = socketpair()
    threading.Timer(0.05, b.send, (b"hi",)).start()
    waiter = SelectWaiter()
    into = buffer(8)
    assert run_with(waiter, lambda: lib.green_recv(a.fileno(), into, 8, 0)) == 2
    assert waiter.waits and waiter.waits[0] == ([(a.fileno(), _bridge.READ)], None)
    a.close(), b.close()


def test_a_timeout_reaches_the_waiter_in_seconds():
    a, b = socketpair()
    waiter = SelectWaiter()
    fds = ffi.new("struct pollfd[1]", [(a.fileno(), 1, 0)])  # POLLIN
    assert run_with(waiter, lambda: lib.green_poll(fds, 1, 50)) == 0
    (watches, timeout), *_ = waiter.waits
    assert watches == [(a.fileno(), _bridge.READ)] and 0 < timeout <= 0.05
    a.close(), b.close()


def test_a_waiter_that_raises_interrupts_the_call_and_the_exception_comes_out_in_the_greenlet():
    class Cancelled(BaseException):
        pass

    class CancellingWaiter(SelectWaiter):
        def wait(self, watches, timeout):
            raise Cancelled()

    a, b = socketpair()
    into = buffer(8)
    seen = {}

    def call():
        try:
            result = lib.green_recv(a.fileno(), into, 8, 0)
            seen["errno"] = ffi.errno
            seen["result"] = result
            return "not interrupted"
        except Cancelled:
            return "cancelled"

    assert run_with(CancellingWaiter(), call) == "cancelled"
    assert seen == {}  # raised as soon as the call was back in Python, before the next line
    a.close(), b.close()


def test_closing_a_descriptor_tells_the_waiters_of_this_thread():
    # close enters Python only while some wait is in progress: one is, in another thread
    class SignallingWaiter(SelectWaiter):
        def wait(self, watches, timeout):
            entered.set()
            return super().wait(watches, timeout)

    entered = threading.Event()
    c, d = socketpair()
    into = buffer(1)
    blocked = threading.Thread(target=run_with, args=(SignallingWaiter(), lambda: lib.green_recv(c.fileno(), into, 1, 0)))
    blocked.start()
    assert entered.wait(10)
    here, elsewhere = SelectWaiter(), SelectWaiter()
    mine, theirs = greenlet(lambda: None), [None]
    other_thread = threading.Thread(target=lambda: theirs.__setitem__(0, greenlet(lambda: None)))
    other_thread.start(), other_thread.join()
    _bridge.use_waiter(mine, here)
    _bridge.use_waiter(theirs[0], elsewhere)
    a, b = socketpair()
    try:
        fd = b.detach()
        assert lib.green_close(fd) == 0
    finally:
        _bridge.drop_waiter(mine)
        _bridge.drop_waiter(theirs[0])
        d.send(b"x")
        blocked.join()
    assert here.closed == [fd]
    assert elsewhere.closed == []  # registered for a greenlet of another thread
    a.close(), c.close(), d.close()


@pytest.mark.parametrize("in_thread", [True, False], ids=["offloaded", "refused"])
def test_a_resolver_call_is_offered_to_the_waiter(in_thread):
    waiter = SelectWaiter(offload_to_thread=in_thread)
    result = ffi.new("struct addrinfo **")
    assert run_with(waiter, lambda: lib.green_getaddrinfo(b"localhost", ffi.NULL, ffi.NULL, result)) == 0
    lib.freeaddrinfo(result[0])
    assert waiter.offloaded == 1
    if in_thread:
        assert waiter.ran_in and threading.get_ident() not in waiter.ran_in
    else:
        assert waiter.waits == []  # refused: libc called directly, nothing to wait for
    for worker in waiter.workers:
        worker.join()  # the worker drops its reference to the job when its thread ends
    assert lib.green_offload_live_jobs() == 0


def test_greenify_never_imports_gevent():
    script = textwrap.dedent("""
        import sys, threading
        from greenlet import greenlet
        import greenify
        from greenify.waiting import bridge as _bridge
        from greenify._green import ffi, lib
        greenify.greenify()
        greenify.patch_library("libc.so.6") if False else None
        assert "gevent" not in sys.modules, "import greenify imported gevent"
        import socket, select
        class Waiter:
            def wait(self, watches, timeout):
                select.select([fd for fd, _ in watches], [], [], timeout)
                return _bridge.WOKEN
            def closing(self, fd): pass
            def offload(self, runner): return False
        a, b = socket.socketpair()
        threading.Timer(0.05, b.send, (b"hi",)).start()
        into = ffi.new("char[]", 8)
        glet = greenlet(lambda: lib.green_recv(a.fileno(), into, 8, 0))
        _bridge.use_waiter(glet, Waiter())
        assert glet.switch() == 2
        # without a waiter and without gevent: native blocking
        threading.Timer(0.05, b.send, (b"hi",)).start()
        assert lib.green_recv(a.fileno(), into, 8, 0) == 2
        assert "gevent" not in sys.modules, "a wait imported gevent"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_patch_library_does_not_import_gevent(fixture_libs):
    script = textwrap.dedent(f"""
        import ctypes, sys
        import greenify
        ctypes.CDLL({str(fixture_libs["default"]["fx_client"])!r})
        report = greenify.patch_library({str(fixture_libs["default"]["fx_client"])!r})
        assert report, report
        assert "gevent" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_registered_waiter_comes_before_the_threads_hub_and_its_wait_below_python():
    import gevent
    a, b = socketpair()
    into = buffer(8)
    # a wait on this thread's hub first: the hub is attached to the wait below Python
    gevent.spawn_later(0.02, b.send, b"hub")
    assert gevent.spawn(lib.green_recv, a.fileno(), into, 8, 0).get(timeout=10) == 3
    threading.Timer(0.05, b.send, (b"hi",)).start()
    waiter = SelectWaiter()
    assert run_with(waiter, lambda: lib.green_recv(a.fileno(), into, 8, 0)) == 2
    assert waiter.waits == [([(a.fileno(), _bridge.READ)], None)]
    a.close(), b.close()
