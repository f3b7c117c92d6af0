"""An interruption is raised in the Python frame that made the interrupted C
call, never in Python code the library calls on its way out.

A driver whose call failed often runs Python before it returns: it decodes
its error message with a codec, calls a callback, drops an object whose
__del__ runs, and swallows whatever those raise (psycopg2 clears the error
and reports "timeout expired").  A gevent.Timeout or kill raised inside one
of them would be lost.  fixtures/pyext_unwind.c is such a driver; the last
test runs greenified psycopg2 itself, fresh connections under timeouts."""
from __future__ import annotations

import codecs
import functools
import random
import socket
import sys

import gevent
import pytest

import greenify
from tests.support.fixturelib import build_python_extension
from tests.support.green_support import no_interruption_pending, pending_interruptions, socketpair
from greenify._green import ffi, lib

# A codec whose decode is a Python function, as encodings/utf_8.py's is.
CODEC = "greenify_unwind"
# What ran to its end while the driver unwound.
finished: list = []


def decode_recording(data, errors="strict"):
    text = bytes(data).decode("ascii", errors)
    finished.append("decode")
    return text, len(data)


def find_codec(name):
    if name != CODEC:
        return None
    return codecs.CodecInfo(name=CODEC, encode=codecs.ascii_encode, decode=decode_recording)


codecs.register(find_codec)


class Dropped:
    """Made by the driver's call-back and dropped at once: its __del__ runs
    while the driver unwinds."""

    def __init__(self, message):
        self.message = message

    def __del__(self):
        finished.append("__del__")


def callback_recording(message):
    finished.append("callback")


@pytest.fixture(scope="module")
def unwind(tmp_path_factory):
    return build_python_extension("pyext_unwind", tmp_path_factory.mktemp("pyext-unwind"))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    greenify.greenify()
    trace_before, profile_before = sys.gettrace(), sys.getprofile()
    finished.clear()
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending(), "an interruption was never delivered"
    assert sys.gettrace() is trace_before and sys.getprofile() is profile_before


RECV = int(ffi.cast("uintptr_t", ffi.addressof(lib, "green_recv")))


def nested_callback(unwind, fd, message):
    """A callback that calls the driver again (the interrupted greenlet's
    further call fails at once and unwinds through the codec too) and
    handles its error."""
    try:
        unwind.recv_unwinding(RECV, fd, 16, True, CODEC, None)
    except unwind.DriverError:
        finished.append("inner call failed")
    finished.append("nested callback")


# What the driver calls on its way out: name -> (driver, fd -> (codec, callback)),
# and what must have run to its end.
WAYS_OUT = {
    "codec": (lambda unwind, fd: (CODEC, None), ["decode"]),
    "callback": (lambda unwind, fd: (None, callback_recording), ["callback"]),
    "__del__": (lambda unwind, fd: (None, Dropped), ["__del__"]),
    "codec-and-callback": (lambda unwind, fd: (CODEC, callback_recording), ["decode", "callback"]),
    "nested": (lambda unwind, fd: (None, functools.partial(nested_callback, unwind, fd)),
               ["decode", "inner call failed", "nested callback"]),
}
WAY_OUT = pytest.mark.parametrize("way_out", list(WAYS_OUT))
GIL = pytest.mark.parametrize("release_gil", [True, False], ids=["gil-released", "gil-held"])


def recv_unwinding(unwind, fd: int, way_out: str, release_gil: bool = True):
    codec, callback = WAYS_OUT[way_out][0](unwind, fd)
    return unwind.recv_unwinding(RECV, fd, 16, release_gil, codec, callback)


@WAY_OUT
@GIL
def test_a_timeout_is_raised_in_the_caller_not_in_python_the_driver_calls_on_its_way_out(unwind, way_out,
                                                                                          release_gil):
    a, b = socketpair()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.05) as timeout:
            recv_unwinding(unwind, a.fileno(), way_out, release_gil)
            pytest.fail("the line after the call ran")
    assert caught.value is timeout
    assert isinstance(caught.value.__context__, unwind.DriverError)
    assert finished == WAYS_OUT[way_out][1], "Python called on the way out did not run to its end"
    a.close(), b.close()


@WAY_OUT
def test_a_killed_greenlet_ends_with_greenlet_exit_past_python_called_on_the_way_out(unwind, way_out):
    a, b = socketpair()
    after = []

    codec, callback = WAYS_OUT[way_out][0](unwind, a.fileno())

    def caller():  # the greenlet's top frame makes the C call
        unwind.recv_unwinding(RECV, a.fileno(), 16, True, codec, callback)
        after.append("the line after the call ran")

    g = gevent.spawn(caller)
    gevent.sleep(0.02)
    g.kill(block=True, timeout=2)
    assert g.dead and isinstance(g.value, gevent.GreenletExit), (g.value, g.exception)
    assert isinstance(g.value.__context__, unwind.DriverError)
    assert after == []
    assert finished == WAYS_OUT[way_out][1]
    a.close(), b.close()


def test_a_kill_raised_in_the_caller_unwinds_the_python_frames_above_it(unwind):
    a, b = socketpair()
    unwound = []

    def outer():
        try:
            middle()
        finally:
            unwound.append("outer")

    def middle():
        try:
            recv_unwinding(unwind, a.fileno(), "codec-and-callback")
        finally:
            unwound.append("middle")

    g = gevent.spawn(outer)
    gevent.sleep(0.02)
    g.kill(block=True, timeout=2)
    assert isinstance(g.value, gevent.GreenletExit)
    assert unwound == ["middle", "outer"]
    assert finished == ["decode", "callback"]
    a.close(), b.close()


@pytest.mark.skipif(type(gevent.Greenlet.run).__name__ == "function",
                    reason="gevent's Greenlet is pure Python here: its run is a Python frame")
def test_a_greenlet_with_no_python_frame_ends_with_the_drivers_error(unwind):
    # Its run is the C function itself: no frame to raise in, and none of
    # the Python the driver calls on its way out receives the exception.
    a, b = socketpair()
    g = gevent.spawn(unwind.recv_unwinding, RECV, a.fileno(), 16, True, CODEC, callback_recording)
    gevent.sleep(0.02)
    g.kill(block=True, timeout=2)
    assert g.dead and isinstance(g.exception, unwind.DriverError)
    assert finished == ["decode", "callback"]
    gevent.sleep(0.01)  # events in other greenlets drop what it left armed
    a.close(), b.close()


def test_an_existing_trace_function_sees_the_way_out_and_is_put_back(unwind):
    a, b = socketpair()
    seen = []

    def tracer(frame, event, arg):
        seen.append((event, frame.f_code.co_name))
        return tracer

    sys.settrace(tracer)
    try:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.05):
                recv_unwinding(unwind, a.fileno(), "codec-and-callback")
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert finished == ["decode", "callback"]
    assert ("call", "decode_recording") in seen and ("return", "decode_recording") in seen
    assert ("call", "callback_recording") in seen
    a.close(), b.close()


def measured_after_the_delivery():
    return "a line coverage sees after the exception arrived"


def test_coverage_measures_the_way_out_and_the_caller_after_a_delivery(unwind):
    coverage = pytest.importorskip("coverage")
    a, b = socketpair()
    measuring = coverage.Coverage(data_file=None, include=[__file__])
    measuring.start()
    try:
        try:
            with gevent.Timeout(0.05):
                recv_unwinding(unwind, a.fileno(), "codec-and-callback")
        except gevent.Timeout:
            measured_after_the_delivery()
    finally:
        measuring.stop()
    lines = set(measuring.get_data().lines(__file__) or ())
    body = {function: function.__code__.co_firstlineno + 1
            for function in (decode_recording, callback_recording, measured_after_the_delivery)}
    assert set(body.values()) <= lines, {function.__name__: line in lines for function, line in body.items()}
    assert finished == ["decode", "callback"]
    a.close(), b.close()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is new in CPython 3.12")
def test_a_sys_monitoring_tool_sees_the_way_out_and_the_exception_still_arrives(unwind):
    monitoring = sys.monitoring
    tool = next(tool for tool in range(6) if monitoring.get_tool(tool) is None)
    started = []
    monitoring.use_tool_id(tool, "greenify test")
    monitoring.register_callback(tool, monitoring.events.PY_START, lambda code, offset: started.append(code.co_name))
    monitoring.set_events(tool, monitoring.events.PY_START)
    a, b = socketpair()
    try:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.05):
                recv_unwinding(unwind, a.fileno(), "codec-and-callback")
    finally:
        monitoring.set_events(tool, 0)
        monitoring.register_callback(tool, monitoring.events.PY_START, None)
        monitoring.free_tool_id(tool)
    assert "decode_recording" in started and "callback_recording" in started
    assert finished == ["decode", "callback"]
    a.close(), b.close()


def test_a_profile_function_in_use_is_left_alone(unwind):
    a, b = socketpair()
    seen = []

    def profiler(frame, event, arg):
        seen.append((event, frame.f_code.co_name))

    sys.setprofile(profiler)
    try:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.05):
                recv_unwinding(unwind, a.fileno(), "codec")
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert finished == ["decode"]
    assert ("call", "decode_recording") in seen and ("c_call", "recv_unwinding") in seen


def test_greenlets_interrupted_while_another_unwinds_each_get_their_own(unwind):
    # Each one's call-back yields to the hub on the way out, so the others
    # are interrupted (and armed) while it unwinds: events of one greenlet
    # never deliver another's exception, nor fire in its call-back.
    pairs = [socketpair() for _ in range(3)]
    armed_at_once = []

    def yielding_callback(message):
        armed_at_once.append(len(pending_interruptions()))
        gevent.sleep(0)
        gevent.sleep(0)
        finished.append("callback")

    def bounded(index):
        with gevent.Timeout(0.05) as timeout:
            try:
                unwind.recv_unwinding(RECV, pairs[index][0].fileno(), 16, True, CODEC, yielding_callback)
            except gevent.Timeout as caught:
                return caught is timeout
        return False

    results = [g.get(timeout=2) for g in [gevent.spawn(bounded, index) for index in range(len(pairs))]]
    assert results == [True] * len(pairs)
    assert sorted(finished) == ["callback"] * len(pairs) + ["decode"] * len(pairs)
    assert max(armed_at_once) >= 2, f"no two interruptions were pending at once: {armed_at_once}"
    for a, b in pairs:
        a.close(), b.close()


@pytest.mark.parametrize("greenlets", [1, 3])
def test_a_call_that_returns_normally_gets_the_exception_before_anything_else_on_its_line(unwind, greenlets):
    # The driver reports the failure by returning None: the exception is
    # raised right after the call, before the next call on the same line;
    # also in each of several greenlets running the same function and
    # interrupted while another one unwinds.
    pairs = [socketpair() for _ in range(greenlets)]
    used = []

    def yielding_callback(message):
        gevent.sleep(0)
        finished.append("callback")

    def use(result):
        used.append(result)

    def bounded(index):
        with gevent.Timeout(0.05) as timeout:
            try:
                use(unwind.recv_or_none(RECV, pairs[index][0].fileno(), 16, True, CODEC, yielding_callback))
            except gevent.Timeout as caught:
                return caught is timeout
        return False

    results = [g.get(timeout=2) for g in [gevent.spawn(bounded, index) for index in range(len(pairs))]]
    assert results == [True] * len(pairs)
    assert used == [], "the line went on after the interrupted call"
    assert sorted(finished) == ["callback"] * len(pairs) + ["decode"] * len(pairs)
    for a, b in pairs:
        a.close(), b.close()


ROUNDS = 200
GREENLETS = 10


def send_unless_shut(peer: socket.socket) -> None:
    try:
        peer.send(b"x")
    except OSError:
        pass  # the call was interrupted first: greenify shut its socket down


def test_every_timeout_at_a_random_point_reaches_its_caller(unwind):
    """ROUNDS rounds of GREENLETS calls at once, each under a timeout of 0-4
    ms, its data written 0-4 ms later by a peer greenlet (or never), the
    driver going out through each way in turn: every call returns its data
    or raises its very Timeout, never the driver's error."""
    chooser = random.Random(22)
    ways = list(WAYS_OUT)
    outcomes = {"data": 0, "timeout": 0}
    wrong = []

    def one_call(index):
        a, b = socketpair()  # fresh: an interrupted wait shuts its socket down
        if chooser.random() < 2 / 3:
            gevent.spawn_later(chooser.uniform(0, 0.004), send_unless_shut, b)
        timeout = gevent.Timeout(chooser.uniform(0, 0.004))
        timeout.start()
        try:
            data = recv_unwinding(unwind, a.fileno(), ways[index % len(ways)], release_gil=bool(index % 2))
            outcomes["data"] += 1
            assert data == b"x"
        except gevent.Timeout as caught:
            if caught is not timeout:
                raise
            outcomes["timeout"] += 1
        except BaseException as exc:  # noqa: B902 - the point is what comes out
            wrong.append(repr(exc))
        finally:
            timeout.close()
            gevent.sleep(0.005)  # a late write lands before the pair is closed
            a.close(), b.close()

    for _ in range(ROUNDS):
        gevent.joinall([gevent.spawn(one_call, index) for index in range(GREENLETS)], raise_error=True)
    assert wrong == [], f"{len(wrong)} of {ROUNDS * GREENLETS} calls did not end as asked: {wrong[:5]}"
    # (a third of the calls have no writer: they all time out, however busy the machine)
    assert outcomes["timeout"] > ROUNDS, outcomes


# --- psycopg2 over libpq ------------------------------------------------------------

PG_ROUNDS = 30
PG_GREENLETS = 20


@pytest.mark.compat("psycopg2")
def test_every_timeout_around_a_fresh_psycopg2_connection_surfaces_as_itself(psycopg2, postgres):
    """PG_ROUNDS rounds of PG_GREENLETS greenlets, each connecting afresh and
    querying under a gevent.Timeout of 1-40 ms: each either finishes or
    raises its very Timeout; psycopg2's own "timeout expired" never comes
    out."""
    chooser = random.Random(22)
    outcomes = {"finished": 0, "timeout": 0}
    wrong = []

    def connect_and_query():
        timeout = gevent.Timeout(chooser.uniform(0.001, 0.040))
        timeout.start()
        connection = None
        try:
            connection = psycopg2.connect(postgres.dsn)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(0.005), 'é'")
                assert cursor.fetchone()[1] == "é"
            outcomes["finished"] += 1
        except gevent.Timeout as caught:
            if caught is not timeout:
                raise
            outcomes["timeout"] += 1
        except BaseException as exc:  # noqa: B902 - the point is what comes out
            wrong.append(repr(exc))
        finally:
            timeout.close()
            if connection is not None:
                connection.close()

    with greenify.patched("libpq") as report:
        assert report, repr(report)
        for _ in range(PG_ROUNDS):
            gevent.joinall([gevent.spawn(connect_and_query) for _ in range(PG_GREENLETS)], raise_error=True)
    assert wrong == [], f"{len(wrong)} of {PG_ROUNDS * PG_GREENLETS} calls did not end as asked: {wrong[:5]}"
    assert outcomes["timeout"] > 0, outcomes
