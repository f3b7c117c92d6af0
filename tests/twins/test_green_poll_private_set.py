"""A poll whose mask libev cannot watch (libldap's POLLIN|POLLPRI) waits on a
private epoll set, closed when the poll returns; the next such poll gets the
same descriptor number for its set, and must be woken as promptly as the
first (it was woken only by the hub's once-a-second sweep: issue 27,
python-ldap searches of 0.3 s took 1.0 s)."""
from __future__ import annotations

import select
import time

import pytest

import greenify
from tests.support.green_support import send_later, socketpair
from greenify._green import lib
from tests.twins.test_green_poll import pollfds

DELAY_S = 0.1
PROMPT_BOUND_S = 0.6  # far above DELAY_S, far below the one-second sweep


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


@pytest.mark.parametrize("mask", [select.POLLIN | select.POLLPRI, select.POLLPRI | select.POLLIN | select.POLLRDHUP])
def test_successive_polls_through_a_private_set_each_wake_when_data_comes(mask):
    a, b = socketpair()
    for round_number in range(3):
        send_later(b, b"x", DELAY_S)
        started = time.monotonic()
        fds = pollfds((a.fileno(), mask))
        assert lib.green_poll(fds, 1, 5000) == 1
        took = time.monotonic() - started
        assert fds[0].revents & select.POLLIN
        assert took < PROMPT_BOUND_S, f"poll {round_number + 1} woke {took:.2f} s after it began (data at {DELAY_S} s)"
        assert a.recv(1) == b"x"
