/*
 * Green twins of epoll_wait and epoll_pwait.
 *
 * An epoll instance is itself a descriptor, readable while its ready list is
 * not empty.  So: probe with a zero timeout (one system call when events are
 * ready, the kernel's own results); otherwise wait on the hub for the epoll
 * fd to become readable, probe again, and keep the caller's deadline across
 * wake-ups that find nothing (an entry that stopped being ready, another
 * reader that took the events first).
 */
#include <errno.h>
#include <limits.h>

#include "green_twins.h"


/* epoll_wait and epoll_pwait after a zero-timeout probe found nothing. */
static int epoll_until(int function, int epfd, struct epoll_event *events, int maxevents, int64_t deadline_ns,
                       const sigset_t *sigmask, int saved_errno)
{
    struct green_watch watch = {epfd, GREEN_READ};
    struct green_call stats = {function, 0};
    int status, ready;
    for (;;) {
        status = green_wait(&stats, &watch, 1, deadline_ns);
        if (status == GREEN_CANNOT_WAIT) {
            errno = saved_errno;
            return epoll_pwait(epfd, events, maxevents, green_ms_left(deadline_ns), sigmask);
        }
        if (status == GREEN_INTERRUPTED) {
            errno = saved_errno;
            return green_interrupted_readiness(); /* 0: a timeout, which libraries give up on */
        }
        ready = epoll_pwait(epfd, events, maxevents, 0, sigmask);
        if (ready != 0 || status == GREEN_TIMED_OUT) {
            if (ready >= 0)
                errno = saved_errno;
            return ready;
        }
    }
}

int green_epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout, const sigset_t *sigmask)
{
    int ready, saved_errno;
    if (!green_state.active)
        return epoll_pwait(epfd, events, maxevents, timeout, sigmask);
    if (green_interrupted_here())
        return green_interrupted_readiness();
    saved_errno = errno;
    ready = epoll_pwait(epfd, events, maxevents, 0, sigmask);
    if (ready != 0 || timeout == 0) /* events, or an error (EBADF, EINVAL, EFAULT) as the kernel gives it */
        return ready;
    return epoll_until(GREEN_FN_epoll_pwait, epfd, events, maxevents, green_deadline_after_ms(timeout), sigmask, saved_errno);
}

int green_epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout)
{
    int ready, saved_errno;
    if (!green_state.active)
        return epoll_wait(epfd, events, maxevents, timeout);
    if (green_interrupted_here())
        return green_interrupted_readiness();
    saved_errno = errno;
    ready = epoll_wait(epfd, events, maxevents, 0);
    if (ready != 0 || timeout == 0)
        return ready;
    return epoll_until(GREEN_FN_epoll_wait, epfd, events, maxevents, green_deadline_after_ms(timeout), NULL, saved_errno);
}
