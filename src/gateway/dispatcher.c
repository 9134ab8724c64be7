/* dispatcher: the gateway's database thread. Owns every PGconn (one LISTEN
 * connection, N worker connections driven with async libpq), the queues of calls
 * waiting for a round trip, the table of requests waiting for their job, the API
 * key cache and the stuck-queue state. Nothing here runs unless a request, a
 * notification, a deadline or a reconnect asks for it: an idle gateway is silent. */
#include "dispatcher.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "batch.h"
#include "buf.h"
#include "clock.h"
#include "db.h"
#include "errors.h"
#include "log.h"
#include "metrics.h"
#include "request.h"
#include "stream.h"
#include "waiters.h"

#define KEY_CACHE_MAX 256
#define RESULTS_MAX_IDS 10000
#define CANCELS_MAX_IDS 1000
#define RECENT_MAX 100000
#define STUCK_CHECK_MS 5000
#define STOP_GRACE_MS 2000
#define ORPHAN_MAX_BYTES (4u * 1024u * 1024u)

/* What a worker connection is doing; each value names what its calls/ids hold. */
typedef enum {
    OP_IDLE,     /* nothing in flight */
    OP_SUBMIT,   /* submit_many: calls = the batch in element order */
    OP_RESULTS,  /* results: ids = asked ids; calls = GET /v1/jobs calls among them */
    OP_CANCELS,  /* cancel: ids = jobs, reason = why; no calls */
    OP_CALL,     /* one misc call (models, status, metrics, ready, job cancel) */
    OP_AUTH,     /* check_api_key: calls whose keys are asked */
    OP_STUCK,    /* health(): stuck queues while requests wait; no calls */
} op_kind_t;

/* A growable list of job ids. */
typedef struct {
    int64_t *v;
    size_t n, cap;
} idvec_t;

typedef struct {
    PGconn *conn;
    op_kind_t op;
    call_t **calls;
    size_t ncalls, calls_cap;
    idvec_t ids;
    idvec_t created;         /* OP_CANCELS: each id's created_us, in the order of ids */
    const char *reason;      /* OP_CANCELS */
    bool async_channel;      /* OP_SUBMIT: the batch went to the jobs channel */
    bool no_flush;           /* OP_SUBMIT: committed without waiting for the disk */
    bool flushing;           /* output still queued in libpq: wait for POLLOUT */
    PGresult *res;           /* the op's first result; later ones are dropped */
} worker_t;

typedef struct {
    call_t *head, *tail;
    size_t n;
} queue_t;

typedef struct {
    int64_t id;
    int64_t created_us;      /* the waiter's created_us: 0 when its job was stored on disk */
    const char *reason;      /* static */
    bool solo;               /* its batch failed as a whole: send it alone */
} cancel_t;

typedef struct {
    char *key;
    int64_t expires_ms;
} key_entry_t;

/* A stream piece for a job nobody waits for (yet): kept while a submit is in flight,
 * since its job may be leased and streaming before its submit's result is read. */
typedef struct {
    int64_t id;
    char *payload;
} orphan_t;

struct dispatcher {
    dispatcher_options_t opt;
    char *conninfo;
    char channel[64];

    /* Shared with the HTTP threads. */
    pthread_mutex_t mu;
    queue_t inbox;
    cancel_t *inbox_cancels;
    size_t inbox_ncancels, inbox_cancels_cap;
    bool exited;             /* under mu: the thread is gone, answer inline */
    bool mutex_ready;
    int efd;
    atomic_bool stop;
    atomic_bool draining;
    atomic_bool db_ready;
    atomic_long outstanding;
    atomic_long nwaiting;
    pthread_t thread;
    bool started;

    /* Dispatcher thread only. */
    PGconn *listen;
    worker_t *workers;
    int nworkers;
    bool connected;
    bool ever_connected;
    backoff_t backoff;
    int64_t reconnect_at_ms;
    queue_t submits, jobs, gets, misc, auth;
    bool last_submit_async;
    idvec_t result_ids;
    cancel_t *cancels;
    size_t ncancels, cancels_cap;
    /* Notified ids nobody waited for, kept while the op that may yet claim them is in
     * flight: a job can finish (and be notified) before its submit's result, or a
     * long-poll's results row, has been read here. One of each op runs at a time. */
    idvec_t recent_submit, recent_results;
    orphan_t *orphans;
    size_t norphans, orphans_cap, orphan_bytes;
    call_t **scratch;        /* the stream waiters of one piece */
    size_t scratch_cap;
    int submits_in_flight;
    bool results_in_flight, auth_in_flight, stuck_in_flight;
    waiters_t waiters;
    char **stuck;
    size_t nstuck;
    int64_t next_stuck_check_ms;
    key_entry_t keys[KEY_CACHE_MAX];
    size_t nkeys;
    int nodes_allowed;       /* status may list dispatch.nodes(): -1 unknown, 0 no, 1 yes */
    int64_t stop_deadline_ms;
    struct pollfd *pfds;
    call_t **pcalls;
    size_t pcap;
};

/* ---- SQL ------------------------------------------------------------------ */

static const char SQL_SUBMIT[] =
    "SELECT idx, id, sqlstate, message FROM dispatch.submit_many($1::json, $2)";
/* The same for requests whose clients wait for the answer: the commit does not wait
 * for the disk (nothing was promised yet; the commit that settles the job flushes the
 * log this one is in), so it neither holds the database-wide notify lock through a
 * flush nor makes every stream piece behind it wait (bench B9). The transaction time
 * is the jobs' created_at: the job's identity if a crash loses it and its id comes
 * round again. */
static const char SQL_SUBMIT_NO_FLUSH[] =
    "SELECT idx, id, sqlstate, message, (extract(epoch FROM now()) * 1000000)::bigint "
    "FROM dispatch.submit_many($1::json, $2), set_config('synchronous_commit', 'off', true)";
static const char SQL_RESULTS[] =
    "SELECT id, state, attempt, result, error, model, "
    "floor(extract(epoch FROM created_at))::bigint, floor(extract(epoch FROM started_at))::bigint, "
    "floor(extract(epoch FROM finished_at))::bigint, "
    "extract(epoch FROM started_at - created_at)::float8, extract(epoch FROM finished_at - created_at)::float8, "
    "(extract(epoch FROM created_at) * 1000000)::bigint "
    "FROM dispatch.results($1::bigint[])";
/* A job stored without waiting for the disk is cancelled only while its id still names
 * it (the same created_at): after a crash of PostgreSQL the id can come round again as
 * another client's job. */
static const char SQL_CANCELS[] =
    "SELECT count(*) FROM (SELECT dispatch.cancel(c.id, $3) FROM unnest($1::bigint[], $2::bigint[]) AS c(id, created_us) "
    "WHERE c.created_us = 0 OR EXISTS (SELECT 1 FROM dispatch.results(ARRAY[c.id]) r "
    "WHERE r.created_at = timestamptz 'epoch' + c.created_us * interval '1 microsecond')) x";
static const char SQL_CANCEL_ONE[] = "SELECT dispatch.cancel($1::bigint, 'cancelled by client')";
static const char SQL_MODELS[] =
    "SELECT json_build_object('object', 'list', 'data', coalesce(json_agg(json_build_object("
    "'id', model, 'object', 'model', 'created', 0, 'owned_by', 'pgdispatch', "
    "'capacity', capacity, 'tier', tier, 'live_nodes', live_nodes) ORDER BY model), '[]'::json))::text "
    "FROM dispatch.models()";
static const char SQL_READY[] = "SELECT dispatch.schema_version()";
static const char SQL_METRICS[] =
    "SELECT name, labels::text, value FROM dispatch.metrics() ORDER BY name";
static const char SQL_STUCK[] =
    "SELECT subject FROM dispatch.health() WHERE kind = 'stuck_queue' ORDER BY subject";
static const char SQL_AUTH[] =
    "SELECT k, dispatch.check_api_key(k) FROM json_array_elements_text($1::json) AS k";

#define SQL_STATUS_HEAD \
    "WITH cap AS (SELECT * FROM dispatch.capacity()), h AS (SELECT * FROM dispatch.health()), " \
    "m AS (SELECT * FROM dispatch.metrics()) " \
    "SELECT json_build_object('object', 'status', 'gateway', $1::json, " \
    "'models', coalesce((SELECT json_agg(json_build_object('model', c.model, 'capacity', c.capacity, " \
    "'tier', c.tier, 'live_nodes', c.live_nodes, 'in_flight', c.in_flight, 'queued', c.queued, " \
    "'queue_limit', c.queue_limit, 'stuck', EXISTS (SELECT 1 FROM h WHERE h.kind = 'stuck_queue' " \
    "AND h.subject = c.model)) ORDER BY c.model) FROM cap c), '[]'::json), 'nodes', "
#define SQL_STATUS_NODES \
    "coalesce((SELECT json_agg(json_build_object('name', n.name, 'live', n.live, " \
    "'admin_state', n.admin_state, 'health', n.health, 'health_reason', n.health_reason, " \
    "'models', n.models, 'slots', n.slots, 'max_concurrency', n.max_concurrency, " \
    "'in_flight', n.in_flight, 'region', n.region, 'last_poll_started_at', n.last_poll_started_at, " \
    "'last_poll_completed_at', n.last_poll_completed_at, " \
    "'seconds_since_poll', extract(epoch FROM now() - n.last_poll_completed_at), " \
    "'stale', EXISTS (SELECT 1 FROM h WHERE h.kind = 'stale_node' AND h.subject = n.name)) " \
    "ORDER BY n.name) FROM dispatch.nodes() n), '[]'::json)"
#define SQL_STATUS_TAIL \
    ", 'node_counts', coalesce((SELECT json_object_agg(m.labels->>'state', m.value) FROM m " \
    "WHERE m.name = 'pgdispatch_nodes'), '{}'::json), " \
    "'stuck_queues', coalesce((SELECT json_agg(json_build_object('model', h.subject, 'detail', h.detail, " \
    "'since', h.since) ORDER BY h.subject) FROM h WHERE h.kind = 'stuck_queue'), '[]'::json), " \
    "'stale_nodes', coalesce((SELECT json_agg(json_build_object('node', h.subject, 'detail', h.detail, " \
    "'since', h.since) ORDER BY h.subject) FROM h WHERE h.kind = 'stale_node'), '[]'::json), " \
    "'degraded_nodes', coalesce((SELECT json_agg(json_build_object('node', h.subject, 'detail', h.detail, " \
    "'since', h.since) ORDER BY h.subject) FROM h WHERE h.kind = 'degraded_node'), '[]'::json), " \
    "'notification_queue_usage', (SELECT m.value FROM m WHERE m.name = 'pgdispatch_notification_queue_usage' " \
    "LIMIT 1), 'notification_backlog', (SELECT json_build_object('detail', h.detail, 'since', h.since) " \
    "FROM h WHERE h.kind = 'notification_backlog' LIMIT 1))::text, " \
    "coalesce((SELECT string_agg(h.subject, E'\\n' ORDER BY h.subject) FROM h " \
    "WHERE h.kind = 'stuck_queue'), '')"

static const char SQL_STATUS_WITH_NODES[] = SQL_STATUS_HEAD SQL_STATUS_NODES SQL_STATUS_TAIL;
/* For a role without EXECUTE on dispatch.nodes() (dispatch_gateway has none). */
static const char SQL_STATUS_NO_NODES[] = SQL_STATUS_HEAD "NULL::json" SQL_STATUS_TAIL;

/* The statements sent for requests, prepared on each worker connection when it
 * connects: sent as text, they were parsed and planned again at every call (perf of
 * B9: a seventh of the server's time). */
typedef enum { STMT_SUBMIT, STMT_SUBMIT_NO_FLUSH, STMT_RESULTS, STMT_CANCELS, STMT_COUNT } stmt_t;

static const struct {
    const char *name;
    const char *sql;
} PREPARED[STMT_COUNT] = {
    [STMT_SUBMIT] = { "gw_submit", SQL_SUBMIT },
    [STMT_SUBMIT_NO_FLUSH] = { "gw_submit_no_flush", SQL_SUBMIT_NO_FLUSH },
    [STMT_RESULTS] = { "gw_results", SQL_RESULTS },
    [STMT_CANCELS] = { "gw_cancels", SQL_CANCELS },
};

/* ---- small containers ------------------------------------------------------- */

static void queue_push(queue_t *q, call_t *c)
{
    c->next = NULL;
    if (q->tail)
        q->tail->next = c;
    else
        q->head = c;
    q->tail = c;
    q->n++;
}

static void queue_push_front(queue_t *q, call_t *c)
{
    c->next = q->head;
    q->head = c;
    if (!q->tail)
        q->tail = c;
    q->n++;
}

static call_t *queue_pop(queue_t *q)
{
    call_t *c = q->head;

    if (!c)
        return NULL;
    q->head = c->next;
    if (!q->head)
        q->tail = NULL;
    q->n--;
    c->next = NULL;
    return c;
}

static bool idvec_push(idvec_t *v, int64_t id)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int64_t *p = realloc(v->v, cap * sizeof *p);

        if (!p)
            return false;
        v->v = p;
        v->cap = cap;
    }
    v->v[v->n++] = id;
    return true;
}

static bool idvec_contains(const idvec_t *v, int64_t id)
{
    for (size_t i = 0; i < v->n; i++) {
        if (v->v[i] == id)
            return true;
    }
    return false;
}

static bool worker_add_call(worker_t *w, call_t *c)
{
    if (w->ncalls == w->calls_cap) {
        size_t cap = w->calls_cap ? w->calls_cap * 2 : 16;
        call_t **p = realloc(w->calls, cap * sizeof *p);

        if (!p)
            return false;
        w->calls = p;
        w->calls_cap = cap;
    }
    w->calls[w->ncalls++] = c;
    return true;
}

static bool worker_add_id(worker_t *w, int64_t id)
{
    return idvec_push(&w->ids, id);
}

/* ---- answering calls -------------------------------------------------------- */

/* Give a call back to the HTTP side. After this the dispatcher must not touch it. */
static void dispatcher_answer(dispatcher_t *d, call_t *c)
{
    if (c->reply.status == 0)
        errors_reply(&c->reply, 500, "internal_error", "the gateway lost track of this request");
    atomic_fetch_sub(&d->outstanding, 1);
    c->resume(c);
}

static void dispatcher_answer_error(dispatcher_t *d, call_t *c, int status, const char *code,
                                    const char *message)
{
    errors_reply(&c->reply, status, code, "%s", message);
    if (status == 503)
        c->reply.retry_after_s = 1;
    dispatcher_answer(d, c);
}

static void dispatcher_set_body(call_t *c, int status, char *body, const char *content_type)
{
    errors_reply_clear(&c->reply);
    if (!body) {
        errors_reply(&c->reply, 500, "internal_error", "out of memory");
        return;
    }
    c->reply.status = status;
    c->reply.body = body;
    c->reply.body_len = strlen(body);
    c->reply.content_type = content_type;
}

static void dispatcher_free_element(call_t *c)
{
    free(c->element);
    c->element = NULL;
    c->element_len = 0;
}

static const char MSG_DB_DOWN[] =
    "the gateway cannot reach its database right now (reconnecting); try again shortly";
static const char MSG_SHUTTING_DOWN[] = "the gateway is shutting down; try again on another instance";

/* ---- cross-thread entry points --------------------------------------------- */

static void dispatcher_wake(dispatcher_t *d)
{
    uint64_t one = 1;

    while (write(d->efd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

void dispatcher_enqueue(dispatcher_t *d, call_t *c)
{
    c->next = NULL;
    pthread_mutex_lock(&d->mu);
    if (d->exited) {
        pthread_mutex_unlock(&d->mu);
        errors_reply(&c->reply, 503, "shutting_down", "%s", MSG_SHUTTING_DOWN);
        c->resume(c);
        return;
    }
    queue_push(&d->inbox, c);
    atomic_fetch_add(&d->outstanding, 1);
    pthread_mutex_unlock(&d->mu);
    dispatcher_wake(d);
}

void dispatcher_cancel_job(dispatcher_t *d, int64_t id, int64_t created_us, const char *reason)
{
    pthread_mutex_lock(&d->mu);
    if (!d->exited) {
        if (d->inbox_ncancels == d->inbox_cancels_cap) {
            size_t cap = d->inbox_cancels_cap ? d->inbox_cancels_cap * 2 : 16;
            cancel_t *p = realloc(d->inbox_cancels, cap * sizeof *p);

            if (p) {
                d->inbox_cancels = p;
                d->inbox_cancels_cap = cap;
            }
        }
        if (d->inbox_ncancels < d->inbox_cancels_cap)
            d->inbox_cancels[d->inbox_ncancels++] = (cancel_t){id, created_us, reason, false};
    }
    pthread_mutex_unlock(&d->mu);
    dispatcher_wake(d);
}

bool dispatcher_db_ready(const dispatcher_t *d)
{
    return atomic_load(&d->db_ready);
}

long dispatcher_outstanding(const dispatcher_t *d)
{
    return atomic_load(&d->outstanding);
}

void dispatcher_begin_drain(dispatcher_t *d)
{
    atomic_store(&d->draining, true);
    dispatcher_wake(d);
}

const char *dispatcher_reply_channel(const dispatcher_t *d)
{
    return d->channel;
}

/* ---- cancels, stuck queues, key cache ---------------------------------------- */

static void dispatcher_push_cancel(dispatcher_t *d, int64_t id, int64_t created_us, const char *reason, bool solo)
{
    if (id <= 0)
        return;
    if (d->ncancels == d->cancels_cap) {
        size_t cap = d->cancels_cap ? d->cancels_cap * 2 : 16;
        cancel_t *p = realloc(d->cancels, cap * sizeof *p);

        if (!p) {
            log_error("cancel_dropped", "job=%lld reason=%s why=out_of_memory", (long long)id, reason);
            return;
        }
        d->cancels = p;
        d->cancels_cap = cap;
    }
    d->cancels[d->ncancels++] = (cancel_t){id, created_us, reason, solo};
}

/* Replace the set of stuck models, logging one line per model that enters or
 * leaves it. names is "\n"-separated (or the rows of a result, see callers). */
static void dispatcher_update_stuck(dispatcher_t *d, char **names, size_t n)
{
    char q[300];

    for (size_t i = 0; i < n; i++) {
        bool known = false;

        for (size_t j = 0; j < d->nstuck && !known; j++)
            known = strcmp(d->stuck[j], names[i]) == 0;
        if (!known)
            log_warn("queue_stuck", "model=%s detail=\"queued jobs and no live healthy node serves the model; "
                                    "they wait until one does or their deadline passes\"",
                     log_quote(q, sizeof q, names[i]));
    }
    for (size_t j = 0; j < d->nstuck; j++) {
        bool still = false;

        for (size_t i = 0; i < n && !still; i++)
            still = strcmp(d->stuck[j], names[i]) == 0;
        if (!still)
            log_info("queue_unstuck", "model=%s detail=\"a live healthy node serves the model again, or its "
                                      "queue emptied\"",
                     log_quote(q, sizeof q, d->stuck[j]));
        free(d->stuck[j]);
    }
    free(d->stuck);
    d->stuck = names;
    d->nstuck = n;
}

static void dispatcher_update_stuck_text(dispatcher_t *d, const char *text)
{
    size_t n = 0, cap = 0;
    char **names = NULL;
    const char *p = text;

    while (p && *p) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);

        if (len > 0) {
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 8;
                char **np = realloc(names, ncap * sizeof *np);

                if (!np)
                    break;
                names = np;
                cap = ncap;
            }
            names[n] = strndup(p, len);
            if (names[n])
                n++;
        }
        p = e ? e + 1 : NULL;
    }
    dispatcher_update_stuck(d, names, n);
}

static bool dispatcher_key_cached(dispatcher_t *d, const char *key, int64_t now)
{
    for (size_t i = 0; i < d->nkeys; i++) {
        if (d->keys[i].expires_ms > now && strcmp(d->keys[i].key, key) == 0)
            return true;
    }
    return false;
}

static void dispatcher_key_remember(dispatcher_t *d, const char *key, int64_t now)
{
    size_t slot = d->nkeys;

    for (size_t i = 0; i < d->nkeys; i++) {
        if (strcmp(d->keys[i].key, key) == 0 || d->keys[i].expires_ms <= now) {
            slot = i;
            break;
        }
    }
    if (slot == KEY_CACHE_MAX) {
        /* Full of live entries: the one that expires first goes. */
        slot = 0;
        for (size_t i = 1; i < d->nkeys; i++) {
            if (d->keys[i].expires_ms < d->keys[slot].expires_ms)
                slot = i;
        }
    }
    if (slot < d->nkeys && strcmp(d->keys[slot].key, key) == 0) {
        d->keys[slot].expires_ms = now + d->opt.key_cache_ms;
        return;
    }
    {
        char *copy = strdup(key);

        if (!copy)
            return;
        if (slot < d->nkeys)
            free(d->keys[slot].key);
        else
            d->nkeys++;
        d->keys[slot].key = copy;
        d->keys[slot].expires_ms = now + d->opt.key_cache_ms;
    }
}

/* ---- intake: calls from the HTTP side ---------------------------------------- */

static void dispatcher_render_metrics(dispatcher_t *d, call_t *c, const metrics_sample_t *s, size_t n)
{
    buf_t b = BUF_INIT;
    metrics_gateway_t g = {atomic_load(&d->nwaiting), d->connected};

    metrics_render(&b, s, n, &g);
    if (b.oom) {
        buf_free(&b);
        dispatcher_set_body(c, 500, NULL, NULL);
        return;
    }
    dispatcher_set_body(c, 200, b.data ? b.data : strdup(""), "text/plain; version=0.0.4; charset=utf-8");
}

/* A stream request's token: made once, kept with its stream (which the waiter and
 * its shadow share) and added to its submit element, so that the database echoes
 * it in every piece of the job. False when the call was answered (500). */
static bool dispatcher_stream_token(dispatcher_t *d, call_t *c)
{
    gw_stream_t *st = c->stream;

    if (st->token[0] != '\0')
        return true;
    if (!stream_token_make(st->token)) {
        log_error("stream_token_failed", "why=\"getrandom: %s\" next=\"answering 500\"", strerror(errno));
        dispatcher_free_element(c);
        dispatcher_answer_error(d, c, 500, "internal_error", "cannot make a stream token: no randomness");
        return false;
    }
    if (!request_add_stream_token(&c->element, &c->element_len, st->token)) {
        st->token[0] = '\0';
        dispatcher_free_element(c);
        dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
        return false;
    }
    return true;
}

/* A call whose key (if any) is known good goes to the queue of its kind. */
static void dispatcher_route(dispatcher_t *d, call_t *c)
{
    switch (c->kind) {
    case CALL_SUBMIT:
        if (c->stream && !dispatcher_stream_token(d, c))
            break;
        queue_push(&d->submits, c);
        break;
    case CALL_JOB_CREATE:
        queue_push(&d->jobs, c);
        break;
    case CALL_JOB_GET:
        queue_push(&d->gets, c);
        break;
    default:
        queue_push(&d->misc, c);
        break;
    }
}

static void dispatcher_intake(dispatcher_t *d, int64_t now)
{
    queue_t in;
    cancel_t *cancels;
    size_t ncancels;
    call_t *c;

    pthread_mutex_lock(&d->mu);
    in = d->inbox;
    d->inbox = (queue_t){NULL, NULL, 0};
    cancels = d->inbox_cancels;
    ncancels = d->inbox_ncancels;
    d->inbox_cancels = NULL;
    d->inbox_ncancels = d->inbox_cancels_cap = 0;
    pthread_mutex_unlock(&d->mu);

    for (size_t i = 0; i < ncancels; i++)
        dispatcher_push_cancel(d, cancels[i].id, cancels[i].created_us, cancels[i].reason, false);
    free(cancels);

    while ((c = queue_pop(&in)) != NULL) {
        if (atomic_load(&d->stop)) {
            dispatcher_answer_error(d, c, 503, "shutting_down", MSG_SHUTTING_DOWN);
        } else if (!d->connected) {
            if (c->kind == CALL_METRICS) {
                dispatcher_render_metrics(d, c, NULL, 0);
                dispatcher_answer(d, c);
            } else {
                dispatcher_answer_error(d, c, 503, "database_unavailable", MSG_DB_DOWN);
            }
        } else if (d->opt.require_api_key && c->api_key && !dispatcher_key_cached(d, c->api_key, now)) {
            queue_push(&d->auth, c);
        } else {
            dispatcher_route(d, c);
        }
    }
}

/* ---- starting operations ------------------------------------------------------ */

static void worker_reset(worker_t *w)
{
    w->op = OP_IDLE;
    w->ncalls = 0;
    w->ids.n = 0;
    w->created.n = 0;
    w->reason = NULL;
    w->async_channel = false;
    w->flushing = false;
    if (w->res) {
        PQclear(w->res);
        w->res = NULL;
    }
}

static void dispatcher_lost(dispatcher_t *d, const char *why);

/* After a statement was queued on w (ok: what PQsend* returned): flush it. False when
 * the connection broke (already handled). */
static bool worker_sent(dispatcher_t *d, worker_t *w, int ok)
{
    int rc;

    if (!ok) {
        char msg[512];

        snprintf(msg, sizeof msg, "%s", PQerrorMessage(w->conn));
        msg[strcspn(msg, "\n")] = '\0';
        dispatcher_lost(d, msg);
        return false;
    }
    rc = PQflush(w->conn);
    if (rc < 0) {
        dispatcher_lost(d, "could not send a statement");
        return false;
    }
    w->flushing = rc == 1;
    return true;
}

static bool worker_send(dispatcher_t *d, worker_t *w, const char *sql, int nparams, const char *const *values)
{
    return worker_sent(d, w, PQsendQueryParams(w->conn, sql, nparams, NULL, values, NULL, NULL, 0));
}

static bool worker_execute(dispatcher_t *d, worker_t *w, stmt_t stmt, int nparams, const char *const *values)
{
    return worker_sent(d, w, PQsendQueryPrepared(w->conn, PREPARED[stmt].name, nparams, values, NULL, NULL, 0));
}

/* When building a batch's parameter ran out of memory: every call of the batch gets
 * a 500, the buffer is freed and the worker is free again. Returns whether it did. */
static bool batch_out_of_memory(dispatcher_t *d, worker_t *w, buf_t *b)
{
    if (!b->oom)
        return false;
    for (size_t i = 0; i < w->ncalls; i++)
        dispatcher_answer_error(d, w->calls[i], 500, "internal_error", "out of memory");
    buf_free(b);
    worker_reset(w);
    return true;
}

static void dispatcher_start_submit(dispatcher_t *d, worker_t *w, bool async)
{
    queue_t *q = async ? &d->jobs : &d->submits;
    size_t n = batch_take_count(q->head, BATCH_MAX_ITEMS, BATCH_MAX_BYTES);
    buf_t b = BUF_INIT;
    const char *values[2];
    bool durable = async || d->opt.durable_submits;

    worker_reset(w);
    w->op = OP_SUBMIT;
    w->async_channel = async;
    batch_join_elements(&b, q->head, n);
    for (size_t i = 0; i < n; i++) {
        call_t *c = queue_pop(q);

        /* A key promises that the job can be found again, even after a crash. */
        durable = durable || c->keyed;
        if (!worker_add_call(w, c)) {
            dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
            b.oom = true;
        }
    }
    if (batch_out_of_memory(d, w, &b))
        return;
    values[0] = b.data;
    values[1] = async ? DISPATCHER_JOBS_CHANNEL : d->channel;
    w->no_flush = !durable;
    d->submits_in_flight++;
    d->last_submit_async = async;
    log_debug("submit_sent", "batch=%zu bytes=%zu channel=%s durable=%s", w->ncalls, b.len, values[1],
              durable ? "true" : "false");
    worker_execute(d, w, durable ? STMT_SUBMIT : STMT_SUBMIT_NO_FLUSH, 2, values);
    buf_free(&b);
}

static void dispatcher_start_results(dispatcher_t *d, worker_t *w)
{
    buf_t b = BUF_INIT;
    const char *values[1];
    size_t take;
    call_t *c;

    worker_reset(w);
    w->op = OP_RESULTS;
    while (d->gets.head && w->ids.n < RESULTS_MAX_IDS) {
        c = queue_pop(&d->gets);
        if (!worker_add_call(w, c) || !worker_add_id(w, c->job_id)) {
            if (w->ncalls && w->calls[w->ncalls - 1] == c)
                w->ncalls--;
            dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
        }
    }
    take = d->result_ids.n;
    if (take > RESULTS_MAX_IDS)
        take = RESULTS_MAX_IDS;
    for (size_t i = 0; i < take; i++)
        worker_add_id(w, d->result_ids.v[d->result_ids.n - 1 - i]);
    d->result_ids.n -= take;
    w->ids.n = batch_unique_ids(w->ids.v, w->ids.n);
    batch_ids_literal(&b, w->ids.v, w->ids.n);
    if (batch_out_of_memory(d, w, &b))
        return;
    values[0] = b.data;
    d->results_in_flight = true;
    worker_execute(d, w, STMT_RESULTS, 1, values);
    buf_free(&b);
}

static int cancel_cmp_id(const void *a, const void *b)
{
    int64_t x = ((const cancel_t *)a)->id, y = ((const cancel_t *)b)->id;

    return x < y ? -1 : x > y;
}

static void dispatcher_start_cancels(dispatcher_t *d, worker_t *w)
{
    buf_t ids = BUF_INIT, created = BUF_INIT;
    const char *values[3];
    size_t taken = 0, kept = 0;
    bool solo = d->cancels[0].solo;
    const char *reason = d->cancels[0].reason;
    bool ok = true;

    worker_reset(w);
    w->op = OP_CANCELS;
    w->reason = reason;
    /* The batch moves to the front of the array, the rest after it. */
    for (size_t i = 0; i < d->ncancels; i++) {
        cancel_t x = d->cancels[i];
        bool take = taken < (solo ? 1u : CANCELS_MAX_IDS) && x.reason == reason && x.solo == solo;

        if (take) {
            memmove(&d->cancels[taken + 1], &d->cancels[taken], (i - taken) * sizeof x);
            d->cancels[taken++] = x;
        }
    }
    /* In id order, the order in which a daemon's exchange locks the jobs it settles:
     * a batch of cancels and a settle that share jobs cannot deadlock. */
    qsort(d->cancels, taken, sizeof *d->cancels, cancel_cmp_id);
    for (size_t i = 0; i < taken; i++) {
        if (i > 0 && d->cancels[i].id == d->cancels[i - 1].id)
            continue;
        ok = ok && worker_add_id(w, d->cancels[i].id) && idvec_push(&w->created, d->cancels[i].created_us);
    }
    if (!ok) {
        worker_reset(w);
        return;                  /* out of memory: the cancels stay queued */
    }
    for (size_t i = taken; i < d->ncancels; i++)
        d->cancels[kept++] = d->cancels[i];
    d->ncancels = kept;
    batch_ids_literal(&ids, w->ids.v, w->ids.n);
    batch_ids_literal(&created, w->created.v, w->created.n);
    values[0] = ids.data;
    values[1] = created.data;
    values[2] = w->reason;
    if (ids.oom || created.oom) {
        buf_free(&ids);
        buf_free(&created);
        for (size_t i = 0; i < w->ids.n; i++)
            dispatcher_push_cancel(d, w->ids.v[i], w->created.v[i], w->reason, solo);
        worker_reset(w);
        return;
    }
    log_debug("cancel_sent", "jobs=%zu reason=\"%s\"", w->ids.n, w->reason);
    worker_execute(d, w, STMT_CANCELS, 3, values);
    buf_free(&ids);
    buf_free(&created);
}

static void dispatcher_start_call(dispatcher_t *d, worker_t *w)
{
    call_t *c = queue_pop(&d->misc);
    char idtext[32];
    const char *values[1];
    buf_t gw = BUF_INIT;

    worker_reset(w);
    w->op = OP_CALL;
    if (!worker_add_call(w, c)) {
        dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
        worker_reset(w);
        return;
    }
    switch (c->kind) {
    case CALL_MODELS:
        worker_send(d, w, SQL_MODELS, 0, NULL);
        break;
    case CALL_READY:
        worker_send(d, w, SQL_READY, 0, NULL);
        break;
    case CALL_METRICS:
        worker_send(d, w, SQL_METRICS, 0, NULL);
        break;
    case CALL_JOB_CANCEL:
        snprintf(idtext, sizeof idtext, "%lld", (long long)c->job_id);
        values[0] = idtext;
        worker_send(d, w, SQL_CANCEL_ONE, 1, values);
        break;
    case CALL_STATUS:
        /* Not the reply channel: a database role listening there could read the
         * streamed answers. It is in the start line of the log. */
        buf_printf(&gw, "{\"waiting_requests\":%ld,\"db_connections\":%d}", atomic_load(&d->nwaiting),
                   d->nworkers + 1);
        values[0] = gw.oom ? "{}" : gw.data;
        worker_send(d, w, d->nodes_allowed == 0 ? SQL_STATUS_NO_NODES : SQL_STATUS_WITH_NODES, 1, values);
        buf_free(&gw);
        break;
    default:
        dispatcher_answer_error(d, c, 500, "internal_error", "unexpected request kind");
        worker_reset(w);
        break;
    }
}

static void dispatcher_start_auth(dispatcher_t *d, worker_t *w)
{
    buf_t b = BUF_INIT;
    const char *values[1];
    call_t *c;
    size_t n = 0;

    worker_reset(w);
    w->op = OP_AUTH;
    buf_append_char(&b, '[');
    while ((c = queue_pop(&d->auth)) != NULL) {
        if (!worker_add_call(w, c)) {
            dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
            continue;
        }
        if (n++)
            buf_append_char(&b, ',');
        buf_append_json_string(&b, c->api_key, strlen(c->api_key));
    }
    buf_append_char(&b, ']');
    if (batch_out_of_memory(d, w, &b))
        return;
    values[0] = b.data;
    d->auth_in_flight = true;
    worker_send(d, w, SQL_AUTH, 1, values);
    buf_free(&b);
}

static void dispatcher_start_stuck(dispatcher_t *d, worker_t *w)
{
    worker_reset(w);
    w->op = OP_STUCK;
    d->stuck_in_flight = true;
    worker_send(d, w, SQL_STUCK, 0, NULL);
}

/* Give each idle worker the most urgent work: cancels (they free capacity), result
 * fetches (someone waits), submits (one batch in flight at a time, so submits that
 * arrive meanwhile fold into the next one), key checks, then the rest. */
static void dispatcher_schedule(dispatcher_t *d, bool stuck_due)
{
    for (int i = 0; i < d->nworkers && d->connected; i++) {
        worker_t *w = &d->workers[i];

        if (w->op != OP_IDLE || !w->conn)
            continue;
        if (d->ncancels > 0)
            dispatcher_start_cancels(d, w);
        else if (!d->results_in_flight && (d->result_ids.n > 0 || d->gets.n > 0))
            dispatcher_start_results(d, w);
        else if (d->submits_in_flight == 0 && (d->submits.n > 0 || d->jobs.n > 0))
            dispatcher_start_submit(d, w, d->submits.n == 0 || (d->jobs.n > 0 && !d->last_submit_async));
        else if (!d->auth_in_flight && d->auth.n > 0)
            dispatcher_start_auth(d, w);
        else if (d->misc.n > 0)
            dispatcher_start_call(d, w);
        else if (stuck_due && !d->stuck_in_flight)
            dispatcher_start_stuck(d, w);
        else
            break;
    }
}

/* ---- finishing operations ------------------------------------------------------ */

static bool row_value_null(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col);
}

static const char *row_value(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t parse_i64(const char *s)
{
    return s ? strtoll(s, NULL, 10) : 0;
}

/* The GET /v1/jobs/{id} body for one results row. */
static void dispatcher_reply_job(call_t *c, const PGresult *res, int row)
{
    buf_t b = BUF_INIT;
    const char *model = row_value(res, row, 5);

    buf_printf(&b, "{\"id\":%s,\"object\":\"job\",\"status\":\"%s\",\"model\":", PQgetvalue(res, row, 0),
               PQgetvalue(res, row, 1));
    if (model)
        buf_append_json_string(&b, model, strlen(model));
    else
        buf_append_str(&b, "null");
    buf_printf(&b, ",\"attempt\":%s,\"created_at\":%s,\"started_at\":%s,\"finished_at\":%s,\"result\":%s,\"error\":%s}",
               PQgetvalue(res, row, 2), row_value_null(res, row, 6) ? "null" : PQgetvalue(res, row, 6),
               row_value_null(res, row, 7) ? "null" : PQgetvalue(res, row, 7),
               row_value_null(res, row, 8) ? "null" : PQgetvalue(res, row, 8),
               row_value_null(res, row, 3) ? "null" : PQgetvalue(res, row, 3),
               row_value_null(res, row, 4) ? "null" : PQgetvalue(res, row, 4));
    if (b.oom) {
        buf_free(&b);
        dispatcher_set_body(c, 500, NULL, NULL);
        return;
    }
    dispatcher_set_body(c, 200, b.data, NULL);
}

static bool dispatcher_add_waiter(dispatcher_t *d, call_t *c)
{
    if (!waiters_add(&d->waiters, c))
        return false;
    atomic_store(&d->nwaiting, (long)waiters_count(&d->waiters));
    return true;
}

static void dispatcher_remove_waiter(dispatcher_t *d, call_t *c)
{
    waiters_remove(&d->waiters, c);
    atomic_store(&d->nwaiting, (long)waiters_count(&d->waiters));
}

static void dispatcher_queue_result_id(dispatcher_t *d, int64_t id)
{
    if (!idvec_push(&d->result_ids, id))
        log_error("recheck_dropped", "job=%lld why=out_of_memory", (long long)id);
}

/* ---- streams ------------------------------------------------------------------- */

/* A relaying stream ends: its last bytes (tail, may be NULL) go out and the
 * dispatcher lets go of it. sh may be freed by this. */
static void dispatcher_stream_close(dispatcher_t *d, call_t *sh, const buf_t *tail, bool abort, const char *how)
{
    gw_stream_t *st = sh->stream;
    bool ok = tail && !tail->oom && tail->len > 0;

    dispatcher_remove_waiter(d, sh);
    stream_end(st, ok ? tail->data : NULL, ok ? tail->len : 0, abort || (tail && tail->oom));
    metrics_stream_end(how);
    atomic_fetch_sub(&d->outstanding, 1);
    stream_release(st);
}

/* End a relaying stream with an error event (and no [DONE]); cancel_reason: the job
 * is cancelled too (static string). */
static void dispatcher_stream_fail(dispatcher_t *d, call_t *sh, const char *cancel_reason, const char *type,
                                   const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static void dispatcher_stream_fail(dispatcher_t *d, call_t *sh, const char *cancel_reason, const char *type,
                                   const char *code, const char *fmt, ...)
{
    char message[1024], q[1100];
    buf_t b = BUF_INIT;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (cancel_reason)
        dispatcher_push_cancel(d, sh->job_id, sh->created_us, cancel_reason, false);
    log_info("stream_failed", "job=%lld code=%s message=%s next=\"error event sent, stream closed%s\"",
             (long long)sh->job_id, code, log_quote(q, sizeof q, message), cancel_reason ? ", job cancelled" : "");
    stream_frame_error(&b, message, type, code);
    dispatcher_stream_close(d, sh, &b, false, "error");
    buf_free(&b);
}

/* A job that ended after its stream started: [DONE] when it succeeded and every
 * piece arrived; otherwise an error event. */
static void dispatcher_stream_outcome(dispatcher_t *d, call_t *sh, int64_t id, const char *state, const char *result,
                                      const char *error)
{
    gw_reply_t r = {0};
    json_t *doc, *err;
    const char *message, *type, *code;

    if (strcmp(state, "succeeded") == 0) {
        buf_t b = BUF_INIT;

        if (!stream_rx_complete(&sh->stream->rx)) {
            dispatcher_stream_fail(d, sh, NULL, "server_error", "stream_incomplete",
                                   "job %lld finished, but a piece of its stream never reached the gateway; the "
                                   "answer above is incomplete",
                                   (long long)id);
            return;
        }
        stream_frame_done(&b);
        dispatcher_stream_close(d, sh, &b, false, "done");
        buf_free(&b);
        return;
    }
    errors_reply_outcome(&r, id, state, result, error);
    doc = r.body ? json_loads(r.body, JSON_DECODE_ANY, NULL) : NULL;
    err = json_object_get(doc, "error");
    message = json_string_value(json_object_get(err, "message"));
    type = json_string_value(json_object_get(err, "type"));
    code = json_string_value(json_object_get(err, "code"));
    dispatcher_stream_fail(d, sh, NULL, type ? type : errors_type_for_status(r.status), code ? code : "job_failed",
                           "%s", message ? message : "the job failed after its stream started");
    json_decref(doc);
    errors_reply_clear(&r);
}

/* The first event of a waiting stream request is framed: the request goes back to
 * answer 200 with the event stream, and the stream's shadow waiter relays the rest.
 * Returns the shadow, or NULL when the request was answered otherwise. */
static call_t *dispatcher_stream_begin(dispatcher_t *d, call_t *c, const buf_t *first)
{
    gw_stream_t *st = c->stream;
    call_t *sh = &st->shadow;

    dispatcher_remove_waiter(d, c);
    memset(sh, 0, sizeof *sh);
    sh->kind = CALL_STREAM;
    sh->stream = st;
    sh->job_id = c->job_id;
    sh->created_us = c->created_us;
    sh->timeout_ms = c->timeout_ms;
    sh->deadline_ms = c->deadline_ms;
    sh->client_fd = c->client_fd;
    if (first->oom || !stream_push(st, first->data, first->len) || !dispatcher_add_waiter(d, sh)) {
        dispatcher_push_cancel(d, c->job_id, c->created_us, "gateway out of memory", false);
        c->job_final = true;
        dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
        return NULL;
    }
    stream_retain(st);
    atomic_fetch_add(&d->outstanding, 1);
    errors_reply_clear(&c->reply);
    c->reply.status = 200;
    c->streaming = true;
    dispatcher_answer(d, c);
    return sh;
}

static const char *stream_status_text(stream_status_t rc)
{
    switch (rc) {
    case STREAM_REPEAT:
        return "a piece came twice: the job's stream started over";
    case STREAM_TOO_FAR:
        return "a piece is missing and too many came after it";
    case STREAM_TOO_BIG:
        return "one event is over the size limit";
    case STREAM_NO_MEMORY:
        return "out of memory";
    default:
        return "ok";
    }
}

/* One piece for one stream request: c is a submit still waiting for its first
 * event, or a relaying shadow. */
static void dispatcher_stream_piece(dispatcher_t *d, call_t *c, uint32_t seq, bool more, const char *data,
                                    size_t len)
{
    gw_stream_t *st = c->stream;
    buf_t out = BUF_INIT;
    stream_status_t rc;

    if (c->kind == CALL_SUBMIT && st->broken)
        return;
    rc = stream_rx_feed(&st->rx, seq, more, data, len, &out);
    if (rc == STREAM_REPEAT && c->kind == CALL_SUBMIT && st->rx.events == 0) {
        /* A new attempt started over before anything was sent: so do we. */
        stream_rx_reset(&st->rx);
        buf_reset(&out);
        rc = stream_rx_feed(&st->rx, seq, more, data, len, &out);
    }
    if (out.len > 0 || out.oom) {
        if (c->kind == CALL_SUBMIT) {
            c = dispatcher_stream_begin(d, c, &out);
        } else if (!stream_push(st, out.data, out.len)) {
            log_warn("stream_client_behind", "job=%lld behind_bytes_max=%u next=\"closing the stream, cancelling the "
                                             "job\"",
                     (long long)c->job_id, STREAM_MAX_OUT_BYTES);
            dispatcher_push_cancel(d, c->job_id, c->created_us, "client did not read the stream", false);
            dispatcher_stream_close(d, c, NULL, true, "error");
            c = NULL;
        }
    }
    buf_free(&out);
    if (!c || rc == STREAM_OK)
        return;
    if (c->kind == CALL_SUBMIT) {
        /* Nothing went out yet: the finished job's result will be the answer. */
        st->broken = true;
        log_warn("stream_pieces_unusable", "job=%lld seq=%u why=\"%s\" next=\"answering from the finished result\"",
                 (long long)c->job_id, seq, stream_status_text(rc));
        return;
    }
    dispatcher_stream_fail(d, c, "stream broken at the gateway", "server_error", "stream_broken",
                           "the relayed stream of job %lld broke at piece %u (%s); the answer above is incomplete",
                           (long long)c->job_id, seq, stream_status_text(rc));
}

static void dispatcher_keep_orphan(dispatcher_t *d, int64_t id, const char *payload)
{
    size_t len = strlen(payload);

    if (d->orphan_bytes + len > ORPHAN_MAX_BYTES)
        return;
    if (d->norphans == d->orphans_cap) {
        size_t cap = d->orphans_cap ? d->orphans_cap * 2 : 64;
        orphan_t *p = realloc(d->orphans, cap * sizeof *p);

        if (!p)
            return;
        d->orphans = p;
        d->orphans_cap = cap;
    }
    d->orphans[d->norphans].payload = strdup(payload);
    if (!d->orphans[d->norphans].payload)
        return;
    d->orphans[d->norphans].id = id;
    d->norphans++;
    d->orphan_bytes += len;
}

/* Whether token is that of a stream request in a submit still in flight: only
 * its pieces may wait as orphans (a forger's cannot crowd them out). */
static bool dispatcher_token_in_flight(dispatcher_t *d, const char *token, size_t len)
{
    for (int i = 0; i < d->nworkers; i++) {
        const worker_t *w = &d->workers[i];

        if (w->op != OP_SUBMIT || w->async_channel)
            continue;
        for (size_t j = 0; j < w->ncalls; j++)
            if (w->calls[j]->stream && stream_token_equal(w->calls[j]->stream->token, token, len))
                return true;
    }
    return false;
}

static void dispatcher_on_piece(dispatcher_t *d, const char *channel, const char *payload)
{
    char q[200];
    stream_payload_t p;
    bool ours = false;
    size_t n = 0;

    if (!stream_parse_payload(payload, &p)) {
        log_warn("notification_ignored",
                 "channel=%s payload=%s why=\"not a stream piece S<id>:<seq>:<m|e>:<token>:<data>\"", channel,
                 log_quote(q, sizeof q, payload));
        return;
    }
    /* Several requests may wait for one job (an idempotency key sent twice). The
     * list is taken first: a piece may move a request to its shadow. */
    for (call_t *c = waiters_find(&d->waiters, p.id); c; c = waiters_find_next(c)) {
        if (!c->stream)
            continue;
        if (n == d->scratch_cap) {
            size_t cap = d->scratch_cap ? d->scratch_cap * 2 : 8;
            call_t **grown = realloc(d->scratch, cap * sizeof *grown);

            if (!grown)
                break;
            d->scratch = grown;
            d->scratch_cap = cap;
        }
        d->scratch[n++] = c;
        /* Any of our tokens for this job will do: each is a secret of this gateway's
         * (a replay on the same channel leaves the job with the first request's). */
        if (stream_token_equal(c->stream->token, p.token, p.token_len))
            ours = true;
    }
    if (n == 0) {
        if (d->submits_in_flight > 0 && p.token_len > 0 && dispatcher_token_in_flight(d, p.token, p.token_len))
            dispatcher_keep_orphan(d, p.id, payload);
        return;
    }
    if (!ours) {
        /* Any role may NOTIFY our channel: a piece without our token is not the job's. */
        log_debug("stream_piece_dropped", "channel=%s job=%lld seq=%u why=\"%s\"", channel, (long long)p.id, p.seq,
                  p.token_len > 0 ? "wrong stream token" : "no stream token");
        return;
    }
    for (size_t i = 0; i < n; i++)
        dispatcher_stream_piece(d, d->scratch[i], p.seq, p.more, p.data, p.len);
}

/* Pieces that came before their submit's result: their requests wait now. */
static void dispatcher_replay_orphans(dispatcher_t *d)
{
    orphan_t *o = d->orphans;
    size_t n = d->norphans;

    d->orphans = NULL;
    d->norphans = d->orphans_cap = d->orphan_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (d->submits_in_flight == 0 && waiters_find(&d->waiters, o[i].id))
            dispatcher_on_piece(d, d->channel, o[i].payload);
        free(o[i].payload);
    }
    free(o);
}

/* A stream request whose job succeeded before any of its events could be relayed:
 * the whole result, as an event stream. */
static void dispatcher_stream_whole(call_t *c, const char *result)
{
    buf_t b = BUF_INIT;

    stream_frame_result(&b, result);
    if (b.oom) {
        buf_free(&b);
        dispatcher_set_body(c, 500, NULL, NULL);
        return;
    }
    dispatcher_set_body(c, 200, b.data, "text/event-stream; charset=utf-8");
    metrics_stream_end("whole");
}

static void dispatcher_finish_submit(dispatcher_t *d, worker_t *w, PGresult *res, bool lost)
{
    char q[1100];
    char sqlstate[6] = "", err[1024] = "";
    bool ok = res && db_result_ok(res, w->conn, sqlstate, err, sizeof err);
    int64_t now = clock_monotonic_ms();
    bool *done = NULL;

    d->submits_in_flight--;
    if (!ok && (lost || db_sqlstate_session_lost(sqlstate))) {
        for (size_t i = 0; i < w->ncalls; i++) {
            dispatcher_free_element(w->calls[i]);
            dispatcher_answer_error(d, w->calls[i], 503, "database_unavailable",
                                    "the database connection was lost while submitting; the job may or may not "
                                    "have been queued (send an Idempotency-Key to retry safely)");
        }
        return;
    }
    if (!ok) {
        if (w->ncalls > 1) {
            /* The batch failed as a whole: send each alone so one bad element
             * cannot fail the others. */
            queue_t *back = w->async_channel ? &d->jobs : &d->submits;

            log_warn("submit_batch_failed", "batch=%zu error=%s next=\"resubmitting one by one\"", w->ncalls,
                     log_quote(q, sizeof q, err));
            for (size_t i = w->ncalls; i-- > 0;) {
                w->calls[i]->solo = true;
                queue_push_front(back, w->calls[i]);
            }
            return;
        }
        dispatcher_free_element(w->calls[0]);
        errors_reply_sqlstate(&w->calls[0]->reply, sqlstate, err);
        dispatcher_answer(d, w->calls[0]);
        return;
    }

    done = calloc(w->ncalls ? w->ncalls : 1, sizeof *done);
    for (int r = 0; r < PQntuples(res); r++) {
        call_t *c = batch_call_for_row(w->calls, w->ncalls, row_value(res, r, 0));
        size_t i;
        const char *state;

        if (!c)
            continue;
        i = (size_t)(parse_i64(row_value(res, r, 0)) - 1);
        if (done && done[i])
            continue;
        if (done)
            done[i] = true;
        dispatcher_free_element(c);
        state = row_value(res, r, 2);
        if (state) {
            errors_reply_sqlstate(&c->reply, state, row_value(res, r, 3));
            dispatcher_answer(d, c);
            continue;
        }
        c->job_id = parse_i64(row_value(res, r, 1));
        if (w->no_flush)
            c->created_us = parse_i64(row_value(res, r, 4));
        if (c->kind == CALL_JOB_CREATE) {
            buf_t b = BUF_INIT;

            buf_printf(&b, "{\"id\":%lld,\"object\":\"job\",\"status\":\"queued\"}", (long long)c->job_id);
            dispatcher_set_body(c, 202, b.oom ? NULL : b.data, NULL);
            if (b.oom)
                buf_free(&b);
            c->job_final = true;
            dispatcher_answer(d, c);
            continue;
        }
        c->deadline_ms = now + c->timeout_ms;
        if (!dispatcher_add_waiter(d, c)) {
            dispatcher_push_cancel(d, c->job_id, c->created_us, "gateway out of memory", false);
            c->job_final = true;
            dispatcher_answer_error(d, c, 500, "internal_error", "out of memory");
            continue;
        }
        /* A replayed key may name a job that finished already (no notification
         * will come); a notification may also have beaten this result here. */
        if (c->keyed || idvec_contains(&d->recent_submit, c->job_id))
            dispatcher_queue_result_id(d, c->job_id);
    }
    d->recent_submit.n = 0;
    for (size_t i = 0; i < w->ncalls; i++) {
        if (done && done[i])
            continue;
        dispatcher_free_element(w->calls[i]);
        dispatcher_answer_error(d, w->calls[i], 500, "internal_error", "submit_many returned no row for this request");
    }
    free(done);
    dispatcher_replay_orphans(d);
}

static int dispatcher_find_row(const PGresult *res, int64_t id)
{
    int lo = 0, hi = PQntuples(res) - 1;

    /* dispatch.results orders by id. */
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        int64_t v = parse_i64(PQgetvalue(res, mid, 0));

        if (v == id)
            return mid;
        if (v < id)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

static double parse_seconds_or(const PGresult *res, int row, int col)
{
    const char *v = row_value(res, row, col);

    return v ? strtod(v, NULL) : -1.0;
}

/* A waiting request's job is not in the database, or its id names another job: a
 * crash of PostgreSQL lost a submit that had not reached the disk (and the id may
 * have come round again). There is nothing to answer from and nothing to cancel. */
static void dispatcher_job_gone(dispatcher_t *d, call_t *c)
{
    static const char fmt[] = "job %lld is no longer in the database: PostgreSQL restarted before this request "
                              "reached its disk; it may have started on a node; send the request again";

    log_warn("job_gone", "job=%lld next=\"answering 503: the client may send it again\"", (long long)c->job_id);
    if (c->kind == CALL_STREAM) {
        dispatcher_stream_fail(d, c, NULL, "server_error", "database_unavailable", fmt, (long long)c->job_id);
        return;
    }
    dispatcher_remove_waiter(d, c);
    c->job_final = true;
    errors_reply(&c->reply, 503, "database_unavailable", fmt, (long long)c->job_id);
    c->reply.retry_after_s = 1;
    dispatcher_answer(d, c);
}

static void dispatcher_finish_results(dispatcher_t *d, worker_t *w, PGresult *res, bool lost)
{
    char q[1100];
    char sqlstate[6] = "", err[1024] = "";
    bool ok = res && db_result_ok(res, w->conn, sqlstate, err, sizeof err);
    int64_t now = clock_monotonic_ms();
    bool ending = atomic_load(&d->draining) || atomic_load(&d->stop);

    d->results_in_flight = false;
    lost = lost || (!ok && db_sqlstate_session_lost(sqlstate));
    if (!ok) {
        d->recent_results.n = 0;
        if (!lost)
            log_error("results_failed", "ids=%zu error=%s", w->ids.n, log_quote(q, sizeof q, err));
        for (size_t i = 0; i < w->ncalls; i++) {
            if (lost)
                dispatcher_answer_error(d, w->calls[i], 503, "database_unavailable", MSG_DB_DOWN);
            else
                dispatcher_answer_error(d, w->calls[i], 500, "internal_error", err);
        }
        return;
    }

    for (int r = 0; r < PQntuples(res); r++) {
        int64_t id = parse_i64(PQgetvalue(res, r, 0));
        const char *state = PQgetvalue(res, r, 1);
        int64_t created_us = parse_i64(PQgetvalue(res, r, 11));
        bool final = errors_state_is_final(state), counted = false;
        call_t *c, *next;

        for (c = waiters_find(&d->waiters, id); c; c = next) {
            next = waiters_find_next(c);
            if (c->created_us != 0 && c->created_us != created_us) {
                dispatcher_job_gone(d, c);
                continue;
            }
            if (!final)
                continue;
            if (c->kind == CALL_STREAM) {
                dispatcher_stream_outcome(d, c, id, state, row_value(res, r, 3), row_value(res, r, 4));
                if (!counted)
                    metrics_job_finished(parse_seconds_or(res, r, 9), parse_seconds_or(res, r, 10));
                counted = true;
                continue;
            }
            dispatcher_remove_waiter(d, c);
            if (c->kind == CALL_SUBMIT) {
                if (c->stream && strcmp(state, "succeeded") == 0)
                    dispatcher_stream_whole(c, row_value(res, r, 3));
                else
                    errors_reply_outcome(&c->reply, id, state, row_value(res, r, 3), row_value(res, r, 4));
                c->job_final = true;
                if (!counted)
                    metrics_job_finished(parse_seconds_or(res, r, 9), parse_seconds_or(res, r, 10));
                counted = true;
            } else {
                dispatcher_reply_job(c, res, r);
            }
            dispatcher_answer(d, c);
        }
    }

    /* Asked about, not there: a waiting request's job is gone. */
    for (size_t i = 0; i < w->ids.n; i++) {
        call_t *c, *next;

        if (dispatcher_find_row(res, w->ids.v[i]) >= 0)
            continue;
        for (c = waiters_find(&d->waiters, w->ids.v[i]); c; c = next) {
            next = waiters_find_next(c);
            if (c->kind == CALL_SUBMIT || c->kind == CALL_STREAM)
                dispatcher_job_gone(d, c);
        }
    }

    for (size_t i = 0; i < w->ncalls; i++) {
        call_t *c = w->calls[i];
        int r = dispatcher_find_row(res, c->job_id);

        if (r < 0) {
            errors_reply(&c->reply, 404, "job_not_found", "no job %lld", (long long)c->job_id);
            dispatcher_answer(d, c);
        } else if (errors_state_is_final(PQgetvalue(res, r, 1)) || c->wait_ms <= 0 || c->answer_now || ending) {
            dispatcher_reply_job(c, res, r);
            dispatcher_answer(d, c);
        } else {
            if (c->deadline_ms == 0)
                c->deadline_ms = now + c->wait_ms;
            if (!dispatcher_add_waiter(d, c)) {
                dispatcher_reply_job(c, res, r);
                dispatcher_answer(d, c);
            } else if (idvec_contains(&d->recent_results, c->job_id)) {
                dispatcher_queue_result_id(d, c->job_id);
            }
        }
    }
    d->recent_results.n = 0;
}

static void dispatcher_finish_cancels(dispatcher_t *d, worker_t *w, PGresult *res, bool lost)
{
    char q[1100];
    char sqlstate[6] = "", err[1024] = "";
    bool ok = res && db_result_ok(res, w->conn, sqlstate, err, sizeof err);

    if (ok)
        return;
    if (lost || db_sqlstate_session_lost(sqlstate)) {
        for (size_t i = 0; i < w->ids.n; i++)
            dispatcher_push_cancel(d, w->ids.v[i], w->created.v[i], w->reason, false);
        return;
    }
    if (w->ids.n > 1) {
        for (size_t i = 0; i < w->ids.n; i++)
            dispatcher_push_cancel(d, w->ids.v[i], w->created.v[i], w->reason, true);
        return;
    }
    log_warn("cancel_failed", "job=%lld reason=\"%s\" error=%s", (long long)(w->ids.n ? w->ids.v[0] : 0),
             w->reason, log_quote(q, sizeof q, err));
}

static void dispatcher_finish_call(dispatcher_t *d, worker_t *w, PGresult *res, bool lost)
{
    char q[1100];
    char sqlstate[6] = "", err[1024] = "";
    bool ok = res && db_result_ok(res, w->conn, sqlstate, err, sizeof err);
    call_t *c = w->calls[0];

    if (!ok && (lost || db_sqlstate_session_lost(sqlstate))) {
        if (c->kind == CALL_METRICS) {
            dispatcher_render_metrics(d, c, NULL, 0);
            dispatcher_answer(d, c);
        } else {
            dispatcher_answer_error(d, c, 503, "database_unavailable", MSG_DB_DOWN);
        }
        return;
    }
    switch (c->kind) {
    case CALL_MODELS:
        if (ok && PQntuples(res) == 1)
            dispatcher_set_body(c, 200, strdup(PQgetvalue(res, 0, 0)), NULL);
        else
            errors_reply_sqlstate(&c->reply, sqlstate, err);
        break;
    case CALL_STATUS:
        if (!ok && strcmp(sqlstate, "42501") == 0 && d->nodes_allowed != 0) {
            /* No EXECUTE on dispatch.nodes(): ask again without the node list. */
            d->nodes_allowed = 0;
            queue_push_front(&d->misc, c);
            return;
        }
        if (ok && PQntuples(res) == 1) {
            if (d->nodes_allowed < 0)
                d->nodes_allowed = 1;
            dispatcher_set_body(c, 200, strdup(PQgetvalue(res, 0, 0)), NULL);
            dispatcher_update_stuck_text(d, PQgetvalue(res, 0, 1));
        } else {
            errors_reply_sqlstate(&c->reply, sqlstate, err);
        }
        break;
    case CALL_METRICS:
        if (ok) {
            int n = PQntuples(res);
            metrics_sample_t *s = calloc(n ? (size_t)n : 1, sizeof *s);
            char **stuck = calloc(n ? (size_t)n : 1, sizeof *stuck);
            size_t nstuck = 0;

            for (int i = 0; s && i < n; i++) {
                s[i].name = PQgetvalue(res, i, 0);
                s[i].labels_json = row_value(res, i, 1);
                s[i].value = strtod(PQgetvalue(res, i, 2), NULL);
                if (stuck && strcmp(s[i].name, "pgdispatch_model_stuck") == 0 && s[i].value > 0 &&
                    s[i].labels_json) {
                    json_t *labels = json_loads(s[i].labels_json, 0, NULL);
                    const char *model = json_string_value(json_object_get(labels, "model"));

                    if (model && (stuck[nstuck] = strdup(model)) != NULL)
                        nstuck++;
                    json_decref(labels);
                }
            }
            dispatcher_render_metrics(d, c, s, s ? (size_t)n : 0);
            free(s);
            if (stuck)
                dispatcher_update_stuck(d, stuck, nstuck);
        } else {
            log_warn("metrics_query_failed", "error=%s", log_quote(q, sizeof q, err));
            dispatcher_render_metrics(d, c, NULL, 0);
        }
        break;
    case CALL_READY:
        if (ok && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
            long v = strtol(PQgetvalue(res, 0, 0), NULL, 10);
            buf_t b = BUF_INIT;

            if (v >= d->opt.schema_version) {
                buf_printf(&b, "{\"status\":\"ready\",\"schema_version\":%ld}", v);
                dispatcher_set_body(c, 200, b.oom ? NULL : b.data, NULL);
            } else {
                errors_reply(&c->reply, 503, "schema_outdated",
                             "database schema version %ld is older than %d, which this gateway needs; run the "
                             "migrations (make migrate)",
                             v, d->opt.schema_version);
                buf_free(&b);
            }
        } else {
            errors_reply(&c->reply, 503, "schema_missing",
                         "cannot read dispatch.schema_version(): %s; run the migrations (make migrate)",
                         ok ? "no version recorded" : err);
        }
        break;
    case CALL_JOB_CANCEL:
        if (ok && PQntuples(res) == 1) {
            buf_t b = BUF_INIT;

            buf_printf(&b, "{\"id\":%lld,\"object\":\"job\",\"status\":\"%s\"}", (long long)c->job_id,
                       PQgetvalue(res, 0, 0));
            dispatcher_set_body(c, 200, b.oom ? NULL : b.data, NULL);
        } else if (strcmp(sqlstate, "PD007") == 0) {
            errors_reply(&c->reply, 404, "job_not_found", "no job %lld", (long long)c->job_id);
        } else {
            errors_reply_sqlstate(&c->reply, sqlstate, err);
        }
        break;
    default:
        errors_reply(&c->reply, 500, "internal_error", "unexpected request kind");
        break;
    }
    dispatcher_answer(d, c);
}

static void dispatcher_finish_auth(dispatcher_t *d, worker_t *w, PGresult *res, bool lost)
{
    char sqlstate[6] = "", err[1024] = "";
    bool ok = res && db_result_ok(res, w->conn, sqlstate, err, sizeof err);
    int64_t now = clock_monotonic_ms();

    d->auth_in_flight = false;
    lost = lost || (!ok && db_sqlstate_session_lost(sqlstate));
    if (ok) {
        for (int r = 0; r < PQntuples(res); r++) {
            if (strcmp(PQgetvalue(res, r, 1), "t") == 0)
                dispatcher_key_remember(d, PQgetvalue(res, r, 0), now);
        }
    }
    for (size_t i = 0; i < w->ncalls; i++) {
        call_t *c = w->calls[i];

        if (!ok)
            dispatcher_answer_error(d, c, 503, "database_unavailable",
                                    lost ? MSG_DB_DOWN : "cannot check the API key right now");
        else if (dispatcher_key_cached(d, c->api_key, now))
            dispatcher_route(d, c);
        else
            dispatcher_answer_error(d, c, 401, "invalid_api_key", "invalid API key");
    }
}

static void dispatcher_finish_stuck(dispatcher_t *d, PGresult *res, PGconn *conn)
{
    char sqlstate[6] = "", err[1024] = "";

    d->stuck_in_flight = false;
    d->next_stuck_check_ms = clock_monotonic_ms() + STUCK_CHECK_MS;
    if (res && db_result_ok(res, conn, sqlstate, err, sizeof err)) {
        int n = PQntuples(res);
        char **names = calloc(n ? (size_t)n : 1, sizeof *names);
        size_t k = 0;

        for (int i = 0; names && i < n; i++) {
            names[k] = strdup(PQgetvalue(res, i, 0));
            if (names[k])
                k++;
        }
        if (names)
            dispatcher_update_stuck(d, names, k);
    }
}

/* The op on w ended (res: its first result, NULL when none came). lost: the
 * connection broke. Each finisher answers or requeues every call the op held. */
static void dispatcher_finish(dispatcher_t *d, worker_t *w, bool lost)
{
    PGresult *res = w->res;
    op_kind_t op = w->op;

    w->res = NULL;
    w->op = OP_IDLE;
    switch (op) {
    case OP_SUBMIT:
        dispatcher_finish_submit(d, w, res, lost);
        break;
    case OP_RESULTS:
        dispatcher_finish_results(d, w, res, lost);
        break;
    case OP_CANCELS:
        dispatcher_finish_cancels(d, w, res, lost);
        break;
    case OP_CALL:
        dispatcher_finish_call(d, w, res, lost);
        break;
    case OP_AUTH:
        dispatcher_finish_auth(d, w, res, lost);
        break;
    case OP_STUCK:
        dispatcher_finish_stuck(d, res, w->conn);
        break;
    case OP_IDLE:
        break;
    }
    if (res)
        PQclear(res);
    w->ncalls = 0;
    w->ids.n = 0;
}

/* ---- connections ------------------------------------------------------------- */

static void dispatcher_close_all(dispatcher_t *d)
{
    for (int i = 0; i < d->nworkers; i++) {
        if (d->workers[i].conn)
            PQfinish(d->workers[i].conn);
        d->workers[i].conn = NULL;
    }
    if (d->listen)
        PQfinish(d->listen);
    d->listen = NULL;
}

static void dispatcher_fail_queue(dispatcher_t *d, queue_t *q, const char *code, const char *message)
{
    call_t *c;

    while ((c = queue_pop(q)) != NULL) {
        dispatcher_free_element(c);
        dispatcher_answer_error(d, c, 503, code, message);
    }
}

/* Any connection broke: fail or keep what was in flight (waiters stay and are
 * re-checked after reconnect; cancels are kept), close everything, schedule the
 * reconnect. */
static void dispatcher_lost(dispatcher_t *d, const char *why)
{
    char q[1100];
    int64_t wait_ms;

    if (!d->connected)
        return;
    d->connected = false;
    atomic_store(&d->db_ready, false);
    for (int i = 0; i < d->nworkers; i++) {
        if (d->workers[i].op != OP_IDLE)
            dispatcher_finish(d, &d->workers[i], true);
        worker_reset(&d->workers[i]);
    }
    dispatcher_close_all(d);
    d->submits_in_flight = 0;
    d->results_in_flight = d->auth_in_flight = d->stuck_in_flight = false;
    d->recent_submit.n = d->recent_results.n = 0;
    for (size_t i = 0; i < d->norphans; i++)
        free(d->orphans[i].payload);
    d->norphans = d->orphan_bytes = 0;
    /* Pieces sent while the connection is down are lost: a relaying stream cannot be
     * finished whole, so it ends now (its job is cancelled once reconnected). */
    {
        call_t *c, *following;

        for (c = d->waiters.all; c; c = following) {
            following = c->all_next;
            if (c->kind == CALL_STREAM)
                dispatcher_stream_fail(d, c, "gateway lost its database connection", "server_error",
                                       "database_unavailable",
                                       "the gateway lost its database connection mid-stream; the answer above is "
                                       "incomplete");
        }
    }
    dispatcher_fail_queue(d, &d->submits, "database_unavailable", MSG_DB_DOWN);
    dispatcher_fail_queue(d, &d->jobs, "database_unavailable", MSG_DB_DOWN);
    dispatcher_fail_queue(d, &d->gets, "database_unavailable", MSG_DB_DOWN);
    dispatcher_fail_queue(d, &d->misc, "database_unavailable", MSG_DB_DOWN);
    dispatcher_fail_queue(d, &d->auth, "database_unavailable", MSG_DB_DOWN);
    wait_ms = backoff_next_ms(&d->backoff);
    d->reconnect_at_ms = clock_monotonic_ms() + wait_ms;
    log_warn("db_connection_lost",
             "error=%s waiting=%zu next=\"new requests get 503; reconnecting in %lld ms, then waiting "
             "requests are re-checked\"",
             log_quote(q, sizeof q, why ? why : ""), waiters_count(&d->waiters), (long long)wait_ms);
}

static void dispatcher_connect(dispatcher_t *d)
{
    char q[1100];
    char err[1024] = "";
    const char *channels[2] = {d->channel, DISPATCHER_JOBS_CHANNEL};
    int64_t wait_ms;

    d->listen = db_connect(d->conninfo, "pgdispatch-gateway", err, sizeof err);
    if (!d->listen)
        goto fail;
    if (db_listen(d->listen, channels, 2, err, sizeof err) != 0)
        goto fail;
    PQsetnonblocking(d->listen, 1);
    for (int i = 0; i < d->nworkers; i++) {
        d->workers[i].conn = db_connect(d->conninfo, "pgdispatch-gateway", err, sizeof err);
        if (!d->workers[i].conn)
            goto fail;
        for (int s = 0; s < STMT_COUNT; s++)
            if (db_prepare(d->workers[i].conn, PREPARED[s].name, PREPARED[s].sql, err, sizeof err) != 0)
                goto fail;
        PQsetnonblocking(d->workers[i].conn, 1);
    }
    d->connected = true;
    atomic_store(&d->db_ready, true);
    backoff_reset(&d->backoff);
    if (d->ever_connected) {
        metrics_db_reconnect();
        log_info("db_reconnected", "channel=%s waiting=%zu next=\"re-checking waiting requests\"", d->channel,
                 waiters_count(&d->waiters));
    } else {
        log_info("db_connected", "channel=%s connections=%d", d->channel, d->nworkers + 1);
    }
    d->ever_connected = true;
    /* Notifications were lost while down: every waiter's job is looked at once. */
    for (call_t *c = d->waiters.all; c; c = c->all_next)
        dispatcher_queue_result_id(d, c->job_id);
    return;

fail:
    dispatcher_close_all(d);
    wait_ms = backoff_next_ms(&d->backoff);
    d->reconnect_at_ms = clock_monotonic_ms() + wait_ms;
    log_warn("db_connect_failed", "error=%s next=\"retrying in %lld ms; requests get 503 meanwhile\"",
             log_quote(q, sizeof q, err), (long long)wait_ms);
}

/* ---- notifications, sockets, timers ------------------------------------------ */

static void dispatcher_on_id(void *ctx, int64_t id)
{
    dispatcher_t *d = ctx;

    if (waiters_find(&d->waiters, id)) {
        dispatcher_queue_result_id(d, id);
        return;
    }
    if (d->submits_in_flight > 0 && d->recent_submit.n < RECENT_MAX)
        idvec_push(&d->recent_submit, id);
    if (d->results_in_flight && d->recent_results.n < RECENT_MAX)
        idvec_push(&d->recent_results, id);
}

static void dispatcher_on_notify(void *ctx, const char *channel, const char *payload)
{
    if (payload[0] == 'S') {
        dispatcher_on_piece(ctx, channel, payload);
        return;
    }
    if (batch_parse_ids(payload, dispatcher_on_id, ctx) < 0)
        log_warn("notification_ignored", "channel=%s why=\"payload is not a list of job ids\"", channel);
}

static void dispatcher_worker_io(dispatcher_t *d, worker_t *w, short revents)
{
    if (revents & POLLOUT && w->flushing) {
        int rc = PQflush(w->conn);

        if (rc < 0) {
            dispatcher_lost(d, "could not send a statement");
            return;
        }
        w->flushing = rc == 1;
    }
    if (revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) {
        if (!PQconsumeInput(w->conn)) {
            char msg[512];

            snprintf(msg, sizeof msg, "%s", PQerrorMessage(w->conn));
            msg[strcspn(msg, "\n")] = '\0';
            dispatcher_lost(d, msg);
            return;
        }
    }
    while (w->op != OP_IDLE && !PQisBusy(w->conn)) {
        PGresult *res = PQgetResult(w->conn);

        if (!res) {
            dispatcher_finish(d, w, false);
            break;
        }
        if (!w->res)
            w->res = res;
        else
            PQclear(res);
    }
    if (w->op == OP_IDLE && db_connection_lost(w->conn))
        dispatcher_lost(d, "connection closed");
}

/* Deadlines: a synchronous request past its X-Request-Timeout gets 504 and its job
 * is cancelled (it ends expired); a long-poll past its wait answers with the
 * current state. Returns the next deadline (0: none). */
static int64_t dispatcher_timers(dispatcher_t *d, int64_t now)
{
    int64_t next = 0;
    bool draining = atomic_load(&d->draining);
    call_t *c, *following;

    for (c = d->waiters.all; c; c = following) {
        following = c->all_next;
        if (c->kind == CALL_STREAM && stream_is_gone(c->stream)) {
            /* The client left while the stream was being written (the HTTP side
             * asked for the cancel). */
            dispatcher_stream_close(d, c, NULL, true, "client_gone");
            continue;
        }
        if (c->kind == CALL_STREAM && c->deadline_ms && now >= c->deadline_ms) {
            dispatcher_stream_fail(d, c, "deadline", "timeout_error", "deadline_exceeded",
                                   "job %lld did not finish within %.3g s (X-Request-Timeout); it was cancelled",
                                   (long long)c->job_id, (double)c->timeout_ms / 1000.0);
            continue;
        }
        if (c->kind == CALL_JOB_GET && (draining || (c->deadline_ms && now >= c->deadline_ms))) {
            dispatcher_remove_waiter(d, c);
            c->answer_now = true;
            if (d->connected)
                queue_push(&d->gets, c);
            else
                dispatcher_answer_error(d, c, 503, "database_unavailable", MSG_DB_DOWN);
            continue;
        }
        if (c->kind == CALL_SUBMIT && c->deadline_ms && now >= c->deadline_ms) {
            dispatcher_remove_waiter(d, c);
            dispatcher_push_cancel(d, c->job_id, c->created_us, "deadline", false);
            c->job_final = true;
            errors_reply(&c->reply, 504, "deadline_exceeded",
                         "job %lld did not finish within %.3g s (X-Request-Timeout); it was cancelled",
                         (long long)c->job_id, (double)c->timeout_ms / 1000.0);
            dispatcher_answer(d, c);
            continue;
        }
        if (c->deadline_ms && (next == 0 || c->deadline_ms < next))
            next = c->deadline_ms;
    }
    return next;
}

/* A client that hung up while waiting: its job is cancelled and its connection
 * handed back so libmicrohttpd can close it. */
static void dispatcher_client_gone(dispatcher_t *d, call_t *c)
{
    if (c->kind == CALL_STREAM) {
        dispatcher_push_cancel(d, c->job_id, c->created_us, "client went away", false);
        log_info("client_went_away", "job=%lld stream=true next=\"cancelling the job\"", (long long)c->job_id);
        dispatcher_stream_close(d, c, NULL, true, "client_gone");
        return;
    }
    dispatcher_remove_waiter(d, c);
    if (c->kind == CALL_SUBMIT) {
        dispatcher_push_cancel(d, c->job_id, c->created_us, "client went away", false);
        c->job_final = true;
        log_info("client_went_away", "job=%lld next=\"cancelling the job\"", (long long)c->job_id);
    }
    errors_reply(&c->reply, 499, "client_closed_request", "the client closed the connection");
    dispatcher_answer(d, c);
}

/* Shutdown: answer everything held; true when the thread may end. */
static bool dispatcher_stopping(dispatcher_t *d, int64_t now)
{
    call_t *c;
    bool busy = false;

    if (!d->stop_deadline_ms)
        d->stop_deadline_ms = now + STOP_GRACE_MS;
    dispatcher_fail_queue(d, &d->submits, "shutting_down", MSG_SHUTTING_DOWN);
    dispatcher_fail_queue(d, &d->jobs, "shutting_down", MSG_SHUTTING_DOWN);
    dispatcher_fail_queue(d, &d->gets, "shutting_down", MSG_SHUTTING_DOWN);
    dispatcher_fail_queue(d, &d->misc, "shutting_down", MSG_SHUTTING_DOWN);
    dispatcher_fail_queue(d, &d->auth, "shutting_down", MSG_SHUTTING_DOWN);
    while ((c = d->waiters.all) != NULL) {
        if (c->kind == CALL_STREAM) {
            dispatcher_stream_fail(d, c, "gateway shutting down", "server_error", "shutting_down", MSG_SHUTTING_DOWN);
            continue;
        }
        dispatcher_remove_waiter(d, c);
        if (c->kind == CALL_SUBMIT) {
            dispatcher_push_cancel(d, c->job_id, c->created_us, "gateway shutting down", false);
            c->job_final = true;
        }
        dispatcher_answer_error(d, c, 503, "shutting_down", MSG_SHUTTING_DOWN);
    }
    for (int i = 0; i < d->nworkers; i++)
        busy = busy || d->workers[i].op != OP_IDLE;
    if (!d->connected || now >= d->stop_deadline_ms)
        return true;
    return !busy && d->ncancels == 0;
}

static bool dispatcher_pfds_reserve(dispatcher_t *d, size_t n)
{
    if (n <= d->pcap)
        return true;
    {
        size_t cap = n + n / 2 + 16;
        struct pollfd *p = realloc(d->pfds, cap * sizeof *p);
        call_t **pc;

        if (!p)
            return false;
        d->pfds = p;
        pc = realloc(d->pcalls, cap * sizeof *pc);
        if (!pc)
            return false;
        d->pcalls = pc;
        d->pcap = cap;
    }
    return true;
}

static void *dispatcher_main(void *arg)
{
    char q[1100];
    dispatcher_t *d = arg;

    for (;;) {
        int64_t now = clock_monotonic_ms();
        int64_t next, timeout_ms = -1;
        bool stuck_due = false;
        size_t n = 0, nfixed;
        int rc;

        if (!d->connected && !atomic_load(&d->stop) && now >= d->reconnect_at_ms) {
            dispatcher_connect(d);
            now = clock_monotonic_ms();
        }
        dispatcher_intake(d, now);
        next = dispatcher_timers(d, now);
        if (atomic_load(&d->stop) && dispatcher_stopping(d, now))
            break;

        /* Stuck queues are looked at only while requests wait, every few seconds. */
        if (waiters_count(&d->waiters) == 0) {
            d->next_stuck_check_ms = 0;
        } else if (d->next_stuck_check_ms == 0) {
            d->next_stuck_check_ms = now + STUCK_CHECK_MS;
        } else if (now >= d->next_stuck_check_ms) {
            stuck_due = true;
        }
        if (d->connected)
            dispatcher_schedule(d, stuck_due);
        if (!d->connected && d->reconnect_at_ms && (next == 0 || d->reconnect_at_ms < next) &&
            !atomic_load(&d->stop))
            next = d->reconnect_at_ms;
        if (d->connected && d->next_stuck_check_ms && !d->stuck_in_flight &&
            (next == 0 || d->next_stuck_check_ms < next))
            next = d->next_stuck_check_ms;
        if (atomic_load(&d->stop) && (next == 0 || d->stop_deadline_ms < next))
            next = d->stop_deadline_ms;
        if (next)
            timeout_ms = next > now ? next - now : 0;

        if (!dispatcher_pfds_reserve(d, 2 + (size_t)d->nworkers + waiters_count(&d->waiters))) {
            log_error("poll_set_failed", "why=out_of_memory next=\"retrying in 100 ms\"");
            usleep(100000);
            continue;
        }
        d->pfds[n++] = (struct pollfd){d->efd, POLLIN, 0};
        if (d->listen)
            d->pfds[n++] = (struct pollfd){PQsocket(d->listen), POLLIN, 0};
        for (int i = 0; i < d->nworkers; i++) {
            worker_t *w = &d->workers[i];

            if (w->conn)
                d->pfds[n++] = (struct pollfd){PQsocket(w->conn), (short)(POLLIN | (w->flushing ? POLLOUT : 0)), 0};
        }
        nfixed = n;
        for (call_t *c = d->waiters.all; c; c = c->all_next) {
            if (c->client_fd < 0)
                continue;
            d->pcalls[n] = c;
            d->pfds[n++] = (struct pollfd){c->client_fd, POLLRDHUP, 0};
        }

        rc = poll(d->pfds, n, (int)(timeout_ms > 60000 ? 60000 : timeout_ms));
        if (rc < 0) {
            if (errno != EINTR)
                log_error("poll_failed", "error=%s", log_quote(q, sizeof q, strerror(errno)));
            continue;
        }
        /* Hang-ups first: until then every waiter in the poll set is still held here
         * (results handled below may hand some back, after which they are gone). */
        for (size_t i = nfixed; i < n; i++) {
            if (d->pfds[i].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))
                dispatcher_client_gone(d, d->pcalls[i]);
        }
        if (d->pfds[0].revents & POLLIN) {
            uint64_t v;

            while (read(d->efd, &v, sizeof v) < 0 && errno == EINTR)
                ;
        }
        {
            size_t k = 1;

            if (d->listen) {
                if (d->pfds[k].revents) {
                    char err[512];

                    if (db_drain_notifications(d->listen, dispatcher_on_notify, d, err, sizeof err) < 0)
                        dispatcher_lost(d, err);
                }
                k++;
            }
            for (int i = 0; i < d->nworkers && d->connected; i++) {
                worker_t *w = &d->workers[i];

                if (!w->conn)
                    continue;
                if (d->pfds[k].revents)
                    dispatcher_worker_io(d, w, d->pfds[k].revents);
                k++;
            }
        }
    }

    /* Leaving: whatever is still in flight is answered, then nothing more comes in. */
    for (int i = 0; i < d->nworkers; i++) {
        if (d->workers[i].op != OP_IDLE)
            dispatcher_finish(d, &d->workers[i], true);
    }
    dispatcher_stopping(d, clock_monotonic_ms());
    dispatcher_close_all(d);
    atomic_store(&d->db_ready, false);
    pthread_mutex_lock(&d->mu);
    d->exited = true;
    pthread_mutex_unlock(&d->mu);
    dispatcher_intake(d, clock_monotonic_ms());   /* stop is set: answers 503 */
    log_info("dispatcher_stopped", "channel=%s", d->channel);
    return NULL;
}

/* ---- lifecycle --------------------------------------------------------------- */

void dispatcher_make_channel(char *out, size_t len)
{
    char host[256] = "";
    uint32_t h = 2166136261u, rnd = 0;

    gethostname(host, sizeof host - 1);
    for (const char *p = host; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        rnd = (uint32_t)clock_monotonic_us() ^ (uint32_t)getpid() * 2654435761u;
    snprintf(out, len, "dispatch_r_%08x_%d_%08x", h, (int)getpid(), rnd);
}

dispatcher_t *dispatcher_new(const dispatcher_options_t *opt, char *err, size_t errlen)
{
    dispatcher_t *d = calloc(1, sizeof *d);
    uint64_t seed = 0;

    if (!d) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    d->opt = *opt;
    d->nworkers = opt->connections > 0 ? opt->connections : 1;
    d->conninfo = strdup(opt->conninfo ? opt->conninfo : "");
    d->workers = calloc((size_t)d->nworkers, sizeof *d->workers);
    d->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    d->nodes_allowed = -1;
    if (!d->conninfo || !d->workers || d->efd < 0) {
        snprintf(err, errlen, "cannot set up the dispatcher: %s", d->efd < 0 ? strerror(errno) : "out of memory");
        dispatcher_free(d);
        return NULL;
    }
    d->opt.conninfo = d->conninfo;
    pthread_mutex_init(&d->mu, NULL);
    d->mutex_ready = true;
    waiters_init(&d->waiters);
    dispatcher_make_channel(d->channel, sizeof d->channel);
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (uint64_t)clock_monotonic_us();
    backoff_init(&d->backoff, 100, 5000, seed);
    return d;
}

int dispatcher_start(dispatcher_t *d, char *err, size_t errlen)
{
    int rc = pthread_create(&d->thread, NULL, dispatcher_main, d);

    if (rc != 0) {
        snprintf(err, errlen, "cannot start the dispatcher thread: %s", strerror(rc));
        return -1;
    }
    d->started = true;
    return 0;
}

void dispatcher_stop(dispatcher_t *d)
{
    if (!d || !d->started)
        return;
    atomic_store(&d->stop, true);
    dispatcher_wake(d);
    pthread_join(d->thread, NULL);
    d->started = false;
}

void dispatcher_free(dispatcher_t *d)
{
    if (!d)
        return;
    dispatcher_stop(d);
    dispatcher_close_all(d);
    for (int i = 0; d->workers && i < d->nworkers; i++) {
        worker_reset(&d->workers[i]);
        free(d->workers[i].calls);
        free(d->workers[i].ids.v);
        free(d->workers[i].created.v);
    }
    free(d->workers);
    for (size_t i = 0; i < d->nstuck; i++)
        free(d->stuck[i]);
    free(d->stuck);
    for (size_t i = 0; i < d->nkeys; i++)
        free(d->keys[i].key);
    free(d->result_ids.v);
    free(d->recent_submit.v);
    free(d->recent_results.v);
    for (size_t i = 0; i < d->norphans; i++)
        free(d->orphans[i].payload);
    free(d->orphans);
    free(d->scratch);
    free(d->cancels);
    free(d->inbox_cancels);
    free(d->pfds);
    free(d->pcalls);
    waiters_free(&d->waiters);
    if (d->efd >= 0)
        close(d->efd);
    if (d->mutex_ready)
        pthread_mutex_destroy(&d->mu);
    free(d->conninfo);
    free(d);
}
