/*
 * Loops that time one call on a ready descriptor, through a function
 * pointer: libc's own function or its green twin.  Everything but the
 * function is identical between the two runs.  Returns ns per call.
 */
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

typedef ssize_t (*recv_fn)(int, void *, size_t, int);
typedef ssize_t (*send_fn)(int, const void *, size_t, int);
typedef ssize_t (*read_fn)(int, void *, size_t);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef int (*poll_fn)(struct pollfd *, nfds_t, int);
typedef int (*select_fn)(int, fd_set *, fd_set *, fd_set *, struct timeval *);

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* recv with MSG_PEEK: the byte stays, so every call finds the fd ready. */
double time_recv(void *fn, int fd, long n)
{
    char byte;
    double start = now_ns();
    for (long i = 0; i < n; i++)
        if (((recv_fn)fn)(fd, &byte, 1, MSG_PEEK) != 1)
            return -1;
    return (now_ns() - start) / (double)n;
}

/* send one byte; the peer is drained every 1024 sends (the same for both). */
double time_send(void *fn, int fd, int peer, long n)
{
    char byte = 'x', sink[4096];
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        if (((send_fn)fn)(fd, &byte, 1, 0) != 1)
            return -1;
        if ((i & 1023) == 1023)
            while (recv(peer, sink, sizeof sink, MSG_DONTWAIT) > 0)
                ;
    }
    return (now_ns() - start) / (double)n;
}

/* write one byte to a socket, the peer drained every 1024 writes. */
double time_write(void *fn, int fd, int peer, long n)
{
    char byte = 'x', sink[4096];
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        if (((write_fn)fn)(fd, &byte, 1) != 1)
            return -1;
        if ((i & 1023) == 1023)
            while (recv(peer, sink, sizeof sink, MSG_DONTWAIT) > 0)
                ;
    }
    return (now_ns() - start) / (double)n;
}

/* read 1024 bytes at a time from a socket the peer filled beforehand
   (refilled with libc's send, the same for both). */
double time_read(void *fn, int fd, int peer, long n)
{
    static char block[1 << 16];
    char buf[1024];
    double start = now_ns(), took;
    for (long i = 0; i < n; i++) {
        if ((i & 31) == 0 && send(peer, block, sizeof(buf) * 32, 0) < 0)
            return -1;
        if (((read_fn)fn)(fd, buf, sizeof buf) <= 0)
            return -1;
    }
    took = now_ns() - start;
    while (recv(fd, buf, sizeof buf, MSG_DONTWAIT) > 0) /* what the last refill left, outside the timing */
        ;
    return took / (double)n;
}

double time_poll(void *fn, int fd, long n)
{
    struct pollfd p = {fd, POLLOUT, 0};
    double start = now_ns();
    for (long i = 0; i < n; i++)
        if (((poll_fn)fn)(&p, 1, 1000) != 1)
            return -1;
    return (now_ns() - start) / (double)n;
}

double time_select(void *fn, int fd, long n)
{
    fd_set w;
    struct timeval timeout;
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        FD_ZERO(&w);
        FD_SET(fd, &w);
        timeout.tv_sec = 1;
        timeout.tv_usec = 0;
        if (((select_fn)fn)(fd + 1, NULL, &w, NULL, &timeout) != 1)
            return -1;
    }
    return (now_ns() - start) / (double)n;
}

/* The C side of a ping-pong: send one byte, wait for the echo, n times. */
double ping_pong(void *send_function, void *recv_function, int fd, long n)
{
    char byte = 'p';
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        if (((send_fn)send_function)(fd, &byte, 1, 0) != 1)
            return -1;
        if (((recv_fn)recv_function)(fd, &byte, 1, 0) != 1)
            return -1;
    }
    return (now_ns() - start) / (double)n;
}
