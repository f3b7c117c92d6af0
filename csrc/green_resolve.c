/*
 * Green twins of the resolver: getaddrinfo, getnameinfo, gethostbyname,
 * gethostbyname_r.
 *
 * Resolution reads files, loads NSS modules and talks to DNS servers:
 * nothing a green function can wait on through one descriptor of its own.
 * So the real libc call runs on a worker thread (the waiter's: with gevent,
 * hub.threadpool) while the calling greenlet waits, through green_wait, for
 * an eventfd that the pool thread signals when it is done.  The results are
 * libc's own: freeaddrinfo frees a green getaddrinfo's list as usual.
 *
 * A call is a heap-allocated job holding copies of the inputs and its own
 * outputs, shared by the caller and the pool through a reference count.  A
 * greenlet interrupted by gevent.Timeout or kill abandons its job and
 * returns at once; the pool side finishes it and the last holder frees it,
 * an abandoned getaddrinfo list included.  Nothing is written into the
 * caller's memory after the caller returned.
 *
 * The job's state decides who runs the call, exactly once:
 *   QUEUED -> RUNNING -> FINISHED   the pool thread ran it
 *   QUEUED -> DROPPED               the pool let go of it unrun: the caller
 *                                   calls libc itself
 *   QUEUED -> TAKEN_BACK            never handed over: the caller calls libc
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#include "green_offload.h"
#include "green_python.h"
#include "green_twins.h"

enum job_kind { JOB_GETADDRINFO, JOB_GETNAMEINFO, JOB_GETHOSTBYNAME, JOB_GETHOSTBYNAME_R };
enum job_state { JOB_QUEUED, JOB_RUNNING, JOB_FINISHED, JOB_DROPPED, JOB_TAKEN_BACK };

/* Caller-side outcome of offload(). */
enum offload_outcome { OFFLOAD_DONE, OFFLOAD_NATIVE, OFFLOAD_INTERRUPTED };

/* Copies of buffers the caller owns keep their address modulo this, so
   libc lays out (and aligns) its data in them exactly as in the caller's. */
#define BUFFER_ALIGNMENT 16
/* Larger caller buffers are not copied: the call goes to libc directly. */
#define MAX_COPIED_BUFFER (16u << 20)

struct green_offload_job {
    int refs;
    int state;
    int abandoned; /* the caller was interrupted and left: nobody wants the results */
    int done_fd;   /* eventfd, written once the state is FINISHED or DROPPED */
    enum job_kind kind;

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

/* ---- the job ---- */

/* Finished jobs' eventfds are kept open and reused rather than closed: two
   system calls fewer per lookup, and the hub's io watcher for that number
   always refers to the same open file (libev cannot tell when a number was
   closed and opened again between two waits). */
#define SPARE_DONE_FDS 256
static int spare_done_fds[SPARE_DONE_FDS];
static int spare_done_fd_count;
static pthread_mutex_t spare_done_fds_lock = PTHREAD_MUTEX_INITIALIZER;

static int done_fd_take(void)
{
    int fd = -1, saved_errno = errno;
    uint64_t count;
    pthread_mutex_lock(&spare_done_fds_lock);
    if (spare_done_fd_count > 0)
        fd = spare_done_fds[--spare_done_fd_count];
    pthread_mutex_unlock(&spare_done_fds_lock);
    if (fd >= 0) {
        ssize_t drained = read(fd, &count, sizeof count); /* back to "not done" */
        (void)drained;
    }
    else {
        fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    }
    errno = saved_errno;
    return fd;
}

static void done_fd_give_back(int fd)
{
    pthread_mutex_lock(&spare_done_fds_lock);
    if (spare_done_fd_count < SPARE_DONE_FDS) {
        spare_done_fds[spare_done_fd_count++] = fd;
        fd = -1;
    }
    pthread_mutex_unlock(&spare_done_fds_lock);
    if (fd >= 0)
        close(fd);
}

/* Jobs allocated and not yet freed: the tests check that abandoned jobs go. */
static int live_jobs;

int green_offload_live_jobs(void) { return __atomic_load_n(&live_jobs, __ATOMIC_SEQ_CST); }

static struct green_offload_job *job_new(enum job_kind kind)
{
    struct green_offload_job *job = calloc(1, sizeof *job);
    if (job == NULL)
        return NULL;
    job->done_fd = done_fd_take();
    if (job->done_fd < 0) {
        free(job);
        return NULL;
    }
    __atomic_add_fetch(&live_jobs, 1, __ATOMIC_SEQ_CST);
    job->refs = 1;
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

static void job_release(struct green_offload_job *job)
{
    if (__atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL) == 0)
        job_free(job);
}

static void job_signal_done(struct green_offload_job *job)
{
    uint64_t one = 1;
    ssize_t written = write(job->done_fd, &one, sizeof one);
    (void)written; /* an eventfd write of 1 cannot fail short of overflow */
}

static int job_move_state(struct green_offload_job *job, int from, int to)
{
    return __atomic_compare_exchange_n(&job->state, &from, to, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
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

/* ---- the pool's side, called from the job runner greenify/_offload.py hands over ---- */

struct green_offload_job *green_offload_retain(struct green_offload_job *job)
{
    __atomic_add_fetch(&job->refs, 1, __ATOMIC_ACQ_REL);
    return job;
}

/* Runs in a pool thread, without the GIL. */
void green_offload_run(struct green_offload_job *job)
{
    if (!job_move_state(job, JOB_QUEUED, JOB_RUNNING))
        return;
    if (!__atomic_load_n(&job->abandoned, __ATOMIC_SEQ_CST))
        job_call(job);
    __atomic_store_n(&job->state, JOB_FINISHED, __ATOMIC_SEQ_CST);
    job_signal_done(job);
}

/* The pool's reference goes away (run or not): an unrun job goes back to
   the caller, which calls libc itself. */
void green_offload_drop(struct green_offload_job *job)
{
    if (job_move_state(job, JOB_QUEUED, JOB_DROPPED))
        job_signal_done(job);
    job_release(job);
}

/* ---- the caller's side ---- */

/* Hands the job to a worker (green_python_offload) and waits for it. */
static enum offload_outcome offload(struct green_offload_job *job)
{
    static const int function_of_kind[] = {GREEN_FN_getaddrinfo, GREEN_FN_getnameinfo, GREEN_FN_gethostbyname,
                                           GREEN_FN_gethostbyname_r};
    struct green_watch watch = {job->done_fd, GREEN_READ};
    struct green_call stats = {function_of_kind[job->kind], 0};
    int saved_errno = errno;
    int can_wait = green_python_offload(job) == GREEN_OFFLOAD_SUBMITTED;

    if (!can_wait && (job_move_state(job, JOB_QUEUED, JOB_TAKEN_BACK) ||
                      __atomic_load_n(&job->state, __ATOMIC_SEQ_CST) == JOB_DROPPED))
        return OFFLOAD_NATIVE;
    for (;;) {
        int state = __atomic_load_n(&job->state, __ATOMIC_SEQ_CST);
        if (state == JOB_FINISHED)
            return OFFLOAD_DONE;
        if (state == JOB_DROPPED)
            return OFFLOAD_NATIVE;
        if (can_wait) {
            int status = green_wait(&stats, &watch, 1, GREEN_NO_DEADLINE);
            if (status == GREEN_INTERRUPTED) {
                __atomic_store_n(&job->abandoned, 1, __ATOMIC_SEQ_CST);
                return OFFLOAD_INTERRUPTED;
            }
            can_wait = status != GREEN_CANNOT_WAIT;
        }
        else { /* the pool has it and nothing can wait here: block, as libc would */
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

/* Runs a job on the pool; `prepared` says whether filling it in worked.
   Unless the outcome is OFFLOAD_DONE the job is released here: the caller
   then calls libc itself (OFFLOAD_NATIVE) or reports the interruption. */
static enum offload_outcome run_job(struct green_offload_job *job, int prepared)
{
    enum offload_outcome outcome = job != NULL && prepared ? offload(job) : OFFLOAD_NATIVE;
    if (outcome != OFFLOAD_DONE && job != NULL)
        job_release(job);
    return outcome;
}

/* A finished job's result, with errno as the pool thread left it on failure;
   releases the job. */
static int job_result(struct green_offload_job *job)
{
    int result = job->result;
    if (result != 0)
        errno = job->error_number;
    job_release(job);
    return result;
}

int green_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    struct green_offload_job *job;
    int saved_errno = errno, prepared;
    int numeric = hints != NULL && (hints->ai_flags & AI_NUMERICHOST) &&
                  (service == NULL || (hints->ai_flags & AI_NUMERICSERV));

    if (!green_state.active || numeric || res == NULL) /* numeric lookups never block */
        return getaddrinfo(node, service, hints, res);
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

struct hostent *green_gethostbyname(const char *name)
{
    struct green_offload_job *job;
    struct thread_hostent *mine;
    int saved_errno = errno;

    if (!green_state.active || name == NULL)
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
        job_release(job);
        return NULL;
    }
    /* the pointers inside point into job->buffer_block, which this thread keeps */
    free(mine->buffer);
    mine->buffer = job->buffer_block;
    mine->hostent = job->hostent;
    job->buffer = job->buffer_block = NULL;
    job_release(job);
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
        buflen > MAX_COPIED_BUFFER)
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
