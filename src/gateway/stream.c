/* stream: piece payloads and their tokens, reordering, event joining and SSE
 * framing of relayed pieces, and the buffer between the dispatcher (writer) and
 * libmicrohttpd's content reader. */
#include "stream.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "errors.h"

/* ---- payloads ----------------------------------------------------------------------- */

static bool parse_uint(const char **pp, char stop, uint64_t max, uint64_t *out)
{
    const char *p = *pp;
    uint64_t v = 0;
    size_t digits = 0;

    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        if (v > (max - (uint64_t)(*p - '0')) / 10)
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (digits == 0 || *p != stop)
        return false;
    *pp = p + 1;
    *out = v;
    return true;
}

bool stream_parse_payload(const char *payload, stream_payload_t *out)
{
    const char *p = payload, *token;
    uint64_t v_id, v_seq;
    bool more;

    if (!p || *p++ != 'S')
        return false;
    if (!parse_uint(&p, ':', INT64_MAX, &v_id) || v_id == 0)
        return false;
    if (!parse_uint(&p, ':', INT32_MAX, &v_seq))
        return false;
    if ((*p != 'm' && *p != 'e') || p[1] != ':')
        return false;
    more = *p == 'm';
    p += 2;
    token = p;
    while (((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')) &&
           (size_t)(p - token) < STREAM_TOKEN_MAX)
        p++;
    if (*p != ':')
        return false;
    out->id = (int64_t)v_id;
    out->seq = (uint32_t)v_seq;
    out->more = more;
    out->token = token;
    out->token_len = (size_t)(p - token);
    out->data = p + 1;
    out->len = strlen(p + 1);
    return true;
}

/* ---- tokens --------------------------------------------------------------------------- */

bool stream_token_make(char out[STREAM_TOKEN_LEN + 1])
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char rnd[64];
    size_t n = 0;

    out[0] = '\0';
    while (n < STREAM_TOKEN_LEN) {
        ssize_t got = getrandom(rnd, sizeof rnd, 0);

        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            goto fail;
        /* 248 = 4 * 62: the bytes above are thrown away, so every symbol is as likely. */
        for (ssize_t i = 0; i < got && n < STREAM_TOKEN_LEN; i++)
            if (rnd[i] < 248)
                out[n++] = alphabet[rnd[i] % 62];
    }
    out[n] = '\0';
    explicit_bzero(rnd, sizeof rnd);
    return true;
fail:
    explicit_bzero(rnd, sizeof rnd);
    out[0] = '\0';
    return false;
}

bool stream_token_equal(const char *ours, const char *token, size_t len)
{
    unsigned char diff = 0;

    /* The length is no secret (ours is always STREAM_TOKEN_LEN); the bytes are. */
    if (!ours || !token || ours[0] == '\0' || len != STREAM_TOKEN_LEN || strlen(ours) != STREAM_TOKEN_LEN)
        return false;
    for (size_t i = 0; i < STREAM_TOKEN_LEN; i++)
        diff |= (unsigned char)(ours[i] ^ token[i]);
    return diff == 0;
}

/* ---- framing ------------------------------------------------------------------------ */

void stream_frame_event(buf_t *out, const char *data, size_t len)
{
    size_t start = 0;

    buf_append_str(out, "data: ");
    for (size_t i = 0; i < len; i++) {
        if (data[i] != '\n' && data[i] != '\r')
            continue;
        buf_append(out, data + start, i - start);
        buf_append_str(out, "\ndata: ");
        if (data[i] == '\r' && i + 1 < len && data[i + 1] == '\n')
            i++;
        start = i + 1;
    }
    buf_append(out, data + start, len - start);
    buf_append_str(out, "\n\n");
}

void stream_frame_done(buf_t *out)
{
    buf_append_str(out, "data: [DONE]\n\n");
}

void stream_frame_error(buf_t *out, const char *message, const char *type, const char *code)
{
    char *body = errors_body(message, type, code);

    if (!body) {
        out->oom = true;
        return;
    }
    stream_frame_event(out, body, strlen(body));
    free(body);
}

/* chat.completion -> chat.completion.chunk: each choice's message becomes its delta. */
static json_t *stream_chunk_of(json_t *doc)
{
    json_t *chunk = json_deep_copy(doc);
    json_t *choices = json_object_get(chunk, "choices");
    size_t i;
    json_t *choice;

    if (!chunk)
        return NULL;
    json_object_set_new(chunk, "object", json_string("chat.completion.chunk"));
    json_array_foreach(choices, i, choice) {
        json_t *message = json_object_get(choice, "message");

        if (message) {
            json_object_set(choice, "delta", message);
            json_object_del(choice, "message");
        }
    }
    return chunk;
}

void stream_frame_result(buf_t *out, const char *result)
{
    json_t *doc = result ? json_loads(result, JSON_DECODE_ANY, NULL) : NULL;
    const char *object = json_string_value(json_object_get(doc, "object"));

    if (object && strcmp(object, "chat.completion") == 0 && json_is_array(json_object_get(doc, "choices"))) {
        json_t *chunk = stream_chunk_of(doc);
        char *text = chunk ? json_dumps(chunk, JSON_COMPACT) : NULL;

        if (text)
            stream_frame_event(out, text, strlen(text));
        else
            out->oom = true;
        free(text);
        json_decref(chunk);
    } else if (result) {
        stream_frame_event(out, result, strlen(result));
    }
    json_decref(doc);
    stream_frame_done(out);
}

/* ---- reassembly ----------------------------------------------------------------------- */

void stream_rx_init(stream_rx_t *rx)
{
    memset(rx, 0, sizeof *rx);
}

void stream_rx_reset(stream_rx_t *rx)
{
    if (rx->ring) {
        for (size_t i = 0; i < STREAM_WINDOW; i++)
            free(rx->ring[i].data);
        free(rx->ring);
    }
    buf_free(&rx->event);
    stream_rx_init(rx);
}

static void stream_rx_emit(stream_rx_t *rx, const char *data, size_t len, buf_t *out)
{
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        rx->saw_done = true;
        return;
    }
    stream_frame_event(out, data, len);
    rx->events++;
}

/* The piece that is next in order. */
static stream_status_t stream_rx_take(stream_rx_t *rx, bool more, const char *data, size_t len, buf_t *out)
{
    if (more || rx->in_event) {
        if (rx->event.len + len > STREAM_MAX_EVENT_BYTES)
            return STREAM_TOO_BIG;
        buf_append(&rx->event, data, len);
        if (rx->event.oom)
            return STREAM_NO_MEMORY;
        if (more) {
            rx->in_event = true;
            return STREAM_OK;
        }
        stream_rx_emit(rx, rx->event.data ? rx->event.data : "", rx->event.len, out);
        rx->in_event = false;
        buf_reset(&rx->event);
        return STREAM_OK;
    }
    stream_rx_emit(rx, data, len, out);
    return STREAM_OK;
}

stream_status_t stream_rx_feed(stream_rx_t *rx, uint32_t seq, bool more, const char *data, size_t len,
                               buf_t *out)
{
    stream_status_t st;

    if (seq < rx->next)
        return STREAM_REPEAT;
    if (seq - rx->next >= STREAM_WINDOW)
        return STREAM_TOO_FAR;
    if (seq > rx->next) {
        stream_piece_t *slot;

        if (!rx->ring) {
            rx->ring = calloc(STREAM_WINDOW, sizeof *rx->ring);
            if (!rx->ring)
                return STREAM_NO_MEMORY;
        }
        slot = &rx->ring[seq % STREAM_WINDOW];
        if (slot->have)
            return STREAM_REPEAT;
        if (rx->pending_bytes + len > STREAM_MAX_PENDING_BYTES)
            return STREAM_TOO_FAR;
        slot->data = malloc(len + 1);
        if (!slot->data)
            return STREAM_NO_MEMORY;
        memcpy(slot->data, data, len);
        slot->data[len] = '\0';
        slot->len = len;
        slot->more = more;
        slot->have = true;
        rx->npending++;
        rx->pending_bytes += len;
        return STREAM_OK;
    }
    st = stream_rx_take(rx, more, data, len, out);
    if (st != STREAM_OK)
        return st;
    rx->next++;
    while (rx->npending > 0) {
        stream_piece_t *slot = &rx->ring[rx->next % STREAM_WINDOW];
        stream_piece_t p;

        if (!slot->have)
            break;
        p = *slot;
        memset(slot, 0, sizeof *slot);
        rx->npending--;
        rx->pending_bytes -= p.len;
        st = stream_rx_take(rx, p.more, p.data, p.len, out);
        free(p.data);
        if (st != STREAM_OK)
            return st;
        rx->next++;
    }
    return STREAM_OK;
}

bool stream_rx_complete(const stream_rx_t *rx)
{
    return rx->npending == 0 && !rx->in_event;
}

/* ---- the shared object ------------------------------------------------------------------ */

gw_stream_t *stream_new(void)
{
    gw_stream_t *s = calloc(1, sizeof *s);

    if (!s)
        return NULL;
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        return NULL;
    }
    s->refs = 1;
    stream_rx_init(&s->rx);
    return s;
}

void stream_retain(gw_stream_t *s)
{
    pthread_mutex_lock(&s->mu);
    s->refs++;
    pthread_mutex_unlock(&s->mu);
}

void stream_release(gw_stream_t *s)
{
    int left;

    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    left = --s->refs;
    pthread_mutex_unlock(&s->mu);
    if (left > 0)
        return;
    stream_rx_reset(&s->rx);
    buf_free(&s->out);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* Under mu: whether the reader waits to be resumed (then it no longer does). */
static bool stream_take_wake(gw_stream_t *s)
{
    if (!s->suspended || s->gone)
        return false;
    s->suspended = false;
    return true;
}

bool stream_push(gw_stream_t *s, const char *data, size_t len)
{
    bool wake = false, ok = true;

    pthread_mutex_lock(&s->mu);
    if (s->ended) {
        ok = false;
    } else if (s->out.len - s->out_off + len > STREAM_MAX_OUT_BYTES) {
        ok = false;
    } else {
        buf_append(&s->out, data, len);
        ok = !s->out.oom;
        wake = ok && stream_take_wake(s);
    }
    pthread_mutex_unlock(&s->mu);
    /* The connection stays suspended until this resume: it cannot be closed meanwhile. */
    if (wake)
        s->resume(s->ctx);
    return ok;
}

void stream_end(gw_stream_t *s, const char *data, size_t len, bool abort)
{
    bool wake;

    pthread_mutex_lock(&s->mu);
    if (s->ended) {
        pthread_mutex_unlock(&s->mu);
        return;
    }
    if (len > 0) {
        buf_append(&s->out, data, len);
        if (s->out.oom)
            abort = true;
    }
    s->ended = true;
    s->abort = abort;
    wake = stream_take_wake(s);
    pthread_mutex_unlock(&s->mu);
    if (wake)
        s->resume(s->ctx);
}

bool stream_is_gone(gw_stream_t *s)
{
    bool gone;

    pthread_mutex_lock(&s->mu);
    gone = s->gone;
    pthread_mutex_unlock(&s->mu);
    return gone;
}

void stream_attach(gw_stream_t *s, void (*suspend)(void *ctx), void (*resume)(void *ctx), void *ctx)
{
    pthread_mutex_lock(&s->mu);
    s->suspend = suspend;
    s->resume = resume;
    s->ctx = ctx;
    pthread_mutex_unlock(&s->mu);
}

ssize_t stream_take(gw_stream_t *s, char *buf, size_t max)
{
    ssize_t n;

    pthread_mutex_lock(&s->mu);
    if (s->out.len > s->out_off && !(s->abort && s->out.oom)) {
        size_t avail = s->out.len - s->out_off;

        if (avail > max)
            avail = max;
        memcpy(buf, s->out.data + s->out_off, avail);
        s->out_off += avail;
        if (s->out_off == s->out.len) {
            buf_reset(&s->out);
            s->out_off = 0;
        }
        n = (ssize_t)avail;
    } else if (s->ended) {
        n = s->abort ? STREAM_TAKE_ABORT : STREAM_TAKE_END;
    } else {
        s->suspended = true;
        if (s->suspend)
            s->suspend(s->ctx);
        n = STREAM_TAKE_WAIT;
    }
    pthread_mutex_unlock(&s->mu);
    return n;
}

bool stream_detach(gw_stream_t *s)
{
    bool ended;

    pthread_mutex_lock(&s->mu);
    s->gone = true;
    s->suspended = false;
    ended = s->ended;
    pthread_mutex_unlock(&s->mu);
    return ended;
}
