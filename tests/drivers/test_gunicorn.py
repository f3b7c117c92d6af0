"""Issue 5's gunicorn row: MySQLdb in a WSGI app served by gunicorn's gevent
worker, greenified in the `post_fork` hook (the README's recipe), against the
session's MariaDB (tests/support/servers.py).

Patched, one worker serves 50 requests that each wait in `SELECT SLEEP(0.5)`
together; without the hook the same worker serves them one after another,
since libmariadb blocks the worker's only thread.  gunicorn runs as a
subprocess on a free port on 127.0.0.1 and is stopped after each test.
"""
from __future__ import annotations

import http.client
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import servers
pytestmark = pytest.mark.compat("MySQLdb under gunicorn")

CONCURRENT = 50
SLEEP_S = 0.5
# Serial, 50 x 0.5 s would take 25 s; together about one SLEEP plus connection
# set-up and HTTP.  The bound leaves room for a loaded 2-core machine.
TOGETHER_BOUND_S = 3.0
UNPATCHED = 4
UNPATCHED_SLEEP_S = 0.3

APP = '''\
"""One MySQLdb query per request: GET /?sleep=S runs SELECT SLEEP(S);
with &timeout=T, under gevent.Timeout(T), answering 504 when it fires."""
import os
from urllib.parse import parse_qs

import gevent
import MySQLdb

CONNECT = dict(host=os.environ["GREENIFY_DB_HOST"], port=int(os.environ["GREENIFY_DB_PORT"]),
               user=os.environ["GREENIFY_DB_USER"], password=os.environ["GREENIFY_DB_PASSWORD"],
               database=os.environ["GREENIFY_DB_NAME"])


def application(environ, start_response):
    if environ["PATH_INFO"] == "/ping":
        body = b"pong"
    else:
        query = parse_qs(environ["QUERY_STRING"])
        sleep_s = float(query.get("sleep", ["0"])[0])
        timeout_s = float(query["timeout"][0]) if "timeout" in query else None
        connection = MySQLdb.connect(**CONNECT)
        try:
            with gevent.Timeout(timeout_s):
                cursor = connection.cursor()
                cursor.execute("SELECT SLEEP(%s)", (sleep_s,))
                (slept,), = cursor.fetchall()
        except gevent.Timeout:
            body = f"timed out after {timeout_s} in {os.getpid()}".encode()
            start_response("504 Gateway Timeout", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        finally:
            connection.close()
        body = f"slept {sleep_s} -> {slept} in {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''

COMMON_CONFIG = '''\
worker_class = "gevent"
workers = 1
graceful_timeout = 2
timeout = 60
# gunicorn >= 24 opens a control socket in ~/.gunicorn: not in a test.
control_socket_disable = True
'''

# The README's recipe.
POST_FORK_HOOK = '''\
def post_fork(server, worker):
    # In the worker, before it serves: activate greenify and patch the
    # library under MySQLdb (libmariadb, found through DT_NEEDED).
    import MySQLdb
    import greenify

    greenify.greenify()
    report = greenify.patch_library(MySQLdb._mysql)
    server.log.info("greenify: %s", report)
'''


# The same with patch_all(), in one line: the app imports MySQLdb after the
# hook (gunicorn loads it in the worker), so libmariadb is patched as it loads.
PATCH_ALL_HOOK = '''\
def post_fork(server, worker):
    server.log.info("greenify: %r", __import__("greenify").patch_all())
'''


def answers_ping(port: int) -> bool:
    connection = http.client.HTTPConnection(servers.HOST, port, timeout=2)
    try:
        connection.request("GET", "/ping")
        response = connection.getresponse()
        return response.status == 200 and response.read() == b"pong"
    finally:
        connection.close()


def get(port: int, path: str) -> tuple:
    connection = http.client.HTTPConnection(servers.HOST, port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def gunicorn_module():
    return servers.require_module("gunicorn", "gunicorn")


def serve_app(mariadb, with_greenify: "bool | str"):
    """Run the app under gunicorn's gevent worker, configured with or
    without the post_fork hook (True: the README's recipe; a string: that
    hook); yields its port and its log's path."""
    hook = POST_FORK_HOOK if with_greenify is True else (with_greenify or "")
    with servers.scratch_dir("greenify-gunicorn-") as base:
        with open(os.path.join(base, "app.py"), "w") as app:
            app.write(APP)
        config_path = os.path.join(base, "gunicorn.conf.py")
        with open(config_path, "w") as config:
            config.write(COMMON_CONFIG + ("\n" + hook if hook else ""))
        log_path = os.path.join(base, "gunicorn.log")
        env = {**os.environ, "GREENIFY_DB_HOST": mariadb.host, "GREENIFY_DB_PORT": str(mariadb.port),
               "GREENIFY_DB_USER": mariadb.user, "GREENIFY_DB_PASSWORD": mariadb.password,
               "GREENIFY_DB_NAME": mariadb.database}

        def command(port: int):
            return [sys.executable, "-m", "gunicorn", "--config", config_path, "--chdir", base,
                    "--bind", f"{servers.HOST}:{port}", "app:application"]

        try:
            with servers.running_on_free_port("gunicorn", command, log_path, answers_ping, env=env) as (_, port):
                yield port, log_path
        except servers.ServerFailed as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def greenified_gunicorn(gunicorn_module, MySQLdb, mariadb):
    yield from serve_app(mariadb, with_greenify=True)


@pytest.fixture
def patch_all_gunicorn(gunicorn_module, MySQLdb, mariadb):
    yield from serve_app(mariadb, with_greenify=PATCH_ALL_HOOK)


@pytest.fixture
def plain_gunicorn(gunicorn_module, MySQLdb, mariadb):
    yield from serve_app(mariadb, with_greenify=False)


def request_together(port: int, count: int, sleep_s: float):
    """`count` requests at once, from threads; returns (seconds, responses)."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        responses = list(pool.map(lambda _: get(port, f"/?sleep={sleep_s}"), range(count)))
    return time.monotonic() - started, responses


def single_worker_answers(responses, sleep_s: float) -> set:
    """The worker pids that answered, after checking every answer."""
    pids = set()
    for status, body in responses:
        assert status == 200, body
        prefix = f"slept {sleep_s} -> 0 in "
        assert body.startswith(prefix), body
        pids.add(int(body[len(prefix):]))
    return pids


def test_post_fork_greenified_worker_serves_50_sleeping_requests_together(greenified_gunicorn):
    port, log_path = greenified_gunicorn
    elapsed, responses = request_together(port, CONCURRENT, SLEEP_S)
    assert len(single_worker_answers(responses, SLEEP_S)) == 1
    assert elapsed < TOGETHER_BOUND_S, (
        f"{CONCURRENT} requests of SELECT SLEEP({SLEEP_S}) took {elapsed:.2f} s "
        f"(serial: {CONCURRENT * SLEEP_S:.0f} s)\n--- {log_path} ---\n{servers.read_log(log_path)}")
    assert "greenify: " in servers.read_log(log_path), "the post_fork hook did not run"


def test_post_fork_patch_all_worker_serves_50_sleeping_requests_together(patch_all_gunicorn):
    port, log_path = patch_all_gunicorn
    elapsed, responses = request_together(port, CONCURRENT, SLEEP_S)
    assert len(single_worker_answers(responses, SLEEP_S)) == 1
    assert elapsed < TOGETHER_BOUND_S, (
        f"{CONCURRENT} requests of SELECT SLEEP({SLEEP_S}) took {elapsed:.2f} s with patch_all() "
        f"(serial: {CONCURRENT * SLEEP_S:.0f} s)\n--- {log_path} ---\n{servers.read_log(log_path)}")
    assert "greenify: <PatchAllReport" in servers.read_log(log_path), "the post_fork hook did not run"


def test_worker_without_the_hook_serves_sleeping_requests_one_after_another(plain_gunicorn):
    port, log_path = plain_gunicorn
    elapsed, responses = request_together(port, UNPATCHED, UNPATCHED_SLEEP_S)
    assert len(single_worker_answers(responses, UNPATCHED_SLEEP_S)) == 1
    assert elapsed >= UNPATCHED * UNPATCHED_SLEEP_S, (
        f"{UNPATCHED} requests of SELECT SLEEP({UNPATCHED_SLEEP_S}) took only {elapsed:.2f} s without greenify: "
        "libmariadb should block the worker")


def test_post_fork_greenified_worker_times_out_requests_mid_query_and_keeps_serving(greenified_gunicorn):
    # 20 requests whose queries would take 10 s, each under a 0.3 s gevent.Timeout
    # in the app: every one answers 504 promptly, together, from the same worker,
    # which meanwhile answers /ping and afterwards serves queries as before.
    port, log_path = greenified_gunicorn
    count, started = 20, time.monotonic()
    with ThreadPoolExecutor(max_workers=count + 1) as pool:
        timed_out = [pool.submit(get, port, "/?sleep=10&timeout=0.3") for _ in range(count)]
        time.sleep(0.1)
        assert answers_ping(port), "the worker did not answer /ping while its requests waited in queries"
        responses = [future.result() for future in timed_out]
    elapsed = time.monotonic() - started
    pids = {body.rsplit(" ", 1)[1] for _, body in responses}
    assert [status for status, _ in responses] == [504] * count, responses
    assert elapsed < TOGETHER_BOUND_S, (
        f"{count} requests timing out after 0.3 s took {elapsed:.2f} s (serial: {count * 0.3:.0f} s)\n"
        f"--- {log_path} ---\n{servers.read_log(log_path)}")
    _, responses = request_together(port, 10, SLEEP_S)
    assert single_worker_answers(responses, SLEEP_S) == {int(pid) for pid in pids}, "the worker was replaced"
