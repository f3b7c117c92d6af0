"""greenify.asyncio: the green functions awaited on a running event loop.

The green twins are called through cffi inside ``greenify.asyncio.run`` (as a
patched library would call them), on the default event loop and on uvloop.
A "ticker" coroutine counts loop iterations while a call waits: it ticks
only if the call awaits the loop instead of blocking it.  Results and errno
are compared with libc's; cancellation, timeouts, close of a watched fd,
name resolution, several threads each with a loop, gevent in another thread,
and bad use each have a test.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import errno
import select
import socket
import sys
import threading
import time

import gevent
import pytest

import greenify
import greenify.asyncio as gasyncio
from greenify.waiting import asyncio_side
from tests.support import servers
from tests.support.green_support import no_interruption_pending
from greenify._green import ffi, lib

# Twenty 0.3 s waits: 6 s one after another, about 0.3 s together.  The bound
# leaves room for a loaded 2-core machine.
CONCURRENT = 20
WAIT_S = 0.3
TOGETHER_BOUND_S = 3.0
TICK_S = 0.01


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request):
    """A factory of event loops of the kind the test runs on."""
    if request.param == "uvloop":
        uvloop = servers.require_module("uvloop", "uvloop")
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_on(new_loop, main):
    """Run the coroutine function `main` on a new loop from `new_loop`, then close the loop."""
    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


class Ticker:
    """Counts the loop's iterations while it runs (a blocked loop does not tick)."""

    def __enter__(self):
        self.ticks = 0
        self.task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self):
        while True:
            await asyncio.sleep(TICK_S)
            self.ticks += 1

    def __exit__(self, *exc_info):
        self.task.cancel()


def nothing_registered(fd: int) -> bool:
    """No wait of this thread's greenify.asyncio waiter holds fd, and the
    default loop's selector does not watch it."""
    waiter = asyncio_side._local.waiter
    if fd in waiter.readers or fd in waiter.writers:
        return False
    selector = getattr(waiter.loop, "_selector", None)
    return selector is None or fd not in selector.get_map()


def recv_into(fd: int, size: int = 64):
    buf = ffi.new("char[]", size)
    ffi.errno = 0
    result = lib.green_recv(fd, buf, size, 0)
    return result, ffi.errno, ffi.buffer(buf, max(result, 0))[:]


def recording_recv(fd: int, seen: list):
    """fn for run: recv_into(fd), appending to `seen` the type of any exception raised in it."""
    def recv_and_record():
        try:
            return recv_into(fd)
        except BaseException as exc:
            seen.append(type(exc))
            raise
    return recv_and_record


def usleep(seconds: float):
    ffi.errno = 0
    return lib.green_usleep(int(seconds * 1e6)), ffi.errno


# --- waits together, libc's results ---------------------------------------------

def test_sleeps_in_run_wait_together_and_return_libc_results(new_loop):
    async def main():
        with Ticker() as ticker:
            started = time.monotonic()
            results = await asyncio.gather(*(gasyncio.run(usleep, WAIT_S) for _ in range(CONCURRENT)))
            elapsed = time.monotonic() - started
        return results, elapsed, ticker.ticks

    results, elapsed, ticks = run_on(new_loop, main)
    assert results == [(0, 0)] * CONCURRENT
    assert WAIT_S <= elapsed < TOGETHER_BOUND_S, f"{CONCURRENT} sleeps of {WAIT_S} s took {elapsed:.2f} s"
    assert ticks >= 3, f"the loop ticked {ticks} times while the sleeps waited: it was blocked"


def test_nanosleep_reports_no_time_left_and_clock_nanosleep_its_result(new_loop):
    def sleeps():
        request, left = ffi.new("struct timespec *"), ffi.new("struct timespec *", {"tv_sec": 7, "tv_nsec": 7})
        request.tv_nsec = int(WAIT_S * 1e9)
        ffi.errno = 0
        first = (lib.green_nanosleep(request, left), ffi.errno, left.tv_sec, left.tv_nsec)
        second = lib.green_clock_nanosleep(time.CLOCK_MONOTONIC, 0, request, ffi.NULL)
        return first, second

    async def main():
        with Ticker() as ticker:
            started = time.monotonic()
            result = await gasyncio.run(sleeps)
            return result, time.monotonic() - started, ticker.ticks

    (first, second), elapsed, ticks = run_on(new_loop, main)
    assert first == (0, 0, 7, 7)  # libc leaves *rem alone on success
    assert second == 0
    assert elapsed >= 2 * WAIT_S and ticks >= 3


def test_recv_waits_on_the_loop_until_data_arrives(new_loop):
    reader, writer = socket.socketpair()

    async def main():
        async def send_later():
            await asyncio.sleep(WAIT_S)
            writer.send(b"ping")
        with Ticker() as ticker:
            sender = asyncio.ensure_future(send_later())
            result = await gasyncio.run(recv_into, reader.fileno())
            await sender
            return result, ticker.ticks, nothing_registered(reader.fileno())

    with reader, writer:
        (result, error, data), ticks, clean = run_on(new_loop, main)
    assert (result, data) == (4, b"ping")
    assert ticks >= 3 and clean


def test_poll_timeout_and_epoll_wait_behave_as_libc(new_loop):
    a, b = socket.socketpair()
    epoll = select.epoll()
    epoll.register(a.fileno(), select.EPOLLIN)

    def poll_then_epoll():
        fds = ffi.new("struct pollfd[1]", [{"fd": a.fileno(), "events": select.POLLIN}])
        ffi.errno = 0
        timed_out = (lib.green_poll(fds, 1, int(WAIT_S * 1000)), ffi.errno, fds[0].revents)
        events = ffi.new("struct epoll_event[4]")
        ready = lib.green_epoll_wait(epoll.fileno(), events, 4, -1)
        return timed_out, ready, events[0].events & select.EPOLLIN

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(2 * WAIT_S, b.send, b"x")
        with Ticker() as ticker:
            started = time.monotonic()
            result = await gasyncio.run(poll_then_epoll)
            return result, time.monotonic() - started, ticker.ticks

    with a, b, epoll:
        (timed_out, ready, readable), elapsed, ticks = run_on(new_loop, main)
    assert timed_out == (0, 0, 0)
    assert (ready, readable) == (1, select.EPOLLIN)
    assert elapsed >= 2 * WAIT_S - 0.02 and ticks >= 5  # the send is on the loop's clock (uvloop's: ms)


def test_return_value_exception_and_context_variables_reach_the_coroutine(new_loop):
    request_id = contextvars.ContextVar("request_id")

    def reads_context(x, *, y):
        return request_id.get(), x + y

    def fails():
        usleep(0.01)
        raise KeyError("from fn")

    async def main():
        request_id.set("r-1")
        value = await gasyncio.run(reads_context, 1, y=2)
        with pytest.raises(KeyError, match="from fn"):
            await gasyncio.run(fails)
        return value

    assert run_on(new_loop, main) == ("r-1", 3)


def test_wrap_and_async_proxy_await_each_call(new_loop):
    class Client:
        label = "client"

        def sleep_and_echo(self, value):
            usleep(WAIT_S)
            return value

    async def main():
        proxy = gasyncio.AsyncProxy(Client())
        sleep = gasyncio.wrap(usleep)
        started = time.monotonic()
        echoes = await asyncio.gather(*(proxy.sleep_and_echo(i) for i in range(CONCURRENT)), sleep(WAIT_S))
        return echoes, time.monotonic() - started, proxy.label

    echoes, elapsed, label = run_on(new_loop, main)
    assert echoes == [*range(CONCURRENT), (0, 0)] and label == "client"
    assert elapsed < TOGETHER_BOUND_S


# --- cancellation -----------------------------------------------------------------

def test_task_cancel_reaches_a_recv_waiting_in_c_at_once(new_loop):
    reader, writer = socket.socketpair()
    seen = []

    async def main():
        task = asyncio.ensure_future(gasyncio.run(recording_recv(reader.fileno(), seen)))
        await asyncio.sleep(WAIT_S)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled_at, nothing_registered(reader.fileno())

    with reader, writer:
        delay, clean = run_on(new_loop, main)
    assert seen == [asyncio.CancelledError], "the CancelledError was not raised inside fn"
    assert delay < 1.0 and clean
    assert no_interruption_pending(), "an interruption was never delivered"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout() is new in Python 3.11")
def test_asyncio_timeout_and_wait_for_interrupt_a_sleep_and_raise_timeout_error(new_loop):
    async def main():
        outcomes = []
        for how in ("timeout", "wait_for"):
            started = time.monotonic()
            try:
                if how == "timeout":
                    async with asyncio.timeout(WAIT_S):
                        await gasyncio.run(usleep, 30)
                else:
                    await asyncio.wait_for(gasyncio.run(usleep, 30), WAIT_S)
            except TimeoutError:
                outcomes.append((how, "TimeoutError", time.monotonic() - started))
        # the loop goes on: a green call after the interrupted ones waits normally
        outcomes.append(await gasyncio.run(usleep, 0.01))
        return outcomes

    first, second, after = run_on(new_loop, main)
    assert first[:2] == ("timeout", "TimeoutError") and second[:2] == ("wait_for", "TimeoutError")
    assert first[2] < 2.0 and second[2] < 2.0
    assert after == (0, 0)
    assert no_interruption_pending()


def test_a_cancelled_call_that_waits_again_in_its_clean_up_finishes_it(new_loop):
    # After the interruption is delivered, fn's own clean-up may wait again:
    # that wait is an ordinary one, awaited to its end.
    def sleep_then_clean_up():
        try:
            usleep(30)
        finally:
            cleaned.append(usleep(WAIT_S))

    cleaned = []

    async def main():
        task = asyncio.ensure_future(gasyncio.run(sleep_then_clean_up))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_on(new_loop, main)
    assert cleaned == [(0, 0)]


# --- close, resolution ------------------------------------------------------------------

def test_close_of_a_watched_fd_by_another_run_wakes_its_waiter_with_ebadf(new_loop):
    reader, writer = socket.socketpair()
    fd = reader.detach()

    def close_it():
        return lib.green_close(fd)

    async def main():
        waiting = asyncio.ensure_future(gasyncio.run(recv_into, fd))
        await asyncio.sleep(WAIT_S)
        assert not waiting.done()
        closed = await gasyncio.run(close_it)
        result = await asyncio.wait_for(waiting, 5)
        return closed, result, nothing_registered(fd)

    with writer:
        closed, (result, error, _), clean = run_on(new_loop, main)
    assert closed == 0
    assert (result, error) == (-1, errno.EBADF)
    assert clean


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, counting the jobs it is given; each
    starts after `delay_s`, to make a lookup slow."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__(max_workers=2)
        self.delay_s, self.submitted = delay_s, 0

    def submit(self, fn, *args, **kwargs):
        self.submitted += 1
        return super().submit(self._late, fn, *args, **kwargs)

    def _late(self, fn, *args, **kwargs):
        time.sleep(self.delay_s)
        return fn(*args, **kwargs)


def addresses(node: bytes):
    """green getaddrinfo's (result, sorted addresses) for node, TCP."""
    hints = ffi.new("struct addrinfo *")
    hints.ai_socktype = socket.SOCK_STREAM
    res = ffi.new("struct addrinfo **")
    result = lib.green_getaddrinfo(node, b"80", hints, res)
    found = []
    entry = res[0] if result == 0 else ffi.NULL
    while entry != ffi.NULL:
        found.append((entry.ai_family, bytes(ffi.buffer(entry.ai_addr, entry.ai_addrlen))))
        entry = entry.ai_next
    if result == 0:
        lib.freeaddrinfo(res[0])
    return result, sorted(found)


def test_name_resolution_runs_on_the_loops_default_executor_with_libcs_result(new_loop):
    executor = CountingExecutor(delay_s=WAIT_S)

    async def main():
        asyncio.get_running_loop().set_default_executor(executor)
        with Ticker() as ticker:
            result = await gasyncio.run(addresses, b"localhost")
        return result, ticker.ticks

    native = addresses(b"localhost")  # outside run: libc in place
    (result, found), ticks = run_on(new_loop, main)
    assert (result, found) == native and result == 0 and found
    assert executor.submitted == 1
    assert ticks >= 3, "the loop was blocked during the lookup"


def test_cancelled_name_resolution_returns_at_once_and_the_job_is_released(new_loop):
    executor = CountingExecutor(delay_s=1.0)

    async def main():
        asyncio.get_running_loop().set_default_executor(executor)
        task = asyncio.ensure_future(gasyncio.run(addresses, b"localhost"))
        await asyncio.sleep(0.1)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled_at

    assert run_on(new_loop, main) < 0.5  # before the executor even starts the lookup
    deadline = time.monotonic() + 5
    while lib.green_offload_live_jobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lib.green_offload_live_jobs() == 0


# --- where run is not: native blocking ------------------------------------------

def test_outside_run_a_green_call_blocks_natively_in_the_loop_thread_and_in_a_plain_thread(new_loop):
    async def main():
        with Ticker() as ticker:
            await asyncio.sleep(0)
            result = usleep(WAIT_S)  # plain sync code in the loop's thread
            ticks = ticker.ticks
            in_executor = await asyncio.to_thread(usleep, 0.05)  # an executor thread: no loop, native
            return result, ticks, in_executor

    result, ticks, in_executor = run_on(new_loop, main)
    assert result == (0, 0) and ticks == 0, "outside run the call must block the loop, as libc does"
    assert in_executor == (0, 0)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(usleep(0.05)))
    thread.start()
    thread.join(10)
    assert outcome == [(0, 0)]


# --- threads, gevent beside asyncio ------------------------------------------------

def test_several_threads_each_with_its_own_loop_wait_together(new_loop):
    threads_count = 3
    outcomes = {}

    def thread_main(index):
        async def main():
            started = time.monotonic()
            results = await asyncio.gather(*(gasyncio.run(usleep, WAIT_S) for _ in range(CONCURRENT)))
            return results, time.monotonic() - started
        outcomes[index] = run_on(new_loop, main)

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == list(range(threads_count))
    for results, elapsed in outcomes.values():
        assert results == [(0, 0)] * CONCURRENT
        assert elapsed < TOGETHER_BOUND_S


def test_gevent_in_one_thread_and_asyncio_in_another_wait_at_the_same_time(new_loop):
    asyncio_outcome = []

    def asyncio_thread():
        async def main():
            started = time.monotonic()
            results = await asyncio.gather(*(gasyncio.run(usleep, 2 * WAIT_S) for _ in range(CONCURRENT)))
            return results, time.monotonic() - started
        asyncio_outcome.append(run_on(new_loop, main))

    thread = threading.Thread(target=asyncio_thread)
    thread.start()
    started = time.monotonic()  # meanwhile, greenlets of this thread's hub
    greenlets = [gevent.spawn(usleep, 2 * WAIT_S) for _ in range(CONCURRENT)]
    gevent.joinall(greenlets, timeout=30)
    gevent_elapsed = time.monotonic() - started
    thread.join(30)
    assert [g.value for g in greenlets] == [(0, 0)] * CONCURRENT
    assert gevent_elapsed < TOGETHER_BOUND_S
    (results, elapsed), = asyncio_outcome
    assert results == [(0, 0)] * CONCURRENT and elapsed < TOGETHER_BOUND_S


# --- bad use --------------------------------------------------------------------------

def test_run_without_a_running_loop_says_to_await_it_in_a_coroutine():
    with pytest.raises(RuntimeError, match="needs a running event loop"):
        gasyncio.run(usleep, 0)


def test_run_of_a_non_callable_or_a_coroutine_function_is_a_type_error(new_loop):
    async def coroutine_function():
        return 1

    async def main():
        with pytest.raises(TypeError, match="needs a callable, got 42"):
            gasyncio.run(42)
        with pytest.raises(TypeError, match="coroutine function: await it directly"):
            gasyncio.run(coroutine_function)
        with pytest.raises(TypeError, match="needs a callable"):
            gasyncio.wrap("not callable")

    run_on(new_loop, main)


def test_nested_run_inside_run_says_to_call_the_function_directly(new_loop):
    def outer():
        return gasyncio.run(usleep, 0)

    async def main():
        with pytest.raises(RuntimeError, match="already running.*call the function directly"):
            await gasyncio.run(outer)

    run_on(new_loop, main)


# --- the demo ---------------------------------------------------------------------------

def test_demo_with_asyncio_shows_the_tasks_waiting_together():
    import re
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "greenify.demo", "--asyncio", "--greenlets", "20", "--delay", "0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "greenify.asyncio.run" in proc.stdout
    times = dict(re.findall(r"^\s+(blocking|greenified)\s+([\d.]+) s", proc.stdout, re.M))
    assert float(times["blocking"]) >= 1.9  # 20 calls of 0.1 s, one after another: the loop was blocked
    assert float(times["greenified"]) < 1.0


def test_closing_the_awaiting_coroutine_unwinds_the_call_inside_c(new_loop):
    # A coroutine closed without being resumed (a task dropped with its loop)
    # cannot await any more: the call is interrupted and ends at once.
    reader, writer = socket.socketpair()
    seen = []

    async def main():
        coroutine = gasyncio.run(recording_recv(reader.fileno(), seen))
        coroutine.send(None)  # fn runs until it waits in recv
        coroutine.close()
        return nothing_registered(reader.fileno())

    with reader, writer:
        assert run_on(new_loop, main)
    assert seen == [asyncio.CancelledError]
    assert no_interruption_pending()


def test_an_asyncio_user_never_imports_gevent():
    import subprocess
    code = ("import sys, asyncio, greenify, greenify.asyncio\n"
            "from greenify._green import lib\n"
            "async def main():\n"
            "    return await greenify.asyncio.run(lib.green_usleep, 10000)\n"
            "assert asyncio.run(main()) == 0\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'gevent'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def gevent_recv_round_trip() -> None:
    """A recv in a greenlet of this thread's hub, woken by a send: a common
    wait (one fd, no deadline), which gevent's C fast wait takes."""
    a, b = socket.socketpair()
    with a, b:
        waiter = gevent.spawn(recv_into, a.fileno())
        gevent.sleep(0.05)
        b.send(b"hub")
        assert waiter.get(timeout=10)[2] == b"hub"


def test_a_thread_whose_hub_takes_the_c_fast_wait_still_awaits_its_loop_inside_run(new_loop):
    gevent_recv_round_trip()  # this thread's hub is attached to the fast wait
    before = lib.green_fast_waits()
    gevent_recv_round_trip()
    assert lib.green_fast_waits() > before, "the fast wait was not taken: the test proves nothing"
    reader, writer = socket.socketpair()

    async def main():
        asyncio.get_running_loop().call_later(WAIT_S, writer.send, b"loop")
        return await asyncio.wait_for(gasyncio.run(recv_into, reader.fileno()), 10)

    with reader, writer:
        assert run_on(new_loop, main)[2] == b"loop"
    before = lib.green_fast_waits()
    gevent_recv_round_trip()  # and gevent's common waits take it again once no run is left
    assert lib.green_fast_waits() > before


@pytest.mark.parametrize("closer", ["close twin, plain code in the loop's thread", "os.close, behind greenify's back"])
def test_close_of_a_watched_fd_outside_run_fails_its_waiter_with_ebadf(new_loop, closer):
    # The close twin tells every waiter registered in its thread: at once.
    # os.close tells nobody and epoll drops the fd silently: the
    # once-a-second sweep finds the waiter.
    import os
    reader, writer = socket.socketpair()
    fd = reader.detach()
    close = lib.green_close if closer.startswith("close twin") else os.close
    bound_s = asyncio_side.SWEEP_INTERVAL_S / 2 if closer.startswith("close twin") else asyncio_side.SWEEP_INTERVAL_S * 3

    async def main():
        waiting = asyncio.ensure_future(gasyncio.run(recv_into, fd))
        await asyncio.sleep(0.1)
        close(fd)
        closed_at = time.monotonic()
        result = await asyncio.wait_for(waiting, 10)
        return result, time.monotonic() - closed_at, nothing_registered(fd)

    with writer:
        (result, error, _), took, clean = run_on(new_loop, main)
    assert (result, error) == (-1, errno.EBADF)
    assert took < bound_s and clean
