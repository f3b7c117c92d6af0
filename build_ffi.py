"""Builds ``greenify._green``, the cffi module that holds libgreenify.

The C lives in ``csrc/`` as ordinary ``.c``/``.h`` files that compilers and
linters read as they are.  cffi needs two things from that folder:

* ``csrc/*.cdef``: the declarations Python may use, in the subset of C that
  cffi's parser accepts (``...`` for sizes the compiler fills in);
* ``csrc/*.c``: the sources, compiled as extra sources of the extension.
  The callbacks declared ``extern "Python+C"`` are defined by cffi in the
  generated module and called from those files.
"""
from __future__ import annotations

from pathlib import Path

import greenlet
from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"

ffibuilder = FFI()
ffibuilder.cdef("\n".join(path.read_text() for path in sorted(CSRC.glob("*.cdef"))))

# The generated module sees the same declarations as the .c files.
_prelude = "\n".join(f'#include "{path.name}"' for path in sorted(CSRC.glob("*.h")))
# What follows the prelude in the generated file is cffi's code, not ours: its
# field checks take the address of struct epoll_event's members, which glibc
# packs on x86-64.  Silenced for that code alone; csrc/ builds with -Wall
# -Wextra and no warning (`make warnings` proves it with -Werror).
_prelude += '\n#pragma GCC diagnostic ignored "-Waddress-of-packed-member"'

ffibuilder.set_source(
    "greenify._green",
    "#define _GNU_SOURCE 1\n" + _prelude,
    # setuptools wants sources relative to setup.py's folder
    sources=[str(path.relative_to(HERE)) for path in sorted(CSRC.glob("*.c"))],
    # greenlet.h: the fast wait switches greenlets through greenlet's C API;
    # greenify/include: the public header, whose table csrc/green_capi.c fills
    include_dirs=[str(CSRC.relative_to(HERE)), str(Path(greenlet.__file__).parent), "greenify/include"],
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
