/*
 * The run-time state of the green functions and their one road into Python:
 * green_wait() hands the hub a list of descriptors and a deadline.
 *
 * When an exception (gevent.Timeout, GreenletExit) is thrown into a waiting
 * greenlet it cannot travel through the C library's frames.  The Python side
 * keeps it, the wait reports GREEN_INTERRUPTED, and the green function fails
 * in a way the library does not retry.  Here we arm a one-shot trace function
 * on the thread: at the first Python event after the C call unwinds (the
 * library's own error propagating, or the next line), it raises the stored
 * exception in place of that error, with the error as its __context__.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/time.h>

#include "green.h"

struct green_state green_state = {0, 0, 0, 0};

/* Defined by cffi from greenify/_bridge.py (extern "Python+C"). */
extern int greenify_wait(const struct green_watch *watches, int nwatches, double timeout_s);
extern int greenify_interrupted(void);
extern void greenify_closing(int fd);

void green_set_active(int active) { green_state.active = active; }
int green_is_active(void) { return green_state.active; }
void green_set_finalizing(void) { green_state.finalizing = 1; }
void green_set_interrupts_pending(int count) { green_state.interrupts_pending = count; }
void green_set_waiters_registered(int count) { green_state.waiters_registered = count; }

/* ---- wait statistics (greenify.stats()): counted on the wait path only ---- */

struct green_stat {
    unsigned long long calls;
    unsigned long long wait_ns;
};
static struct green_stat green_stats[GREEN_FUNCTION_COUNT];
#define GREEN_FUNCTION_NAME(name) #name,
static const char *const green_function_names[] = {GREEN_FUNCTIONS(GREEN_FUNCTION_NAME)};

int green_stats_count(void) { return GREEN_FUNCTION_COUNT; }

const char *green_stats_name(int function)
{
    return function >= 0 && function < GREEN_FUNCTION_COUNT ? green_function_names[function] : "";
}

void green_stats_read(int function, unsigned long long *calls, unsigned long long *wait_ns)
{
    *calls = *wait_ns = 0;
    if (function >= 0 && function < GREEN_FUNCTION_COUNT) {
        *calls = __atomic_load_n(&green_stats[function].calls, __ATOMIC_RELAXED);
        *wait_ns = __atomic_load_n(&green_stats[function].wait_ns, __ATOMIC_RELAXED);
    }
}

void green_stats_reset(void)
{
    for (int i = 0; i < GREEN_FUNCTION_COUNT; i++) {
        __atomic_store_n(&green_stats[i].calls, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&green_stats[i].wait_ns, 0, __ATOMIC_RELAXED);
    }
}

static void count_wait(struct green_call *call, int64_t started_ns)
{
    struct green_stat *stat = &green_stats[call->function];
    if (!call->waited) {
        call->waited = 1;
        __atomic_add_fetch(&stat->calls, 1, __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(&stat->wait_ns, (unsigned long long)(green_now_ns() - started_ns), __ATOMIC_RELAXED);
}

int64_t green_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

int64_t green_deadline_after_ms(int timeout_ms)
{
    if (timeout_ms < 0)
        return GREEN_NO_DEADLINE;
    return green_now_ns() + (int64_t)timeout_ms * 1000000;
}

int64_t green_deadline_after_timespec(const struct timespec *timeout)
{
    if (timeout == NULL)
        return GREEN_NO_DEADLINE;
    if (timeout->tv_sec > INT64_MAX / 1000000000 - 1)
        return GREEN_NO_DEADLINE;
    return green_now_ns() + (int64_t)timeout->tv_sec * 1000000000 + timeout->tv_nsec;
}

const struct timespec *green_time_left(int64_t deadline_ns, struct timespec *left)
{
    int64_t ns;
    if (deadline_ns == GREEN_NO_DEADLINE)
        return NULL;
    ns = deadline_ns - green_now_ns();
    if (ns < 0)
        ns = 0;
    left->tv_sec = ns / 1000000000;
    left->tv_nsec = ns % 1000000000;
    return left;
}

int green_ms_left(int64_t deadline_ns)
{
    int64_t ns;
    if (deadline_ns == GREEN_NO_DEADLINE)
        return -1;
    ns = deadline_ns - green_now_ns();
    if (ns <= 0)
        return 0;
    if (ns / 1000000 >= INT_MAX)
        return INT_MAX;
    return (int)((ns + 999999) / 1000000);
}

/* ---- delivering an interruption once the C call is back in Python ---- */

static int deliver_trace(PyObject *saved, PyFrameObject *frame, int what, PyObject *arg);

/* The trace function that was installed before ours, kept in our trace
   object so that each thread restores its own. */
static Py_tracefunc saved_func(PyObject *saved)
{
    PyObject *capsule = PyTuple_GET_ITEM(saved, 0);
    return capsule == Py_None ? NULL : (Py_tracefunc)PyCapsule_GetPointer(capsule, "greenify.tracefunc");
}

static PyObject *saved_obj(PyObject *saved)
{
    PyObject *obj = PyTuple_GET_ITEM(saved, 1);
    return obj == Py_None ? NULL : obj;
}

/* Greenify's own callbacks run Python code while a delivery may be armed
   (another greenlet may be inside one, too): the exception must not fire in
   them.  They are the frames of greenify._bridge and what they call. */
static int inside_bridge(PyFrameObject *frame)
{
    PyFrameObject *current = frame;
    int found = 0;
    Py_XINCREF(current);
    for (int depth = 0; current != NULL && depth < 32 && !found; depth++) {
        PyObject *globals = PyFrame_GetGlobals(current);
        PyObject *name = globals ? PyDict_GetItemString(globals, "__name__") : NULL;
        found = name != NULL && PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "greenify._bridge") == 0;
        Py_XDECREF(globals);
        PyFrameObject *back = PyFrame_GetBack(current);
        Py_DECREF(current);
        current = back;
    }
    Py_XDECREF(current);
    return found;
}

/* The Python frame that called into C; per-opcode events on it make the
   exception fire right after the call returns, even mid-line. */
static void trace_opcodes_of(PyObject *frame, int on)
{
    if (frame != Py_None && PyObject_SetAttrString(frame, "f_trace_opcodes", on ? Py_True : Py_False) != 0)
        PyErr_Clear();
}

/* Called with the GIL after a wait reported GREEN_INTERRUPTED: from here on
   no Python line of the callback runs, so the exception fires outside it. */
static void arm_delivery(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyThreadState *tstate = PyThreadState_Get();
    if (tstate->c_tracefunc != deliver_trace) {
        PyObject *capsule = tstate->c_tracefunc == NULL
                                ? (Py_INCREF(Py_None), Py_None)
                                : PyCapsule_New((void *)tstate->c_tracefunc, "greenify.tracefunc", NULL);
        PyObject *obj = tstate->c_traceobj == NULL ? Py_None : tstate->c_traceobj;
        PyObject *frame = (PyObject *)PyEval_GetFrame();
        PyObject *saved = capsule == NULL ? NULL : PyTuple_Pack(3, capsule, obj, frame ? frame : Py_None);
        Py_XDECREF(capsule);
        if (saved != NULL)
            trace_opcodes_of(PyTuple_GET_ITEM(saved, 2), 1);
        if (saved != NULL) {
            PyEval_SetTrace(deliver_trace, saved);
            Py_DECREF(saved);
        }
        else {
            PyErr_WriteUnraisable(NULL);
        }
    }
    PyGILState_Release(gil);
}

/* Asks greenify._bridge for the exception kept for the current greenlet. */
static PyObject *take_pending(void)
{
    PyObject *bridge = PyImport_ImportModule("greenify._bridge");
    if (bridge == NULL)
        return NULL;
    PyObject *exc = PyObject_CallMethod(bridge, "take_pending_interrupt", NULL);
    Py_DECREF(bridge);
    return exc;
}

static int deliver_trace(PyObject *saved, PyFrameObject *frame, int what, PyObject *arg)
{
    Py_tracefunc previous = saved_func(saved);
    PyObject *previous_obj = saved_obj(saved);
    int rc = 0;

    Py_INCREF(saved); /* PyEval_SetTrace below drops the thread's reference */
    if (previous != NULL && what != PyTrace_OPCODE) /* it did not ask for opcodes */
        rc = previous(previous_obj, frame, what, arg);
    if ((what == PyTrace_CALL || what == PyTrace_EXCEPTION || what == PyTrace_LINE ||
                              what == PyTrace_RETURN || what == PyTrace_OPCODE) && !inside_bridge(frame)) {
        PyObject *error_type = NULL, *error_value = NULL, *error_tb = NULL;
        if (rc != 0)
            PyErr_Fetch(&error_type, &error_value, &error_tb);
        PyEval_SetTrace(previous, previous_obj);
        trace_opcodes_of(PyTuple_GET_ITEM(saved, 2), 0);
        PyObject *exc = take_pending();
        if (exc == NULL) {
            PyErr_WriteUnraisable(NULL);
        }
        else if (exc != Py_None && PyExceptionInstance_Check(exc)) {
            PyObject *context = NULL;
            if (what == PyTrace_EXCEPTION && PyTuple_Check(arg) && PyTuple_GET_SIZE(arg) >= 2)
                context = PyTuple_GET_ITEM(arg, 1);
            PyException_SetTraceback(exc, Py_None);
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            if (context != NULL && context != exc && context != Py_None) {
                Py_INCREF(context);
                PyException_SetContext(exc, context);
            }
            Py_CLEAR(error_type);
            Py_CLEAR(error_value);
            Py_CLEAR(error_tb);
            rc = -1;
        }
        Py_XDECREF(exc);
        if (error_type != NULL || error_value != NULL)
            PyErr_Restore(error_type, error_value, error_tb);
    }
    Py_DECREF(saved);
    return rc;
}

/* ---- waiting ---- */

int green_wait(struct green_call *call, const struct green_watch *watches, int nwatches, int64_t deadline_ns)
{
    double timeout_s = -1.0;
    int saved_errno = errno;
    int64_t started_ns;
    int result;

    if (!green_state.active || green_state.finalizing)
        return GREEN_CANNOT_WAIT;
    started_ns = green_now_ns();
    if (deadline_ns != GREEN_NO_DEADLINE) {
        int64_t left = deadline_ns - started_ns;
        if (left <= 0)
            return GREEN_TIMED_OUT;
        timeout_s = (double)left / 1e9;
    }
    __atomic_add_fetch(&green_state.waiting, 1, __ATOMIC_RELAXED);
    /* While any greenlet has a waiter of its own (greenify.asyncio, a temporary
       hook until the Waiter bridge lands), the bridge chooses every wait. */
    result = nwatches == 1 && deadline_ns == GREEN_NO_DEADLINE && !green_state.waiters_registered
                 ? green_fast_wait(watches)
                 : GREEN_FAST_UNAVAILABLE;
    if (result == GREEN_FAST_UNAVAILABLE)
        result = greenify_wait(watches, nwatches, timeout_s);
    __atomic_sub_fetch(&green_state.waiting, 1, __ATOMIC_RELAXED);
    if (result != GREEN_CANNOT_WAIT)
        count_wait(call, started_ns);
    if (result == GREEN_INTERRUPTED)
        arm_delivery();
    else if (result == GREEN_TIMED_OUT && deadline_ns != GREEN_NO_DEADLINE && green_now_ns() < deadline_ns)
        result = GREEN_WOKEN; /* the loop's clock ran ahead of ours: probe and wait the rest */
    errno = saved_errno;
    return result;
}

int green_must_fail_fast(void)
{
    int saved_errno = errno;
    int interrupted = 0;
    if (!green_state.finalizing)
        interrupted = greenify_interrupted();
    errno = saved_errno;
    return interrupted;
}

void green_wake_waiters_on(int fd)
{
    int saved_errno = errno;
    if (green_state.active && !green_state.finalizing && __atomic_load_n(&green_state.waiting, __ATOMIC_RELAXED)) {
        green_fast_closing(fd);
        greenify_closing(fd);
    }
    errno = saved_errno;
}

/* SO_RCVTIMEO/SO_SNDTIMEO of a socket, as a deadline from now; none for
   other files or a zero timeout. */
int64_t green_socket_timeout_deadline(int fd, int events)
{
    struct timeval timeout;
    socklen_t size = sizeof timeout;
    int option = (events & GREEN_WRITE) ? SO_SNDTIMEO : SO_RCVTIMEO;
    if (getsockopt(fd, SOL_SOCKET, option, &timeout, &size) != 0)
        return GREEN_NO_DEADLINE;
    if (timeout.tv_sec == 0 && timeout.tv_usec == 0)
        return GREEN_NO_DEADLINE;
    return green_now_ns() + (int64_t)timeout.tv_sec * 1000000000 + (int64_t)timeout.tv_usec * 1000;
}

int green_wait_io(int fd, int events, struct green_io_wait *io_wait)
{
    struct green_watch watch = {fd, events};
    int saved_errno = errno;
    if (!io_wait->looked_up) {
        int flags = fcntl(fd, F_GETFL);
        errno = saved_errno;
        if (flags >= 0 && (flags & O_NONBLOCK))
            return GREEN_NONBLOCKING;
        io_wait->looked_up = 1;
        io_wait->deadline_ns = green_socket_timeout_deadline(fd, events);
        errno = saved_errno;
    }
    return green_wait(&io_wait->call, &watch, 1, io_wait->deadline_ns);
}
