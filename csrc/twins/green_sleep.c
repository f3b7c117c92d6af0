/*
 * Green twins of the sleeps: sleep, usleep, nanosleep, clock_nanosleep.
 *
 * A sleep becomes a timer on the hub (green_wait with no descriptors), kept
 * on CLOCK_MONOTONIC across spurious wake-ups, so other greenlets run
 * meanwhile.  Results are libc's: sleep returns 0 once the time is up,
 * clock_nanosleep returns an error number instead of setting errno, invalid
 * arguments go to libc, which rejects them with EINVAL exactly.
 *
 * Interruption (gevent.Timeout, kill): the sleep returns as if it had run to
 * its end (0, *rem untouched).  Not EINTR: code sleeping through signals
 * loops on EINTR with the time left (`while (nanosleep(&t, &t) == -1 &&
 * errno == EINTR);`), and since every green call of an interrupted greenlet
 * fails at once, such a loop would spin until it slept the whole time.  A
 * finished sleep is the one result no caller retries; the thrown exception is
 * raised when the call is back in Python.
 *
 * A hub sleep never ends early on a signal (the hub takes the signal and the
 * greenlet sleeps on), so the EINTR results appear only on the native path.
 */
#include <errno.h>

#include "green_twins.h"

#define NS_PER_SECOND 1000000000LL

/* Sleeps on the hub until deadline_ns.  Returns GREEN_TIMED_OUT (slept),
   GREEN_INTERRUPTED or GREEN_CANNOT_WAIT; *waited says whether time passed
   on the hub, so a native fallback knows whether it may use the caller's own
   arguments. */
static int sleep_on_hub(struct green_call *call, int64_t deadline_ns, int *waited)
{
    int status;
    *waited = 0;
    for (;;) {
        status = green_wait(call, NULL, 0, deadline_ns);
        if (status != GREEN_WOKEN)
            return status;
        *waited = 1; /* a spurious wake-up: sleep the rest */
    }
}

static int valid_request(const struct timespec *req)
{
    return req != NULL && req->tv_sec >= 0 && req->tv_nsec >= 0 && req->tv_nsec < NS_PER_SECOND;
}

/* A relative sleep of *req on the hub.  Returns 0 when done (or
   interrupted), or GREEN_CANNOT_WAIT with *left set to what remains. */
static int relative_sleep(struct green_call *call, const struct timespec *req, struct timespec *left, int *waited)
{
    int64_t deadline_ns = green_deadline_after_timespec(req);
    int status = sleep_on_hub(call, deadline_ns, waited);
    if (status != GREEN_CANNOT_WAIT)
        return 0;
    if (!*waited || green_time_left(deadline_ns, left) == NULL)
        *left = *req; /* nothing slept yet, or a sleep too long to have a deadline */
    return GREEN_CANNOT_WAIT;
}

unsigned int green_sleep(unsigned int seconds)
{
    struct timespec req = {(time_t)seconds, 0}, left;
    struct green_call call = GREEN_CALL(sleep);
    int waited;
    if (!green_state.active || seconds == 0)
        return sleep(seconds);
    if (green_interrupted_here())
        return 0;
    if (relative_sleep(&call, &req, &left, &waited) == 0)
        return 0;
    if (!waited)
        return sleep(seconds);
    /* as glibc's sleep: whole seconds not slept when a signal ends it */
    if (nanosleep(&left, &left) == 0)
        return 0;
    return (unsigned int)left.tv_sec;
}

int green_usleep(useconds_t usec)
{
    struct timespec req = {(time_t)(usec / 1000000), (long)(usec % 1000000) * 1000}, left;
    struct green_call call = GREEN_CALL(usleep);
    int waited;
    if (!green_state.active || usec == 0)
        return usleep(usec);
    if (green_interrupted_here())
        return 0;
    if (relative_sleep(&call, &req, &left, &waited) == 0)
        return 0;
    return waited ? nanosleep(&left, NULL) : usleep(usec);
}

int green_nanosleep(const struct timespec *req, struct timespec *rem)
{
    struct timespec left;
    struct green_call call = GREEN_CALL(nanosleep);
    int waited;
    if (!green_state.active || !valid_request(req) || (req->tv_sec == 0 && req->tv_nsec == 0))
        return nanosleep(req, rem);
    if (green_interrupted_here())
        return 0;
    if (relative_sleep(&call, req, &left, &waited) == 0)
        return 0;
    return nanosleep(waited ? &left : req, rem);
}

/* Clocks that advance with real time and can be read with clock_gettime;
   CPU-time clocks and unknown ids go to libc (which sleeps or refuses). */
static int sleepable_clock(clockid_t clock_id)
{
    return clock_id == CLOCK_MONOTONIC || clock_id == CLOCK_REALTIME || clock_id == CLOCK_BOOTTIME ||
           clock_id == CLOCK_TAI;
}

/* An absolute sleep until *req on clock_id.  The time left is read from
   that clock after every wake-up, so a CLOCK_REALTIME sleep follows a clock
   that was set while it slept (at the next wake-up, not at once). */
static int absolute_sleep(struct green_call *call, clockid_t clock_id, const struct timespec *req)
{
    for (;;) {
        struct timespec now;
        int64_t left_s, left_ns;
        int status, waited;
        clock_gettime(clock_id, &now);
        left_s = (int64_t)req->tv_sec - now.tv_sec;
        if (left_s > INT64_MAX / NS_PER_SECOND - 1)
            left_ns = INT64_MAX; /* as good as forever; avoids overflow */
        else
            left_ns = left_s * NS_PER_SECOND + (req->tv_nsec - now.tv_nsec);
        if (left_ns <= 0)
            return 0;
        status = sleep_on_hub(call, left_ns == INT64_MAX ? GREEN_NO_DEADLINE : green_now_ns() + left_ns, &waited);
        if (status != GREEN_TIMED_OUT)
            return status; /* GREEN_INTERRUPTED or GREEN_CANNOT_WAIT */
    }
}

int green_clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem)
{
    struct timespec left;
    struct green_call call = GREEN_CALL(clock_nanosleep);
    int waited, saved_errno;
    if (!green_state.active || !sleepable_clock(clock_id) || !valid_request(req) ||
        (req->tv_sec == 0 && req->tv_nsec == 0))
        return clock_nanosleep(clock_id, flags, req, rem);
    if (green_interrupted_here())
        return 0;
    saved_errno = errno;
    if (flags & TIMER_ABSTIME) {
        if (absolute_sleep(&call, clock_id, req) != GREEN_CANNOT_WAIT)
            return 0;
        errno = saved_errno;
        return clock_nanosleep(clock_id, flags, req, rem);
    }
    if (relative_sleep(&call, req, &left, &waited) == 0)
        return 0;
    errno = saved_errno;
    return clock_nanosleep(clock_id, flags, waited ? &left : req, rem);
}
