/*
 * Delivering an interruption once the C call is back in Python.
 *
 * When an exception (gevent.Timeout, GreenletExit, a waiter's cancellation)
 * is thrown into a waiting greenlet it cannot travel through the C library's
 * frames.  The bridge keeps it, the wait reports GREEN_INTERRUPTED, and the
 * green function fails in a way the library does not retry.  Here we arm a
 * one-shot trace function on the thread: at the first Python event after
 * the C call unwinds (the library's own error propagating, or the next
 * line), it raises the kept exception in place of that error, with the error
 * as its __context__.  Events in Python code the C call itself calls on its
 * way out (a codec, a callback) are not that moment: the caller's frame is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

#include "green_python.h"

/* The name under which the previous trace function travels in a capsule. */
#define SAVED_TRACE_CAPSULE "greenify.tracefunc"

/* What deliver_trace keeps (its trace object): a tuple of these. */
enum saved_field { SAVED_FUNC, SAVED_OBJ, SAVED_FRAME, SAVED_FIELDS };

static int deliver_trace(PyObject *saved, PyFrameObject *frame, int what, PyObject *arg);

/* The trace function that was installed before ours, kept in our trace
   object so that each thread restores its own. */
static Py_tracefunc saved_func(PyObject *saved)
{
    PyObject *capsule = PyTuple_GET_ITEM(saved, SAVED_FUNC);
    return capsule == Py_None ? NULL : (Py_tracefunc)PyCapsule_GetPointer(capsule, SAVED_TRACE_CAPSULE);
}

static PyObject *saved_obj(PyObject *saved)
{
    PyObject *obj = PyTuple_GET_ITEM(saved, SAVED_OBJ);
    return obj == Py_None ? NULL : obj;
}

static PyObject *frame_globals(PyFrameObject *frame) /* a new reference */
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetGlobals(frame);
#else
    Py_XINCREF(frame->f_globals);
    return frame->f_globals;
#endif
}

/* Greenify's own entries run Python code while a delivery may be armed (the
   interrupted greenlet closing a descriptor, another greenlet inside a
   wait): the exception must not fire in them.  They are the frames below a
   function of GREENIFY_ENTRIES_MODULE, anywhere up the stack. */
static int inside_entry(PyFrameObject *frame)
{
    PyFrameObject *current = frame;
    int found = 0;
    Py_XINCREF(current);
    while (current != NULL && !found) {
        PyObject *globals = frame_globals(current);
        PyObject *name = globals ? PyDict_GetItemString(globals, "__name__") : NULL;
        found = name != NULL && PyUnicode_Check(name) &&
                PyUnicode_CompareWithASCIIString(name, GREENIFY_ENTRIES_MODULE) == 0;
        Py_XDECREF(globals);
        PyFrameObject *back = PyFrame_GetBack(current);
        Py_DECREF(current);
        current = back;
    }
    Py_XDECREF(current);
    return found;
}

/* Whether `frame` runs below `caller` (the frame that called into C): a
   codec or callback the C code calls on its way out (pyodbc decodes the
   driver's message with encodings.utf_16_le), where the library would take
   the exception for its own failure and swallow it. */
static int called_from(PyFrameObject *frame, PyObject *caller)
{
    if (caller == Py_None || (PyObject *)frame == caller)
        return 0;
    PyFrameObject *current = PyFrame_GetBack(frame);
    int found = 0;
    while (current != NULL && !found) {
        found = (PyObject *)current == caller;
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

/* Called after a wait reported GREEN_INTERRUPTED: from here on no Python
   line of the entry runs, so the exception fires outside it. */
void green_arm_delivery(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyThreadState *tstate = PyThreadState_Get();
    if (tstate->c_tracefunc != deliver_trace) {
        PyObject *capsule = tstate->c_tracefunc == NULL
                                ? (Py_INCREF(Py_None), Py_None)
                                : PyCapsule_New((void *)tstate->c_tracefunc, SAVED_TRACE_CAPSULE, NULL);
        PyObject *obj = tstate->c_traceobj == NULL ? Py_None : tstate->c_traceobj;
        PyObject *frame = (PyObject *)PyEval_GetFrame();
        PyObject *saved = capsule == NULL ? NULL : PyTuple_Pack(SAVED_FIELDS, capsule, obj, frame ? frame : Py_None);
        Py_XDECREF(capsule);
        if (saved != NULL) {
            trace_opcodes_of(PyTuple_GET_ITEM(saved, SAVED_FRAME), 1);
            PyEval_SetTrace(deliver_trace, saved);
            Py_DECREF(saved);
        }
        else {
            PyErr_WriteUnraisable(NULL);
        }
    }
    PyGILState_Release(gil);
}

static int deliver_trace(PyObject *saved, PyFrameObject *frame, int what, PyObject *arg)
{
    Py_tracefunc previous = saved_func(saved);
    PyObject *previous_obj = saved_obj(saved);
    int rc = 0;

    Py_INCREF(saved); /* PyEval_SetTrace below drops the thread's reference */
    if (previous != NULL && what != PyTrace_OPCODE) /* it did not ask for opcodes */
        rc = previous(previous_obj, frame, what, arg);
    if ((what == PyTrace_CALL || what == PyTrace_EXCEPTION || what == PyTrace_LINE || what == PyTrace_RETURN ||
         what == PyTrace_OPCODE) &&
        !inside_entry(frame) && !called_from(frame, PyTuple_GET_ITEM(saved, SAVED_FRAME))) {
        PyObject *error_type = NULL, *error_value = NULL, *error_tb = NULL;
        if (rc != 0)
            PyErr_Fetch(&error_type, &error_value, &error_tb);
        PyEval_SetTrace(previous, previous_obj);
        trace_opcodes_of(PyTuple_GET_ITEM(saved, SAVED_FRAME), 0);
        PyObject *exc = green_python_take_interrupt();
        if (exc != NULL && exc != Py_None && PyExceptionInstance_Check(exc)) {
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
