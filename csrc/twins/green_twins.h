/*
 * The green twins: one per row of GREEN_FUNCTIONS and GREEN_FORTIFIED_FUNCTIONS
 * (green.h), each with the exact signature and results of the libc call it
 * replaces.  Sockets and files in csrc/twins/green_io.c, poll and select in
 * csrc/twins/green_poll.c, epoll in csrc/twins/green_epoll.c, sleeps in
 * csrc/twins/green_sleep.c, name resolution (on a thread pool) in
 * csrc/twins/green_resolve.c.
 */
#ifndef GREENIFY_GREEN_TWINS_H
#define GREENIFY_GREEN_TWINS_H

#include <netdb.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "green.h"

/* Sockets and files (csrc/twins/green_io.c). */
int green_close(int fd);
int green_connect(int fd, const struct sockaddr *addr, socklen_t addrlen);
int green_accept(int fd, struct sockaddr *addr, socklen_t *addrlen);
int green_accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags);
ssize_t green_recv(int fd, void *buf, size_t len, int flags);
ssize_t green_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *addrlen);
ssize_t green_recvmsg(int fd, struct msghdr *msg, int flags);
ssize_t green_send(int fd, const void *buf, size_t len, int flags);
ssize_t green_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t addrlen);
ssize_t green_sendmsg(int fd, const struct msghdr *msg, int flags);
ssize_t green_read(int fd, void *buf, size_t count);
ssize_t green_write(int fd, const void *buf, size_t count);
ssize_t green_readv(int fd, const struct iovec *iov, int iovcnt);
ssize_t green_writev(int fd, const struct iovec *iov, int iovcnt);
ssize_t green___read_chk(int fd, void *buf, size_t nbytes, size_t buflen);
ssize_t green___recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags);
ssize_t green___recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                             struct sockaddr *addr, socklen_t *addrlen);

/* poll and select (csrc/twins/green_poll.c). */
int green_poll(struct pollfd *fds, nfds_t nfds, int timeout);
int green_ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask);
int green_select(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds, struct timeval *timeout);
int green_pselect(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds,
                  const struct timespec *timeout, const sigset_t *sigmask);
int green___poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen);
int green___ppoll_chk(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout,
                      const sigset_t *sigmask, size_t fdslen);

/* epoll (csrc/twins/green_epoll.c). */
int green_epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);
int green_epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout, const sigset_t *sigmask);

/* Sleeps (csrc/twins/green_sleep.c). */
unsigned int green_sleep(unsigned int seconds);
int green_usleep(useconds_t usec);
int green_nanosleep(const struct timespec *req, struct timespec *rem);
int green_clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem);

/* Name resolution (csrc/twins/green_resolve.c). */
int green_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res);
int green_getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen, char *serv,
                      socklen_t servlen, int flags);
struct hostent *green_gethostbyname(const char *name);
int green_gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                          int *h_errnop);

#endif
