/* libFuzzer target: the daemon's Server-Sent Events relay (daemon/relay.c): the
 * incremental SSE parser, the assembler of a streamed OpenAI answer, and the cutting
 * of events into notification pieces, on arbitrary provider bodies fed in arbitrary
 * slices.
 *
 * Input: byte 0 the slice length (1..256; every slice boundary is a place where a
 * line, a CRLF or a UTF-8 sequence can be split), byte 1 the kind (auto, chat, text)
 * and a small or large size limit; the rest is the body.
 *
 * Oracles: pieces are numbered from 0 without gaps, 1..RELAY_PIECE_MAX bytes, valid
 * UTF-8 (they become pg_notify payloads), with no NUL; an event's last piece has
 * more = false; the assembled result, when the stream ended cleanly, is a JSON
 * object. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relay.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
    uint32_t next_seq;
    bool in_event;    /* the last piece had more = true */
} emit_state_t;

/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned cp;

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + k >= n)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

static int emit(void *ctx, uint32_t seq, bool more, const char *d, size_t len)
{
    emit_state_t *e = ctx;

    if (seq != e->next_seq) {
        fprintf(stderr, "piece seq %u, expected %u\n", seq, e->next_seq);
        abort();
    }
    if (len < 1 || len > RELAY_PIECE_MAX) {
        fprintf(stderr, "piece of %zu bytes\n", len);
        abort();
    }
    if (memchr(d, '\0', len) != NULL || !utf8_valid((const unsigned char *)d, len)) {
        fprintf(stderr, "piece is not NUL-free valid UTF-8: %.*s\n", (int)len, d);
        abort();
    }
    e->next_seq++;
    e->in_event = more;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    relay_job_t job;
    emit_state_t e = {0, false};
    size_t slice, off;
    relay_kind_t kind;
    size_t limit;
    bool ok = true;

    if (size < 2)
        return 0;
    slice = (size_t)data[0] + 1;
    kind = (relay_kind_t)(data[1] % 3);
    limit = (data[1] & 4) ? 64 : (1u << 20);
    relay_job_init(&job, kind, limit, emit, &e);
    for (off = 2; off < size && ok; off += slice) {
        size_t n = size - off < slice ? size - off : slice;

        ok = relay_job_feed(&job, (const char *)data + off, n);
    }
    if (!ok && !job.failed && !job.done) {
        /* A false return means the stream must stop; it says why. */
        if (job.error[0] == '\0')
            abort();
    }
    if (memchr(job.error, '\0', sizeof job.error) == NULL)
        abort();
    if (job.events > 0 && e.in_event) {
        fprintf(stderr, "the last piece of the last event had more = true\n");
        abort();
    }
    if (relay_job_clean(&job, true)) {
        size_t len = 0;
        char *result = relay_asm_result(&job.as, &len);

        if (result) {
            json_t *doc = json_loadb(result, len, 0, NULL);

            if (!json_is_object(doc)) {
                fprintf(stderr, "assembled result is not a JSON object: %.*s\n", (int)len, result);
                abort();
            }
            json_decref(doc);
            free(result);
        }
    }
    /* relay_requested and relay_piece_len on the raw body too. */
    (void)relay_requested((const char *)data + 2, size - 2);
    if (relay_piece_len((const char *)data + 2, size - 2, 7) > 7 && size - 2 > 7)
        abort();
    relay_job_free(&job);
    return 0;
}
