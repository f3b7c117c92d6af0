/*
 * The objects loaded in this process (greenify/patching/loaded.py drives this).
 *
 * loaded_list_objects() reports what dl_iterate_phdr() knows of every loaded
 * object: its path, load base, in-memory PT_LOAD ranges and GNU build-id.
 * loaded_adds()/loaded_subs() are the loader's counters of objects ever
 * added and removed: when one moved, the list changed.
 */
#ifndef GREENIFY_LOADED_H
#define GREENIFY_LOADED_H

#include <limits.h>
#include <stdint.h>

#define LOADED_PATH_MAX PATH_MAX
#define LOADED_MAX_SEGMENTS 16 /* PT_LOADs kept per object; linkers emit 2 to 5 */
#define LOADED_MAX_BUILD_ID 64 /* bytes; GNU ld's sha1 is 20, md5 16, uuid 16 */

/* One PT_LOAD as mapped: [start, end) in this process, PF_R/PF_W/PF_X flags. */
struct loaded_segment {
    uintptr_t start;
    uintptr_t end;
    uint32_t flags;
};

struct loaded_object {
    char path[LOADED_PATH_MAX]; /* dlpi_name; "" for the main program */
    uintptr_t base;             /* dlpi_addr: add to a file's vaddr to get an address */
    int nsegments;
    struct loaded_segment segments[LOADED_MAX_SEGMENTS];
    int build_id_size; /* 0 when the object has no NT_GNU_BUILD_ID note */
    unsigned char build_id[LOADED_MAX_BUILD_ID];
};

/* Fills out[0..capacity) and returns how many objects are loaded (call
   again with more room when that is larger than capacity; out may be NULL
   to count them). */
int loaded_list_objects(struct loaded_object *out, int capacity);

/* dl_iterate_phdr's counters: objects ever added, ever removed. */
unsigned long long loaded_adds(void);
unsigned long long loaded_subs(void);

#endif
