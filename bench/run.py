"""greenify's benchmarks: each case against its alternatives, side by side
in one run on one machine.  Absolute times are noisy here; ratios are what
the table reports.

    make bench            # everything, writes bench/results.json and bench/results.png
    make bench QUICK=1    # a smoke run in well under a minute

Cases:
  fastpath  ns per call on a ready fd, libc against green (recv, send, read, write, poll, select)
  switch    a C client ping-pongs one byte with a gevent echo server, against two gevent sockets
  patch     ms for patch_library on libmariadb and libcrypto
  memory    resident memory per waiting greenlet, against per OS thread blocked in the same call
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

HERE = Path(__file__).resolve().parent


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def build_harness() -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp(prefix="greenify-bench-")) / "fastpath.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", str(HERE / "fastpath.c"), "-o", str(out)], check=True)
    harness = ctypes.CDLL(str(out))
    for name in ("time_recv", "time_send", "time_read", "time_write", "time_poll", "time_select", "ping_pong"):
        getattr(harness, name).restype = ctypes.c_double
    return harness


def libc_address(name: str) -> int:
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value


def green_address(name: str) -> int:
    from greenify._green import ffi, lib
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, "green_" + name)))


def alternate(rounds: int, variants: Dict[str, Callable[[], float]]) -> Dict[str, float]:
    """Run the variants in turn, `rounds` times; the best (least disturbed) round of each."""
    seen: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            seen[name].append(run())
    return {name: min(values) for name, values in seen.items()}


def case_fastpath(quick: bool) -> List[dict]:
    import greenify
    greenify.greenify()
    harness = build_harness()
    n = 20000 if quick else 200000
    rounds = 3 if quick else 9
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.sendall(b"x")  # one byte that MSG_PEEK finds every time
    loops = {
        "recv": lambda fn: harness.time_recv(ctypes.c_void_p(fn), a.fileno(), ctypes.c_long(n)),
        "send": lambda fn: harness.time_send(ctypes.c_void_p(fn), a.fileno(), b.fileno(), ctypes.c_long(n)),
        "write": lambda fn: harness.time_write(ctypes.c_void_p(fn), a.fileno(), b.fileno(), ctypes.c_long(n)),
        "poll": lambda fn: harness.time_poll(ctypes.c_void_p(fn), a.fileno(), ctypes.c_long(n)),
        "select": lambda fn: harness.time_select(ctypes.c_void_p(fn), a.fileno(), ctypes.c_long(n)),
    }
    rows = []
    for name, loop in loops.items():
        progress(f"fastpath {name}")
        libc_fn, green_fn = libc_address(name), green_address(name)
        best = alternate(rounds, {"libc": lambda: loop(libc_fn), "green": lambda: loop(green_fn)})
        rows.append(fastpath_row(name, best))
    # read: a fresh pair, refilled by the peer in the loop
    r, w = socket.socketpair()
    progress("fastpath read")
    read_loop = lambda fn: harness.time_read(ctypes.c_void_p(fn), r.fileno(), w.fileno(), ctypes.c_long(n // 4))
    best = alternate(rounds, {"libc": lambda: read_loop(libc_address("read")),
                              "green": lambda: read_loop(green_address("read"))})
    rows.append(fastpath_row("read", best))
    return rows


TARGETS = {"recv": 1.05, "send": 1.05, "poll": 1.0, "select": 1.0}


def fastpath_row(name: str, best: Dict[str, float]) -> dict:
    ratio = best["green"] / best["libc"]
    target = TARGETS.get(name)
    # ratios within 2% of 1.0 are within this machine's noise
    met = None if target is None else ratio <= target + (0.02 if target == 1.0 else 0.0)
    return {"case": "fastpath", "name": name, "libc_ns": round(best["libc"], 1),
            "green_ns": round(best["green"], 1), "ratio": round(ratio, 3), "target": target, "met": met}


def case_switch(quick: bool) -> List[dict]:
    import gevent
    from gevent import socket as gsocket
    import greenify
    greenify.greenify()
    harness = build_harness()
    n = 2000 if quick else 20000

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
        result = harness.ping_pong(ctypes.c_void_p(green_address("send")), ctypes.c_void_p(green_address("recv")),
                                   client.fileno(), ctypes.c_long(n))
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

    progress("switch ping-pong")
    best = alternate(3 if quick else 7, {"gevent": gevent_client, "green": green_client})
    ratio = best["green"] / best["gevent"]
    return [{"case": "switch", "name": "ping-pong round trip", "gevent_ns": round(best["gevent"]),
             "green_ns": round(best["green"]), "ratio": round(ratio, 3), "target": 0.8, "met": ratio <= 0.8}]


def case_patch(quick: bool) -> List[dict]:
    import greenify
    rows = []
    for stem, soname in (("libmariadb", "libmariadb.so.3"), ("libcrypto", "libcrypto.so.3")):
        try:
            ctypes.CDLL(soname)
        except OSError:
            progress(f"patch: {soname} not installed, skipped")
            continue
        progress(f"patch {soname}")
        times = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            greenify.patch_library(soname)
            times.append((time.perf_counter() - start) * 1000)
            greenify.unpatch_library(soname)
        target = 10.0 if stem == "libmariadb" else 50.0
        best = min(times)
        rows.append({"case": "patch", "name": soname, "ms": round(best, 2), "median_ms": round(statistics.median(times), 2),
                     "target": target, "met": best <= target})
    return rows


def rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def case_memory(quick: bool) -> List[dict]:
    import gevent
    import greenify
    from greenify._green import ffi, lib
    greenify.greenify()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = 500 if quick else 2000
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * count + 256)), hard))

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
    return [{"case": "memory", "name": "resident memory per waiter", "greenlet_kb": round(per_greenlet, 1),
             "thread_kb": round(per_thread, 1), "ratio": round(per_greenlet / per_thread, 3) if per_thread else None,
             "target": None, "met": None}]


CASES = {"fastpath": case_fastpath, "switch": case_switch, "patch": case_patch, "memory": case_memory}


def print_table(rows: List[dict]) -> None:
    print(f"{'case':9} {'what':28} {'figures':44} {'ratio':>7}  target")
    for row in rows:
        figures = ", ".join(f"{k}={v}" for k, v in row.items()
                            if k not in ("case", "name", "ratio", "target", "met"))
        verdict = "" if row.get("met") is None else ("met" if row["met"] else "MISSED")
        target = "" if row.get("target") is None else f"<= {row['target']} {verdict}"
        ratio = "" if row.get("ratio") is None else f"{row['ratio']:.3f}"
        print(f"{row['case']:9} {row['name']:28} {figures:44} {ratio:>7}  {target}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer iterations")
    parser.add_argument("cases", nargs="*", choices=[[]] + list(CASES), help="cases to run (default: all)")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    rows: List[dict] = []
    for name in args.cases or list(CASES):
        rows.extend(CASES[name](args.quick))
    print_table(rows)
    Path(args.output).write_text(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(),
                                             "python": sys.version.split()[0], "quick": args.quick,
                                             "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
