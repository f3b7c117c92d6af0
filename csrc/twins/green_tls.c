/*
 * Twins for TLS libraries (green_tls.h): the green twin on a client
 * library's descriptor (green_clients.c), libc's call on every other one.
 */
#include <unistd.h>

#include "green_clients.h"
#include "green_tls.h"
#include "green_twins.h"


ssize_t green_tls_read(int fd, void *buf, size_t count)
{
    return green_tls_is_client(fd) ? green_read(fd, buf, count) : read(fd, buf, count);
}

ssize_t green_tls_write(int fd, const void *buf, size_t count)
{
    return green_tls_is_client(fd) ? green_write(fd, buf, count) : write(fd, buf, count);
}

ssize_t green_tls_readv(int fd, const struct iovec *iov, int iovcnt)
{
    return green_tls_is_client(fd) ? green_readv(fd, iov, iovcnt) : readv(fd, iov, iovcnt);
}

ssize_t green_tls_writev(int fd, const struct iovec *iov, int iovcnt)
{
    return green_tls_is_client(fd) ? green_writev(fd, iov, iovcnt) : writev(fd, iov, iovcnt);
}

ssize_t green_tls_recv(int fd, void *buf, size_t len, int flags)
{
    return green_tls_is_client(fd) ? green_recv(fd, buf, len, flags) : recv(fd, buf, len, flags);
}

ssize_t green_tls_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *addrlen)
{
    return green_tls_is_client(fd) ? green_recvfrom(fd, buf, len, flags, addr, addrlen)
                                   : recvfrom(fd, buf, len, flags, addr, addrlen);
}

ssize_t green_tls_recvmsg(int fd, struct msghdr *msg, int flags)
{
    return green_tls_is_client(fd) ? green_recvmsg(fd, msg, flags) : recvmsg(fd, msg, flags);
}

ssize_t green_tls_send(int fd, const void *buf, size_t len, int flags)
{
    return green_tls_is_client(fd) ? green_send(fd, buf, len, flags) : send(fd, buf, len, flags);
}

ssize_t green_tls_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
                         socklen_t addrlen)
{
    return green_tls_is_client(fd) ? green_sendto(fd, buf, len, flags, addr, addrlen)
                                   : sendto(fd, buf, len, flags, addr, addrlen);
}

ssize_t green_tls_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    return green_tls_is_client(fd) ? green_sendmsg(fd, msg, flags) : sendmsg(fd, msg, flags);
}

int green_tls_close(int fd)
{
    if (!green_tls_is_client(fd))
        return close(fd);
    return green_close(fd); /* forgets it */
}
