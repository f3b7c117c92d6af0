/*
 * Every entry from C into Python goes through green_python_enter() and
 * green_python_leave() (csrc/wait/green_python.h), the one place that knows what
 * entering Python must leave as found.
 *
 * A library may call a green function while a Python exception is pending
 * (psycopg2 sets one, releases the GIL and drains the connection with
 * PQgetResult, whose poll is a twin), and with the GIL held or not.  The
 * callbacks cffi defines take the GIL but run Python with whatever error
 * indicator the thread has: a pending exception would be lost (or turn the
 * callback's first call into a SystemError).  So each entry takes the GIL,
 * moves the pending exception aside, calls Python, and puts it back, the
 * same objects (type, value, traceback), then gives the GIL back as found;
 * errno is kept too.  The rest of what a caller can observe (the exception
 * being handled, the recursion depth) is balanced by Python itself.
 *
 * The Python side of each entry is a function in greenify/entries.py
 * (extern "Python+C" in csrc/wait/green_python.cdef, defined by cffi).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>

#include "green_offload.h"
#include "green_python.h"

/* Defined by cffi from greenify/entries.py; called only from here. */
extern int greenify_wait(const struct green_watch *watches, int nwatches, double timeout_s);
extern int greenify_interrupted(void);
extern void greenify_closing(int fd);
extern int greenify_offload(struct green_offload_job *job);
extern void greenify_loaded(void);

int green_python_wait(const struct green_watch *watches, int nwatches, double timeout_s)
{
    struct green_python_entry entry;
    int result;
    green_python_enter(&entry);
    result = greenify_wait(watches, nwatches, timeout_s);
    green_python_leave(&entry);
    return result;
}

int green_python_interrupted(void)
{
    struct green_python_entry entry;
    int interrupted;
    green_python_enter(&entry);
    interrupted = greenify_interrupted();
    green_python_leave(&entry);
    return interrupted;
}

void green_python_closing(int fd)
{
    struct green_python_entry entry;
    green_python_enter(&entry);
    greenify_closing(fd);
    green_python_leave(&entry);
}

int green_python_offload(struct green_offload_job *job)
{
    struct green_python_entry entry;
    int outcome;
    green_python_enter(&entry);
    outcome = greenify_offload(job);
    green_python_leave(&entry);
    return outcome;
}

void green_python_loaded(void)
{
    struct green_python_entry entry;
    green_python_enter(&entry);
    greenify_loaded();
    green_python_leave(&entry);
}

PyObject *green_python_take_interrupt(void)
{
    struct green_python_entry entry;
    PyObject *entries, *exc = NULL;
    green_python_enter(&entry);
    entries = PyImport_ImportModule(GREENIFY_ENTRIES_MODULE);
    if (entries != NULL) {
        exc = PyObject_CallMethod(entries, "take_pending_interrupt", NULL);
        Py_DECREF(entries);
    }
    green_python_leave(&entry); /* reports a failure */
    return exc;
}
