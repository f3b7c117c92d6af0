"""A reconnect storm against the green resolver, run as a process of its own
(its descriptor limit lowered) by tests/twins/test_resolver_storm.py.

Many greenlets look a host up again and again, as a client does before each
connect, each lookup under a gevent.Timeout short enough to interrupt many
of them, then open a socket as the connect would; or (--mysql) many
greenlets connect to MariaDB through a patched libmariadb, which looks up
its numeric host without AI_NUMERICHOST, and run a query, each connect +
query under a short gevent.Timeout that discards the connection.  Prints one
JSON object.  With --bench N it measures instead: lookups/s of each --host,
N lookups in a row by one greenlet and N by 100 at once, green and libc's
own, medians of 5 rounds:

    python -m tests.support.resolver_storm --bench 3000 --host 127.0.0.1 --host localhost

That JSON object:
what the lookups gave, the most descriptors and pending lookups seen, and
what was left once the storm was over."""
from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import random
import resource
import socket
import time

import gevent

import greenify
from greenify._green import ffi, lib


def open_fds() -> int:
    """How many descriptors are open (-1: too many to even look)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def fd_kinds() -> collections.Counter:
    """What this process's descriptors are: "anon_inode:[eventfd]", "socket", ..."""
    kinds: collections.Counter = collections.Counter()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return kinds
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if target.startswith("socket") else target] += 1
    return kinds


def resolver_count(name: str) -> int:
    """A count the resolver keeps (-1 where this build has none)."""
    function = getattr(lib, name, None)
    return function() if function is not None else -1


def lookup(host: bytes, service: bytes):
    res = ffi.new("struct addrinfo **")
    hints = ffi.new("struct addrinfo *")
    hints.ai_socktype = socket.SOCK_STREAM
    ffi.errno = 0
    rc = lib.green_getaddrinfo(host, service, hints, res)
    err = ffi.errno
    if rc == 0:
        lib.freeaddrinfo(res[0])
    return rc, err


def bench(host: bytes, count: int) -> dict:
    """Lookups/s of host: one greenlet, 100 greenlets, and libc in place."""
    def lookups(n: int) -> None:
        for _ in range(n):
            assert lookup(host, b"3306")[0] == 0

    def rate(run, n: int) -> float:
        start = time.perf_counter()
        run()
        return n / (time.perf_counter() - start)

    def native() -> None:
        lib.green_set_active(0)
        try:
            lookups(count)
        finally:
            lib.green_set_active(1)

    rounds = {"green, one greenlet": [], "green, 100 greenlets": [], "libc": []}
    for _ in range(5):
        rounds["green, one greenlet"].append(rate(lambda: gevent.spawn(lookups, count).get(), count))
        rounds["green, 100 greenlets"].append(rate(lambda: gevent.joinall(
            [gevent.spawn(lookups, count // 100) for _ in range(100)], raise_error=True), count // 100 * 100))
        rounds["libc"].append(rate(native, count))
    return {case: round(sorted(figures)[2]) for case, figures in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", action="append", default=[], help="a host to look up (repeatable)")
    parser.add_argument("--mysql", help="MySQLdb.connect's keywords, as JSON: connect and query instead")
    parser.add_argument("--nofile", type=int, default=0, help="RLIMIT_NOFILE's soft limit (0: as it is)")
    parser.add_argument("--bench", type=int, default=0, help="measure N lookups/s per host instead")
    parser.add_argument("--greenlets", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--timeouts-ms", type=float, nargs=2, default=(0.5, 5.0))
    parser.add_argument("--unique-names", action="store_true", help="a name of its own for each lookup (slow DNS)")
    args = parser.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.nofile, hard), hard))
    greenify.greenify()
    if args.bench:
        print(json.dumps({host: bench(host.encode(), args.bench) for host in args.host}))
        return
    hosts = [host.encode() for host in args.host]
    for host in hosts:
        lookup(host, b"3306")  # the hub, its thread pool and their descriptors exist from now on
    if args.mysql:
        import MySQLdb
        connect_kwargs = json.loads(args.mysql)
        patched = greenify.patched(MySQLdb._mysql)
        patched.__enter__()
        MySQLdb.connect(**connect_kwargs).close()
    baseline_fds, baseline_spare = open_fds(), resolver_count("green_offload_spare_fds")
    baseline_kinds = fd_kinds()

    outcomes: collections.Counter = collections.Counter()
    most = {"fds": baseline_fds, "pending": 0}
    end = time.monotonic() + args.seconds

    def client(number: int) -> None:
        rnd = random.Random(number)
        serial = 0
        while time.monotonic() < end:
            serial += 1
            if args.mysql:
                outcomes[mysql_round(rnd)] += 1
                continue
            host = hosts[serial % len(hosts)]
            if args.unique_names:
                host = b"c%d-%d.%s" % (number, serial, host)
            try:
                with gevent.Timeout(rnd.uniform(*args.timeouts_ms) / 1000):
                    rc, err = lookup(host, b"3306")
                    if rc == 0:
                        socket.socket().close()  # what the connect that follows needs first
            except gevent.Timeout:
                outcomes["interrupted"] += 1
                continue
            except OSError as exc:
                outcomes["socket: " + errno.errorcode.get(exc.errno, str(exc.errno))] += 1
                continue
            if rc == 0:
                outcomes["answered"] += 1
            elif rc == socket.EAI_SYSTEM:
                outcomes["EAI_SYSTEM: " + errno.errorcode.get(err, str(err))] += 1
            else:
                outcomes[f"EAI {rc}"] += 1

    def mysql_round(rnd: random.Random) -> str:
        import MySQLdb
        try:
            with gevent.Timeout(rnd.uniform(*args.timeouts_ms) / 1000):
                connection = MySQLdb.connect(**connect_kwargs)  # an interrupted one is dropped unclosed
                cursor = connection.cursor()
                cursor.execute("SELECT 1")
                cursor.fetchall()
                connection.close()
        except gevent.Timeout:
            return "interrupted"
        except MySQLdb.OperationalError as exc:
            return f"OperationalError {exc.args[0]}: {exc.args[1] if len(exc.args) > 1 else ''}"
        return "answered"

    def watch() -> None:
        while time.monotonic() < end:
            fds = open_fds()
            most["fds"] = max(most["fds"], fds if fds >= 0 else args.nofile)  # -1: at the limit
            most["pending"] = max(most["pending"], resolver_count("green_offload_pending"))
            gevent.sleep(0.005)

    started = time.monotonic()
    watcher = gevent.spawn(watch)
    gevent.joinall([gevent.spawn(client, i) for i in range(args.greenlets)], raise_error=True)
    watcher.join()
    storm_s = time.monotonic() - started
    settle_deadline = time.monotonic() + 30
    while (resolver_count("green_offload_live_jobs") or resolver_count("green_offload_pending") > 0) \
            and time.monotonic() < settle_deadline:
        gevent.sleep(0.05)
    print(json.dumps({
        "outcomes": dict(outcomes),
        "lookups_per_s": sum(outcomes.values()) / storm_s,
        "baseline_fds": baseline_fds, "baseline_spare_fds": baseline_spare,
        "most_fds": most["fds"], "most_pending": most["pending"],
        "max_pending": resolver_count("green_offload_max_pending"),
        "max_runners": resolver_count("green_offload_max_runners"),
        "greenlets": args.greenlets,
        "after_fds": open_fds(), "after_spare_fds": resolver_count("green_offload_spare_fds"),
        "after_live_jobs": resolver_count("green_offload_live_jobs"),
        "after_pending": resolver_count("green_offload_pending"),
        "new_fd_kinds": dict(fd_kinds() - baseline_kinds),
    }))


if __name__ == "__main__":
    main()
