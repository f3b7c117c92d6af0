/*
 * Writing GOT slots of loaded objects (greenify/patching/slots.py drives this, under
 * its one lock).
 *
 * slots_write_groups() stores pointers into slots, one group of slots per
 * object: it checks every page of a group in /proc/self/maps first, makes a
 * read-only (RELRO) page writable only for the store, puts back exactly the
 * protection it found, and writes all the group's slots or, on any failure,
 * none.
 */
#ifndef GREENIFY_SLOTS_H
#define GREENIFY_SLOTS_H

#include <stddef.h>
#include <stdint.h>

/* Room for the message slots_write_groups() leaves for a group that failed. */
#define SLOTS_ERROR_MAX 256

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

/* Group g is writes[ends[g-1] .. ends[g]) (from 0 for the first), written
   all or nothing on its own; statuses[g] gets SLOTS_OK or an error code and
   errors[g * SLOTS_ERROR_MAX ..] a message naming the address.  One read of
   /proc/self/maps serves every group (patch_all() writes into dozens of
   objects; the maps are most of a small write's cost).  Returns
   SLOTS_MAPS_UNREADABLE when nothing could be checked (every group says so),
   else SLOTS_OK. */
int slots_write_groups(struct slots_write *writes, const int *ends, int groups, int *statuses, char *errors);

#endif
