/*
 * The objects loaded in this process, as dl_iterate_phdr() reports them.
 * See loaded.h for the contract.
 */
#include "loaded.h"

#include <elf.h>
#include <link.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

struct list_state {
    struct loaded_object *out;
    int capacity;
    int count;
};

static size_t align4(size_t size) { return (size + 3) & ~(size_t)3; }

/* Whether [vaddr, vaddr+size) of the object is inside one of its PT_LOADs,
   i.e. mapped: a PT_NOTE outside them must not be read from memory. */
static int is_loaded(const struct dl_phdr_info *info, ElfW(Addr) vaddr, ElfW(Xword) size)
{
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *phdr = &info->dlpi_phdr[i];
        if (phdr->p_type == PT_LOAD && phdr->p_vaddr <= vaddr && vaddr + size <= phdr->p_vaddr + phdr->p_filesz)
            return 1;
    }
    return 0;
}

/* The NT_GNU_BUILD_ID of an object, read from its mapped PT_NOTE segments. */
static void read_build_id(const struct dl_phdr_info *info, struct loaded_object *object)
{
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *phdr = &info->dlpi_phdr[i];
        if (phdr->p_type != PT_NOTE || !is_loaded(info, phdr->p_vaddr, phdr->p_memsz))
            continue;
        const unsigned char *at = (const unsigned char *)(info->dlpi_addr + phdr->p_vaddr);
        const unsigned char *stop = at + phdr->p_memsz;
        while (at + sizeof(ElfW(Nhdr)) <= stop) {
            const ElfW(Nhdr) *note = (const ElfW(Nhdr) *)at;
            const unsigned char *name = at + sizeof(ElfW(Nhdr));
            const unsigned char *desc = name + align4(note->n_namesz);
            if (desc + note->n_descsz > stop)
                break;
            if (note->n_type == NT_GNU_BUILD_ID && note->n_namesz == 4 && memcmp(name, "GNU", 4) == 0 &&
                note->n_descsz <= LOADED_MAX_BUILD_ID) {
                memcpy(object->build_id, desc, note->n_descsz);
                object->build_id_size = (int)note->n_descsz;
                return;
            }
            at = desc + align4(note->n_descsz);
        }
    }
}

static int list_one(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;  /* dl_iterate_phdr's callback type; every field read here is in glibc's oldest struct */
    struct list_state *state = data;
    if (state->count < state->capacity) {
        struct loaded_object *object = &state->out[state->count];
        memset(object, 0, sizeof(*object));
        if (info->dlpi_name)
            snprintf(object->path, sizeof(object->path), "%s", info->dlpi_name);
        object->base = (uintptr_t)info->dlpi_addr;
        for (int i = 0; i < info->dlpi_phnum && object->nsegments < LOADED_MAX_SEGMENTS; i++) {
            const ElfW(Phdr) *phdr = &info->dlpi_phdr[i];
            if (phdr->p_type != PT_LOAD)
                continue;
            struct loaded_segment *segment = &object->segments[object->nsegments++];
            segment->start = object->base + phdr->p_vaddr;
            segment->end = segment->start + phdr->p_memsz;
            segment->flags = phdr->p_flags;
        }
        read_build_id(info, object);
    }
    state->count++;
    return 0;
}

int loaded_list_objects(struct loaded_object *out, int capacity)
{
    struct list_state state = {out, out ? capacity : 0, 0};
    dl_iterate_phdr(list_one, &state);
    return state.count;
}

struct load_counters {
    unsigned long long adds;
    unsigned long long subs;
};

static int read_counters(struct dl_phdr_info *info, size_t size, void *data)
{
    struct load_counters *counters = data;
    if (size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof(info->dlpi_subs)) {
        counters->adds = info->dlpi_adds;
        counters->subs = info->dlpi_subs;
    }
    return 1; /* the counters are the same in every entry: one is enough */
}

static struct load_counters load_counters(void)
{
    struct load_counters counters = {0, 0};
    dl_iterate_phdr(read_counters, &counters);
    return counters;
}

unsigned long long loaded_adds(void) { return load_counters().adds; }
unsigned long long loaded_subs(void) { return load_counters().subs; }
