"""A MariaDB for tests that run elsewhere (make test-aarch64's emulated root):
started on this machine by tests/support/servers.py, its HOST:PORT printed on the
first line of stdout (the tests take it as GREENIFY_TEST_MARIADB), stopped
and removed on SIGTERM or SIGINT.

usage: python3 -m ci.host_mariadb
"""
import signal

from tests.support import servers  # run as `python3 -m ci.host_mariadb` from the root

stop = {signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, stop)
with servers.start_mariadb() as mariadb:
    print(f"{mariadb.host}:{mariadb.port}", flush=True)
    signal.sigwait(stop)
