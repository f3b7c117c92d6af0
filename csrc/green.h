/*
 * What the green functions share: the run-time state, the one wait entry
 * into Python, deadlines, and the prototypes of every green twin.
 *
 * A green twin has the exact signature and results of the libc call it
 * replaces.  It first tries the call without blocking (one system call when
 * the descriptor is ready); only when the caller asked to block and the call
 * would block does it wait on the gevent hub, then retry.  Where no wait is
 * possible (not activated, no hub in this thread, inside the hub, during
 * interpreter shutdown) it blocks natively, exactly as libc would.
 */
#ifndef GREENIFY_GREEN_H
#define GREENIFY_GREEN_H

#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

/* Events a green function waits for; the values are libev's EV_READ/EV_WRITE,
   which gevent's loop.io() takes as they are. */
#define GREEN_READ 1
#define GREEN_WRITE 2

/* Results of green_wait(). */
#define GREEN_WOKEN 0       /* something may be ready (or a spurious wake-up): probe again */
#define GREEN_TIMED_OUT 1   /* the deadline passed */
#define GREEN_CANNOT_WAIT 2 /* no hub to wait on here: block natively instead */
#define GREEN_INTERRUPTED 3 /* an exception was thrown into the waiting greenlet */
#define GREEN_NONBLOCKING 4 /* green_wait_io only: the fd is O_NONBLOCK, give the caller EAGAIN */
#define GREEN_FAST_UNAVAILABLE 5 /* green_fast_wait only: take the general bridge */

/* The errno a data call fails with after an interruption: libraries treat it
   as fatal for the call, unlike EINTR and EAGAIN, which they retry. */
#define GREEN_INTERRUPTED_ERRNO ETIMEDOUT

/* The green functions, for greenify.stats(): X(name) once each; the
   fortified forms count as their plain function. */
#define GREEN_FUNCTIONS(X)                                                                      \
    X(connect) X(accept) X(accept4) X(recv) X(recvfrom) X(recvmsg) X(send) X(sendto) X(sendmsg) \
    X(read) X(write) X(readv) X(writev) X(poll) X(ppoll) X(select) X(pselect) X(epoll_wait)      \
    X(epoll_pwait) X(sleep) X(usleep) X(nanosleep) X(clock_nanosleep) X(getaddrinfo)             \
    X(getnameinfo) X(gethostbyname) X(gethostbyname_r)
#define GREEN_FUNCTION_ID(name) GREEN_FN_##name,
enum green_function { GREEN_FUNCTIONS(GREEN_FUNCTION_ID) GREEN_FUNCTION_COUNT };

/* One call's waits, as counted by greenify.stats(): the call counts once,
   however many times it waits. */
struct green_call {
    int function; /* enum green_function */
    int waited;
};
#define GREEN_CALL(name) {GREEN_FN_##name, 0}

struct green_watch {
    int fd;
    int events; /* GREEN_READ | GREEN_WRITE */
};

struct green_state {
    volatile int active;             /* greenify.greenify() was called */
    volatile int finalizing;         /* the interpreter is shutting down: never enter Python */
    volatile int interrupts_pending; /* greenlets interrupted and not yet back in Python */
    volatile int waiters_registered; /* greenlets with a waiter of their own (greenify.asyncio): the bridge decides */
    int waiting;                     /* waits on a hub in progress, all threads (atomic) */
};
extern struct green_state green_state;

/* Absolute CLOCK_MONOTONIC time in nanoseconds; GREEN_NO_DEADLINE waits forever. */
#define GREEN_NO_DEADLINE INT64_MAX
int64_t green_now_ns(void);
int64_t green_deadline_after_ms(int timeout_ms);
int64_t green_deadline_after_timespec(const struct timespec *timeout);
/* Time left until a deadline, for native fallbacks: as a timespec (NULL
   for none), or as poll's milliseconds, rounded up (-1 for none). */
const struct timespec *green_time_left(int64_t deadline_ns, struct timespec *left);
int green_ms_left(int64_t deadline_ns);

/* Wait on the hub until one of the watches is ready or the deadline passes. */
int green_wait(struct green_call *call, const struct green_watch *watches, int nwatches, int64_t deadline_ns);

/* The common wait (one fd, no deadline) below Python (csrc/green_fastwait.c):
   GREEN_WOKEN, GREEN_INTERRUPTED, or GREEN_FAST_UNAVAILABLE where the
   general bridge must do it. */
int green_fast_wait(const struct green_watch *watch);
void green_fast_closing(int fd);
uintptr_t green_fast_attach(uintptr_t hub_id, uintptr_t loop, void *io_start, void *io_stop, void *feed_event);
void green_fast_hub_gone(uintptr_t handle);
int green_fast_waiting_fds(int *fds, int max);
unsigned long long green_fast_waits(void);

/* Before an fd is closed: greenlets waiting on it wake and probe again, to
   find it gone, instead of waiting for ever on a descriptor epoll dropped. */
void green_wake_waiters_on(int fd);

/* True when the calling greenlet was interrupted and is still inside C:
   every green call then fails at once instead of waiting or doing I/O. */
int green_must_fail_fast(void);

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* The check every green call makes first: one load of a global while no
   greenlet anywhere is interrupted, the bridge's answer otherwise. */
static inline int green_interrupted_here(void)
{
    return unlikely(green_state.interrupts_pending) && green_must_fail_fast();
}

/* One blocking data call's wait on one fd, with what it learns on the way:
   whether the fd is O_NONBLOCK and the socket's SO_RCVTIMEO/SO_SNDTIMEO. */
struct green_io_wait {
    struct green_call call;
    int looked_up;
    int64_t deadline_ns;
};
#define GREEN_IO_WAIT_INIT(name) {GREEN_CALL(name), 0, GREEN_NO_DEADLINE}
int green_wait_io(int fd, int events, struct green_io_wait *io_wait);

/* SO_RCVTIMEO (GREEN_READ) or SO_SNDTIMEO (GREEN_WRITE) of a socket as a
   deadline from now; GREEN_NO_DEADLINE for none or for other files. */
int64_t green_socket_timeout_deadline(int fd, int events);

/* Python-side control, called through cffi. */
void green_set_active(int active);
int green_is_active(void);
void green_set_finalizing(void);
void green_set_interrupts_pending(int count);
void green_set_waiters_registered(int count);
int green_stats_count(void);
const char *green_stats_name(int function);
void green_stats_read(int function, unsigned long long *calls, unsigned long long *wait_ns);
void green_stats_reset(void);

/* The green twins (csrc/green_io.c). */
int green_close(int fd);
int green_connect(int fd, const struct sockaddr *addr, socklen_t addrlen);
int green_accept(int fd, struct sockaddr *addr, socklen_t *addrlen);
int green_accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags);
ssize_t green_recv(int fd, void *buf, size_t len, int flags);
ssize_t green_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *addrlen);
ssize_t green_recvmsg(int fd, struct msghdr *msg, int flags);
ssize_t green_send(int fd, const void *buf, size_t len, int flags);
ssize_t green_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t addrlen);
ssize_t green_sendmsg(int fd, const struct msghdr *msg, int flags);
ssize_t green_read(int fd, void *buf, size_t count);
ssize_t green_write(int fd, const void *buf, size_t count);
ssize_t green_readv(int fd, const struct iovec *iov, int iovcnt);
ssize_t green_writev(int fd, const struct iovec *iov, int iovcnt);
ssize_t green___read_chk(int fd, void *buf, size_t nbytes, size_t buflen);
ssize_t green___recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags);
ssize_t green___recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                             struct sockaddr *addr, socklen_t *addrlen);

/* The green twins (csrc/green_poll.c). */
int green_poll(struct pollfd *fds, nfds_t nfds, int timeout);
int green_ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask);
int green_select(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds, struct timeval *timeout);
int green_pselect(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds,
                  const struct timespec *timeout, const sigset_t *sigmask);
int green___poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen);
int green___ppoll_chk(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout,
                      const sigset_t *sigmask, size_t fdslen);

/* glibc reports a fortify failure through this; it never returns. */
extern void __chk_fail(void) __attribute__((noreturn));

#endif
