"""`python -m greenify.demo` works from an installed package, as the README's first command."""
import re
import subprocess
import sys


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
