/*
 * Wait statistics (greenify.stats()): counted on the wait path only (two
 * relaxed atomic adds per wait), so a call on a ready descriptor pays
 * nothing.  One counter per row of GREEN_FUNCTIONS (green.h); a fortified
 * form counts as its plain function.
 */
#include "green.h"

struct green_stat {
    unsigned long long calls;
    unsigned long long wait_ns;
};
static struct green_stat green_stats[GREEN_FUNCTION_COUNT];
#define GREEN_FUNCTION_NAME(name, family) #name,
static const char *const green_function_names[] = {GREEN_FUNCTIONS(GREEN_FUNCTION_NAME)};

int green_stats_count(void) { return GREEN_FUNCTION_COUNT; }

const char *green_stats_name(int function)
{
    return function >= 0 && function < GREEN_FUNCTION_COUNT ? green_function_names[function] : "";
}

void green_stats_read(int function, unsigned long long *calls, unsigned long long *wait_ns)
{
    *calls = *wait_ns = 0;
    if (function >= 0 && function < GREEN_FUNCTION_COUNT) {
        *calls = __atomic_load_n(&green_stats[function].calls, __ATOMIC_RELAXED);
        *wait_ns = __atomic_load_n(&green_stats[function].wait_ns, __ATOMIC_RELAXED);
    }
}

void green_stats_reset(void)
{
    for (int i = 0; i < GREEN_FUNCTION_COUNT; i++) {
        __atomic_store_n(&green_stats[i].calls, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&green_stats[i].wait_ns, 0, __ATOMIC_RELAXED);
    }
}

void green_stats_count_wait(struct green_call *call, int64_t started_ns)
{
    struct green_stat *stat = &green_stats[call->function];
    if (!call->waited) {
        call->waited = 1;
        __atomic_add_fetch(&stat->calls, 1, __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(&stat->wait_ns, (unsigned long long)(green_now_ns() - started_ns), __ATOMIC_RELAXED);
}
