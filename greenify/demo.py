"""``python -m greenify.demo``: see greenify make a blocking C library cooperative.

The demo starts a slow server of its own on loopback (a subprocess that
answers each request after a delay), then has 50 greenlets call into an
ordinary blocking C client (greenify/_demo_client, shipped with the package)
twice: first as it is, when each call blocks the whole process, then after
``greenify.patch_library()``, when the calls wait together.

``python -m greenify.demo --mysql HOST:PORT`` runs ``SELECT SLEEP(delay)``
through MySQLdb against a real MySQL or MariaDB instead.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import subprocess
import sys
import time
from typing import Callable, Tuple

# The slow server: answers every request with <prefix> + request after a delay,
# serving connections concurrently (the tests use it too).
SERVER = r"""
import socket, sys, threading, time
delay, prefix = float(sys.argv[1]), sys.argv[2].encode()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(512)
print(listener.getsockname()[1], flush=True)
def serve(conn):
    with conn:
        request = conn.recv(1024)
        time.sleep(delay)
        conn.sendall(prefix + request)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def demo_client() -> ctypes.CDLL:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = glob.glob(os.path.join(here, "_demo_client*.so"))
    if not candidates:
        raise SystemExit("greenify.demo: the demo client library is missing; reinstall greenify (pip install .)")
    client = ctypes.CDLL(candidates[0])
    client.demo_fetch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    return client


def start_server(delay: float, prefix: str = "echo: ") -> Tuple[subprocess.Popen, int]:
    """The slow server, in a subprocess on a free loopback port: (process, port)."""
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(delay), prefix], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    return server, port


def run_round(label: str, count: int, call: Callable[[int], str]) -> float:
    """Run call(i) in `count` greenlets, drawing progress as they finish."""
    import gevent
    done = [0]
    start = time.monotonic()
    live = sys.stdout.isatty()

    def draw() -> None:
        bar = "#" * (done[0] * 40 // count)
        sys.stdout.write(f"{chr(13) if live else ''}  {label:10} [{bar:40}] {done[0]:3}/{count}  {time.monotonic() - start:5.2f} s")
        sys.stdout.flush()

    def one(i: int) -> str:
        result = call(i)
        done[0] += 1
        if live or done[0] == count:
            draw()
        return result

    greenlets = [gevent.spawn(one, i) for i in range(count)]
    gevent.joinall(greenlets, raise_error=True)
    took = time.monotonic() - start
    sys.stdout.write("\n")
    return took


def blocking_then_greenified(count: int, call: Callable[[int], str], target: object) -> Tuple[float, float]:
    """Time `count` greenlets of call(i) as they are, then with `target` patched."""
    import greenify
    blocking = run_round("blocking", count, call)
    greenify.greenify()
    with greenify.patched(target) as report:
        symbols = sorted({slot.symbol for slot in report.patched_slots})
        print(f"  patched: {', '.join(symbols)}")
        green = run_round("greenified", count, call)
    return blocking, green


def demo_c_client(count: int, delay: float) -> Tuple[float, float]:
    client = demo_client()
    server, port = start_server(delay)
    try:
        def fetch(i: int) -> str:
            reply = ctypes.create_string_buffer(256)
            n = client.demo_fetch(port, f"request {i}".encode(), reply, 256)
            if n < 0:
                raise RuntimeError(f"demo_fetch failed for request {i}")
            return reply.value.decode()

        print(f"{count} greenlets, each asking a server that answers after {delay} s,\n"
              f"through an ordinary blocking C client ({os.path.basename(client._name)}):")
        return blocking_then_greenified(count, fetch, client._name)
    finally:
        server.kill()
        server.wait()


def demo_mysql(address: str, user: str, password: str, count: int, delay: float) -> Tuple[float, float]:
    try:
        import MySQLdb
    except ImportError:
        raise SystemExit("greenify.demo: --mysql needs MySQLdb: pip install mysqlclient")
    host, _, port = address.rpartition(":")
    connections = [MySQLdb.connect(host=host or "127.0.0.1", port=int(port), user=user, passwd=password)
                   for _ in range(count)]

    def query(i: int) -> str:
        cursor = connections[i].cursor()
        cursor.execute("SELECT SLEEP(%s), %s", (delay, i))
        return str(cursor.fetchone())

    print(f"{count} greenlets, each running SELECT SLEEP({delay}) on its own MySQLdb connection:")
    return blocking_then_greenified(count, query, MySQLdb._mysql)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m greenify.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--greenlets", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds each call waits on the server")
    parser.add_argument("--mysql", metavar="HOST:PORT", help="run the demo against a real MySQL/MariaDB")
    parser.add_argument("--user", default="root")
    parser.add_argument("--password", default="")
    parser.add_argument("--asyncio", action="store_true",
                        help="run the calls as asyncio tasks through greenify.asyncio.run instead of greenlets")
    args = parser.parse_args(argv)
    if args.asyncio:  # the same rounds, as asyncio tasks (greenify/demo_asyncio.py)
        global run_round
        from greenify.demo_asyncio import run_round
        print("(asyncio: each call is a task awaiting greenify.asyncio.run on one event loop)")
    if args.mysql:
        blocking, green = demo_mysql(args.mysql, args.user, args.password, args.greenlets, args.delay)
    else:
        blocking, green = demo_c_client(args.greenlets, args.delay)
    serial = args.greenlets * args.delay
    print(f"\n  {'':12}{'wall time':>10}   (one call: {args.delay} s; all in a row: {serial:.1f} s)")
    print(f"  {'blocking':12}{blocking:9.2f} s")
    print(f"  {'greenified':12}{green:9.2f} s   {blocking / green:.0f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
