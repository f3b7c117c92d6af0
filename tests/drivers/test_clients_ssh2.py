"""ssh2-python (libssh2, bundled in ``ssh2_python.libs``) against OpenSSH's
sshd, started by the session on a free port with key authentication only
(tests/support/servers.py).

The wait: a channel read waiting on a remote ``sleep``.  Each session runs
one remote shell loop, ``while read seconds tag; do sleep ...; echo ...``,
so a request costs a ``sleep`` on the server and nothing else (an exec per
request costs sshd about 0.2 s of work on a busy machine, which would
measure the server, not the wait).  Sessions are set up once per module.

libssh2 in blocking mode waits in its own ``poll`` (``_libssh2_wait_socket``)
and reads with ``recv``: ``greenify.patch_library("libssh2")`` finds the copy
auditwheel renamed ``libssh2-<hash>.so.1.0.1``.
"""
from __future__ import annotations

import os
import signal
import socket
import time

import gevent
import pytest

import greenify
import greenify.asyncio as gasyncio
from tests.support import servers
from tests.support.client_support import patched_as_recommended
from tests.support.fault_support import INTERRUPT_BOUND_S, LONG_WAIT_S
from tests.wait.test_asyncio import run_on
from tests.drivers.test_driver_faults import faulted_waiters, interrupted_by_timeout, killed_while_waiting
from tests.drivers.test_drivers import UNPATCHED, assert_serial, run_together

pytestmark = pytest.mark.compat("ssh2-python")

COUNT = 10
SLEEP_S = 0.3
TOGETHER_BOUND_S = 1.5  # serial, 10 x 0.3 s take 3 s
REMOTE_LOOP = 'while read seconds tag; do sleep "$seconds"; echo "slept $seconds for $tag"; done'


@pytest.fixture(scope="module", autouse=True)
def active():
    greenify.greenify()


class Remote:
    """A session of its own with the remote sleep loop running on a channel."""

    def __init__(self, ssh2, sshd):
        self.socket = socket.create_connection((sshd.host, sshd.port))
        self.session = ssh2.Session()
        self.session.handshake(self.socket)
        self.session.userauth_publickey_fromfile(sshd.user, sshd.key_path)
        self.channel = self.session.open_session()
        self.channel.execute(REMOTE_LOOP)

    def sleep(self, seconds: float, tag: str) -> str:
        """The remote loop sleeps `seconds`; returns its answer line."""
        self.channel.write(f"{seconds} {tag}\n")
        received = b""
        while not received.endswith(b"\n"):
            size, data = self.channel.read()
            if size <= 0:
                raise EOFError(f"the channel ended (read returned {size}) after {received!r}")
            received += data
        return received.decode().strip()

    def close(self) -> None:
        try:
            self.channel.close()
            self.session.disconnect()
        except Exception:  # noqa: BLE001 - a test may have broken it on purpose
            pass
        self.socket.close()


@pytest.fixture(scope="module")
def remotes(ssh2, sshd):
    """COUNT sessions, each with its remote loop, set up together."""
    with greenify.patched("libssh2"):
        _, opened = run_together(lambda index: Remote(ssh2, sshd), COUNT)
    yield opened
    for remote in opened:
        remote.close()


def sleeps_on(remotes, sleep_s: float = SLEEP_S):
    return lambda index: remotes[index].sleep(sleep_s, str(index))


def expected_answers(count: int, sleep_s: float = SLEEP_S):
    return [f"slept {sleep_s} for {index}" for index in range(count)]


def test_unpatched_channel_reads_waiting_on_remote_sleeps_run_one_after_another(remotes):
    elapsed, answers = run_together(sleeps_on(remotes), UNPATCHED)
    assert answers == expected_answers(UNPATCHED)
    assert_serial(elapsed, UNPATCHED, SLEEP_S, "remote sleeps")


def test_patched_10_channel_reads_finish_together(remotes):
    with greenify.patched("libssh2") as report:
        bundled = [obj for obj in report.objects if os.path.basename(obj.path).startswith("libssh2-")]
        assert bundled and {"poll", "recv", "send"} <= {slot.symbol for slot in bundled[0].patched}, repr(report)
        elapsed, answers = run_together(sleeps_on(remotes), COUNT)
    assert answers == expected_answers(COUNT)
    assert elapsed < TOGETHER_BOUND_S, f"{COUNT} remote sleeps of {SLEEP_S} s took {elapsed:.2f} s"


def test_patched_sessions_connect_authenticate_and_exec_as_stock(ssh2, sshd):
    def whole_session(index: int):
        remote = Remote(ssh2, sshd)
        try:
            return remote.sleep(0, f"whole {index}")
        finally:
            remote.close()

    stock = whole_session(0)
    with greenify.patched("libssh2"):
        _, answers = run_together(whole_session, 5)
    assert stock == "slept 0 for whole 0"
    assert answers == [f"slept 0 for whole {index}" for index in range(5)]


def test_what_greenify_inspect_recommends_for_ssh2_makes_it_concurrent(remotes):
    with patched_as_recommended("ssh2.session") as names:
        elapsed, answers = run_together(sleeps_on(remotes), COUNT)
    assert any(name.startswith("libssh2") for name in names), names
    assert answers == expected_answers(COUNT)
    assert elapsed < TOGETHER_BOUND_S, f"{COUNT} remote sleeps took {elapsed:.2f} s with {names}"


# --- timeouts, kills and faults --------------------------------------------------------

def test_a_timeout_in_a_channel_read_raises_itself_at_once(ssh2, sshd):
    remote = Remote(ssh2, sshd)
    try:
        with greenify.patched("libssh2"):
            raised, timeout, took = interrupted_by_timeout(lambda: remote.sleep(LONG_WAIT_S, "late"))
            assert raised is timeout
            assert took < INTERRUPT_BOUND_S
            after = Remote(ssh2, sshd)
            assert after.sleep(0, "after") == "slept 0 for after"
            after.close()
    finally:
        remote.close()


def test_a_greenlet_killed_in_a_channel_read_ends_at_once(ssh2, sshd):
    remote = Remote(ssh2, sshd)
    try:
        with greenify.patched("libssh2"):
            assert killed_while_waiting(lambda: remote.sleep(LONG_WAIT_S, "late")) < INTERRUPT_BOUND_S
    finally:
        remote.close()


@pytest.fixture
def own_sshd():
    """An sshd for this test alone, so that its connections may be killed."""
    yield from servers.serve(servers.start_sshd)


def connection_processes(sshd) -> list:
    """The per-connection processes the sshd we started forked (ours to kill)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == sshd.process.pid:
                found.append(int(entry))
    return found


def test_killed_sshd_connections_fail_each_waiting_read_promptly(ssh2, own_sshd):
    from ssh2.exceptions import SSH2Error

    with greenify.patched("libssh2"):
        _, waiting = run_together(lambda index: Remote(ssh2, own_sshd), 20)

        def read(index: int):
            try:
                return time.monotonic(), waiting[index].sleep(LONG_WAIT_S, str(index))
            except (SSH2Error, EOFError) as exc:
                return time.monotonic(), exc

        def kill_connections():
            gevent.sleep(0.5)  # every remote loop sleeps
            for pid in connection_processes(own_sshd):
                os.kill(pid, signal.SIGKILL)
            return time.monotonic()

        outcomes = faulted_waiters(read, kill_connections)
    for remote in waiting:
        remote.close()
    # ssh2's own SocketRecvError, as unpatched
    assert all(isinstance(error, SSH2Error) for _, error in outcomes), outcomes


# --- asyncio -----------------------------------------------------------------------------

@pytest.mark.compat("ssh2-python", "asyncio")
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_under_asyncio_10_channel_reads_finish_together_and_a_timeout_ends_one_at_once(ssh2, sshd, remotes,
                                                                                       loop_kind):
    import asyncio
    new_loop = asyncio.new_event_loop
    if loop_kind == "uvloop":
        new_loop = servers.require_module("uvloop", "uvloop").new_event_loop
    sleep = sleeps_on(remotes)
    late = Remote(ssh2, sshd)

    async def main():
        started = time.monotonic()
        answers = await asyncio.gather(*(gasyncio.run(sleep, index) for index in range(COUNT)))
        elapsed = time.monotonic() - started
        timeout_at = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gasyncio.run(late.sleep, LONG_WAIT_S, "late"), 0.3)
        return elapsed, answers, time.monotonic() - timeout_at - 0.3

    try:
        with greenify.patched("libssh2"):
            elapsed, answers, late_s = run_on(new_loop, main)
    finally:
        late.close()
    assert answers == expected_answers(COUNT)
    assert elapsed < TOGETHER_BOUND_S, f"{COUNT} remote sleeps took {elapsed:.2f} s"
    assert late_s < INTERRUPT_BOUND_S, f"the TimeoutError came {late_s:.2f} s after the timeout"
