"""Run by ci/wheel.sh with the venv that installed the wheel, from outside the
source tree: the installed greenify (not the tree's) runs the demo, the demo
against a real MariaDB, and greenify-inspect --import MySQLdb.

usage: VENV/bin/python ci/wheel_check.py TESTS_DIR
"""
import importlib.util
import os
import subprocess
import sys
import sysconfig

tests_dir = sys.argv[1]
bin_dir = os.path.dirname(sys.executable)


def run(*command: str) -> str:
    print("wheel_check: $", " ".join(command), flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"wheel_check: {command[0]} exited with {done.returncode}")
    return done.stdout


import greenify  # noqa: E402 - after the checks' helpers, as the thing checked

site_packages = sysconfig.get_paths()["platlib"]
if not os.path.realpath(greenify.__file__).startswith(os.path.realpath(site_packages) + os.sep):
    raise SystemExit(f"wheel_check: imported greenify from {greenify.__file__}, not from the venv's {site_packages}")
print("wheel_check: greenify from", greenify.__file__)

run(sys.executable, "-m", "greenify.demo")
# tests/support/servers.py, loaded from its file: this check runs outside the
# checkout (the installed wheel's greenify, not the source tree's)
_spec = importlib.util.spec_from_file_location("servers", os.path.join(tests_dir, "support", "servers.py"))
servers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = servers  # its dataclasses look their module up
_spec.loader.exec_module(servers)

with servers.start_mariadb() as mariadb:
    run(sys.executable, "-m", "greenify.demo", "--mysql", f"{mariadb.host}:{mariadb.port}",
        "--user", mariadb.user, "--password", mariadb.password)
inspected = run(os.path.join(bin_dir, "greenify-inspect"), "--import", "MySQLdb")
if "libmariadb" not in inspected:
    raise SystemExit("wheel_check: greenify-inspect --import MySQLdb did not list libmariadb")
print("wheel_check: all passed")
