/*
 * The demo's blocking C client: an ordinary library that knows nothing of
 * gevent.  demo_fetch() connects, sends a request line, waits for the reply
 * with poll() and reads it with recv(), all through libc, all blocking.
 * `python -m greenify.demo` runs it first as it is, then patched.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Ask the server at 127.0.0.1:port for `request`; copy its reply into
   `reply`.  Returns the reply's length, or -1. */
int demo_fetch(int port, const char *request, char *reply, int reply_size)
{
    struct sockaddr_in address;
    struct pollfd ready;
    int fd, length, received = 0;

    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0)
        goto fail;
    length = (int)strlen(request);
    if (send(fd, request, (size_t)length, 0) != length)
        goto fail;
    while (received < reply_size - 1) {
        ssize_t n;
        ready.fd = fd;
        ready.events = POLLIN;
        if (poll(&ready, 1, 10000) != 1)
            goto fail;
        n = recv(fd, reply + received, (size_t)(reply_size - 1 - received), 0);
        if (n < 0)
            goto fail;
        if (n == 0)
            break;
        received += (int)n;
    }
    reply[received] = '\0';
    close(fd);
    return received;
fail:
    close(fd);
    return -1;
}
