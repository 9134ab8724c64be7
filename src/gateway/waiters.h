/* waiters: the table of calls waiting for a job to finish, by job id (several calls
 * may wait for one job), plus a list of all of them for timers and hang-up checks.
 * Links live in the calls themselves; the table owns only its bucket array. */
#ifndef PGD_GATEWAY_WAITERS_H
#define PGD_GATEWAY_WAITERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "call.h"

typedef struct {
    call_t **buckets;
    size_t nbuckets;   /* power of two */
    size_t count;
    call_t *all;       /* every waiter, newest first */
} waiters_t;

void waiters_init(waiters_t *w);
/* Frees the bucket array; the calls are not touched. */
void waiters_free(waiters_t *w);

/* Add c under c->job_id. Returns false when out of memory (c is not added). */
bool waiters_add(waiters_t *w, call_t *c);
/* Remove c, which must be in the table. */
void waiters_remove(waiters_t *w, call_t *c);

/* The first waiter for a job id, then the next one after prev for the same id. */
call_t *waiters_find(const waiters_t *w, int64_t job_id);
call_t *waiters_find_next(const call_t *prev);

static inline size_t waiters_count(const waiters_t *w) { return w->count; }

#endif
