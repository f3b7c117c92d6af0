/*
 * Green twins of the socket and file calls: connect, accept, the recv and
 * send families, read/write/readv/writev and glibc's fortified entry points.
 *
 * Sockets: one attempt with MSG_DONTWAIT (no fcntl round trips); on EAGAIN,
 * wait on the hub and retry.  read/write/readv/writev on a socket are the
 * same calls as recv/send/recvmsg/sendmsg, so they take that road too; other
 * files (pipes, ttys, regular files) probe with poll() first.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "green.h"
#include "green_tls.h"


/* The green road is taken only when activated and the caller did not ask
   for a non-blocking call itself. */
#define GOES_NATIVE(flags) (!green_state.active || ((flags) & MSG_DONTWAIT))

/* An interrupted greenlet still inside C fails every call at once. */
#define FAIL_IF_INTERRUPTED()                                                \
    do {                                                                     \
        if (green_interrupted_here()) {                                      \
            errno = GREEN_INTERRUPTED_ERRNO;                                 \
            return -1;                                                       \
        }                                                                    \
    } while (0)

/* ---- one socket call, retried after waits ---- */

/* A socket call that can be attempted again with other flags. */
struct socket_call {
    int function; /* enum green_function, for greenify.stats() */
    int fd;
    int events;
    ssize_t (*attempt)(const struct socket_call *call, int flags);
    void *buf;
    size_t len;
    struct sockaddr *addr;
    socklen_t *addrlen;
    struct msghdr *msg;
    int accept_flags;
};

static ssize_t attempt_recvfrom(const struct socket_call *c, int flags)
{
    return recvfrom(c->fd, c->buf, c->len, flags, c->addr, c->addrlen);
}

static ssize_t attempt_recvmsg(const struct socket_call *c, int flags)
{
    return recvmsg(c->fd, c->msg, flags);
}

static ssize_t attempt_sendmsg(const struct socket_call *c, int flags)
{
    return sendmsg(c->fd, c->msg, flags);
}

/* After a first attempt failed with EAGAIN on a call that may block: wait on
   the hub and retry until it completes, honouring O_NONBLOCK and the socket's
   SO_RCVTIMEO/SO_SNDTIMEO as the kernel would. */
static ssize_t wait_and_retry(const struct socket_call *call, int flags, int saved_errno)
{
    struct green_io_wait io_wait = {{call->function, 0}, 0, GREEN_NO_DEADLINE};
    for (;;) {
        ssize_t n;
        switch (green_wait_io(call->fd, call->events, &io_wait)) {
        case GREEN_WOKEN:
            break;
        case GREEN_NONBLOCKING:
        case GREEN_TIMED_OUT:
            errno = EAGAIN;
            return -1;
        case GREEN_CANNOT_WAIT:
            n = call->attempt(call, flags);
            if (n >= 0)
                errno = saved_errno;
            return n;
        default:
            errno = GREEN_INTERRUPTED_ERRNO;
            return -1;
        }
        n = call->attempt(call, flags | MSG_DONTWAIT);
        if (n >= 0) {
            errno = saved_errno;
            return n;
        }
        if (errno != EAGAIN)
            return -1;
    }
}

/* ---- whole transfers on stream sockets over an iovec ---- */

/* A private copy of an iovec array that can be advanced past what the
   kernel already took, so that partial transfers continue where they ended. */
struct iov_cursor {
    struct iovec *iov;
    int iovcnt;
    struct iovec inline_iov[8];
};

static int iov_cursor_init(struct iov_cursor *cursor, const struct iovec *iov, int iovcnt)
{
    cursor->iov = cursor->inline_iov;
    if (iovcnt > (int)(sizeof cursor->inline_iov / sizeof cursor->inline_iov[0])) {
        cursor->iov = malloc(sizeof(struct iovec) * (size_t)iovcnt);
        if (cursor->iov == NULL) {
            errno = ENOMEM;
            return -1;
        }
    }
    memcpy(cursor->iov, iov, sizeof(struct iovec) * (size_t)iovcnt);
    cursor->iovcnt = iovcnt;
    return 0;
}

static void iov_cursor_advance(struct iov_cursor *cursor, size_t done)
{
    while (cursor->iovcnt > 0 && done >= cursor->iov[0].iov_len) {
        done -= cursor->iov[0].iov_len;
        cursor->iov++;
        cursor->iovcnt--;
    }
    if (cursor->iovcnt > 0) {
        cursor->iov[0].iov_base = (char *)cursor->iov[0].iov_base + done;
        cursor->iov[0].iov_len -= done;
    }
}

static size_t iov_total(const struct iovec *iov, int iovcnt)
{
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    return total;
}

/* The result of a transfer that ended early: what was moved counts, as the
   kernel counts it; with nothing moved, the error stands. */
static ssize_t partial_or_error(size_t done)
{
    return done > 0 ? (ssize_t)done : -1;
}

/* Moves a whole message on a blocking stream socket, as the kernel's blocking
   send (and recv with MSG_WAITALL) does: wait and continue after partial
   transfers until all of it moved, the peer closed, or an error.  `done`
   bytes already moved in the caller's first attempt. */
static ssize_t transfer_all(int function, int fd, int events, const struct msghdr *msg, int flags, size_t done,
                            int saved_errno)
{
    struct iovec *allocated = NULL;
    struct iov_cursor cursor;
    struct green_io_wait io_wait = {{function, 0}, 0, GREEN_NO_DEADLINE};
    struct msghdr rest = *msg;
    size_t total = iov_total(msg->msg_iov, (int)msg->msg_iovlen);
    ssize_t result;
    int receiving = events == GREEN_READ;

    if (iov_cursor_init(&cursor, msg->msg_iov, (int)msg->msg_iovlen) != 0)
        return partial_or_error(done);
    if (cursor.iov != cursor.inline_iov)
        allocated = cursor.iov;
    iov_cursor_advance(&cursor, done);
    if (receiving && done > 0) { /* control data came with the first piece */
        rest.msg_control = NULL;
        rest.msg_controllen = 0;
    }
    for (;;) {
        ssize_t n;
        if (done >= total) {
            result = (ssize_t)done;
            break;
        }
        rest.msg_iov = cursor.iov;
        rest.msg_iovlen = (size_t)cursor.iovcnt;
        n = receiving ? recvmsg(fd, &rest, flags | MSG_DONTWAIT) : sendmsg(fd, &rest, flags | MSG_DONTWAIT);
        if (n > 0 || (n == 0 && !receiving)) {
            done += (size_t)n;
            iov_cursor_advance(&cursor, (size_t)n);
            if (receiving && done > 0) {
                rest.msg_control = NULL;
                rest.msg_controllen = 0;
            }
            continue;
        }
        if (n == 0) { /* the peer closed: a short read */
            result = (ssize_t)done;
            break;
        }
        if (errno != EAGAIN) {
            result = partial_or_error(done);
            break;
        }
        switch (green_wait_io(fd, events, &io_wait)) {
        case GREEN_WOKEN:
            continue;
        case GREEN_NONBLOCKING:
        case GREEN_TIMED_OUT:
            errno = EAGAIN;
            result = partial_or_error(done);
            break;
        case GREEN_CANNOT_WAIT:
            n = receiving ? recvmsg(fd, &rest, flags) : sendmsg(fd, &rest, flags);
            result = n < 0 ? partial_or_error(done) : (ssize_t)(done + (size_t)n);
            break;
        default:
            errno = GREEN_INTERRUPTED_ERRNO;
            result = -1;
            break;
        }
        break;
    }
    if (receiving && msg->msg_flags != rest.msg_flags)
        ((struct msghdr *)msg)->msg_flags = rest.msg_flags;
    free(allocated);
    if (result >= 0)
        errno = saved_errno;
    return result;
}

static int is_stream_socket(int fd)
{
    int type = 0;
    socklen_t size = sizeof type;
    int saved_errno = errno;
    int stream = getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == SOCK_STREAM;
    errno = saved_errno;
    return stream;
}

/* ---- receiving ---- */

/* recv with MSG_WAITALL on a blocking stream: keep receiving until full. */
static ssize_t recv_waitall(int function, int fd, struct msghdr *msg, int flags, int saved_errno)
{
    ssize_t n = recvmsg(fd, msg, flags | MSG_DONTWAIT);
    size_t total = iov_total(msg->msg_iov, (int)msg->msg_iovlen);
    if (n < 0 && errno != EAGAIN)
        return -1;
    if (n == 0 || (size_t)(n < 0 ? 0 : n) == total)
        return n;
    return transfer_all(function, fd, GREEN_READ, msg, flags, n < 0 ? 0 : (size_t)n, saved_errno);
}

/* recvfrom, counted in greenify.stats() as `function` (recv calls it too). */
static inline __attribute__((always_inline)) ssize_t recvfrom_as(int function, int fd, void *buf, size_t len,
                                                                 int flags, struct sockaddr *addr,
                                                                 socklen_t *addrlen)
{
    ssize_t n;
    int saved_errno;
    if (GOES_NATIVE(flags))
        return recvfrom(fd, buf, len, flags, addr, addrlen);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    if (unlikely(flags & MSG_WAITALL) && len > 0 && is_stream_socket(fd)) {
        struct iovec iov = {buf, len};
        struct msghdr msg = {addr, addrlen ? *addrlen : 0, &iov, 1, NULL, 0, 0};
        n = recv_waitall(function, fd, &msg, flags, saved_errno);
        if (n >= 0 && addrlen != NULL)
            *addrlen = msg.msg_namelen;
        return n;
    }
    n = recvfrom(fd, buf, len, flags | MSG_DONTWAIT, addr, addrlen);
    if (likely(n >= 0) || errno != EAGAIN)
        return n;
    struct socket_call call = {function, fd, GREEN_READ, attempt_recvfrom, buf, len, addr, addrlen, NULL, 0};
    return wait_and_retry(&call, flags, saved_errno);
}

ssize_t green_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *addrlen)
{
    return recvfrom_as(GREEN_FN_recvfrom, fd, buf, len, flags, addr, addrlen);
}

ssize_t green_recv(int fd, void *buf, size_t len, int flags)
{
    return recvfrom_as(GREEN_FN_recv, fd, buf, len, flags, NULL, NULL);
}

ssize_t green_recvmsg(int fd, struct msghdr *msg, int flags)
{
    ssize_t n;
    int saved_errno;
    if (GOES_NATIVE(flags))
        return recvmsg(fd, msg, flags);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    if (unlikely(flags & MSG_WAITALL) && msg != NULL && is_stream_socket(fd))
        return recv_waitall(GREEN_FN_recvmsg, fd, msg, flags, saved_errno);
    n = recvmsg(fd, msg, flags | MSG_DONTWAIT);
    if (likely(n >= 0) || errno != EAGAIN)
        return n;
    struct socket_call call = {GREEN_FN_recvmsg, fd, GREEN_READ, attempt_recvmsg, NULL, 0, NULL, NULL, msg, 0};
    return wait_and_retry(&call, flags, saved_errno);
}

/* ---- sending ---- */

/* After a first attempt that moved `sent` bytes of less than all, or failed
   with EAGAIN: a blocking stream send goes on until all is sent. */
static ssize_t send_rest(int function, int fd, const struct msghdr *msg, int flags, ssize_t sent, int saved_errno)
{
    if (sent < 0 && errno != EAGAIN)
        return -1;
    return transfer_all(function, fd, GREEN_WRITE, msg, flags, sent < 0 ? 0 : (size_t)sent, saved_errno);
}

/* sendto, counted in greenify.stats() as `function` (send calls it too). */
static inline __attribute__((always_inline)) ssize_t sendto_as(int function, int fd, const void *buf, size_t len,
                                                               int flags, const struct sockaddr *addr,
                                                               socklen_t addrlen)
{
    ssize_t n;
    int saved_errno;
    if (GOES_NATIVE(flags))
        return sendto(fd, buf, len, flags, addr, addrlen);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    n = sendto(fd, buf, len, flags | MSG_DONTWAIT, addr, addrlen);
    if (likely(n >= 0 && (size_t)n == len))
        return n;
    if (n < 0 && errno != EAGAIN)
        return n;
    struct iovec iov = {(void *)buf, len};
    struct msghdr msg = {(void *)addr, addrlen, &iov, 1, NULL, 0, 0};
    return send_rest(function, fd, &msg, flags, n, saved_errno);
}

ssize_t green_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
                     socklen_t addrlen)
{
    return sendto_as(GREEN_FN_sendto, fd, buf, len, flags, addr, addrlen);
}

ssize_t green_send(int fd, const void *buf, size_t len, int flags)
{
    return sendto_as(GREEN_FN_send, fd, buf, len, flags, NULL, 0);
}

ssize_t green_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    ssize_t n;
    int saved_errno;
    if (GOES_NATIVE(flags))
        return sendmsg(fd, msg, flags);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    n = sendmsg(fd, msg, flags | MSG_DONTWAIT);
    if (n < 0 && errno != EAGAIN)
        return n;
    if (n >= 0 && (size_t)n == iov_total(msg->msg_iov, (int)msg->msg_iovlen))
        return n;
    if (n >= 0 && msg->msg_control != NULL) {
        /* ancillary data went with the first piece; continue without it */
        struct msghdr rest = *msg;
        rest.msg_control = NULL;
        rest.msg_controllen = 0;
        return send_rest(GREEN_FN_sendmsg, fd, &rest, flags, n, saved_errno);
    }
    return send_rest(GREEN_FN_sendmsg, fd, msg, flags, n, saved_errno);
}

/* ---- read/write and friends: sockets and other files ---- */

/* A read or write on a file that is not a socket: probe with poll() first,
   wait on the hub while a blocking descriptor is not ready. */
struct file_call {
    int function; /* enum green_function, for greenify.stats() */
    int fd;
    int events;
    void *buf;
    size_t count;
    const struct iovec *iov;
    int iovcnt;
};

static ssize_t file_attempt(const struct file_call *c)
{
    if (c->iov != NULL)
        return c->events == GREEN_READ ? readv(c->fd, c->iov, c->iovcnt) : writev(c->fd, c->iov, c->iovcnt);
    return c->events == GREEN_READ ? read(c->fd, c->buf, c->count) : write(c->fd, c->buf, c->count);
}

static ssize_t file_io(const struct file_call *call, int saved_errno)
{
    struct pollfd probe = {call->fd, (short)(call->events == GREEN_READ ? POLLIN : POLLOUT), 0};
    struct green_watch watch = {call->fd, call->events};
    struct green_call stats = {call->function, 0};
    for (;;) {
        int flags;
        errno = saved_errno;
        if (poll(&probe, 1, 0) != 0) /* ready, hung up, in error, or not pollable */
            return file_attempt(call);
        flags = fcntl(call->fd, F_GETFL);
        errno = saved_errno;
        if (flags < 0 || (flags & O_NONBLOCK))
            return file_attempt(call);
        switch (green_wait(&stats, &watch, 1, GREEN_NO_DEADLINE)) {
        case GREEN_INTERRUPTED:
            errno = GREEN_INTERRUPTED_ERRNO;
            return -1;
        case GREEN_CANNOT_WAIT:
            return file_attempt(call);
        default:
            continue;
        }
    }
}

ssize_t green_read(int fd, void *buf, size_t count)
{
    ssize_t n;
    int saved_errno;
    if (!green_state.active || count == 0) /* read(fd, buf, 0) must not consume a datagram */
        return read(fd, buf, count);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    n = recv(fd, buf, count, MSG_DONTWAIT);
    if (likely(n >= 0))
        return n;
    if (errno == ENOTSOCK) {
        struct file_call call = {GREEN_FN_read, fd, GREEN_READ, buf, count, NULL, 0};
        return file_io(&call, saved_errno);
    }
    if (errno != EAGAIN)
        return -1;
    struct socket_call call = {GREEN_FN_read, fd, GREEN_READ, attempt_recvfrom, buf, count, NULL, NULL, NULL, 0};
    return wait_and_retry(&call, 0, saved_errno);
}

ssize_t green_write(int fd, const void *buf, size_t count)
{
    ssize_t n;
    int saved_errno;
    if (!green_state.active || count == 0)
        return write(fd, buf, count);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    n = send(fd, buf, count, MSG_DONTWAIT);
    if (likely(n >= 0 && (size_t)n == count))
        return n;
    if (n < 0 && errno == ENOTSOCK) {
        struct file_call call = {GREEN_FN_write, fd, GREEN_WRITE, (void *)buf, count, NULL, 0};
        return file_io(&call, saved_errno);
    }
    if (n < 0 && errno != EAGAIN)
        return n;
    struct iovec iov = {(void *)buf, count};
    struct msghdr msg = {NULL, 0, &iov, 1, NULL, 0, 0};
    return send_rest(GREEN_FN_write, fd, &msg, 0, n, saved_errno);
}

ssize_t green_readv(int fd, const struct iovec *iov, int iovcnt)
{
    ssize_t n;
    int saved_errno;
    if (!green_state.active || iovcnt <= 0 || iov == NULL || iov_total(iov, iovcnt) == 0)
        return readv(fd, iov, iovcnt);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    struct msghdr msg = {NULL, 0, (struct iovec *)iov, (size_t)iovcnt, NULL, 0, 0};
    n = recvmsg(fd, &msg, MSG_DONTWAIT);
    if (likely(n >= 0))
        return n;
    if (errno == ENOTSOCK) {
        struct file_call call = {GREEN_FN_readv, fd, GREEN_READ, NULL, 0, iov, iovcnt};
        return file_io(&call, saved_errno);
    }
    if (errno != EAGAIN)
        return -1;
    struct socket_call call = {GREEN_FN_readv, fd, GREEN_READ, attempt_recvmsg, NULL, 0, NULL, NULL, &msg, 0};
    return wait_and_retry(&call, 0, saved_errno);
}

ssize_t green_writev(int fd, const struct iovec *iov, int iovcnt)
{
    ssize_t n;
    int saved_errno;
    if (!green_state.active || iovcnt <= 0 || iov == NULL)
        return writev(fd, iov, iovcnt);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    struct msghdr msg = {NULL, 0, (struct iovec *)iov, (size_t)iovcnt, NULL, 0, 0};
    n = sendmsg(fd, &msg, MSG_DONTWAIT);
    if (n < 0 && errno == ENOTSOCK) {
        struct file_call call = {GREEN_FN_writev, fd, GREEN_WRITE, NULL, 0, iov, iovcnt};
        return file_io(&call, saved_errno);
    }
    if (n < 0 && errno != EAGAIN)
        return n;
    if (n >= 0 && (size_t)n == iov_total(iov, iovcnt))
        return n;
    return send_rest(GREEN_FN_writev, fd, &msg, 0, n, saved_errno);
}

/* ---- close ---- */

/* Waiters on fd are woken before it goes (libev must not be left watching a
   descriptor that epoll dropped); they probe after the close and fail. */
int green_close(int fd)
{
    green_wake_waiters_on(fd);
    green_tls_forget_client(fd);
    return close(fd);
}

/* ---- connect and accept ---- */

int green_connect(int fd, const struct sockaddr *addr, socklen_t addrlen)
{
    struct green_io_wait io_wait = GREEN_IO_WAIT_INIT(connect);
    int saved_errno, flags, rc, connect_errno;
    green_tls_note_client(fd); /* a patched library's connection: its TLS library's I/O on it goes green too */
    if (!green_state.active)
        return connect(fd, addr, addrlen);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & O_NONBLOCK)) {
        errno = saved_errno;
        return connect(fd, addr, addrlen); /* bad fd, or the caller's own non-blocking connect */
    }
    io_wait.looked_up = 1; /* blocking, as just read; the timeout is SO_SNDTIMEO's */
    io_wait.deadline_ns = green_socket_timeout_deadline(fd, GREEN_WRITE);
    /* A Unix socket whose listener's backlog is full refuses a non-blocking
       connect with EAGAIN where a blocking one waits for room: retry after
       cooperative pauses (1 ms, doubling to 64 ms) until SO_SNDTIMEO. */
    for (int64_t pause_ns = 1000000;; pause_ns = pause_ns < 64000000 ? pause_ns * 2 : pause_ns) {
        int64_t wake_ns;
        if (fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
            errno = saved_errno;
            return connect(fd, addr, addrlen);
        }
        rc = connect(fd, addr, addrlen);
        connect_errno = errno;
        fcntl(fd, F_SETFL, flags);
        if (rc == 0) {
            errno = saved_errno;
            return 0;
        }
        if (connect_errno != EAGAIN)
            break;
        wake_ns = green_now_ns() + pause_ns;
        if (io_wait.deadline_ns != GREEN_NO_DEADLINE && wake_ns > io_wait.deadline_ns)
            wake_ns = io_wait.deadline_ns;
        switch (green_wait(&io_wait.call, NULL, 0, wake_ns)) {
        case GREEN_CANNOT_WAIT:
            errno = saved_errno;
            return connect(fd, addr, addrlen);
        case GREEN_INTERRUPTED:
            errno = GREEN_INTERRUPTED_ERRNO;
            return -1;
        default:
            if (io_wait.deadline_ns != GREEN_NO_DEADLINE && green_now_ns() >= io_wait.deadline_ns) {
                errno = EAGAIN; /* what a blocking Unix connect reports when SO_SNDTIMEO expires */
                return -1;
            }
        }
    }
    if (connect_errno != EINPROGRESS) {
        errno = connect_errno;
        return -1;
    }
    for (;;) {
        struct pollfd probe = {fd, POLLOUT, 0};
        int error = 0;
        socklen_t size = sizeof error;
        if (poll(&probe, 1, 0) == 1) {
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0)
                return -1;
            if (error != 0) {
                errno = error;
                return -1;
            }
            errno = saved_errno;
            return 0;
        }
        switch (green_wait_io(fd, GREEN_WRITE, &io_wait)) {
        case GREEN_WOKEN:
            continue;
        case GREEN_TIMED_OUT:
            errno = EINPROGRESS; /* what a blocking connect reports when SO_SNDTIMEO expires */
            return -1;
        case GREEN_CANNOT_WAIT: {
            /* block natively until connected, as libc's connect would */
            struct pollfd wait_fd = {fd, POLLOUT, 0};
            int timeout_ms = green_ms_left(io_wait.deadline_ns);
            while (poll(&wait_fd, 1, timeout_ms) < 0 && errno == EINTR)
                ;
            if (wait_fd.revents == 0) {
                errno = EINPROGRESS;
                return -1;
            }
            continue;
        }
        default:
            errno = GREEN_INTERRUPTED_ERRNO;
            return -1;
        }
    }
}

/* accept4, counted in greenify.stats() as `function` (accept calls it too). */
static int accept4_as(int function, int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
    struct green_io_wait io_wait = {GREEN_CALL(accept4), 0, GREEN_NO_DEADLINE};
    int saved_errno;
    io_wait.call.function = function;
    if (!green_state.active)
        return accept4(fd, addr, addrlen, flags);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    for (;;) {
        struct pollfd probe = {fd, POLLIN, 0};
        int rc;
        if (poll(&probe, 1, 0) != 0) { /* a connection is waiting, or an error to report */
            errno = saved_errno;
            rc = accept4(fd, addr, addrlen, flags);
            if (rc >= 0 || errno != EAGAIN)
                return rc;
        }
        switch (green_wait_io(fd, GREEN_READ, &io_wait)) {
        case GREEN_WOKEN:
            continue;
        case GREEN_NONBLOCKING:
            errno = saved_errno;
            return accept4(fd, addr, addrlen, flags);
        case GREEN_TIMED_OUT:
            errno = EAGAIN;
            return -1;
        case GREEN_CANNOT_WAIT:
            errno = saved_errno;
            return accept4(fd, addr, addrlen, flags);
        default:
            errno = GREEN_INTERRUPTED_ERRNO;
            return -1;
        }
    }
}

int green_accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
    return accept4_as(GREEN_FN_accept4, fd, addr, addrlen, flags);
}

int green_accept(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
    return accept4_as(GREEN_FN_accept, fd, addr, addrlen, 0);
}

/* ---- glibc's fortified entry points (-D_FORTIFY_SOURCE) ---- */

ssize_t green___read_chk(int fd, void *buf, size_t nbytes, size_t buflen)
{
    if (nbytes > buflen)
        __chk_fail();
    return green_read(fd, buf, nbytes);
}

ssize_t green___recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags)
{
    if (len > buflen)
        __chk_fail();
    return green_recv(fd, buf, len, flags);
}

ssize_t green___recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags, struct sockaddr *addr,
                             socklen_t *addrlen)
{
    if (len > buflen)
        __chk_fail();
    return green_recvfrom(fd, buf, len, flags, addr, addrlen);
}
