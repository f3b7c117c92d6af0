#!/usr/bin/env bash
# `make test-versions`: the tests named on the command line under each CPython
# in $VERSIONS (default "3.10 3.12 3.13"), each in its own venv under
# $CACHE (default .cache), with greenify built in place for that version
# (the module is _green.cpython-3XY-...so, so the builds sit side by side).
# Each run is recorded in .results/ci/results.json (ci/results.py; `make
# record` copies it to ci/results.json).
#
# An interpreter is looked for as $PYENV_ROOT/versions/X.Y.*/bin/pythonX.Y
# (newest patch level first), then as pythonX.Y on PATH; a missing one fails
# the run, naming where it looked.
#
# usage: ci/test-versions.sh TEST_FILE...
set -euo pipefail
cd "$(dirname "$0")/.."
versions=${VERSIONS:-3.10 3.12 3.13}
cache=${CACHE:-.cache}
pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
[ $# -gt 0 ] || { echo "usage: $0 TEST_FILE..." >&2; exit 2; }

find_python() {
    local v=$1 found
    found=$(ls -d "$pyenv_root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] || found=$(command -v "python$v" || true)
    if [ -z "$found" ]; then
        echo "test-versions: no CPython $v: looked for $pyenv_root/versions/$v.*/bin/python$v and python$v on PATH" >&2
        return 1
    fi
    echo "$found"
}

pythons=()
for v in $versions; do pythons+=("$(find_python "$v")"); done

status=0
for python in "${pythons[@]}"; do
    full=$("$python" -c 'import platform; print(platform.python_version())')
    minor=${full%.*}
    venv=$cache/venv-$minor
    started=$SECONDS
    if [ ! -e "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e '.[test]'
        touch "$venv/.installed"
    else
        # the C may have changed since: rebuild the module in place
        "$venv/bin/python" -m pip install -q --no-deps -e .
    fi
    echo "test-versions: CPython $full ($python), venv ready in $((SECONDS - started)) s"
    junit=$cache/junit-$minor.xml
    "$venv/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$junit" "$@" || true
    "$venv/bin/python" -m ci.results record --name "$minor" --junit "$junit" --python "$full" \
        --machine "$("$venv/bin/python" -c 'import platform; print(platform.machine())')" || status=1
    echo "test-versions: CPython $full done in $((SECONDS - started)) s"
done
exit $status
