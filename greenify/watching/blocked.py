"""Which native call a thread is blocked in, read from /proc without a debugger.

For one thread of a process (this one or another), ``blocked_call(pid, tid)``
reads:

* ``/proc/PID/task/TID/syscall``: the system call the thread sleeps in, its
  arguments, its stack and instruction pointers.  The call maps to the libc
  functions greenify knows (csrc/wait/green.h's lists, through greenify.functions)
  by the table below, one row per architecture;
* the thread's stack, from ``/proc/PID/mem`` (a bad address is an error
  there, never a crash): the first word from the stack pointer up that lies
  in an executable mapping of an object other than libc, ld.so or greenify's
  own _green module, follows a call through a PLT stub or GOT slot, and lies
  in an object that imports one of the functions the system call stands for
  (greenify.patching.elf, the patcher's reader), is the return address into the
  library that made the call, and that import is the symbol; whether the
  object's slot for it points into _green tells if it is patched;
* the descriptor(s) in the arguments (poll's and select's read in memory),
  described from ``/proc/PID/fd`` and, for sockets, getsockname/getpeername
  (this process) or ``/proc/PID/net/{tcp,tcp6,udp,udp6,unix}`` (another).

greenify.watching.monitor (the watch) and ``greenify-inspect --pid N --blocked`` both
read threads through this module.  Reading another process's syscall file and
memory needs ptrace permission on it (same user, or root).
"""
from __future__ import annotations

import bisect
import ctypes
import os
import platform
import re
import socket
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from greenify import functions as _functions
from greenify.patching import elf
from greenify.patching import inventory
from greenify.patching import loaded

# System call number -> the functions of csrc/wait/green.h's lists that issue it
# (glibc's wrappers: recv is recvfrom, poll may be ppoll, sleep is
# clock_nanosleep).  "futex" is no libc function greenify knows: a thread
# waiting there waits for another thread (a lock, a condition).
_X86_64 = {
    0: "read", 1: "write", 7: "poll", 17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev",
    23: "select", 35: "nanosleep", 42: "connect", 43: "accept", 44: "sendto", 45: "recvfrom",
    46: "sendmsg", 47: "recvmsg", 61: "wait4", 72: "fcntl", 73: "flock", 202: "futex", 230: "clock_nanosleep",
    232: "epoll_wait", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288: "accept4", 299: "recvmmsg",
    307: "sendmmsg", 441: "epoll_pwait2",
}
_AARCH64 = {
    22: "epoll_pwait", 25: "fcntl", 32: "flock", 63: "read", 64: "write", 65: "readv", 66: "writev",
    67: "pread64", 68: "pwrite64", 72: "pselect6", 73: "ppoll", 98: "futex", 101: "nanosleep",
    115: "clock_nanosleep", 202: "accept", 203: "connect", 206: "sendto", 207: "recvfrom", 211: "sendmsg",
    212: "recvmsg", 242: "accept4", 243: "recvmmsg", 260: "wait4", 269: "sendmmsg", 441: "epoll_pwait2",
}
SYSCALL_NAMES: Dict[int, str] = {"x86_64": _X86_64, "aarch64": _AARCH64}.get(platform.machine(), {})

# System call -> the plain functions that issue it, most likely first.
_FUNCTIONS_OF_SYSCALL: Dict[str, Tuple[str, ...]] = {
    "read": ("read",), "write": ("write",), "readv": ("readv",), "writev": ("writev",),
    "pread64": ("pread", "pread64"), "pwrite64": ("pwrite", "pwrite64"),
    "poll": ("poll",), "ppoll": ("poll", "ppoll"), "select": ("select",), "pselect6": ("select", "pselect"),
    "epoll_wait": ("epoll_wait",), "epoll_pwait": ("epoll_wait", "epoll_pwait"),
    "epoll_pwait2": ("epoll_wait", "epoll_pwait"),
    "nanosleep": ("nanosleep", "sleep", "usleep"),
    "clock_nanosleep": ("nanosleep", "sleep", "usleep", "clock_nanosleep"),
    "connect": ("connect",), "accept": ("accept",), "accept4": ("accept", "accept4"),
    "sendto": ("send", "sendto"), "recvfrom": ("recv", "recvfrom"), "sendmsg": ("sendmsg",),
    "recvmsg": ("recvmsg",), "recvmmsg": ("recvmmsg",), "sendmmsg": ("sendmmsg",),
    "wait4": ("waitpid", "wait"), "fcntl": ("fcntl", "lockf"), "flock": ("flock",),
}
# A resolver (getaddrinfo, ...) waits in libc on these: when the caller
# imports none of the direct functions, it called one of the resolver's.
_RESOLVER_SYSCALLS = frozenset({"poll", "ppoll", "sendto", "recvfrom", "connect", "sendmmsg", "recvmsg"})

_ROWS = {row.name: row for row in _functions.GREEN_FUNCTIONS}
_RESOLVER_FUNCTIONS = tuple(sorted(_functions.blocking_calls("resolver")))
# Where the descriptor is, by system call: the argument index (poll-likes and select-likes are read in memory).
_FD_ARGUMENT = {name: 0 for name in ("read", "write", "readv", "writev", "pread64", "pwrite64", "connect", "accept",
                                     "accept4", "sendto", "recvfrom", "sendmsg", "recvmsg", "recvmmsg", "sendmmsg",
                                     "fcntl", "flock", "epoll_wait", "epoll_pwait", "epoll_pwait2")}

STACK_SCAN_BYTES = 32 * 1024   # how far above the stack pointer the caller is looked for
MAX_DESCRIBED_FDS = 8          # a poll on many descriptors lists the first ones


def functions_of(syscall: str) -> Tuple[str, ...]:
    """The functions of greenify's lists that issue ``syscall``, plain names."""
    return tuple(name for name in _FUNCTIONS_OF_SYSCALL.get(syscall, ()) if name in _ROWS)


def has_twin(function: str) -> bool:
    row = _ROWS.get(function)
    return row is not None and row.twin is not None


# ------------------------------------------------------------- the thread

@dataclass(frozen=True)
class ThreadSyscall:
    """One line of /proc/PID/task/TID/syscall."""

    number: Optional[int]           # None: running (or the kernel did not say)
    arguments: Tuple[int, ...] = ()
    stack_pointer: int = 0
    instruction_pointer: int = 0

    @property
    def name(self) -> Optional[str]:
        return None if self.number is None or self.number < 0 else SYSCALL_NAMES.get(self.number)


def read_syscall(pid: int, tid: int) -> ThreadSyscall:
    """What /proc says thread ``tid`` of ``pid`` is doing.  Raises OSError
    (PermissionError without ptrace permission, FileNotFoundError once gone)."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as file:
        fields = file.read().split()
    if not fields or fields[0] == "running":
        return ThreadSyscall(None)
    values = [int(value, 0) for value in fields]
    if values[0] == -1 or len(values) < 9:  # blocked outside a system call: only sp and pc are known
        return ThreadSyscall(-1, (), *values[1:3]) if len(values) >= 3 else ThreadSyscall(-1)
    return ThreadSyscall(values[0], tuple(values[1:7]), values[7], values[8])


@dataclass(frozen=True)
class Mapping:
    """A line of /proc/PID/maps."""

    start: int
    end: int
    permissions: str
    offset: int
    path: str

    @property
    def executable(self) -> bool:
        return "x" in self.permissions


def read_maps(pid: int) -> List[Mapping]:
    mappings = []
    with open(f"/proc/{pid}/maps") as file:
        for line in file:
            fields = line.split(maxsplit=5)
            if len(fields) < 5:
                continue
            start, end = (int(value, 16) for value in fields[0].split("-"))
            path = fields[5].strip().removesuffix(" (deleted)") if len(fields) == 6 else ""
            mappings.append(Mapping(start, end, fields[1], int(fields[2], 16), path))
    return mappings


class ProcessMemory:
    """Reads another (or this) process's memory through /proc/PID/mem: an
    address that is not mapped reads as None, never as a crash."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read(self, address: int, size: int) -> Optional[bytes]:
        try:
            data = os.pread(self.fd, size, address)
        except (OSError, OverflowError):
            return None
        return data if len(data) == size else None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------- the calling object

# libc, ld.so and glibc's other parts (loaded's list): the wrapper frames the scan goes past.
_LIBC_NAMES = re.compile(r"^(libc\.so|libc-|libc\.musl|ld-musl|ld-linux|ld64\.so|ld-[0-9.]*\.so)")


@lru_cache(maxsize=None)
def _is_libc_part(path: str) -> bool:
    name = os.path.basename(path)
    return bool(_LIBC_NAMES.match(name) or loaded._GLIBC_PARTS.match(name))


@lru_cache(maxsize=None)
def _green_module() -> str:
    return loaded._green_module_path()


# What a call into another object looks like: x86-64 PLT stubs begin with
# jmp *GOT(%rip), after endbr64 and/or bnd where the build has them; an
# aarch64 PLT stub begins with adrp x16.
_X86_64_PLT_STARTS = (b"\xff\x25", b"\xf2\xff\x25", b"\xf3\x0f\x1e\xfa\xff\x25", b"\xf3\x0f\x1e\xfa\xf2\xff\x25")
CALL_TO_IMPORT, OTHER_CALL = "import", "other"


def _call_before(memory: ProcessMemory, address: int) -> Optional[str]:
    """Whether the instruction before ``address`` is a call (so ``address``
    is a return address, not a stale word): CALL_TO_IMPORT when it goes
    through a PLT stub or a GOT slot, as a call into libc does, OTHER_CALL
    for any other call, None for no call."""
    if platform.machine() == "aarch64":
        code = memory.read(address - 4, 4)
        if code is None:
            return None
        insn = struct.unpack("<I", code)[0]
        if (insn & 0xFFFFFC1F) == 0xD63F0000:  # blr
            return OTHER_CALL
        if (insn & 0xFC000000) != 0x94000000:  # bl
            return None
        offset = (insn & 0x03FFFFFF) << 2
        target = address - 4 + (offset - (1 << 28) if offset & (1 << 27) else offset)
        stub = memory.read(target, 4)
        is_stub = stub is not None and (struct.unpack("<I", stub)[0] & 0x9F00001F) == 0x90000010
        return CALL_TO_IMPORT if is_stub else OTHER_CALL
    code = memory.read(address - 7, 7)
    if code is None:
        return None
    if code[1:3] == b"\xff\x15":  # call *sym@GOTPCREL(%rip): -fno-plt
        return CALL_TO_IMPORT
    if code[2] == 0xE8:
        target = address + struct.unpack("<i", code[3:7])[0]
        stub = memory.read(target, 8)
        return CALL_TO_IMPORT if stub is not None and stub.startswith(_X86_64_PLT_STARTS) else OTHER_CALL
    return OTHER_CALL if _x86_64_call_ends(code) else None


def _x86_64_call_ends(code: bytes) -> bool:
    """Whether the 7 bytes ``code`` end with a call: e8 rel32, or
    [REX] ff /2 with its ModRM, SIB and displacement."""
    if code[2] == 0xE8:
        return True
    for length in range(2, 8):
        insn = code[7 - length:]
        at = 1 if 0x40 <= insn[0] <= 0x4F else 0
        if at + 2 > length or insn[at] != 0xFF or (insn[at + 1] >> 3) & 7 != 2:
            continue
        mod, rm = insn[at + 1] >> 6, insn[at + 1] & 7
        size = at + 2
        if mod != 3:
            if rm == 4:
                if at + 2 >= length:
                    continue
                size += 1 + (4 if mod == 0 and insn[at + 2] & 7 == 5 else 0)
            elif mod == 0 and rm == 5:
                size += 4  # rip-relative: call *sym@GOTPCREL(%rip), as -fno-plt builds call
            size += {1: 1, 2: 4}.get(mod, 0)
        if size == length:
            return True
    return False


@dataclass(frozen=True)
class Caller:
    """The object that called into libc: its file, and where in it."""

    path: str
    return_address: int
    file_offset: int          # of the return address in the file: addr2line -e path

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def find_caller(memory: ProcessMemory, maps: Sequence[Mapping], stack_pointer: int,
                confirms: Callable[[str], bool] = lambda path: True) -> Optional[Caller]:
    """The object that called into libc: going up from ``stack_pointer``, the
    first return address into an object other than libc's parts after a call
    through a PLT stub or GOT slot, where ``confirms(path)`` (it imports the
    function); failing that, the first return address after any call.
    Stale words (a deeper call's leftovers in a frame's padding) rarely pass both."""
    stack = next((m for m in maps if m.start <= stack_pointer < m.end), None)
    if stack is None:
        return None
    size = min(STACK_SCAN_BYTES, stack.end - stack_pointer) & ~7
    words = memory.read(stack_pointer, size)
    if words is None:
        return None
    executable = sorted((m for m in maps if m.executable and m.path.startswith("/")), key=lambda m: m.start)
    starts = [m.start for m in executable]
    fallback: Optional[Caller] = None
    for (word,) in struct.iter_unpack("<Q", words):
        index = bisect.bisect_right(starts, word) - 1
        mapping = executable[index] if index >= 0 and word < executable[index].end else None
        if mapping is None or _is_libc_part(mapping.path):
            continue
        kind = _call_before(memory, word)
        if kind is None:
            continue
        if os.path.realpath(mapping.path) == _green_module():
            continue  # a green twin between the caller and libc: BlockedCall.patched tells
        caller = Caller(mapping.path, word, word - mapping.start + mapping.offset)
        if kind == CALL_TO_IMPORT and confirms(mapping.path):
            return caller
        fallback = fallback or caller
    return fallback


@lru_cache(maxsize=256)
def _elf_imports(path: str) -> Optional[elf.ElfImports]:
    try:
        return elf.read_blocking_imports(path)
    except Exception:  # noqa: BLE001 - any unreadable file: the report says so
        return None


_PLAIN = {row.name: row.fortified_of or row.name for row in _functions.GREEN_FUNCTIONS}


def _imports_of(path: str) -> Optional[FrozenSet[str]]:
    """The blocking functions the file at ``path`` imports (fortified forms
    as their plain function); None when it cannot be read (static, gone)."""
    imports = _elf_imports(path)
    return None if imports is None else frozenset(_PLAIN.get(imp.symbol, imp.symbol) for imp in imports.imports)


def _slot_is_green(memory: ProcessMemory, maps: Sequence[Mapping], path: str, symbol: str) -> bool:
    """Whether ``path``'s import slot(s) of ``symbol`` point into greenify's
    _green module in that process: the library is patched for it."""
    imports = _elf_imports(path)
    green = [m for m in maps if m.executable and os.path.realpath(m.path) == _green_module()] if imports else []
    if not green:
        return False
    base = 0 if imports.e_type == "ET_EXEC" else min(m.start - m.offset for m in maps if m.path == path)
    for imp in imports.imports:
        if _PLAIN.get(imp.symbol, imp.symbol) == symbol:
            value = memory.read(base + imp.r_offset, 8)
            target = struct.unpack("<Q", value)[0] if value else 0
            if any(m.start <= target < m.end for m in green):
                return True
    return False


# ------------------------------------------------------------ descriptors

def _socket_table(pid: int, inodes: FrozenSet[str]) -> Dict[str, str]:
    """socket inode -> description, for ``inodes``, from /proc/PID/net (a
    busy host lists thousands: only the wanted lines are decoded)."""
    table: Dict[str, str] = {}
    states = {"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "0A": "LISTEN"}
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{protocol}") as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes:
                continue
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            kind = protocol.rstrip("6").upper()
            text = f"{kind} {_address(local)} -> {_address(remote)}"
            if kind == "TCP":
                text += f", {states.get(state, state).lower().replace('_', '-')}"
            table[inode] = text
    try:
        with open(f"/proc/{pid}/net/unix") as file:
            for line in file.read().splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 7 and fields[6] in inodes:
                    table[fields[6]] = "unix socket" + (f" {fields[7]}" if len(fields) > 7 else "")
    except OSError:
        pass
    return table


def _address(text: str) -> str:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return _inet_text(socket.AF_INET, raw[::-1], int(port, 16))
    return _inet_text(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)), int(port, 16))


def _inet_text(family: int, packed: bytes, port: int) -> str:
    address = socket.inet_ntop(family, packed)
    return f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"


_libc = None


def _own_socket(fd: int) -> Optional[str]:
    """A socket of this process, described by getsockname/getpeername on the
    descriptor itself: no socket object is made (one would change the shared
    O_NONBLOCK flag under a default timeout or gevent) and /proc/net, which a
    busy host makes long, is not read.  None if it is no inet or unix socket."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(128)
    length = ctypes.c_uint32(128)

    def sockaddr(call: Any) -> Optional[Tuple[int, bytes]]:
        length.value = 128
        if call(fd, buffer, ctypes.byref(length)) != 0:
            return None
        raw = buffer.raw[:length.value]
        return struct.unpack("=H", raw[:2])[0], raw

    def text(address: Optional[Tuple[int, bytes]]) -> str:
        if address is None:
            return "?"
        family, raw = address
        if family == socket.AF_INET:
            return _inet_text(family, raw[4:8], struct.unpack(">H", raw[2:4])[0])
        if family == socket.AF_INET6:
            return _inet_text(family, raw[8:24], struct.unpack(">H", raw[2:4])[0])
        path = raw[2:].split(b"\0", 1)[0] if raw[2:3] != b"\0" else b"@" + raw[3:]
        return os.fsdecode(path) or "unnamed"

    local = sockaddr(_libc.getsockname)
    if local is None or local[0] not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    kind_value = ctypes.c_int(0)
    kind_length = ctypes.c_uint32(4)
    _libc.getsockopt(fd, socket.SOL_SOCKET, socket.SO_TYPE, ctypes.byref(kind_value), ctypes.byref(kind_length))
    peer = sockaddr(_libc.getpeername)
    if local[0] == socket.AF_UNIX:
        name = text(peer) if peer and text(peer) != "unnamed" else text(local)
        return "unix socket" + ("" if name == "unnamed" else f" {name}")
    kind = "TCP" if kind_value.value == socket.SOCK_STREAM else "UDP"
    return f"{kind} {text(local)} -> {text(peer) if peer else 'not connected'}"


def describe_descriptor(pid: int, fd: int, sockets: Optional[Dict[str, str]] = None) -> str:
    """What descriptor ``fd`` of ``pid`` is: a TCP connection with both ends,
    a unix socket, a pipe, a file."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "closed"
    if target.startswith("socket:["):
        inode = target[len("socket:["):-1]
        if pid == os.getpid():
            own = _own_socket(fd)
            if own is not None:
                return own
        table = sockets if sockets is not None else _socket_table(pid, frozenset({inode}))
        return table.get(inode, f"socket (inode {inode})")
    if target.startswith("pipe:"):
        return "pipe"
    if target == "anon_inode:[eventpoll]":
        watched = _epoll_targets(pid, fd)
        if not watched:
            return "epoll, watching nothing"
        return "epoll of " + ", ".join(f"fd {target_fd} ({describe_descriptor(pid, target_fd, sockets)})"
                                       if target_fd != fd else f"fd {target_fd}" for target_fd in watched)
    if target.startswith("anon_inode:"):
        return target[len("anon_inode:"):].strip("[]")
    return f"file {target}"


def _epoll_targets(pid: int, fd: int) -> List[int]:
    """The descriptors epoll instance ``fd`` watches (its fdinfo's tfd lines), the first few."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    return [int(line.split()[1]) for line in lines if line.startswith("tfd:")][:MAX_DESCRIBED_FDS // 2]


def _descriptors(memory: ProcessMemory, syscall: ThreadSyscall) -> List[int]:
    name, args = syscall.name, syscall.arguments
    if name in _FD_ARGUMENT:
        return [int(args[_FD_ARGUMENT[name]]) & 0xFFFFFFFF]
    if name in ("poll", "ppoll"):
        count = min(args[1], MAX_DESCRIBED_FDS)
        data = memory.read(args[0], 8 * count) if count else None
        if data is None:
            return []
        return [fd for fd, _events, _revents in struct.iter_unpack("<ihh", data) if fd >= 0]
    if name in ("select", "pselect6"):
        nfds = min(args[0], 1024)
        found: List[int] = []
        for pointer in args[1:3]:
            bits = memory.read(pointer, (nfds + 7) // 8) if pointer and nfds else None
            found += [fd for fd in range(nfds) if bits and bits[fd // 8] >> (fd % 8) & 1 and fd not in found]
        return found[:MAX_DESCRIBED_FDS]
    return []


# ---------------------------------------------------------------- the call

@dataclass(frozen=True)
class BlockedCall:
    """The native call a thread sleeps in, as far as /proc tells."""

    pid: int
    tid: int
    syscall: str                         # the system call, e.g. "recvfrom"
    functions: Tuple[str, ...]           # the libc functions that issue it (greenify's names)
    symbol: Optional[str]                # the one the caller imports (None: not confirmed)
    caller: Optional[Caller]
    descriptors: Tuple[Tuple[int, str], ...] = field(default=())
    patched: bool = False                # the caller's slot for the symbol points at a green twin

    @property
    def library(self) -> str:
        """The calling object's file name, or "?" when the stack scan found none."""
        return self.caller.name if self.caller else "?"

    @property
    def function(self) -> str:
        """The symbol, else the system call's most likely function."""
        return self.symbol or (self.functions[0] if self.functions else self.syscall)

    @property
    def has_twin(self) -> bool:
        return has_twin(self.function)

    @property
    def waits_for_thread(self) -> bool:
        return self.syscall == "futex"

    @property
    def waits_for_interpreter(self) -> bool:
        """A futex wait of the interpreter's own: the GIL or a Python lock,
        which Python-level tools (gevent's monitor) explain better."""
        return self.waits_for_thread and (self.caller is None or self._is_interpreter())

    def _is_interpreter(self) -> bool:
        obj = loaded.LoadedObject(self.caller.path, 0, (), None, is_main_program=self._is_main_program())
        return obj.is_main_program or obj.name.startswith("libpython")

    def fix(self) -> str:
        """The patch_library call that would make it cooperative, or why greenify cannot help."""
        if self.waits_for_thread:
            return ("it waits for another thread (a lock or condition, futex): if the library does its I/O in "
                    "threads of its own, greenify cannot make it cooperative; run the call in gevent's threadpool")
        if self.caller is None:
            return "no calling library found on the stack (a static binary, or JIT code): greenify cannot patch it"
        if self.patched:
            return (f"{self.library} is patched but its green twin of {self.function} blocked natively: the call "
                    "was made where no hub could take the wait (greenify.greenify() not called, or the hub "
                    "greenlet itself)")
        if _imports_of(self.caller.path) is None:
            return f"{self.library} cannot be read as a dynamic ELF object (static?): greenify cannot patch it"
        obj = loaded.LoadedObject(self.caller.path, 0, (), None, is_main_program=self._is_main_program())
        protected = loaded.protected_reason(obj)
        # greenify-inspect's runtime folders: the interpreter's (lib-dynload) and the event loop's own modules
        runtime = inventory._RUNTIME_FOLDERS.intersection(os.path.dirname(self.caller.path).split(os.sep))
        if protected is not None or "lib-dynload" in runtime:
            why = protected or "Python's own extension module"
            return (f"a call of the interpreter's own ({self.library}: {why}): under gevent, call "
                    "gevent.monkey.patch_all() first or use gevent's API (gevent.sleep, gevent.socket, "
                    "gevent.subprocess)")
        if runtime:
            return f"none needed: the event loop's own wait in {self.library} (an idle hub waits here)"
        if not self.has_twin:
            return (f"greenify has no green twin for {self.function}: run the call in gevent's threadpool "
                    "(gevent.get_hub().threadpool.apply(...))")
        return f'greenify.patch_library("{_patch_name(self.caller.path)}")'

    def _is_main_program(self) -> bool:
        try:
            return os.path.realpath(f"/proc/{self.pid}/exe") == os.path.realpath(self.caller.path)
        except OSError:
            return False

    def describe(self) -> str:
        """One line: ``libmariadb.so.3: poll on fd 5 (TCP ... -> 127.0.0.1:3306)``."""
        text = f"{self.library}: {self.function}"
        if self.symbol is None and self.functions:
            text += f" (system call {self.syscall}; {self.library} imports none of {', '.join(self.functions)})"
        if self.descriptors:
            text += " on " + "; ".join(f"fd {fd}: {what}" for fd, what in self.descriptors)
        return text

    def to_dict(self) -> Dict[str, object]:
        return {"pid": self.pid, "tid": self.tid, "syscall": self.syscall, "function": self.function,
                "symbol": self.symbol, "library": self.library,
                "library_path": self.caller.path if self.caller else None,
                "caller_offset": self.caller.file_offset if self.caller else None,
                "descriptors": [{"fd": fd, "description": what} for fd, what in self.descriptors],
                "green_twin": self.has_twin, "patched": self.patched, "fix": self.fix()}


@lru_cache(maxsize=256)
def _patch_name(path: str) -> str:
    try:
        soname = elf.read_blocking_imports(path, symbols=()).soname
    except Exception:  # noqa: BLE001
        soname = None
    return soname or os.path.basename(path)


def _symbol_in(path: str, syscall: str, functions: Tuple[str, ...]) -> Optional[str]:
    """Which of ``functions`` (else, for a resolver's system call, which
    resolver function) the object at ``path`` imports."""
    imported = _imports_of(path) or frozenset()
    for function in functions:
        if function in imported:
            return function
    if syscall in _RESOLVER_SYSCALLS:
        return next((function for function in _RESOLVER_FUNCTIONS if function in imported), None)
    return None


def _symbol(caller: Optional[Caller], syscall: str, functions: Tuple[str, ...]) -> Optional[str]:
    return None if caller is None else _symbol_in(caller.path, syscall, functions)


def _socket_inodes(pid: int, fds: Sequence[int]) -> FrozenSet[str]:
    """The socket inodes of ``fds`` and of what the epoll instances among them watch."""
    inodes = set()
    pending = list(fds)
    while pending:
        fd = pending.pop()
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
        elif target == "anon_inode:[eventpoll]" and fd in fds:
            pending += _epoll_targets(pid, fd)
    return frozenset(inodes)


def blocked_call(pid: int, tid: int, syscall: Optional[ThreadSyscall] = None) -> Optional[BlockedCall]:
    """The call thread ``tid`` of ``pid`` is blocked in, or None when it runs
    or sleeps in a system call that is none of greenify's functions' (nor a
    futex).  Raises OSError when /proc cannot be read (permission, gone)."""
    syscall = read_syscall(pid, tid) if syscall is None else syscall
    name = syscall.name
    if name is None:
        return None
    functions = functions_of(name)
    if not functions and name != "futex":
        return None
    with ProcessMemory(pid) as memory:
        maps = read_maps(pid)
        caller = find_caller(memory, maps, syscall.stack_pointer,
                             lambda path: _symbol_in(path, name, functions) is not None)
        fds = _descriptors(memory, syscall)
        symbol = _symbol(caller, name, functions)
        patched = caller is not None and symbol is not None and _slot_is_green(memory, maps, caller.path, symbol)
    sockets = {} if pid == os.getpid() or not fds else _socket_table(pid, _socket_inodes(pid, fds))
    descriptors = tuple((fd, describe_descriptor(pid, fd, sockets)) for fd in fds)
    return BlockedCall(pid, tid, name, functions, symbol, caller, descriptors, patched)


def blocked_threads(pid: int) -> List[Tuple[int, str, Optional[BlockedCall]]]:
    """Every thread of ``pid``: (tid, its name, the call it is blocked in or None)."""
    threads = []
    for entry in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        tid = int(entry)
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as file:
                name = file.read().strip()
            threads.append((tid, name, blocked_call(pid, tid)))
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return threads


def render_blocked(pid: int, threads: Sequence[Tuple[int, str, Optional[BlockedCall]]]) -> List[str]:
    """greenify-inspect --blocked's text."""
    lines = [f"pid {pid}: {len(threads)} thread{'s' if len(threads) != 1 else ''}"]
    for tid, name, call in threads:
        if call is None:
            lines.append(f"  thread {tid} ({name}): not blocked in a call greenify knows")
            continue
        lines.append(f"  thread {tid} ({name}): {call.describe()}")
        if call.caller:
            lines.append(f"    called from {call.caller.path}+{call.caller.file_offset:#x}")
        lines.append(f"    fix: {call.fix()}")
    return lines


def pid_report(pid: int) -> Tuple[Dict[str, object], List[str]]:
    """greenify-inspect --pid N --blocked: the JSON document and the text.
    Raises GreenifyError naming the process when /proc cannot be read."""
    from greenify.errors import GreenifyError

    try:
        threads = blocked_threads(pid)
    except FileNotFoundError:
        raise GreenifyError(f"--pid {pid}: no process with that id", str(pid)) from None
    except PermissionError:
        raise GreenifyError(f"--pid {pid}: cannot read its threads' system calls and memory: permission denied "
                            "(needs ptrace permission: its user, or root)", str(pid)) from None
    document = {"mode": "blocked", "pid": pid,
                "threads": [{"tid": tid, "name": name, "blocked": call.to_dict() if call else None}
                            for tid, name, call in threads]}
    return document, render_blocked(pid, threads)
