"""A reconnect storm's lookups under a low descriptor limit: numeric and
/etc/hosts names, thousands of them interrupted by short gevent.Timeouts,
in a process of its own (tests/support/resolver_storm.py) whose RLIMIT_NOFILE is 128;
and MySQLdb connecting and querying under short timeouts, RLIMIT_NOFILE 256.
Before the bound, abandoned lookups kept an eventfd each until a pool thread
got to them: ~19,000 descriptors in 3 s, and EMFILE for the connects.  The
slow-DNS storm is in test_green_resolve.py, where a DNS server of our own
answers."""
from __future__ import annotations

import json

import pytest

from tests.twins.test_green_resolve import assert_storm_left_nothing, run_storm


def test_a_storm_of_interrupted_lookups_never_runs_out_of_descriptors():
    report = run_storm("--host", "localhost", "--host", "127.0.0.1", "--host", "::1", "--nofile", "128",
                       "--greenlets", "200", "--seconds", "3", "--timeouts-ms", "0.5", "5")
    assert_storm_left_nothing(report)
    assert report["outcomes"]["answered"] > 1000, report


@pytest.mark.compat("MySQLdb")
def test_a_reconnect_storm_through_libmariadb_never_runs_out_of_descriptors(MySQLdb, mariadb):
    # libmariadb looks up "127.0.0.1" before every connect, without AI_NUMERICHOST
    report = run_storm("--mysql", json.dumps(mariadb.connect_kwargs()), "--nofile", "256",
                       "--greenlets", "100", "--seconds", "4", "--timeouts-ms", "2", "30")
    assert_storm_left_nothing(report, fds_per_greenlet=2)  # a connection, and one being dropped
    assert report["outcomes"]["answered"] > 20, report  # connections do get through
    assert report["most_pending"] == 0, report  # numeric: never handed to a worker
