/*
 * The list of green functions (green.h's X-lists) as one table for Python:
 * greenify/functions.py reads it through cffi, and the patcher's twins,
 * greenify-inspect's categories and elf.py's blocking calls come from there.
 */
#include <stddef.h>

#include "green_tls.h"
#include "green_twins.h"

#define TWIN_ROW(name, family) {#name, (void *)green_##name, family, NULL},
#define FORTIFIED_ROW(name, plain, family) {#name, (void *)green_##name, family, #plain},
#define NO_TWIN_ROW(name, family) {#name, NULL, family, NULL},

static const struct green_function_entry green_function_table[] = {
    GREEN_FUNCTIONS(TWIN_ROW) GREEN_FORTIFIED_FUNCTIONS(FORTIFIED_ROW) GREEN_BLOCKING_WITHOUT_TWIN(NO_TWIN_ROW)};

#define TLS_ROW(name) {#name, (void *)green_tls_##name, "tls", NULL},

static const struct green_function_entry green_tls_function_table[] = {GREEN_TLS_TWINS(TLS_ROW)};

#define ROWS(table) ((int)(sizeof table / sizeof table[0]))

const struct green_function_entry *green_function_entry(int index)
{
    return index >= 0 && index < ROWS(green_function_table) ? &green_function_table[index] : NULL;
}

const struct green_function_entry *green_tls_function_entry(int index)
{
    return index >= 0 && index < ROWS(green_tls_function_table) ? &green_tls_function_table[index] : NULL;
}
