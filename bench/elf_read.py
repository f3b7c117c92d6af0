"""How long greenify.patching.elf takes to read a library's blocking imports: best of
N reads of each file, in milliseconds (the suite checks what is read, this
file how fast; it replaced the suite's timed test).

    .venv/bin/python bench/elf_read.py                 # libmariadb, libcrypto, libpq, libcurl
    .venv/bin/python bench/elf_read.py --rounds 50 /path/to/lib.so
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

from greenify.patching import elf

LIBRARIES = [f"/usr/lib/x86_64-linux-gnu/{name}" for name in
             ("libmariadb.so.3", "libcrypto.so.3", "libpq.so.5", "libcurl.so.4")]


def best_of(path: str, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        elf.read_blocking_imports(path)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("libraries", nargs="*", default=[path for path in LIBRARIES if os.path.exists(path)])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    results: Dict[str, Dict[str, float]] = {}
    for path in args.libraries:
        imports = elf.read_blocking_imports(path).imports
        results[path] = {"bytes": os.path.getsize(path), "blocking_imports": len(imports),
                         "best_ms": round(best_of(path, args.rounds) * 1000, 3)}
        print(f"{path}: {results[path]['best_ms']:.2f} ms ({results[path]['bytes']:,} bytes, "
              f"{len(imports)} blocking imports)")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
