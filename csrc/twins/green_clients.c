/*
 * The client descriptors (green_clients.h): one byte each in a table
 * indexed by the fd number (1 MiB of address space, only the pages touched
 * are ever backed); reads and writes are relaxed atomics, as a descriptor
 * is noted by the thread that connects it before any other thread can use
 * it.  Descriptors at or above GREEN_TLS_MAX_FD are never client
 * descriptors: their TLS I/O stays libc's.
 */
#include "green_clients.h"

#define GREEN_TLS_MAX_FD (1 << 20)

static unsigned char client_fds[GREEN_TLS_MAX_FD];

void green_tls_note_client(int fd)
{
    if (fd >= 0 && fd < GREEN_TLS_MAX_FD)
        __atomic_store_n(&client_fds[fd], 1, __ATOMIC_RELAXED);
}

void green_tls_forget_client(int fd)
{
    if (fd >= 0 && fd < GREEN_TLS_MAX_FD)
        __atomic_store_n(&client_fds[fd], 0, __ATOMIC_RELAXED);
}

int green_tls_is_client(int fd)
{
    return fd >= 0 && fd < GREEN_TLS_MAX_FD && __atomic_load_n(&client_fds[fd], __ATOMIC_RELAXED);
}
