/*
 * Which descriptors belong to greenified client libraries: those a patched
 * library connected (green_connect notes them; green_close and
 * green_tls_close forget them).  The TLS twins (green_tls.c) go green on
 * these only.  Used by green_io.c and green_tls.c; uses nothing.
 */
#ifndef GREENIFY_GREEN_CLIENTS_H
#define GREENIFY_GREEN_CLIENTS_H

void green_tls_note_client(int fd);
void green_tls_forget_client(int fd);
int green_tls_is_client(int fd);

#endif
