/*
 * Green twins of the resolver: getaddrinfo, getnameinfo, gethostbyname,
 * gethostbyname_r.
 *
 * A numeric getaddrinfo (an address for a host, a number for a service, as
 * libmariadb's getaddrinfo("127.0.0.1", "3306") without AI_NUMERICHOST) is
 * answered at once by libc itself, in the calling thread: see
 * numeric_getaddrinfo.  Likewise getnameinfo with NI_NUMERICHOST (and
 * NI_NUMERICSERV when a service is asked for), and gethostbyname(_r) of a
 * dotted address (numeric_host_name).
 *
 * Other lookups read files, load NSS modules and talk to DNS servers:
 * nothing a green function can wait on through one descriptor of its own.
 * So the real libc call is queued here as a job and run by a runner, a loop
 * on a worker thread the caller's waiter provides (with gevent,
 * hub.threadpool) that calls libc for queued jobs until none is left; the
 * calling greenlet waits, through green_wait, for an eventfd the runner
 * signals when its job is done.  The results are libc's own: freeaddrinfo
 * frees a green getaddrinfo's list as usual.
 *
 * Bounds, whatever the load:
 *   - at most MAX_PENDING_LOOKUPS jobs exist at once (queued, running, or
 *     running for a caller that left); beyond that a caller waits, as
 *     cooperatively as for its answer, for a slot (slot_take): the hub keeps
 *     running, and a waiting caller holds no slot and no descriptor.
 *   - at most MAX_RUNNERS runners are asked for at once.
 *   - an eventfd is held only by a caller that waits; a finished job's is
 *     kept for the next one (at most MAX_PENDING_LOOKUPS kept).
 *
 * A greenlet interrupted by gevent.Timeout or kill abandons its job and
 * returns at once.  Everything about a job changes under lookups.lock, and
 * whoever finishes with it last frees it, exactly once:
 *   QUEUED -> (caller left)   the caller unlinks it and frees it: never run
 *   QUEUED -> RUNNING -> FINISHED           the caller takes the results
 *   QUEUED -> RUNNING -> ABANDONED          the caller left while libc ran:
 *             it gave its eventfd back at once; the runner frees the job,
 *             an abandoned getaddrinfo list included, when libc returns
 *   QUEUED -> DROPPED          no runner will come (a lost one; a fork's
 *             child): the caller queues it again and asks for a runner, or
 *             calls libc itself
 * Nothing is written into the caller's memory after the caller returned,
 * and no descriptor is written after its owner gave it back.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "green_offload.h"
#include "green_python.h"
#include "green_twins.h"

enum job_kind { JOB_GETADDRINFO, JOB_GETNAMEINFO, JOB_GETHOSTBYNAME, JOB_GETHOSTBYNAME_R };
enum job_state { JOB_QUEUED, JOB_RUNNING, JOB_FINISHED, JOB_ABANDONED, JOB_DROPPED };

/* Caller-side outcome of offload(). */
enum offload_outcome { OFFLOAD_DONE, OFFLOAD_NATIVE, OFFLOAD_INTERRUPTED };

/* Lookups in the resolver's hands at once, and so eventfds, at most.  A
   slow DNS server keeps every one of them for its timeout (5 s by
   default): a caller beyond the bound waits for a slot like for an answer. */
#define MAX_PENDING_LOOKUPS 64
/* Runners asked for at once, at most: gevent's pool has 10 threads. */
#define MAX_RUNNERS 8
/* A dropped job is queued again this many times at most (runners lost one
   after another): then its caller calls libc itself. */
#define MAX_REQUEUED 3

/* Copies of buffers the caller owns keep their address modulo this, so
   libc lays out (and aligns) its data in them exactly as in the caller's. */
#define BUFFER_ALIGNMENT 16
/* Larger caller buffers are not copied: the call goes to libc directly. */
#define MAX_COPIED_BUFFER (16u << 20)

struct green_offload_job {
    enum job_state state;
    enum job_kind kind;
    struct green_offload_job *next; /* in the queue, while QUEUED */
    int done_fd; /* the caller's eventfd, written by the runner when FINISHED or DROPPED; -1 once it left */

    int result;       /* what the call returned (the int-returning calls) */
    int error_number; /* errno right after the call */
    int h_error;      /* gethostbyname(_r)'s h_errno */

    /* getaddrinfo */
    char *node, *service;
    struct addrinfo hints;
    int has_hints;
    struct addrinfo *addrinfo; /* owned by the job until handed to the caller */

    /* getnameinfo */
    struct sockaddr *sockaddr;
    socklen_t sockaddr_len;
    char *host, *serv;
    socklen_t host_len, serv_len;
    char *host_block, *serv_block; /* what host/serv point into */
    int flags;

    /* gethostbyname, gethostbyname_r */
    char *name;
    struct hostent hostent;
    struct hostent *hostent_result;
    char *buffer;       /* gethostbyname_r: inside buffer_block, aligned as the caller's */
    char *buffer_block; /* what to free */
    size_t buffer_len;
};

/* A runner asked of a waiter: whether it started, so that one dropped
   unrun (a refusal, a killed pool) is counted out exactly once. */
struct green_offload_runner {
    int started;
    unsigned forks; /* lookups.forks when it was made: from before a fork, it counts for nothing */
};

/* The queue and its counts; every job's state changes under its lock. */
static struct {
    pthread_mutex_t lock;
    struct green_offload_job *head, *tail; /* QUEUED jobs, oldest first */
    int pending;      /* jobs holding a slot: at most MAX_PENDING_LOOKUPS */
    int queued;       /* jobs in the queue */
    int runners;      /* runners asked for that have not ended */
    int running;      /* runners calling libc right now */
    int slot_waiters; /* callers waiting for a slot */
    int slot_fd;      /* eventfd: written when a slot frees while callers wait for one */
    /* the jobs runners are calling libc for (a fork's child has no runners:
       their callers get them back) */
    struct green_offload_job *running_jobs[MAX_RUNNERS];
    unsigned forks; /* forks this process's lineage went through, for runner tokens */
} lookups = {PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, 0, 0, 0, 0, -1, {NULL}, 0};

/* ---- eventfds ---- */

/* Finished jobs' eventfds are kept open and reused rather than closed: two
   system calls fewer per lookup, and the hub's io watcher for that number
   always refers to the same open file (libev cannot tell when a number was
   closed and opened again between two waits).  At most as many as lookups
   can be pending, so the resolver never holds more eventfds than that. */
#define SPARE_DONE_FDS MAX_PENDING_LOOKUPS
static int spare_done_fds[SPARE_DONE_FDS];
static int spare_done_fd_count;
static pthread_mutex_t spare_done_fds_lock = PTHREAD_MUTEX_INITIALIZER;

static void eventfd_drain(int fd)
{
    uint64_t count;
    ssize_t drained = read(fd, &count, sizeof count); /* nonblocking: back to "not readable" */
    (void)drained;
}

static void eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t written = write(fd, &one, sizeof one);
    (void)written; /* an eventfd write of 1 cannot fail short of overflow */
}

static int done_fd_take(void)
{
    int fd = -1, saved_errno = errno;
    pthread_mutex_lock(&spare_done_fds_lock);
    if (spare_done_fd_count > 0)
        fd = spare_done_fds[--spare_done_fd_count];
    pthread_mutex_unlock(&spare_done_fds_lock);
    if (fd >= 0)
        eventfd_drain(fd); /* back to "not done" */
    else
        fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    errno = saved_errno;
    return fd;
}

static void done_fd_give_back(int fd)
{
    int saved_errno = errno;
    if (fd < 0)
        return;
    pthread_mutex_lock(&spare_done_fds_lock);
    if (spare_done_fd_count < SPARE_DONE_FDS) {
        spare_done_fds[spare_done_fd_count++] = fd;
        fd = -1;
    }
    pthread_mutex_unlock(&spare_done_fds_lock);
    if (fd >= 0)
        close(fd);
    errno = saved_errno;
}

/* ---- the job ---- */

/* Jobs allocated and not yet freed: the tests check that abandoned jobs go. */
static int live_jobs;

int green_offload_live_jobs(void) { return __atomic_load_n(&live_jobs, __ATOMIC_SEQ_CST); }

int green_offload_pending(void)
{
    int pending;
    pthread_mutex_lock(&lookups.lock);
    pending = lookups.pending;
    pthread_mutex_unlock(&lookups.lock);
    return pending;
}

int green_offload_max_pending(void) { return MAX_PENDING_LOOKUPS; }

int green_offload_max_runners(void) { return MAX_RUNNERS; }

int green_offload_spare_fds(void)
{
    int count;
    pthread_mutex_lock(&spare_done_fds_lock);
    count = spare_done_fd_count;
    pthread_mutex_unlock(&spare_done_fds_lock);
    return count;
}

static struct green_offload_job *job_new(enum job_kind kind)
{
    struct green_offload_job *job = calloc(1, sizeof *job);
    if (job == NULL)
        return NULL;
    __atomic_add_fetch(&live_jobs, 1, __ATOMIC_SEQ_CST);
    job->done_fd = -1; /* taken once the job has a slot */
    job->state = JOB_QUEUED;
    job->kind = kind;
    return job;
}

static void job_free(struct green_offload_job *job)
{
    int saved_errno = errno;
    if (job->addrinfo != NULL)
        freeaddrinfo(job->addrinfo); /* an abandoned result */
    done_fd_give_back(job->done_fd);
    free(job->node);
    free(job->service);
    free(job->sockaddr);
    free(job->host_block);
    free(job->serv_block);
    free(job->name);
    free(job->buffer_block);
    free(job);
    __atomic_sub_fetch(&live_jobs, 1, __ATOMIC_SEQ_CST);
    errno = saved_errno;
}

/* A copy of a caller's buffer whose address is congruent to the original's
   modulo BUFFER_ALIGNMENT; *block is what to free.  NULL stays NULL. */
static char *copy_buffer(const char *buffer, size_t len, char **block)
{
    size_t shift;
    *block = NULL;
    if (buffer == NULL)
        return NULL;
    *block = malloc(len + BUFFER_ALIGNMENT);
    if (*block == NULL)
        return NULL;
    shift = ((uintptr_t)buffer - (uintptr_t)*block) % BUFFER_ALIGNMENT;
    memcpy(*block + shift, buffer, len);
    return *block + shift;
}

static int copy_string(const char *string, char **copy)
{
    *copy = NULL;
    if (string == NULL)
        return 0;
    *copy = strdup(string);
    return *copy == NULL ? -1 : 0;
}

/* gethostbyname's own loop: a buffer that grows while libc asks for more. */
static void call_gethostbyname(struct green_offload_job *job)
{
    size_t size = 1024;
    for (;;) {
        char *grown = realloc(job->buffer_block, size);
        if (grown == NULL) {
            job->hostent_result = NULL;
            job->h_error = NETDB_INTERNAL;
            errno = ENOMEM;
            return;
        }
        job->buffer = job->buffer_block = grown;
        job->buffer_len = size;
        job->result = gethostbyname_r(job->name, &job->hostent, job->buffer, size, &job->hostent_result,
                                       &job->h_error);
        if (job->result != ERANGE || job->h_error != NETDB_INTERNAL)
            return;
        size *= 2;
    }
}

/* The libc call itself, on whichever thread runs it. */
static void job_call(struct green_offload_job *job)
{
    switch (job->kind) {
    case JOB_GETADDRINFO:
        job->result = getaddrinfo(job->node, job->service, job->has_hints ? &job->hints : NULL, &job->addrinfo);
        if (job->result != 0)
            job->addrinfo = NULL;
        break;
    case JOB_GETNAMEINFO:
        job->result = getnameinfo(job->sockaddr, job->sockaddr_len, job->host, job->host_len, job->serv,
                                  job->serv_len, job->flags);
        break;
    case JOB_GETHOSTBYNAME:
        call_gethostbyname(job);
        break;
    case JOB_GETHOSTBYNAME_R:
        job->result = gethostbyname_r(job->name, &job->hostent, job->buffer, job->buffer_len,
                                      &job->hostent_result, &job->h_error);
        break;
    }
    job->error_number = errno;
}

/* ---- the queue; the functions named *_locked run under lookups.lock ---- */

static void queue_push_locked(struct green_offload_job *job)
{
    job->next = NULL;
    if (lookups.tail != NULL)
        lookups.tail->next = job;
    else
        lookups.head = job;
    lookups.tail = job;
    lookups.queued++;
}

static struct green_offload_job *queue_pop_locked(void)
{
    struct green_offload_job *job = lookups.head;
    if (job != NULL) {
        lookups.head = job->next;
        if (lookups.head == NULL)
            lookups.tail = NULL;
        job->next = NULL;
        lookups.queued--;
    }
    return job;
}

static void queue_unlink_locked(struct green_offload_job *job)
{
    struct green_offload_job **link = &lookups.head, *previous = NULL;
    while (*link != NULL && *link != job) {
        previous = *link;
        link = &(*link)->next;
    }
    if (*link == NULL)
        return;
    *link = job->next;
    if (lookups.tail == job)
        lookups.tail = previous;
    job->next = NULL;
    lookups.queued--;
}

/* A waiter for a slot wakes: it checks, and passes the news on if it
   leaves a slot free (callers on other hubs may not have seen the write
   the first one drained). */
static void slot_news_locked(void)
{
    if (lookups.slot_waiters > 0 && lookups.pending < MAX_PENDING_LOOKUPS)
        eventfd_signal(lookups.slot_fd);
}

static void slot_release_locked(void)
{
    lookups.pending--;
    slot_news_locked();
}

/* No runner is coming (the last one was lost unrun): every queued job goes
   back to its caller, which asks for a runner again (or calls libc itself). */
static void queue_hand_back_locked(void)
{
    struct green_offload_job *job;
    if (lookups.runners > 0)
        return;
    while ((job = queue_pop_locked()) != NULL) {
        job->state = JOB_DROPPED;
        eventfd_signal(job->done_fd);
    }
}

/* Where `job` sits in lookups.running_jobs (NULL: a free seat; runners
   never outnumber the seats). */
static int running_seat_locked(const struct green_offload_job *job)
{
    int seat = 0;
    while (seat < MAX_RUNNERS - 1 && lookups.running_jobs[seat] != job)
        seat++;
    return seat;
}

/* ---- fork: the child has the parent's memory but none of its runners ---- */

static void lookups_before_fork(void)
{
    pthread_mutex_lock(&lookups.lock);
    pthread_mutex_lock(&spare_done_fds_lock);
}

static void lookups_after_fork_in_parent(void)
{
    pthread_mutex_unlock(&spare_done_fds_lock);
    pthread_mutex_unlock(&lookups.lock);
}

/* Every job a runner had or would have taken goes back to its caller, which
   asks for a runner again; runner tokens made before the fork count for
   nothing. */
static void lookups_after_fork_in_child(void)
{
    struct green_offload_job *job;
    pthread_mutex_unlock(&spare_done_fds_lock);
    for (int seat = 0; seat < MAX_RUNNERS; seat++) {
        job = lookups.running_jobs[seat];
        lookups.running_jobs[seat] = NULL;
        if (job == NULL)
            continue;
        if (job->state == JOB_ABANDONED) { /* nobody waits: the runner would have freed it */
            slot_release_locked();
            job_free(job);
            continue;
        }
        job->state = JOB_DROPPED;
        eventfd_signal(job->done_fd);
    }
    while ((job = queue_pop_locked()) != NULL) {
        job->state = JOB_DROPPED;
        eventfd_signal(job->done_fd);
    }
    lookups.running = 0;
    lookups.runners = 0;
    lookups.forks++;
    pthread_mutex_unlock(&lookups.lock);
}

static pthread_once_t lookups_fork_handlers_once = PTHREAD_ONCE_INIT;

static void lookups_fork_handlers_install(void)
{
    pthread_atfork(lookups_before_fork, lookups_after_fork_in_parent, lookups_after_fork_in_child);
}

/* ---- the runner's side, from the worker thread greenify/waiting/offload.py asks for ---- */

struct green_offload_runner *green_offload_runner_new(void)
{
    struct green_offload_runner *runner = NULL;
    pthread_mutex_lock(&lookups.lock);
    /* one more unless runners that have not yet taken a job are enough for the queue */
    if (lookups.runners < MAX_RUNNERS && lookups.runners - lookups.running < lookups.queued) {
        runner = calloc(1, sizeof *runner);
        if (runner != NULL) {
            runner->forks = lookups.forks;
            lookups.runners++;
        }
    }
    pthread_mutex_unlock(&lookups.lock);
    return runner;
}

/* Runs in a worker thread, without the GIL: libc for queued jobs, oldest
   first, until the queue is empty. */
void green_offload_runner_run(struct green_offload_runner *runner)
{
    struct green_offload_job *job;
    int saved_errno = errno;
    pthread_mutex_lock(&lookups.lock);
    if (runner->started || runner->forks != lookups.forks) { /* run twice, or counted out by a fork */
        pthread_mutex_unlock(&lookups.lock);
        return;
    }
    runner->started = 1;
    while ((job = queue_pop_locked()) != NULL) {
        int seat = running_seat_locked(NULL);
        job->state = JOB_RUNNING;
        lookups.running_jobs[seat] = job;
        lookups.running++;
        pthread_mutex_unlock(&lookups.lock);
        job_call(job);
        pthread_mutex_lock(&lookups.lock);
        lookups.running--;
        lookups.running_jobs[seat] = NULL;
        if (job->state == JOB_RUNNING) {
            job->state = JOB_FINISHED;
            eventfd_signal(job->done_fd); /* under the lock: the caller cannot have given it back */
        }
        else { /* ABANDONED: its caller left; the job is this runner's to free */
            slot_release_locked();
            pthread_mutex_unlock(&lookups.lock);
            job_free(job);
            pthread_mutex_lock(&lookups.lock);
        }
    }
    lookups.runners--;
    pthread_mutex_unlock(&lookups.lock);
    errno = saved_errno;
}

/* The waiter let go of the runner, run or not (cffi's destructor). */
void green_offload_runner_end(struct green_offload_runner *runner)
{
    pthread_mutex_lock(&lookups.lock);
    if (!runner->started && runner->forks == lookups.forks) {
        runner->started = 1;
        lookups.runners--;
        queue_hand_back_locked();
    }
    pthread_mutex_unlock(&lookups.lock);
    free(runner);
}

/* ---- the caller's side ---- */

/* Waits, cooperatively, until the caller holds one of the
   MAX_PENDING_LOOKUPS slots (OFFLOAD_DONE), or was interrupted, or cannot
   wait here (OFFLOAD_NATIVE: it then calls libc, as it would block in
   libc anyway). */
static enum offload_outcome slot_take(struct green_call *stats)
{
    struct green_watch watch;
    int status;
    pthread_once(&lookups_fork_handlers_once, lookups_fork_handlers_install);
    pthread_mutex_lock(&lookups.lock);
    if (lookups.pending < MAX_PENDING_LOOKUPS && lookups.slot_waiters == 0) { /* none waits its turn before us */
        lookups.pending++;
        pthread_mutex_unlock(&lookups.lock);
        return OFFLOAD_DONE;
    }
    if (lookups.slot_fd < 0)
        lookups.slot_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); /* kept for the process's life */
    if (lookups.slot_fd < 0) {
        pthread_mutex_unlock(&lookups.lock);
        return OFFLOAD_NATIVE;
    }
    lookups.slot_waiters++;
    watch.fd = lookups.slot_fd;
    watch.events = GREEN_READ;
    for (;;) {
        pthread_mutex_unlock(&lookups.lock);
        status = green_wait(stats, &watch, 1, GREEN_NO_DEADLINE);
        pthread_mutex_lock(&lookups.lock);
        eventfd_drain(lookups.slot_fd);
        if (status == GREEN_INTERRUPTED || status == GREEN_CANNOT_WAIT || lookups.pending < MAX_PENDING_LOOKUPS)
            break;
    }
    lookups.slot_waiters--;
    if (status != GREEN_INTERRUPTED && status != GREEN_CANNOT_WAIT)
        lookups.pending++;
    slot_news_locked();
    pthread_mutex_unlock(&lookups.lock);
    return status == GREEN_INTERRUPTED ? OFFLOAD_INTERRUPTED
           : status == GREEN_CANNOT_WAIT ? OFFLOAD_NATIVE : OFFLOAD_DONE;
}

/* The caller leaves its job (interrupted, or refused a runner): whatever it
   owns goes now, and the job itself now or when libc returns in the runner. */
static void job_leave(struct green_offload_job *job)
{
    int job_is_mine = 1, done_fd = -1;
    pthread_mutex_lock(&lookups.lock);
    switch (job->state) {
    case JOB_QUEUED:
        queue_unlink_locked(job); /* never started */
        break;
    case JOB_RUNNING:
        job->state = JOB_ABANDONED; /* the runner frees it when libc returns */
        done_fd = job->done_fd;     /* and no longer writes this */
        job->done_fd = -1;
        job_is_mine = 0;
        break;
    default: /* FINISHED, DROPPED: done with */
        break;
    }
    if (job_is_mine)
        slot_release_locked();
    pthread_mutex_unlock(&lookups.lock);
    if (job_is_mine)
        job_free(job);
    done_fd_give_back(done_fd);
}

/* The caller is done with a FINISHED job's results. */
static void job_finish(struct green_offload_job *job)
{
    pthread_mutex_lock(&lookups.lock);
    slot_release_locked();
    pthread_mutex_unlock(&lookups.lock);
    job_free(job);
}

static enum job_state job_state(struct green_offload_job *job)
{
    enum job_state state;
    pthread_mutex_lock(&lookups.lock);
    state = job->state;
    pthread_mutex_unlock(&lookups.lock);
    return state;
}

/* Queues the job and waits for it: OFFLOAD_DONE with the job FINISHED (the
   caller takes its results, then job_finish), or else the job is gone and
   the caller calls libc itself (OFFLOAD_NATIVE) or reports the interruption. */
static enum offload_outcome offload(struct green_offload_job *job)
{
    static const int function_of_kind[] = {GREEN_FN_getaddrinfo, GREEN_FN_getnameinfo, GREEN_FN_gethostbyname,
                                           GREEN_FN_gethostbyname_r};
    struct green_call stats = {function_of_kind[job->kind], 0};
    struct green_watch watch;
    int saved_errno = errno, can_wait, requeued = 0;
    enum offload_outcome outcome = slot_take(&stats);

    if (outcome != OFFLOAD_DONE) {
        job_free(job); /* never queued */
        return outcome;
    }
    job->done_fd = done_fd_take();
    if (job->done_fd < 0) {
        job_finish(job);
        return OFFLOAD_NATIVE;
    }
    watch.fd = job->done_fd;
    watch.events = GREEN_READ;
    pthread_mutex_lock(&lookups.lock);
    queue_push_locked(job);
    pthread_mutex_unlock(&lookups.lock);
    /* a runner, unless enough are on their way; NATIVE: nobody here to wait with */
    can_wait = green_python_offload(job) == GREEN_OFFLOAD_SUBMITTED;
    for (;;) {
        enum job_state state = job_state(job);
        if (state == JOB_FINISHED)
            return OFFLOAD_DONE;
        if (state == JOB_DROPPED && can_wait && requeued++ < MAX_REQUEUED) {
            eventfd_drain(job->done_fd); /* the news of the drop, before the job can finish */
            pthread_mutex_lock(&lookups.lock);
            job->state = JOB_QUEUED;
            queue_push_locked(job);
            pthread_mutex_unlock(&lookups.lock);
            can_wait = green_python_offload(job) == GREEN_OFFLOAD_SUBMITTED;
            continue;
        }
        if (state == JOB_DROPPED || (state == JOB_QUEUED && !can_wait)) {
            job_leave(job); /* taken back unrun (if a runner took it meanwhile: abandoned) */
            errno = saved_errno;
            return OFFLOAD_NATIVE;
        }
        if (can_wait) {
            int status = green_wait(&stats, &watch, 1, GREEN_NO_DEADLINE);
            if (status == GREEN_INTERRUPTED) {
                job_leave(job);
                return OFFLOAD_INTERRUPTED;
            }
            can_wait = status != GREEN_CANNOT_WAIT;
        }
        else { /* a runner has it and nothing can wait here: block, as libc would */
            struct pollfd done = {job->done_fd, POLLIN, 0};
            poll(&done, 1, -1);
            errno = saved_errno;
        }
    }
}

/* The failure of an interrupted call: EAI_SYSTEM with errno ETIMEDOUT, which
   libraries report ("Connection timed out") instead of retrying, unlike
   EAI_AGAIN. */
static int interrupted_eai(void)
{
    errno = GREEN_INTERRUPTED_ERRNO;
    return EAI_SYSTEM;
}

/* Runs a job; `prepared` says whether filling it in worked.  Unless the
   outcome is OFFLOAD_DONE the job is gone: the caller then calls libc
   itself (OFFLOAD_NATIVE) or reports the interruption. */
static enum offload_outcome run_job(struct green_offload_job *job, int prepared)
{
    if (job == NULL)
        return OFFLOAD_NATIVE;
    if (!prepared) {
        job_free(job);
        return OFFLOAD_NATIVE;
    }
    return offload(job);
}

/* A finished job's result, with errno as the runner left it on failure;
   frees the job. */
static int job_result(struct green_offload_job *job)
{
    int result = job->result;
    if (result != 0)
        errno = job->error_number;
    job_finish(job);
    return result;
}

/* ---- getaddrinfo ---- */

/* glibc's getaddrinfo tries the node as a numeric address (inet_aton, then
   an IPv6 address with an optional %scope) and the service as a number
   before anything else; AI_NUMERICHOST and AI_NUMERICSERV only forbid the
   NSS lookups that follow when those fail (EAI_NONAME instead).  So libc's
   own call with both flags added answers a numeric node and service
   exactly as the call without them, in this thread, without touching DNS
   or NSS (AI_ADDRCONFIG's netlink query and gai.conf are local).  Returns
   whether *answer (libc's return value) is the call's answer: EAI_NONAME
   with flags we added means "not numeric, look it up". */
static int numeric_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                               struct addrinfo **res, int *answer)
{
    struct addrinfo numeric;
    int added;
    if (hints != NULL) {
        numeric = *hints;
    }
    else { /* getaddrinfo(3): NULL hints are AF_UNSPEC, any socket, AI_V4MAPPED | AI_ADDRCONFIG */
        memset(&numeric, 0, sizeof numeric);
        numeric.ai_family = AF_UNSPEC;
        numeric.ai_flags = AI_V4MAPPED | AI_ADDRCONFIG;
    }
    added = ((node != NULL ? AI_NUMERICHOST : 0) | (service != NULL ? AI_NUMERICSERV : 0)) & ~numeric.ai_flags;
    numeric.ai_flags |= added;
    *answer = getaddrinfo(node, service, &numeric, res);
    return *answer != EAI_NONAME || added == 0;
}

int green_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    struct green_offload_job *job;
    int saved_errno = errno, prepared, answer;

    if (!green_state.active || res == NULL)
        return getaddrinfo(node, service, hints, res);
    if (numeric_getaddrinfo(node, service, hints, res, &answer)) { /* numeric lookups never block */
        if (answer == 0)
            errno = saved_errno;
        return answer;
    }
    errno = saved_errno;
    if (green_interrupted_here())
        return interrupted_eai();
    job = job_new(JOB_GETADDRINFO);
    prepared = job != NULL && !copy_string(node, &job->node) && !copy_string(service, &job->service);
    if (prepared && hints != NULL) {
        job->hints = *hints;
        job->hints.ai_addr = NULL; /* must be NULL; glibc never reads them */
        job->hints.ai_canonname = NULL;
        job->hints.ai_next = NULL;
        job->has_hints = 1;
    }
    switch (run_job(job, prepared)) {
    case OFFLOAD_NATIVE:
        errno = saved_errno;
        return getaddrinfo(node, service, hints, res);
    case OFFLOAD_INTERRUPTED:
        return interrupted_eai();
    case OFFLOAD_DONE:
        break;
    }
    if (job->result == 0) {
        *res = job->addrinfo;
        job->addrinfo = NULL; /* the caller's now, for freeaddrinfo */
    }
    return job_result(job);
}

int green_getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen, char *serv,
                      socklen_t servlen, int flags)
{
    struct green_offload_job *job;
    int saved_errno = errno, prepared;
    int numeric = (flags & NI_NUMERICHOST) && (serv == NULL || (flags & NI_NUMERICSERV));

    if (!green_state.active || numeric || sa == NULL || salen > MAX_COPIED_BUFFER ||
        hostlen > MAX_COPIED_BUFFER || servlen > MAX_COPIED_BUFFER)
        return getnameinfo(sa, salen, host, hostlen, serv, servlen, flags);
    if (green_interrupted_here())
        return interrupted_eai();
    job = job_new(JOB_GETNAMEINFO);
    prepared = job != NULL;
    if (prepared) {
        job->sockaddr = malloc(salen ? salen : 1);
        job->host = copy_buffer(host, hostlen, &job->host_block);
        job->serv = copy_buffer(serv, servlen, &job->serv_block);
        prepared = job->sockaddr != NULL && (host == NULL || job->host != NULL) && (serv == NULL || job->serv != NULL);
    }
    if (prepared) {
        memcpy(job->sockaddr, sa, salen);
        job->sockaddr_len = salen;
        job->host_len = hostlen;
        job->serv_len = servlen;
        job->flags = flags;
    }
    switch (run_job(job, prepared)) {
    case OFFLOAD_NATIVE:
        errno = saved_errno;
        return getnameinfo(sa, salen, host, hostlen, serv, servlen, flags);
    case OFFLOAD_INTERRUPTED:
        return interrupted_eai();
    case OFFLOAD_DONE:
        break;
    }
    /* the whole buffers: whatever libc wrote, even on failure, the caller sees */
    if (host != NULL)
        memcpy(host, job->host, hostlen);
    if (serv != NULL)
        memcpy(serv, job->serv, servlen);
    return job_result(job);
}

/* ---- gethostbyname: the result lives in storage of the calling thread ----

   glibc's gethostbyname returns one static hostent per process.  The pool
   thread does not use it: it calls gethostbyname_r into the job's buffer,
   which then becomes this OS thread's result, replacing the previous one.
   So, as with libc in a single thread, the result stays valid until this
   thread's next gethostbyname; and a call that another greenlet's lookup
   finishes in a pool thread meanwhile cannot overwrite it under a reader. */

struct thread_hostent {
    struct hostent hostent;
    char *buffer;
};

static pthread_key_t thread_hostent_key;
static pthread_once_t thread_hostent_once = PTHREAD_ONCE_INIT;

static void thread_hostent_free(void *storage)
{
    struct thread_hostent *mine = storage;
    free(mine->buffer);
    free(mine);
}

static void thread_hostent_key_create(void)
{
    pthread_key_create(&thread_hostent_key, thread_hostent_free);
}

static struct thread_hostent *thread_hostent(void)
{
    struct thread_hostent *mine;
    pthread_once(&thread_hostent_once, thread_hostent_key_create);
    mine = pthread_getspecific(thread_hostent_key);
    if (mine == NULL) {
        mine = calloc(1, sizeof *mine);
        if (mine != NULL && pthread_setspecific(thread_hostent_key, mine) != 0) {
            free(mine);
            mine = NULL;
        }
    }
    return mine;
}

/* Whether gethostbyname(_r) answers `name` without NSS: glibc's
   digits-and-dots parse answers a name of digits and dots, without a final
   dot, that inet_aton reads (other numeric forms, 0x7f.1 for one, go to
   /etc/hosts and DNS). */
static int numeric_host_name(const char *name)
{
    struct in_addr address;
    size_t length = strspn(name, "0123456789.");
    return length > 0 && name[length] == '\0' && name[length - 1] != '.' && inet_aton(name, &address);
}

struct hostent *green_gethostbyname(const char *name)
{
    struct green_offload_job *job;
    struct thread_hostent *mine;
    int saved_errno = errno;

    if (!green_state.active || name == NULL || numeric_host_name(name)) /* numeric: never blocks */
        return gethostbyname(name);
    if (green_interrupted_here())
        goto interrupted;
    mine = thread_hostent();
    job = mine == NULL ? NULL : job_new(JOB_GETHOSTBYNAME);
    switch (run_job(job, job != NULL && !copy_string(name, &job->name))) {
    case OFFLOAD_NATIVE:
        errno = saved_errno;
        return gethostbyname(name);
    case OFFLOAD_INTERRUPTED:
        goto interrupted;
    case OFFLOAD_DONE:
        break;
    }
    if (job->h_error != 0) /* as glibc: h_errno is set when the lookup reports something */
        h_errno = job->h_error;
    if (job->hostent_result == NULL) {
        errno = job->error_number;
        job_finish(job);
        return NULL;
    }
    /* the pointers inside point into job->buffer_block, which this thread keeps */
    free(mine->buffer);
    mine->buffer = job->buffer_block;
    mine->hostent = job->hostent;
    job->buffer = job->buffer_block = NULL;
    job_finish(job);
    return &mine->hostent;

interrupted:
    h_errno = NETDB_INTERNAL; /* "see errno": not TRY_AGAIN, which invites a retry */
    errno = GREEN_INTERRUPTED_ERRNO;
    return NULL;
}

/* ---- gethostbyname_r: the result is moved into the caller's buffer ---- */

/* Where a pointer into the job's copy of the buffer lands in the caller's. */
static void *moved(const void *pointer, const char *from, size_t len, char *to)
{
    uintptr_t offset = (uintptr_t)pointer - (uintptr_t)from;
    if (pointer == NULL || (uintptr_t)pointer < (uintptr_t)from || offset >= len)
        return (void *)pointer; /* not inside the buffer: not ours to move */
    return to + offset;
}

/* A NULL-terminated list of pointers (h_aliases, h_addr_list). */
static char **moved_list(char **list, const char *from, size_t len, char *to)
{
    char **moved_to = moved(list, from, len, to);
    if (moved_to == list)
        return list;
    for (size_t i = 0; (char *)&moved_to[i + 1] <= to + len && moved_to[i] != NULL; i++)
        moved_to[i] = moved(moved_to[i], from, len, to);
    return moved_to;
}

int green_gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                          int *h_errnop)
{
    struct green_offload_job *job;
    int saved_errno = errno, prepared;

    if (!green_state.active || name == NULL || ret == NULL || buf == NULL || result == NULL || h_errnop == NULL ||
        buflen > MAX_COPIED_BUFFER || numeric_host_name(name))
        return gethostbyname_r(name, ret, buf, buflen, result, h_errnop);
    if (green_interrupted_here())
        goto interrupted;
    job = job_new(JOB_GETHOSTBYNAME_R);
    prepared = job != NULL && !copy_string(name, &job->name) &&
               (job->buffer = copy_buffer(buf, buflen, &job->buffer_block)) != NULL;
    if (prepared) {
        job->buffer_len = buflen;
        job->hostent = *ret;
        job->hostent_result = NULL;
        job->h_error = *h_errnop;
    }
    switch (run_job(job, prepared)) {
    case OFFLOAD_NATIVE:
        errno = saved_errno;
        return gethostbyname_r(name, ret, buf, buflen, result, h_errnop);
    case OFFLOAD_INTERRUPTED:
        goto interrupted;
    case OFFLOAD_DONE:
        break;
    }
    memcpy(buf, job->buffer, buflen);
    *ret = job->hostent;
    ret->h_name = moved(job->hostent.h_name, job->buffer, buflen, buf);
    ret->h_aliases = moved_list(job->hostent.h_aliases, job->buffer, buflen, buf);
    ret->h_addr_list = moved_list(job->hostent.h_addr_list, job->buffer, buflen, buf);
    *result = job->hostent_result == &job->hostent ? ret : job->hostent_result;
    *h_errnop = job->h_error;
    return job_result(job);

interrupted:
    *result = NULL;
    *h_errnop = NETDB_INTERNAL;
    errno = GREEN_INTERRUPTED_ERRNO;
    return GREEN_INTERRUPTED_ERRNO; /* an error number, as gethostbyname_r returns; not ERANGE */
}
