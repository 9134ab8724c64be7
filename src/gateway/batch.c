/* batch: choosing and encoding what one submit_many or results call carries. No
 * I/O and no state, so the folding rules are unit-tested on their own. */
#include "batch.h"

#include <stdlib.h>
#include <string.h>

size_t batch_take_count(const call_t *head, size_t max_items, size_t max_bytes)
{
    size_t n = 0, bytes = 0;

    if (!head)
        return 0;
    if (head->solo)
        return 1;
    for (const call_t *c = head; c && n < max_items; c = c->next) {
        if (c->solo)
            break;
        if (n > 0 && bytes + c->element_len + 1 > max_bytes)
            break;
        bytes += c->element_len + 1;
        n++;
    }
    return n;
}

void batch_join_elements(buf_t *out, const call_t *head, size_t n)
{
    size_t i = 0;

    buf_append_char(out, '[');
    for (const call_t *c = head; c && i < n; c = c->next, i++) {
        if (i > 0)
            buf_append_char(out, ',');
        buf_append(out, c->element, c->element_len);
    }
    buf_append_char(out, ']');
}

void batch_ids_literal(buf_t *out, const int64_t *ids, size_t n)
{
    buf_append_char(out, '{');
    for (size_t i = 0; i < n; i++)
        buf_printf(out, i ? ",%lld" : "%lld", (long long)ids[i]);
    buf_append_char(out, '}');
}

/* Each id: 1..19 digits, no sign, value in (0, INT64_MAX]. */
static bool batch_next_id(const char **pp, int64_t *out)
{
    const char *p = *pp;
    int64_t v = 0;
    int digits = 0;

    while (*p >= '0' && *p <= '9') {
        if (++digits > 19 || v > (INT64_MAX - (*p - '0')) / 10)
            return false;
        v = v * 10 + (*p - '0');
        p++;
    }
    if (digits == 0 || v <= 0)
        return false;
    *out = v;
    *pp = p;
    return true;
}

int batch_parse_ids(const char *payload, void (*fn)(void *ctx, int64_t id), void *ctx)
{
    const char *p = payload;
    int count = 0;

    if (!payload || !*payload)
        return -1;
    /* Validate the whole payload first, so a bad one reports nothing. */
    for (;;) {
        int64_t id;

        if (!batch_next_id(&p, &id))
            return -1;
        count++;
        if (*p == '\0')
            break;
        if (*p != ',')
            return -1;
        p++;
    }
    p = payload;
    for (int i = 0; i < count; i++) {
        int64_t id;

        batch_next_id(&p, &id);
        if (*p == ',')
            p++;
        fn(ctx, id);
    }
    return count;
}

static int batch_cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return x < y ? -1 : x > y;
}

size_t batch_unique_ids(int64_t *ids, size_t n)
{
    size_t out = 0;

    if (n == 0)
        return 0;
    qsort(ids, n, sizeof *ids, batch_cmp_id);
    for (size_t i = 0; i < n; i++) {
        if (out == 0 || ids[out - 1] != ids[i])
            ids[out++] = ids[i];
    }
    return out;
}

call_t *batch_call_for_row(call_t *const *calls, size_t n, const char *idx)
{
    long v = 0;

    if (!idx || !*idx)
        return NULL;
    for (const char *p = idx; *p; p++) {
        if (*p < '0' || *p > '9' || v > 1000000000L)
            return NULL;
        v = v * 10 + (*p - '0');
    }
    if (v < 1 || (size_t)v > n)
        return NULL;
    return calls[v - 1];
}
