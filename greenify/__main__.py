"""``python -m greenify``: the command line's entry points."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m greenify")
    parser.add_argument("--cflags", action="store_true",
                        help="print the compiler flags for C code that includes greenify.h")
    args = parser.parse_args(argv)
    if args.cflags:
        from greenify import capi
        print(" ".join(capi.cflags()))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
