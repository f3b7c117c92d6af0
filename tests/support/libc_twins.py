"""libc's calls and their green twins through one cffi instance, so that both
sides take the very same buffers, structures and pointers.

`call(side, name, *args)` returns (result, errno) for libc's `name`
(side "libc") or for `green_name` (side "green"); both release the GIL, as
drivers do around their network calls.  Used by the regression tests of
libc's edge cases and by the differential test.
"""
from __future__ import annotations

import platform
import weakref
from typing import Tuple

from cffi import FFI

import greenify._green as green_module

ffi = FFI()
ffi.cdef("""
typedef unsigned int socklen_t;
typedef unsigned long nfds_t;
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; socklen_t msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct pollfd { int fd; short events; short revents; };
struct timeval { long tv_sec; long tv_usec; };
struct timespec { long tv_sec; long tv_nsec; };
typedef struct { unsigned long fds_bits[16]; } fd_set;
""")
# x86-64's struct epoll_event is packed (12 bytes); aarch64's is not
ffi.cdef("struct epoll_event { uint32_t events; uint64_t data; };", packed=platform.machine() == "x86_64")

SIGNATURES = {
    "accept": "int {}(int, void *, socklen_t *)",
    "accept4": "int {}(int, void *, socklen_t *, int)",
    "connect": "int {}(int, void *, socklen_t)",
    "recv": "ssize_t {}(int, void *, size_t, int)",
    "recvfrom": "ssize_t {}(int, void *, size_t, int, void *, socklen_t *)",
    "recvmsg": "ssize_t {}(int, struct msghdr *, int)",
    "send": "ssize_t {}(int, void *, size_t, int)",
    "sendto": "ssize_t {}(int, void *, size_t, int, void *, socklen_t)",
    "sendmsg": "ssize_t {}(int, struct msghdr *, int)",
    "read": "ssize_t {}(int, void *, size_t)",
    "write": "ssize_t {}(int, void *, size_t)",
    "readv": "ssize_t {}(int, struct iovec *, int)",
    "writev": "ssize_t {}(int, struct iovec *, int)",
    "__read_chk": "ssize_t {}(int, void *, size_t, size_t)",
    "__recv_chk": "ssize_t {}(int, void *, size_t, size_t, int)",
    "__recvfrom_chk": "ssize_t {}(int, void *, size_t, size_t, int, void *, socklen_t *)",
    "poll": "int {}(struct pollfd *, nfds_t, int)",
    "ppoll": "int {}(struct pollfd *, nfds_t, struct timespec *, void *)",
    "select": "int {}(int, fd_set *, fd_set *, fd_set *, struct timeval *)",
    "pselect": "int {}(int, fd_set *, fd_set *, fd_set *, struct timespec *, void *)",
    "epoll_wait": "int {}(int, struct epoll_event *, int, int)",
    "epoll_pwait": "int {}(int, struct epoll_event *, int, int, void *)",
    "nanosleep": "int {}(struct timespec *, struct timespec *)",
    "clock_nanosleep": "int {}(int, int, struct timespec *, struct timespec *)",
    "usleep": "int {}(unsigned int)",
    "sleep": "unsigned int {}(unsigned int)",
    "__poll_chk": "int {}(struct pollfd *, nfds_t, int, size_t)",
    "__ppoll_chk": "int {}(struct pollfd *, nfds_t, struct timespec *, void *, size_t)",
    "close": "int {}(int)",
}
ffi.cdef("\n".join(signature.format(name) + ";" for name, signature in SIGNATURES.items()))
ffi.cdef("\n".join(signature.format("green_" + name) + ";" for name, signature in SIGNATURES.items()))

_libc = ffi.dlopen(None)
_green = ffi.dlopen(green_module.__file__)

# Pointers the kernel refuses: one in no mapping at all, one past the user
# address space.
BAD_POINTER = ffi.cast("void *", 8)
KERNEL_POINTER = ffi.cast("void *", 0xFFFF800000000000)


def function(side: str, name: str):
    return getattr(_libc, name) if side == "libc" else getattr(_green, "green_" + name)


ERRNO_BEFORE = 4242  # no errno has this value


def call(side: str, name: str, *args) -> Tuple[int, int]:
    """(result, errno) of libc's `name` or of its green twin; errno is 0
    when the call left it as it was.  It is set to a value no call gives
    beforehand, so a call that succeeds but leaves an error of its own
    behind shows it."""
    func = function(side, name)
    ffi.errno = ERRNO_BEFORE
    result = func(*args)
    return result, 0 if ffi.errno == ERRNO_BEFORE else ffi.errno


# A struct that holds a raw address does not keep what it points at alive:
# cffi frees an owning cdata as soon as Python drops it, so in
# `msghdr(iovec(buf(4)), 1)` the buffer and the array would be gone before the
# call reads them.  The builders below record each struct's owners here, and
# they live exactly as long as the struct does.
_owners = weakref.WeakKeyDictionary()


def iovec(*buffers, keep=()):
    """An iovec array over cffi buffers (or (pointer, length) pairs); the
    buffers, and whatever is in `keep` (the owner of a pointer derived from
    it, say), live as long as the array."""
    array = ffi.new("struct iovec[]", max(len(buffers), 1))
    for slot, item in zip(array, buffers):
        pointer, length = item if isinstance(item, tuple) else (item, len(ffi.buffer(item)))
        slot.iov_base = pointer
        slot.iov_len = length
    _owners[array] = (buffers, keep)
    return array


def msghdr(iov=ffi.NULL, iovlen=0, name=ffi.NULL, namelen=0):
    """A msghdr over `iov` and `name`, which live as long as it does."""
    msg = ffi.new("struct msghdr *")
    msg.msg_iov = iov
    msg.msg_iovlen = iovlen
    msg.msg_name = name
    msg.msg_namelen = namelen
    _owners[msg] = (iov, name)
    return msg
