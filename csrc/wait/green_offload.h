/*
 * Resolver lookups queued for worker threads (csrc/twins/green_resolve.c).  A
 * caller whose lookup is queued asks its waiter, through
 * green_python_offload(), for a worker thread; the bridge
 * (greenify/waiting/offload.py) takes a runner from green_offload_runner_new()
 * (NULL: enough are on their way), hands the waiter a call of
 * green_offload_runner_run() and lets go of it with
 * green_offload_runner_end(), run or not.
 */
#ifndef GREENIFY_GREEN_OFFLOAD_H
#define GREENIFY_GREEN_OFFLOAD_H

struct green_offload_job;
struct green_offload_runner;
#define GREEN_OFFLOAD_NATIVE 0    /* nobody to wait with here: the caller calls libc itself */
#define GREEN_OFFLOAD_SUBMITTED 1 /* a runner is on its way: wait for the job's eventfd */
struct green_offload_runner *green_offload_runner_new(void);
void green_offload_runner_run(struct green_offload_runner *runner);
void green_offload_runner_end(struct green_offload_runner *runner);
/* For the tests: jobs not yet freed; jobs holding a slot, and the bound on
   them; the bound on runners; eventfds kept for reuse. */
int green_offload_live_jobs(void);
int green_offload_pending(void);
int green_offload_max_pending(void);
int green_offload_max_runners(void);
int green_offload_spare_fds(void);

#endif
