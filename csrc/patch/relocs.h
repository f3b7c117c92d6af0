/*
 * Finding the relocations of wanted symbols in an ELF file's bytes: the
 * inner loop of greenify/patching/elf.py, which reads every loaded object
 * for patch_all() (tens of thousands of relocations and symbols).
 *
 * elf.py finds and checks the tables first (the dynamic segment, each
 * table's place in a PT_LOAD); this walks them.  It makes the same checks as
 * elf.py's careful path on everything it reads and, where one fails, returns
 * RELOCS_UNCHECKED: elf.py then reads the file the careful way and names
 * what is wrong.  Native byte order only (elf.py keeps the others).
 */
#ifndef GREENIFY_RELOCS_H
#define GREENIFY_RELOCS_H

#include <stddef.h>
#include <stdint.h>

/* One table (DT_JMPREL, DT_RELA, DT_REL): file offset and size in bytes. */
struct relocs_table {
    size_t offset;
    size_t size;
    int is_rela;
};

/* Where the symbols and their names are: file offsets, each end the end of
   the file part of the PT_LOAD that holds the table's start (DT_STRSZ
   bounds the strings too). */
struct relocs_layout {
    int is64;
    size_t symtab;
    size_t symtab_end;
    size_t strtab;
    size_t strtab_end;
};

/* A relocation found: what elf.py's careful path yields. */
struct relocs_found {
    uint64_t r_offset;
    uint64_t symbol;
    uint32_t type;
    int64_t r_addend;
    int name; /* index into the wanted names */
};

#define RELOCS_UNCHECKED -1
#define RELOCS_NO_MEMORY -2

/* The relocations, in table order, whose type is known (known[type] != 0
   for type < nknown), whose symbol is not 0 and is named one of ``wanted``
   (nwanted names, sorted by strcmp), the first of each r_offset.  Stores up
   to ``capacity`` in ``found`` and returns how many there are (call again
   with more room if that is more), or RELOCS_UNCHECKED / RELOCS_NO_MEMORY. */
long relocs_find_wanted(const unsigned char *data, size_t size, const struct relocs_table *tables, int ntables,
                        const struct relocs_layout *layout, const char *const *wanted, int nwanted,
                        const unsigned char *known, int nknown, struct relocs_found *found, long capacity);

#endif
