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
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "green.h"
#include "green_clients.h"

__thread int green_last_refused_fd = -1;


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

/* After a receive woken as readable still failed with EAGAIN: true when
   the blocking call would not wait, because the socket's receive side is
   shut down (a datagram socket then reads 0 at once, where MSG_DONTWAIT
   keeps saying EAGAIN, and epoll calls it readable). */
static int receive_side_shut(int fd)
{
    struct pollfd probe = {fd, POLLRDHUP, 0};
    int saved_errno = errno;
    int shut = poll(&probe, 1, 0) == 1 && (probe.revents & POLLRDHUP);
    errno = saved_errno;
    return shut;
}

/* Receives the kernel answers at once on a blocking socket too: from the
   error queue (EAGAIN when empty; AF_UNIX sockets have none and take
   MSG_ERRQUEUE for an ordinary receive), and out-of-band data on a stream
   socket (EINVAL or EAGAIN when there is none, whatever MSG_WAITALL says). */
static int receive_never_waits(int fd, int flags)
{
    int domain = AF_UNIX, type = 0;
    socklen_t size = sizeof domain;
    int saved_errno = errno, never = 0;
    if (!(flags & (MSG_ERRQUEUE | MSG_OOB)))
        return 0;
    if (flags & MSG_ERRQUEUE) {
        getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &size);
        never = domain != AF_UNIX;
    }
    size = sizeof type;
    if (!never && (flags & MSG_OOB))
        never = getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == SOCK_STREAM;
    errno = saved_errno;
    return never;
}

static size_t iov_total(const struct iovec *iov, int iovcnt);

/* A zero-length receive on a TCP socket: the kernel's blocking call waits
   once (for data, the end, an error or SO_RCVTIMEO) and then returns 0,
   whatever ended the wait, where a Unix or datagram socket says EAGAIN at
   its timeout. */
static int zero_length_tcp_receive(const struct socket_call *call)
{
    if (call->events != GREEN_READ)
        return 0;
    size_t length = call->msg != NULL ? iov_total(call->msg->msg_iov, (int)call->msg->msg_iovlen) : call->len;
    int protocol = 0, saved_errno = errno;
    socklen_t size = sizeof protocol;
    int tcp = length == 0 && getsockopt(call->fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &size) == 0 &&
              (protocol == IPPROTO_TCP || protocol == 262 /* IPPROTO_MPTCP */);
    errno = saved_errno;
    return tcp;
}

/* After a first attempt failed with EAGAIN on a call that may block: wait on
   the hub and retry until it completes, honouring O_NONBLOCK and the socket's
   SO_RCVTIMEO/SO_SNDTIMEO as the kernel would. */
static ssize_t wait_and_retry(const struct socket_call *call, int flags, int saved_errno)
{
    struct green_io_wait io_wait = GREEN_IO_WAIT_FOR(call->function);
    for (;;) {
        ssize_t n;
        switch (green_wait_io(call->fd, call->events, &io_wait)) {
        case GREEN_WOKEN:
            break;
        case GREEN_TIMED_OUT:
            if (zero_length_tcp_receive(call)) {
                errno = saved_errno;
                return 0;
            }
            /* fall through */
        case GREEN_NONBLOCKING:
            errno = EAGAIN;
            return call->events == GREEN_READ ? green_noting_refusal(-1, call->fd) : -1;
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
        if (errno != EAGAIN) {
            if (!zero_length_tcp_receive(call))
                return -1;
            errno = saved_errno; /* the error came during the wait: the kernel's loop had ended it */
            return 0;
        }
        /* Readable, yet still EAGAIN: looked at only now, which spares the
           common wait a system call (such a socket is readable, so its wait
           ends at once). */
        if (call->events == GREEN_READ && receive_side_shut(call->fd)) {
            n = call->attempt(call, flags);
            if (n >= 0)
                errno = saved_errno;
            return n;
        }
    }
}

/* ---- what read() and write() check before moving anything ---- */

/* The most one read or write moves (the kernel's MAX_RW_COUNT). */
static size_t max_rw_count(void)
{
    return (size_t)(INT_MAX & ~(sysconf(_SC_PAGESIZE) - 1));
}

/* read() and write() check the descriptor, then the caller's whole buffer
   (EFAULT where it runs past the address space, EINVAL for a negative
   count); recv, send and the vector calls check only the MAX_RW_COUNT bytes
   they could move.  For a longer count the kernel makes read()'s checks
   without moving anything: on fd with an empty vector (EBADF, EINVAL), then
   on /dev/null with the buffer.  -1 with its errno when it refuses, else 0. */
static int arguments_refused(int fd, void *buf, size_t count, int events)
{
    struct iovec nothing = {NULL, 0};
    int saved_errno = errno;
    int null_fd, refused, refusal;
    refused = (events == GREEN_READ ? preadv2(fd, &nothing, 1, -1, 0) : pwritev2(fd, &nothing, 1, -1, 0)) < 0;
    refusal = errno;
    if (!refused && (null_fd = open("/dev/null", O_RDWR | O_CLOEXEC)) >= 0) {
        refused = (events == GREEN_READ ? read(null_fd, buf, count) : write(null_fd, buf, count)) < 0;
        refusal = errno;
        close(null_fd);
    }
    errno = refused ? refusal : saved_errno;
    return refused ? -1 : 0;
}

/* ---- whole sends on blocking stream sockets and pipes ---- */

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

/* Only for arrays the kernel has just read (it refuses unreadable ones). */
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

/* One send of the rest without waiting: sendmsg for the send family,
   pwritev2 (the path of write/writev, which also serves pipes) otherwise. */
static ssize_t send_some(int fd, const struct msghdr *rest, int flags, int vfs, int nowait)
{
    if (vfs)
        return nowait ? pwritev2(fd, rest->msg_iov, (int)rest->msg_iovlen, -1, RWF_NOWAIT)
                      : writev(fd, rest->msg_iov, (int)rest->msg_iovlen);
    return sendmsg(fd, rest, nowait ? flags | MSG_DONTWAIT : flags);
}

/* A blocking send on a stream socket (or write to a pipe) moves the whole
   message: after a partial transfer or EAGAIN, wait for room and send the
   rest, until all of it moved, an error, or SO_SNDTIMEO.  `done` bytes
   already moved in the caller's first attempt; msg's iovec was read by the
   kernel in that attempt. */
static ssize_t send_all(int function, int fd, const struct msghdr *msg, int flags, int vfs, size_t done,
                        int saved_errno)
{
    struct iov_cursor cursor;
    struct green_io_wait io_wait = GREEN_IO_WAIT_FOR(function);
    struct msghdr rest = *msg;
    size_t total = iov_total(msg->msg_iov, (int)msg->msg_iovlen);
    ssize_t result;

    if (iov_cursor_init(&cursor, msg->msg_iov, (int)msg->msg_iovlen) != 0)
        return partial_or_error(done);
    struct iovec *allocated = cursor.iov != cursor.inline_iov ? cursor.iov : NULL;
    iov_cursor_advance(&cursor, done);
    if (done > 0) { /* ancillary data went with the first piece */
        rest.msg_control = NULL;
        rest.msg_controllen = 0;
    }
    for (;;) {
        ssize_t n;
        if (done >= total) {
            result = (ssize_t)done;
            break;
        }
        /* A non-blocking descriptor's send returns what the kernel took in
           one attempt, as libc's does: it is asked only after a partial
           send (the common send moves everything at once). */
        if (done > 0 && io_wait.looked_up == GREEN_IO_UNKNOWN &&
            green_io_wait_begin(fd, &io_wait) == GREEN_NONBLOCKING) {
            result = (ssize_t)done;
            break;
        }
        rest.msg_iov = cursor.iov;
        rest.msg_iovlen = (size_t)cursor.iovcnt;
        n = send_some(fd, &rest, flags, vfs, 1);
        if (n >= 0) {
            done += (size_t)n;
            iov_cursor_advance(&cursor, (size_t)n);
            rest.msg_control = NULL;
            rest.msg_controllen = 0;
            continue;
        }
        if (errno != EAGAIN) {
            result = partial_or_error(done);
            break;
        }
        switch (green_wait_io(fd, GREEN_WRITE, &io_wait)) {
        case GREEN_WOKEN:
            continue;
        case GREEN_NONBLOCKING:
        case GREEN_TIMED_OUT:
            errno = EAGAIN;
            result = partial_or_error(done);
            break;
        case GREEN_CANNOT_WAIT:
            n = send_some(fd, &rest, flags, vfs, 0);
            result = n < 0 ? partial_or_error(done) : (ssize_t)(done + (size_t)n);
            break;
        default:
            errno = GREEN_INTERRUPTED_ERRNO;
            result = -1;
            break;
        }
        break;
    }
    free(allocated);
    if (result >= 0)
        errno = saved_errno;
    return result;
}

/* recv and send check the buffer before the descriptor, read and write the
   descriptor first: after ENOTSOCK, or EFAULT on something that is not a
   socket (or not open), read/write's own path gives the kernel's answer. */
static int not_a_socket(int fd, int error)
{
    int type, saved_errno = errno;
    socklen_t size = sizeof type;
    int other = error == ENOTSOCK || (error == EFAULT && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) != 0);
    errno = saved_errno;
    return other;
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

/* ---- receiving the whole length (MSG_WAITALL on a blocking stream socket) ---- */

/*
 * The kernel's blocking MSG_WAITALL receive returns once the whole length is
 * queued, at the end of the stream, on an error, or at an urgent mark (an
 * out-of-band byte) with data before it.  We wait on the hub until one of
 * these holds, judged by peeking (nothing consumed, no address or control
 * data taken), then make the caller's own call with MSG_DONTWAIT: it returns
 * at once exactly what the blocking call would, peeked or not, with the
 * address, control data, flags and errors the kernel gives.  Nothing is
 * received piecemeal in user space.
 */

/* With fewer bytes queued than asked for: true when the blocking call
   returns with them now rather than waiting for more. */
static int whole_receive_stops_here(int fd)
{
    struct pollfd probe = {fd, POLLPRI | POLLRDHUP, 0};
    int saved_errno = errno, at_mark = 0, stops = 0;
    if (poll(&probe, 1, 0) == 1) {
        if (probe.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL))
            stops = 1; /* end of stream or an error */
        else if (probe.revents & POLLPRI) /* the call stops at the mark, unless it starts there */
            stops = ioctl(fd, SIOCATMARK, &at_mark) == 0 && !at_mark;
    }
    errno = saved_errno;
    return stops;
}

/* An edge-triggered epoll set on fd, readable once more data, an urgent
   byte, the end of the stream or an error arrived since it was drained:
   partly received data keeps fd itself readable, no use to wait on. */
static int arrivals_open(int fd)
{
    struct epoll_event event;
    int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    memset(&event, 0, sizeof event);
    event.events = EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLET;
    event.data.fd = fd;
    if (epoll_fd >= 0 && epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) {
        close(epoll_fd);
        return -1;
    }
    return epoll_fd;
}

static void arrivals_drain(int epoll_fd)
{
    struct epoll_event event;
    if (epoll_fd >= 0)
        epoll_wait(epoll_fd, &event, 1, 0);
}

/* `peek` names the caller's buffers only; `len` is their total length, or
   SIZE_MAX when it is to be read from peek's iovec once the kernel accepted it. */
static ssize_t recv_whole(const struct socket_call *call, struct msghdr *peek, size_t len, int flags, int saved_errno)
{
    struct green_io_wait io_wait = GREEN_IO_WAIT_FOR(call->function);
    struct green_watch arrivals = {-1, GREEN_READ};
    int status = GREEN_WOKEN, real_flags = flags | MSG_DONTWAIT;
    ssize_t n;
    for (;;) {
        arrivals_drain(arrivals.fd);
        n = recvmsg(call->fd, peek, flags | MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && errno != EAGAIN)
            break; /* the blocking call fails at once, with this error */
        if (len == SIZE_MAX) {
            len = iov_total(peek->msg_iov, (int)peek->msg_iovlen);
            if (len > max_rw_count())
                len = max_rw_count();
        }
        if (n == 0 || (n > 0 && ((size_t)n >= len || whole_receive_stops_here(call->fd))))
            break; /* the blocking call returns at once */
        if (io_wait.looked_up == GREEN_IO_UNKNOWN && green_io_wait_begin(call->fd, &io_wait) == GREEN_NONBLOCKING)
            break; /* the kernel does not wait on a non-blocking socket */
        if (io_wait.looked_up != GREEN_IO_KNOWN) /* this loop's arrivals wait needs the deadline now */
            green_io_wait_read_timeout(call->fd, GREEN_READ, &io_wait);
        if (n > 0 && arrivals.fd < 0) {
            arrivals.fd = arrivals_open(call->fd);
            if (arrivals.fd < 0) {
                real_flags = flags; /* nothing to wait on: the blocking call itself */
                break;
            }
            continue; /* peek again: data that came meanwhile raised no edge */
        }
        status = n > 0 ? green_wait(&io_wait.call, &arrivals, 1, io_wait.deadline_ns)
                       : green_wait_io(call->fd, GREEN_READ, &io_wait);
        if (status == GREEN_CANNOT_WAIT)
            real_flags = flags;
        if (status == GREEN_INTERRUPTED) {
            errno = GREEN_INTERRUPTED_ERRNO;
            break;
        }
        if (status != GREEN_WOKEN)
            break; /* timed out (the kernel returns what is there, or EAGAIN), or no hub */
    }
    if (arrivals.fd >= 0) {
        green_wake_waiters_on(arrivals.fd); /* its number comes back: see poll_waiter_close */
        close(arrivals.fd);
    }
    if (n < 0 && errno != EAGAIN)
        return -1;
    if (status == GREEN_INTERRUPTED)
        return -1;
    if (status == GREEN_TIMED_OUT && len == 0 && zero_length_tcp_receive(call)) {
        errno = saved_errno;
        return 0;
    }
    n = call->attempt(call, real_flags);
    if (n >= 0)
        errno = saved_errno;
    return n;
}

/* Reads the caller's structure through the kernel: -1 (no fault) when it is
   not readable.  Where process_vm_readv itself is refused (a seccomp
   profile), the structure is read directly, as libc's callers trust it. */
static int copy_from_caller(void *local, const void *remote, size_t size)
{
    struct iovec to = {local, size};
    struct iovec from = {(void *)remote, size};
    int saved_errno = errno, result = 0;
    ssize_t copied = process_vm_readv(getpid(), &to, 1, &from, 1, 0);
    if (copied >= 0 && copied < (ssize_t)size)
        result = -1; /* it ends in unmapped memory */
    else if (copied < 0 && errno == EFAULT)
        result = -1;
    else if (copied < 0)
        memcpy(local, remote, size);
    errno = saved_errno;
    return result;
}

/* ---- receiving ---- */

/* recvfrom, counted in greenify.stats() as `function` (recv calls it too). */
static inline __attribute__((always_inline)) ssize_t recvfrom_as(int function, int fd, void *buf, size_t len,
                                                                 int flags, struct sockaddr *addr,
                                                                 socklen_t *addrlen)
{
    ssize_t n;
    int saved_errno;
    if (GOES_NATIVE(flags))
        return green_noting_refusal(recvfrom(fd, buf, len, flags, addr, addrlen), fd);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    struct socket_call call = {function, fd, GREEN_READ, attempt_recvfrom, buf, len, addr, addrlen, NULL, 0};
    if (unlikely(flags & MSG_WAITALL) && !receive_never_waits(fd, flags) && is_stream_socket(fd)) {
        struct iovec iov = {buf, len};
        struct msghdr peek = {NULL, 0, &iov, 1, NULL, 0, 0};
        return recv_whole(&call, &peek, len > max_rw_count() ? max_rw_count() : len, flags, saved_errno);
    }
    n = recvfrom(fd, buf, len, flags | MSG_DONTWAIT, addr, addrlen);
    if (likely(n >= 0) || errno != EAGAIN || receive_never_waits(fd, flags))
        return n;
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
        return green_noting_refusal(recvmsg(fd, msg, flags), fd);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    struct socket_call call = {GREEN_FN_recvmsg, fd, GREEN_READ, attempt_recvmsg, NULL, 0, NULL, NULL, msg, 0};
    if (unlikely(flags & MSG_WAITALL) && !receive_never_waits(fd, flags) && is_stream_socket(fd)) {
        struct msghdr caller, peek;
        if (copy_from_caller(&caller, msg, sizeof caller) != 0)
            return recvmsg(fd, msg, flags | MSG_DONTWAIT); /* the kernel refuses msg at once */
        memset(&peek, 0, sizeof peek);
        peek.msg_iov = caller.msg_iov;
        peek.msg_iovlen = caller.msg_iovlen;
        return recv_whole(&call, &peek, SIZE_MAX, flags, saved_errno);
    }
    n = recvmsg(fd, msg, flags | MSG_DONTWAIT);
    if (likely(n >= 0) || errno != EAGAIN || receive_never_waits(fd, flags))
        return n;
    return wait_and_retry(&call, flags, saved_errno);
}

/* ---- sending ---- */

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
    return send_all(function, fd, &msg, flags, 0, n < 0 ? 0 : (size_t)n, saved_errno);
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
    /* the kernel read msg and its iovec: they are readable */
    if (n >= 0 && (size_t)n == iov_total(msg->msg_iov, (int)msg->msg_iovlen))
        return n;
    return send_all(GREEN_FN_sendmsg, fd, msg, flags, 0, n < 0 ? 0 : (size_t)n, saved_errno);
}

/* ---- read/write and friends: sockets and other files ---- */

/* A read or write on a file that is not a socket (and readv on any file):
   the kernel's own call where it will not wait; a wait on the hub only while
   the kernel says the call would block. */
struct file_call {
    int function; /* enum green_function, for greenify.stats() */
    int fd;
    int events;
    const struct iovec *iov;
    int iovcnt; /* 0: read or write of iov[0], the caller's one buffer */
};

/* The caller's own call, which may block. */
static ssize_t file_native(const struct file_call *c)
{
    if (c->iovcnt == 0)
        return c->events == GREEN_READ ? read(c->fd, c->iov->iov_base, c->iov->iov_len)
                                       : write(c->fd, c->iov->iov_base, c->iov->iov_len);
    return c->events == GREEN_READ ? readv(c->fd, c->iov, c->iovcnt) : writev(c->fd, c->iov, c->iovcnt);
}

/* The same through the kernel's read/write path, without waiting. */
static ssize_t file_nowait(const struct file_call *c)
{
    int iovcnt = c->iovcnt == 0 ? 1 : c->iovcnt;
    return c->events == GREEN_READ ? preadv2(c->fd, c->iov, iovcnt, -1, RWF_NOWAIT)
                                   : pwritev2(c->fd, c->iov, iovcnt, -1, RWF_NOWAIT);
}

static ssize_t file_io(const struct file_call *call, int saved_errno)
{
    struct pollfd probe = {call->fd, (short)(call->events == GREEN_READ ? POLLIN : POLLOUT), 0};
    struct green_io_wait io_wait = GREEN_IO_WAIT_FOR(call->function);
    for (;;) {
        ssize_t n;
        errno = saved_errno;
        /* ready, hung up, in error, not pollable, or a regular file (always
           ready, and RWF_NOWAIT would stop at pages not in the cache) */
        if (poll(&probe, 1, 0) != 0)
            return file_native(call);
        /* Not ready: the kernel tries the call without waiting, judging its
           arguments as the real call does (EBADF on the wrong end of a pipe,
           EINVAL on a file that cannot be read or written). */
        n = file_nowait(call);
        if (n >= 0) {
            errno = saved_errno;
            return n;
        }
        if (errno != EAGAIN && errno != EOPNOTSUPP) /* EOPNOTSUPP: it cannot try without waiting (a tty) */
            return -1;
        switch (green_wait_io(call->fd, call->events, &io_wait)) {
        case GREEN_WOKEN:
            continue;
        case GREEN_TIMED_OUT:
            errno = EAGAIN;
            return -1;
        case GREEN_INTERRUPTED:
            errno = GREEN_INTERRUPTED_ERRNO;
            return -1;
        default: /* non-blocking (the kernel's answer stands), or no hub */
            errno = saved_errno;
            return file_native(call);
        }
    }
}

/* write and writev through the kernel's write path without waiting, then
   the rest of a blocking write after waits for room (sockets and pipes). */
static ssize_t write_all(const struct file_call *call, int saved_errno)
{
    int iovcnt = call->iovcnt == 0 ? 1 : call->iovcnt;
    ssize_t n = file_nowait(call);
    if (n >= 0 && (size_t)n == iov_total(call->iov, iovcnt)) {
        errno = saved_errno; /* a caller's failed attempt (send on a pipe: ENOTSOCK) leaves no trace */
        return n;
    }
    if (n < 0 && errno == EINVAL) { /* a file written without waiting anyway (a regular file), or never */
        errno = saved_errno;
        return file_native(call);
    }
    if (n < 0 && errno == EOPNOTSUPP)
        return file_io(call, saved_errno);
    if (n < 0 && errno != EAGAIN)
        return -1;
    struct msghdr msg = {NULL, 0, (struct iovec *)call->iov, (size_t)iovcnt, NULL, 0, 0};
    return send_all(call->function, call->fd, &msg, 0, 1, n < 0 ? 0 : (size_t)n, saved_errno);
}

ssize_t green_read(int fd, void *buf, size_t count)
{
    ssize_t n;
    int saved_errno;
    if (!green_state.active || count == 0) /* read(fd, buf, 0) must not consume a datagram */
        return read(fd, buf, count);
    FAIL_IF_INTERRUPTED();
    saved_errno = errno;
    if (unlikely(count > max_rw_count()) && arguments_refused(fd, buf, count, GREEN_READ) != 0)
        return -1;
    n = recv(fd, buf, count, MSG_DONTWAIT); /* on a socket, read() is this call */
    if (likely(n >= 0))
        return n;
    if (not_a_socket(fd, errno)) {
        struct iovec iov = {buf, count};
        struct file_call call = {GREEN_FN_read, fd, GREEN_READ, &iov, 0};
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
    if (unlikely(count > max_rw_count()) && arguments_refused(fd, (void *)buf, count, GREEN_WRITE) != 0)
        return -1;
    n = send(fd, buf, count, MSG_DONTWAIT); /* on a socket, write() is this call */
    if (likely(n >= 0 && (size_t)n == count))
        return n;
    struct iovec iov = {(void *)buf, count};
    if (n < 0 && not_a_socket(fd, errno)) {
        struct file_call call = {GREEN_FN_write, fd, GREEN_WRITE, &iov, 0};
        return write_all(&call, saved_errno);
    }
    if (n < 0 && errno != EAGAIN)
        return n;
    struct msghdr msg = {NULL, 0, &iov, 1, NULL, 0, 0};
    return send_all(GREEN_FN_write, fd, &msg, 0, 0, n < 0 ? 0 : (size_t)n, saved_errno);
}

/* The vector calls take the kernel's own read/write path (preadv2/pwritev2),
   which judges the array as readv/writev do: a zero total moves nothing (no
   empty datagram), a count beyond IOV_MAX is EINVAL. */
ssize_t green_readv(int fd, const struct iovec *iov, int iovcnt)
{
    if (!green_state.active || iovcnt <= 0 || iovcnt > IOV_MAX)
        return readv(fd, iov, iovcnt);
    FAIL_IF_INTERRUPTED();
    struct file_call call = {GREEN_FN_readv, fd, GREEN_READ, iov, iovcnt};
    return file_io(&call, errno);
}

ssize_t green_writev(int fd, const struct iovec *iov, int iovcnt)
{
    if (!green_state.active || iovcnt <= 0 || iovcnt > IOV_MAX)
        return writev(fd, iov, iovcnt);
    FAIL_IF_INTERRUPTED();
    struct file_call call = {GREEN_FN_writev, fd, GREEN_WRITE, iov, iovcnt};
    return write_all(&call, errno);
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
    io_wait.started_ns = green_now_ns(); /* blocking, as just read; the timeout is SO_SNDTIMEO's */
    green_io_wait_read_timeout(fd, GREEN_WRITE, &io_wait);
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
        if (poll(&probe, 1, 0) == 1) {
            /* Connected or failed: the kernel's own connect, which no longer
               waits, says which, and leaves the socket in the state a
               blocking connect leaves it in (connected, or unconnected). */
            errno = saved_errno;
            return connect(fd, addr, addrlen);
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

/* True when the kernel's accept4 would wait for a connection: fd is a
   listening socket and the flags are valid.  Otherwise (a connected or
   datagram socket, a pipe, a closed number, unknown flags) it fails at once,
   and nothing is watched that could never become ready. */
static int accept_may_wait(int fd, int flags)
{
    int listening = 0;
    socklen_t size = sizeof listening;
    int saved_errno = errno;
    int may_wait = !(flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) &&
                   getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) == 0 && listening;
    errno = saved_errno;
    return may_wait;
}

/* accept4, counted in greenify.stats() as `function` (accept calls it too). */
static int accept4_as(int function, int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
    struct green_io_wait io_wait = GREEN_IO_WAIT_INIT(accept4);
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
        if (!accept_may_wait(fd, flags)) {
            errno = saved_errno;
            return accept4(fd, addr, addrlen, flags); /* the kernel refuses it at once */
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
