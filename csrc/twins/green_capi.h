/*
 * The C API's table, for greenify/capi.py, which wraps it in the capsule
 * greenify._C_API (csrc/twins/green_capi.c; the table's layout is
 * greenify/include/greenify.h's struct greenify_api).
 */
#ifndef GREENIFY_GREEN_CAPI_H
#define GREENIFY_GREEN_CAPI_H

/* The table, in static storage: valid for the process's life. */
const void *green_capi_table(void);
/* GREENIFY_CAPSULE_NAME, in static storage (a capsule keeps the pointer). */
const char *green_capi_capsule_name(void);

#endif
