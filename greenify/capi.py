"""greenify's C API (``greenify/include/greenify.h``): where the header is,
the compiler flags to build against it, and the table of green functions C
code calls through.

An extension module fetches the table from the capsule ``greenify._C_API``
(``Greenify_Import()`` in the header, greenlet's and datetime's convention);
a plain C library loaded with ctypes is handed ``capi_address()`` and passes
it to ``Greenify_Use()``.  Neither needs a path: the table is found through
the imported module, so it works from a wheel wherever it is installed.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import List, Tuple

from greenify._green import ffi, lib

_TABLE = lib.green_capi_table()
# struct greenify_api begins with unsigned int version_major, version_minor
API_VERSION: Tuple[int, int] = tuple(ffi.cast("unsigned int *", _TABLE)[0:2])


def get_include() -> str:
    """The folder that holds ``greenify.h``, for ``include_dirs``."""
    return str(Path(__file__).resolve().parent / "include")


def cflags() -> List[str]:
    """The compiler flags for C code that includes ``greenify.h`` (which
    also needs _GNU_SOURCE: Python.h defines it, a plain library defines it
    itself, in whatever form its own headers expect)."""
    return [f"-I{get_include()}"]


def capi_address() -> int:
    """The address of the table of green functions (``struct greenify_api``),
    for a plain C library's ``Greenify_Use()``; valid for the process's life."""
    return int(ffi.cast("uintptr_t", _TABLE))


def _new_capsule() -> object:
    # a prototype of our own: setting ctypes.pythonapi.PyCapsule_New's
    # argtypes would change them for everyone else in the process.  The name
    # is the module's static string: a capsule keeps the pointer, not a copy.
    capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        ("PyCapsule_New", ctypes.pythonapi))
    name_address = int(ffi.cast("uintptr_t", lib.green_capi_capsule_name()))
    return capsule_new(capi_address(), name_address, None)


# Greenify_Import() looks it up as greenify._C_API (re-exported by greenify/__init__.py)
_C_API = _new_capsule()
