"""greenify.asyncio's benchmarks: stock MySQLdb awaited on an event loop,
against asyncio.to_thread (the default executor) and aiomysql, side by side
in one run, each variant in a process of its own, in alternating rounds.

    python -m bench.asyncio_bench                # full run: a table and .results/bench/asyncio-results.json
    python -m bench.asyncio_bench --quick        # a smoke run (100 queries, 1 round), not saved
    python -m bench.asyncio_bench --markdown     # the README's table, from bench/asyncio-results.json
    python -m bench.asyncio_bench --record docs/benchmarks.md  # record the last full run as bench/asyncio-results.json, render it

Cases:
  concurrency  N=1,000 tasks on one thread, each `SELECT SLEEP(0.5)` on a connection of its own;
               seconds until all finished (the floor is 0.5 s)
  throughput   rows per second, 10 tasks each fetching a 1,000-row result set 100 times

Variants: greenify.asyncio on the default loop and on uvloop (MySQLdb, libmariadb
patched); asyncio.to_thread with the loop's default executor (stock MySQLdb);
aiomysql (pure Python, asyncio streams); and, for reference, greenify under
gevent as bench/db_worker.py runs it (what this machine gives at the moment).  Connections are opened before the
clock starts.  The MariaDB is started as the tests start theirs
(bench/run.py's mariadb_server(), with max_connections raised).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
RESULTS_PATH = HERE / "asyncio-results.json"  # recorded: the README's table; replaced only by --record


def _sections():
    """tests/support/readme_sections.py.  Not imported at the top: a worker
    runs this file by its path, where `tests` is not importable."""
    from tests.support import readme_sections

    return readme_sections

SLEEP_S = 0.5
CONCURRENCY_GOAL = 1.2  # greenify.asyncio within 1.2x of the 0.5 s floor
THROUGHPUT_GOAL = 5.0  # rows/s at least 5x aiomysql's
OPEN_AT_ONCE = 100  # connections opened at a time (the server's listen backlog is 150)
VARIANTS = {
    "greenify": "greenify.asyncio (MySQLdb), default loop",
    "greenify-uvloop": "greenify.asyncio (MySQLdb), uvloop",
    "to_thread": "asyncio.to_thread (stock MySQLdb), default executor",
    "aiomysql": "aiomysql",
    "gevent": "greenify under gevent (MySQLdb), for reference",
}


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# --- one variant, in a process of its own ---------------------------------------

class Driver:
    """connect() and query(conn, sql) -> rows, awaitable, for one variant."""

    def __init__(self, variant: str, host: str, port: int) -> None:
        from db_worker import DATABASE, PASSWORD, USER
        self.variant = variant
        self.params = dict(host=host, port=port, user=USER, password=PASSWORD)
        self.database = DATABASE
        if variant == "aiomysql":
            import aiomysql
            self.aiomysql = aiomysql
            return
        import MySQLdb
        self.MySQLdb = MySQLdb
        if variant.startswith("greenify"):
            import greenify
            import greenify.asyncio
            report = greenify.patch_library(MySQLdb._mysql)
            if not report:
                raise RuntimeError(f"patch_library(MySQLdb._mysql) patched nothing: {report}")
            self.run = greenify.asyncio.run
        else:
            self.run = asyncio.to_thread

    async def connect(self):
        if self.variant == "aiomysql":
            return await self.aiomysql.connect(db=self.database, **self.params)
        return await self.run(self.MySQLdb.connect, database=self.database, **self.params)

    async def query(self, conn, sql: str) -> tuple:
        if self.variant == "aiomysql":
            async with conn.cursor() as cursor:
                await cursor.execute(sql)
                return await cursor.fetchall()
        return await self.run(self._query, conn, sql)

    @staticmethod
    def _query(conn, sql: str) -> tuple:
        cursor = conn.cursor()
        cursor.execute(sql)
        return cursor.fetchall()

    def close(self, conn) -> None:
        conn.close()


async def open_connections(driver: Driver, count: int) -> list:
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def one():
        async with gate:
            return await driver.connect()
    return await asyncio.gather(*(one() for _ in range(count)))


async def concurrency(driver: Driver, count: int) -> dict:
    connections = await open_connections(driver, count)
    started = time.perf_counter()
    results = await asyncio.gather(*(driver.query(conn, f"SELECT SLEEP({SLEEP_S})") for conn in connections))
    seconds = time.perf_counter() - started
    for conn in connections:
        driver.close(conn)
    if any(tuple(rows[0]) != (0,) for rows in results):
        raise RuntimeError("a SELECT SLEEP was interrupted")
    return {"seconds": seconds}


async def throughput(driver: Driver, tasks: int, queries: int) -> dict:
    from db_worker import TABLE_ROWS
    connections = await open_connections(driver, tasks)
    fetched: List[int] = []

    async def fetch_all(conn) -> None:
        for _ in range(queries):
            rows = await driver.query(conn, "SELECT id, account, name, amount FROM bench_rows")
            fetched.append(len(rows))

    started = time.perf_counter()
    await asyncio.gather(*(fetch_all(conn) for conn in connections))
    seconds = time.perf_counter() - started
    for conn in connections:
        driver.close(conn)
    if fetched != [TABLE_ROWS] * (tasks * queries):
        raise RuntimeError(f"expected {tasks * queries} results of {TABLE_ROWS} rows")
    return {"seconds": seconds, "rows": sum(fetched)}


def worker(argv: List[str]) -> int:
    what, variant, host, port, *numbers = argv
    from db_worker import raise_fd_limit
    raise_fd_limit(4 * int(numbers[0]) + 256)
    driver = Driver(variant, host, int(port))
    case = concurrency if what == "concurrency" else throughput
    coroutine = case(driver, *map(int, numbers))
    if variant.endswith("uvloop"):
        import uvloop
        result = uvloop.run(coroutine)
    else:
        result = asyncio.run(coroutine)
    print(json.dumps(result), flush=True)
    return 0


def run_worker(what: str, variant: str, db, *numbers: int) -> dict:
    if variant == "gevent":
        command = [sys.executable, str(HERE / "db_worker.py"), what, db.host, str(db.port), "greenified",
                   *map(str, numbers)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "worker", what, variant, db.host, str(db.port),
                   *map(str, numbers)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------

def spread(values: List[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3), "all": [round(value, 3) for value in values]}


def measure(options) -> dict:
    from bench.run import MAX_CONNECTIONS, mariadb_server
    count = 100 if options.quick else 1000
    if count > MAX_CONNECTIONS - 50:
        raise SystemExit(f"{count} connections need max_connections above {MAX_CONNECTIONS}")
    tasks, queries = (10, 20) if options.quick else (10, 100)
    rounds = 1 if options.quick else options.rounds
    # throughput rounds are short: more of them, against this machine's noise
    throughput_rounds = 1 if options.quick else options.rounds + 2
    seconds: Dict[str, List[float]] = {variant: [] for variant in VARIANTS}
    rates: Dict[str, List[float]] = {variant: [] for variant in VARIANTS}
    with mariadb_server() as db:
        for round_number in range(1, rounds + 1):
            for variant in VARIANTS:  # alternating: each round runs every variant once
                progress(f"round {round_number}/{rounds}: {count} x SELECT SLEEP({SLEEP_S}), {VARIANTS[variant]}")
                seconds[variant].append(run_worker("concurrency", variant, db, count)["seconds"])
        for round_number in range(1, throughput_rounds + 1):
            for variant in VARIANTS:
                progress(f"round {round_number}/{throughput_rounds}: throughput, {VARIANTS[variant]}")
                result = run_worker("throughput", variant, db, tasks, queries)
                rates[variant].append(result["rows"] / result["seconds"])
    best_rate = {variant: max(values) for variant, values in rates.items()}
    median_rate = {variant: statistics.median(values) for variant, values in rates.items()}
    green = min(seconds["greenify"])
    return {
        "machine": {"python": sys.version.split()[0], "cores": _cores()},
        "labels": VARIANTS,
        "rounds": rounds,
        "concurrency": {"count": count, "floor_s": SLEEP_S, "seconds": {v: spread(s) for v, s in seconds.items()},
                        "goal": f"greenify.asyncio <= {CONCURRENCY_GOAL}x the floor",
                        "ratio_to_floor": round(green / SLEEP_S, 3),
                        "met": green / SLEEP_S <= CONCURRENCY_GOAL},
        "throughput": {"tasks": tasks, "queries": queries, "rounds": throughput_rounds,
                       "rows_per_s": {v: spread(r) for v, r in rates.items()},
                       "goal": f"greenify.asyncio >= {THROUGHPUT_GOAL}x aiomysql",
                       "ratio_to_aiomysql": round(best_rate["greenify"] / best_rate["aiomysql"], 2),
                       "ratio_to_to_thread": round(best_rate["greenify"] / best_rate["to_thread"], 2),
                       "median_ratio_to_aiomysql": round(median_rate["greenify"] / median_rate["aiomysql"], 2),
                       "median_ratio_to_to_thread": round(median_rate["greenify"] / median_rate["to_thread"], 2),
                       "met": best_rate["greenify"] / best_rate["aiomysql"] >= THROUGHPUT_GOAL},
    }


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0))


def markdown(results: dict) -> str:
    concurrency, throughput, labels = results["concurrency"], results["throughput"], results["labels"]
    lines = [f"Concurrency: {concurrency['count']:,} tasks on one thread, each `SELECT SLEEP({concurrency['floor_s']})` "
             f"on a connection of its own; seconds until all finished (floor {concurrency['floor_s']} s), "
             f"over {results['rounds']} alternating rounds",
             "",
             "| variant | min | median | max |", "|---|---|---|---|"]
    for variant, label in labels.items():
        spread_s = concurrency["seconds"][variant]
        lines.append(f"| {label} | {spread_s['min']:.2f} s | {spread_s['median']:.2f} s | {spread_s['max']:.2f} s |")
    lines += ["", f"greenify.asyncio / floor: **{concurrency['ratio_to_floor']:.2f}x** "
                  f"(goal <= {CONCURRENCY_GOAL}x: {'met' if concurrency['met'] else 'missed'})", "",
              f"Throughput: rows/s, {throughput['tasks']} tasks each fetching a 1,000-row result set "
              f"{throughput['queries']} times, over {throughput['rounds']} alternating rounds", "",
              "| variant | min | median | max |", "|---|---|---|---|"]
    for variant, label in labels.items():
        spread_r = throughput["rows_per_s"][variant]
        lines.append(f"| {label} | {spread_r['min']:,.0f} | {spread_r['median']:,.0f} | {spread_r['max']:,.0f} |")
    lines += ["", f"greenify.asyncio / aiomysql: **{throughput['ratio_to_aiomysql']:.2f}x** best rounds, "
                  f"{throughput['median_ratio_to_aiomysql']:.2f}x medians "
                  f"(goal >= {THROUGHPUT_GOAL}x: {'met' if throughput['met'] else 'missed'}); "
                  f"greenify.asyncio / asyncio.to_thread: **{throughput['ratio_to_to_thread']:.2f}x** best rounds, "
                  f"{throughput['median_ratio_to_to_thread']:.2f}x medians",
              "", f"Generated by `bench/asyncio_bench.py --markdown` from `bench/asyncio-results.json` "
                  f"(Python {results['machine']['python']}, {results['machine']['cores']} cores)."]
    return "\n".join(lines)


README_SECTION = "asyncio-bench"  # the README's generated table (tests/support/readme_sections.py)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 queries, 1 round; results not saved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print the README's table from the results file")
    parser.add_argument("--readme", metavar="README", help="write the results file's table into README")
    parser.add_argument("--check", metavar="README", help="exit 1 if README's table is not the results file's")
    parser.add_argument("--record", metavar="README", help="record the last full run and write its table into README")
    options = parser.parse_args(argv)
    if options.record:
        _sections().record(str(RESULTS_PATH))
        options.readme = options.record
    if options.markdown or options.readme or options.check:
        table = markdown(json.loads(RESULTS_PATH.read_text()))
        if options.readme:
            _sections().write(options.readme, README_SECTION, table)
        elif options.check:
            differences = _sections().differences(options.check, README_SECTION, table, str(RESULTS_PATH))
            print("\n".join(differences), file=sys.stderr)
            return 1 if differences else 0
        else:
            print(table)
        return 0
    results = measure(options)
    if not options.quick:
        _sections().replace_file(_sections().fresh_path(str(RESULTS_PATH)), json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
