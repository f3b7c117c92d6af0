#!/usr/bin/env bash
# Makes the kernel run arm64 ELF files with qemu-aarch64-static (binfmt_misc),
# so that debootstrap's second stage and `chroot ROOT` work.  The handler must
# have the F flag (the kernel opens the interpreter when it is registered),
# so no copy of qemu is needed inside the root.  Fails with the reason when
# binfmt_misc cannot be used (e.g. an unprivileged container).
set -euo pipefail
bm=/proc/sys/fs/binfmt_misc
if [ ! -e "$bm/register" ]; then
    mount -t binfmt_misc binfmt_misc "$bm" || {
        echo "aarch64: cannot mount binfmt_misc on $bm (needs root in a privileged machine)" >&2
        exit 1
    }
fi
if ! grep -qx enabled "$bm/qemu-aarch64" 2>/dev/null; then
    command -v update-binfmts >/dev/null || {
        echo "aarch64: update-binfmts missing: apt-get install binfmt-support qemu-user-static" >&2
        exit 1
    }
    update-binfmts --enable qemu-aarch64
fi
grep -q '^flags: .*F' "$bm/qemu-aarch64" || {
    echo "aarch64: the qemu-aarch64 binfmt handler lacks the F flag; see $bm/qemu-aarch64" >&2
    exit 1
}
