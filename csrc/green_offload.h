/*
 * One resolver call handed to a worker thread (csrc/green_resolve.c): the
 * bridge (greenify/_offload.py) holds a reference while it is queued and
 * runs it with green_offload_run() in the worker.
 */
#ifndef GREENIFY_GREEN_OFFLOAD_H
#define GREENIFY_GREEN_OFFLOAD_H

struct green_offload_job;
#define GREEN_OFFLOAD_NATIVE 0    /* not handed over: the caller calls libc itself */
#define GREEN_OFFLOAD_SUBMITTED 1 /* handed to a worker: wait for done_fd */
struct green_offload_job *green_offload_retain(struct green_offload_job *job);
void green_offload_drop(struct green_offload_job *job);
void green_offload_run(struct green_offload_job *job);
int green_offload_live_jobs(void);

#endif
