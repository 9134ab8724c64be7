/* lease: what the daemon says to the control plane and how it reads the answers:
 * the outbox of finished attempts (JSON built here, settled by dispatch.exchange),
 * the same structure holding streamed chunks for dispatch.stream, the statement
 * texts, and parsing of exchange rows and of jobs pushed on the node's channel. Owns
 * the outbox memory only. */
#include "lease.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

const char LEASE_SQL_REGISTER[] =
    "SELECT r.node_id, r.node_name, r.node_channel, array_to_string(r.model_channels, ','), "
    "(SELECT string_agg(concat(e->>'id', ':', e->>'attempt'), ',') FROM json_array_elements(r.stale_holding) e) "
    "FROM dispatch.register($1, $2::text[], $3::int, $4, $5::jsonb, $6::json) AS r";
/* The columns lease_row_parse reads, from exchange's and settle's rows alike. */
#define LEASE_ROW_COLUMNS                                                                                    \
    "SELECT kind, id, attempt, model, endpoint, payload, "                                                   \
    "(extract(epoch FROM deadline - now()) * 1000)::bigint, "                                                \
    "(extract(epoch FROM lease_expires_at - now()) * 1000)::bigint "
const char LEASE_SQL_EXCHANGE[] = LEASE_ROW_COLUMNS "FROM dispatch.exchange($1::json, $2::int)";
const char LEASE_SQL_SETTLE[] = LEASE_ROW_COLUMNS "FROM dispatch.settle($1::json, $2::boolean)";
const char LEASE_SQL_EXTEND[] =
    "SELECT id, attempt, ok, (extract(epoch FROM lease_expires_at - now()) * 1000)::bigint "
    "FROM dispatch.extend($1::bigint[], $2::int[])";
const char LEASE_SQL_REPORT[] =
    "SELECT r.node_id FROM dispatch.report($1, $2, $3::int) AS r, dispatch.set_lease_ahead($4::int)";
const char LEASE_SQL_DEREGISTER[] = "SELECT dispatch.deregister()";
const char LEASE_SQL_STREAM[] = "SELECT id, attempt, ok FROM dispatch.stream($1::json)";
const char LEASE_SQL_REFUSE_PUSHES[] = "SELECT dispatch.accept_pushes(false)";

void lease_outbox_init(lease_outbox_t *ob)
{
    memset(ob, 0, sizeof *ob);
}

void lease_outbox_free(lease_outbox_t *ob)
{
    buf_free(&ob->json);
    free(ob->meta);
    free(ob->order);
    memset(ob, 0, sizeof *ob);
}

/* Records the entry just appended at [start, json.len); rolls it back on OOM. */
static int outbox_commit(lease_outbox_t *ob, size_t start, int64_t id, int32_t attempt, bool rewritten)
{
    if (!ob->json.oom)
        buf_append_char(&ob->json, ',');
    if (ob->json.oom)
        goto fail;
    if (ob->count == ob->cap) {
        size_t cap = ob->cap ? ob->cap * 2 : 16;
        lease_outcome_meta_t *m = realloc(ob->meta, cap * sizeof *m);
        lease_outbox_slot_t *o;

        if (m == NULL)
            goto fail;
        ob->meta = m;
        o = realloc(ob->order, cap * sizeof *o);
        if (o == NULL)
            goto fail;
        ob->order = o;
        ob->cap = cap;
    }
    ob->meta[ob->count++] = (lease_outcome_meta_t){ id, attempt, rewritten, ob->json.len };
    return 0;
fail:
    ob->json.oom = false;
    ob->json.len = start;
    if (ob->json.data)
        ob->json.data[start] = '\0';
    return -1;
}

int lease_outbox_add_result(lease_outbox_t *ob, int64_t id, int32_t attempt, const char *body, size_t len)
{
    size_t start = ob->json.len;

    buf_printf(&ob->json, "{\"id\":%lld,\"attempt\":%d,\"result\":", (long long)id, (int)attempt);
    buf_append(&ob->json, body, len);
    buf_append_char(&ob->json, '}');
    return outbox_commit(ob, start, id, attempt, false);
}

static int outbox_add_error(lease_outbox_t *ob, int64_t id, int32_t attempt, const lease_error_t *e,
                            bool rewritten)
{
    size_t start = ob->json.len;
    const char *msg = e->message ? e->message : "";

    buf_printf(&ob->json, "{\"id\":%lld,\"attempt\":%d,\"error\":{\"code\":", (long long)id, (int)attempt);
    buf_append_json_string(&ob->json, e->code, strlen(e->code));
    buf_append_str(&ob->json, ",\"message\":");
    buf_append_json_string(&ob->json, msg, strlen(msg));
    if (e->status > 0)
        buf_printf(&ob->json, ",\"status\":%ld", e->status);
    if (e->body != NULL) {
        size_t n = e->body_len < LEASE_ERROR_BODY_MAX ? e->body_len : LEASE_ERROR_BODY_MAX;
        buf_append_str(&ob->json, ",\"body\":");
        buf_append_json_string(&ob->json, e->body, n);
        if (n < e->body_len)
            buf_printf(&ob->json, ",\"body_truncated_from\":%zu", e->body_len);
    }
    buf_printf(&ob->json, "},\"retryable\":%s}", e->retryable ? "true" : "false");
    return outbox_commit(ob, start, id, attempt, rewritten);
}

int lease_outbox_add_error(lease_outbox_t *ob, int64_t id, int32_t attempt, const lease_error_t *e)
{
    return outbox_add_error(ob, id, attempt, e, false);
}

int lease_outbox_add_chunk(lease_outbox_t *ob, int64_t id, int32_t attempt, uint32_t seq, bool more,
                           const char *data, size_t len)
{
    size_t start = ob->json.len;

    buf_printf(&ob->json, "{\"id\":%lld,\"attempt\":%d,\"seq\":%lu,\"more\":%s,\"data\":", (long long)id,
               (int)attempt, (unsigned long)seq, more ? "true" : "false");
    buf_append_json_string(&ob->json, data, len);
    buf_append_char(&ob->json, '}');
    return outbox_commit(ob, start, id, attempt, false);
}

size_t lease_outbox_drop_job(lease_outbox_t *ob, int64_t id, int32_t attempt)
{
    size_t w = ob->sent;
    size_t wpos = ob->sent > 0 ? ob->meta[ob->sent - 1].end : 0;
    size_t rpos = wpos;
    size_t dropped = 0;

    for (size_t i = ob->sent; i < ob->count; i++) {
        size_t end = ob->meta[i].end;

        if (ob->meta[i].id == id && ob->meta[i].attempt == attempt) {
            dropped++;
        } else {
            if (wpos != rpos)
                memmove(ob->json.data + wpos, ob->json.data + rpos, end - rpos);
            wpos += end - rpos;
            ob->meta[w] = ob->meta[i];
            ob->meta[w].end = wpos;
            w++;
        }
        rpos = end;
    }
    if (dropped > 0) {
        ob->count = w;
        ob->json.len = wpos;
        ob->json.data[wpos] = '\0';
    }
    return dropped;
}

typedef struct {
    int64_t id;
    int32_t attempt;
} job_key_t;

static int key_cmp(const void *a, const void *b)
{
    const job_key_t *x = a, *y = b;

    if (x->id != y->id)
        return x->id < y->id ? -1 : 1;
    return (x->attempt > y->attempt) - (x->attempt < y->attempt);
}

size_t lease_outbox_ready_prefix(const lease_outbox_t *outcomes, const lease_outbox_t *chunks)
{
    job_key_t *keys;
    size_t n = 0, i;

    if (chunks->count == 0 || outcomes->count == 0)
        return outcomes->count;
    keys = malloc(chunks->count * sizeof *keys);
    if (keys == NULL) {
        for (i = 0; i < outcomes->count; i++) {
            for (size_t k = 0; k < chunks->count; k++) {
                if (chunks->meta[k].id == outcomes->meta[i].id && chunks->meta[k].attempt == outcomes->meta[i].attempt)
                    return i;
            }
        }
        return i;
    }
    for (size_t k = 0; k < chunks->count; k++) {
        if (n == 0 || keys[n - 1].id != chunks->meta[k].id || keys[n - 1].attempt != chunks->meta[k].attempt)
            keys[n++] = (job_key_t){ chunks->meta[k].id, chunks->meta[k].attempt };
    }
    qsort(keys, n, sizeof *keys, key_cmp);
    for (i = 0; i < outcomes->count; i++) {
        job_key_t k = { outcomes->meta[i].id, outcomes->meta[i].attempt };
        if (bsearch(&k, keys, n, sizeof *keys, key_cmp) != NULL)
            break;
    }
    free(keys);
    return i;
}

static int slot_cmp(const void *a, const void *b)
{
    const lease_outbox_slot_t *x = a, *y = b;

    if (x->id != y->id)
        return x->id < y->id ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* Entries go out in job id order because dispatch.exchange locks the jobs it settles
 * in the order of its argument, and every other session that locks several jobs
 * (the gateway's batched cancel) takes them in id order too: one order everywhere
 * means two such transactions never deadlock. */
size_t lease_outbox_take(lease_outbox_t *ob, size_t max, buf_t *param)
{
    size_t n = ob->count < max ? ob->count : max;

    for (size_t i = 0; i < n; i++)
        ob->order[i] = (lease_outbox_slot_t){ ob->meta[i].id, i };
    if (n > 1)
        qsort(ob->order, n, sizeof *ob->order, slot_cmp);
    buf_reset(param);
    buf_append_char(param, '[');
    for (size_t k = 0; k < n; k++) {
        size_t i = ob->order[k].index;
        size_t start = i > 0 ? ob->meta[i - 1].end : 0;

        if (k > 0)
            buf_append_char(param, ',');
        buf_append(param, ob->json.data + start, ob->meta[i].end - 1 - start);   /* without its comma */
    }
    buf_append_char(param, ']');
    ob->sent = n;
    return n;
}

/* Removes the first n entries. */
static void outbox_drop_front(lease_outbox_t *ob, size_t n)
{
    size_t bytes;

    if (n == 0)
        return;
    bytes = ob->meta[n - 1].end;
    buf_consume(&ob->json, bytes);
    memmove(ob->meta, ob->meta + n, (ob->count - n) * sizeof *ob->meta);
    ob->count -= n;
    for (size_t i = 0; i < ob->count; i++)
        ob->meta[i].end -= bytes;
}

void lease_outbox_sent_done(lease_outbox_t *ob)
{
    outbox_drop_front(ob, ob->sent);
    ob->sent = 0;
}

void lease_outbox_sent_retry(lease_outbox_t *ob)
{
    ob->sent = 0;
}

bool lease_outbox_sent_refused(lease_outbox_t *ob, const char *why)
{
    lease_outcome_meta_t m;
    lease_error_t e = { "bad_response", why, 0, NULL, 0, false };

    if (ob->sent == 0 || ob->count == 0)
        return false;
    m = ob->meta[0];
    outbox_drop_front(ob, 1);
    ob->sent = 0;
    if (m.rewritten)
        return false;
    return outbox_add_error(ob, m.id, m.attempt, &e, true) == 0;
}

static bool parse_int64(const char *s, int64_t *out)
{
    char *end;
    long long v;

    if (s == NULL || *s == '\0')
        return false;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return false;
    *out = v;
    return true;
}

bool lease_row_parse(const PGresult *res, int i, lease_row_t *out)
{
    const char *kind;
    int64_t v;

    memset(out, 0, sizeof *out);
    if (PQnfields(res) < 8 || i < 0 || i >= PQntuples(res))
        return false;
    kind = PQgetvalue(res, i, 0);
    if (strcmp(kind, "job") == 0)
        out->kind = LEASE_ROW_JOB;
    else if (strcmp(kind, "stale") == 0)
        out->kind = LEASE_ROW_STALE;
    else if (strcmp(kind, "wake") == 0)
        out->kind = LEASE_ROW_WAKE;
    else {
        out->kind = LEASE_ROW_UNKNOWN;
        return false;
    }
    if (out->kind != LEASE_ROW_WAKE) {
        if (!parse_int64(PQgetvalue(res, i, 1), &out->id))
            return false;
        if (!parse_int64(PQgetvalue(res, i, 2), &v) || v < 0 || v > INT32_MAX)
            return false;
        out->attempt = (int32_t)v;
    }
    if (out->kind == LEASE_ROW_JOB) {
        if (PQgetisnull(res, i, 4) || PQgetisnull(res, i, 5))
            return false;
        out->model = PQgetvalue(res, i, 3);
        out->endpoint = PQgetvalue(res, i, 4);
        out->payload = PQgetvalue(res, i, 5);
        out->payload_len = (size_t)PQgetlength(res, i, 5);
        if (!PQgetisnull(res, i, 6)) {
            if (!parse_int64(PQgetvalue(res, i, 6), &out->deadline_in_ms))
                return false;
            out->has_deadline = true;
        }
    }
    if (!PQgetisnull(res, i, 7)) {
        if (!parse_int64(PQgetvalue(res, i, 7), &out->lease_in_ms))
            return false;
        out->has_lease = true;
    }
    if (out->kind == LEASE_ROW_JOB && !out->has_lease)
        return false;
    return true;
}

void lease_text_array(buf_t *out, const char *const *items, size_t count)
{
    buf_append_char(out, '{');
    for (size_t i = 0; i < count; i++) {
        if (i > 0)
            buf_append_char(out, ',');
        buf_append_char(out, '"');
        for (const char *p = items[i]; *p; p++) {
            if (*p == '"' || *p == '\\')
                buf_append_char(out, '\\');
            buf_append_char(out, *p);
        }
        buf_append_char(out, '"');
    }
    buf_append_char(out, '}');
}

bool lease_push_parse(char *text, lease_row_t *out, char *model, size_t model_cap)
{
    char *field[6];
    char *p = text;
    int64_t v, model_len;
    size_t rest;

    memset(out, 0, sizeof *out);
    if (text == NULL || *p++ != 'P')
        return false;
    /* id, attempt, lease ms, deadline ms, endpoint, model bytes: none holds a ':'. */
    for (size_t f = 0; f < sizeof field / sizeof field[0]; f++) {
        char *end = strchr(p, ':');
        if (end == NULL)
            return false;
        *end = '\0';
        field[f] = p;
        p = end + 1;
    }
    if (!parse_int64(field[0], &out->id) || out->id <= 0)
        return false;
    if (!parse_int64(field[1], &v) || v < 1 || v > INT32_MAX)
        return false;
    out->attempt = (int32_t)v;
    if (!parse_int64(field[2], &out->lease_in_ms))
        return false;
    out->has_lease = true;
    if (*field[3] != '\0') {
        if (!parse_int64(field[3], &out->deadline_in_ms))
            return false;
        out->has_deadline = true;
    }
    if (field[4][0] != '/')
        return false;
    out->endpoint = field[4];
    rest = strlen(p);
    if (!parse_int64(field[5], &model_len) || model_len < 1 || (uint64_t)model_len >= model_cap ||
        (uint64_t)model_len >= rest)
        return false;
    memcpy(model, p, (size_t)model_len);
    model[model_len] = '\0';
    out->model = model;
    out->payload = p + model_len;
    out->payload_len = rest - (size_t)model_len;
    out->kind = LEASE_ROW_JOB;
    return true;
}

bool lease_pair_next(const char **cursor, int64_t *id, int32_t *attempt)
{
    const char *p = *cursor;
    char *end;
    long long i;
    long a;

    if (p == NULL || *p == '\0')
        return false;
    errno = 0;
    i = strtoll(p, &end, 10);
    if (end == p || *end != ':' || errno != 0 || i <= 0)
        return false;
    p = end + 1;
    a = strtol(p, &end, 10);
    if (end == p || (*end != ',' && *end != '\0') || errno != 0 || a < 0 || a > INT32_MAX)
        return false;
    *id = (int64_t)i;
    *attempt = (int32_t)a;
    *cursor = *end == ',' ? end + 1 : end;
    return true;
}

bool lease_wake_names(const char *payload, int node_id)
{
    const char *p = payload ? payload : "";

    if (*p == '\0')
        return true;
    while (*p) {
        long id = 0;
        const char *start = p;

        while (*p >= '0' && *p <= '9' && id <= INT_MAX)
            id = id * 10 + (*p++ - '0');
        if (p == start || id > INT_MAX || (*p != ',' && *p != '\0'))
            return true;
        if (id == node_id)
            return true;
        if (*p == ',')
            p++;
    }
    return false;
}

int lease_split_list(const char *text, char ***out)
{
    char **items = NULL;
    int count = 0;
    const char *p = text ? text : "";

    *out = NULL;
    while (*p) {
        const char *start, *end;
        char **grown;
        char *item;

        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        if (*p == '\0')
            break;
        start = p;
        while (*p && *p != ',')
            p++;
        end = p;
        while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        grown = realloc(items, (size_t)(count + 1) * sizeof *items);
        item = strndup(start, (size_t)(end - start));
        if (grown == NULL || item == NULL) {
            free(item);
            lease_free_list(grown ? grown : items, count);
            return -1;
        }
        items = grown;
        items[count++] = item;
    }
    *out = items;
    return count;
}

void lease_free_list(char **items, int count)
{
    for (int i = 0; i < count; i++)
        free(items[i]);
    free(items);
}
