"""greenify's benchmarks: each case against its alternatives, side by side
in one run on one machine.  Absolute times are noisy here (2 cores, other
work running): the variants run in alternating rounds, the table compares
their medians and shows the spread (min-max) of the rounds in brackets.

    make bench            # everything: a table, .results/bench/results.json and .png
    make bench QUICK=1    # a smoke run in under a minute: .results/bench/quick.json and .png
    python -m bench.run --peer-python /tmp/seed-venv/bin/python   # douban's greenify 0.5.0 as a column
    python -m bench.run --markdown                                  # the README's tables, from bench/results.json
    python -m bench.run --record docs/benchmarks.md   # record the last full run as bench/results.json (and .png), render it

A run writes under .results/ (ignored by git); bench/results.json and
bench/results.png are the recorded run the README's tables and chart come
from, replaced only by --record (`make record`).  A quick run is never
recorded.

Cases:
  fastpath     ns per call on a ready fd, libc against green (recv, send, read, write, poll, select)
  switch       a C client ping-pongs one byte with a gevent echo server, against two gevent sockets
  patch        ms for patch_library on libmariadb and libcrypto
  memory       resident memory per waiting greenlet, against per OS thread blocked in the same call
  concurrency  N greenlets each run SELECT SLEEP(0.5) on a connection of their own to MariaDB:
               greenified MySQLdb, stock MySQLdb, stock MySQLdb through the hub's threadpool,
               PyMySQL under monkey patching
  throughput   10 greenlets fetching results: rows per second for 1,000-row results,
               queries per second for 10-row ones
  syscalls     system calls per query and per wait of both throughput workloads (perf stat)
  profile      where the client's CPU goes in the 1,000-row workload (perf)

The MariaDB cases start a server as the tests do (tests/support/servers.py) and run
each variant in a process of its own (bench/db_worker.py).  With
--peer-python, cases fastpath, switch, concurrency and throughput also run
under that interpreter's `greenify` (douban's 0.5.0), whose green functions
are called through the same C harness and whose patch_lib patches the same
libmariadb.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_PATH = HERE / "results.json"  # recorded: the README's tables


def _sections():
    """tests/support/readme_sections.py.  Not imported at the top: the seed's
    interpreter runs this file by its path (--as-peer) from outside the
    checkout, where `tests` (and our greenify) must not be imported."""
    from tests.support import readme_sections

    return readme_sections


def fresh_path() -> Path:
    """Where a full run writes its results (`make record` copies them)."""
    return Path(_sections().fresh_path(str(RESULTS_PATH)))

DB_WORKER = HERE / "db_worker.py"
PEER_LABEL = "douban greenify 0.5.0"


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def row(case: str, name: str, alternative: str, alt: Optional[float], green: float, unit: str,
        target: Optional[str] = None, met: Optional[bool] = None, ratio: Optional[float] = None,
        note: str = "", spread: Optional[dict] = None) -> dict:
    """One line of the table: greenify's figure against one alternative's
    (medians of the rounds, with `spread` holding min, median, max of each).
    `ratio` is greenify / alternative unless given; `target` reads like "<= 1.05"."""
    if ratio is None and alt:
        ratio = green / alt
    return {"case": case, "name": name, "alternative": alternative, "alt": alt, "green": green, "unit": unit,
            "ratio": None if ratio is None else round(ratio, 3), "target": target, "met": met, "note": note,
            "spread": spread or {}}


def meets(ratio: float, target: str, slack: float = 0.0) -> bool:
    op, value = target.split()
    checks = {"<=": lambda: ratio <= float(value) + slack, "<": lambda: ratio < float(value),
              ">=": lambda: ratio >= float(value) - slack}
    return checks[op]()


# --- green functions: this project's, or the peer's ------------------------

def green_function_finder() -> Callable[[str], int]:
    """Activate whichever `greenify` this interpreter has and return
    name -> address of its green twin (green_recv, ...)."""
    import greenify
    greenify.greenify()
    if hasattr(greenify, "patch_library"):  # this project: the twins are in greenify._green
        from greenify._green import ffi, lib
        return lambda name: int(ffi.cast("uintptr_t", ffi.addressof(lib, "green_" + name)))
    # douban's greenify: libgreenify is linked into its extension module
    seed = ctypes.CDLL(greenify.__file__)
    find = lambda name: ctypes.cast(getattr(seed, "green_" + name), ctypes.c_void_p).value
    find.broken = SEED_BROKEN
    return find


# What douban's greenify 0.5.0 cannot run in the harness, and why.
# Its green_select reads FD_ISSET(readfds) and FD_ISSET(exceptfds) without
# checking for NULL, and the harness passes only a write set.
SEED_BROKEN = {"select": "segfaults (NULL readfds)"}


def build_harness() -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp(prefix="greenify-bench-")) / "fastpath.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", str(HERE / "fastpath.c"), "-o", str(out)], check=True)
    harness = ctypes.CDLL(str(out))
    for name in ("time_recv", "time_send", "time_read", "time_write", "time_poll", "time_select", "ping_pong"):
        getattr(harness, name).restype = ctypes.c_double
    return harness


def libc_address(name: str) -> int:
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value


class Spread:
    """The rounds of one variant: what the table compares is the median;
    min and max say how much the machine disturbed the run."""

    def __init__(self, values: List[float]):
        if not values:
            raise ValueError("no rounds")
        self.values = values

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def summary(self, digits: int = 1) -> List[float]:
        return [round(min(self.values), digits), round(self.median, digits), round(max(self.values), digits)]


def harness_figure(value: float, what: str) -> float:
    """A C harness call returns -1 when a call inside it failed: an error, never a figure."""
    if value < 0:
        raise RuntimeError(f"the C harness failed in {what}: a call returned an error")
    return value


def alternate(rounds: int, variants: Dict[str, Callable[[], float]]) -> Dict[str, Spread]:
    """Run the variants in turn, `rounds` times; every round of each, for the median and the spread."""
    seen: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            seen[name].append(run())
    return {name: Spread(values) for name, values in seen.items()}


def spread_of(**spreads: Spread) -> dict:
    """The `spread` field of a row: min, median, max of each side's rounds."""
    return {side: spread.summary() for side, spread in spreads.items()}


# --- 1. fast path ------------------------------------------------------------

FASTPATH_TARGETS = {"recv": "<= 1.05", "send": "<= 1.05", "read": "<= 1.05", "poll": "<= 1.0", "select": "<= 1.0"}


def case_fastpath(options) -> List[dict]:
    green_address = green_function_finder()
    harness = build_harness()
    n = 20000 if options.quick else 200000
    rounds = 3 if options.quick else 9
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.sendall(b"x")  # one byte that MSG_PEEK finds every time
    r, w = socket.socketpair()  # read: a fresh pair, refilled by the peer in the loop
    loops = {
        "recv": lambda fn: harness.time_recv(ctypes.c_void_p(fn), a.fileno(), ctypes.c_long(n)),
        "send": lambda fn: harness.time_send(ctypes.c_void_p(fn), a.fileno(), b.fileno(), ctypes.c_long(n)),
        "write": lambda fn: harness.time_write(ctypes.c_void_p(fn), a.fileno(), b.fileno(), ctypes.c_long(n)),
        "poll": lambda fn: harness.time_poll(ctypes.c_void_p(fn), a.fileno(), ctypes.c_long(n)),
        "select": lambda fn: harness.time_select(ctypes.c_void_p(fn), a.fileno(), ctypes.c_long(n)),
        "read": lambda fn: harness.time_read(ctypes.c_void_p(fn), r.fileno(), w.fileno(), ctypes.c_long(n // 4)),
    }
    rows = []
    for name, loop in loops.items():
        broken = getattr(green_address, "broken", {}).get(name)
        if broken:
            progress(f"fastpath {name}: skipped, {broken}")
            rows.append(row("fastpath", f"`{name}` on a ready fd", "libc", None, None, "ns", note=broken))
            continue
        progress(f"fastpath {name}: libc and green, {rounds} alternating rounds of {n} calls")
        libc_fn, green_fn = libc_address(name), green_address(name)
        spreads = alternate(rounds, {"libc": lambda: harness_figure(loop(libc_fn), f"libc {name}"),
                                     "green": lambda: harness_figure(loop(green_fn), f"green {name}")})
        libc_ns, green_ns = spreads["libc"].median, spreads["green"].median
        ratio = green_ns / libc_ns
        target = FASTPATH_TARGETS.get(name)
        # ratios within 2% of 1.0 are within this machine's noise
        met = None if target is None else meets(ratio, target, 0.02 if target.endswith(" 1.0") else 0.0)
        rows.append(row("fastpath", f"`{name}` on a ready fd", "libc", round(libc_ns, 1), round(green_ns, 1), "ns",
                        target, met, ratio, spread=spread_of(alt=spreads["libc"], green=spreads["green"])))
    for sock in (a, b, r, w):
        sock.close()
    return rows


# --- 2. switch ---------------------------------------------------------------

def case_switch(options) -> List[dict]:
    import gevent
    from gevent import socket as gsocket
    green_address = green_function_finder()
    harness = build_harness()
    n = 2000 if options.quick else 20000

    def echo(sock):
        try:
            while True:
                data = sock.recv(1)
                if not data:
                    return
                sock.sendall(data)
        except OSError:
            return

    def green_client() -> float:
        client, plain_server = socket.socketpair()  # the C client's end stays blocking, as a library's would
        server = gsocket.socket(fileno=plain_server.detach())
        echoer = gevent.spawn(echo, server)
        result = harness_figure(harness.ping_pong(ctypes.c_void_p(green_address("send")),
                                                  ctypes.c_void_p(green_address("recv")), client.fileno(),
                                                  ctypes.c_long(n)), "ping_pong")
        client.close()
        echoer.join()
        return result

    def gevent_client() -> float:
        client, server = gsocket.socketpair()
        echoer = gevent.spawn(echo, server)
        start = time.perf_counter()
        for _ in range(n):
            client.sendall(b"p")
            client.recv(1)
        took = time.perf_counter() - start
        client.close()
        echoer.join()
        return took / n * 1e9

    rounds = 3 if options.quick else 7
    progress(f"switch: one-byte ping-pong, {rounds} alternating rounds of {n} round trips")
    spreads = alternate(rounds, {"gevent": gevent_client, "green": green_client})
    gevent_ns, green_ns = spreads["gevent"].median, spreads["green"].median
    ratio = green_ns / gevent_ns
    return [row("switch", "one-byte ping-pong with a gevent echo server", "two gevent sockets",
                round(gevent_ns), round(green_ns), "ns", "<= 0.8", meets(ratio, "<= 0.8"), ratio,
                note="C client calling green send/recv", spread=spread_of(alt=spreads["gevent"], green=spreads["green"]))]


# --- patch and memory ----------------------------------------------------------

def case_patch(options) -> List[dict]:
    import greenify
    rows = []
    for stem, soname, target in (("libmariadb", "libmariadb.so.3", 10.0), ("libcrypto", "libcrypto.so.3", 50.0)):
        try:
            ctypes.CDLL(soname)
        except OSError:
            progress(f"patch: {soname} not installed, skipped")
            continue
        progress(f"patch {soname}")
        times = []
        for _ in range(3 if options.quick else 10):
            start = time.perf_counter()
            greenify.patch_library(soname)
            times.append((time.perf_counter() - start) * 1000)
            greenify.unpatch_library(soname)
        spread = Spread(times)
        rows.append(row("patch", f"`patch_library` on {soname}", "", None, round(spread.median, 2), "ms",
                        f"<= {target}", spread.median <= target, spread={"green": spread.summary(2)}))
    return rows


# patch_all() in a fresh interpreter that imported the four drivers, then an
# object loaded later (greenify's demo client, a blocking C client) with and
# without patch_all() in effect: the difference is the on-load cost.
PATCH_ALL_CHILD = """
import ctypes, importlib.util, json, sys, time
import gevent, MySQLdb, psycopg2, pylibmc, pycurl
import greenify
path = importlib.util.find_spec("greenify._demo_client").origin  # found, not loaded
report = greenify.patch_all() if sys.argv[1] == "patch_all" else None
started = time.perf_counter()
ctypes.CDLL(path)
load_s = time.perf_counter() - started
print(json.dumps({"load_s": load_s} if report is None else {
    "call_s": report.seconds, "objects": report.objects_looked_at, "slots": report.slots_written,
    "later": report.later_loads, "load_s": load_s}))
"""


def case_patch_all(options) -> List[dict]:
    """patch_all()'s cost where MySQLdb, psycopg2, pylibmc and pycurl are
    imported (<= 50 ms), and an object loaded later (<= 10 ms on top of dlopen)."""
    progress("patch_all with MySQLdb, psycopg2, pylibmc, pycurl imported")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rounds = 3 if options.quick else 9
    children: Dict[str, List[dict]] = {"patch_all": [], "plain": []}
    for _ in range(rounds):
        for variant in children:
            output = subprocess.run([sys.executable, "-c", PATCH_ALL_CHILD, variant], capture_output=True, text=True,
                                    env=env, check=True, timeout=120).stdout
            children[variant].append(json.loads(output.strip().splitlines()[-1]))
    calls = Spread([child["call_s"] * 1000 for child in children["patch_all"]])
    first = children["patch_all"][0]
    later = Spread([child["later"][0][2] * 1000 for child in children["patch_all"] if child["later"]])
    plain_load = Spread([child["load_s"] * 1000 for child in children["plain"]])
    green_load = Spread([child["load_s"] * 1000 for child in children["patch_all"]])
    on_top = green_load.median - plain_load.median
    later_slots = first["later"][0][1] if first["later"] else 0
    return [
        row("patch_all", "`patch_all()`, MySQLdb + psycopg2 + pylibmc + pycurl imported", "", None,
            round(calls.median, 1), "ms", "<= 50", calls.median <= 50, spread={"green": calls.summary(1)},
            note=f"{first['objects']} objects looked at, {first['slots']} slots written"),
        row("patch_all", "object loaded later (the demo client): dlopen's time on top", "", None,
            round(on_top, 2), "ms", "<= 10", on_top <= 10, spread={"green": green_load.summary(2)},
            note=f"dlopen alone {plain_load.median:.2f} ms; {later.median:.1f} ms in the hook; "
                 f"{later_slots} slots written"),
    ]


def rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def case_memory(options) -> List[dict]:
    import gevent
    from greenify._green import ffi, lib
    green_function_finder()
    count = 500 if options.quick else 2000
    raise_fd_limit(4 * count + 256)

    progress(f"memory: {count} greenlets waiting in green_recv")
    pairs = [socket.socketpair() for _ in range(count)]
    before = rss_kb()
    greenlets = [gevent.spawn(lambda a=a: lib.green_recv(a.fileno(), ffi.new("char[]", 1), 1, 0)) for a, _ in pairs]
    gevent.sleep(0.2)
    per_greenlet = (rss_kb() - before) / count
    for _, b in pairs:
        b.send(b"x")
    gevent.joinall(greenlets)
    for a, b in pairs:
        a.close()
        b.close()

    threads_count = count // 4
    progress(f"memory: {threads_count} OS threads blocked in recv")
    pairs = [socket.socketpair() for _ in range(threads_count)]
    before = rss_kb()
    threads = [threading.Thread(target=a.recv, args=(1,)) for a, _ in pairs]
    for t in threads:
        t.start()
    time.sleep(0.3)
    per_thread = (rss_kb() - before) / threads_count
    for _, b in pairs:
        b.send(b"x")
    for t in threads:
        t.join()
    for a, b in pairs:
        a.close()
        b.close()
    return [row("memory", "resident memory per waiter", "OS thread blocked in `recv`", round(per_thread, 1),
                round(per_greenlet, 1), "KiB", note="greenlet waiting in `green_recv`")]


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


# --- the MariaDB cases ---------------------------------------------------------

MAX_CONNECTIONS = 1200
SLEEP_S = 0.5
VARIANTS = {  # name -> label, as db_worker.py knows them
    "greenified": "greenified MySQLdb",
    "stock": "stock MySQLdb",
    "threadpool": "stock MySQLdb in hub.threadpool",
    "pymysql": "PyMySQL, monkey-patched",
    "peer": f"MySQLdb, {PEER_LABEL}",
}


@contextlib.contextmanager
def mariadb_server() -> Iterator[object]:
    """A MariaDB started as the tests start theirs (tests/support/servers.py), then
    opened to more than 1,000 clients: servers.py starts it with
    --max-connections=500, and max_connections can be raised on the running
    server, as can its RLIMIT_NOFILE."""
    from tests.support import servers
    with servers.start_mariadb() as db:
        progress(f"MariaDB on {db.host}:{db.port}, ready in {db.startup_s:.1f} s")
        soft, hard = resource.prlimit(db.process.pid, resource.RLIMIT_NOFILE)
        if soft < 4 * MAX_CONNECTIONS:
            resource.prlimit(db.process.pid, resource.RLIMIT_NOFILE, (min(hard, 4 * MAX_CONNECTIONS), hard))
        client = servers.find_binary(["mariadb", "mysql"], "mariadb-client")
        servers.run_checked([client, "--no-defaults", "--user=root", f"--socket={db.unix_socket}", "-e",
                             f"SET GLOBAL max_connections = {MAX_CONNECTIONS}"], db.log_path, "max_connections")
        db_worker(sys.executable, "setup", db)
        yield db


def db_worker(python: str, what: str, db, *args) -> dict:
    """Run bench/db_worker.py under `python` (outside the repository, so the
    peer's `import greenify` cannot find this project's)."""
    command = [python, str(DB_WORKER), what, db.host, str(db.port), *map(str, args)]
    done = subprocess.run(command, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def variant_python(variant: str, options) -> tuple:
    return (options.peer_python, "greenified") if variant == "peer" else (sys.executable, variant)


def case_concurrency(options) -> List[dict]:
    counts = [1, 10, 100] if options.quick else [1, 10, 100, 1000]
    stock_counts = [1] if options.quick else [1, 10]  # 100 and 1000 would take 50 and 500 s: extrapolated
    rounds = 1 if options.quick else 3
    variants = ["greenified", "stock", "threadpool", "pymysql"] + (["peer"] if options.peer_python else [])
    seen: Dict[str, Dict[int, List[float]]] = {v: {n: [] for n in counts} for v in variants}
    top = counts[-1]
    # N greenlets that each connect, then SELECT SLEEP: the server's connection handling dominates
    connecting = ["greenified"] + (["peer"] if options.peer_python else [])
    connect_seen: Dict[str, List[float]] = {v: [] for v in connecting}
    with mariadb_server() as db:
        for round_number in range(1, rounds + 1):
            for n in counts:
                for variant in variants:
                    if variant == "stock" and n not in stock_counts:
                        continue
                    progress(f"concurrency round {round_number}/{rounds}: N={n}, {VARIANTS[variant]}")
                    python, name = variant_python(variant, options)
                    seen[variant][n].append(db_worker(python, "concurrency", db, name, n)["seconds"])
            for variant in connecting:
                progress(f"concurrency round {round_number}/{rounds}: N={top} connecting, {VARIANTS[variant]}")
                python, name = variant_python(variant, options)
                connect_seen[variant].append(db_worker(python, "concurrency", db, name, top, "connect")["seconds"])
    measured = {v: {n: Spread(times).median for n, times in by_n.items() if times} for v, by_n in seen.items()}
    detail = {v: {} for v in variants}
    for variant in variants:
        for n in counts:
            if n in measured[variant]:
                detail[variant][n] = {"seconds": round(measured[variant][n], 3), "extrapolated": False,
                                      "spread": Spread(seen[variant][n]).summary(3)}
            else:  # stock MySQLdb runs one query after another: time per query times N
                largest = max(measured[variant])
                detail[variant][n] = {"seconds": round(measured[variant][largest] / largest * n, 3),
                                      "extrapolated": True}
    RESULTS_EXTRA["concurrency"] = {"floor_s": SLEEP_S, "counts": counts, "rounds": rounds,
                                    "labels": {v: VARIANTS[v] for v in variants}, "seconds": detail}

    green = detail["greenified"][top]["seconds"]
    what = f"N={top} greenlets, `SELECT SLEEP(0.5)` each"
    ratio = green / SLEEP_S
    rows = [row("concurrency", what, "the 0.5 s floor", SLEEP_S, green, "s", "<= 1.5", meets(ratio, "<= 1.5"),
                ratio, spread={"green": detail["greenified"][top]["spread"]})]
    for variant in ("stock", "threadpool", "pymysql"):
        alt = detail[variant][top]
        rows.append(row("concurrency", what, VARIANTS[variant] + (" (extrapolated)" if alt["extrapolated"] else ""),
                        alt["seconds"], green, "s", spread={"alt": alt.get("spread"),
                                                            "green": detail["greenified"][top]["spread"]}))
    if options.peer_python:
        for each in rows:
            each["peer"] = detail["peer"][top]["seconds"]
            each["peer_ratio"] = round(each["peer"] / each["alt"], 3)
        spreads = {v: Spread(times) for v, times in connect_seen.items()}
        ratio = spreads["greenified"].median / spreads["peer"].median
        # "no slower than the seed": within 5%, the noise of 1,000 connections on this machine
        rows.append(row("concurrency", f"N={top} greenlets, connect + `SELECT SLEEP(0.5)` each", PEER_LABEL,
                        round(spreads["peer"].median, 3), round(spreads["greenified"].median, 3), "s", "<= 1.0",
                        meets(ratio, "<= 1.0", 0.05), ratio,
                        spread={"alt": spreads["peer"].summary(3), "green": spreads["greenified"].summary(3)}))
    return rows


THROUGHPUT_TIMINGS = {  # how db_worker.py times the queries -> what the row says
    "work": "connections opened before the clock",
    "connect": "connections opened inside the timing",
}
# result size -> (queries per greenlet, quick run's, the timings it runs): 1,000-row results keep the client
# busy turning rows into Python objects; 10-row results make the wait path most of a query's cost
THROUGHPUT_SHAPES = {1000: (100, 20, ("work", "connect")), 10: (1000, 200, ("work",))}


def case_throughput(options) -> List[dict]:
    greenlets = 10
    rounds = 1 if options.quick else 7
    variants = ["greenified", "stock", "pymysql"] + (["peer"] if options.peer_python else [])
    runs = [(rows, timed) for rows, (_, _, timings) in THROUGHPUT_SHAPES.items() for timed in timings]
    seen: Dict[tuple, Dict[str, List[float]]] = {run: {v: [] for v in variants} for run in runs}
    cpu: Dict[tuple, Dict[str, List[float]]] = {run: {v: [] for v in variants} for run in runs}  # µs per query
    with mariadb_server() as db:
        for round_number in range(1, rounds + 1):
            for rows, timed in runs:
                full, quick, _ = THROUGHPUT_SHAPES[rows]
                queries = quick if options.quick else full
                for variant in variants:
                    progress(f"throughput round {round_number}/{rounds}: {VARIANTS[variant]}, "
                             f"{greenlets} greenlets x {queries} queries x {rows:,} rows, {THROUGHPUT_TIMINGS[timed]}")
                    python, name = variant_python(variant, options)
                    result = db_worker(python, "throughput", db, name, greenlets, queries, timed, rows)
                    seen[rows, timed][variant].append(result["rows"] / result["seconds"])
                    cpu[rows, timed][variant].append(result["cpu_seconds"] / result["queries"] * 1e6)
    RESULTS_EXTRA["throughput"] = {
        "greenlets": greenlets, "queries": THROUGHPUT_SHAPES[1000][1 if options.quick else 0], "rounds": rounds,
        "labels": {v: VARIANTS[v] for v in variants},
        "rows_per_s": {v: round(Spread(rates).median) for v, rates in seen[1000, "work"].items()},
        "spread": {t: {v: Spread(rates).summary(0) for v, rates in seen[1000, t].items()}
                   for t in THROUGHPUT_SHAPES[1000][2]}}
    rows_out = []
    for rows, timed in runs:
        per_query = rows < 1000  # small results: queries per second say more than rows
        scale = 1 / rows if per_query else 1
        spreads = {v: Spread([r * scale for r in rates]) for v, rates in seen[rows, timed].items()}
        median = {v: spread.median for v, spread in spreads.items()}
        unit = "queries/s" if per_query else "rows/s"
        what = f"{unit}, {greenlets} greenlets fetching {rows:,}-row results, {THROUGHPUT_TIMINGS[timed]}"
        comparisons = [("pymysql", ">= 8" if not per_query else None), ("stock", ">= 1.0")] \
            + ([("peer", ">= 1.1")] if options.peer_python else [])
        for variant, target in comparisons:
            ratio = median["greenified"] / median[variant]
            # "no slower than stock": within 2%, this machine's noise
            met = None if target is None else meets(ratio, target, 0.02 if target == ">= 1.0" else 0.0)
            rows_out.append(row("throughput", what, VARIANTS[variant], round(median[variant]),
                                round(median["greenified"]), unit, target, met, ratio,
                                spread={"alt": spreads[variant].summary(0), "green": spreads["greenified"].summary(0)}))
            if options.peer_python and variant != "peer":
                rows_out[-1]["peer"] = round(median["peer"])
                rows_out[-1]["peer_ratio"] = round(median["peer"] / median[variant], 3)
        if options.peer_python and timed == "work":
            # The client's own cost, apart from how the 2 cores were shared with the server
            used = {v: Spread(cpu[rows, timed][v]) for v in ("greenified", "peer")}
            rows_out.append(row("throughput", f"client CPU µs per query, {greenlets} greenlets fetching {rows:,}-row "
                                f"results", PEER_LABEL, round(used["peer"].median), round(used["greenified"].median),
                                "µs", spread={"alt": used["peer"].summary(0), "green": used["greenified"].summary(0)}))
    return rows_out


CPU_QUERIES = (2000, 300)  # queries per round, quick run's


def case_cpu(options) -> List[dict]:
    """What greenify itself adds to a query: the client's CPU (process time,
    user and system) per 10-row query on one connection, queries one after
    another, greenified against stock MySQLdb blocking (and the seed),
    medians of alternating rounds.  The server's share of the 2 cores does
    not count, so this figure holds on a busy machine where rows/s do not."""
    rounds = 3 if options.quick else 9
    queries = CPU_QUERIES[1 if options.quick else 0]
    variants = ["greenified", "stock"] + (["peer"] if options.peer_python else [])
    used: Dict[str, List[float]] = {v: [] for v in variants}
    with mariadb_server() as db:
        for round_number in range(1, rounds + 1):
            for variant in variants:
                progress(f"cpu round {round_number}/{rounds}: {VARIANTS[variant]}, {queries} 10-row queries")
                python, name = variant_python(variant, options)
                result = db_worker(python, "throughput", db, name, 1, queries, "work", 10)
                used[variant].append(result["cpu_seconds"] / result["queries"] * 1e6)
    spreads = {v: Spread(times) for v, times in used.items()}
    what = "client CPU µs per 10-row query, one connection, queries one after another"
    green = spreads["greenified"]
    rows = [row("cpu", what, VARIANTS["stock"], round(spreads["stock"].median, 1), round(green.median, 1), "µs",
                "<= 1.1", meets(green.median / spreads["stock"].median, "<= 1.1"),
                green.median / spreads["stock"].median,
                spread={"alt": spreads["stock"].summary(1), "green": green.summary(1)})]
    if options.peer_python:
        ratio = green.median / spreads["peer"].median
        rows.append(row("cpu", what, PEER_LABEL, round(spreads["peer"].median, 1), round(green.median, 1), "µs",
                        "<= 1.0", meets(ratio, "<= 1.0", 0.02), ratio,
                        spread={"alt": spreads["peer"].summary(1), "green": green.summary(1)}))
    return rows


# What a profile's shared objects are, by the start of their file name.
PROFILE_GROUPS = {
    "wait machinery (greenify, greenlet, gevent)": ("_green.", "greenify.", "_greenlet.", "corecext.", "_gevent_c_"),
    "Python interpreter": ("libpython", "python3"),
    "MySQLdb and libmariadb": ("_mysql.", "libmariadb"),
    "C library": ("libc.so", "libm.so", "ld-linux"),
    "kernel": ("[kernel",),
}


def perf_timed(perf_args: List[str], command: List[str], folder: str) -> None:
    """Run `perf <perf_args> -- command` with perf's window open during the
    command's timed part only (db_worker.py opens and closes it through two
    FIFOs in `folder`)."""
    if shutil.which("perf") is None:
        raise RuntimeError("the syscalls and profile cases need perf (apt-get install linux-perf)")
    ctl, ack = os.path.join(folder, "ctl"), os.path.join(folder, "ack")
    os.mkfifo(ctl)
    os.mkfifo(ack)
    done = subprocess.run(["perf", *perf_args, "-D", "-1", "--control", f"fifo:{ctl},{ack}", "--", *command],
                          cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=600, env={**os.environ, "GREENIFY_BENCH_PERF_CONTROL": f"{ctl},{ack}"})
    if done.returncode != 0:
        raise RuntimeError(f"perf {perf_args[0]} {' '.join(command)} failed:\n{done.stderr[-3000:]}")


def perf_shares(command: List[str]) -> Dict[str, float]:
    """Percent of the CPU samples perf took of `command`'s timed part per
    PROFILE_GROUPS group, and `other`."""
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "perf.data")
        perf_timed(["record", "-q", "-F", "4999", "-o", data], command, folder)
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso", "-g", "none"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600, check=True)
    shares = {group: 0.0 for group in PROFILE_GROUPS}
    shares["other"] = 0.0
    for line in report.stdout.splitlines():
        fields = line.split()
        if len(fields) != 2 or not fields[0].endswith("%"):
            continue
        name = os.path.basename(fields[1])
        group = next((g for g, starts in PROFILE_GROUPS.items() if name.startswith(starts)), "other")
        shares[group] += float(fields[0].rstrip("%"))
    return {group: round(share, 2) for group, share in shares.items()}


def case_profile(options) -> List[dict]:
    """Where the client's CPU goes in the 1,000-row throughput workload (perf, the
    timed part only): what any wait path can save there is bounded by the share
    of the machinery it replaces."""
    greenlets, queries = 10, (50 if options.quick else 300)
    variants = ["greenified"] + (["peer"] if options.peer_python else [])
    shares = {}
    with mariadb_server() as db:
        for variant in variants:
            python, name = variant_python(variant, options)
            progress(f"profile: perf of {VARIANTS[variant]}, {greenlets} greenlets x {queries} queries x 1,000 rows")
            shares[variant] = perf_shares([python, str(DB_WORKER), "throughput", db.host, str(db.port), name,
                                           str(greenlets), str(queries)])
    RESULTS_EXTRA["profile"] = {"labels": {v: VARIANTS[v] for v in variants}, "percent": shares}
    machinery = "wait machinery (greenify, greenlet, gevent)"
    rows_out = [row("profile", f"client CPU in the {machinery}, 1,000-row throughput", "", None,
                    shares["greenified"][machinery], "%",
                    note=f"Python interpreter {shares['greenified']['Python interpreter']}%, "
                         f"MySQLdb and libmariadb {shares['greenified']['MySQLdb and libmariadb']}%")]
    if options.peer_python:
        theirs = shares["peer"][machinery]
        rows_out[0].update(alternative=PEER_LABEL, alt=theirs,
                           ratio=round(shares["greenified"][machinery] / theirs, 3) if theirs else None)
        # with a wait path that cost nothing at all, the seed's client would need (100 - theirs)% of its time
        rows_out.append(row("profile", "most a wait path can gain on the seed in the 1,000-row case "
                            "(its machinery's share at zero cost)", "", None, round(100 / (100 - theirs), 3), "x"))
    return rows_out


# The system calls counted one by one (the rest are in `other`), and the
# failures counted: a recv refused with EAGAIN (a wait follows), an epoll_ctl.
COUNTED_SYSCALLS = ("recvfrom", "sendto", "poll", "ppoll", "epoll_wait", "epoll_ctl", "fcntl", "getsockopt", "getpid")
COUNTED_FAILURES = {"recvfrom": "ret == -11", "epoll_ctl": "ret < 0"}


def syscall_counts(command: List[str]) -> Dict[str, List[int]]:
    """syscall -> [calls, failures] in `command`'s timed part, counted by the kernel's
    tracepoints (perf stat: unlike strace, it does not slow the calls down and so
    does not change how often a client finds its answer already there); `all` is
    every system call."""
    events = ["-e", "raw_syscalls:sys_enter"]
    for name in COUNTED_SYSCALLS:
        events += ["-e", f"syscalls:sys_enter_{name}"]
        if name in COUNTED_FAILURES:
            events += ["-e", f"syscalls:sys_exit_{name}", "--filter", COUNTED_FAILURES[name]]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "stat.csv")
        perf_timed(["stat", "-x", ",", "-o", out, *events], command, folder)
        counts: Dict[str, List[int]] = {}
        for line in Path(out).read_text().splitlines():
            fields = line.split(",")
            if len(fields) < 3 or not fields[0].isdigit():
                continue
            kind, _, name = fields[2].partition(":sys_")
            call = "all" if kind == "raw_syscalls" else name.split("_", 1)[1]
            counts.setdefault(call, [0, 0])[0 if name.startswith("enter") else 1] = int(fields[0])
    counts["other"] = [counts["all"][0] - sum(pair[0] for call, pair in counts.items() if call != "all"), 0]
    return counts


def case_syscalls(options) -> List[dict]:
    """System calls per wait of the throughput workloads (1,000-row and 10-row
    results), counted by the kernel (perf stat) in the timed part only, per
    query and per wait (the recv calls that failed with EAGAIN)."""
    greenlets = 10
    variants = ["greenified"] + (["peer"] if options.peer_python else [])
    per_query: Dict[int, Dict[str, Dict[str, List[float]]]] = {rows: {} for rows in THROUGHPUT_SHAPES}
    with mariadb_server() as db:
        for rows, (full, quick, _) in THROUGHPUT_SHAPES.items():
            queries = quick if options.quick else full
            for variant in variants:
                python, name = variant_python(variant, options)
                progress(f"syscalls: perf stat of {VARIANTS[variant]}, {greenlets} greenlets x {queries} queries "
                         f"x {rows:,} rows")
                counts = syscall_counts([python, str(DB_WORKER), "throughput", db.host, str(db.port), name,
                                         str(greenlets), str(queries), "work", str(rows)])
                total = greenlets * queries
                per_query[rows][variant] = {call: [x / total for x in pair] for call, pair in counts.items()}
    RESULTS_EXTRA["syscalls"] = {"labels": {v: VARIANTS[v] for v in variants}, "shapes": {}}
    rows_out = []
    for rows in THROUGHPUT_SHAPES:
        shape = RESULTS_EXTRA["syscalls"]["shapes"].setdefault(str(rows), {
            "per_query": {v: {c: [round(x, 2) for x in pair] for c, pair in sorted(calls.items())
                              if abs(pair[0]) >= 0.005} for v, calls in per_query[rows].items()},
            "waits_per_query": {}, "per_wait": {}})
        totals, per_wait = {}, {}
        for variant in variants:
            calls = per_query[rows][variant]
            totals[variant] = calls["all"][0]
            # Each wait of libmariadb's follows a non-blocking recv that failed with EAGAIN: for every
            # variant alike, those failures count the waits.  A wait's cost is what a query makes
            # beyond its own I/O (the query's send and the receives that brought data).
            waits_per_query = calls["recvfrom"][1]
            own_io = calls["sendto"][0] + calls["recvfrom"][0] - waits_per_query
            per_wait[variant] = (totals[variant] - own_io) / waits_per_query if waits_per_query else float("nan")
            shape["waits_per_query"][variant] = round(waits_per_query, 2)
            shape["per_wait"][variant] = round(per_wait[variant], 2)
            failing_ctl = calls["epoll_ctl"][1] / waits_per_query if waits_per_query else 0.0
            rows_out.append(row("syscalls", f"system calls per query, {rows:,}-row results ({VARIANTS[variant]})",
                                "", None, round(totals[variant], 2), "calls",
                                note=f"{waits_per_query:.2f} waits per query, each {per_wait[variant]:.2f} system "
                                     f"calls beyond the query's own I/O ({failing_ctl:.2f} failing epoll_ctl)"))
        if options.peer_python:
            for what, figures in (("system calls per query", totals),
                                  ("system calls per wait, beyond the query's own I/O", per_wait)):
                ratio = figures["greenified"] / figures["peer"]
                rows_out.append(row("syscalls", f"{what}, {rows:,}-row results", PEER_LABEL,
                                    round(figures["peer"], 2), round(figures["greenified"], 2), "calls", "< 1.0",
                                    ratio < 1.0, ratio))
    return rows_out


RESULTS_EXTRA: Dict[str, dict] = {}
README_SECTION = "bench"  # the README's generated tables (tests/support/readme_sections.py)
CASES = {"fastpath": case_fastpath, "switch": case_switch, "patch": case_patch, "memory": case_memory,
         "concurrency": case_concurrency, "throughput": case_throughput, "cpu": case_cpu, "syscalls": case_syscalls,
         "profile": case_profile, "patch_all": case_patch_all}
PEER_CASES = ("fastpath", "switch")  # run in the peer interpreter itself; 3 and 4 run it per variant


def run_peer_cases(options, rows: List[dict]) -> None:
    """Cases 1 and 2 under the peer interpreter (its green functions through the
    same C harness); its figures become the rows' `peer` column."""
    wanted = [case for case in PEER_CASES if case in options.selected]
    if not wanted:
        return
    progress(f"{PEER_LABEL} under {options.peer_python}: {', '.join(wanted)}")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [options.peer_python, str(Path(__file__).resolve()), "--as-peer", "--output", out.name,
                   *(["--quick"] if options.quick else []), *wanted]
        subprocess.run(command, check=True, cwd=tempfile.gettempdir())
        peer_rows = json.loads(Path(out.name).read_text())["results"]
    by_key = {(r["case"], r["name"]): r for r in peer_rows}
    for each in rows:
        theirs = by_key.get((each["case"], each["name"]))
        if theirs is not None:
            each["peer"], each["peer_ratio"] = theirs["green"], theirs["ratio"]
            if theirs["green"] is None:
                each["peer_note"] = theirs["note"]


# --- the table, the chart ---------------------------------------------------------

def figure(value, unit: str) -> str:
    if value is None:
        return ""
    if unit in ("rows/s", "queries/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ns":
        return f"{value:.1f} ns" if value < 10000 else f"{value:,.0f} ns"
    return f"{value:g} {unit}"


def spread_figure(value, unit: str, spread: Optional[List[float]]) -> str:
    """A median with the min-max of its rounds, e.g. `540.8 ns [532.0-560.2]`."""
    text = figure(value, unit)
    if value is None or not spread or spread[0] == spread[2]:
        return text
    low, high = (figure(x, unit).rsplit(" ", 1)[0] if unit != "rows/s" else f"{x:,.0f}" for x in (spread[0], spread[2]))
    return f"{text} [{low}-{high}]"


def ratio_text(ratio: Optional[float]) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"


def verdict(each: dict) -> str:
    if not each.get("target"):
        return ""
    target = each["target"].replace("<=", "≤").replace(">=", "≥")
    if each["met"]:
        return f"{target}: met"
    if each["ratio"] is None or each["alt"] is None:
        return f"{target}: MISSED"
    wanted = float(each["target"].split()[1])
    return f"{target}: MISSED ({each['ratio']:.2f}, {abs(each['ratio'] / wanted - 1) * 100:.0f}% off)"


def run_line(results: dict) -> str:
    """What the run was: machine, time, and the load it ran beside."""
    load = results.get("load_average")
    noted = f"; 1-minute load average {load['before']:.2f} before, {load['after']:.2f} after" if load else ""
    return (f"Run: {results['cpus']} cores, {results['machine']}, Python {results['python']}"
            + (", with douban greenify 0.5.0 as a column" if results.get("peer") else "")
            + (", QUICK" if results["quick"] else "") + f"; {results['seconds']:.0f} s{noted}.")


def table_lines(results: dict, markdown: bool) -> List[str]:
    rows = results["results"]
    peer = any("peer" in each for each in rows)
    header = ["case", "what", "alternative", "alternative's figure", "greenify", "ratio"]
    if peer:
        header += [f"{PEER_LABEL} (ratio)"]
    header += ["target"]
    body = []
    for each in rows:
        spread = each.get("spread") or {}
        line = [each["case"], each["name"], each["alternative"], spread_figure(each["alt"], each["unit"], spread.get("alt")),
                spread_figure(each["green"], each["unit"], spread.get("green")), ratio_text(each["ratio"])]
        if peer:
            if "peer" not in each:
                line.append("")
            elif each["peer"] is None:
                line.append(each.get("peer_note", "no figure"))
            else:
                line.append(f"{figure(each['peer'], each['unit'])} ({ratio_text(each['peer_ratio'])})")
        line.append(verdict(each))
        body.append(line)
    if markdown:
        out = [run_line(results), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in body]
    else:
        widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
        out = [run_line(results), ""]
        out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header] + body]
    concurrency = results.get("concurrency")
    if concurrency:
        out += ["", concurrency_lines(concurrency, markdown)]
    return out


def concurrency_lines(concurrency: dict, markdown: bool) -> str:
    labels = concurrency["labels"]
    header = ["N"] + list(labels.values())
    body = []
    for n in concurrency["counts"]:
        line = [str(n)]
        for variant in labels:
            cell = concurrency["seconds"][variant][str(n)] if str(n) in concurrency["seconds"][variant] \
                else concurrency["seconds"][variant][n]
            line.append(f"{cell['seconds']:.2f} s" + (" (extrapolated)" if cell["extrapolated"] else ""))
        body.append(line)
    title = f"Concurrency: seconds until all N `SELECT SLEEP({concurrency['floor_s']})` finished (floor {concurrency['floor_s']} s)"
    if markdown:
        return "\n".join([title + ":", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(x) for x in column) for column in zip(header, *body)]
    return "\n".join([title] + ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
                                for line in [header] + body])


def draw_chart(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return
    rows = results["results"]
    peer = any("peer" in each for each in rows)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"greenify benchmarks ({results['cpus']} cores, {results['machine']}, Python {results['python']}"
                 + (", QUICK run" if results["quick"] else "") + ")")

    ax = axes[0][0]
    concurrency = results.get("concurrency")
    if concurrency:
        counts = concurrency["counts"]
        for variant, label in concurrency["labels"].items():
            cells = [concurrency["seconds"][variant].get(str(n)) or concurrency["seconds"][variant].get(n)
                     for n in counts]
            measured = [(n, c["seconds"]) for n, c in zip(counts, cells) if not c["extrapolated"]]
            line, = ax.plot(*zip(*measured), marker="o", label=label)
            guessed = [(n, c["seconds"]) for n, c in zip(counts, cells) if c["extrapolated"]]
            if guessed:
                ax.plot(*zip(*([measured[-1]] + guessed)), linestyle="--", marker="o", markerfacecolor="none",
                        color=line.get_color(), label=label + " (extrapolated)")
        ax.axhline(concurrency["floor_s"], color="black", linestyle=":", label=f"floor: {concurrency['floor_s']} s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("greenlets, each SELECT SLEEP(0.5) on its own connection")
        ax.set_ylabel("seconds until all finished")
        ax.legend(fontsize=8)
    ax.set_title("3. concurrency against a real MariaDB")

    ax = axes[0][1]
    throughput = results.get("throughput")
    if throughput:
        labels = list(throughput["labels"].values())
        rates = [throughput["rows_per_s"][v] for v in throughput["labels"]]
        bars = ax.barh(labels, rates, color=["C0", "C1", "C3", "C4"][:len(labels)])
        ax.bar_label(bars, [f"{r:,.0f}" for r in rates], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("rows per second (higher is better)")
    ax.set_title("4. throughput: 10 greenlets fetching 1,000-row results")

    ax = axes[1][0]
    fast = [each for each in rows if each["case"] == "fastpath"]
    if fast:
        names = [each["name"].split("`")[1] for each in fast]
        series = [("libc", [each["alt"] for each in fast]), ("greenify", [each["green"] for each in fast])]
        if peer:
            series.append((PEER_LABEL + " (select: crashes)", [each.get("peer") or 0 for each in fast]))
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))], names)
        ax.set_ylabel("ns per call (lower is better)")
        ax.legend(fontsize=8)
    ax.set_title("1. fast path: one call on a ready fd")

    ax = axes[1][1]
    switch = [each for each in rows if each["case"] == "switch"]
    if switch:
        each = switch[0]
        labels = ["two gevent sockets", "C client, greenify"] + ([f"C client, {PEER_LABEL}"] if "peer" in each else [])
        values = [each["alt"] / 1000, each["green"] / 1000] + ([each["peer"] / 1000] if "peer" in each else [])
        bars = ax.barh(labels, values, color=["C1", "C0", "C4"][:len(values)])
        ax.bar_label(bars, [f"{v:.1f} µs" for v in values], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("µs per round trip (lower is better)")
    ax.set_title("2. switch: one-byte ping-pong with a gevent echo server")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    progress(f"chart: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small N, fewer rounds")
    parser.add_argument("cases", nargs="*", choices=[[]] + list(CASES), help="cases to run (default: all)")
    # A run never overwrites the recorded full run that the README's tables come from.
    parser.add_argument("--output", help="results JSON (default: .results/bench/results.json, --quick: "
                                         ".results/bench/quick.json; rendering: bench/results.json)")
    parser.add_argument("--chart", help="chart PNG (default: beside --output)")
    parser.add_argument("--peer-python", metavar="PATH",
                        help=f"an interpreter with {PEER_LABEL} installed: cases 1 to 4 also run there")
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables in --output as Markdown (for the README) and exit")
    parser.add_argument("--readme", metavar="README", help="write the tables in --output into README's bench section")
    parser.add_argument("--check", metavar="README", help="exit 1 if README's bench section is not --output's tables")
    parser.add_argument("--record", metavar="README", help="record the last full run (its JSON and chart) as "
                                                           "bench/results.json and .png, and write its tables into README")
    parser.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)  # run by --peer-python
    options = parser.parse_args(argv)
    if options.record:
        if _sections().record(str(RESULTS_PATH)):
            _sections().record(str(RESULTS_PATH.with_suffix(".png")))
        options.readme = options.record
    rendering = options.markdown or options.readme or options.check
    if options.output is None:
        fresh = fresh_path()
        options.output = str(RESULTS_PATH if rendering else fresh.with_name("quick.json") if options.quick else fresh)
    if options.chart is None:
        options.chart = str(Path(options.output).with_suffix(".png"))
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    if rendering:
        tables = "\n".join(table_lines(json.loads(Path(options.output).read_text()), markdown=True))
        if options.readme:
            _sections().write(options.readme, README_SECTION, tables)
        elif options.check:
            differences = _sections().differences(options.check, README_SECTION, tables, options.output)
            print("\n".join(differences), file=sys.stderr)
            return 1 if differences else 0
        else:
            print(tables)
        return 0
    options.selected = options.cases or list(CASES)
    started = time.monotonic()
    load_before = os.getloadavg()[0]  # the machine's other work, noted beside the figures
    rows: List[dict] = []
    for name in options.selected:
        rows.extend(CASES[name](options))
    if options.peer_python and not options.as_peer:
        run_peer_cases(options, rows)
    results = {"machine": os.uname().machine, "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "quick": options.quick, "peer": PEER_LABEL if options.peer_python else None,
               "seconds": round(time.monotonic() - started, 1),
               "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
               "results": rows, **RESULTS_EXTRA}
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    if options.as_peer:
        return 0
    print("\n".join(table_lines(json.loads(Path(options.output).read_text()), markdown=False)))
    draw_chart(results, Path(options.chart))
    print(f"\n{len(rows)} results in {results['seconds']:.0f} s: {options.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
