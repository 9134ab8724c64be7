/* relay: the daemon's side of "stream": true, without I/O: whether a payload asks
 * for a stream, an incremental Server-Sent Events parser, the assembler that turns
 * the streamed chunks back into one non-stream response, and the per-job relay that
 * ties them together and cuts events into pieces that fit a notification. */
#ifndef PGD_DAEMON_RELAY_H
#define PGD_DAEMON_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "buf.h"

/* Largest piece of an event's data that dispatch.stream accepts (bytes). */
#define RELAY_PIECE_MAX 7000

/* True when payload is a JSON object whose top-level "stream" is the boolean true. */
bool relay_requested(const char *payload, size_t len);

/* Length of the first piece of s[0..len) of at most max bytes that does not cut a
 * UTF-8 sequence in two (len itself when len <= max). */
size_t relay_piece_len(const char *s, size_t len, size_t max);

/* ------------------------------------------------------------------ SSE parser */

/* Incremental parser of text/event-stream (the WHATWG rules for the data field):
 * lines end with CRLF, LF or CR (also when split between two feeds); a blank line
 * ends an event; "data:" lines are joined with \n; comments (":...") and other
 * fields are ignored; a leading BOM is skipped; an event not ended by a blank line
 * when the body ends is dropped. Memory: the pending line plus the pending event's
 * data never exceed limit bytes. */
typedef struct {
    buf_t line;
    buf_t data;
    bool has_data;           /* the pending event has a data field */
    bool after_cr;           /* the last byte fed was CR: an LF right after it belongs to it */
    bool first_line_done;
    size_t limit;
} relay_sse_t;

typedef enum {
    RELAY_SSE_OK = 0,
    RELAY_SSE_STOPPED,             /* the event callback asked to stop */
    RELAY_SSE_TOO_LARGE,           /* a line or event passed the limit */
    RELAY_SSE_OOM,
} relay_sse_status_t;

/* One complete event's data (NUL-terminated at data[len]); false stops the feed. */
typedef bool (*relay_sse_event_fn)(void *ctx, const char *data, size_t len);

void relay_sse_init(relay_sse_t *p, size_t limit);
void relay_sse_free(relay_sse_t *p);
relay_sse_status_t relay_sse_feed(relay_sse_t *p, const char *bytes, size_t n, relay_sse_event_fn fn, void *ctx);

/* ------------------------------------------------------------------ assembler */

typedef enum {
    RELAY_KIND_AUTO = 0,    /* from the first chunk: choices[].delta or object "chat.completion.chunk" → chat */
    RELAY_KIND_CHAT,        /* /v1/chat/completions: delta.content */
    RELAY_KIND_TEXT,        /* /v1/completions: text */
} relay_kind_t;

typedef struct {
    buf_t text;
    char *role;
    char *finish_reason;
} relay_choice_t;

/* Collects an OpenAI stream into the response a non-stream call would have given:
 * id, created and model from the first chunk that has them, the content of each
 * choice concatenated, the last finish_reason of each choice, the last usage seen. */
typedef struct {
    relay_kind_t kind;
    size_t limit;            /* content bytes kept at most, over all choices */
    size_t bytes;
    json_t *id, *created, *model, *fingerprint, *usage;
    relay_choice_t *choices;
    size_t nchoices;
    bool finished;           /* some choice had a finish_reason */
    bool too_large;          /* the content passed the limit */
    char error[256];         /* why the last relay_asm_add returned RELAY_EV_ERROR */
} relay_asm_t;

typedef enum {
    RELAY_EV_CHUNK = 0,     /* a chunk: relay it */
    RELAY_EV_DONE,          /* "[DONE]": the stream's end (not relayed) */
    RELAY_EV_SKIP,          /* empty data: nothing to relay */
    RELAY_EV_ERROR,         /* not a chunk (error filled): the stream cannot go on */
} relay_ev_t;

void relay_asm_init(relay_asm_t *a, relay_kind_t kind, size_t limit);
void relay_asm_free(relay_asm_t *a);
relay_ev_t relay_asm_add(relay_asm_t *a, const char *data, size_t len);
/* The assembled response as compact JSON (malloc'ed, NUL-terminated), NULL on OOM. */
char *relay_asm_result(const relay_asm_t *a, size_t *len);

/* ------------------------------------------------------------------ relay */

/* Receives one piece of an event to relay: seq counts from 0 per job; more is true
 * on every piece of an event but its last. data is valid UTF-8, at most
 * RELAY_PIECE_MAX bytes. Returns 0, or -1 when it could not be queued. */
typedef int (*relay_emit_fn)(void *ctx, uint32_t seq, bool more, const char *data, size_t len);

/* One streaming job's response: bytes in, pieces out, the assembled response at
 * the end. Events that are not chunks end the stream with an error. */
typedef struct {
    relay_sse_t sse;
    relay_asm_t as;
    relay_emit_fn emit;
    void *emit_ctx;
    uint32_t seq;            /* the next piece's seq */
    size_t events;           /* events relayed */
    bool done;               /* "[DONE]" arrived: what follows is ignored */
    bool failed;
    bool too_large;
    char error[300];         /* why it failed */
} relay_job_t;

void relay_job_init(relay_job_t *s, relay_kind_t kind, size_t limit, relay_emit_fn emit, void *ctx);
void relay_job_free(relay_job_t *s);
/* Feeds body bytes. False when the stream must stop now (failed, error filled). */
bool relay_job_feed(relay_job_t *s, const char *bytes, size_t n);
/* Ended cleanly: "[DONE]" arrived, or the body ended (body_complete) after a
 * finish_reason, and nothing failed before that. */
bool relay_job_clean(const relay_job_t *s, bool body_complete);

#endif
