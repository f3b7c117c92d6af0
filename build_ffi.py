"""Builds ``greenify._green``, the cffi module that holds libgreenify.

The C lives in ``csrc/`` as ordinary ``.c``/``.h`` files that compilers and
linters read as they are, one folder per layer (``csrc/wait``, ``csrc/twins``,
``csrc/patch``; ARCHITECTURE.md).  cffi needs two things from those folders:

* ``*.cdef``: the declarations Python may use, in the subset of C that cffi's
  parser accepts (``...`` for sizes the compiler fills in).  Every function a
  cdef declares must be declared the same way by a header of its folder:
  checked here, so a cdef never drifts from the C it describes;
* ``*.c``: the sources, compiled as extra sources of the extension.  The
  callbacks declared ``extern "Python+C"`` are defined by cffi in the
  generated module and called from those files.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import greenlet
from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
LAYERS = [CSRC / "wait", CSRC / "twins", CSRC / "patch"]  # bottom up
OUR_PREFIXES = ("green", "slots_", "loaded_", "onload_", "relocs_")

_PROTOTYPE = re.compile(r"^(?:extern (?:\"Python\+C\" )?)?(?!typedef|struct|return)[\w\s\*]+?[\s\*](\w+)\s*\((.*)\)$")


def _statements(text: str) -> List[str]:
    """The declarations of a C text, comments and preprocessor lines
    dropped, each on one line with single spaces."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S).replace("\\\n", " ")
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(statement.split()) for statement in text.split(";")]


def _prototypes(text: str) -> Dict[str, str]:
    """function name -> its prototype, normalized ("int f(int *x)")."""
    found = {}
    for statement in _statements(text):
        match = _PROTOTYPE.match(statement)
        if match and "{" not in statement and "}" not in statement:
            prototype = re.sub(r'^extern ("Python\+C" )?', "", statement)
            found.setdefault(match.group(1), re.sub(r"\s*([*,()])\s*", r"\1", prototype))
    return found


def check_cdefs_against_headers() -> None:
    """Each of our functions a folder's cdefs declare (libc's are the
    compiler's to check) as its C declares it: the headers, or the extern
    declarations of the callbacks in its .c files."""
    problems = []
    for layer in LAYERS:
        declared: Dict[str, str] = {}
        for source in sorted(layer.glob("*.c")) + sorted(layer.glob("*.h")):
            for name, prototype in _prototypes(source.read_text()).items():
                declared.setdefault(name, prototype)
        for cdef in sorted(layer.glob("*.cdef")):
            for name, prototype in _prototypes(cdef.read_text()).items():
                if not name.startswith(OUR_PREFIXES):
                    continue
                if name not in declared:
                    problems.append(f"{cdef.relative_to(HERE)}: {name} is declared by no header of {layer.name}/")
                elif declared[name] != prototype:
                    problems.append(f"{cdef.relative_to(HERE)}: {name} is `{prototype}` here, "
                                    f"`{declared[name]}` in the headers")
    if problems:
        raise SystemExit("build_ffi.py: the cdefs differ from the headers:\n  " + "\n  ".join(problems))


check_cdefs_against_headers()

ffibuilder = FFI()
ffibuilder.cdef("\n".join(path.read_text() for layer in LAYERS for path in sorted(layer.glob("*.cdef"))))

# The generated module sees the same declarations as the .c files.
_prelude = "\n".join(f'#include "{path.name}"' for layer in LAYERS for path in sorted(layer.glob("*.h")))
# What follows the prelude in the generated file is cffi's code, not ours: its
# field checks take the address of struct epoll_event's members, which glibc
# packs on x86-64.  Silenced for that code alone; csrc/ builds with -Wall
# -Wextra and no warning (`make warnings` proves it with -Werror).
_prelude += '\n#pragma GCC diagnostic ignored "-Waddress-of-packed-member"'

ffibuilder.set_source(
    "greenify._green",
    "#define _GNU_SOURCE 1\n" + _prelude,
    # setuptools wants sources relative to setup.py's folder
    sources=[str(path.relative_to(HERE)) for layer in LAYERS for path in sorted(layer.glob("*.c"))],
    # greenlet.h: the fast wait switches greenlets through greenlet's C API;
    # greenify/include: the public header, whose table csrc/twins/green_capi.c fills
    include_dirs=[*(str(layer.relative_to(HERE)) for layer in LAYERS), str(Path(greenlet.__file__).parent),
                  "greenify/include"],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"],
    # Not the stable ABI: green_deliver.c reads PyThreadState's trace fields
    # and frames, and the fast wait uses greenlet's C API, which the limited
    # API does not offer.  So the module is named and the
    # wheel tagged for one CPython (_green.cpython-311-...so, cp311-cp311),
    # not abi3 (cffi's default would name it _green.abi3.so).
    py_limited_api=False,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
