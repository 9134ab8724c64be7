/* waiters: a chained hash table of waiting calls keyed by job id, with an intrusive
 * list of all waiters. Buckets grow by doubling; nothing shrinks (the table is as
 * big as the most requests that ever waited at once). */
#include "waiters.h"

#include <stdlib.h>

#define WAITERS_MIN_BUCKETS 64

static size_t waiters_slot(int64_t id, size_t nbuckets)
{
    uint64_t x = (uint64_t)id * UINT64_C(0x9E3779B97F4A7C15);

    return (size_t)(x >> 32) & (nbuckets - 1);
}

void waiters_init(waiters_t *w)
{
    w->buckets = NULL;
    w->nbuckets = 0;
    w->count = 0;
    w->all = NULL;
}

void waiters_free(waiters_t *w)
{
    free(w->buckets);
    waiters_init(w);
}

static bool waiters_grow(waiters_t *w)
{
    size_t n = w->nbuckets ? w->nbuckets * 2 : WAITERS_MIN_BUCKETS;
    call_t **b = calloc(n, sizeof *b);

    if (!b)
        return false;
    for (size_t i = 0; i < w->nbuckets; i++) {
        call_t *c = w->buckets[i];

        while (c) {
            call_t *next = c->hnext;
            size_t s = waiters_slot(c->job_id, n);

            c->hnext = b[s];
            b[s] = c;
            c = next;
        }
    }
    free(w->buckets);
    w->buckets = b;
    w->nbuckets = n;
    return true;
}

bool waiters_add(waiters_t *w, call_t *c)
{
    size_t s;

    if ((w->count + 1 > w->nbuckets) && !waiters_grow(w) && w->nbuckets == 0)
        return false;
    s = waiters_slot(c->job_id, w->nbuckets);
    c->hnext = w->buckets[s];
    w->buckets[s] = c;
    c->all_prev = NULL;
    c->all_next = w->all;
    if (w->all)
        w->all->all_prev = c;
    w->all = c;
    c->waiting = true;
    w->count++;
    return true;
}

void waiters_remove(waiters_t *w, call_t *c)
{
    call_t **pp;

    if (!c->waiting)
        return;
    pp = &w->buckets[waiters_slot(c->job_id, w->nbuckets)];
    while (*pp && *pp != c)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = c->hnext;
    if (c->all_prev)
        c->all_prev->all_next = c->all_next;
    else
        w->all = c->all_next;
    if (c->all_next)
        c->all_next->all_prev = c->all_prev;
    c->hnext = c->all_prev = c->all_next = NULL;
    c->waiting = false;
    w->count--;
}

call_t *waiters_find(const waiters_t *w, int64_t job_id)
{
    if (w->nbuckets == 0)
        return NULL;
    for (call_t *c = w->buckets[waiters_slot(job_id, w->nbuckets)]; c; c = c->hnext) {
        if (c->job_id == job_id)
            return c;
    }
    return NULL;
}

call_t *waiters_find_next(const call_t *prev)
{
    for (call_t *c = prev->hnext; c; c = c->hnext) {
        if (c->job_id == prev->job_id)
            return c;
    }
    return NULL;
}
