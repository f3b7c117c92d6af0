/*
 * The run-time state of the green functions (activated, finalizing,
 * interruptions pending, waiters registered) and their clock: deadlines on
 * CLOCK_MONOTONIC.  Everything in the wait layer reads these; this file
 * uses nothing else.
 */
#include <limits.h>
#include <time.h>

#include "green.h"

#define NS_PER_SECOND 1000000000LL
#define NS_PER_MS 1000000LL

struct green_state green_state = {0, 0, 0, 0, 0};

void green_set_active(int active) { green_state.active = active; }
int green_is_active(void) { return green_state.active; }
void green_set_finalizing(void) { green_state.finalizing = 1; }
void green_set_interrupts_pending(int count) { green_state.interrupts_pending = count; }
void green_set_waiters_registered(int count) { green_state.waiters_registered = count; }

int64_t green_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * NS_PER_SECOND + now.tv_nsec;
}

int64_t green_deadline_after_ms(int timeout_ms)
{
    if (timeout_ms < 0)
        return GREEN_NO_DEADLINE;
    return green_now_ns() + (int64_t)timeout_ms * NS_PER_MS;
}

int64_t green_deadline_after_timespec(const struct timespec *timeout)
{
    if (timeout == NULL)
        return GREEN_NO_DEADLINE;
    if (timeout->tv_sec > INT64_MAX / NS_PER_SECOND - 1)
        return GREEN_NO_DEADLINE;
    return green_now_ns() + (int64_t)timeout->tv_sec * NS_PER_SECOND + timeout->tv_nsec;
}

const struct timespec *green_time_left(int64_t deadline_ns, struct timespec *left)
{
    int64_t ns;
    if (deadline_ns == GREEN_NO_DEADLINE)
        return NULL;
    ns = deadline_ns - green_now_ns();
    if (ns < 0)
        ns = 0;
    left->tv_sec = ns / NS_PER_SECOND;
    left->tv_nsec = ns % NS_PER_SECOND;
    return left;
}
