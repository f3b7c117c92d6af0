/*
 * greenify.h: libgreenify's green functions, for C code that calls them
 * directly (an extension module, or a plain C library built WITH_GREENIFY).
 *
 * Each green_<name> below has libc's <name>'s exact signature, results and
 * errno.  Called in a greenlet once greenify.greenify() has run, a call that
 * would block waits on the thread's gevent hub instead, so other greenlets
 * run meanwhile; gevent.Timeout and Greenlet.kill() end it (it fails with
 * ETIMEDOUT, and the exception is raised when the caller is back in Python).
 * Before greenify.greenify(), in a thread without a hub, or in the hub
 * itself, it blocks exactly as libc does.  Until this code is given the API
 * (Greenify_Import() or Greenify_Use()), green_<name> *is* libc's <name>.
 *
 * A call may pause while other greenlets of the same thread run, possibly
 * in this same library: code that is ready for threads is ready for this,
 * except that every switch happens in one thread (a thread-local or a lock
 * held across a green call is shared with, or blocks, the other greenlets).
 *
 * Build: python -m greenify --cflags (or include_dirs=[greenify.get_include()]).
 * Requires _GNU_SOURCE (accept4, ppoll): Python.h defines it; a plain C
 * library defines it before its first #include.
 *
 * Extension module: include Python.h first, call Greenify_Import() in its
 * module init (it sets an ImportError on a version mismatch), then call
 * green_recv(...) and the others as libc's.
 *
 * Plain C library (no Python.h), loaded into a Python process with ctypes:
 * export a function that hands Greenify_Use() the address Python gets from
 * greenify.capi_address(); Greenify_Use() returns 0, or -1 on a version
 * mismatch (the library keeps libc's functions).
 *
 * The API pointer is static to each file that includes this header.  A
 * library whose calls are spread over several files defines GREENIFY_API_EXTERN
 * before including it everywhere, and GREENIFY_API_DEFINE too in exactly one
 * file (the one that calls Greenify_Import() or Greenify_Use()).
 */
#ifndef GREENIFY_H
#define GREENIFY_H

#ifndef _GNU_SOURCE
#error "greenify.h needs _GNU_SOURCE defined before the first #include (for accept4, ppoll); Python.h defines it"
#endif

#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A new minor version only appends functions to struct greenify_api; a new
   major version changes what is there. */
#define GREENIFY_API_VERSION_MAJOR 1
#define GREENIFY_API_VERSION_MINOR 0

/* The capsule greenify exports (greenify._C_API), holding the struct below. */
#define GREENIFY_CAPSULE_NAME "greenify._C_API"

/* The API: the library's version and size, then one pointer per green
   function, named after the libc call it replaces.  The build of greenify
   checks that these are exactly its green functions (csrc/twins/green_capi.c). */
struct greenify_api {
    unsigned int version_major; /* GREENIFY_API_VERSION_MAJOR of the library that filled it */
    unsigned int version_minor;
    size_t size; /* sizeof(struct greenify_api) there */

    /* Sockets and files: wait while the descriptor is not ready, unless it is
       O_NONBLOCK or MSG_DONTWAIT asks not to (then EAGAIN, as libc);
       SO_RCVTIMEO/SO_SNDTIMEO end the wait with EAGAIN, as the kernel does. */
    int (*connect)(int fd, const struct sockaddr *addr, socklen_t addrlen);
    int (*accept)(int fd, struct sockaddr *addr, socklen_t *addrlen);
    int (*accept4)(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags);
    ssize_t (*recv)(int fd, void *buf, size_t len, int flags);
    ssize_t (*recvfrom)(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *addrlen);
    ssize_t (*recvmsg)(int fd, struct msghdr *msg, int flags);
    ssize_t (*send)(int fd, const void *buf, size_t len, int flags);
    ssize_t (*sendto)(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t addrlen);
    ssize_t (*sendmsg)(int fd, const struct msghdr *msg, int flags);
    ssize_t (*read)(int fd, void *buf, size_t count);
    ssize_t (*write)(int fd, const void *buf, size_t count);
    ssize_t (*readv)(int fd, const struct iovec *iov, int iovcnt);
    ssize_t (*writev)(int fd, const struct iovec *iov, int iovcnt);
    /* Never blocks: wakes the greenlets waiting on fd (they find it closed), then closes it. */
    int (*close)(int fd);
    /* poll, select, epoll: wait for any of the descriptors, or the timeout. */
    int (*poll)(struct pollfd *fds, nfds_t nfds, int timeout);
    int (*ppoll)(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask);
    int (*select)(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds, struct timeval *timeout);
    int (*pselect)(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds, const struct timespec *timeout,
                   const sigset_t *sigmask);
    int (*epoll_wait)(int epfd, struct epoll_event *events, int maxevents, int timeout);
    int (*epoll_pwait)(int epfd, struct epoll_event *events, int maxevents, int timeout, const sigset_t *sigmask);
    /* Sleeps: a gevent sleep. */
    unsigned int (*sleep)(unsigned int seconds);
    int (*usleep)(useconds_t usec);
    int (*nanosleep)(const struct timespec *req, struct timespec *rem);
    int (*clock_nanosleep)(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem);
    /* Name resolution: libc's own call, on a worker thread, while the greenlet waits. */
    int (*getaddrinfo)(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res);
    int (*getnameinfo)(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen, char *serv,
                       socklen_t servlen, int flags);
    struct hostent *(*gethostbyname)(const char *name);
    int (*gethostbyname_r)(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                           int *h_errnop);
    /* glibc's _FORTIFY_SOURCE forms (buflen/fdslen: the buffer's size, checked first, as glibc does). */
    ssize_t (*__read_chk)(int fd, void *buf, size_t nbytes, size_t buflen);
    ssize_t (*__recv_chk)(int fd, void *buf, size_t len, size_t buflen, int flags);
    ssize_t (*__recvfrom_chk)(int fd, void *buf, size_t len, size_t buflen, int flags, struct sockaddr *addr,
                              socklen_t *addrlen);
    int (*__poll_chk)(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen);
    int (*__ppoll_chk)(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask,
                       size_t fdslen);
};

/* GREENIFY_NO_CALLS: the struct and the version only (greenify's own build,
   where green_<name> are the twins themselves, defines it). */
#ifndef GREENIFY_NO_CALLS

/* glibc declares its fortified forms only under _FORTIFY_SOURCE. */
extern ssize_t __read_chk(int fd, void *buf, size_t nbytes, size_t buflen);
extern ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags);
extern ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags, struct sockaddr *addr,
                              socklen_t *addrlen);
extern int __poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen);
extern int __ppoll_chk(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout, const sigset_t *sigmask,
                       size_t fdslen);

/* With _GNU_SOURCE, glibc declares the sockaddr parameters as transparent
   unions, which pass as the struct pointer: cast to the member's type
   (through void (*)(void), which -Wcast-function-type accepts). */
#define GREENIFY_LIBC_SOCKADDR_CALL(name) ((__typeof__(((struct greenify_api *)0)->name))(void (*)(void))(name))

/* What green_<name> calls until the API is given: libc's own functions. */
static const struct greenify_api greenify_libc_api __attribute__((unused)) = {
    .version_major = GREENIFY_API_VERSION_MAJOR,
    .version_minor = GREENIFY_API_VERSION_MINOR,
    .size = sizeof(struct greenify_api),
    .connect = GREENIFY_LIBC_SOCKADDR_CALL(connect),
    .accept = GREENIFY_LIBC_SOCKADDR_CALL(accept),
    .accept4 = GREENIFY_LIBC_SOCKADDR_CALL(accept4),
    .recv = recv,
    .recvfrom = GREENIFY_LIBC_SOCKADDR_CALL(recvfrom),
    .recvmsg = recvmsg,
    .send = send,
    .sendto = GREENIFY_LIBC_SOCKADDR_CALL(sendto),
    .sendmsg = sendmsg,
    .read = read,
    .write = write,
    .readv = readv,
    .writev = writev,
    .close = close,
    .poll = poll,
    .ppoll = ppoll,
    .select = select,
    .pselect = pselect,
    .epoll_wait = epoll_wait,
    .epoll_pwait = epoll_pwait,
    .sleep = sleep,
    .usleep = usleep,
    .nanosleep = nanosleep,
    .clock_nanosleep = clock_nanosleep,
    .getaddrinfo = getaddrinfo,
    .getnameinfo = getnameinfo,
    .gethostbyname = gethostbyname,
    .gethostbyname_r = gethostbyname_r,
    .__read_chk = __read_chk,
    .__recv_chk = __recv_chk,
    .__recvfrom_chk = __recvfrom_chk,
    .__poll_chk = __poll_chk,
    .__ppoll_chk = __ppoll_chk,
};

#if defined(GREENIFY_API_EXTERN) && !defined(GREENIFY_API_DEFINE)
extern const struct greenify_api *greenify_api;
#elif defined(GREENIFY_API_EXTERN)
const struct greenify_api *greenify_api = &greenify_libc_api;
#else
static const struct greenify_api *greenify_api __attribute__((unused)) = &greenify_libc_api;
#endif

/* Whether the table at `api` was filled by a library this header can use:
   the same major version, and at least the functions this header knows. */
static inline int greenify_api_fits(const struct greenify_api *api)
{
    return api->version_major == GREENIFY_API_VERSION_MAJOR && api->size >= sizeof(struct greenify_api);
}

/* For a plain C library: use the green functions at `address`
   (greenify.capi_address()); 0, or -1 if they do not fit this header, in
   which case libc's stay in use. */
static inline int Greenify_Use(const void *address)
{
    const struct greenify_api *api = (const struct greenify_api *)address;
    if (api == NULL || !greenify_api_fits(api))
        return -1;
    greenify_api = api;
    return 0;
}

#ifdef Py_PYTHON_H
/* For an extension module, in its init: import greenify's capsule and use
   its functions.  0; or -1 with an exception set (ImportError naming both
   versions when the installed greenify does not fit this header). */
static inline int Greenify_Import(void)
{
    const struct greenify_api *api = (const struct greenify_api *)PyCapsule_Import(GREENIFY_CAPSULE_NAME, 0);
    if (api == NULL)
        return -1;
    if (!greenify_api_fits(api)) {
        PyErr_Format(PyExc_ImportError,
                     "the installed greenify's C API is version %u.%u (%zu bytes), this module was built against "
                     "greenify.h version %d.%d (%zu bytes): rebuild it against the installed greenify",
                     api->version_major, api->version_minor, api->size, GREENIFY_API_VERSION_MAJOR,
                     GREENIFY_API_VERSION_MINOR, sizeof(struct greenify_api));
        return -1;
    }
    greenify_api = api;
    return 0;
}
#endif

/* green_<name>(...): a call through the API in use. */
#define green_connect (greenify_api->connect)
#define green_accept (greenify_api->accept)
#define green_accept4 (greenify_api->accept4)
#define green_recv (greenify_api->recv)
#define green_recvfrom (greenify_api->recvfrom)
#define green_recvmsg (greenify_api->recvmsg)
#define green_send (greenify_api->send)
#define green_sendto (greenify_api->sendto)
#define green_sendmsg (greenify_api->sendmsg)
#define green_read (greenify_api->read)
#define green_write (greenify_api->write)
#define green_readv (greenify_api->readv)
#define green_writev (greenify_api->writev)
#define green_close (greenify_api->close)
#define green_poll (greenify_api->poll)
#define green_ppoll (greenify_api->ppoll)
#define green_select (greenify_api->select)
#define green_pselect (greenify_api->pselect)
#define green_epoll_wait (greenify_api->epoll_wait)
#define green_epoll_pwait (greenify_api->epoll_pwait)
#define green_sleep (greenify_api->sleep)
#define green_usleep (greenify_api->usleep)
#define green_nanosleep (greenify_api->nanosleep)
#define green_clock_nanosleep (greenify_api->clock_nanosleep)
#define green_getaddrinfo (greenify_api->getaddrinfo)
#define green_getnameinfo (greenify_api->getnameinfo)
#define green_gethostbyname (greenify_api->gethostbyname)
#define green_gethostbyname_r (greenify_api->gethostbyname_r)
#define green___read_chk (greenify_api->__read_chk)
#define green___recv_chk (greenify_api->__recv_chk)
#define green___recvfrom_chk (greenify_api->__recvfrom_chk)
#define green___poll_chk (greenify_api->__poll_chk)
#define green___ppoll_chk (greenify_api->__ppoll_chk)

#endif /* GREENIFY_NO_CALLS */

#ifdef __cplusplus
}
#endif

#endif
