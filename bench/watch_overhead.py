"""What greenify.watch() costs: the process's CPU per 10-row MySQLdb query
through a patched libmariadb, with the watch off and on (threshold 0.1 s).

    python -m bench.watch_overhead                 # 15 rounds each, writes bench/watch-results.json
    python -m bench.watch_overhead --rounds 3      # a smoke run

One process, one MariaDB server (started as the tests start it), 10
greenlets on connections of their own each running QUERIES_PER_ROUND/10
queries of 10 rows.  Rounds alternate off, on, off, on... so that the
machine's drift (2 shared cores) falls on both; the figure is the ratio of
the medians of CPU seconds per query (user + system, all threads: the
monitor thread's wake-ups count).  The claim (issue 26): on costs at most
5% more than off.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
from tests.support import readme_sections  # noqa: E402 - run as `python -m bench.watch_overhead`

RESULTS = HERE / "watch-results.json"
GREENLETS = 10
QUERIES_PER_ROUND = 20000
ROWS = 10
THRESHOLD_S = 0.1
LIMIT = 0.05


def run_round(connections, watch_on: bool) -> float:
    """CPU seconds per query for one round."""
    import gevent
    import greenify

    if watch_on:
        greenify.watch(THRESHOLD_S)
    per_greenlet = QUERIES_PER_ROUND // GREENLETS

    def work(connection) -> None:
        cursor = connection.cursor()
        for _ in range(per_greenlet):
            cursor.execute(f"SELECT id, label FROM watched LIMIT {ROWS}")
            if len(cursor.fetchall()) != ROWS:
                raise RuntimeError("a short result")
        cursor.close()

    try:
        cpu_start = time.process_time()
        gevent.joinall([gevent.spawn(work, connection) for connection in connections], raise_error=True)
        cpu = time.process_time() - cpu_start
    finally:
        if watch_on:
            greenify.unwatch()
    return cpu / (per_greenlet * GREENLETS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each variant (default 15)")
    parser.add_argument("--output", type=Path, default=Path(readme_sections.fresh_path(str(RESULTS))),
                        help="where the results go (default: under .results/, which `make record` copies to "
                             "bench/watch-results.json)")
    parser.add_argument("--record", action="store_true", help="copy the last run's results to bench/watch-results.json")
    args = parser.parse_args()
    if args.record:
        readme_sections.record(str(RESULTS))
        return 0
    from tests.support import servers
    import MySQLdb
    import greenify

    greenify.greenify()
    greenify.patch_library(MySQLdb._mysql)
    with servers.start_mariadb() as db:
        connect = dict(host=db.host, port=db.port, user=db.user, password=db.password, database=db.database)
        setup = MySQLdb.connect(**connect)
        cursor = setup.cursor()
        cursor.execute("CREATE TABLE IF NOT EXISTS watched (id INT PRIMARY KEY, label VARCHAR(64))")
        cursor.executemany("REPLACE INTO watched VALUES (%s, %s)", [(i, f"row {i}") for i in range(100)])
        setup.commit()
        setup.close()
        connections = [MySQLdb.connect(**connect) for _ in range(GREENLETS)]
        run_round(connections, False)  # warm-up: caches, the server's buffers
        rounds = {"off": [], "on": []}
        for index in range(args.rounds):
            for variant in (("off", "on") if index % 2 == 0 else ("on", "off")):
                rounds[variant].append(run_round(connections, variant == "on"))
            print(f"  .. round {index + 1}/{args.rounds}: off {rounds['off'][-1] * 1e6:.1f} us, "
                  f"on {rounds['on'][-1] * 1e6:.1f} us per query", file=sys.stderr, flush=True)
        for connection in connections:
            connection.close()
    off, on = statistics.median(rounds["off"]), statistics.median(rounds["on"])
    result = {
        "case": "watch overhead: CPU per 10-row MySQLdb query, patched libmariadb, watch off vs on (0.1 s)",
        "command": "bench/watch_overhead.py --rounds %d" % args.rounds,
        "rounds": args.rounds, "queries_per_round": QUERIES_PER_ROUND, "greenlets": GREENLETS,
        "cpu_us_per_query_off": off * 1e6, "cpu_us_per_query_on": on * 1e6,
        "on_over_off": on / off, "limit": 1 + LIMIT, "within_limit": on / off <= 1 + LIMIT,
        "rounds_us": {variant: [value * 1e6 for value in values] for variant, values in rounds.items()},
    }
    readme_sections.replace_file(str(args.output), json.dumps(result, indent=2) + "\n")
    print(f"off {off * 1e6:.1f} us/query, on {on * 1e6:.1f} us/query: on/off = {on / off:.3f} "
          f"(limit {1 + LIMIT:.2f}) -> {args.output}")
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
