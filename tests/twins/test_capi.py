"""The C API (greenify/include/greenify.h), used as an author would: an
extension module built with setuptools against greenify.get_include() and a
plain C library built WITH_GREENIFY and loaded with ctypes call the green
functions directly, with nothing patched."""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gevent
import pytest
from gevent._hub_local import get_hub_if_exists

import greenify
from tests.support.fault_support import INTERRUPT_BOUND_S
from tests.support.fixturelib import FIXTURES, compiler
from tests.support.green_support import no_interruption_pending, run_concurrently, socketpair

CSRC = FIXTURES.parent / "csrc"
ERRNO_BEFORE = 1234  # what the fixtures set errno to before each call
SERIAL_S = 20 * 0.2  # 20 waits of 0.2 s one after the other


@pytest.fixture(autouse=True, scope="module")
def active():
    greenify.greenify()


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    gevent.sleep(0.01)
    assert no_interruption_pending(), "an interruption was never delivered"


def build_extension(folder: Path, name: str, define_macros=()) -> Path:
    """fixtures/capi_client.c built as module ``name`` by setuptools, the way
    an author's setup.py would; the compiler's output must not mention
    greenify.h (the header compiles without a warning)."""
    setup_py = folder / "setup.py"
    setup_py.write_text(textwrap.dedent(f"""
        from setuptools import Extension, setup
        setup(name={name!r}, ext_modules=[Extension({name!r}, [{str(FIXTURES / 'capi_client.c')!r}],
              include_dirs=[{greenify.get_include()!r}], define_macros={list(define_macros)!r},
              extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"])])
    """))
    built = subprocess.run([sys.executable, str(setup_py), "-q", "build_ext", "--inplace"], cwd=folder,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "greenify.h" not in built.stderr, built.stderr
    return next(folder.glob(name + ".*.so"))


def import_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client_path(tmp_path_factory) -> Path:
    return build_extension(tmp_path_factory.mktemp("capi-ext"), "capi_client")


@pytest.fixture(scope="module")
def client(client_path):
    """The extension module, calling the green functions through the API."""
    return import_path("capi_client", client_path)


@pytest.fixture(scope="module")
def libc_client(tmp_path_factory):
    """The same module built to call libc (no greenify.h)."""
    path = build_extension(tmp_path_factory.mktemp("capi-ext-libc"), "capi_client_libc",
                           [("CAPI_CLIENT_LIBC", "1")])
    return import_path("capi_client_libc", path)


def print_cflags(folder: Path) -> str:
    """``python -m greenify --cflags``'s output, run in ``folder`` (python -m
    puts its working folder first on the path) with this greenify importable."""
    return subprocess.run([sys.executable, "-m", "greenify", "--cflags"], capture_output=True, text=True, check=True,
                          cwd=folder, env={**os.environ, "PYTHONPATH": str(Path(greenify.__file__).parent.parent)}
                          ).stdout


def build_plain_library(folder: Path, with_greenify: bool) -> ctypes.CDLL:
    """fixtures/capi_lib.c as a shared library (no Python.h), with or without
    -DWITH_GREENIFY, compiled with ``python -m greenify --cflags``."""
    cflags = print_cflags(folder).split()
    output = folder / ("libcapi_green.so" if with_greenify else "libcapi_libc.so")
    switch = ["-DWITH_GREENIFY"] if with_greenify else []
    subprocess.run([compiler(), "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", *switch, *cflags,
                    "-o", str(output), str(FIXTURES / "capi_lib.c")], check=True, capture_output=True)
    library = ctypes.CDLL(str(output))
    library.capi_lib_request.restype = ctypes.c_long
    library.capi_lib_request.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                         ctypes.c_size_t]
    library.capi_lib_recv.restype = ctypes.c_long
    library.capi_lib_recv.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_int)]
    if with_greenify:
        library.capi_lib_use_greenify.argtypes = [ctypes.c_void_p]
    return library


@pytest.fixture(scope="module")
def plain_green(tmp_path_factory):
    """The plain library built WITH_GREENIFY and given the API."""
    library = build_plain_library(tmp_path_factory.mktemp("capi-lib"), with_greenify=True)
    assert library.capi_lib_use_greenify(greenify.capi_address()) == 0
    return library


@pytest.fixture(scope="module")
def plain_libc(tmp_path_factory):
    return build_plain_library(tmp_path_factory.mktemp("capi-lib-libc"), with_greenify=False)


def plain_request(library, port: int, payload: bytes) -> bytes:
    reply = ctypes.create_string_buffer(4096)
    n = library.capi_lib_request(port, payload, len(payload), reply, 4096)
    if n < 0:
        raise OSError(-n, os.strerror(-n))
    return reply.raw[:n]


def plain_recv(library, fd: int, size: int, flags: int):
    buffer = ctypes.create_string_buffer(max(size, 1))
    error = ctypes.c_int()
    n = library.capi_lib_recv(fd, buffer, size, flags, ctypes.byref(error))
    return n, error.value, buffer.raw[:max(n, 0)]


def fake_capsule(major: int, minor: int, size: int):
    """A capsule named greenify._C_API holding a table header of another version."""
    table = (ctypes.c_uint * 2)(major, minor)
    table_with_size = ctypes.create_string_buffer(bytes(table) + size.to_bytes(ctypes.sizeof(ctypes.c_size_t),
                                                                                sys.byteorder))
    name = ctypes.create_string_buffer(b"greenify._C_API")
    capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        ("PyCapsule_New", ctypes.pythonapi))
    capsule = capsule_new(ctypes.addressof(table_with_size), ctypes.addressof(name), None)
    return capsule, (table_with_size, name)  # keep both alive while the capsule is in use


# -- the header, the flags, the capsule -------------------------------------------------------

def test_cflags_name_the_folder_that_holds_the_header(tmp_path):
    assert f"-I{greenify.get_include()}" in print_cflags(tmp_path).split()
    assert (Path(greenify.get_include()) / "greenify.h").is_file()


@pytest.mark.parametrize("flags", [[], ["-D_FORTIFY_SOURCE=2", "-O2"]], ids=["plain", "fortify"])
def test_the_header_calls_every_green_function_and_is_libc_until_given_the_api(tmp_path, flags):
    # fixtures/capi_check.c: each green_<name> of GREEN_FUNCTIONS is a call
    # through the table's member of that type (at compile time), and libc's
    # own function until Greenify_Use() (at run time); the build of greenify
    # checked the table's members against green_twins.h (csrc/twins/green_capi.c)
    program = tmp_path / "capi_check"
    subprocess.run([compiler(), "-Wall", "-Wextra", "-Werror", *flags, f"-I{greenify.get_include()}", f"-I{CSRC / 'wait'}", f"-I{CSRC / 'twins'}",
                    "-o", str(program), str(FIXTURES / "capi_check.c")], check=True, capture_output=True)
    checked = subprocess.run([str(program)], capture_output=True, text=True)
    assert (checked.returncode, checked.stdout) == (0, "ok\n")


def test_the_header_builds_in_cplusplus_and_links_libcs_fortified_forms(tmp_path):
    cplusplus = shutil.which(os.environ.get("CXX", "c++"))
    if cplusplus is None:
        pytest.skip("no C++ compiler (c++): apt-get install g++")
    subprocess.run([cplusplus, "-x", "c++", "-shared", "-fPIC", "-Wall", "-Werror", "-DWITH_GREENIFY",
                    f"-I{greenify.get_include()}", "-Wl,--no-undefined", "-o", str(tmp_path / "libcapi_cxx.so"),
                    str(FIXTURES / "capi_lib.c")], check=True, capture_output=True)


def test_the_capsule_holds_the_table_at_capi_address():
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    assert get_pointer(greenify._C_API, b"greenify._C_API") == greenify.capi_address()
    version = (ctypes.c_uint * 2).from_address(greenify.capi_address())
    assert tuple(version) == greenify.capi.API_VERSION == (1, 0)


def test_a_mismatched_major_version_fails_the_import_naming_both_versions(client, monkeypatch):
    capsule, keep = fake_capsule(99, 3, 4096)
    monkeypatch.setattr(greenify, "_C_API", capsule)
    with pytest.raises(ImportError, match=r"version 99\.3 .* version 1\.0"):
        client.import_api()
    monkeypatch.undo()
    client.import_api()  # the real one fits


def test_a_table_smaller_than_the_header_fails_the_import(client, monkeypatch):
    capsule, keep = fake_capsule(1, 0, 16)
    monkeypatch.setattr(greenify, "_C_API", capsule)
    with pytest.raises(ImportError, match=r"version 1\.0 \(16 bytes\)"):
        client.import_api()


# -- the extension module --------------------------------------------------------------------

def test_twenty_extension_requests_overlap_under_gevent_with_nothing_patched(client, slow_server):
    values, took = run_concurrently(20, lambda i: client.request(slow_server, b"%d" % i))
    assert values == [b"pong:%d" % i for i in range(20)]
    assert took < 1.5, f"20 requests waiting 0.2 s each took {took:.2f} s: they did not overlap " \
                       f"(serial: {SERIAL_S:.0f} s)"


def test_a_timeout_ends_an_extension_call_promptly(client):
    a, b = socketpair()
    start = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.2) as timeout:
            client.recv(a.fileno(), 16, 0)
            pytest.fail("the line after the call ran")
    assert caught.value is timeout
    assert time.monotonic() - start < 0.2 + INTERRUPT_BOUND_S


def test_a_timeout_ends_an_extension_request_with_its_oserror_as_context(client):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # connects, never answers
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.2):
            client.request(listener.getsockname()[1], b"anyone?")
    assert isinstance(caught.value.__context__, OSError)
    assert caught.value.__context__.errno == errno.ETIMEDOUT
    listener.close()


def test_kill_ends_an_extension_call_at_once(client):
    a, b = socketpair()
    # a Python frame makes the call, as in an application (the interruption
    # is raised in the frame that made the call: with none, the greenlet
    # would end with the call's ETIMEDOUT result instead)
    waiting = gevent.spawn(lambda: client.recv(a.fileno(), 16, 0))
    gevent.sleep(0.05)
    start = time.monotonic()
    waiting.kill()
    assert time.monotonic() - start < INTERRUPT_BOUND_S
    assert waiting.dead and isinstance(waiting.value, gevent.GreenletExit)


def closed_fd() -> int:
    a, b = socketpair()
    fd = a.fileno()
    a.close()
    return fd


def refused_port() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    return port


# each case: (name, a function making fresh descriptors and returning (method, args, keep-alive))
def case_recv_ready():
    a, b = socketpair()
    b.sendall(b"ready")
    return "recv", (a.fileno(), 16, 0), (a, b)


def send_from_thread(sock: socket.socket, data: bytes, delay: float) -> None:
    """Send after a delay from a thread: libc's calls block the hub, and the
    comparison makes them too."""
    threading.Timer(delay, sock.sendall, (data,)).start()


def case_recv_waits_then_partial():
    a, b = socketpair()
    send_from_thread(b, b"late", 0.05)
    return "recv", (a.fileno(), 16, 0), (a, b)


def case_recv_eof():
    a, b = socketpair()
    b.close()
    return "recv", (a.fileno(), 16, 0), (a,)


def case_recv_dontwait_empty():
    a, b = socketpair()
    return "recv", (a.fileno(), 16, socket.MSG_DONTWAIT), (a, b)


def case_recv_nonblocking_empty():
    a, b = socketpair(blocking=False)
    return "recv", (a.fileno(), 16, 0), (a, b)


def case_recv_closed_fd():
    return "recv", (closed_fd(), 16, 0), ()


def case_recv_not_a_socket():
    r, w = os.pipe()
    return "recv", (r, 16, 0), (os.fdopen(r), os.fdopen(w))


def case_send_to_a_closed_peer():
    a, b = socketpair()
    b.close()
    return "send", (a.fileno(), b"lost", socket.MSG_NOSIGNAL), (a,)


def case_connect_refused():
    s = socket.socket()
    return "connect", (s.fileno(), refused_port()), (s,)


def case_connect_accepted():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    s = socket.socket()
    return "connect", (s.fileno(), listener.getsockname()[1]), (s, listener)


def case_poll_times_out():
    a, b = socketpair()
    return "poll_in", (a.fileno(), 50), (a, b)


def case_poll_ready_later():
    a, b = socketpair()
    send_from_thread(b, b"x", 0.05)
    return "poll_in", (a.fileno(), 5000), (a, b)


CASES = [case_recv_ready, case_recv_waits_then_partial, case_recv_eof, case_recv_dontwait_empty,
         case_recv_nonblocking_empty, case_recv_closed_fd, case_recv_not_a_socket, case_send_to_a_closed_peer,
         case_connect_refused, case_connect_accepted, case_poll_times_out, case_poll_ready_later]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__[5:] for case in CASES])
def test_extension_results_and_errno_are_libcs(client, libc_client, case):
    outcomes = []
    for module in (client, libc_client):
        method, args, keep = case()
        outcomes.append(getattr(module, method)(*args))
        del keep
    green, libc = outcomes
    assert green == libc


def test_before_activation_the_extension_blocks_like_libc(client_path, tmp_path):
    # activation is for the whole process, and this one is active: ask a fresh one
    code = f"""
        import importlib.util, socket, threading, gevent, greenify
        spec = importlib.util.spec_from_file_location("capi_client", {str(client_path)!r})
        client = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(client)
        def count_ticks():
            a, b = socket.socketpair()
            ticks = []
            gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(100)])
            gevent.sleep(0)
            threading.Timer(0.3, b.sendall, (b"x",)).start()
            result = client.recv(a.fileno(), 4, 0)
            return result, len(ticks)
        before = count_ticks()
        greenify.greenify()
        after = count_ticks()
        print(before[0] == after[0] == (1, {ERRNO_BEFORE}, b"x"), before[1], after[1] > 10)
    """
    ran = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(greenify.__file__).parent.parent)})
    assert ran.stdout.split() == ["True", "0", "True"], ran.stderr


def test_in_a_thread_without_a_hub_the_extension_blocks_like_libc(client):
    a, b = socketpair()
    seen = {}

    def worker():
        seen["result"] = client.recv(a.fileno(), 8, 0)
        seen["hub"] = get_hub_if_exists()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.1)
    b.sendall(b"thrd")
    thread.join(5)
    assert seen == {"result": (4, ERRNO_BEFORE, b"thrd"), "hub": None}


def test_in_the_hub_the_extension_blocks_like_libc(client):
    a, b = socketpair()
    results = []
    send_from_thread(b, b"hub!", 0.1)
    gevent.get_hub().loop.run_callback(lambda: results.append(client.recv(a.fileno(), 8, 0)))
    gevent.sleep(0.01)
    assert results == [(4, ERRNO_BEFORE, b"hub!")]


# -- the plain C library, WITH_GREENIFY, through ctypes ---------------------------------------

def test_twenty_plain_library_requests_overlap_once_given_the_api(plain_green, slow_server):
    values, took = run_concurrently(20, lambda i: plain_request(plain_green, slow_server, b"%d" % i))
    assert values == [b"pong:%d" % i for i in range(20)]
    assert took < 1.5, f"20 requests waiting 0.2 s each took {took:.2f} s (serial: {SERIAL_S:.0f} s)"


def test_a_plain_library_not_given_the_api_calls_libc(tmp_path, slow_server):
    library = build_plain_library(tmp_path, with_greenify=True)
    values, took = run_concurrently(3, lambda i: plain_request(library, slow_server, b"%d" % i))
    assert values == [b"pong:%d" % i for i in range(3)]
    assert took >= 3 * 0.2 * 0.9, f"3 requests took {took:.2f} s: they overlapped without the API"


def test_a_plain_library_refuses_a_table_of_another_major_version(tmp_path):
    library = build_plain_library(tmp_path, with_greenify=True)
    capsule, (table, name) = fake_capsule(2, 0, 4096)
    assert library.capi_lib_use_greenify(ctypes.addressof(table)) == -1


def test_a_timeout_ends_a_plain_library_call_promptly(plain_green):
    a, b = socketpair()
    start = time.monotonic()
    with pytest.raises(gevent.Timeout) as caught:
        with gevent.Timeout(0.2) as timeout:
            plain_recv(plain_green, a.fileno(), 16, 0)
            pytest.fail("the line after the call ran")
    assert caught.value is timeout
    assert time.monotonic() - start < 0.2 + INTERRUPT_BOUND_S


def test_kill_ends_a_plain_library_call_at_once(plain_green):
    a, b = socketpair()
    waiting = gevent.spawn(lambda: plain_recv(plain_green, a.fileno(), 16, 0))
    gevent.sleep(0.05)
    start = time.monotonic()
    waiting.kill()
    assert time.monotonic() - start < INTERRUPT_BOUND_S
    assert waiting.dead and isinstance(waiting.value, gevent.GreenletExit)


RECV_CASES = [case_recv_ready, case_recv_waits_then_partial, case_recv_eof, case_recv_dontwait_empty,
              case_recv_nonblocking_empty, case_recv_closed_fd, case_recv_not_a_socket]


@pytest.mark.parametrize("case", RECV_CASES, ids=[case.__name__[5:] for case in RECV_CASES])
def test_plain_library_results_and_errno_are_libcs(plain_green, plain_libc, case):
    outcomes = []
    for library in (plain_green, plain_libc):
        method, args, keep = case()
        outcomes.append(plain_recv(library, *args))
        del keep
    green, libc = outcomes
    assert green == libc
