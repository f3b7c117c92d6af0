/*
 * green_wait() and green_wait_io(): the one place a green function's wait
 * leaves C, through the fast wait below Python (green_fastwait.c) or the
 * door into Python (green_python.c).  The state and clock are in
 * green_state.c, statistics in green_stats.c, the delivery of interruptions
 * in green_deliver.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/time.h>

#include "green.h"
#include "green_python.h"

#define NS_PER_SECOND 1000000000LL
#define NS_PER_MS 1000000LL
#define NS_PER_US 1000LL


int green_ms_left(int64_t deadline_ns)
{
    int64_t ns;
    if (deadline_ns == GREEN_NO_DEADLINE)
        return -1;
    ns = deadline_ns - green_now_ns();
    if (ns <= 0)
        return 0;
    if (ns / NS_PER_MS >= INT_MAX)
        return INT_MAX;
    return (int)((ns + NS_PER_MS - 1) / NS_PER_MS);
}

/* ---- waiting ---- */

/* An interrupted wait leaves the connections it waited on unusable, as the
   README promises: each connected stream socket among them is shut down, so
   the library's next use of it fails for good.  Failing the call alone is
   not enough: libpq takes a poll that "timed out" as an error, keeps the
   connection, and the next query read the interrupted query's late answer.
   Listening sockets, datagram sockets and other files are left alone. */
static void shut_interrupted_connections(const struct green_watch *watches, int nwatches)
{
    for (int i = 0; i < nwatches; i++) {
        int type = 0, listening = 0;
        socklen_t size = sizeof type;
        if (getsockopt(watches[i].fd, SOL_SOCKET, SO_TYPE, &type, &size) != 0 || type != SOCK_STREAM)
            continue;
        size = sizeof listening;
        if (getsockopt(watches[i].fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) != 0 || listening)
            continue;
        shutdown(watches[i].fd, SHUT_RDWR);
    }
}

/* green_wait, and green_wait_io's first wait, whose deadline is only when
   it reads the socket's timeout (deadline_ends_call 0). */
/* Readiness answers given to this thread's interrupted greenlet since its
   last wait began (green_interrupted_readiness). */
static __thread unsigned interrupted_answers;

int green_interrupted_readiness(void)
{
    if (interrupted_answers++ == 0)
        return 0;
    errno = GREEN_INTERRUPTED_ERRNO;
    return -1;
}

static int wait_until(struct green_call *call, const struct green_watch *watches, int nwatches, int64_t deadline_ns,
                      int deadline_ends_call)
{
    double timeout_s = -1.0;
    int saved_errno = errno;
    int64_t started_ns;
    int result;

    if (!green_state.active || green_state.finalizing)
        return GREEN_CANNOT_WAIT;
    interrupted_answers = 0;
    started_ns = green_now_ns();
    if (deadline_ns != GREEN_NO_DEADLINE) {
        int64_t left = deadline_ns - started_ns;
        if (left <= 0)
            return GREEN_TIMED_OUT;
        timeout_s = (double)left / 1e9;
    }
    __atomic_add_fetch(&green_state.waiting, 1, __ATOMIC_RELAXED);
    /* The common wait (one descriptor) below Python first
       (csrc/wait/green_fastwait.c); everything else, and whatever it declines,
       through the bridge. */
    result = nwatches == 1 ? green_fast_wait(watches, deadline_ns, deadline_ends_call) : GREEN_FAST_UNAVAILABLE;
    if (result == GREEN_FAST_UNAVAILABLE)
        result = green_python_wait(watches, nwatches, timeout_s);
    __atomic_sub_fetch(&green_state.waiting, 1, __ATOMIC_RELAXED);
    if (result != GREEN_CANNOT_WAIT)
        green_stats_count_wait(call, started_ns);
    if (result == GREEN_INTERRUPTED) {
        shut_interrupted_connections(watches, nwatches);
        green_arm_delivery();
    }
    else if (result == GREEN_TIMED_OUT && deadline_ns != GREEN_NO_DEADLINE && green_now_ns() < deadline_ns)
        result = GREEN_WOKEN; /* the loop's clock ran ahead of ours: probe and wait the rest */
    errno = saved_errno;
    return result;
}

int green_wait(struct green_call *call, const struct green_watch *watches, int nwatches, int64_t deadline_ns)
{
    return wait_until(call, watches, nwatches, deadline_ns, 1);
}

int green_must_fail_fast(void)
{
    if (green_state.finalizing || !green_python_interrupted())
        return 0;
    /* Armed again (at no cost when armed still): a trace function replaced
       meanwhile (a debugger, sys.settrace(None)) must not strand the kept
       exception, with every call of the greenlet failing fast for ever. */
    green_arm_delivery();
    return 1;
}

void green_wake_waiters_on(int fd)
{
    green_fast_closing(fd);
    if (green_state.active && !green_state.finalizing && __atomic_load_n(&green_state.waiting, __ATOMIC_RELAXED))
        green_python_closing(fd);
}

/* SO_RCVTIMEO/SO_SNDTIMEO of a socket, as a deadline counted from
   from_ns; none for other files or a zero timeout. */
static int64_t socket_timeout_deadline(int fd, int events, int64_t from_ns)
{
    struct timeval timeout;
    socklen_t size = sizeof timeout;
    int option = (events & GREEN_WRITE) ? SO_SNDTIMEO : SO_RCVTIMEO;
    if (getsockopt(fd, SOL_SOCKET, option, &timeout, &size) != 0)
        return GREEN_NO_DEADLINE;
    if (timeout.tv_sec == 0 && timeout.tv_usec == 0)
        return GREEN_NO_DEADLINE;
    return from_ns + (int64_t)timeout.tv_sec * NS_PER_SECOND + (int64_t)timeout.tv_usec * NS_PER_US;
}

/* A blocking call whose wait goes below Python (green_fast_wait) reads its
   socket's SO_RCVTIMEO/SO_SNDTIMEO only once that wait has lasted this
   long: most waits end sooner and never pay for the system call (a libev
   timer costs none).  A shorter timeout ends the call this late instead (the kernel itself keeps
   one only to its clock tick, 1 to 10 ms).  A wait through the bridge reads
   it at once: a waiter sees the call's real deadline, and a Python wait
   costs more than the system call. */
#define TIMEOUT_READ_AFTER_NS (3 * NS_PER_MS)

int green_io_wait_begin(int fd, struct green_io_wait *io_wait)
{
    int saved_errno = errno;
    int flags = fcntl(fd, F_GETFL);
    errno = saved_errno;
    if (flags >= 0 && (flags & O_NONBLOCK))
        return GREEN_NONBLOCKING;
    io_wait->looked_up = GREEN_IO_TIMEOUT_UNREAD;
    io_wait->started_ns = green_now_ns();
    return 0;
}

void green_io_wait_read_timeout(int fd, int events, struct green_io_wait *io_wait)
{
    int saved_errno = errno;
    io_wait->deadline_ns = socket_timeout_deadline(fd, events, io_wait->started_ns);
    io_wait->looked_up = GREEN_IO_KNOWN;
    errno = saved_errno;
}

int green_wait_io(int fd, int events, struct green_io_wait *io_wait)
{
    struct green_watch watch = {fd, events};
    if (io_wait->looked_up == GREEN_IO_UNKNOWN && green_io_wait_begin(fd, io_wait) == GREEN_NONBLOCKING)
        return GREEN_NONBLOCKING;
    if (io_wait->looked_up == GREEN_IO_TIMEOUT_UNREAD) {
        int64_t read_at = io_wait->started_ns + TIMEOUT_READ_AFTER_NS;
        if (green_fast_wait_available() && green_now_ns() < read_at) {
            int status = wait_until(&io_wait->call, &watch, 1, read_at, 0);
            if (status != GREEN_TIMED_OUT)
                return status;
        }
        green_io_wait_read_timeout(fd, events, io_wait);
        if (io_wait->deadline_ns != GREEN_NO_DEADLINE && green_now_ns() >= io_wait->deadline_ns)
            return GREEN_TIMED_OUT;
    }
    return green_wait(&io_wait->call, &watch, 1, io_wait->deadline_ns);
}
