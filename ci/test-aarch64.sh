#!/usr/bin/env bash
# `make test-aarch64`: greenify built and tested on arm64 Debian 12, under
# qemu-user, on this x86-64 machine.
#
#   1. ci/aarch64-root.sh makes the root once (debootstrap), cached in ROOT;
#   2. once per root: MariaDB, a venv (/opt/greenify-venv) with greenify's
#      dependencies, pytest and mysqlclient (built there, against Debian's
#      libmariadb);
#   3. every run: this tree copied to ROOT/src, greenify built there,
#      the test files named on the command line run in `chroot ROOT`, with
#      /proc, /sys and /dev bind-mounted (unmounted on any exit), and the run
#      recorded in .results/ci/results.json as `aarch64` (`make record`).
#
# MariaDB runs natively on the host (ci/host_mariadb.py, tests/support/servers.py's
# own server): emulated, mariadb-install-db alone takes over a minute.  The
# tests inside the root reach it over loopback (qemu-user shares the host's
# network) through GREENIFY_TEST_MARIADB.  Needs root and binfmt_misc
# (ci/aarch64-binfmt.sh).
#
# usage: ci/test-aarch64.sh ROOT TEST_FILE...
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(realpath -m "${1:?usage: $0 ROOT TEST_FILE...}")
shift
[ $# -gt 0 ] || { echo "usage: $0 ROOT TEST_FILE..." >&2; exit 2; }
venv=/opt/greenify-venv
started=$SECONDS
step() { echo "test-aarch64: $* (at $((SECONDS - started)) s)"; }

step "root $root"
ci/aarch64-root.sh "$root"
ci/aarch64-binfmt.sh   # a cached root still needs the handler (e.g. after a reboot)

mounted=()
server_pid=
cleanup() {
    local i
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null; wait "$server_pid" || true; fi
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -l "${mounted[i]}" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap unmounts on a signal too
for fs in proc sys dev dev/pts; do
    mkdir -p "$root/$fs"
    mountpoint -q "$root/$fs" && continue
    mount --bind "/$fs" "$root/$fs"
    mounted+=("$root/$fs")
done
cp /etc/resolv.conf "$root/etc/resolv.conf"
# names the tests resolve (localhost, this host)
cp /etc/hosts "$root/etc/hosts"
grep -qw localhost "$root/etc/hosts" || echo "127.0.0.1 localhost" >>"$root/etc/hosts"
# pip inside the root trusts what the host's pip trusts (a proxy's CA, if any)
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/greenify-host-ca.crt"
mariadb_address=
in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    LANG=C.UTF-8 PIP_CERT=/etc/greenify-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ${GREENIFY_REQUIRE_SERVERS:+GREENIFY_REQUIRE_SERVERS=$GREENIFY_REQUIRE_SERVERS} \
    ${mariadb_address:+GREENIFY_TEST_MARIADB=$mariadb_address} "$@"; }

if [ ! -e "$root/.greenify-venv" ]; then
    step "installing the venv in the root (once)"
    rm -rf "$root$venv"
    in_root python3 -m venv "$venv"
    in_root "$venv/bin/pip" install -q --upgrade pip 'setuptools>=77' wheel
    # greenify's dependencies, from pyproject.toml, plus the suite's and MySQLdb
    in_root "$venv/bin/pip" install -q 'gevent>=21.1' 'greenlet>=2.0' 'cffi>=1.15' 'pyelftools>=0.29' \
        pytest pytest-timeout mysqlclient
    touch "$root/.greenify-venv"
fi

step "copying the tree to $root/src and building greenify there"
rm -rf "$root/src"
mkdir -p "$root/src"
git ls-files -z --cached --others --exclude-standard | grep -zv '^ci/results.json$' \
    | tar --null -T - -cf - | tar -C "$root/src" -xf -
in_root sh -c "cd /src && $venv/bin/pip install -q --no-deps --no-build-isolation -e ."
in_root "$venv/bin/python" -c 'import platform, greenify._green as g; print("test-aarch64: built", g.__file__, platform.machine())'

# the tests that cannot run here, each with its reason (ci/aarch64-deselect.txt)
deselect=()
while read -r nodeid _; do
    case $nodeid in ''|'#'*) continue ;; esac
    deselect+=("--deselect=$nodeid")
done <ci/aarch64-deselect.txt

step "starting MariaDB on the host"
fifo=$(mktemp -u)
mkfifo "$fifo"
python3 -m ci.host_mariadb >"$fifo" &
server_pid=$!
read -r mariadb_address <"$fifo" || { echo "test-aarch64: ci/host_mariadb.py did not start MariaDB" >&2; exit 1; }
rm -f "$fifo"

step "pytest $* (${#deselect[@]} deselected: ci/aarch64-deselect.txt; MariaDB at $mariadb_address)"
status=0
in_root /bin/sh -c 'cd /src && exec "$@"' sh "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    --junitxml=/src/aarch64.xml "${deselect[@]}" "$@" || status=$?
python3 -m ci.results record --name aarch64 --junit "$root/src/aarch64.xml" \
    --python "$(in_root "$venv/bin/python" -c 'import platform; print(platform.python_version())')" \
    --machine "$(in_root uname -m)" --note "Debian 12 arm64 root under qemu-user" \
    --deselect ci/aarch64-deselect.txt || status=1
step "done (pytest exit status $status)"
exit $status
