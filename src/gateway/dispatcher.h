/* dispatcher: the one thread that owns every PostgreSQL connection of the gateway:
 * a LISTEN connection on the gateway's reply channel and a few worker connections.
 * It folds pending requests into batched calls, matches reply notifications to
 * waiting requests, runs their deadlines, and reconnects with backoff. */
#ifndef PGD_GATEWAY_DISPATCHER_H
#define PGD_GATEWAY_DISPATCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "call.h"

/* Every async job is submitted with this reply channel, which every gateway LISTENs
 * on, so a GET /v1/jobs/{id}?wait=N long-poll wakes on any gateway. */
#define DISPATCHER_JOBS_CHANNEL "dispatch_r_jobs"

typedef struct dispatcher dispatcher_t;

typedef struct {
    const char *conninfo;      /* libpq URL or key=value; "" for the PG* environment */
    int connections;           /* worker connections (the LISTEN connection is one more) */
    bool require_api_key;      /* calls carrying api_key are checked first */
    int64_t key_cache_ms;      /* how long a key found valid is trusted */
    int schema_version;        /* /readyz needs dispatch.schema_version() >= this */
    bool durable_submits;      /* every submit waits for the disk, also a waiting request's */
} dispatcher_options_t;

/* A dispatcher with a fresh, unique reply channel; the thread is not running yet.
 * NULL with err filled on failure. */
dispatcher_t *dispatcher_new(const dispatcher_options_t *opt, char *err, size_t errlen);

/* Start the thread; it connects (and keeps reconnecting) on its own. */
int dispatcher_start(dispatcher_t *d, char *err, size_t errlen);

/* Hand a call over (thread-safe). The caller's connection must already be suspended:
 * the call comes back exactly once through c->resume, possibly before this returns. */
void dispatcher_enqueue(dispatcher_t *d, call_t *c);

/* Ask for dispatch.cancel(id, reason) (thread-safe; reason must be a static string).
 * created_us is the call's: a job stored without waiting for the disk is cancelled only
 * while its id still names it (0: stored on disk, no such check). */
void dispatcher_cancel_job(dispatcher_t *d, int64_t id, int64_t created_us, const char *reason);

/* Connected and listening: new requests can be served (thread-safe). */
bool dispatcher_db_ready(const dispatcher_t *d);

/* Requests handed over and not yet given back (thread-safe). */
long dispatcher_outstanding(const dispatcher_t *d);

/* Shutdown, step 1: long-polls answer now with the current state; everything else
 * goes on normally. */
void dispatcher_begin_drain(dispatcher_t *d);

/* Shutdown, step 2: every call still held is answered 503 (a waiting request's job
 * is cancelled), in-flight statements get up to 2 s, connections close, the thread
 * ends. Calls enqueued afterwards are answered 503 at once. */
void dispatcher_stop(dispatcher_t *d);

/* Free a stopped (or never started) dispatcher. */
void dispatcher_free(dispatcher_t *d);

const char *dispatcher_reply_channel(const dispatcher_t *d);

/* A reply channel name for this process: "dispatch_r_<host hash>_<pid>_<random>",
 * lower-case [a-z0-9_], at most 63 characters. */
void dispatcher_make_channel(char *out, size_t len);

#endif
