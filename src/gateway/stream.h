/* stream: the gateway half of "stream": true. A daemon relays the provider's
 * Server-Sent Events as notifications on the job's reply channel,
 * "S<job id>:<seq>:<m|e>:<stream token>:<data>" (sql/002_streaming.sql). Any
 * database role may NOTIFY any channel, so each stream request gets a random token
 * (stream_token_make), sent as the submit element's "stream_token" and echoed by
 * the database in every genuine piece; a piece without it is dropped. Pieces are put back
 * in sequence order (a bounded window), joined into whole events ('m' = the event
 * continues in the next piece) and framed as SSE ("data: ...\n\n") into an output
 * buffer that the HTTP thread hands to libmicrohttpd as the client can take it.
 *
 * Threads: the dispatcher thread feeds (rx, shadow) and writes the output; the HTTP
 * thread reads it. The output, the end marks and the suspend/resume handshake are
 * behind the object's mutex. The object is reference-counted: the HTTP request
 * holds one reference for its whole life, the dispatcher one while it relays. */
#ifndef PGD_GATEWAY_STREAM_H
#define PGD_GATEWAY_STREAM_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "call.h"

#define STREAM_WINDOW 256u                        /* pieces that may wait for a missing one */
#define STREAM_MAX_PENDING_BYTES (1024u * 1024u)  /* bytes those may hold */
#define STREAM_MAX_EVENT_BYTES (4u * 1024u * 1024u) /* one event joined from 'm' pieces */
#define STREAM_MAX_OUT_BYTES (8u * 1024u * 1024u) /* framed, not yet taken by the client */
#define STREAM_TOKEN_LEN 24u                      /* ours: letters and digits, ~143 random bits */
#define STREAM_TOKEN_MAX 64u                      /* the longest dispatch.submit_many takes */

/* ---- pure parts (unit-tested) --------------------------------------------------- */

/* One stream piece notification; token and data point into the payload. */
typedef struct {
    int64_t id;                /* > 0 */
    uint32_t seq;
    bool more;                 /* 'm': the event continues in the next piece */
    const char *token;         /* 0..STREAM_TOKEN_MAX letters and digits (not NUL-terminated) */
    size_t token_len;          /* 0: the job has no token, so the piece is not for a stream of ours */
    const char *data;          /* to the payload's end */
    size_t len;
} stream_payload_t;

/* "S<id>:<seq>:<m|e>:<token>:<data>" -> its fields. False for anything else (an
 * ids-only payload, a malformed one, the old format without a token). */
bool stream_parse_payload(const char *payload, stream_payload_t *out);

/* A fresh token: STREAM_TOKEN_LEN letters and digits from getrandom(2), unbiased,
 * NUL-terminated. False (out emptied) when the kernel gives no randomness. */
bool stream_token_make(char out[STREAM_TOKEN_LEN + 1]);
/* Whether a piece's token (len bytes, not NUL-terminated) is ours, a NUL-terminated
 * STREAM_TOKEN_LEN token. Constant time in the content; false when ours is empty. */
bool stream_token_equal(const char *ours, const char *token, size_t len);

/* SSE framing, appended to out. An event's data with line breaks becomes one
 * "data:" line per line, as the SSE format wants. */
void stream_frame_event(buf_t *out, const char *data, size_t len);
void stream_frame_done(buf_t *out);
/* data: {"error":{"message","type","code"}} */
void stream_frame_error(buf_t *out, const char *message, const char *type, const char *code);
/* A finished job's result (the assembled non-stream response) as an event stream,
 * for a stream request none of whose events could be relayed: a chat.completion
 * becomes one chat.completion.chunk (message -> delta); anything else is sent as
 * one event. Ends with [DONE]. */
void stream_frame_result(buf_t *out, const char *result);

typedef enum {
    STREAM_OK,         /* taken (framed, or kept until the missing pieces come) */
    STREAM_REPEAT,     /* this seq was taken already: the attempt started over */
    STREAM_TOO_FAR,    /* past the window, or the kept pieces would exceed their bytes */
    STREAM_TOO_BIG,    /* one event over STREAM_MAX_EVENT_BYTES */
    STREAM_NO_MEMORY,
} stream_status_t;

typedef struct {
    char *data;
    size_t len;
    bool more;
    bool have;
} stream_piece_t;

/* Reassembly of one attempt's pieces. */
typedef struct {
    uint32_t next;            /* the seq wanted next */
    stream_piece_t *ring;     /* STREAM_WINDOW slots, allocated when a piece comes early */
    size_t npending;          /* pieces kept in ring */
    size_t pending_bytes;
    buf_t event;              /* the event being joined from 'm' pieces */
    bool in_event;
    uint64_t events;          /* events framed */
    bool saw_done;            /* the provider's own [DONE] came through (not framed) */
} stream_rx_t;

void stream_rx_init(stream_rx_t *rx);
/* Frees what it holds and starts over at seq 0. */
void stream_rx_reset(stream_rx_t *rx);
/* Take one piece; every event it completes (with kept pieces that follow) is framed
 * into out. The provider's "[DONE]" is not framed: the gateway writes its own when
 * the job has succeeded. On an error nothing of this piece is kept. */
stream_status_t stream_rx_feed(stream_rx_t *rx, uint32_t seq, bool more, const char *data, size_t len,
                               buf_t *out);
/* Nothing missing: no piece waits for an earlier one and no event is half joined. */
bool stream_rx_complete(const stream_rx_t *rx);

/* ---- the shared object ---------------------------------------------------------- */

typedef enum {
    STREAM_TAKE_WAIT = 0,     /* nothing yet; the connection was suspended */
    STREAM_TAKE_END = -1,     /* all sent: finish the response */
    STREAM_TAKE_ABORT = -2,   /* close the connection without a clean end */
} stream_take_t;

typedef struct gw_stream {
    pthread_mutex_t mu;
    int refs;                      /* under mu */

    /* Dispatcher thread only. */
    char token[STREAM_TOKEN_LEN + 1]; /* set before the submit goes out; "" until then */
    stream_rx_t rx;
    call_t shadow;                 /* the waiter that relays once the headers went out */
    bool broken;                   /* before the first event: pieces unusable, answer from the result */

    /* Under mu. */
    buf_t out;
    size_t out_off;                /* bytes of out already taken */
    bool ended;                    /* nothing will follow what is in out */
    bool abort;                    /* ... and the connection is to be cut, not finished */
    bool suspended;                /* the reader suspended the connection for want of data */
    bool gone;                     /* the HTTP side is done with it: no more wakes */
    void (*suspend)(void *ctx);    /* set by stream_attach */
    void (*resume)(void *ctx);
    void *ctx;
} gw_stream_t;

/* A new stream with one reference (the caller's). NULL when out of memory. */
gw_stream_t *stream_new(void);
void stream_retain(gw_stream_t *s);
/* Drop a reference; the last one frees the stream. */
void stream_release(gw_stream_t *s);

/* Dispatcher side. Append framed bytes and wake the reader. False (nothing
 * appended) when the client has fallen STREAM_MAX_OUT_BYTES behind or memory ran out. */
bool stream_push(gw_stream_t *s, const char *data, size_t len);
/* Append the last bytes (may be none) and mark the end; abort cuts the connection
 * once the bytes before are gone. Wakes the reader. Only the first end counts. */
void stream_end(gw_stream_t *s, const char *data, size_t len, bool abort);
bool stream_is_gone(gw_stream_t *s);

/* HTTP side. Before the first stream_take: how to suspend and resume the
 * connection (called with the mutex held / after the dispatcher released it). */
void stream_attach(gw_stream_t *s, void (*suspend)(void *ctx), void (*resume)(void *ctx), void *ctx);
/* Copy up to max bytes: > 0 bytes copied, or a stream_take_t. STREAM_TAKE_WAIT means
 * the connection was suspended (under the mutex, so a push cannot slip between) and
 * will be resumed when there is more. */
ssize_t stream_take(gw_stream_t *s, char *buf, size_t max);
/* The request is over: no more wakes. Returns whether the stream had ended (the
 * dispatcher finished it) rather than being left by the client. */
bool stream_detach(gw_stream_t *s);

#endif
