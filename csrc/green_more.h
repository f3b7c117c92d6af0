/*
 * Green twins beyond sockets: sleeps (csrc/green_sleep.c), epoll
 * (csrc/green_epoll.c) and name resolution on gevent's thread pool
 * (csrc/green_resolve.c).  Same rules as green.h: libc's exact signatures
 * and results, a wait on the hub where libc would block, libc itself where
 * no wait is possible.
 */
#ifndef GREENIFY_GREEN_MORE_H
#define GREENIFY_GREEN_MORE_H

#include <netdb.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "green.h"

/* Sleeps. */
unsigned int green_sleep(unsigned int seconds);
int green_usleep(useconds_t usec);
int green_nanosleep(const struct timespec *req, struct timespec *rem);
int green_clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem);

/* epoll. */
int green_epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);
int green_epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout, const sigset_t *sigmask);

/* Name resolution. */
int green_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res);
int green_getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen, char *serv,
                      socklen_t servlen, int flags);
struct hostent *green_gethostbyname(const char *name);
int green_gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                          int *h_errnop);

/* One resolver call handed to the thread pool (csrc/green_resolve.c); the
   Python side (greenify/_offload.py) holds a reference while it is queued. */
struct green_offload_job;
#define GREEN_OFFLOAD_NATIVE 0    /* not handed over: the caller calls libc itself */
#define GREEN_OFFLOAD_SUBMITTED 1 /* handed to the pool: wait for done_fd */
struct green_offload_job *green_offload_retain(struct green_offload_job *job);
void green_offload_drop(struct green_offload_job *job);
void green_offload_run(struct green_offload_job *job);
int green_offload_live_jobs(void);

#endif
