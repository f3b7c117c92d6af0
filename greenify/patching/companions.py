"""The TLS libraries a client library's socket I/O really passes through.

A client library that encrypts its connection may hand its socket to its TLS
library, which then calls ``read``/``write`` (or ``recv``/``sendmsg``) on it
itself: libmariadb calls OpenSSL's ``SSL_set_fd``, and every byte of a TLS
connection then moves inside libcrypto's socket BIO, not inside libmariadb.
Patching the client alone leaves those calls blocking.  Other clients keep
the I/O: libpq and libcurl install BIOs of their own (``BIO_meth_new``) whose
callbacks call ``recv``/``send`` from the client library itself, and
libcurl-gnutls sets its own GnuTLS push/pull functions.

``tls_companions(client, objects)`` finds, among the loaded objects the
client needs (DT_NEEDED, followed transitively), the TLS library that does
the I/O for it, when the client's imports show that it hands its socket over
(a table per TLS stack below).  ``patch_library`` patches those too, with
the twins of ``tls_twins()``, and the PatchReport says why.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, FrozenSet, List, Optional, Sequence

from greenify.patching import loaded
from greenify.patching.imports import also_read, read_object
from greenify.patching.loaded import LoadedObject

log = logging.getLogger("greenify")


@lru_cache(maxsize=None)
def tls_twins() -> Dict[str, int]:
    """symbol -> address of its twin for TLS libraries (csrc/twins/green_tls.h's
    list, read by greenify.functions).  They cover data transfer and close,
    and go green only on a descriptor a patched library connected: the
    library's other users (Python's ssl module shares the system's
    libcrypto) keep libc's calls."""
    from greenify import functions as _functions

    return _functions.tls_twins()


# TLS libraries, by file-name stem (the part before ".so"): OpenSSL (libssl
# drives the protocol, libcrypto's socket BIO reads and writes), GnuTLS, NSS
# (libssl3, over NSPR's libnspr4), wolfSSL, mbed TLS.
TLS_LIBRARY_STEMS: FrozenSet[str] = frozenset({"libssl", "libcrypto", "libgnutls", "libnss3", "libssl3", "libnspr4",
                                               "libwolfssl", "libmbedtls"})
# the hash auditwheel adds to the libraries it bundles: libssl-3a5f0b4e.so.3
_BUNDLED_HASH = re.compile(r"-[0-9a-f]{6,}$")


def library_stem(path_or_name: str) -> str:
    """``libcrypto`` for ``/usr/lib/x86_64-linux-gnu/libcrypto.so.3`` and for
    a bundled ``libcrypto-3a5f0b4e.so.3``."""
    return _BUNDLED_HASH.sub("", os.path.basename(path_or_name).split(".so")[0])


def is_tls_library(path_or_name: str) -> bool:
    return library_stem(path_or_name) in TLS_LIBRARY_STEMS


@dataclass(frozen=True)
class TLSStack:
    """One TLS implementation: the library whose code calls the socket
    functions, the client imports by which a client hands it a socket, and
    the imports by which a client keeps the socket I/O to itself."""

    name: str
    io_library: str   # its file-name stem (library_stem)
    hands_over: FrozenSet[str]
    keeps_io: FrozenSet[str]

    def does_io_in(self, path_or_name: str) -> bool:
        """Whether that file is this stack's I/O library (a bundled copy too)."""
        return library_stem(path_or_name) == self.io_library


TLS_STACKS = (
    # OpenSSL: the socket BIO (BIO_s_socket, in libcrypto) reads and writes.
    # A client with a BIO of its own (BIO_meth_new) and no SSL_set_fd does
    # its own I/O (libpq, libcurl).
    TLSStack("OpenSSL", "libcrypto",
             frozenset({"SSL_set_fd", "SSL_set_rfd", "SSL_set_wfd", "BIO_new_socket", "BIO_new_fd"}),
             frozenset()),
    # GnuTLS: its default transport calls recv/sendmsg on the int it is given,
    # unless the client installs its own push/pull functions.
    TLSStack("GnuTLS", "libgnutls",
             frozenset({"gnutls_transport_set_int", "gnutls_transport_set_int2",
                        "gnutls_transport_set_ptr", "gnutls_transport_set_ptr2"}),
             frozenset({"gnutls_transport_set_push_function", "gnutls_transport_set_vec_push_function",
                        "gnutls_transport_set_pull_function"})),
)
HANDOVER_SYMBOLS: FrozenSet[str] = frozenset().union(*(stack.hands_over | stack.keeps_io for stack in TLS_STACKS))
also_read(HANDOVER_SYMBOLS)


@dataclass(frozen=True)
class Companion:
    """A TLS library that does a client's socket I/O."""

    obj: LoadedObject
    client: LoadedObject
    stack: str
    evidence: str   # the client's import that hands the socket over

    @property
    def reason(self) -> str:
        """e.g. ``TLS I/O of libmariadb.so.3 (it hands its socket to OpenSSL: SSL_set_fd)``."""
        return f"TLS I/O of {self.client.name} (it hands its socket to {self.stack}: {self.evidence})"


def _imported(obj: LoadedObject, symbols: FrozenSet[str]) -> FrozenSet[str]:
    try:
        imports = read_object(obj, symbols)
    except Exception as exc:  # noqa: BLE001 - an unreadable file hands nothing over; the patcher reports it
        log.debug("greenify: cannot read the imports of %s: %s", obj.path, exc)
        return frozenset()
    return frozenset(imp.symbol for imp in imports.imports)


def needed_below(client: LoadedObject, objects: Sequence[LoadedObject]) -> List[LoadedObject]:
    """The loaded objects ``client`` needs, directly or not (DT_NEEDED), in
    breadth-first order, without the client itself."""
    return loaded.needed_closure([client], objects, needed_of=lambda obj: read_object(obj, frozenset()).needed)[1:]


def tls_companions(client: LoadedObject, objects: Optional[Sequence[LoadedObject]] = None) -> List[Companion]:
    """The TLS libraries among ``client``'s loaded dependencies that do its
    socket I/O (see the module docstring); none for a client that keeps its
    I/O to itself or uses no TLS library.  Reads files only: ``objects`` may
    describe another process (greenify-inspect)."""
    imported = _imported(client, HANDOVER_SYMBOLS)
    if not imported:
        return []
    objects = loaded.loaded_objects() if objects is None else objects
    below = needed_below(client, objects)
    companions = []
    for stack in TLS_STACKS:
        handed = sorted(stack.hands_over & imported)
        if not handed or stack.keeps_io & imported:
            continue
        for obj in below:
            if stack.does_io_in(obj.name) and loaded.protected_reason(obj) is None:
                companions.append(Companion(obj, client, stack.name, ", ".join(handed)))
    return companions


def tls_companions_of(clients: Sequence[LoadedObject],
                      objects: Optional[Sequence[LoadedObject]] = None) -> List[Companion]:
    """The companions of the objects in ``clients``, each once (the first
    client that needs it names it); one may be in ``clients`` itself (a
    module target lists every library under the module)."""
    objects = loaded.loaded_objects() if objects is None else objects
    seen: set = set()
    found = []
    for client in clients:
        for companion in tls_companions(client, objects):
            if companion.obj.realpath not in seen:
                seen.add(companion.obj.realpath)
                found.append(companion)
    return found
