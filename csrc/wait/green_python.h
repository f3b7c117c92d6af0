/*
 * Every entry from C into Python, in one list.  Each one takes the GIL
 * (whether the thread held it or not), saves and clears the thread's
 * pending exception, calls the Python side, and puts the exception, errno
 * and the GIL back exactly as found: green_python_enter()/_leave() below.
 * The Python side of each is in greenify/entries.py, the module named
 * below.  Besides the five cffi callbacks declared here, two places call
 * that module through the CPython API: the trace function that delivers an
 * interruption (csrc/wait/green_deliver.c, take_pending_interrupt) and the wait
 * below Python (csrc/wait/green_fastwait.c, which enters through the same helper
 * and calls record_interruption).
 */
#ifndef GREENIFY_GREEN_PYTHON_H
#define GREENIFY_GREEN_PYTHON_H

#include "green.h"

/* The Python module that holds the Python side of every entry. */
#define GREENIFY_ENTRIES_MODULE "greenify.entries"

struct green_offload_job;

/* Wait until a watch is ready or timeout_s passes (< 0: no deadline):
   GREEN_WOKEN, GREEN_TIMED_OUT, GREEN_CANNOT_WAIT or GREEN_INTERRUPTED. */
int green_python_wait(const struct green_watch *watches, int nwatches, double timeout_s);
/* Whether the calling greenlet was interrupted and is still inside C. */
int green_python_interrupted(void);
/* fd is about to be closed: wake whoever waits on it. */
void green_python_closing(int fd);
/* Hand a resolver job to a worker thread: GREEN_OFFLOAD_SUBMITTED or _NATIVE. */
int green_python_offload(struct green_offload_job *job);
/* A hooked dlopen added objects: patch what matches (csrc/patch/onload.c). */
void green_python_loaded(void);

#ifdef Py_PYTHON_H
#include <errno.h>

/* Entering Python from C, the one way (for the files that include
   Python.h): take the GIL as found, set the pending exception and errno
   aside; leaving puts all three back. */
/* What green_python_leave() puts back. */
struct green_python_entry {
    PyGILState_STATE gil;
    int saved_errno;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending;
#else
    PyObject *pending_type, *pending_value, *pending_traceback;
#endif
};

static inline void green_python_enter(struct green_python_entry *entry)
{
    entry->saved_errno = errno;
    entry->gil = PyGILState_Ensure();
#if PY_VERSION_HEX >= 0x030C0000
    entry->pending = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&entry->pending_type, &entry->pending_value, &entry->pending_traceback);
#endif
}

static inline void green_python_leave(struct green_python_entry *entry)
{
    /* cffi's onerror handlers catch everything the Python side raises; an
       error still set here would be lost anyway: report it, keep ours. */
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(NULL);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(entry->pending);
#else
    PyErr_Restore(entry->pending_type, entry->pending_value, entry->pending_traceback);
#endif
    PyGILState_Release(entry->gil);
    errno = entry->saved_errno;
}

/* The exception kept for the calling greenlet after an interrupted wait
   (a new reference; None if there is none), for the trace function that
   delivers it (csrc/wait/green_deliver.c); NULL, reported, if the call failed. */
PyObject *green_python_take_interrupt(void);
#endif

/* After a wait reported GREEN_INTERRUPTED, in the interrupted greenlet:
   raise the kept exception once the Python frame that made the C call runs
   again, never in Python the C call runs on its way out
   (csrc/wait/green_deliver.c). */
void green_arm_delivery(void);

#endif
