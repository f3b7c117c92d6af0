/*
 * The C API (greenify/include/greenify.h): the table of the green twins that
 * greenify._C_API's capsule and greenify.capi_address() hand to C code.
 *
 * The header declares the table's members by hand, with libc's signatures,
 * for authors to read; the list of green functions stays GREEN_FUNCTIONS and
 * GREEN_FORTIFIED_FUNCTIONS (green.h), and the twins' prototypes stay in
 * green_twins.h.  This file does not compile unless the header agrees with
 * both: every listed twin has a member of its exact type, and the table has
 * no member the lists do not name.
 */
#define GREENIFY_NO_CALLS /* the struct only: green_<name> here are the twins themselves */
#include "greenify.h"

#include <stddef.h>

#include "green_capi.h"
#include "green_twins.h"

#define GREEN_CAPI_MEMBER_TYPE(name) __typeof__(((struct greenify_api *)0)->name)
#define GREEN_CAPI_CHECK(name, ...)                                                                            \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&green_##name), GREEN_CAPI_MEMBER_TYPE(name)),     \
                   "greenify.h: struct greenify_api's " #name " is not green_" #name "'s type (green_twins.h)");
GREEN_FUNCTIONS(GREEN_CAPI_CHECK)
GREEN_FORTIFIED_FUNCTIONS(GREEN_CAPI_CHECK)

#define GREEN_CAPI_COUNT(name, ...) +1
enum { GREEN_CAPI_FUNCTIONS = 0 GREEN_FUNCTIONS(GREEN_CAPI_COUNT) GREEN_FORTIFIED_FUNCTIONS(GREEN_CAPI_COUNT) };
_Static_assert(sizeof(struct greenify_api) ==
                   offsetof(struct greenify_api, connect) + GREEN_CAPI_FUNCTIONS * sizeof(void (*)(void)),
               "greenify.h: struct greenify_api has a member that GREEN_FUNCTIONS and GREEN_FORTIFIED_FUNCTIONS "
               "do not list (or connect is no longer its first function)");

#define GREEN_CAPI_FILL(name, ...) .name = green_##name,
/* Static storage in the module, which CPython never unloads: the capsule's
   pointer stays valid for the process's life. */
static const struct greenify_api green_capi = {
    .version_major = GREENIFY_API_VERSION_MAJOR,
    .version_minor = GREENIFY_API_VERSION_MINOR,
    .size = sizeof(struct greenify_api),
    GREEN_FUNCTIONS(GREEN_CAPI_FILL) GREEN_FORTIFIED_FUNCTIONS(GREEN_CAPI_FILL)
};

const void *green_capi_table(void)
{
    return &green_capi;
}

const char *green_capi_capsule_name(void)
{
    return GREENIFY_CAPSULE_NAME;
}
