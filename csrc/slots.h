/*
 * Writing GOT slots of loaded objects (greenify/patcher.py drives this).
 *
 * slots_list_objects() reports what dl_iterate_phdr() knows of every loaded
 * object: its path, load base, in-memory PT_LOAD ranges and GNU build-id.
 * slots_write_all() stores pointers into slots: it checks every page in
 * /proc/self/maps first, makes a read-only (RELRO) page writable only for the
 * store, puts back exactly the protection it found, and writes all slots or,
 * on any failure, none.
 */
#ifndef GREENIFY_SLOTS_H
#define GREENIFY_SLOTS_H

#include <stddef.h>
#include <stdint.h>

#define SLOTS_PATH_MAX 4096
#define SLOTS_MAX_SEGMENTS 16
#define SLOTS_MAX_BUILD_ID 64

/* One PT_LOAD as mapped: [start, end) in this process, PF_R/PF_W/PF_X flags. */
struct slots_segment {
    uintptr_t start;
    uintptr_t end;
    uint32_t flags;
};

struct slots_object {
    char path[SLOTS_PATH_MAX]; /* dlpi_name; "" for the main program */
    uintptr_t base;            /* dlpi_addr: add to a file's vaddr to get an address */
    int nsegments;
    struct slots_segment segments[SLOTS_MAX_SEGMENTS];
    int build_id_size; /* 0 when the object has no NT_GNU_BUILD_ID note */
    unsigned char build_id[SLOTS_MAX_BUILD_ID];
};

/* Fills out[0..capacity) and returns how many objects are loaded (call
   again with more room when that is larger than capacity). */
int slots_list_objects(struct slots_object *out, int capacity);

/* One slot to write.  With expected != 0 the store happens only if the slot
   still holds expected (unpatching must not undo someone else's hook). */
struct slots_write {
    uintptr_t slot;
    uintptr_t value;
    uintptr_t expected;
    uintptr_t previous; /* out: what the slot held */
    int written;        /* out: 1 when value was stored */
};

#define SLOTS_OK 0
#define SLOTS_MAPS_UNREADABLE 1
#define SLOTS_NOT_MAPPED 2
#define SLOTS_MISALIGNED 3
#define SLOTS_MPROTECT_FAILED 4

/* Returns SLOTS_OK or an error code, with a message naming the address in
   error[0..error_size). */
int slots_write_all(struct slots_write *writes, int count, char *error, size_t error_size);

#endif
