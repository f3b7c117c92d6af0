#!/usr/bin/env bash
# `make sanitize`: libgreenify built with AddressSanitizer and UBSan, and the
# tests that drive its C run against that build; any report fails the run.
#
# The sanitized builds live in $CACHE/sanitize (default .cache/sanitize), one
# folder per variant, each a copy of the greenify package (its Python files
# linked, its extension built there); the in-place greenify/_green*.so is not
# touched.  Each run puts its variant first on PYTHONPATH, with PYTHONSAFEPATH
# so that neither pytest nor the Python subprocesses the tests start import the
# checkout's own unsanitized greenify from the current folder.
#
#   asan   -fsanitize=address,undefined, the ASan runtime preloaded (it must
#          come before libc in an uninstrumented python).  Heap and globals
#          only (--param=asan-stack=0): greenlet copies whole stack slices,
#          redzones included, to and from the heap, which stack instrumentation
#          reports as stack-buffer-underflow in the wait functions.  Leak
#          detection is off: CPython does not free everything at exit.
#   ubsan  -fsanitize=undefined alone, for tests/twins/test_differential.py: it passes
#          bad pointers to libc on purpose, and ASan's own interceptor of
#          accept() dereferences the bad addrlen before libc can refuse it.
#
# Reports go to $CACHE/sanitize/reports/ (log_path), so that one in a Python
# subprocess whose output a test reads is not lost either; the run fails if
# that folder holds any, and halt_on_error stops a process at its first.
# The servers the suite starts do not inherit LD_PRELOAD (tests/support/servers.py).
#
# usage: ci/sanitize.sh ASAN_TEST... -- UBSAN_TEST...
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PY:-.venv/bin/python}
cc=${CC:-cc}
root=$(pwd)
mkdir -p "${CACHE:-.cache}/sanitize"
base=$(cd "${CACHE:-.cache}/sanitize" && pwd)
reports=$base/reports

asan_tests=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do asan_tests+=("$1"); shift; done
[ $# -gt 0 ] && shift
ubsan_tests=("$@")

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "sanitize: needs CPython 3.11 or later (PYTHONSAFEPATH)" >&2; exit 2; }

build() {  # build VARIANT SANITIZERS
    local dir=$base/$1 flags="-fsanitize=$2 -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
    [[ $2 == *address* ]] && flags="$flags --param=asan-stack=0"
    rm -rf "$dir"
    mkdir -p "$dir/greenify"
    for entry in greenify/*; do
        case $entry in greenify/_green*.so | greenify/_demo_client*.so | greenify/_green.[co] | greenify/__pycache__) continue ;; esac
        ln -s "$root/$entry" "$dir/$entry"
    done
    CFLAGS="$flags" LDFLAGS="-fsanitize=$2" "$python" setup.py -q build_ext --force \
        --build-lib "$dir" --build-temp "$dir/temp" >"$dir/build.log" 2>&1 ||
        { cat "$dir/build.log" >&2; echo "sanitize: building the $1 variant failed" >&2; exit 1; }
    echo "sanitize: $1 variant built in $dir ($flags)"
}

run() {  # run VARIANT TEST...
    local variant=$1; shift
    local preload=""
    [ "$variant" = asan ] && preload="$asan_preload"
    echo "sanitize: $variant: $*"
    env PYTHONPATH="$base/$variant" PYTHONSAFEPATH=1 LD_PRELOAD="$preload" \
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$reports/asan" \
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$reports/ubsan" \
        "$python" -m pytest -q -p no:cacheprovider "$@" || status=1
}

# libstdc++ too: greenlet (C++, loaded after start-up) throws to unwind a
# killed greenlet, and ASan's __cxa_throw interceptor can only find the real
# one if libstdc++ was loaded when the runtime started.
libasan=$("$cc" -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "sanitize: $cc has no ASan runtime (libasan.so): apt-get install gcc" >&2; exit 2; }
asan_preload="$libasan libstdc++.so.6"
rm -rf "$reports"
mkdir -p "$reports"
build asan address,undefined
build ubsan undefined
# the module really is the sanitized one
env PYTHONPATH="$base/asan" PYTHONSAFEPATH=1 LD_PRELOAD="$asan_preload" ASAN_OPTIONS=detect_leaks=0 \
    "$python" -c 'import greenify._green as m, sys; print("sanitize: asan module", m.__file__); sys.exit(not m.__file__.startswith(sys.argv[1]))' \
    "$base/asan"

status=0
started=$SECONDS
[ ${#asan_tests[@]} -gt 0 ] && run asan "${asan_tests[@]}"
[ ${#ubsan_tests[@]} -gt 0 ] && run ubsan "${ubsan_tests[@]}"
if compgen -G "$reports/*" >/dev/null; then
    echo "sanitize: sanitizer reports (in $reports):" >&2
    for report in "$reports"/*; do echo "--- $report" >&2; cat "$report" >&2; done
    status=1
else
    echo "sanitize: no sanitizer report"
fi
echo "sanitize: tests took $((SECONDS - started)) s"
exit $status
