"""The fixture libraries (fixtures/*.c), built with the system cc, and a slow
TCP server to call them against.

Each library is built four ways, the ways real drivers ship:

* ``default``: lazy binding, partial RELRO: calls go through PLT/JUMP_SLOT;
* ``noplt``: ``-fno-plt``: calls go through GLOB_DAT GOT entries;
* ``relro``: full RELRO (``-z relro -z now``): the GOT is read-only once loaded;
* ``fortify``: ``-D_FORTIFY_SOURCE=2 -O2``: __recv_chk, __poll_chk, __read_chk.

A loaded library cannot be unloaded for good, so a test that needs one in a
fresh state (never called, never patched) builds its own with ``build_library``.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from greenify.tools import demo

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

VARIANTS: Dict[str, List[str]] = {
    "default": ["-O1", "-U_FORTIFY_SOURCE", "-Wl,-z,lazy"],
    "noplt": ["-O1", "-U_FORTIFY_SOURCE", "-fno-plt"],
    "relro": ["-O1", "-U_FORTIFY_SOURCE", "-Wl,-z,relro,-z,now"],
    "fortify": ["-D_FORTIFY_SOURCE=2", "-O2", "-Wl,-z,lazy"],
}


def compiler() -> str:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        from tests.support.servers import missing  # here: fixturelib is loaded before the servers plugin

        missing("no C compiler (cc) to build the fixture libraries: apt-get install gcc")
    return cc


def build_library(source: str, variant: str, folder: Path, name: Optional[str] = None,
                  extra: Sequence[str] = ()) -> Path:
    """Compile fixtures/<source>.c as a shared library built the ``variant``
    way into ``folder``; returns its path."""
    output = folder / (name or f"lib{source}_{variant}.so")
    command = [compiler(), "-shared", "-fPIC", "-Wl,--build-id=sha1", *VARIANTS[variant], *extra,
               "-o", str(output), str(FIXTURES / f"{source}.c")]
    subprocess.run(command, check=True, capture_output=True)
    return output


@pytest.fixture(scope="session")
def fixture_libs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, Path]]:
    """{variant: {source: path}} for fx_client and fx_io, built once per session."""
    folder = tmp_path_factory.mktemp("fixture-libs")
    return {variant: {source: build_library(source, variant, folder) for source in ("fx_client", "fx_io")}
            for variant in VARIANTS}


@pytest.fixture(scope="session")
def slow_server() -> Iterator[int]:
    """Port of a TCP server, in another process, that answers every request
    with b"pong:" + request after 0.2 s, serving connections concurrently
    (the demo's server)."""
    process, port = demo.start_server(0.2, "pong:")
    try:
        yield port
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def slot_value(address: int) -> int:
    """The pointer stored at ``address`` in this process."""
    return ctypes.c_void_p.from_address(address).value or 0


def maps_lines_of(path: Path) -> List[str]:
    """The /proc/self/maps lines of the object loaded from ``path`` (its GOT
    is in one of them, RELRO or not)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        return [line for line in maps.read().splitlines() if line.endswith(" " + real)]


def build_extension_module(folder: Path, library: str = "fxmod"):
    """Build and import fx_module, an extension module linked (DT_NEEDED,
    rpath) against lib<library>.so, a default build of fx_client.c.  The
    loader reuses a loaded object of the same DT_NEEDED name, so a test that
    needs the library loaded by this import names it uniquely."""
    import importlib.util
    import sysconfig

    build_library("fx_client", "default", folder, name=f"lib{library}.so")
    output = folder / ("fx_module" + sysconfig.get_config_var("EXT_SUFFIX"))
    command = [compiler(), "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"], "-o", str(output),
               str(FIXTURES / "fx_module.c"), "-L", str(folder), f"-l{library}", f"-Wl,-rpath,{folder}"]
    subprocess.run(command, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("fx_module", output)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_python_extension(source: str, folder: Path):
    """Build fixtures/<source>.c as a CPython extension module named
    <source> and import it."""
    import importlib.util
    import sysconfig

    output = folder / (source + sysconfig.get_config_var("EXT_SUFFIX"))
    command = [compiler(), "-shared", "-fPIC", "-O2", "-I", sysconfig.get_paths()["include"], "-o", str(output),
               str(FIXTURES / f"{source}.c")]
    subprocess.run(command, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location(source, output)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
