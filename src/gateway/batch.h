/* batch: the pure parts of folding requests into one database round trip: which of
 * the queued submits go into one submit_many call, the JSON array they make, the
 * bigint[] literal of a results call, and the ids in a reply notification. */
#ifndef PGD_GATEWAY_BATCH_H
#define PGD_GATEWAY_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "call.h"

#define BATCH_MAX_ITEMS 1000               /* elements per submit_many call */
#define BATCH_MAX_BYTES (16u * 1024 * 1024) /* JSON text per submit_many call */

/* How many calls from the head of a queue (linked by ->next) go into one batch:
 * at least one (however big), at most max_items, and no more than max_bytes of
 * element text unless the first alone is bigger. A call marked solo goes alone. */
size_t batch_take_count(const call_t *head, size_t max_items, size_t max_bytes);

/* Append "[e1,e2,...]" built from the first n calls' elements to out. */
void batch_join_elements(buf_t *out, const call_t *head, size_t n);

/* Append a PostgreSQL array literal "{1,2,3}" of ids to out. */
void batch_ids_literal(buf_t *out, const int64_t *ids, size_t n);

/* Parse a reply notification ("12,13,40"): calls fn for each positive id. Returns
 * the number of ids, or -1 when the payload has anything else in it (nothing is
 * reported for a bad payload). */
int batch_parse_ids(const char *payload, void (*fn)(void *ctx, int64_t id), void *ctx);

/* Sort ids and drop duplicates in place; returns the new count. */
size_t batch_unique_ids(int64_t *ids, size_t n);

/* The call a submit_many result row belongs to: idx is the row's 1-based text
 * index; calls is the batch in order. NULL for anything out of range. */
call_t *batch_call_for_row(call_t *const *calls, size_t n, const char *idx);

#endif
