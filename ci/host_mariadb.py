"""A MariaDB for tests that run elsewhere (make test-aarch64's emulated root):
started on this machine by tests/servers.py, its HOST:PORT printed on the
first line of stdout (the tests take it as GREENIFY_TEST_MARIADB), stopped
and removed on SIGTERM or SIGINT.

usage: python3 ci/host_mariadb.py
"""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import servers  # noqa: E402 - tests/servers.py

stop = {signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, stop)
with servers.start_mariadb() as mariadb:
    print(f"{mariadb.host}:{mariadb.port}", flush=True)
    signal.sigwait(stop)
