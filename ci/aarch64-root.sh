#!/usr/bin/env bash
# Prepares an arm64 Debian 12 root for `make test-aarch64`, once: debootstrap
# from Debian's archive, run under qemu-user through binfmt_misc.  The root
# is complete when $ROOT/.greenify-ready exists; a half-made root (an
# interrupted run) is removed and made again.
#
# usage: ci/aarch64-root.sh ROOT
set -euo pipefail
root=${1:?usage: $0 ROOT}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)

[ -e "$root/.greenify-ready" ] && exit 0
"$here/aarch64-binfmt.sh"

# Debian's packages inside the root: a compiler and Python headers to build
# greenify and mysqlclient, libmariadb for MySQLdb.
include=python3,python3-venv,python3-dev,python3-pip,gcc,libc6-dev,pkg-config,libmariadb-dev,libmariadb-dev-compat,ca-certificates
# never remove through a bind mount left by an interrupted test-aarch64
root=$(realpath -m "$root")
if grep -q " $root/" /proc/mounts; then
    echo "aarch64-root: file systems are still mounted under $root; unmount them first:" >&2
    grep " $root/" /proc/mounts >&2
    exit 1
fi
rm -rf --one-file-system "$root"
mkdir -p "$(dirname "$root")"
echo "aarch64-root: debootstrap bookworm arm64 into $root"
debootstrap --arch=arm64 --variant=minbase --include="$include" \
    bookworm "$root" "$mirror"
touch "$root/.greenify-ready"
