"""One variant of the MariaDB cases, in a process of its own.

python -m bench.run starts this script once per variant and round, so that
gevent's monkey patching (PyMySQL) and a patched libmariadb (greenified)
never leak into another variant's figures.  It is also what the peer
interpreter (--peer-python) runs: there `import greenify` finds douban's
greenify 0.5.0, which is used through its documented API.

    db_worker.py setup       HOST PORT                     create the 1,000-row table
    db_worker.py concurrency HOST PORT VARIANT N [TIMED]   N greenlets, SELECT SLEEP(0.5) each
    db_worker.py throughput  HOST PORT VARIANT GREENLETS QUERIES [TIMED [ROWS]]

TIMED is `work` (the default: connections are opened before the clock
starts) or `connect` (each greenlet opens its connection inside the timing).
ROWS (default 1,000, the whole table) is the size of each result.

With GREENIFY_BENCH_PERF_CONTROL=CTL,ACK (two FIFOs of `perf record -D -1
--control fifo:CTL,ACK`), perf samples the timed part only.

Variants: greenified (MySQLdb, libmariadb patched), stock (MySQLdb as is),
threadpool (stock MySQLdb through gevent.get_hub().threadpool, one thread per
greenlet), pymysql (PyMySQL after gevent.monkey.patch_all()).

Prints one line of JSON: {"seconds": ..., "rows": ..., "greenify": ...}; throughput
adds the client's CPU seconds over the timing (`cpu_seconds`) and `queries`.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time

USER = PASSWORD = DATABASE = "greenify"  # what tests/support/servers.py creates
SLEEP_S = 0.5
TABLE_ROWS = 1000


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def loaded_client_library() -> str:
    """The path of the C client library MySQLdb loaded (for the seed's patch_lib)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libmariadb" in path or "libmysqlclient" in path:
                return path
    raise RuntimeError("MySQLdb loaded no libmariadb or libmysqlclient")


def prepare(variant: str):
    """Import and set up the driver for `variant`; returns (connect, which greenify)."""
    if variant == "pymysql":
        from gevent import monkey
        monkey.patch_all()
        import pymysql
        return pymysql.connect, None
    import MySQLdb
    if variant != "greenified":
        return MySQLdb.connect, None
    import greenify
    greenify.greenify()
    if hasattr(greenify, "patch_library"):  # this project
        report = greenify.patch_library(MySQLdb._mysql)
        if not report:
            raise RuntimeError(f"patch_library(MySQLdb._mysql) patched nothing: {report}")
        return MySQLdb.connect, "this project"
    # douban's greenify 0.5.0: greenify() + patch_lib(path) -> bool
    if not greenify.patch_lib(loaded_client_library()):
        raise RuntimeError(f"greenify.patch_lib({loaded_client_library()}) returned False")
    return MySQLdb.connect, "douban greenify 0.5.0"


def open_connections(variant: str, connect, host: str, port: int, count: int) -> list:
    """`count` connections; cooperative drivers open them 100 at a time (the
    server's listen backlog is 150), the others one after another."""
    def one(_=None):
        return connect(host=host, port=port, user=USER, password=PASSWORD, database=DATABASE)
    if variant not in ("greenified", "pymysql"):
        return [one() for _ in range(count)]
    from gevent.pool import Pool
    return list(Pool(100).imap(one, range(count)))


@contextlib.contextmanager
def profiled():
    """perf samples what runs inside, when GREENIFY_BENCH_PERF_CONTROL names its FIFOs."""
    control = os.environ.get("GREENIFY_BENCH_PERF_CONTROL")
    if not control:
        yield
        return
    ctl_path, ack_path = control.split(",")
    with open(ctl_path, "w") as ctl, open(ack_path) as ack:
        def tell(command: str) -> None:
            ctl.write(command + "\n")
            ctl.flush()
            if ack.readline().strip("\0 \n") != "ack":  # perf writes "ack\n" and its NUL
                raise RuntimeError(f"perf did not acknowledge {command!r}")
        tell("enable")
        try:
            yield
        finally:
            tell("disable")


def run_greenlets(variant: str, connect, host: str, port: int, count: int, work, timed: str):
    """Run work(conn) for `count` connections, each in a greenlet of its own;
    returns (seconds until all finished, the process's CPU seconds (user and
    system) meanwhile, the connections).  With timed == "connect", each
    greenlet opens its connection inside the timing."""
    import gevent
    if timed == "connect":
        def each(_):
            conn = connect(host=host, port=port, user=USER, password=PASSWORD, database=DATABASE)
            work(conn)
            return conn
        items = range(count)
    else:
        each = work
        items = open_connections(variant, connect, host, port, count)
    if variant == "threadpool":
        pool = gevent.get_hub().threadpool
        pool.maxsize = max(pool.maxsize, count)  # one OS thread per greenlet
        call = lambda item: pool.apply(each, (item,))
    else:
        call = each
    with profiled():
        start, cpu_start = time.perf_counter(), time.process_time()
        greenlets = [gevent.spawn(call, item) for item in items]
        gevent.joinall(greenlets, raise_error=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, [g.value for g in greenlets] if timed == "connect" else list(items)


def concurrency(host: str, port: int, variant: str, count: int, timed: str = "work") -> dict:
    raise_fd_limit(2 * count + 256)
    connect, flavour = prepare(variant)

    def sleep_query(conn) -> None:
        cursor = conn.cursor()
        cursor.execute(f"SELECT SLEEP({SLEEP_S})")
        if cursor.fetchall()[0][0] != 0:
            raise RuntimeError("SELECT SLEEP was interrupted")

    seconds, _, connections = run_greenlets(variant, connect, host, port, count, sleep_query, timed)
    for conn in connections:
        conn.close()
    return {"seconds": seconds, "greenify": flavour}


def throughput(host: str, port: int, variant: str, count: int, queries: int, timed: str = "work",
               rows: int = TABLE_ROWS) -> dict:
    connect, flavour = prepare(variant)
    fetched = []
    query = "SELECT id, account, name, amount FROM bench_rows"
    if rows != TABLE_ROWS:
        query += f" WHERE id < {int(rows)}"

    def fetch_all(conn) -> None:
        cursor = conn.cursor()
        for _ in range(queries):
            cursor.execute(query)
            fetched.append(len(cursor.fetchall()))

    seconds, cpu_seconds, connections = run_greenlets(variant, connect, host, port, count, fetch_all, timed)
    for conn in connections:
        conn.close()
    if fetched != [rows] * (count * queries):
        raise RuntimeError(f"expected {count * queries} results of {rows} rows")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "rows": sum(fetched), "queries": len(fetched),
            "greenify": flavour}


def setup(host: str, port: int) -> dict:
    import MySQLdb
    conn = MySQLdb.connect(host=host, port=port, user=USER, password=PASSWORD, database=DATABASE)
    cursor = conn.cursor()
    cursor.execute("DROP TABLE IF EXISTS bench_rows")
    cursor.execute("CREATE TABLE bench_rows (id INT PRIMARY KEY, account BIGINT, name VARCHAR(64), amount DOUBLE)")
    cursor.executemany("INSERT INTO bench_rows VALUES (%s, %s, %s, %s)",
                       [(i, 10**12 + i * 7919, f"customer-{i:06d}-{'x' * (i % 32)}", i * 1.25)
                        for i in range(TABLE_ROWS)])
    conn.commit()
    conn.close()
    return {}


def main(argv) -> int:
    what, host, port, *rest = argv
    port = int(port)
    if what == "setup":
        result = setup(host, port)
    elif what == "concurrency":
        result = concurrency(host, port, rest[0], int(rest[1]), *rest[2:])
    elif what == "throughput":
        result = throughput(host, port, rest[0], int(rest[1]), int(rest[2]), *rest[3:4], *map(int, rest[4:5]))
    else:
        raise SystemExit(f"unknown command {what!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
