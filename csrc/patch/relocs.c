/*
 * Finding the relocations of wanted symbols; see relocs.h.  Every read is
 * checked against the file's size and the tables' bounds before it is made,
 * and fields are copied out with memcpy: the bytes are a file's, in no
 * promised alignment.
 */
#include "relocs.h"

#include <stdlib.h>
#include <string.h>

/* An Elf_Addr/Elf_Word (8 bytes in ELFCLASS64, 4 in ELFCLASS32) at ``at``;
   a 4-byte Sword sign-extended when ``is_signed``. */
static uint64_t word(const unsigned char *at, int is64, int is_signed)
{
    if (is64) {
        uint64_t value;
        memcpy(&value, at, sizeof value);
        return value;
    }
    uint32_t value;
    memcpy(&value, at, sizeof value);
    return is_signed ? (uint64_t)(int64_t)(int32_t)value : value;
}

/* symbol_name()'s answer for a name that is not wanted (not an error code). */
#define NOT_WANTED (-100)

static int compare_names(const void *key, const void *element)
{
    return strcmp((const char *)key, *(const char *const *)element);
}

/* What the symbol table's entry at ``entry`` (inside the table's PT_LOAD,
   checked by the caller) is named: the index of its wanted name, NOT_WANTED,
   or RELOCS_UNCHECKED where the careful path must look. */
static int symbol_name(const unsigned char *data, const struct relocs_layout *layout, const unsigned char *entry,
                       const char *const *wanted, int nwanted)
{
    uint32_t st_name; /* the first field of Elf32_Sym and of Elf64_Sym */
    memcpy(&st_name, entry, sizeof st_name);
    if (st_name >= layout->strtab_end - layout->strtab)
        return RELOCS_UNCHECKED;
    const char *name = (const char *)data + layout->strtab + st_name;
    if (!memchr(name, '\0', layout->strtab_end - layout->strtab - st_name)) /* unterminated */
        return RELOCS_UNCHECKED;
    const char *const *match = bsearch(name, wanted, (size_t)nwanted, sizeof *wanted, compare_names);
    return match ? (int)(match - wanted) : NOT_WANTED;
}

long relocs_find_wanted(const unsigned char *data, size_t size, const struct relocs_table *tables, int ntables,
                        const struct relocs_layout *layout, const char *const *wanted, int nwanted,
                        const unsigned char *known, int nknown, struct relocs_found *found, long capacity)
{
    int is64 = layout->is64;
    size_t entry_size = is64 ? 24 : 16;
    if (layout->symtab > layout->symtab_end || layout->symtab_end > size || layout->strtab >= layout->strtab_end ||
            layout->strtab_end > size || nwanted < 0 || nwanted >= INT16_MAX)
        return RELOCS_UNCHECKED;
    /* Each symbol's name looked up once: 0 not yet, -1 not wanted, k + 1 wanted name k. */
    size_t entries = (layout->symtab_end - layout->symtab) / entry_size;
    int16_t *names = calloc(entries ? entries : 1, sizeof *names);
    size_t count = 0, room = 64;
    struct relocs_found *all = malloc(room * sizeof *all);
    long result = 0;
    if (!names || !all) {
        result = RELOCS_NO_MEMORY;
        goto done;
    }
    for (int t = 0; t < ntables; t++) {
        size_t relocation_size = is64 ? (tables[t].is_rela ? 24 : 16) : (tables[t].is_rela ? 12 : 8);
        if (tables[t].offset > size || tables[t].size > size - tables[t].offset) {
            result = RELOCS_UNCHECKED;
            goto done;
        }
        const unsigned char *at = data + tables[t].offset;
        const unsigned char *end = at + tables[t].size - tables[t].size % relocation_size;
        for (; at < end; at += relocation_size) {
            uint64_t info = word(at + (is64 ? 8 : 4), is64, 0);
            uint64_t symbol = is64 ? info >> 32 : info >> 8;
            uint32_t type = (uint32_t)(is64 ? info & 0xffffffffu : info & 0xffu);
            if (type >= (uint32_t)nknown || !known[type] || symbol == 0)
                continue;
            uint64_t r_offset = word(at, is64, 0);
            int seen = 0;
            for (size_t i = 0; i < count && !seen; i++)
                seen = all[i].r_offset == r_offset;
            if (seen)
                continue;
            if (symbol >= entries) { /* beyond the table's PT_LOAD: elf.py looks in the others */
                result = RELOCS_UNCHECKED;
                goto done;
            }
            if (names[symbol] == 0) {
                int name = symbol_name(data, layout, data + layout->symtab + symbol * entry_size, wanted, nwanted);
                if (name == RELOCS_UNCHECKED) {
                    result = RELOCS_UNCHECKED;
                    goto done;
                }
                names[symbol] = (int16_t)(name == NOT_WANTED ? -1 : name + 1);
            }
            if (names[symbol] < 0)
                continue;
            if (count == room) {
                struct relocs_found *bigger = realloc(all, 2 * room * sizeof *all);
                if (!bigger) {
                    result = RELOCS_NO_MEMORY;
                    goto done;
                }
                all = bigger;
                room *= 2;
            }
            all[count++] = (struct relocs_found){
                .r_offset = r_offset,
                .symbol = symbol,
                .type = type,
                .r_addend = tables[t].is_rela ? (int64_t)word(at + (is64 ? 16 : 8), is64, 1) : 0,
                .name = names[symbol] - 1,
            };
        }
    }
    size_t stored = count < (size_t)(capacity > 0 ? capacity : 0) ? count : (size_t)(capacity > 0 ? capacity : 0);
    if (stored)
        memcpy(found, all, stored * sizeof *all);
    result = (long)count;
done:
    free(names);
    free(all);
    return result;
}
