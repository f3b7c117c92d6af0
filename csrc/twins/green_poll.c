/*
 * Green twins of the multiplexing calls: poll, ppoll, select, pselect and
 * the fortified __poll_chk/__ppoll_chk.
 *
 * Each probes with a zero timeout first (one system call when something is
 * ready, results straight from the kernel).  Otherwise it waits on the hub
 * for any of the descriptors, probes again, and keeps its own deadline, so
 * spurious wake-ups never end the call early.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "green.h"


/* Masks libev can watch exactly; anything else (POLLPRI, POLLRDHUP alone,
   POLLERR alone, the band events) goes through a private epoll set. */
#define READ_EVENTS (POLLIN | POLLRDNORM)
#define WRITE_EVENTS (POLLOUT | POLLWRNORM)
#define ALWAYS_REPORTED (POLLERR | POLLHUP | POLLNVAL)
#define EPOLL_EXPRESSIBLE \
    (POLLIN | POLLPRI | POLLOUT | POLLRDNORM | POLLRDBAND | POLLWRNORM | POLLWRBAND | POLLMSG | POLLRDHUP)
#define MAX_DIRECT_WATCHES 16

static const struct timespec zero_timeout = {0, 0};

/* ---- the first probe ----
   Every multiplexing twin first asks the kernel with a zero timeout: one
   system call when something is ready, the kernel's own results and errors
   (EBADF, EINVAL, EFAULT, POLLNVAL) for every argument.  Only when nothing
   is ready does it wait on the hub. */

static int first_probe_poll(struct pollfd *fds, nfds_t nfds, const sigset_t *sigmask)
{
    return sigmask == NULL ? poll(fds, nfds, 0) : ppoll(fds, nfds, &zero_timeout, sigmask);
}

static int first_probe_select(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds,
                              const sigset_t *sigmask)
{
    return pselect(nfds, readfds, writefds, exceptfds, &zero_timeout, sigmask);
}

static int watchable_directly(short events)
{
    if (events & ~(READ_EVENTS | WRITE_EVENTS | ALWAYS_REPORTED | POLLRDHUP))
        return 0;
    if (!(events & (READ_EVENTS | WRITE_EVENTS)))
        return 0;
    return !(events & POLLRDHUP) || (events & READ_EVENTS); /* EOF makes POLLIN true too */
}

/* What one poll-style wait watches on the hub. */
struct poll_waiter {
    struct green_watch watches[MAX_DIRECT_WATCHES];
    int nwatches;
    int epoll_fd;
};

static void add_to_epoll(int epoll_fd, const struct pollfd *fds, nfds_t index)
{
    struct epoll_event event;
    memset(&event, 0, sizeof event);
    event.events = (uint32_t)(fds[index].events & EPOLL_EXPRESSIBLE);
    event.data.fd = fds[index].fd;
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fds[index].fd, &event) == 0)
        return;
    if (errno == EEXIST) { /* the same fd twice: watch the union of its masks */
        for (nfds_t i = 0; i < index; i++)
            if (fds[i].fd == fds[index].fd)
                event.events |= (uint32_t)(fds[i].events & EPOLL_EXPRESSIBLE);
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, fds[index].fd, &event);
    }
    /* EPERM: a regular file, always ready, which the probe already reported */
}

static int poll_waiter_init(struct poll_waiter *waiter, const struct pollfd *fds, nfds_t nfds)
{
    int direct = nfds <= MAX_DIRECT_WATCHES;
    waiter->nwatches = 0;
    waiter->epoll_fd = -1;
    for (nfds_t i = 0; direct && i < nfds; i++)
        if (fds[i].fd >= 0 && !watchable_directly(fds[i].events))
            direct = 0;
    if (direct) {
        for (nfds_t i = 0; i < nfds; i++) {
            if (fds[i].fd < 0)
                continue;
            waiter->watches[waiter->nwatches].fd = fds[i].fd;
            waiter->watches[waiter->nwatches].events = ((fds[i].events & READ_EVENTS) ? GREEN_READ : 0) |
                                                       ((fds[i].events & WRITE_EVENTS) ? GREEN_WRITE : 0);
            waiter->nwatches++;
        }
        return 0;
    }
    waiter->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (waiter->epoll_fd < 0)
        return -1;
    for (nfds_t i = 0; i < nfds; i++)
        if (fds[i].fd >= 0)
            add_to_epoll(waiter->epoll_fd, fds, i);
    waiter->watches[0].fd = waiter->epoll_fd;
    waiter->watches[0].events = GREEN_READ;
    waiter->nwatches = 1;
    return 0;
}

static void poll_waiter_close(struct poll_waiter *waiter)
{
    if (waiter->epoll_fd >= 0) {
        /* The next private set will most likely get the same number: the
           hub must forget this one's registration, or it never reports the
           next one ready (libldap's POLLIN|POLLPRI waits woke only at the
           hub's once-a-second sweep). */
        green_wake_waiters_on(waiter->epoll_fd);
        close(waiter->epoll_fd);
    }
}

/* poll and ppoll after a zero-timeout probe found nothing ready. */
static int poll_until(int function, struct pollfd *fds, nfds_t nfds, int64_t deadline_ns, const sigset_t *sigmask,
                      int saved_errno)
{
    struct green_call stats = {function, 0};
    struct poll_waiter waiter;
    struct timespec left;
    int status, ready;

    if (poll_waiter_init(&waiter, fds, nfds) != 0) {
        errno = saved_errno;
        return ppoll(fds, nfds, green_time_left(deadline_ns, &left), sigmask);
    }
    for (;;) {
        status = green_wait(&stats, waiter.watches, waiter.nwatches, deadline_ns);
        if (status == GREEN_CANNOT_WAIT) {
            poll_waiter_close(&waiter);
            errno = saved_errno;
            return ppoll(fds, nfds, green_time_left(deadline_ns, &left), sigmask);
        }
        if (status == GREEN_INTERRUPTED) {
            poll_waiter_close(&waiter);
            errno = saved_errno;
            return green_interrupted_readiness(); /* 0: a timeout, which libraries give up on */
        }
        ready = ppoll(fds, nfds, &zero_timeout, sigmask);
        if (ready != 0 || status == GREEN_TIMED_OUT) {
            poll_waiter_close(&waiter);
            if (ready >= 0)
                errno = saved_errno;
            return ready;
        }
    }
}

/* Whether [p, p + size) lies between the caller's frames and the top of
   this thread's stack: memory that is certainly mapped, readable and
   writable, so it can be read before the kernel has judged the pointer. */
static int on_live_stack(const void *p, size_t size)
{
    static __thread const char *stack_low, *stack_high;
    const char *here = __builtin_frame_address(0);
    if (stack_high == NULL) {
        pthread_attr_t attributes;
        void *low;
        size_t length;
        stack_low = stack_high = "";  /* unknown: never on it */
        if (pthread_getattr_np(pthread_self(), &attributes) == 0) {
            if (pthread_attr_getstack(&attributes, &low, &length) == 0) {
                stack_low = low;
                stack_high = (const char *)low + length;
            }
            pthread_attr_destroy(&attributes);
        }
    }
    return here >= stack_low && here < stack_high && (const char *)p >= here &&
           (const char *)p + size <= stack_high;
}

/* A poll for input on just the descriptor whose receive the kernel refused
   last in this thread (libmariadb's recv, then poll): asking the kernel
   again first would most likely be refused again, so the wait starts at
   once; the answer still comes from the kernel after it.  The poll's
   pointer is read only where that cannot fault (where libc's poll would
   give EFAULT, this one must too). */
static int refused_just_now(struct pollfd *fds, nfds_t nfds)
{
    int refused = green_last_refused_fd;
    green_last_refused_fd = -1;
    if (refused < 0 || nfds != 1 || !on_live_stack(fds, sizeof *fds))
        return 0;
    if (fds->fd != refused || (fds->events & ~ALWAYS_REPORTED) != POLLIN)
        return 0;
    fds->revents = 0;
    return 1;
}

static int poll_fail_fast(struct pollfd *fds, nfds_t nfds)
{
    for (nfds_t i = 0; i < nfds; i++)
        fds[i].revents = 0;
    return green_interrupted_readiness();
}

int green_poll(struct pollfd *fds, nfds_t nfds, int timeout)
{
    int ready, saved_errno;
    if (!green_state.active)
        return poll(fds, nfds, timeout);
    if (green_interrupted_here())
        return poll_fail_fast(fds, nfds);
    saved_errno = errno;
    if (timeout == 0 || !refused_just_now(fds, nfds)) {
        ready = first_probe_poll(fds, nfds, NULL);
        if (ready != 0 || timeout == 0)
            return ready;
    }
    return poll_until(GREEN_FN_poll, fds, nfds, green_deadline_after_ms(timeout), NULL, saved_errno);
}

static int valid_timespec(const struct timespec *timeout)
{
    return timeout == NULL || (timeout->tv_sec >= 0 && timeout->tv_nsec >= 0 && timeout->tv_nsec < 1000000000);
}

int green_ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask)
{
    int ready, saved_errno;
    if (!green_state.active || !valid_timespec(timeout))
        return ppoll(fds, nfds, timeout, sigmask);
    if (green_interrupted_here())
        return poll_fail_fast(fds, nfds);
    saved_errno = errno;
    ready = first_probe_poll(fds, nfds, sigmask);
    if (ready != 0 || (timeout != NULL && timeout->tv_sec == 0 && timeout->tv_nsec == 0))
        return ready;
    return poll_until(GREEN_FN_ppoll, fds, nfds, green_deadline_after_timespec(timeout), sigmask, saved_errno);
}

int green___poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen)
{
    if (fdslen / sizeof(*fds) < nfds)
        __chk_fail();
    return green_poll(fds, nfds, timeout);
}

int green___ppoll_chk(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask,
                      size_t fdslen)
{
    if (fdslen / sizeof(*fds) < nfds)
        __chk_fail();
    return green_ppoll(fds, nfds, timeout, sigmask);
}

/* ---- select and pselect ---- */

/* The caller's fd_sets as they came in: a probe overwrites them. */
struct select_sets {
    fd_set *live[3];
    fd_set saved[3];
    size_t bytes;
};

static void select_sets_save(struct select_sets *sets, int nfds, fd_set *readfds, fd_set *writefds,
                             fd_set *exceptfds)
{
    sets->live[0] = readfds;
    sets->live[1] = writefds;
    sets->live[2] = exceptfds;
    sets->bytes = ((size_t)nfds + 8 * sizeof(long) - 1) / (8 * sizeof(long)) * sizeof(long);
    for (int i = 0; i < 3; i++)
        if (sets->live[i] != NULL)
            memcpy(&sets->saved[i], sets->live[i], sets->bytes);
}

static void select_sets_restore(struct select_sets *sets)
{
    for (int i = 0; i < 3; i++)
        if (sets->live[i] != NULL)
            memcpy(sets->live[i], &sets->saved[i], sets->bytes);
}

static void select_sets_clear(struct select_sets *sets)
{
    for (int i = 0; i < 3; i++)
        if (sets->live[i] != NULL)
            memset(sets->live[i], 0, sets->bytes);
}

/* What select watches, as pollfds: read set -> POLLIN, write set -> POLLOUT,
   except set -> POLLPRI. */
static nfds_t select_to_pollfds(const struct select_sets *sets, int nfds, struct pollfd *fds)
{
    static const short events_of_set[3] = {POLLIN, POLLOUT, POLLPRI};
    nfds_t count = 0;
    for (int fd = 0; fd < nfds; fd++) {
        short events = 0;
        for (int i = 0; i < 3; i++)
            if (sets->live[i] != NULL && FD_ISSET(fd, &sets->saved[i]))
                events |= events_of_set[i];
        if (events) {
            fds[count].fd = fd;
            fds[count].events = events;
            fds[count].revents = 0;
            count++;
        }
    }
    return count;
}

/* What Linux's select leaves in *timeout on every return: the time left,
   normalized, in whole microseconds. */
static void write_time_left(int64_t deadline_ns, struct timeval *timeout)
{
    struct timespec left;
    if (timeout == NULL || green_time_left(deadline_ns, &left) == NULL)
        return;
    timeout->tv_sec = left.tv_sec;
    timeout->tv_usec = left.tv_nsec / 1000;
}

/* select ignores numbers beyond the process's descriptor table (closed, so
   never ready): the hub watches open descriptors only, so they are left out
   of the wait, found by the POLLNVAL a probe gives them. */
static nfds_t leave_out_closed(struct pollfd *fds, nfds_t count)
{
    nfds_t kept = 0;
    int saved_errno = errno;
    if (poll(fds, count, 0) < 0) {
        errno = saved_errno;
        return count;
    }
    errno = saved_errno;
    for (nfds_t i = 0; i < count; i++) {
        if (fds[i].revents & POLLNVAL)
            continue;
        fds[kept] = fds[i];
        fds[kept].revents = 0;
        kept++;
    }
    return kept;
}

/* select and pselect after a zero-timeout probe found nothing ready.
   Updates *timeval_left (select's timeout) with the time left, as Linux does. */
static int select_until(int function, int nfds, struct select_sets *sets, int64_t deadline_ns, const sigset_t *sigmask,
                        struct timeval *timeval_left, int saved_errno)
{
    struct pollfd inline_fds[64];
    struct pollfd *fds = inline_fds;
    struct poll_waiter waiter;
    struct green_call stats = {function, 0};
    struct timespec left;
    nfds_t count;
    int status, ready = -1;

    if (nfds > (int)(sizeof inline_fds / sizeof inline_fds[0])) {
        fds = malloc(sizeof(struct pollfd) * (size_t)nfds);
        if (fds == NULL) {
            errno = ENOMEM;
            return -1;
        }
    }
    count = leave_out_closed(fds, select_to_pollfds(sets, nfds, fds));
    if (poll_waiter_init(&waiter, fds, count) != 0)
        status = GREEN_CANNOT_WAIT;
    else
        status = green_wait(&stats, waiter.watches, waiter.nwatches, deadline_ns);
    for (;;) {
        const struct timespec *wait_left;
        if (status == GREEN_INTERRUPTED) {
            select_sets_clear(sets);
            ready = green_interrupted_readiness();
            break;
        }
        select_sets_restore(sets);
        wait_left = status == GREEN_CANNOT_WAIT ? green_time_left(deadline_ns, &left) : &zero_timeout;
        errno = saved_errno;
        ready = pselect(nfds, sets->live[0], sets->live[1], sets->live[2], wait_left, sigmask);
        if (ready != 0 || status != GREEN_WOKEN)
            break;
        status = green_wait(&stats, waiter.watches, waiter.nwatches, deadline_ns);
    }
    poll_waiter_close(&waiter);
    if (fds != inline_fds)
        free(fds);
    write_time_left(deadline_ns, timeval_left);
    if (ready >= 0)
        errno = saved_errno;
    return ready;
}

static int select_fail_fast(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds)
{
    struct select_sets sets;
    select_sets_save(&sets, nfds, readfds, writefds, exceptfds);
    select_sets_clear(&sets);
    return green_interrupted_readiness();
}

int green_select(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds, struct timeval *timeout)
{
    struct select_sets sets;
    struct timespec timeout_ts;
    int64_t deadline_ns;
    int ready, saved_errno;

    if (!green_state.active || nfds < 0 || nfds > FD_SETSIZE ||
        (timeout != NULL && (timeout->tv_sec < 0 || timeout->tv_usec < 0)))
        return select(nfds, readfds, writefds, exceptfds, timeout);
    if (green_interrupted_here())
        return select_fail_fast(nfds, readfds, writefds, exceptfds);
    saved_errno = errno;
    if (timeout != NULL) {
        timeout_ts.tv_sec = timeout->tv_sec + timeout->tv_usec / 1000000;
        timeout_ts.tv_nsec = (timeout->tv_usec % 1000000) * 1000;
    }
    deadline_ns = green_deadline_after_timespec(timeout != NULL ? &timeout_ts : NULL);
    select_sets_save(&sets, nfds, readfds, writefds, exceptfds);
    ready = first_probe_select(nfds, readfds, writefds, exceptfds, NULL);
    if (ready != 0 || (timeout != NULL && timeout->tv_sec == 0 && timeout->tv_usec == 0)) {
        write_time_left(deadline_ns, timeout);
        return ready;
    }
    return select_until(GREEN_FN_select, nfds, &sets, deadline_ns, NULL, timeout, saved_errno);
}

int green_pselect(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds, const struct timespec *timeout,
                  const sigset_t *sigmask)
{
    struct select_sets sets;
    int ready, saved_errno;

    if (!green_state.active || nfds < 0 || nfds > FD_SETSIZE || !valid_timespec(timeout))
        return pselect(nfds, readfds, writefds, exceptfds, timeout, sigmask);
    if (green_interrupted_here())
        return select_fail_fast(nfds, readfds, writefds, exceptfds);
    saved_errno = errno;
    select_sets_save(&sets, nfds, readfds, writefds, exceptfds);
    ready = first_probe_select(nfds, readfds, writefds, exceptfds, sigmask);
    if (ready != 0 || (timeout != NULL && timeout->tv_sec == 0 && timeout->tv_nsec == 0))
        return ready;
    return select_until(GREEN_FN_pselect, nfds, &sets, green_deadline_after_timespec(timeout), sigmask, NULL, saved_errno);
}
