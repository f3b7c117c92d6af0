/*
 * Delivering an interruption once the C call is back in the Python frame
 * that made it.
 *
 * When an exception (gevent.Timeout, GreenletExit, a waiter's cancellation)
 * is thrown into a greenlet waiting inside a green function, it cannot
 * travel through the C library's frames.  The bridge keeps it, the wait
 * reports GREEN_INTERRUPTED, and the green function fails in a way the
 * library does not retry.  Here, after that wait, we note the greenlet and
 * the Python frame that is executing the C call (the caller), and arm a C
 * trace function on the thread.
 *
 * The rule: the kept exception is raised at the first trace event of that
 * greenlet in the caller's frame (the library's error propagating there, or
 * the next instruction after a call that returned normally), or, should the
 * caller have gone without an event, in a frame that does not descend from
 * it.  Never in a frame that descends from the caller: while the C call
 * unwinds the library may call Python (a codec decoding its error message,
 * a callback, an object's __del__), and an exception raised there is the
 * library's to swallow (psycopg2 clears it and reports "timeout expired").
 * A greenlet with no Python frame at all around the C call (its run is a C
 * function) has nowhere to receive it: its entry is dropped once it ends.
 *
 * One trace function serves every greenlet of the thread with an
 * interruption to deliver; events of other greenlets only pass through to
 * the trace function that was installed before (a debugger, coverage),
 * which is put back once nothing is left to deliver.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <greenlet.h>

#include "green_python.h"

/* The name under which the previous trace function travels in a capsule. */
#define SAVED_TRACE_CAPSULE "greenify.tracefunc"

/* What deliver_trace keeps (its trace object): a tuple of these.
   ARMED: greenlet -> the caller's frame (None: the greenlet had none).
   LENT: frame -> its f_trace_opcodes before we set it (True or False), for
   each frame whose opcode events we turned on and have not put back. */
enum saved_field { SAVED_FUNC, SAVED_OBJ, SAVED_ARMED, SAVED_LENT, SAVED_FIELDS };

static int deliver_trace(PyObject *saved, PyFrameObject *frame, int what, PyObject *arg);

/* greenlet's C API, imported the first time a delivery is armed. */
static int greenlet_imported;

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

/* Per-opcode events on the caller's frame make the exception fire right
   after the C call returns, even mid-line, before the frame calls anything
   else.  Returns what the flag was. */
static int set_trace_opcodes(PyObject *frame, int on)
{
    int before = 0;
    PyObject *value = PyObject_GetAttrString(frame, "f_trace_opcodes");
    if (value != NULL) {
        before = PyObject_IsTrue(value) == 1;
        Py_DECREF(value);
    }
    if (PyObject_SetAttrString(frame, "f_trace_opcodes", on ? Py_True : Py_False) != 0)
        PyErr_Clear();
    PyErr_Clear(); /* GetAttr's */
    return before;
}

static int same_code(PyObject *frame, PyObject *other)
{
    PyCodeObject *code = PyFrame_GetCode((PyFrameObject *)frame);
    PyCodeObject *other_code = PyFrame_GetCode((PyFrameObject *)other);
    int same = code == other_code;
    Py_DECREF(code);
    Py_DECREF(other_code);
    return same;
}

/* Put back f_trace_opcodes on the lent frames that no armed caller shares
   code with.  (CPython 3.13 keeps opcode events per code object: turning
   them off for one frame turns them off for every frame of its code, such
   as the callers of other greenlets interrupted in the same function.) */
static void give_back_opcodes(PyObject *saved)
{
    PyObject *armed = PyTuple_GET_ITEM(saved, SAVED_ARMED);
    PyObject *lent = PyTuple_GET_ITEM(saved, SAVED_LENT);
    PyObject *frame, *before, *glet, *caller;
    PyObject *given = PyList_New(0);
    Py_ssize_t position = 0;
    if (given == NULL) {
        PyErr_Clear();
        return;
    }
    while (PyDict_Next(lent, &position, &frame, &before)) {
        Py_ssize_t armed_position = 0;
        int shared = 0;
        while (!shared && PyDict_Next(armed, &armed_position, &glet, &caller))
            shared = caller != Py_None && same_code(frame, caller);
        if (!shared && PyList_Append(given, frame) != 0)
            PyErr_Clear();
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(given); i++) {
        frame = PyList_GET_ITEM(given, i);
        set_trace_opcodes(frame, PyDict_GetItem(lent, frame) == Py_True);
        if (PyDict_DelItem(lent, frame) != 0)
            PyErr_Clear();
    }
    Py_DECREF(given);
}

/* Whether ancestor is on frame's chain of callers (frame excluded). */
static int descends_from(PyFrameObject *frame, PyObject *ancestor)
{
    PyFrameObject *current = PyFrame_GetBack(frame);
    int found = 0;
    while (current != NULL && !found) {
        found = (PyObject *)current == ancestor;
        PyFrameObject *back = PyFrame_GetBack(current);
        Py_DECREF(current);
        current = back;
    }
    Py_XDECREF(current);
    return found;
}

/* A greenlet that ended with its entry armed (no Python frame around its
   C call, or one that finished with tracing off): nothing to deliver to. */
static int greenlet_ended(PyObject *glet)
{
    return PyGreenlet_STARTED((PyGreenlet *)glet) && !PyGreenlet_ACTIVE((PyGreenlet *)glet);
}

/* Drop the entries of greenlets that ended; their kept exceptions are
   forgotten by the bridge (take_pending_interrupt drops those of dead
   greenlets). */
static void drop_ended(PyObject *saved)
{
    PyObject *armed = PyTuple_GET_ITEM(saved, SAVED_ARMED);
    PyObject *ended = PyList_New(0);
    PyObject *glet, *caller;
    Py_ssize_t position = 0;
    if (ended == NULL) {
        PyErr_Clear();
        return;
    }
    while (PyDict_Next(armed, &position, &glet, &caller))
        if (greenlet_ended(glet) && PyList_Append(ended, glet) != 0)
            PyErr_Clear();
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ended); i++)
        if (PyDict_DelItem(armed, PyList_GET_ITEM(ended, i)) != 0)
            PyErr_Clear();
    if (PyList_GET_SIZE(ended) > 0) {
        PyObject *none = green_python_take_interrupt(); /* None here (this greenlet is not armed): it only drops */
        Py_XDECREF(none);
        give_back_opcodes(saved);
    }
    Py_DECREF(ended);
}

/* Called after a wait reported GREEN_INTERRUPTED, in the interrupted
   greenlet, inside its C call: the caller is the thread's current frame.
   A greenlet armed already (a further call failing fast while the first
   unwinds, maybe from a callback) keeps its first caller. */
void green_arm_delivery(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyThreadState *tstate = PyThreadState_Get();
    PyObject *saved = NULL, *current = NULL;
    PyObject *error_type, *error_value, *error_tb;

    PyErr_Fetch(&error_type, &error_value, &error_tb); /* a library may call with an exception set */
    if (!greenlet_imported) {
        PyGreenlet_Import();
        if (_PyGreenlet_API == NULL)
            goto failed;
        greenlet_imported = 1;
    }
    current = (PyObject *)PyGreenlet_GetCurrent();
    if (current == NULL)
        goto failed;
    if (tstate->c_tracefunc == deliver_trace) {
        saved = tstate->c_traceobj;
        Py_INCREF(saved);
    }
    else {
        PyObject *capsule = tstate->c_tracefunc == NULL
                                ? (Py_INCREF(Py_None), Py_None)
                                : PyCapsule_New((void *)tstate->c_tracefunc, SAVED_TRACE_CAPSULE, NULL);
        PyObject *armed = PyDict_New(), *lent = PyDict_New();
        PyObject *obj = tstate->c_traceobj == NULL ? Py_None : tstate->c_traceobj;
        if (capsule != NULL && armed != NULL && lent != NULL)
            saved = PyTuple_Pack(SAVED_FIELDS, capsule, obj, armed, lent);
        Py_XDECREF(capsule);
        Py_XDECREF(armed);
        Py_XDECREF(lent);
        if (saved == NULL)
            goto failed;
    }
    PyObject *armed = PyTuple_GET_ITEM(saved, SAVED_ARMED);
    PyObject *lent = PyTuple_GET_ITEM(saved, SAVED_LENT);
    if (PyDict_GetItem(armed, current) != NULL)
        goto done; /* armed already (our function is installed): nothing changes */
    PyObject *frame = (PyObject *)PyEval_GetFrame(); /* borrowed */
    if (frame == NULL)
        frame = Py_None;
    if (PyDict_SetItem(armed, current, frame) != 0)
        goto failed;
    if (frame != Py_None && PyDict_GetItem(lent, frame) == NULL) {
        int before = set_trace_opcodes(frame, 1);
        if (PyDict_SetItem(lent, frame, before ? Py_True : Py_False) != 0)
            goto failed;
    }
    /* (also when our function is installed already: CPython 3.12 and 3.13
       turn opcode events on, for the current frame's flag, when a trace
       function is set) */
    PyEval_SetTrace(deliver_trace, saved);
    goto done;
failed:
    PyErr_WriteUnraisable(NULL); /* the call still fails as interrupted; the exception stays kept */
done:
    Py_XDECREF(current);
    Py_XDECREF(saved);
    PyErr_Restore(error_type, error_value, error_tb);
    PyGILState_Release(gil);
}

/* Raise the kept exception of the current greenlet in place of the error
   fetched (the library's error, or one from the previous trace function),
   with the library's error as its __context__.  Returns -1 if an exception
   is now set, 0 otherwise. */
static int raise_kept(int what, PyObject *arg, PyObject *error_type, PyObject *error_value, PyObject *error_tb)
{
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
        Py_DECREF(exc);
        Py_XDECREF(error_type);
        Py_XDECREF(error_value);
        Py_XDECREF(error_tb);
        return -1;
    }
    Py_XDECREF(exc);
    PyErr_Restore(error_type, error_value, error_tb);
    return error_type != NULL ? -1 : 0;
}

static int deliver_trace(PyObject *saved, PyFrameObject *frame, int what, PyObject *arg)
{
    Py_tracefunc previous = saved_func(saved);
    PyObject *previous_obj = saved_obj(saved);
    PyObject *armed = PyTuple_GET_ITEM(saved, SAVED_ARMED);
    PyObject *lent = PyTuple_GET_ITEM(saved, SAVED_LENT);
    PyObject *error_type = NULL, *error_value = NULL, *error_tb = NULL;
    PyObject *current = (PyObject *)PyGreenlet_GetCurrent();
    PyObject *caller = current == NULL ? NULL : PyDict_GetItem(armed, current); /* borrowed */
    int rc = 0;

    if (current == NULL)
        PyErr_Clear();
    Py_INCREF(saved); /* PyEval_SetTrace below drops the thread's reference */
    Py_XINCREF(caller);
    /* Opcode events on a frame we lent them to are ours, unless it had
       asked for them itself. */
    if (previous != NULL && !(what == PyTrace_OPCODE && PyDict_GetItem(lent, (PyObject *)frame) == Py_False))
        rc = previous(previous_obj, frame, what, arg);
    if (rc != 0)
        PyErr_Fetch(&error_type, &error_value, &error_tb); /* the previous function's error, kept aside */
    if (caller == NULL) {
        /* another greenlet: an armed one may have ended with no frame to raise in */
        drop_ended(saved);
        if (PyDict_Size(armed) == 0)
            PyEval_SetTrace(previous, previous_obj);
        PyErr_Restore(error_type, error_value, error_tb);
    }
    else if (caller != Py_None && (caller == (PyObject *)frame || !descends_from(frame, caller))) {
        if (PyDict_DelItem(armed, current) != 0)
            PyErr_Clear();
        give_back_opcodes(saved);
        if (PyDict_Size(armed) == 0)
            PyEval_SetTrace(previous, previous_obj);
        rc = raise_kept(what, arg, error_type, error_value, error_tb);
    }
    else {
        PyErr_Restore(error_type, error_value, error_tb); /* a frame the C call entered on its way out */
    }
    Py_XDECREF(caller);
    Py_XDECREF(current);
    Py_DECREF(saved);
    return rc;
}
