/*
 * The common wait, below Python: one descriptor, with or without a
 * deadline, on a gevent hub whose loop is libev's.
 *
 * The general bridge (greenify/waiting/bridge.py) costs a cffi callback, a Python
 * frame and gevent's watcher objects on every wait.  For the wait a database
 * client makes all day (its socket, until the answer comes) this file does
 * the same with libev's and greenlet's C APIs: it starts a libev io watcher
 * it owns, one per descriptor, switches to the hub greenlet, and the
 * watcher's C callback switches back; a deadline is a libev timer beside
 * it.  Everything else (several descriptors, an interrupted greenlet, a busy
 * descriptor, another loop
 * implementation, a thread not attached yet) answers GREEN_FAST_UNAVAILABLE
 * and takes the general bridge, whose rules this path follows exactly.
 *
 * A thread is attached by greenify/waiting/fastwait.py the first time the bridge
 * waits on its hub; the hub is looked up on every wait, so a destroyed or
 * replaced hub is never used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <greenlet.h>

#include "green.h"
#include "green_python.h"

/* libev's struct ev_io as gevent embeds it (libev 4.x built with an empty
   EV_COMMON, so no `data` field, and the default priority range);
   greenify/waiting/fastwait.py attaches only a loop built that way. */
struct libev_io;
typedef void (*libev_io_callback)(void *loop, struct libev_io *watcher, int revents);
struct libev_io {
    int active;
    int pending;
    int priority;
    libev_io_callback cb;
    void *next;
    int fd;
    int events;
};
#define LIBEV_IOFDSET 0x80 /* EV__IOFDSET: the fd was set anew, libev registers it again */

/* libev's struct ev_timer, built the same way. */
struct libev_timer;
typedef void (*libev_timer_callback)(void *loop, struct libev_timer *watcher, int revents);
struct libev_timer {
    int active;
    int pending;
    int priority;
    libev_timer_callback cb;
    double at;     /* seconds from now until ev_timer_start, the loop's time after */
    double repeat;
};

typedef void (*libev_io_start_stop)(void *loop, struct libev_io *watcher);
typedef void (*libev_feed_event)(void *loop, void *watcher, int revents);
typedef void (*libev_timer_start_stop)(void *loop, struct libev_timer *watcher);
typedef void (*libev_now_update)(void *loop);

/* One descriptor's watcher, and the greenlet waiting on it. */
struct fast_watch {
    struct libev_io io;       /* first: libev's callback gets this address */
    struct libev_timer timer; /* the wait's deadline, when it has one */
    struct fast_hub *hub;
    PyObject *waiter;         /* borrowed: the greenlet is inside green_fast_wait */
    int timed_out;            /* the timer ended the wait */
    int registered;           /* libev was told the fd anew at least once */
    dev_t registered_dev;     /* the socket the number named when it was: */
    ino_t registered_ino;     /* st_ino identifies one socket (see same_socket) */
};

/* Whether fd still names the socket whose registration the watcher made.
   A socket's inode belongs to that socket alone from its creation to its
   last close (sockfs numbers each new one; no path opens one twice), and
   the kernel drops an epoll registration only when that last close comes.
   So the same socket inode under the same number means the registration
   stands, however the number was closed and reused in between (Python's
   close, os.close, dup2/dup3, an unpatched library, another thread).  Any
   other file (a pipe, an eventfd: anonymous inodes are shared; a FIFO
   opened twice) is never trusted. */
static int same_socket(int fd, const struct fast_watch *watch, struct stat *now)
{
    if (fstat(fd, now) != 0) {
        memset(now, 0, sizeof *now);
        return 0;
    }
    return watch->registered && S_ISSOCK(now->st_mode) && now->st_ino == watch->registered_ino &&
           now->st_dev == watch->registered_dev;
}

/* One thread's hub, as the fast wait uses it. */
struct fast_hub {
    PyObject *hub;            /* borrowed: when it dies, greenify/waiting/fastwait.py sets `gone` first */
    volatile int gone;
    PyObject *get_hub;        /* gevent._hub_local.get_hub_if_exists */
    void *loop;               /* the hub's struct ev_loop */
    libev_io_start_stop io_start, io_stop;
    libev_feed_event feed_event;
    libev_timer_start_stop timer_start, timer_stop;
    libev_now_update now_update;
    struct fast_watch **by_fd;
    int capacity;
};

static __thread struct fast_hub *this_thread;
static int greenlet_imported;
static unsigned long long fast_waits; /* waits this path carried out, all threads */

unsigned long long green_fast_waits(void) { return __atomic_load_n(&fast_waits, __ATOMIC_RELAXED); }

/* Stops the watcher and its timer. */
static void watch_stop(struct fast_watch *watch)
{
    struct fast_hub *fast = watch->hub;
    if (watch->io.active)
        fast->io_stop(fast->loop, &watch->io);
    if (watch->timer.active)
        fast->timer_stop(fast->loop, &watch->timer);
}

/* The wait is over (ready, or its deadline passed): back to the waiter. */
static void wait_over(struct fast_watch *watch)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *waiter = watch->waiter;
    watch_stop(watch);
    if (waiter != NULL) {
        /* Back here when the waiter (or anyone) switches to the hub again. */
        PyObject *result = PyGreenlet_Switch((PyGreenlet *)waiter, NULL, NULL);
        if (result == NULL)
            PyErr_WriteUnraisable(waiter); /* something threw into the hub: gevent's callbacks report it likewise */
        Py_XDECREF(result);
    }
    PyGILState_Release(gil);
}

static void fast_io_ready(void *loop, struct libev_io *io, int revents)
{
    (void)loop, (void)revents; /* libev's callback signature */
    wait_over((struct fast_watch *)io);
}

/* The wait's deadline passed. */
static void fast_timer(void *loop, struct libev_timer *timer, int revents)
{
    (void)loop, (void)revents;
    struct fast_watch *watch = (struct fast_watch *)((char *)timer - offsetof(struct fast_watch, timer));
    watch->timed_out = 1;
    wait_over(watch);
}

/* What a fast_hub holds, released (GIL held): called when its hub is
   replaced or gone.  A watcher still active belongs to a loop that is going
   away with its hub, and no greenlet can be waiting on it (waiting keeps the
   hub running). */
static void fast_hub_release(struct fast_hub *fast)
{
    for (int fd = 0; fd < fast->capacity; fd++)
        free(fast->by_fd[fd]);
    free(fast->by_fd);
    fast->by_fd = NULL;
    fast->capacity = 0;
    Py_CLEAR(fast->get_hub);
}

/* The struct itself may go only once nothing will write to it: after its
   hub's weakref callback set `gone`, or before the hub was attached.  The
   struct of a replaced hub that is still alive stays allocated (a few
   words), released, for that callback to write into. */
static void fast_hub_free(struct fast_hub *fast)
{
    fast_hub_release(fast);
    free(fast);
}

/* Attaches the calling thread's hub; returns a handle for
   green_fast_hub_gone(), or 0 when the fast wait cannot be used. */
uintptr_t green_fast_attach(uintptr_t hub_id, uintptr_t loop, void *io_start, void *io_stop, void *feed_event,
                            void *timer_start, void *timer_stop, void *now_update)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    struct fast_hub *fast = NULL;
    uintptr_t handle = 0;

    if (!greenlet_imported) {
        PyGreenlet_Import();
        if (_PyGreenlet_API == NULL)
            goto done;
        greenlet_imported = 1;
    }
    fast = calloc(1, sizeof *fast);
    if (fast == NULL)
        goto done;
    PyObject *hub_local = PyImport_ImportModule("gevent._hub_local");
    if (hub_local == NULL)
        goto done;
    fast->get_hub = PyObject_GetAttrString(hub_local, "get_hub_if_exists");
    Py_DECREF(hub_local);
    if (fast->get_hub == NULL)
        goto done;
    fast->hub = (PyObject *)hub_id;
    fast->loop = (void *)loop;
    fast->io_start = (libev_io_start_stop)io_start;
    fast->io_stop = (libev_io_start_stop)io_stop;
    fast->feed_event = (libev_feed_event)feed_event;
    fast->timer_start = (libev_timer_start_stop)timer_start;
    fast->timer_stop = (libev_timer_start_stop)timer_stop;
    fast->now_update = (libev_now_update)now_update;
    if (this_thread != NULL && this_thread->gone)
        fast_hub_free(this_thread);
    else if (this_thread != NULL)
        fast_hub_release(this_thread); /* its hub lives on: its callback will still write `gone` */
    this_thread = fast;
    handle = (uintptr_t)fast;
    fast = NULL;
done:
    if (handle == 0)
        PyErr_Clear();
    if (fast != NULL)
        fast_hub_free(fast);
    PyGILState_Release(gil);
    return handle;
}

/* The attached hub is being deallocated (a weakref callback, in any
   thread): its thread frees the rest at its next wait.  A struct whose
   thread has ended stays allocated; it is a few words. */
void green_fast_hub_gone(uintptr_t handle)
{
    ((struct fast_hub *)handle)->gone = 1;
}

static struct fast_watch *watch_for(struct fast_hub *fast, int fd)
{
    if (fd >= fast->capacity) {
        int capacity = fast->capacity ? fast->capacity : 64;
        while (capacity <= fd)
            capacity *= 2;
        struct fast_watch **grown = realloc(fast->by_fd, (size_t)capacity * sizeof *grown);
        if (grown == NULL)
            return NULL;
        memset(grown + fast->capacity, 0, (size_t)(capacity - fast->capacity) * sizeof *grown);
        fast->by_fd = grown;
        fast->capacity = capacity;
    }
    if (fast->by_fd[fd] == NULL) {
        struct fast_watch *watch = calloc(1, sizeof *watch);
        if (watch == NULL)
            return NULL;
        watch->io.cb = fast_io_ready;
        watch->timer.cb = fast_timer;
        watch->hub = fast;
        fast->by_fd[fd] = watch;
    }
    return fast->by_fd[fd];
}

/* Records the exception thrown into the waiting greenlet (the current error) exactly as
   the general bridge does, and clears it. */
static int record_interruption(PyObject *current)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    int status = GREEN_INTERRUPTED;
    PyObject *entries = PyImport_ImportModule(GREENIFY_ENTRIES_MODULE);
    PyObject *answer = entries == NULL ? NULL : PyObject_CallMethod(entries, "record_interruption", "OO", current, value);
    if (answer == NULL)
        PyErr_WriteUnraisable(value); /* cannot happen short of memory: the call still fails as interrupted */
    Py_XDECREF(answer);
    Py_XDECREF(entries);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return status;
}

/* The calling thread's hub, if it is the one attached and the caller is
   not the hub itself; NULL otherwise (GIL held). */
static struct fast_hub *usable_hub(PyObject *current)
{
    struct fast_hub *fast = this_thread;
    if (fast == NULL)
        return NULL;
    if (fast->gone) {
        this_thread = NULL;
        fast_hub_free(fast);
        return NULL;
    }
    PyObject *hub = PyObject_CallNoArgs(fast->get_hub);
    if (hub == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(hub); /* alive: it is this thread's hub; only its address is compared */
    if (hub != fast->hub || current == hub)
        return NULL;
    return fast;
}

int green_fast_wait_available(void)
{
    return this_thread != NULL && !green_state.interrupts_pending && !green_state.waiters_registered;
}

int green_fast_wait(const struct green_watch *watch_asked, int64_t deadline_ns, int deadline_ends_call)
{
    struct fast_hub *fast;
    struct fast_watch *watch;
    PyObject *current, *result;
    int status = GREEN_FAST_UNAVAILABLE;

    if (!green_fast_wait_available())
        return GREEN_FAST_UNAVAILABLE; /* not attached, interruptions to honour, waiters to choose: the bridge's rules */
    struct green_python_entry entry;
    green_python_enter(&entry);
    current = (PyObject *)PyGreenlet_GetCurrent();
    fast = current == NULL ? NULL : usable_hub(current);
    if (fast == NULL || watch_asked->fd < 0)
        goto done;
    watch = watch_for(fast, watch_asked->fd);
    if (watch == NULL || watch->io.active || watch->waiter != NULL)
        goto done; /* another greenlet waits on this descriptor: the bridge handles sharing */
    /* libev registers the fd with the kernel again only when told the fd
       was set anew (an epoll_ctl) or when the events asked of the fd change
       between two iterations.  A watcher stopped and started again within
       one iteration, as a client waiting on its socket again does, is
       registered still if and only if the number still names the socket
       it was registered for: checked on every wait (one fstat, no trust). */
    struct stat now;
    int registered = same_socket(watch_asked->fd, watch, &now);
    int64_t now_ns = deadline_ns == GREEN_NO_DEADLINE ? 0 : green_now_ns();
    watch->io.fd = watch_asked->fd;
    watch->io.events = watch_asked->events | (registered ? 0 : LIBEV_IOFDSET);
    watch->registered = 1;
    watch->registered_dev = now.st_dev;
    watch->registered_ino = now.st_ino;
    watch->waiter = current;
    watch->timed_out = 0;
    fast->io_start(fast->loop, &watch->io);
    if (deadline_ns != GREEN_NO_DEADLINE) {
        /* The loop's clock is the time its iteration began: brought up to
           now for a deadline that ends the call, as gevent's own timers do,
           so the timer ends on time (green_wait waits the rest of one that
           ends early). */
        if (deadline_ends_call)
            fast->now_update(fast->loop);
        watch->timer.at = deadline_ns > now_ns ? (double)(deadline_ns - now_ns) / 1e9 : 0.0;
        watch->timer.repeat = 0.0;
        fast->timer_start(fast->loop, &watch->timer);
    }
    __atomic_add_fetch(&fast_waits, 1, __ATOMIC_RELAXED);
    result = PyGreenlet_Switch((PyGreenlet *)fast->hub, NULL, NULL);
    if (watch->io.active || watch->timer.active)
        watch_stop(watch); /* woken by someone else: a spurious switch or a throw */
    watch->waiter = NULL;
    if (result != NULL) {
        Py_DECREF(result);
        /* ready, or a spurious switch: the caller probes again */
        status = watch->timed_out ? GREEN_TIMED_OUT : GREEN_WOKEN;
    }
    else {
        status = record_interruption(current); /* an exception was thrown into the waiting greenlet */
    }
done:
    Py_XDECREF(current);
    green_python_leave(&entry);
    return status;
}

/* Before fd is closed by the close twin: its waiter in this thread wakes,
   probes again and finds it gone. */
void green_fast_closing(int fd)
{
    struct fast_hub *fast = this_thread;
    if (!green_state.active || green_state.finalizing)
        return;
    if (fast != NULL && fd >= 0 && fd < fast->capacity && fast->by_fd[fd] != NULL &&
        fast->by_fd[fd]->waiter != NULL && fast->by_fd[fd]->io.active)
        fast->feed_event(fast->loop, &fast->by_fd[fd]->io, fast->by_fd[fd]->io.events & (GREEN_READ | GREEN_WRITE));
}

/* The descriptors this thread's fast waiters wait on (for the sweeper,
   which looks for descriptors closed behind greenify's back). */
int green_fast_waiting_fds(int *fds, int max)
{
    struct fast_hub *fast = this_thread;
    int count = 0;
    for (int fd = 0; fast != NULL && fd < fast->capacity && count < max; fd++)
        if (fast->by_fd[fd] != NULL && fast->by_fd[fd]->waiter != NULL)
            fds[count++] = fd;
    return count;
}

/* The sweep's part (greenify/waiting/gevent_side.py, once a second on the hub),
   for the one case a wait cannot see when it starts: its number closed and
   reused (by another thread, or a library's dup2) while it waits.  Such a
   watcher is registered anew for the file the number names now.  A watcher
   with an event already pending is left alone: that waiter is about to
   wake. */
void green_fast_refresh(void)
{
    struct fast_hub *fast = this_thread;
    for (int fd = 0; fast != NULL && fd < fast->capacity; fd++) {
        struct fast_watch *watch = fast->by_fd[fd];
        struct stat now;
        if (watch == NULL || watch->waiter == NULL || !watch->io.active || watch->io.pending ||
            same_socket(fd, watch, &now))
            continue;
        fast->io_stop(fast->loop, &watch->io);
        watch->io.events |= LIBEV_IOFDSET;
        watch->registered_dev = now.st_dev;
        watch->registered_ino = now.st_ino;
        fast->io_start(fast->loop, &watch->io);
    }
}
