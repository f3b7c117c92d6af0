/*
 * Patching libraries as they load (greenify/patching/onload.py drives this).
 *
 * greenify_dlopen_hook and greenify_dlmopen_hook replace dlopen/dlmopen in
 * the GOT of objects that load libraries (the interpreter, _ctypes, drivers).
 * Each calls glibc's function and then, only when that load added objects
 * (loaded_adds(), in loaded.h, moved) and no other hooked load of this
 * thread is still in progress, enters Python through green_python_loaded()
 * (csrc/wait/green_python.c: takes the GIL, keeps a pending exception) before
 * returning to the caller: the new library is patched before its caller can
 * call it.
 *
 * glibc resolves a bare name ("libpq.so.5") along the caller's
 * RPATH/RUNPATH, which it finds from dlopen's return address; the hook is
 * the one that calls dlopen, so for a bare name it searches the caller's
 * own folders first (dlinfo RTLD_DI_SERINFO) and opens what it finds by
 * path.  A name with a dynamic string token ($ORIGIN, $LIB) is handed to
 * glibc as a tail call, so glibc sees the real caller (not announced).
 *
 * These are not green twins: they never wait and are not in the list of
 * green functions (green.h).
 */
#ifndef GREENIFY_ONLOAD_H
#define GREENIFY_ONLOAD_H

#include <dlfcn.h>

void *greenify_dlopen_hook(const char *file, int mode);
void *greenify_dlmopen_hook(Lmid_t nsid, const char *file, int mode);

/* On while some patch_on_load() registration is active. */
void onload_set_enabled(int enabled);
/* How many hooked loads entered Python, for tests. */
unsigned long long onload_announced(void);

#endif
