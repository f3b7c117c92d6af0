"""``python -m greenify [options] [--] script.py args`` or ``-m module args``:
run a program with gevent's monkey patching and ``greenify.patch_all()``
done first, the way ``python -m gevent.monkey`` runs one with the former,
so an existing application is tried greenified without editing it.

    python -m greenify app.py --port 8000
    python -m greenify --exclude libpq -m mypackage.server
    python -m greenify --report -- app.py      # print patch_all()'s report on stderr first

The program then runs as ``__main__`` with ``sys.argv`` set to its own
arguments (``sys.argv[0]`` the script or the module's file) and, for a
script, its folder first on ``sys.path``.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from typing import List, Optional, Sequence

PROGRAM = "python -m greenify"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Run a Python program with gevent.monkey.patch_all() and greenify.patch_all() "
        "done first.", epilog="Everything after the script (or -m MODULE) is the program's own arguments.")
    parser.add_argument("--include", action="append", default=[], metavar="LIBRARY",
                        help="also patch this library (name, soname, stem or path); repeatable")
    parser.add_argument("--exclude", action="append", default=[], metavar="LIBRARY",
                        help="never patch this library; repeatable")
    parser.add_argument("--report", action="store_true", help="print patch_all()'s report on stderr before running")
    parser.add_argument("--no-monkey", action="store_true",
                        help="skip gevent's monkey patching (the program does it itself)")
    parser.add_argument("-m", dest="module", metavar="MODULE", help="run a library module as a script")
    parser.add_argument("--cflags", action="store_true",
                        help="print the compiler flags for C code that includes greenify.h, and exit")
    return parser


def _split(argv: Sequence[str]) -> "tuple[List[str], List[str]]":
    """(launcher's options, program and its arguments): the program starts
    at ``--``, at the first word that is not an option, or after ``-m MODULE``."""
    argv = list(argv)
    options: List[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            return options, argv[index + 1:]
        if word == "-m":
            return options + argv[index:index + 2], argv[index + 2:]
        if word.startswith("-m") and len(word) > 2:
            return options + ["-m", word[2:]], argv[index + 1:]
        if word in ("--include", "--exclude"):
            options += argv[index:index + 2]
            index += 2
            continue
        if word.startswith("-"):
            options.append(word)
            index += 1
            continue
        return options, argv[index:]
    return options, []


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), patch, run the program.
    Returns the exit status for the cases that end here (bad usage: 2)."""
    options, program = _split(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(options)
    if args.cflags:
        from greenify import capi

        print(" ".join(capi.cflags()))
        return 0
    if args.module is None and not program:
        parser.error("give a script (python -m greenify [--] script.py args) or a module (-m module args)")

    if not args.no_monkey:
        from gevent import monkey

        monkey.patch_all()
    import greenify

    report = greenify.patch_all(include=args.include or None, exclude=args.exclude or None)
    if args.report:
        print(report, file=sys.stderr)

    if args.module is not None:
        sys.argv[:] = [args.module] + program  # runpy puts the module's file in sys.argv[0]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script = program[0]
        sys.argv[:] = program
        import os

        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
