"""greenify.patch_all() (issue 25): every C client in the process greenified
by one call, now and as it loads, with everything else left exactly as it was.

patch_all() changes the whole process, so each test runs it in a child
interpreter of its own (``run_child``) against the session's servers
(tests/support/servers.py); the child prints one JSON result.  Concurrency is
asserted against the serial time with a wide margin: 20 waits of 0.2 s
(serial: 4 s) must finish within 1.5 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import greenify
from tests.support import servers
from tests.support.fixturelib import build_library
from greenify.patching import loaded

ROOT = Path(__file__).resolve().parents[2]
COUNT, WAIT_S, TOGETHER_BOUND_S = 20, 0.2, 1.5  # serial: 4 s

PRELUDE = '''
import json, os, sys, time
PARAMS = json.loads(sys.argv[1])
def emit(result):
    sys.stdout.write("RESULT " + json.dumps(result) + "\\n")
    sys.stdout.flush()
def together(function, count):
    import gevent
    started = time.monotonic()
    greenlets = [gevent.spawn(function, index) for index in range(count)]
    gevent.joinall(greenlets, timeout=30)
    return time.monotonic() - started, [glet.get() for glet in greenlets]
def slot_values(objects=None):
    """{(path, symbol, slot address): value} of every blocking import's slot."""
    import ctypes
    from greenify.patching import loaded
    from greenify.patching import patcher
    values = {}
    for obj in objects or loaded.loaded_objects():
        try:
            imports = patcher.read_object(obj)
        except Exception:
            continue
        for imp in imports.imports:
            address = obj.base + imp.r_offset
            if obj.holds_slot(address, 8):
                values[f"{obj.path} {imp.symbol} {address:#x}"] = ctypes.c_void_p.from_address(address).value or 0
    return values
'''


def run_child(code: str, timeout: float = 120, args=(), **params) -> dict:
    """Run ``code`` (after PRELUDE) in a fresh interpreter with this tree on
    its path; returns what it passed to emit()."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), json.dumps(params), *args],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    results = [line[len("RESULT "):] for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and results, (
        f"child exited with {process.returncode}\n--- stdout ---\n{process.stdout[-4000:]}\n"
        f"--- stderr ---\n{process.stderr[-4000:]}")
    return json.loads(results[-1])


@pytest.fixture(scope="module")
def drivers(MySQLdb, psycopg2, pylibmc, pycurl):
    return True


@pytest.fixture(scope="module")
def paused_memcached():
    """A memcached of its own, which a child stops (SIGSTOP) for a while."""
    yield from servers.serve(servers.start_memcached)


def server_params(mariadb, postgres, memcached, slow_http) -> dict:
    return dict(mysql=mariadb.connect_kwargs(), mysql_tls=mariadb.tls_connect_kwargs(), pg=postgres.dsn,
                pg_tls=postgres.tls_dsn, memcached=memcached.address, memcached_pid=memcached.process.pid,
                http=slow_http.url(WAIT_S, "{}"), https=slow_http.https_url(WAIT_S, "{}"),
                ca=slow_http.tls.certificate)


DRIVER_WAITS = '''
import gevent, MySQLdb, psycopg2, pylibmc, pycurl, io, signal, subprocess
from tests.support.servers import stop_process
def mysql(index, tls=False):
    connection = MySQLdb.connect(**PARAMS["mysql_tls" if tls else "mysql"])
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT SLEEP(%s), %s", (PARAMS["wait"], index))
        return cursor.fetchall()[0][1]
    finally:
        connection.close()
def pg(index, tls=False):
    connection = psycopg2.connect(PARAMS["pg_tls" if tls else "pg"])
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s FROM pg_sleep(%s)", (index, PARAMS["wait"]))
            return cursor.fetchall()[0][0]
    finally:
        connection.close()
def curl(index, tls=False):
    body = io.BytesIO()
    handle = pycurl.Curl()
    try:
        handle.setopt(pycurl.URL, PARAMS["https" if tls else "http"].format(index))
        handle.setopt(pycurl.CAINFO, PARAMS["ca"])
        handle.setopt(pycurl.WRITEDATA, body)
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.perform()
        return body.getvalue().decode()
    finally:
        handle.close()
def memcached_while_paused(pause_s):
    """One client asks a stopped memcached; counts the hub's ticks meanwhile."""
    client = pylibmc.Client([PARAMS["memcached"]], binary=True)
    client.set("paused", "answer")
    ticks = [0]
    def tick():
        while True:
            gevent.sleep(0.02)
            ticks[0] += 1
    ticker = gevent.spawn(tick)
    gevent.sleep(0)
    pid = PARAMS["memcached_pid"]
    stop_process(pid)  # every thread stopped, not only signalled
    subprocess.Popen(["sh", "-c", f"sleep {pause_s}; kill -CONT {pid}"])
    started = time.monotonic()
    value = client.get("paused")
    elapsed = time.monotonic() - started
    ticker.kill()
    return value, elapsed, ticks[0]
'''


def test_patch_all_runs_every_drivers_waits_together(drivers, mariadb, postgres, paused_memcached, slow_http):
    result = run_child(DRIVER_WAITS + '''
import greenify
report = greenify.patch_all()
timings = {}
for name, function in (("MySQLdb", mysql), ("psycopg2", pg), ("pycurl", curl)):
    elapsed, values = together(function, PARAMS["count"])
    timings[name] = (elapsed, values)
value, elapsed, ticks = memcached_while_paused(0.6)
emit({"timings": timings, "memcached": [value, elapsed, ticks], "patched": report.patched_paths,
      "greenify_called": False})
''', **server_params(mariadb, postgres, paused_memcached, slow_http), wait=WAIT_S, count=COUNT)
    for name, (elapsed, values) in result["timings"].items():
        assert elapsed < TOGETHER_BOUND_S, f"{name}: {COUNT} waits of {WAIT_S} s took {elapsed:.2f} s under patch_all()"
        if name == "pycurl":
            assert values == [f"slept {WAIT_S} for {index}" for index in range(COUNT)]
        else:
            assert values == list(range(COUNT)), name
    value, elapsed, ticks = result["memcached"]
    assert value == "answer" and elapsed >= 0.5
    assert ticks >= 10, f"the hub ticked {ticks} times while libmemcached waited {elapsed:.2f} s: it blocked"
    names = [os.path.basename(path) for path in result["patched"]]
    for stem in ("libmariadb", "libpq", "libmemcached", "libcurl"):
        assert any(name.startswith(stem) for name in names), (stem, names)


def test_patch_all_runs_tls_connections_together(drivers, mariadb, postgres, memcached, slow_http):
    result = run_child(DRIVER_WAITS + '''
import greenify
report = greenify.patch_all()
timings = {name: together(lambda index, function=function: function(index, tls=True), PARAMS["count"])
           for name, function in (("MySQLdb", mysql), ("psycopg2", pg), ("pycurl", curl))}
emit({"timings": timings, "report": str(report)})
''', **server_params(mariadb, postgres, memcached, slow_http), wait=WAIT_S, count=10)
    for name, (elapsed, values) in result["timings"].items():
        assert elapsed < TOGETHER_BOUND_S, f"{name} over TLS: 10 waits of {WAIT_S} s took {elapsed:.2f} s"
        assert len(values) == 10
    assert "TLS I/O of libmariadb" in result["report"], result["report"]


def test_library_loaded_after_patch_all_is_patched_as_it_loads(tmp_path, slow_server):
    library = build_library("fx_client", "relro", tmp_path, name="libfxlater.so")
    result = run_child('''
import ctypes, gevent, greenify
report = greenify.patch_all()
before = len(report.patched)
started = time.perf_counter()
client = ctypes.CDLL(PARAMS["library"])
load_s = time.perf_counter() - started
client.fx_request.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
def request(index):
    out = ctypes.create_string_buffer(64)
    return client.fx_request(PARAMS["port"], b"ping", out, 64), out.value.decode()
elapsed, values = together(request, PARAMS["count"])
emit({"decision": report.decision("libfxlater.so"), "later": report.later_loads, "elapsed": elapsed,
      "values": values, "load_s": load_s, "patched_before": before})
''', library=str(library), port=slow_server, count=COUNT)
    assert result["decision"].startswith("patched: network client"), result["decision"]
    assert result["later"] and result["later"][-1][1] > 0, result["later"]
    assert all(value[1] == "pong:ping" for value in result["values"]), result["values"]
    assert result["elapsed"] < TOGETHER_BOUND_S, f"{COUNT} requests of 0.2 s took {result['elapsed']:.2f} s"


def test_unpatch_all_restores_every_slot_exactly(drivers):
    result = run_child('''
import gevent, MySQLdb, psycopg2, pylibmc, pycurl, ssl, greenify
from greenify.patching import slots
before = slot_values()
report = greenify.patch_all()
during = slot_values()
restored = greenify.unpatch_all()
after = slot_values()
changed = sorted(key for key in before if during.get(key) != before[key])
emit({"changed": len(changed), "written": report.slots_written, "restored": restored,
      "differ": sorted(key for key in before if after.get(key) != before[key]),
      "hooks_left": len(slots.written_slots(purpose=slots.DLOPEN_HOOK)),
      "twins_left": len(slots.written_slots(purpose=slots.TWIN)), "in_effect": greenify.patch_all.__module__})
''')
    assert result["changed"] == result["written"] == result["restored"] > 20, result
    assert result["differ"] == [], result["differ"][:10]
    assert result["hooks_left"] == 0 and result["twins_left"] == 0, result


def test_objects_patch_all_never_touches_keep_every_slot(drivers):
    result = run_child('''
import gevent, MySQLdb, psycopg2, pylibmc, pycurl, ssl, select, subprocess, greenify
from greenify.patching import loaded
from greenify.patching import policy
protected = [obj for obj in loaded.loaded_objects() if policy.never_reason(obj) is not None]
before = slot_values(protected)
report = greenify.patch_all()
after = slot_values(protected)
emit({"names": sorted({obj.name for obj in protected}), "slots": len(before),
      "differ": sorted(key for key in before if after.get(key) != before[key]),
      "patched": [os.path.basename(path) for path in report.patched_paths]})
''')
    names = result["names"]
    for expected in ("libc.so.6", "_socket.", "_ssl.", "select.", "_posixsubprocess.", "_greenlet.", "corecext.",
                     "_green.", "libpython"):
        if expected == "libpython" and not any(name.startswith("libpython") for name in names):
            continue  # an interpreter linked statically
        assert any(name.startswith(expected) for name in names), (expected, names)
    assert result["slots"] > 50
    assert result["differ"] == [], result["differ"][:10]
    patched = result["patched"]
    assert not any(name.startswith(("libc.", "libpython", "libssl", "_socket", "_ssl", "corecext", "libz", "libstdc++"))
                   for name in patched), patched


def test_include_and_exclude_by_name_stem_path_and_module(drivers):
    result = run_child('''
import gevent, MySQLdb, psycopg2, psycopg2._psycopg, pylibmc, _pylibmc, pycurl, greenify
from greenify.patching import loaded
curl = next(obj.path for obj in loaded.loaded_objects() if obj.name.startswith("libcurl"))
ssh = next(obj.name for obj in loaded.loaded_objects() if obj.name.startswith("libssh2"))
report = greenify.patch_all(include=["liblber", psycopg2._psycopg], exclude=["libpq", curl, ssh, _pylibmc])
emit({"patched": [os.path.basename(path) for path in report.patched_paths],
      "decisions": {os.path.basename(path): reason for path, _kind, reason in report.left}})
''')
    patched, decisions = result["patched"], result["decisions"]

    def reason(stem):
        return next((why for name, why in decisions.items() if name.startswith(stem)), None)

    assert any(name.startswith("liblber") for name in patched), patched            # include= a stem
    assert any(name.startswith("_psycopg") for name in patched), patched           # include= a module
    assert "libmariadb.so.3" in patched, patched                                   # the rule, untouched
    assert reason("libpq").startswith("exclude= names it"), decisions               # exclude= a stem
    assert reason("libcurl").startswith("exclude= names it"), decisions             # exclude= a path
    assert reason("libssh2").startswith("exclude= names it"), decisions             # exclude= a file name
    assert reason("libmemcached").startswith("exclude= names it"), decisions        # exclude= a module
    assert reason("libz").startswith("exclude= names it"), decisions                # ... and what it needs
    assert not any(name.startswith(("libpq", "libmemcached", "libcurl", "libssh2")) for name in patched), patched


def test_report_prints_what_was_patched_and_what_was_left_and_why(drivers):
    result = run_child('''
import gevent, MySQLdb, greenify
report = greenify.patch_all()
emit({"text": str(report), "repr": repr(report)})
''')
    text = result["text"]
    lines = text.splitlines()
    assert lines[0].startswith("greenify.patch_all() (in effect): ") and "looked at" in lines[0], lines[0]
    assert "patched:" in lines and "left alone:" in lines, text
    assert "libmariadb.so.3" in text and "why: network client: imports connect" in text, text
    assert "TLS I/O of libmariadb.so.3" in text, text
    assert "never patched: libc itself" in text and "lib-dynload" in text, text
    assert "not a network client" in text, text                      # libz, libstdc++
    assert all(len(line) <= 120 or line.strip().startswith("/") for line in lines), max(lines, key=len)
    assert result["repr"].startswith("<PatchAllReport: ")


BEHAVIOUR = '''
import socket, ssl, subprocess, threading, urllib.request
def battery():
    """Python's own I/O: results that must not change."""
    out = {}
    server = socket.socket()
    server.bind(("127.0.0.1", 0)); server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    peer, _ = server.accept()
    client.sendall(b"x" * 100000)
    received = b""
    while len(received) < 100000:
        received += peer.recv(65536)
    out["socket"] = len(received)
    peer.settimeout(0.05)
    try:
        peer.recv(1)
        out["socket_timeout"] = "no timeout"
    except socket.timeout:
        out["socket_timeout"] = "timeout"
    for s in (client, peer, server):
        s.close()
    read_end, write_end = os.pipe()
    os.write(write_end, b"pipe bytes")
    out["pipe"] = os.read(read_end, 100).decode()
    os.close(read_end); os.close(write_end)
    out["subprocess"] = subprocess.run(["sh", "-c", "echo hi; exit 3"], capture_output=True).stdout.decode()
    started = time.monotonic(); time.sleep(0.05); out["sleep"] = time.monotonic() - started >= 0.05
    out["dns"] = sorted({info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)})
    out["http"] = urllib.request.urlopen(PARAMS["http"].format("plain"), timeout=10).read().decode()
    context = ssl.create_default_context(cafile=PARAMS["ca"])
    out["https"] = urllib.request.urlopen(PARAMS["https"].format("tls"), timeout=10, context=context).read().decode()
    with socket.create_connection(PARAMS["https_address"], timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=PARAMS["https_address"][0]) as tls:
            out["ssl_version"] = tls.version() is not None
    return out
def in_thread():
    box = {}
    thread = threading.Thread(target=lambda: box.update(battery()))
    thread.start(); thread.join(60)
    return box
'''


@pytest.mark.parametrize("mode", ["gevent monkey patching", "plain threads without a hub"])
def test_python_io_behaves_as_before_with_patch_all_in_effect(drivers, slow_http, mode):
    monkey = mode.startswith("gevent")
    result = run_child(("from gevent import monkey; monkey.patch_all()\n" if monkey else "") + BEHAVIOUR + '''
import MySQLdb, psycopg2, pylibmc, pycurl, greenify
before = [battery(), in_thread()]
greenify.stats(reset=True)
report = greenify.patch_all()
after = [battery(), in_thread()]
waits = {name: entry.calls for name, entry in greenify.stats().items()}
emit({"before": before, "after": after, "waits": waits, "patched": len(report.patched)})
''', http=slow_http.url(0.05, "{}"), https=slow_http.https_url(0.05, "{}"), ca=slow_http.tls.certificate,
        https_address=[slow_http.host, slow_http.https_port])
    assert result["patched"] > 3
    assert result["before"][0]["http"] == "slept 0.05 for plain" and result["before"][0]["ssl_version"] is True
    assert result["after"] == result["before"], (result["before"], result["after"])
    assert result["waits"] == {}, f"Python's own I/O waited in greenify's twins: {result['waits']}"


def test_patch_library_without_greenify_activates_the_green_functions(MySQLdb, mariadb):
    result = run_child('''
import logging, gevent, MySQLdb, greenify
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
was_active = greenify.is_active()
report = greenify.patch_library("libmariadb")
def query(index):
    connection = MySQLdb.connect(**PARAMS["mysql"])
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT SLEEP(%s)", (PARAMS["wait"],))
        return cursor.fetchall()
    finally:
        connection.close()
elapsed, _ = together(query, 4)
emit({"was_active": was_active, "active": greenify.is_active(), "elapsed": elapsed})
''', mysql=mariadb.connect_kwargs(), wait=0.5)
    assert result["was_active"] is False and result["active"] is True
    assert result["elapsed"] < 1.5, f"4 x 0.5 s queries took {result['elapsed']:.2f} s without greenify.greenify()"


def test_libmysqlclient_so_patches_the_loaded_mariadb_client(MySQLdb):
    with greenify.patched("libmysqlclient.so") as report:
        assert [os.path.basename(obj.path) for obj in report.objects if obj][:1] == ["libmariadb.so.3"], repr(report)


def test_a_name_that_resolves_on_disk_to_a_loaded_object_patches_it(MySQLdb, tmp_path, monkeypatch):
    mariadb = next(obj for obj in loaded.loaded_objects() if obj.name.startswith("libmariadb"))
    (tmp_path / "libmysqlclient.so.21").symlink_to(mariadb.realpath)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    assert loaded.find_loaded("libmysqlclient.so.21") == [mariadb]


def test_a_name_nothing_loaded_matches_names_the_loaded_clients_and_the_call_that_works(MySQLdb):
    with pytest.raises(greenify.NotLoadedError) as raised:
        greenify.patch_library("libgreenify-no-such-client.so.7")
    message = str(raised.value)
    assert "libmariadb.so.3" in message and 'greenify.patch_library("' in message and "patch_all()" in message, message


def test_inspect_says_per_object_whether_patch_all_would_patch_it(MySQLdb):
    process = subprocess.run([sys.executable, "-m", "greenify.tools.inspector", "--import", "MySQLdb", "--color", "never"],
                             capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = process.stdout
    block = text[text.index("libmariadb.so.3"):]
    assert "patch_all: patches it (network client" in block.split("\n\n")[0], text
    assert "patch_all: leaves it: not a network client" in text, text     # libz
    assert "patch_all: TLS twins, as the TLS I/O of libmariadb.so.3" in text, text
    document = json.loads(subprocess.run(
        [sys.executable, "-m", "greenify.tools.inspector", "--import", "MySQLdb", "--json"], capture_output=True, text=True,
        timeout=120, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout)
    by_stem = {os.path.basename(entry["path"]).split(".so")[0]: entry["patch_all"] for entry in document["libraries"]}
    assert by_stem["libmariadb"]["patch"] is True, by_stem
    assert by_stem["libz"]["patch"] is False, by_stem


def test_launcher_runs_a_script_and_a_module_greenified(tmp_path):
    probe = ('import json, sys, greenify\nfrom gevent import monkey\nfrom greenify.patching.all_clients import in_effect\n'
             'print("PROBE " + json.dumps({"argv": sys.argv, "monkey": monkey.is_module_patched("socket"), '
             '"patch_all": in_effect() is not None, "name": __name__}))\n')
    (tmp_path / "script.py").write_text(probe)
    (tmp_path / "probepkg").mkdir()
    (tmp_path / "probepkg" / "__init__.py").write_text("")
    (tmp_path / "probepkg" / "tool.py").write_text(probe)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}

    def launch(*args):
        process = subprocess.run([sys.executable, "-m", "greenify", *args], capture_output=True, text=True,
                                 timeout=120, env=env, cwd=str(tmp_path))
        assert process.returncode == 0, process.stderr
        line = next(line for line in process.stdout.splitlines() if line.startswith("PROBE "))
        return json.loads(line[len("PROBE "):]), process.stderr

    script, _ = launch(str(tmp_path / "script.py"), "--flag", "value")
    assert script == {"argv": [str(tmp_path / "script.py"), "--flag", "value"], "monkey": True, "patch_all": True,
                      "name": "__main__"}
    module, stderr = launch("--report", "--exclude", "libz", "-m", "probepkg.tool", "-x")
    assert module["argv"] == [str(tmp_path / "probepkg" / "tool.py"), "-x"] and module["monkey"] and module["patch_all"]
    assert module["name"] == "__main__"
    assert "greenify.patch_all() (in effect)" in stderr and "exclude: libz" in stderr, stderr
    dashed, _ = launch("--", str(tmp_path / "script.py"), "--report")
    assert dashed["argv"][1:] == ["--report"]


def test_inspect_finds_the_mariadb_client_for_libmysqlclient():
    from greenify.tools import inspector as inspect
    if not loaded.match_name("libmariadb", loaded.search_path()):
        servers.missing("no libmariadb on the loader's search path: apt-get install libmariadb3")
    assert os.path.basename(inspect.resolve_target("libmysqlclient")).startswith("libmariadb.so")


def test_patch_all_again_returns_the_report_in_effect_or_starts_over_with_other_arguments(MySQLdb):
    result = run_child('''
import MySQLdb, greenify
first = greenify.patch_all()
same = greenify.patch_all() is first
other = greenify.patch_all(exclude="libmariadb")
emit({"same": same, "first_active": first.active, "other": other.decision("libmariadb.so.3"),
      "restored": greenify.unpatch_all(), "again": greenify.unpatch_all()})
''')
    assert result["same"] is True and result["first_active"] is False, result
    assert result["other"].startswith("exclude= names it"), result
    assert result["again"] == 0, result
