"""`python -m greenify.demo` works from an installed package, as the README's first command."""
import re
import socket
import subprocess
import sys

import pytest


def test_demo_shows_the_greenified_run_finishing_together():
    proc = subprocess.run([sys.executable, "-m", "greenify.demo", "--greenlets", "20", "--delay", "0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    times = dict(re.findall(r"^\s+(blocking|greenified)\s+([\d.]+) s", proc.stdout, re.M))
    assert float(times["blocking"]) >= 1.9  # 20 calls of 0.1 s, one after another
    assert float(times["greenified"]) < 1.0
    patched = re.search(r"patched: (.*)", proc.stdout).group(1).split(", ")
    assert {"connect", "poll", "recv", "send"} <= set(patched)


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greenify.demo", *args], capture_output=True, text=True, timeout=120)


def test_help_is_plain_text_with_every_options_meaning_and_default():
    proc = run_demo("--help")
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout and "Traceback" not in proc.stdout
    help_text = " ".join(proc.stdout.split())  # argparse wraps lines
    options = help_text.split("options: ", 1)[1]
    for option, default in [("--greenlets N", "50"), ("--delay SECONDS", "0.1"), ("--user USER", "root"),
                            ("--password PASSWORD", "none")]:
        meaning = options.split(f"{option} ", 1)[1]
        assert meaning.split(")", 1)[0].endswith(f"(default: {default}"), meaning
    assert "--mysql HOST:PORT run SELECT SLEEP" in options


@pytest.mark.parametrize("args,complaint", [
    (["--greenlets", "0"], "argument --greenlets: 0 is fewer than 1"),
    (["--greenlets", "many"], "argument --greenlets: 'many' is not a whole number"),
    (["--delay", "-1"], "argument --delay: -1 is not between 0 (excluded) and 60 seconds"),
    (["--mysql", "nohostport"], "argument --mysql: 'nohostport' is not HOST:PORT"),
])
def test_bad_options_end_in_a_one_line_usage_error(args, complaint):
    proc = run_demo(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert complaint in proc.stderr.strip().splitlines()[-1]


def test_an_unreachable_mysql_ends_in_one_line_naming_it():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        proc = run_demo("--mysql", f"127.0.0.1:{port}", "--greenlets", "2")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot connect to MySQL at 127.0.0.1:{port}" in proc.stderr


def test_a_wrong_password_ends_in_one_line_naming_the_user(MySQLdb, mariadb):
    proc = run_demo("--mysql", f"{mariadb.host}:{mariadb.port}", "--user", mariadb.user,
                    "--password", "not-" + mariadb.password, "--greenlets", "2")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot connect to MySQL at {mariadb.host}:{mariadb.port} as '{mariadb.user}'" in proc.stderr
    assert "Access denied" in proc.stderr


def test_the_mysql_demo_runs_against_a_real_server(MySQLdb, mariadb):
    proc = run_demo("--mysql", f"{mariadb.host}:{mariadb.port}", "--user", mariadb.user,
                    "--password", mariadb.password, "--greenlets", "5", "--delay", "0.2")
    assert proc.returncode == 0, proc.stderr
    times = dict(re.findall(r"^\s+(blocking|greenified)\s+([\d.]+) s", proc.stdout, re.M))
    assert float(times["blocking"]) >= 1.0  # 5 x 0.2 s, one after another
    assert float(times["greenified"]) < float(times["blocking"]) / 2
