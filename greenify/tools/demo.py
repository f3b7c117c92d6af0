"""``python -m greenify.demo``, the demo behind ``make demo``: see DESCRIPTION
below (what ``--help`` prints) and ``parse_args``, where every option is."""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import sysconfig
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
    """The demo's blocking C client, built with greenify for this very
    CPython (its file name carries this interpreter's extension suffix)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(package, "_demo_client" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(path):
        raise SystemExit(f"greenify.demo: the demo client library for this Python ({os.path.basename(path)}) is "
                         "missing; reinstall greenify with this interpreter (pip install .)")
    client = ctypes.CDLL(path)
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

        print(f"{count} {CALLERS[0]}, each asking a server that answers after {delay} s,\n"
              f"through an ordinary blocking C client ({os.path.basename(client._name)}):")
        return blocking_then_greenified(count, fetch, client._name)
    finally:
        server.kill()
        server.wait()


def demo_mysql(host: str, port: int, user: str, password: str, count: int, delay: float) -> Tuple[float, float]:
    try:
        import MySQLdb
    except ImportError:
        raise SystemExit("greenify.demo: --mysql needs MySQLdb: pip install mysqlclient") from None
    try:
        connections = [MySQLdb.connect(host=host, port=port, user=user, passwd=password, connect_timeout=10)
                       for _ in range(count)]
    except MySQLdb.Error as exc:
        message = exc.args[1] if len(exc.args) > 1 else str(exc)
        raise SystemExit(f"greenify.demo: cannot connect to MySQL at {host}:{port} as {user!r}: {message}") from None

    def query(i: int) -> str:
        cursor = connections[i].cursor()
        cursor.execute("SELECT SLEEP(%s), %s", (delay, i))
        return str(cursor.fetchone())

    print(f"{count} {CALLERS[0]}, each running SELECT SLEEP({delay}) on its own MySQLdb connection:")
    return blocking_then_greenified(count, query, MySQLdb._mysql)


# --- the command line: every option and its check in one place --------------------

CALLERS = ["greenlets"]  # what makes the calls: "asyncio tasks" with --asyncio

DESCRIPTION = """See greenify make a blocking C library cooperative.

The demo starts a slow server of its own on loopback (a subprocess that
answers each request after a delay), then has greenlets call into an
ordinary blocking C client shipped with greenify, twice: first as it is,
when each call blocks the whole process, then after
greenify.patch_library(), when the calls wait together.

With --mysql HOST:PORT it runs SELECT SLEEP(delay) through MySQLdb against
a real MySQL or MariaDB instead."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is fewer than 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 (excluded) and 60 seconds")
    return value


def _host_port(text: str) -> Tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:3306)")
    return host or "127.0.0.1", int(port)


def parse_args(argv=None) -> argparse.Namespace:
    """The demo's options, checked: bad values end in a one-line usage error."""
    parser = argparse.ArgumentParser(prog="python -m greenify.demo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--greenlets", type=_positive_int, default=50, metavar="N",
                        help="how many greenlets call at once (default: %(default)s)")
    parser.add_argument("--delay", type=_seconds, default=0.1, metavar="SECONDS",
                        help="how long the server takes to answer each call (default: %(default)s)")
    parser.add_argument("--mysql", type=_host_port, metavar="HOST:PORT",
                        help="run SELECT SLEEP(delay) through MySQLdb against this MySQL or MariaDB "
                             "instead of the built-in server")
    parser.add_argument("--user", default="root", help="the MySQL user, with --mysql (default: %(default)s)")
    parser.add_argument("--password", default="", help="the MySQL user's password, with --mysql (default: none)")
    parser.add_argument("--asyncio", action="store_true",
                        help="run the calls as asyncio tasks through greenify.asyncio.run instead of greenlets")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.asyncio:  # the same rounds, as asyncio tasks (greenify/tools/demo_asyncio.py)
        global run_round
        from greenify.tools.demo_asyncio import run_round
        CALLERS[0] = "asyncio tasks"
        print("(asyncio: each call is a task awaiting greenify.asyncio.run on one event loop)")
    else:
        try:
            import gevent  # noqa: F401
        except ImportError:
            raise SystemExit("greenify.demo: the greenlet rounds need gevent (pip install gevent); "
                             "--asyncio runs them as asyncio tasks without it") from None
    if args.mysql:
        host, port = args.mysql
        blocking, green = demo_mysql(host, port, args.user, args.password, args.greenlets, args.delay)
    else:
        blocking, green = demo_c_client(args.greenlets, args.delay)
    serial = args.greenlets * args.delay
    print(f"\n  {'':12}{'wall time':>10}   (one call: {args.delay} s; all in a row: {serial:.1f} s)")
    print(f"  {'blocking':12}{blocking:9.2f} s")
    print(f"  {'greenified':12}{green:9.2f} s   {blocking / green:.0f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
