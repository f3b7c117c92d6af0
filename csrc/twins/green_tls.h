/*
 * Twins for TLS libraries that do a client library's socket I/O
 * (greenify/patching/companions.py): libcrypto's socket BIO reads and writes the
 * descriptor libmariadb hands it.  Such a TLS library is shared with other
 * users (Python's ssl module links the same libcrypto), so its twins go
 * green only on the descriptors of greenified client libraries: those a
 * patched library connected (green_connect notes them, green_close and
 * green_tls_close forget them).  On any other descriptor they are libc's
 * call itself.
 */
#ifndef GREENIFY_GREEN_TLS_H
#define GREENIFY_GREEN_TLS_H

#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "green.h"

/* The calls a TLS library gets a twin for, X(name): green_tls_<name> has
   libc's signature.  The one list: csrc/twins/green_functions.c exports it to
   Python (greenify/functions.py's tls_twins()). */
#define GREEN_TLS_TWINS(X)                                                                                    \
    X(read) X(write) X(readv) X(writev) X(recv) X(recvfrom) X(recvmsg) X(send) X(sendto) X(sendmsg) X(close)

ssize_t green_tls_read(int fd, void *buf, size_t count);
ssize_t green_tls_write(int fd, const void *buf, size_t count);
ssize_t green_tls_readv(int fd, const struct iovec *iov, int iovcnt);
ssize_t green_tls_writev(int fd, const struct iovec *iov, int iovcnt);
ssize_t green_tls_recv(int fd, void *buf, size_t len, int flags);
ssize_t green_tls_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *addrlen);
ssize_t green_tls_recvmsg(int fd, struct msghdr *msg, int flags);
ssize_t green_tls_send(int fd, const void *buf, size_t len, int flags);
ssize_t green_tls_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
                         socklen_t addrlen);
ssize_t green_tls_sendmsg(int fd, const struct msghdr *msg, int flags);
int green_tls_close(int fd);

#endif
