/*
 * The dlopen/dlmopen hooks behind greenify.patch_on_load().  See onload.h.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <link.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "green_python.h"
#include "loaded.h"
#include "onload.h"

static int onload_enabled;
static unsigned long long onload_announced_count;
/* Hooked loads of this thread that have not returned yet: a library's
   constructor that dlopens announces nothing; the outer load will. */
static __thread int loads_in_progress;
/* This thread is inside greenify_loaded(): loads it causes (an import of
   a module) are announced by its own loop, not recursively. */
static __thread int in_python;

void onload_set_enabled(int enabled) { __atomic_store_n(&onload_enabled, enabled, __ATOMIC_SEQ_CST); }
unsigned long long onload_announced(void) { return __atomic_load_n(&onload_announced_count, __ATOMIC_RELAXED); }

static int python_usable(void)
{
    if (!Py_IsInitialized())
        return 0;
#if PY_VERSION_HEX >= 0x030D0000
    return !Py_IsFinalizing();
#else
    return !_Py_IsFinalizing();
#endif
}

/* After a hooked load returned: enter Python if it added objects. */
static void announce(unsigned long long adds_before, void *handle)
{
    if (!handle || loads_in_progress || in_python || !__atomic_load_n(&onload_enabled, __ATOMIC_SEQ_CST))
        return;
    if (loaded_adds() == adds_before || !python_usable())
        return;
    int saved_errno = errno;
    in_python = 1;
    green_python_loaded();
    in_python = 0;
    dlerror(); /* whatever the patcher's look-ups left: a successful dlopen leaves no error */
    errno = saved_errno;
    __atomic_add_fetch(&onload_announced_count, 1, __ATOMIC_RELAXED);
}

static void *real_open(int use_nsid, Lmid_t nsid, const char *file, int mode)
{
    return use_nsid ? dlmopen(nsid, file, mode) : dlopen(file, mode);
}

/* The folders glibc searches for a bare name dlopened by the object that
   holds `address`, in order (dlinfo RTLD_DI_SERINFO); NULL if unknown. */
static Dl_serinfo *search_path_of(const void *address)
{
    Dl_info where;
    struct link_map *map = NULL;
    if (!dladdr1(address, &where, (void **)&map, RTLD_DL_LINKMAP) || !map)
        return NULL;
    Dl_serinfo sizes;
    if (dlinfo(map, RTLD_DI_SERINFOSIZE, &sizes) != 0)
        return NULL;
    Dl_serinfo *search = malloc(sizes.dls_size);
    if (!search)
        return NULL;
    search->dls_size = sizes.dls_size;
    search->dls_cnt = sizes.dls_cnt;
    if (dlinfo(map, RTLD_DI_SERINFO, search) != 0) {
        free(search);
        return NULL;
    }
    return search;
}

/* A bare name, searched as glibc would for the caller and opened by path,
   in the caller's folders that greenify's own module would not search the
   same way (its RPATH chain, LD_LIBRARY_PATH, RUNPATH).  The folders both
   end with (the system ones) are left to glibc, since the ld.so cache comes
   before them.  NULL when none of those folders has the file. */
static void *open_along_caller_path(int use_nsid, Lmid_t nsid, const char *file, int mode, const void *caller)
{
    Dl_serinfo *theirs = search_path_of(caller);
    Dl_serinfo *ours = search_path_of((const void *)greenify_dlopen_hook);
    void *handle = NULL;
    if (theirs && ours) {
        unsigned int common = 0; /* length of the common tail */
        while (common < theirs->dls_cnt && common < ours->dls_cnt &&
               strcmp(theirs->dls_serpath[theirs->dls_cnt - 1 - common].dls_name,
                      ours->dls_serpath[ours->dls_cnt - 1 - common].dls_name) == 0)
            common++;
        char path[PATH_MAX];
        for (unsigned int i = 0; i + common < theirs->dls_cnt && !handle; i++) {
            int length = snprintf(path, sizeof(path), "%s/%s", theirs->dls_serpath[i].dls_name, file);
            if (length <= 0 || (size_t)length >= sizeof(path) || access(path, F_OK) != 0)
                continue;
            handle = real_open(use_nsid, nsid, path, mode); /* a file of another class: glibc goes on too */
        }
    }
    free(theirs);
    free(ours);
    return handle;
}

static void *hooked_open(int use_nsid, Lmid_t nsid, const char *file, int mode, const void *caller)
{
    unsigned long long adds_before = loaded_adds();
    void *handle = NULL;
    loads_in_progress++;
    if (file && !strchr(file, '/')) {
        /* Already loaded under that name: glibc returns it whatever the path. */
        handle = real_open(use_nsid, nsid, file, mode | RTLD_NOLOAD);
        if (!handle)
            handle = open_along_caller_path(use_nsid, nsid, file, mode, caller);
        if (!handle)
            dlerror(); /* the caller sees only the last attempt's error */
    }
    if (!handle)
        handle = real_open(use_nsid, nsid, file, mode);
    loads_in_progress--;
    announce(adds_before, handle);
    return handle;
}

void *greenify_dlopen_hook(const char *file, int mode)
{
    if (file && strchr(file, '$'))
        return dlopen(file, mode); /* a sibling call: glibc expands $ORIGIN for the real caller */
    return hooked_open(0, 0, file, mode, __builtin_return_address(0));
}

void *greenify_dlmopen_hook(Lmid_t nsid, const char *file, int mode)
{
    if (file && strchr(file, '$'))
        return dlmopen(nsid, file, mode);
    return hooked_open(1, nsid, file, mode, __builtin_return_address(0));
}
