/* relay: "stream": true without I/O: detection in the payload, the incremental SSE
 * parser, the assembler of a non-stream response from the chunks, and the per-job
 * relay that cuts events into notification-sized pieces. Owns only the memory of
 * the parser, assembler and relay states it is given. */
#include "relay.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RELAY_MAX_CHOICES 128       /* choice indexes accepted in a stream (n <= 128) */

bool relay_requested(const char *payload, size_t len)
{
    json_t *root = json_loadb(payload, len, 0, NULL);
    bool yes = json_is_object(root) && json_is_true(json_object_get(root, "stream"));

    json_decref(root);
    return yes;
}

size_t relay_piece_len(const char *s, size_t len, size_t max)
{
    size_t n = max;

    if (len <= max)
        return len;
    /* s[n] starts the next piece: back off while it is a continuation byte. */
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80 && max - n < 3)
        n--;
    return n > 0 ? n : max;
}

/* ------------------------------------------------------------------ SSE parser */

void relay_sse_init(relay_sse_t *p, size_t limit)
{
    memset(p, 0, sizeof *p);
    p->limit = limit;
}

void relay_sse_free(relay_sse_t *p)
{
    buf_free(&p->line);
    buf_free(&p->data);
    memset(p, 0, sizeof *p);
}

/* A whole line (without its terminator) is in p->line. */
static relay_sse_status_t relay_sse_line(relay_sse_t *p, relay_sse_event_fn fn, void *ctx)
{
    const char *l = p->line.data ? p->line.data : "";
    size_t len = p->line.len;
    const char *colon, *value;
    size_t flen, vlen;

    if (!p->first_line_done) {
        p->first_line_done = true;
        if (len >= 3 && memcmp(l, "\xEF\xBB\xBF", 3) == 0) {
            l += 3;
            len -= 3;
        }
    }
    if (len == 0) {
        bool go = true;

        if (p->has_data) {
            if (p->data.data == NULL)
                buf_append(&p->data, "", 0);
            if (p->data.oom)
                return RELAY_SSE_OOM;
            go = fn(ctx, p->data.data, p->data.len);
            buf_reset(&p->data);
            p->has_data = false;
        }
        return go ? RELAY_SSE_OK : RELAY_SSE_STOPPED;
    }
    if (l[0] == ':') {
        buf_reset(&p->line);
        return RELAY_SSE_OK;
    }
    colon = memchr(l, ':', len);
    flen = colon ? (size_t)(colon - l) : len;
    value = colon ? colon + 1 : l + len;
    vlen = (size_t)(l + len - value);
    if (vlen > 0 && value[0] == ' ') {
        value++;
        vlen--;
    }
    if (flen == 4 && memcmp(l, "data", 4) == 0) {
        if (p->has_data)
            buf_append_char(&p->data, '\n');
        buf_append(&p->data, value, vlen);
        p->has_data = true;
    }
    buf_reset(&p->line);
    return p->data.oom ? RELAY_SSE_OOM : RELAY_SSE_OK;
}

relay_sse_status_t relay_sse_feed(relay_sse_t *p, const char *bytes, size_t n, relay_sse_event_fn fn, void *ctx)
{
    size_t i = 0;

    while (i < n) {
        size_t k = 0;
        relay_sse_status_t st;

        if (p->after_cr) {
            p->after_cr = false;
            if (bytes[i] == '\n') {
                i++;
                continue;
            }
        }
        while (i + k < n && bytes[i + k] != '\n' && bytes[i + k] != '\r')
            k++;
        if (k > 0) {
            if (p->line.len + k > p->limit || p->line.len + k + p->data.len > p->limit)
                return RELAY_SSE_TOO_LARGE;
            buf_append(&p->line, bytes + i, k);
            if (p->line.oom)
                return RELAY_SSE_OOM;
            i += k;
        }
        if (i == n)
            break;                  /* the line goes on in the next feed */
        p->after_cr = bytes[i] == '\r';
        i++;
        st = relay_sse_line(p, fn, ctx);
        if (st != RELAY_SSE_OK)
            return st;
        if (p->data.len > p->limit)
            return RELAY_SSE_TOO_LARGE;
    }
    return RELAY_SSE_OK;
}

/* ------------------------------------------------------------------ assembler */

void relay_asm_init(relay_asm_t *a, relay_kind_t kind, size_t limit)
{
    memset(a, 0, sizeof *a);
    a->kind = kind;
    a->limit = limit;
}

void relay_asm_free(relay_asm_t *a)
{
    json_decref(a->id);
    json_decref(a->created);
    json_decref(a->model);
    json_decref(a->fingerprint);
    json_decref(a->usage);
    for (size_t i = 0; i < a->nchoices; i++) {
        buf_free(&a->choices[i].text);
        free(a->choices[i].role);
        free(a->choices[i].finish_reason);
    }
    free(a->choices);
    memset(a, 0, sizeof *a);
}

static void keep_first(json_t **slot, json_t *v)
{
    if (*slot == NULL && v != NULL && !json_is_null(v))
        *slot = json_incref(v);
}

static relay_choice_t *asm_choice(relay_asm_t *a, size_t index)
{
    if (index >= RELAY_MAX_CHOICES)
        return NULL;
    if (index >= a->nchoices) {
        relay_choice_t *grown = realloc(a->choices, (index + 1) * sizeof *grown);
        if (grown == NULL)
            return NULL;
        memset(grown + a->nchoices, 0, (index + 1 - a->nchoices) * sizeof *grown);
        a->choices = grown;
        a->nchoices = index + 1;
    }
    return &a->choices[index];
}

static bool replace_string(char **slot, json_t *v)
{
    char *copy;

    if (!json_is_string(v))
        return true;
    copy = strdup(json_string_value(v));
    if (copy == NULL)
        return false;
    free(*slot);
    *slot = copy;
    return true;
}

static relay_ev_t asm_fail(relay_asm_t *a, json_t *root, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static relay_ev_t asm_fail(relay_asm_t *a, json_t *root, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(a->error, sizeof a->error, fmt, ap);
    va_end(ap);
    json_decref(root);
    return RELAY_EV_ERROR;
}

relay_ev_t relay_asm_add(relay_asm_t *a, const char *data, size_t len)
{
    json_error_t jerr;
    json_t *root, *choices, *choice, *usage;
    size_t i;

    a->error[0] = '\0';
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0)
        return RELAY_EV_DONE;
    if (len == 0)
        return RELAY_EV_SKIP;
    /* jansson accepts a NUL after a number; pieces are promised NUL-free text. */
    if (memchr(data, '\0', len) != NULL)
        return asm_fail(a, NULL, "malformed event: %s", "a NUL byte in the data");
    root = json_loadb(data, len, 0, &jerr);
    if (root == NULL)
        return asm_fail(a, NULL, "malformed event: not valid JSON (%s)", jerr.text);
    if (!json_is_object(root))
        return asm_fail(a, root, "malformed event: %s", "JSON that is not an object");
    choices = json_object_get(root, "choices");
    if (choices == NULL && json_object_get(root, "error") != NULL) {
        json_t *e = json_object_get(root, "error");
        const char *msg = json_is_string(e) ? json_string_value(e)
                        : json_string_value(json_object_get(e, "message"));
        return asm_fail(a, root, "the provider sent an error event: %.200s", msg ? msg : "(no message)");
    }
    if (choices != NULL && !json_is_array(choices))
        return asm_fail(a, root, "malformed event: %s", "\"choices\" is not an array");
    keep_first(&a->id, json_object_get(root, "id"));
    keep_first(&a->created, json_object_get(root, "created"));
    keep_first(&a->model, json_object_get(root, "model"));
    keep_first(&a->fingerprint, json_object_get(root, "system_fingerprint"));
    usage = json_object_get(root, "usage");
    if (json_is_object(usage)) {
        json_decref(a->usage);
        a->usage = json_incref(usage);
    }
    json_array_foreach(choices, i, choice) {
        json_t *index = json_object_get(choice, "index");
        json_t *delta = json_object_get(choice, "delta");
        json_t *text = NULL;
        relay_choice_t *c;
        size_t at = i;

        if (!json_is_object(choice))
            return asm_fail(a, root, "malformed event: %s", "a choice is not an object");
        if (json_is_integer(index)) {
            if (json_integer_value(index) < 0 || json_integer_value(index) >= RELAY_MAX_CHOICES)
                return asm_fail(a, root, "malformed event: %s", "choice index out of range");
            at = (size_t)json_integer_value(index);
        }
        if (a->kind == RELAY_KIND_AUTO) {
            const char *object = json_string_value(json_object_get(root, "object"));
            a->kind = json_is_object(delta) || (object && strcmp(object, "chat.completion.chunk") == 0)
                    ? RELAY_KIND_CHAT : RELAY_KIND_TEXT;
        }
        c = asm_choice(a, at);
        if (c == NULL)
            return asm_fail(a, root, "%s", at >= RELAY_MAX_CHOICES ? "malformed event: choice index out of range"
                                                                      : "out of memory");
        if (a->kind == RELAY_KIND_CHAT) {
            if (json_is_object(delta)) {
                text = json_object_get(delta, "content");
                if (!replace_string(&c->role, json_object_get(delta, "role")))
                    return asm_fail(a, root, "%s", "out of memory");
            }
        } else {
            text = json_object_get(choice, "text");
        }
        if (json_is_string(text)) {
            size_t n = json_string_length(text);
            if (n > a->limit - a->bytes) {
                snprintf(a->error, sizeof a->error, "the assembled response is larger than the %zu-byte limit",
                         a->limit);
                a->too_large = true;
                json_decref(root);
                return RELAY_EV_ERROR;
            }
            buf_append(&c->text, json_string_value(text), n);
            if (c->text.oom)
                return asm_fail(a, root, "%s", "out of memory");
            a->bytes += n;
        }
        if (json_is_string(json_object_get(choice, "finish_reason"))) {
            if (!replace_string(&c->finish_reason, json_object_get(choice, "finish_reason")))
                return asm_fail(a, root, "%s", "out of memory");
            a->finished = true;
        }
    }
    json_decref(root);
    return RELAY_EV_CHUNK;
}

static json_t *string_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

char *relay_asm_result(const relay_asm_t *a, size_t *len)
{
    json_t *root = json_object();
    json_t *choices = json_array();
    bool chat = a->kind != RELAY_KIND_TEXT;
    size_t n = a->nchoices > 0 ? a->nchoices : 1;
    char *text = NULL;
    int rc = 0;

    if (root == NULL || choices == NULL) {
        json_decref(root);
        json_decref(choices);
        return NULL;
    }
    if (a->id)
        rc |= json_object_set(root, "id", a->id);
    rc |= json_object_set_new(root, "object", json_string(chat ? "chat.completion" : "text_completion"));
    if (a->created)
        rc |= json_object_set(root, "created", a->created);
    if (a->model)
        rc |= json_object_set(root, "model", a->model);
    if (a->fingerprint)
        rc |= json_object_set(root, "system_fingerprint", a->fingerprint);
    for (size_t i = 0; i < n; i++) {
        const relay_choice_t *c = i < a->nchoices ? &a->choices[i] : NULL;
        const char *content = c && c->text.data ? c->text.data : "";
        size_t clen = c ? c->text.len : 0;
        json_t *choice;

        if (chat)
            choice = json_pack("{s:I, s:{s:s, s:s%}, s:o}", "index", (json_int_t)i, "message", "role",
                               c && c->role ? c->role : "assistant", "content", content, clen,
                               "finish_reason", string_or_null(c ? c->finish_reason : NULL));
        else
            choice = json_pack("{s:I, s:s%, s:o}", "index", (json_int_t)i, "text", content, clen,
                               "finish_reason", string_or_null(c ? c->finish_reason : NULL));
        if (choice == NULL || json_array_append_new(choices, choice) != 0) {
            rc = -1;
            break;
        }
    }
    rc |= json_object_set_new(root, "choices", choices);
    if (a->usage)
        rc |= json_object_set(root, "usage", a->usage);
    if (rc == 0)
        text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (text != NULL && len != NULL)
        *len = strlen(text);
    return text;
}

/* ------------------------------------------------------------------ relay */

void relay_job_init(relay_job_t *s, relay_kind_t kind, size_t limit, relay_emit_fn emit, void *ctx)
{
    memset(s, 0, sizeof *s);
    relay_sse_init(&s->sse, limit);
    relay_asm_init(&s->as, kind, limit);
    s->emit = emit;
    s->emit_ctx = ctx;
}

void relay_job_free(relay_job_t *s)
{
    relay_sse_free(&s->sse);
    relay_asm_free(&s->as);
}

static bool job_fail(relay_job_t *s, const char *why)
{
    s->failed = true;
    snprintf(s->error, sizeof s->error, "%s", why);
    return false;
}

static bool job_event(void *ctx, const char *data, size_t len)
{
    relay_job_t *s = ctx;
    size_t off = 0;

    if (s->done)
        return true;
    switch (relay_asm_add(&s->as, data, len)) {
    case RELAY_EV_DONE:
        s->done = true;
        return true;
    case RELAY_EV_SKIP:
        return true;
    case RELAY_EV_ERROR:
        s->too_large = s->as.too_large;
        return job_fail(s, s->as.error);
    case RELAY_EV_CHUNK:
        break;
    }
    /* The chunk parsed as JSON, so it is valid UTF-8: pieces cut at sequence
     * boundaries are valid text too. */
    do {
        size_t n = relay_piece_len(data + off, len - off, RELAY_PIECE_MAX);
        bool more = off + n < len;

        if (s->emit != NULL && s->emit(s->emit_ctx, s->seq, more, data + off, n) != 0)
            return job_fail(s, "the daemon could not queue the chunk (out of memory)");
        s->seq++;
        off += n;
    } while (off < len);
    s->events++;
    return true;
}

bool relay_job_feed(relay_job_t *s, const char *bytes, size_t n)
{
    char why[160];

    if (s->failed)
        return false;
    if (s->done)
        return true;                 /* the rest of the body is not read into anything */
    switch (relay_sse_feed(&s->sse, bytes, n, job_event, s)) {
    case RELAY_SSE_OK:
        return true;
    case RELAY_SSE_STOPPED:
        return false;
    case RELAY_SSE_TOO_LARGE:
        s->too_large = true;
        snprintf(why, sizeof why, "an event is larger than the %zu-byte limit", s->sse.limit);
        return job_fail(s, why);
    case RELAY_SSE_OOM:
        return job_fail(s, "out of memory reading the event stream");
    }
    return false;
}

bool relay_job_clean(const relay_job_t *s, bool body_complete)
{
    if (s->done)
        return true;
    return !s->failed && body_complete && s->as.finished;
}
