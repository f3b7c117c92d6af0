/*
 * Writing GOT slots: check, unprotect, atomic store, reprotect.  See
 * slots.h for the contract.
 */
#include "slots.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- /proc/self/maps --------------------------------------------------- */

struct mapping {
    uintptr_t start;
    uintptr_t end;
    int prot;
};

struct maps {
    struct mapping *mappings;
    size_t count;
};

static void set_error(char *error, size_t error_size, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(error, error_size, format, args);
    va_end(args);
}

/* Read the whole file with plain read(): a consistent snapshot is not
   promised across reads, but nothing else maps or unmaps while we hold the
   one slot lock (greenify/patching/slots.py), except other threads, which only add mappings elsewhere. */
static char *read_maps_text(void)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t size = 0, capacity = 65536;
    char *text = malloc(capacity);
    while (text) {
        if (capacity - size < 4096) {
            char *bigger = realloc(text, capacity * 2);
            if (!bigger) {
                free(text);
                text = NULL;
                break;
            }
            text = bigger;
            capacity *= 2;
        }
        ssize_t got = read(fd, text + size, capacity - size - 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            free(text);
            text = NULL;
            break;
        }
        if (got == 0) {
            text[size] = '\0';
            break;
        }
        size += (size_t)got;
    }
    close(fd);
    return text;
}

static int read_maps(struct maps *maps)
{
    char *text = read_maps_text();
    if (!text)
        return -1;
    size_t lines = 1;
    for (const char *c = text; *c; c++)
        lines += (*c == '\n');
    maps->mappings = calloc(lines, sizeof(struct mapping));
    maps->count = 0;
    if (!maps->mappings) {
        free(text);
        return -1;
    }
    for (char *line = text; *line;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        unsigned long start, end;
        char perms[5];
        if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) == 3) {
            struct mapping *mapping = &maps->mappings[maps->count++];
            mapping->start = start;
            mapping->end = end;
            mapping->prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
                            (perms[2] == 'x' ? PROT_EXEC : 0);
        }
        if (!next)
            break;
        line = next;
    }
    free(text);
    return 0;
}

static const struct mapping *find_mapping(const struct maps *maps, uintptr_t address)
{
    for (size_t i = 0; i < maps->count; i++)
        if (maps->mappings[i].start <= address && address < maps->mappings[i].end)
            return &maps->mappings[i];
    return NULL;
}

/* ---- writing ------------------------------------------------------------ */

/* Store one slot; the page is writable only for the store and gets back the
   protection /proc/self/maps showed (prot). */
static int store_slot(struct slots_write *write, uintptr_t value, uintptr_t expected, int prot,
                      char *error, size_t error_size)
{
    uintptr_t page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    void *page = (void *)(write->slot & ~(page_size - 1));
    int unprotect = !(prot & PROT_WRITE);
    if (unprotect && mprotect(page, page_size, prot | PROT_WRITE) != 0) {
        set_error(error, error_size, "mprotect(%p, %lu, writable) failed for slot %#lx: %s", page,
                  (unsigned long)page_size, (unsigned long)write->slot, strerror(errno));
        return SLOTS_MPROTECT_FAILED;
    }
    uintptr_t *slot = (uintptr_t *)write->slot;
    if (expected) {
        uintptr_t seen = expected;
        write->written = __atomic_compare_exchange_n(slot, &seen, value, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        write->previous = seen;
    } else {
        write->previous = __atomic_exchange_n(slot, value, __ATOMIC_SEQ_CST);
        write->written = 1;
    }
    if (unprotect && mprotect(page, page_size, prot) != 0) {
        /* The store is done; a page left writable is a weaker RELRO, not a
           wrong pointer, so say so and let the caller decide. */
        set_error(error, error_size, "mprotect(%p, %lu) could not restore the protection of slot %#lx: %s",
                  page, (unsigned long)page_size, (unsigned long)write->slot, strerror(errno));
        return SLOTS_MPROTECT_FAILED;
    }
    return SLOTS_OK;
}

/* One object's writes, all or nothing, checked against the maps read. */
static int write_group(const struct maps *maps, struct slots_write *writes, int count, char *error,
                       size_t error_size)
{
    int *prots = calloc(count > 0 ? (size_t)count : 1, sizeof(int));
    int result = prots ? SLOTS_OK : SLOTS_MAPS_UNREADABLE;
    if (!prots)
        set_error(error, error_size, "out of memory");

    /* Check every slot before writing any. */
    for (int i = 0; i < count && result == SLOTS_OK; i++) {
        uintptr_t slot = writes[i].slot;
        writes[i].written = 0;
        writes[i].previous = 0;
        if (slot % sizeof(uintptr_t) != 0) {
            set_error(error, error_size, "slot %#lx is not pointer-aligned", (unsigned long)slot);
            result = SLOTS_MISALIGNED;
            break;
        }
        const struct mapping *mapping = find_mapping(maps, slot);
        if (!mapping || slot + sizeof(uintptr_t) > mapping->end || !(mapping->prot & PROT_READ)) {
            set_error(error, error_size, "slot %#lx is not in a readable mapping of /proc/self/maps",
                      (unsigned long)slot);
            result = SLOTS_NOT_MAPPED;
            break;
        }
        prots[i] = mapping->prot;
    }

    int done = 0;
    for (; done < count && result == SLOTS_OK; done++)
        result = store_slot(&writes[done], writes[done].value, writes[done].expected, prots[done], error,
                            error_size);

    if (result != SLOTS_OK) {
        /* All or nothing: put back what this call stored, newest first. */
        for (int i = done - 1; i >= 0; i--) {
            if (!writes[i].written)
                continue;
            struct slots_write undo = writes[i];
            char ignored[SLOTS_ERROR_MAX];
            if (store_slot(&undo, writes[i].previous, writes[i].value, prots[i], ignored, sizeof(ignored)) ==
                    SLOTS_OK && undo.written)
                writes[i].written = 0;
        }
    }
    free(prots);
    return result;
}

int slots_write_groups(struct slots_write *writes, const int *ends, int groups, int *statuses, char *errors)
{
    struct maps maps;
    if (read_maps(&maps) != 0) {
        for (int g = 0; g < groups; g++) {
            statuses[g] = SLOTS_MAPS_UNREADABLE;
            set_error(errors + (size_t)g * SLOTS_ERROR_MAX, SLOTS_ERROR_MAX, "cannot read /proc/self/maps: %s",
                      strerror(errno));
        }
        return SLOTS_MAPS_UNREADABLE;
    }
    for (int g = 0, start = 0; g < groups; start = ends[g], g++)
        statuses[g] = write_group(&maps, writes + start, ends[g] - start, errors + (size_t)g * SLOTS_ERROR_MAX,
                                  SLOTS_ERROR_MAX);
    free(maps.mappings);
    return SLOTS_OK;
}
