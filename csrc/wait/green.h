/*
 * What the green functions share: the list of them, the run-time state,
 * green_wait(), deadlines.  The twins' prototypes are in green_twins.h.
 *
 * A green twin has the exact signature and results of the libc call it
 * replaces.  It first tries the call without blocking (one system call when
 * the descriptor is ready); only when the caller asked to block and the call
 * would block does it call green_wait(), which waits through the bridge
 * (greenify/waiting/bridge.py: the greenlet's waiter, or the thread's gevent hub),
 * then retry.  Where no wait is possible (not activated, no waiter or hub
 * for this greenlet, inside the hub, during interpreter shutdown) it blocks
 * natively, exactly as libc would.
 */
#ifndef GREENIFY_GREEN_H
#define GREENIFY_GREEN_H

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

/* Events a green function waits for; the values are libev's EV_READ/EV_WRITE,
   which gevent's loop.io() takes as they are, and the Waiter interface's. */
#define GREEN_READ 1
#define GREEN_WRITE 2

/* Results of green_wait(). */
#define GREEN_WOKEN 0       /* something may be ready (or a spurious wake-up): probe again */
#define GREEN_TIMED_OUT 1   /* the deadline passed */
#define GREEN_CANNOT_WAIT 2 /* no waiter or hub here: block natively instead */
#define GREEN_INTERRUPTED 3 /* an exception was thrown into the waiting greenlet */
#define GREEN_NONBLOCKING 4 /* green_wait_io only: the fd is O_NONBLOCK, give the caller EAGAIN */
#define GREEN_FAST_UNAVAILABLE 5 /* green_fast_wait only: take the general bridge */

/* The errno a data call fails with after an interruption: libraries treat it
   as fatal for the call, unlike EINTR and EAGAIN, which they retry. */
#define GREEN_INTERRUPTED_ERRNO ETIMEDOUT

/* Every libc call greenify knows to block, once each: the one list the
   patcher's twins, greenify-inspect's categories and greenify.stats()'
   names are derived from (through green_function_entry(), csrc/twins/green_functions.c).
   X(name, family): a green twin green_<name> exists, with libc's signature. */
#define GREEN_FUNCTIONS(X)                                                                                    \
    X(connect, "socket") X(accept, "socket") X(accept4, "socket") X(recv, "socket") X(recvfrom, "socket")    \
    X(recvmsg, "socket") X(send, "socket") X(sendto, "socket") X(sendmsg, "socket") X(read, "io")            \
    X(write, "io") X(readv, "io") X(writev, "io") X(close, "descriptor") X(poll, "poll") X(ppoll, "poll")            \
    X(select, "poll") X(pselect, "poll") X(epoll_wait, "poll") X(epoll_pwait, "poll") X(sleep, "sleep")      \
    X(usleep, "sleep") X(nanosleep, "sleep") X(clock_nanosleep, "sleep") X(getaddrinfo, "resolver")          \
    X(getnameinfo, "resolver") X(gethostbyname, "resolver") X(gethostbyname_r, "resolver")
/* glibc's _FORTIFY_SOURCE forms that have a twin of their own (green_<name>):
   X(name, plain function, family); they count as the plain function in the
   statistics. */
#define GREEN_FORTIFIED_FUNCTIONS(X)                                                                        \
    X(__read_chk, read, "io") X(__recv_chk, recv, "socket") X(__recvfrom_chk, recvfrom, "socket")          \
    X(__poll_chk, poll, "poll") X(__ppoll_chk, ppoll, "poll")
/* Calls that block but have no twin: greenify-inspect reports them as left
   alone; they are never patched.  X(name, family). */
#define GREEN_BLOCKING_WITHOUT_TWIN(X)                                                                        \
    X(recvmmsg, "socket") X(sendmmsg, "socket") X(pread, "io") X(pwrite, "io") X(pread64, "io")              \
    X(pwrite64, "io") X(gethostbyname2_r, "resolver") X(flock, "lock") X(lockf, "lock") X(fcntl, "lock")     \
    X(wait, "process") X(waitpid, "process")

#define GREEN_FUNCTION_ID(name, family) GREEN_FN_##name,
enum green_function { GREEN_FUNCTIONS(GREEN_FUNCTION_ID) GREEN_FUNCTION_COUNT };

/* One row of the list above, for Python (greenify/functions.py). */
struct green_function_entry {
    const char *name;         /* libc's symbol */
    void *twin;               /* green_<name>; NULL for a call without a twin */
    const char *family;       /* "socket", "io", "poll", "sleep", "resolver", "lock", "process", or
                                 "descriptor" for close, which never blocks (it wakes waiters) */
    const char *fortified_of; /* the plain function of a _FORTIFY_SOURCE form, else NULL */
};
/* The index-th row, NULL past the last. */
const struct green_function_entry *green_function_entry(int index);
/* Likewise for the TLS libraries' twins (csrc/twins/green_tls.h): family "tls". */
const struct green_function_entry *green_tls_function_entry(int index);

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
    int waiting;                     /* waits in Python in progress, all threads (atomic) */
    volatile int waiters_registered; /* greenlets with a waiter of their own (greenify.waiting.bridge.use_waiter) */
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

/* Wait, through the bridge, until one of the watches is ready or the
   deadline passes (csrc/wait/green_wait.c); errno is left as found. */
int green_wait(struct green_call *call, const struct green_watch *watches, int nwatches, int64_t deadline_ns);

/* The common wait (one fd) below Python (csrc/wait/green_fastwait.c):
   GREEN_WOKEN, GREEN_TIMED_OUT, GREEN_INTERRUPTED, or GREEN_FAST_UNAVAILABLE
   where the general bridge must do it.  deadline_ends_call: whether the
   caller gives up at the deadline (or only learns something then). */
int green_fast_wait(const struct green_watch *watch, int64_t deadline_ns, int deadline_ends_call);
/* Whether this thread's waits would go there (an attached hub, nothing for
   the bridge to decide), as far as that is known before the wait. */
int green_fast_wait_available(void);
void green_fast_closing(int fd);
void green_fast_refresh(void);
uintptr_t green_fast_attach(uintptr_t hub_id, uintptr_t loop, void *io_start, void *io_stop, void *feed_event,
                            void *timer_start, void *timer_stop, void *now_update);
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
/* What poll, select and epoll answer an interrupted greenlet (after the
   interrupted wait, and when it asks again): "nothing ready" (0) the first
   time, a timeout libraries give up on; -1 with GREEN_INTERRUPTED_ERRNO
   after that, so that a library that loops on timeouts (psycopg 3's wait_c
   polls in 0.1 s ticks) cannot spin in C for ever: the error takes it back
   to Python, where the interruption is delivered. */
int green_interrupted_readiness(void);

static inline int green_interrupted_here(void)
{
    return unlikely(green_state.interrupts_pending) && green_must_fail_fast();
}

/* The receive this thread last saw the kernel refuse with EAGAIN: a poll
   that asks for just that descriptor's input right after need not ask the
   kernel first (csrc/twins/green_poll.c).  Only a hint: poll's answer still comes
   from the kernel. */
extern __thread int green_last_refused_fd;

static inline ssize_t green_noting_refusal(ssize_t result, int fd)
{
    if (unlikely(result < 0) && errno == EAGAIN)
        green_last_refused_fd = fd;
    return result;
}

/* One blocking data call's wait on one fd, with what it learns on the way:
   whether the fd is O_NONBLOCK and the socket's SO_RCVTIMEO/SO_SNDTIMEO
   (read only once the wait lasts a few milliseconds: csrc/wait/green_wait.c). */
enum { GREEN_IO_UNKNOWN, GREEN_IO_KNOWN, GREEN_IO_TIMEOUT_UNREAD };
struct green_io_wait {
    struct green_call call;
    int looked_up;       /* GREEN_IO_* */
    int64_t deadline_ns; /* once GREEN_IO_KNOWN */
    int64_t started_ns;  /* while GREEN_IO_TIMEOUT_UNREAD: when the timeout counts from */
};
#define GREEN_IO_WAIT_FOR(function) {{(function), 0}, GREEN_IO_UNKNOWN, GREEN_NO_DEADLINE, 0}
#define GREEN_IO_WAIT_INIT(name) GREEN_IO_WAIT_FOR(GREEN_FN_##name)
int green_wait_io(int fd, int events, struct green_io_wait *io_wait);
/* Its steps, for a call that waits otherwise too (csrc/twins/green_io.c's
   recv_whole, connect): the look at O_NONBLOCK before the first wait
   (GREEN_NONBLOCKING: the kernel would not wait; 0: the call's start is
   noted), and the read of SO_RCVTIMEO (GREEN_READ) or SO_SNDTIMEO
   (GREEN_WRITE) as the call's deadline, counted from its start. */
int green_io_wait_begin(int fd, struct green_io_wait *io_wait);
void green_io_wait_read_timeout(int fd, int events, struct green_io_wait *io_wait);

/* Python-side control, called through cffi. */
void green_set_active(int active);
int green_is_active(void);
void green_set_finalizing(void);
void green_set_interrupts_pending(int count);
void green_set_waiters_registered(int count);

/* Wait statistics (csrc/wait/green_stats.c): a call that waited, counted once,
   and the time it waited; read by greenify.stats(). */
void green_stats_count_wait(struct green_call *call, int64_t started_ns);
int green_stats_count(void);
const char *green_stats_name(int function);
void green_stats_read(int function, unsigned long long *calls, unsigned long long *wait_ns);
void green_stats_reset(void);

/* glibc reports a fortify failure through this; it never returns. */
extern void __chk_fail(void) __attribute__((noreturn));

#endif
