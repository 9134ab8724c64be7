/* loop: the daemon's one thread: one wait (provider_wait) on provider transfers, the libpq
 * socket and the signal fd; the database connection's life (async connect, register,
 * LISTEN, one query in flight at a time: streamed chunks, outcomes and leases take
 * turns); timers; health; shutdown. Owns daemon_t. */
#include "loop.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "buf.h"
#include "clock.h"
#include "db.h"
#include "lease.h"
#include "log.h"
#include "relay.h"

#define WAKE_MARGIN_MS 5             /* look a little after next_wake, never before */
#define SHUTDOWN_FLUSH_MS 10000      /* after the grace period: time to settle and deregister */
#define RECONNECT_BASE_MS 100
#define RECONNECT_CAP_MS 5000
#define MAX_WAIT_MS 60000
#define MAX_BATCH_OUTCOMES 1000      /* outcomes per exchange */
#define MAX_BATCH_CHUNKS 1000        /* stream pieces per dispatch.stream call */
#define MAX_HOLD_US 5000             /* longest an outcome waits for others to join its exchange */
#define STANDBY_WAKE_MS 1000         /* a wake for other nodes: look this much later if none has */

/* The database connection's life; only db_set_state() changes it. */
typedef enum {
    DB_DOWN,         /* no connection: a connect starts at reconnect_at */
    DB_CONNECTING,   /* PQconnectPoll in progress */
    DB_SETUP,        /* register, LISTEN and prepare round trips in progress */
    DB_READY,        /* registered and listening: exchange, extend, report, deregister */
} db_state_t;

static const char *const db_state_names[] = { "down", "connecting", "setup", "ready" };

/* The one query in flight (at most one at a time on the connection). */
typedef enum {
    Q_NONE,
    Q_REGISTER,
    Q_LISTEN,
    Q_PREPARE,
    Q_EXCHANGE,
    Q_EXTEND,
    Q_REPORT,
    Q_DEREGISTER,
    Q_STREAM,
    Q_REFUSE_PUSHES,
} query_kind_t;

typedef struct {
    const daemon_config_t *cfg;
    provider_t *prov;
    int sigfd;

    /* What this node serves, from flags or discovery. */
    char **models;
    int nmodels;
    long capacity;               /* -1: unreported */
    char family[33];
    bool discovery_running;
    int discovery_pending;       /* probes outstanding */
    bool discovery_reached;      /* some discovery probe got an HTTP answer */
    long found_slots, found_running;
    bool props_ok, server_info_ok;
    char **found_models;
    int nfound_models;
    bool waiting_logged;

    /* Health of the local provider (probed over HTTP, never through the database). */
    bool probed_once;
    bool healthy;
    char reason[256];
    int64_t next_probe_at;

    /* Database connection. */
    PGconn *conn;
    db_state_t db;
    query_kind_t query;
    bool query_ok;               /* every result of the query in flight was OK */
    bool flush_pending;
    PostgresPollingStatusType connect_poll;
    backoff_t backoff;           /* reconnects */
    backoff_t error_backoff;     /* pauses after a statement failed */
    int64_t reconnect_at;
    int64_t pause_until;
    int64_t query_sent_at;
    bool registered_once;
    bool pushes_accepted;        /* this session told the database it takes pushed jobs */
    int node_id;
    char node_name[128];
    char node_channel[64];
    char *channels;              /* model channels, comma-separated */

    /* What the database believes about this node: written only on change. */
    bool db_healthy;
    long db_capacity;
    bool sent_healthy;
    long sent_capacity;

    /* Work. */
    lease_outbox_t outbox;
    buf_t param;
    lease_outbox_t chunks;       /* stream pieces waiting for the next dispatch.stream */
    buf_t chunk_param;
    bool last_was_stream;        /* the last batch sent was chunks: outcomes and leases go next */
    size_t isolate;              /* the next exchanges carry one outcome each */
    bool need_exchange;
    bool queue_seen_empty;       /* the last exchange found fewer jobs than it asked for, and no
                                  * notification or timer since says the queue changed: finished
                                  * jobs are reported with dispatch.settle, which leases nothing
                                  * (never true while need_exchange is) */
    int exchange_max_jobs;
    bool last_notify_was_push;   /* the notification read last pushed a job to this node */
    size_t prepared;             /* statements of PREPARED prepared on this connection */
    int64_t wake_at;             /* 0: sleep until a notification */
    int64_t standby_at;          /* look then unless a lease happened since (work woke other nodes) */
    int64_t first_outcome_us;    /* when the oldest unsent outcome arrived (monotonic us) */
    int64_t hold_until_us;       /* an exchange is held until then for more outcomes; 0: none */
    int64_t exchange_sent_us;
    int64_t rtt_us;              /* smoothed exchange round trip */
    int64_t service_us;          /* smoothed provider time of a job (its transfer alone) */
    uint64_t jobs_started, jobs_pushed, jobs_done, exchanges, stream_calls, pieces_relayed;

    /* Shutdown. */
    bool stopping;
    bool aborted_rest;
    int64_t grace_deadline;
    int64_t hard_deadline;
    bool done;
    int exit_code;
} daemon_t;

static void db_lost(daemon_t *d, const char *why);

/* The statements prepared on every connection, in this order: those sent many times a
 * second, which sent as text are parsed and planned again at each call (perf of B9: a
 * seventh of PostgreSQL's time went to that). */
static const struct {
    const char *name;
    const char *sql;
} PREPARED[] = {
    { LEASE_EXCHANGE_STMT, LEASE_SQL_EXCHANGE },
    { LEASE_SETTLE_STMT, LEASE_SQL_SETTLE },
    { LEASE_STREAM_STMT, LEASE_SQL_STREAM },
    { LEASE_EXTEND_STMT, LEASE_SQL_EXTEND },
};

/* Something may have queued work for this node: the next exchange leases. */
static void queue_changed(daemon_t *d)
{
    d->need_exchange = true;
    d->queue_seen_empty = false;
}

/* ------------------------------------------------------------------ helpers */

static long daemon_slots(const daemon_t *d)
{
    return d->capacity > 0 ? d->capacity : d->cfg->default_slots;
}

/* Leases held beyond the slots: they wait in the daemon and start as running jobs
 * end, so that no slot sits idle while the round trip that settles its last job and
 * leases its next one runs. Only while the provider answers faster than two round
 * trips: a job then waits here about as long as that round trip would have made it
 * wait anyway. With slower jobs, a lease kept waiting here could have been started
 * sooner by an idle node, so none is held. How many: in one round trip each slot
 * finishes rtt / service jobs, so that many per slot keep it busy until the next
 * leases come (as many as the slots at least, LOOP_LEASE_AHEAD_MAX_SLOTS times the
 * slots at most, so that a crash strands few). The database allows the extra leases
 * because the daemon tells it the allowance (set_lease_ahead) on connecting and with
 * every report of a new capacity. */
long loop_lease_ahead(long slots, long configured, int64_t service_us, int64_t rtt_us)
{
    int64_t ahead;

    if (configured == 0 || service_us <= 0 || rtt_us <= 0 || service_us > 2 * rtt_us)
        return 0;
    if (configured > 0)
        return configured;
    ahead = ((int64_t)slots * rtt_us + service_us - 1) / service_us;
    if (ahead < slots)
        ahead = slots;
    if (ahead > (int64_t)LOOP_LEASE_AHEAD_MAX_SLOTS * slots)
        ahead = (int64_t)LOOP_LEASE_AHEAD_MAX_SLOTS * slots;
    return (long)ahead;
}

long loop_lease_ahead_allowance(long slots, long configured)
{
    long most = configured >= 0 ? configured : LOOP_LEASE_AHEAD_MAX_SLOTS * slots;

    return most > 100000 ? 100000 : most;    /* set_lease_ahead's bound */
}

static long daemon_lease_ahead(const daemon_t *d)
{
    return loop_lease_ahead(daemon_slots(d), d->cfg->lease_ahead, d->service_us, d->rtt_us);
}

/* Leases to ask for: the slots and the lease-ahead allowance, less the jobs held. */
static int daemon_free_slots(const daemon_t *d)
{
    long free_slots = daemon_slots(d) + daemon_lease_ahead(d) - (long)provider_in_flight(d->prov);

    if (free_slots < 0)
        return 0;
    return free_slots > 10000 ? 10000 : (int)free_slots;
}

static bool daemon_may_lease(const daemon_t *d)
{
    return d->db == DB_READY && d->healthy && d->db_healthy && !d->stopping;
}

int loop_timeout_ms(int64_t now, const int64_t *deadlines, size_t count, int cap)
{
    int64_t best = cap;

    for (size_t i = 0; i < count; i++) {
        if (deadlines[i] == 0)
            continue;
        if (deadlines[i] - now < best)
            best = deadlines[i] - now;
    }
    return best < 0 ? 0 : (int)best;
}

int64_t loop_extend_due(const job_t *job)
{
    return job->lease_expires_mono - (job->lease_len_ms * 2) / 3;
}

static void queue_error(daemon_t *d, const job_t *job, const char *code, const char *message, bool retryable)
{
    lease_error_t e = { code, message, 0, NULL, 0, retryable };

    if (lease_outbox_add_error(&d->outbox, job->id, job->attempt, &e) != 0)
        log_error("outcome_dropped", "job=%" PRId64 " attempt=%d reason=out_of_memory next=lease_expiry",
                  job->id, (int)job->attempt);
}

/* ------------------------------------------------------------------ provider events */

static void on_job_done(void *ctx, const job_t *job, const provider_response_t *r)
{
    daemon_t *d = ctx;
    provider_verdict_t v;
    int rc;

    provider_classify(r, &v);
    d->jobs_done++;
    if (r->service_us > 0)
        d->service_us = d->service_us == 0 ? r->service_us : (d->service_us * 7 + r->service_us) / 8;
    if (d->outbox.count == d->outbox.sent)
        d->first_outcome_us = clock_monotonic_us();
    if (v.complete) {
        rc = lease_outbox_add_result(&d->outbox, job->id, job->attempt, v.result, v.result_len);
    } else {
        bool with_body = r->status > 0 && r->stream == NULL;
        lease_error_t e = { v.code, v.message, v.status, with_body ? r->body : NULL,
                            with_body ? r->body_len : 0, v.retryable };
        rc = lease_outbox_add_error(&d->outbox, job->id, job->attempt, &e);
        if (log_enabled(LOG_DEBUG)) {
            char q[400];
            log_debug("job_failed", "job=%" PRId64 " attempt=%d code=%s retryable=%s message=%s", job->id,
                      (int)job->attempt, v.code, v.retryable ? "true" : "false",
                      log_quote(q, sizeof q, v.message));
        }
    }
    if (rc != 0)
        log_error("outcome_dropped", "job=%" PRId64 " attempt=%d reason=out_of_memory next=lease_expiry",
                  job->id, (int)job->attempt);
    /* A refused connection or a timeout says more about the provider than about the
     * job: probe its health now instead of at the next interval. */
    if (v.provider_unreachable && !provider_probe_running(d->prov, PROBE_HEALTH)) {
        provider_start_probe(d->prov, PROBE_HEALTH);
        d->next_probe_at = clock_monotonic_ms() + d->cfg->health_interval_ms;
    }
}

/* A piece of a streaming job's event: queued for the next dispatch.stream. */
static int on_chunk(void *ctx, const job_t *job, uint32_t seq, bool more, const char *data, size_t len)
{
    daemon_t *d = ctx;

    if (lease_outbox_add_chunk(&d->chunks, job->id, job->attempt, seq, more, data, len) != 0) {
        log_error("chunk_dropped", "job=%" PRId64 " attempt=%d seq=%u reason=out_of_memory next=stream_broken",
                  job->id, (int)job->attempt, (unsigned)seq);
        return -1;
    }
    d->pieces_relayed++;
    return 0;
}

static void discovery_finish(daemon_t *d)
{
    char q[512];
    buf_t names = BUF_INIT;

    d->discovery_running = false;
    if (d->cfg->max_concurrency > 0)
        d->capacity = d->cfg->max_concurrency;
    else if (d->found_slots > 0)
        d->capacity = d->found_slots;
    else if (d->found_running > 0)
        d->capacity = d->found_running;
    if (d->cfg->provider_family == NULL)
        snprintf(d->family, sizeof d->family, "%s",
                 d->props_ok ? "llamacpp" : d->server_info_ok ? "sglang" : "openai");
    if (d->nmodels == 0 && d->nfound_models > 0) {
        d->models = d->found_models;
        d->nmodels = d->nfound_models;
        d->found_models = NULL;
        d->nfound_models = 0;
    }
    lease_free_list(d->found_models, d->nfound_models);
    d->found_models = NULL;
    d->nfound_models = 0;
    if (d->nmodels == 0) {
        if (!d->waiting_logged)
            log_warn("provider_not_ready", "reason=%s next=retry_every_health_interval",
                     log_quote(q, sizeof q, "no --models given and GET /v1/models listed none"));
        d->waiting_logged = true;
        return;
    }
    for (int i = 0; i < d->nmodels; i++) {
        if (i)
            buf_append_char(&names, ',');
        buf_append_str(&names, d->models[i]);
    }
    log_info("discovered", "family=%s capacity=%ld capacity_source=%s models=%s", d->family, d->capacity,
             d->cfg->max_concurrency > 0 ? "flag" : d->found_slots > 0 ? "props"
             : d->found_running > 0 ? "server_info" : "unreported",
             log_quote(q, sizeof q, names.data ? names.data : ""));
    buf_free(&names);
}

static void discovery_start(daemon_t *d)
{
    bool need_capacity = d->cfg->max_concurrency <= 0;
    bool need_family = d->cfg->provider_family == NULL;

    if (d->discovery_running)
        return;
    d->discovery_pending = 0;
    d->discovery_reached = false;
    d->props_ok = d->server_info_ok = false;
    d->found_slots = d->found_running = -1;
    if ((need_capacity || need_family) && provider_start_probe(d->prov, PROBE_PROPS))
        d->discovery_pending++;
    if ((need_capacity || need_family) && provider_start_probe(d->prov, PROBE_SERVER_INFO))
        d->discovery_pending++;
    if (d->nmodels == 0 && provider_start_probe(d->prov, PROBE_MODELS))
        d->discovery_pending++;
    d->discovery_running = d->discovery_pending > 0;
    if (!d->discovery_running) {
        d->discovery_reached = true;
        discovery_finish(d);
    }
}

static void on_probe_done(void *ctx, probe_kind_t kind, const provider_response_t *r)
{
    daemon_t *d = ctx;
    bool answered = r->curl_code == CURLE_OK && r->status >= 200 && r->status < 300;

    if (kind == PROBE_HEALTH) {
        char reason[256];
        bool ok = provider_probe_healthy(r, reason, sizeof reason);
        char q[300];

        d->probed_once = true;
        if (ok && !d->healthy) {
            d->healthy = true;
            d->reason[0] = '\0';
            log_info("provider_healthy", "next=%s", d->db == DB_READY ? "report_and_lease" : "lease_when_connected");
            if (!d->discovery_reached && !d->discovery_running)
                discovery_start(d);
        } else if (!ok && d->healthy) {
            d->healthy = false;
            snprintf(d->reason, sizeof d->reason, "%s", reason);
            log_warn("provider_degraded", "reason=%s in_flight=%zu next=stop_leasing",
                     log_quote(q, sizeof q, reason), provider_in_flight(d->prov));
        } else if (ok && d->nmodels == 0 && !d->discovery_running) {
            discovery_start(d);   /* still waiting for a model list */
        }
        return;
    }
    if (r->curl_code == CURLE_OK && r->status > 0)
        d->discovery_reached = true;
    if (answered && kind == PROBE_PROPS) {
        d->found_slots = provider_parse_total_slots(r->body, r->body_len);
        d->props_ok = d->found_slots > 0;
    } else if (answered && kind == PROBE_SERVER_INFO) {
        d->found_running = provider_parse_max_running(r->body, r->body_len);
        d->server_info_ok = d->found_running > 0;
    } else if (answered && kind == PROBE_MODELS) {
        lease_free_list(d->found_models, d->nfound_models);
        d->nfound_models = provider_parse_models(r->body, r->body_len, &d->found_models);
        if (d->nfound_models < 0)
            d->nfound_models = 0;
    }
    if (--d->discovery_pending == 0)
        discovery_finish(d);
}

static const provider_events_t provider_events = { on_job_done, on_probe_done };

/* ------------------------------------------------------------------ database: sending */

static void db_set_state(daemon_t *d, db_state_t s)
{
    log_debug("db_state", "from=%s to=%s", db_state_names[d->db], db_state_names[s]);
    d->db = s;
}

/* Sends one statement: executes the prepared statement stmt when it is set, or
 * prepares sql as stmt for Q_PREPARE. False when the connection broke (already
 * handled). */
static bool db_send(daemon_t *d, query_kind_t kind, const char *sql, const char *stmt, int nparams,
                    const char *const *values)
{
    int ok, flushed;

    if (kind == Q_PREPARE)
        ok = PQsendPrepare(d->conn, stmt, sql, 0, NULL);
    else if (stmt != NULL)
        ok = PQsendQueryPrepared(d->conn, stmt, nparams, values, NULL, NULL, 0);
    else if (nparams == 0 && kind == Q_LISTEN)
        ok = PQsendQuery(d->conn, sql);
    else
        ok = PQsendQueryParams(d->conn, sql, nparams, NULL, values, NULL, NULL, 0);
    if (!ok) {
        db_lost(d, PQerrorMessage(d->conn));
        return false;
    }
    d->query = kind;
    d->query_ok = true;
    d->query_sent_at = clock_monotonic_ms();
    flushed = PQflush(d->conn);
    if (flushed < 0) {
        db_lost(d, PQerrorMessage(d->conn));
        return false;
    }
    d->flush_pending = flushed == 1;
    return true;
}

/* The attempts this daemon still answers for: running transfers and outcomes not
 * yet settled. register takes back every other lease the node holds (granted in a
 * reply lost with the old connection, or left by a previous incarnation). */
static void build_holding(daemon_t *d, buf_t *out)
{
    size_t n = provider_in_flight(d->prov);
    bool first = true;

    buf_append_char(out, '[');
    for (size_t i = 0; i < n; i++) {
        const job_t *j = provider_job_at(d->prov, i);
        buf_printf(out, "%s{\"id\":%lld,\"attempt\":%d}", first ? "" : ",", (long long)j->id, (int)j->attempt);
        first = false;
    }
    for (size_t i = 0; i < d->outbox.count; i++) {
        buf_printf(out, "%s{\"id\":%lld,\"attempt\":%d}", first ? "" : ",",
                   (long long)d->outbox.meta[i].id, (int)d->outbox.meta[i].attempt);
        first = false;
    }
    buf_append_char(out, ']');
}

static void send_register(daemon_t *d)
{
    buf_t models = BUF_INIT;
    buf_t holding = BUF_INIT;
    char cap[24];
    const char *values[6];

    lease_text_array(&models, (const char *const *)d->models, (size_t)d->nmodels);
    snprintf(cap, sizeof cap, "%ld", d->capacity);
    values[0] = d->family;
    values[1] = models.data;
    values[2] = d->capacity > 0 ? cap : NULL;
    values[3] = d->cfg->region;
    values[4] = d->cfg->labels;
    build_holding(d, &holding);
    values[5] = holding.oom ? NULL : holding.data;   /* NULL: take nothing back */
    d->sent_capacity = d->capacity;
    db_send(d, Q_REGISTER, LEASE_SQL_REGISTER, NULL, 6, values);
    buf_free(&models);
    buf_free(&holding);
}

static void send_listen(daemon_t *d)
{
    buf_t sql = BUF_INIT;
    char *list = d->channels ? strdup(d->channels) : NULL;
    char *save = NULL;
    char *esc = PQescapeIdentifier(d->conn, d->node_channel, strlen(d->node_channel));

    if (esc) {
        buf_printf(&sql, "LISTEN %s;", esc);
        PQfreemem(esc);
    }
    for (char *c = list ? strtok_r(list, ",", &save) : NULL; c; c = strtok_r(NULL, ",", &save)) {
        esc = PQescapeIdentifier(d->conn, c, strlen(c));
        if (esc) {
            buf_printf(&sql, "LISTEN %s;", esc);
            PQfreemem(esc);
        }
    }
    free(list);
    /* What the database lets this node hold beyond its slots (see loop_lease_ahead),
     * and that submits may hand it jobs directly: in the LISTEN's transaction, so that
     * no pushed job can come before this session listens. */
    buf_printf(&sql, "SELECT dispatch.set_lease_ahead(%ld); SELECT dispatch.accept_pushes(true);",
               loop_lease_ahead_allowance(daemon_slots(d), d->cfg->lease_ahead));
    if (sql.oom || sql.data == NULL)
        db_lost(d, "out of memory building LISTEN");
    else
        db_send(d, Q_LISTEN, sql.data, NULL, 0, NULL);
    buf_free(&sql);
}

/* Settles up to `ready` outcomes (those whose jobs have no chunk left to send) and
 * leases up to max_jobs: with dispatch.exchange, or with dispatch.settle when it is to
 * lease nothing (the same settlement, without exchange's look at the queue). */
static void send_exchange(daemon_t *d, int max_jobs, size_t ready)
{
    char max[16];
    const char *values[2];
    size_t limit = d->isolate > 0 ? 1 : MAX_BATCH_OUTCOMES;
    size_t n;

    if (limit > ready)
        limit = ready;
    n = lease_outbox_take(&d->outbox, limit, &d->param);
    if (d->param.oom) {
        lease_outbox_sent_retry(&d->outbox);
        log_error("exchange_skipped", "reason=out_of_memory outcomes=%zu", n);
        d->pause_until = clock_monotonic_ms() + backoff_next_ms(&d->error_backoff);
        return;
    }
    snprintf(max, sizeof max, "%d", max_jobs);
    values[0] = d->param.data;
    values[1] = max;
    d->exchange_max_jobs = max_jobs;
    if (max_jobs > 0) {
        d->need_exchange = false;
        d->standby_at = 0;           /* this exchange looks at the queue as it is now */
    }
    d->exchanges++;
    d->hold_until_us = 0;
    d->exchange_sent_us = clock_monotonic_us();
    d->last_was_stream = false;
    if (max_jobs > 0) {
        log_debug("exchange", "outcomes=%zu max_jobs=%d", n, max_jobs);
        db_send(d, Q_EXCHANGE, NULL, LEASE_EXCHANGE_STMT, 2, values);
    } else {
        /* A pending wake may have been for leases this call settles: ask again. */
        values[1] = d->wake_at ? "true" : "false";
        log_debug("settle", "outcomes=%zu wake=%s", n, values[1]);
        db_send(d, Q_EXCHANGE, NULL, LEASE_SETTLE_STMT, 2, values);
    }
}

/* Relays every waiting stream piece (up to a batch) in one dispatch.stream call. Its
 * transaction does not wait for a disk flush (the function says so itself). */
static void send_stream(daemon_t *d)
{
    const char *values[1];
    size_t n = lease_outbox_take(&d->chunks, MAX_BATCH_CHUNKS, &d->chunk_param);

    if (d->chunk_param.oom) {
        lease_outbox_sent_retry(&d->chunks);
        log_error("stream_skipped", "reason=out_of_memory pieces=%zu", n);
        d->pause_until = clock_monotonic_ms() + backoff_next_ms(&d->error_backoff);
        return;
    }
    values[0] = d->chunk_param.data;
    d->last_was_stream = true;
    d->stream_calls++;
    log_debug("stream", "pieces=%zu", n);
    db_send(d, Q_STREAM, NULL, LEASE_STREAM_STMT, 1, values);
}

/* Renews every lease due within the next sixth of a lease, in one statement. */
static bool send_extend_if_due(daemon_t *d, int64_t now)
{
    buf_t ids = BUF_INIT, attempts = BUF_INIT;
    size_t n = provider_in_flight(d->prov);
    int count = 0;
    bool due = false;
    const char *values[2];

    for (size_t i = 0; i < n; i++) {
        job_t *j = provider_job_at(d->prov, i);
        if (!j->extending && loop_extend_due(j) <= now)
            due = true;
    }
    if (!due)
        return false;
    buf_append_char(&ids, '{');
    buf_append_char(&attempts, '{');
    for (size_t i = 0; i < n; i++) {
        job_t *j = provider_job_at(d->prov, i);
        if (j->extending || loop_extend_due(j) > now + j->lease_len_ms / 6)
            continue;
        buf_printf(&ids, "%s%" PRId64, count ? "," : "", j->id);
        buf_printf(&attempts, "%s%d", count ? "," : "", (int)j->attempt);
        j->extending = true;
        count++;
    }
    buf_append_char(&ids, '}');
    buf_append_char(&attempts, '}');
    values[0] = ids.data;
    values[1] = attempts.data;
    log_debug("extend", "jobs=%d", count);
    if (!ids.oom && !attempts.oom)
        db_send(d, Q_EXTEND, NULL, LEASE_EXTEND_STMT, 2, values);
    buf_free(&ids);
    buf_free(&attempts);
    return true;
}

static void send_report(daemon_t *d)
{
    char cap[24], ahead[24];
    const char *values[4];

    snprintf(cap, sizeof cap, "%ld", d->capacity);
    d->sent_healthy = d->healthy;
    d->sent_capacity = d->capacity;
    values[0] = d->healthy ? "healthy" : "degraded";
    values[1] = d->healthy ? NULL : d->reason;
    values[2] = d->capacity > 0 ? cap : NULL;
    /* The allowance follows the slots (a capacity found after connecting changes both). */
    snprintf(ahead, sizeof ahead, "%ld", loop_lease_ahead_allowance(daemon_slots(d), d->cfg->lease_ahead));
    values[3] = ahead;
    db_send(d, Q_REPORT, LEASE_SQL_REPORT, NULL, 4, values);
}

static void clear_extending(daemon_t *d)
{
    size_t n = provider_in_flight(d->prov);

    for (size_t i = 0; i < n; i++)
        provider_job_at(d->prov, i)->extending = false;
}

/* Whether to hold the outcomes a little longer so that transfers about to finish
 * join the same exchange. Every exchange is a commit (an fsync, and a global lock
 * when it notifies), so under load fewer, fuller exchanges are what throughput is
 * made of; but holding costs result latency and idle slots. So: hold only while
 * other transfers are running, never when new work is waiting, and at most half
 * the measured round trip (capped): when the database answers fast, there is
 * little to gain from waiting. */
static bool exchange_should_hold(daemon_t *d)
{
    int64_t now_us, limit;

    if (provider_in_flight(d->prov) == 0 || d->need_exchange || d->stopping || !daemon_may_lease(d) ||
        d->outbox.count >= MAX_BATCH_OUTCOMES || d->isolate > 0)
        return false;
    limit = d->rtt_us / 2 < MAX_HOLD_US ? d->rtt_us / 2 : MAX_HOLD_US;
    now_us = clock_monotonic_us();
    if (now_us - d->first_outcome_us >= limit)
        return false;
    d->hold_until_us = d->first_outcome_us + limit;
    return true;
}

/* Picks the next statement, if any may be sent now. Order: tell the database about a
 * health or capacity change; renew leases; relay stream pieces; settle outcomes
 * (leasing in the same round trip); lease on a wake; deregister at the end of a
 * shutdown. Pieces go first, but after a stream call an exchange that has something
 * to do goes next, so a steady flow of chunks starves neither completions nor
 * leasing. A job's outcome never overtakes its own pieces: the exchange carries only
 * the outcomes in front of the first one whose job still has pieces waiting, so the
 * gateway hears every chunk before the completion. */
static void maybe_send(daemon_t *d, int64_t now)
{
    size_t ready;
    bool lease_wanted, exchange_wanted;

    provider_set_max_active(d->prov, (size_t)daemon_slots(d));
    if (d->db != DB_READY || d->query != Q_NONE || now < d->pause_until)
        return;
    /* A daemon that stops takes no more pushed jobs: say so before anything else. */
    if (d->stopping && d->pushes_accepted) {
        db_send(d, Q_REFUSE_PUSHES, LEASE_SQL_REFUSE_PUSHES, NULL, 0, NULL);
        return;
    }
    if (d->healthy != d->db_healthy || d->capacity != d->db_capacity) {
        send_report(d);
        return;
    }
    if (send_extend_if_due(d, now))
        return;
    /* Collect what finished since the last look, so it rides in this round trip. */
    provider_run(d->prov, &provider_events, d);
    ready = lease_outbox_ready_prefix(&d->outbox, &d->chunks);
    lease_wanted = d->need_exchange && daemon_may_lease(d) && daemon_free_slots(d) > 0;
    exchange_wanted = ready > 0 || lease_wanted;
    if (d->chunks.count > 0 && (!d->last_was_stream || !exchange_wanted)) {
        send_stream(d);
        return;
    }
    if (ready > 0) {
        if (exchange_should_hold(d)) {
            if (d->chunks.count > 0)
                send_stream(d);
            return;
        }
        send_exchange(d, daemon_may_lease(d) && !d->queue_seen_empty ? daemon_free_slots(d) : 0, ready);
        return;
    }
    if (lease_wanted) {
        send_exchange(d, daemon_free_slots(d), 0);
        return;
    }
    if (d->stopping && d->aborted_rest && d->outbox.count == 0)
        db_send(d, Q_DEREGISTER, LEASE_SQL_DEREGISTER, NULL, 0, NULL);
}

/* ------------------------------------------------------------------ database: connection */

static void db_close(daemon_t *d)
{
    if (d->conn)
        PQfinish(d->conn);
    d->conn = NULL;
    d->query = Q_NONE;
    d->flush_pending = false;
    lease_outbox_sent_retry(&d->outbox);
    /* Pieces in a stream call whose outcome is unknown go again after the reconnect:
     * a gateway that already has them sees a seq it has passed. */
    lease_outbox_sent_retry(&d->chunks);
    d->last_was_stream = false;
    d->pushes_accepted = false;      /* it held for that session only */
    d->last_notify_was_push = false;
    clear_extending(d);
    db_set_state(d, DB_DOWN);
}

/* The connection is gone: in-flight transfers go on, outcomes wait in the outbox,
 * and a reconnect is scheduled with capped, jittered backoff. */
static void db_lost(daemon_t *d, const char *why_text)
{
    char q[512], why[400];
    int64_t wait = backoff_next_ms(&d->backoff);
    bool was_ready = d->db == DB_READY || d->db == DB_SETUP;
    size_t n;

    /* why_text may point into the connection (PQerrorMessage): copy before closing. */
    snprintf(why, sizeof why, "%s", why_text && *why_text ? why_text : "unknown");
    n = strlen(why);
    while (n > 0 && (why[n - 1] == '\n' || why[n - 1] == ' '))
        why[--n] = '\0';
    for (char *c = why; *c; c++) {
        if (*c == '\n' || *c == '\t')
            *c = ' ';
    }
    db_close(d);
    d->reconnect_at = clock_monotonic_ms() + wait;
    if (was_ready)
        log_warn("db_connection_lost", "reason=%s in_flight=%zu outcomes_waiting=%zu next=reconnect_in_ms:%" PRId64,
                 log_quote(q, sizeof q, why), provider_in_flight(d->prov), d->outbox.count, wait);
    else
        log_warn("db_connect_failed", "reason=%s next=reconnect_in_ms:%" PRId64,
                 log_quote(q, sizeof q, why), wait);
}

/* Server notices and errors that arrive outside a query (such as "terminating
 * connection due to administrator command") go to the log, not to bare stderr. */
static void db_notice(void *arg, const PGresult *res)
{
    const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY);
    const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    char q[400];

    (void)arg;
    log_info("db_notice", "severity=%s message=%s", severity ? severity : "NOTICE",
             log_quote(q, sizeof q, message ? message : ""));
}

/* Starts a non-blocking connect with db_connect's keepalive settings unless the
 * connection string sets them. */
static void db_start_connect(daemon_t *d)
{
    char err[512];

    d->conn = db_connect_start(d->cfg->database_url, "pgdispatch-daemon", err, sizeof err);
    if (d->conn == NULL) {
        db_lost(d, err);
        return;
    }
    if (PQstatus(d->conn) == CONNECTION_BAD) {
        db_lost(d, PQerrorMessage(d->conn));
        return;
    }
    PQsetNoticeReceiver(d->conn, db_notice, d);
    d->connect_poll = PGRES_POLLING_WRITING;
    db_set_state(d, DB_CONNECTING);
    if (d->registered_once)
        log_debug("db_reconnecting", "in_flight=%zu outcomes_waiting=%zu", provider_in_flight(d->prov),
                 d->outbox.count);
}

static void db_connect_step(daemon_t *d)
{
    d->connect_poll = PQconnectPoll(d->conn);
    if (d->connect_poll == PGRES_POLLING_FAILED) {
        db_lost(d, PQerrorMessage(d->conn));
        return;
    }
    if (d->connect_poll != PGRES_POLLING_OK)
        return;
    if (PQsetnonblocking(d->conn, 1) != 0) {
        db_lost(d, PQerrorMessage(d->conn));
        return;
    }
    db_set_state(d, DB_SETUP);
    send_register(d);
}

/* True when the error means the session is gone (connection failure, admin shutdown),
 * so the right answer is to reconnect rather than to retry on this connection. */
static bool error_is_connection(const PGconn *conn, const char *sqlstate)
{
    return db_connection_lost(conn) || db_sqlstate_session_lost(sqlstate);
}

/* ------------------------------------------------------------------ database: results */

/* An attempt this daemon no longer answers for (a stream that cannot be relayed, a
 * lease register says is gone): its transfer stops, its waiting pieces and any
 * outcome not yet sent are dropped. */
static void forget_attempt(daemon_t *d, int64_t id, int32_t attempt)
{
    provider_abort_job(d->prov, id, attempt);
    lease_outbox_drop_job(&d->chunks, id, attempt);
    lease_outbox_drop_job(&d->outbox, id, attempt);
}

/* The held attempts register says are not this node's leases. After a database crash
 * a lost job's id can come round as another client's job, pushed or leased to this
 * node as the same attempt: its old answer must not settle that one, so it goes now,
 * before this session leases or takes pushes. */
static void drop_stale_holding(daemon_t *d, const char *list)
{
    const char *cursor = list;
    int64_t id;
    int32_t attempt;
    char q[200];

    while (lease_pair_next(&cursor, &id, &attempt)) {
        log_warn("lease_gone", "job=%" PRId64 " attempt=%d next=drop_transfer_and_result "
                 "reason=\"no longer this node's lease after reconnecting (lost in a database crash, "
                 "or taken back while away)\"", id, attempt);
        forget_attempt(d, id, attempt);
    }
    if (*cursor != '\0')
        log_error("register_stale_unreadable", "rest=%s next=continue", log_quote(q, sizeof q, cursor));
}

static void on_register_result(daemon_t *d, const PGresult *res, const char *sqlstate, const char *err)
{
    char q[600];

    if (err != NULL) {
        if (error_is_connection(d->conn, sqlstate)) {
            db_lost(d, err);
            return;
        }
        if (strcmp(sqlstate, "PD006") == 0 && !d->registered_once) {
            log_error("register_refused", "reason=%s next=exit status=3",
                      log_quote(q, sizeof q, "another daemon is already running with this node's identity: "
                                              "stop it first (or end its session); two daemons must not share a node"));
            log_error("register_refused", "detail=%s", log_quote(q, sizeof q, err));
            d->exit_code = DAEMON_EXIT_DUPLICATE;
            d->done = true;
            return;
        }
        if (!d->registered_once) {
            bool identity = strcmp(sqlstate, "PD005") == 0 || strcmp(sqlstate, "42501") == 0;
            log_error("register_refused", "reason=%s next=exit status=1%s", log_quote(q, sizeof q, err),
                      identity ? " hint=\"log in with the role that SELECT dispatch.enroll('<node name>') "
                                 "returned to an operator\"" : "");
            d->exit_code = DAEMON_EXIT_FAILED;
            d->done = true;
            return;
        }
        /* Re-registering: our own old session may still hold the node until its
         * keepalives give up. Try again later. */
        db_lost(d, err);
        return;
    }
    if (PQntuples(res) != 1) {
        db_lost(d, "register returned no row");
        return;
    }
    d->node_id = atoi(PQgetvalue(res, 0, 0));
    snprintf(d->node_name, sizeof d->node_name, "%s", PQgetvalue(res, 0, 1));
    snprintf(d->node_channel, sizeof d->node_channel, "%s", PQgetvalue(res, 0, 2));
    free(d->channels);
    d->channels = strdup(PQgetvalue(res, 0, 3));
    d->db_healthy = true;            /* register marks the node healthy */
    d->db_capacity = d->sent_capacity;
    if (PQnfields(res) > 4 && !PQgetisnull(res, 0, 4))
        drop_stale_holding(d, PQgetvalue(res, 0, 4));
}

/* Times in the row count from the database's now(), which lies before receiving it.
 * The lease is placed from lease_from, at or before that moment (renewed a little
 * early), the deadline from the receive time plus a millisecond (aborted a little
 * late), so that when the abort is settled the database agrees the deadline has
 * passed and records the job as expired. */
static void start_job_row(daemon_t *d, const lease_row_t *row, int64_t received_at, int64_t lease_from)
{
    job_t job = { 0 };

    job.id = row->id;
    job.attempt = row->attempt;
    job.deadline_mono = row->has_deadline ? received_at + 1 + (row->deadline_in_ms > 0 ? row->deadline_in_ms : 0) : 0;
    job.lease_len_ms = row->lease_in_ms > 0 ? row->lease_in_ms : 1;
    job.lease_expires_mono = lease_from + job.lease_len_ms;
    job.stream = relay_requested(row->payload, row->payload_len);
    if (provider_start_job(d->prov, &job, row->endpoint, row->payload, row->payload_len) == NULL) {
        queue_error(d, &job, "internal", "the daemon could not start the transfer (out of memory)", true);
        return;
    }
    d->jobs_started++;
    log_debug("job_started", "job=%" PRId64 " attempt=%d model=%s", job.id, (int)job.attempt, row->model);
}

static void on_exchange_result(daemon_t *d, const PGresult *res, const char *sqlstate, const char *err)
{
    int64_t now = clock_monotonic_ms();
    bool woke = false;
    int n;
    char q[600];

    if (err != NULL) {
        size_t sent = d->outbox.sent;

        if (error_is_connection(d->conn, sqlstate)) {
            db_lost(d, err);
            return;
        }
        log_error("exchange_failed", "sqlstate=%s reason=%s outcomes=%zu next=retry_after_pause",
                  sqlstate, log_quote(q, sizeof q, err), sent);
        if (db_sqlstate_transient(sqlstate)) {
            /* Nothing was settled, and nothing in the batch is to blame: all of it
             * goes again as it is. */
            lease_outbox_sent_retry(&d->outbox);
        } else if (sent == 1) {
            /* This one outcome is what the database refuses: settle it as an error. */
            if (!lease_outbox_sent_refused(&d->outbox, "the control plane refused the provider's result"))
                log_error("outcome_dropped", "reason=refused_twice next=lease_expiry");
        } else {
            d->isolate = sent;       /* find the bad one: one outcome per exchange */
            lease_outbox_sent_retry(&d->outbox);
        }
        d->pause_until = now + backoff_next_ms(&d->error_backoff);
        return;
    }
    lease_outbox_sent_done(&d->outbox);
    if (d->isolate > 0)
        d->isolate--;
    {
        int64_t rtt = clock_monotonic_us() - d->exchange_sent_us;
        d->rtt_us = d->rtt_us == 0 ? rtt : (d->rtt_us * 7 + rtt) / 8;
    }
    backoff_reset(&d->error_backoff);
    n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        lease_row_t row;

        if (!lease_row_parse(res, i, &row)) {
            log_error("exchange_row_unreadable", "row=%d", i);
            continue;
        }
        switch (row.kind) {
        case LEASE_ROW_JOB:
            start_job_row(d, &row, now, d->query_sent_at);
            break;
        case LEASE_ROW_STALE:
            log_info("lease_refused", "job=%" PRId64 " attempt=%d next=result_dropped "
                     "reason=\"the attempt no longer holds its lease (taken back, cancelled or requeued)\"",
                     row.id, (int)row.attempt);
            break;
        case LEASE_ROW_WAKE:
            woke = true;
            d->wake_at = row.has_lease ? now + (row.lease_in_ms > 0 ? row.lease_in_ms : 0) + WAKE_MARGIN_MS : 0;
            break;
        default:
            break;
        }
    }
    if (d->exchange_max_jobs > 0) {
        /* Took all it asked for: the next exchange looks again; so it does when a
         * notification came while this one ran (it set need_exchange). */
        d->queue_seen_empty = woke && !d->need_exchange;
        if (!woke)
            d->wake_at = 0;
    }
    provider_kick(d->prov);
}

static void on_extend_result(daemon_t *d, const PGresult *res, const char *sqlstate, const char *err)
{
    int n;
    char q[600];

    if (err != NULL) {
        if (error_is_connection(d->conn, sqlstate)) {
            db_lost(d, err);
            return;
        }
        log_error("extend_failed", "sqlstate=%s reason=%s next=retry_after_pause", sqlstate,
                  log_quote(q, sizeof q, err));
        clear_extending(d);
        d->pause_until = clock_monotonic_ms() + backoff_next_ms(&d->error_backoff);
        return;
    }
    n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        int attempt = atoi(PQgetvalue(res, i, 1));
        bool ok = PQgetvalue(res, i, 2)[0] == 't';
        job_t *j = provider_find_job(d->prov, id);

        if (j == NULL || j->attempt != attempt)
            continue;
        j->extending = false;
        if (ok && !PQgetisnull(res, i, 3)) {
            /* The renewal's length sets the next one's schedule (a pushed job's first
             * lease is short: push_lease_seconds). */
            int64_t len = strtoll(PQgetvalue(res, i, 3), NULL, 10);
            j->lease_len_ms = len > 0 ? len : 1;
            j->lease_expires_mono = d->query_sent_at + j->lease_len_ms;
        } else {
            log_info("lease_lost", "job=%" PRId64 " attempt=%d next=abort_transfer "
                     "reason=\"the attempt no longer holds its lease\"", id, attempt);
            provider_abort_job(d->prov, id, attempt);
        }
    }
}

static void on_stream_result(daemon_t *d, const PGresult *res, const char *sqlstate, const char *err)
{
    char q[600];
    int n;

    if (err != NULL) {
        size_t sent = d->chunks.sent;
        int64_t last_id = -1;
        int32_t last_attempt = -1;
        int64_t *ids;
        int32_t *attempts;
        size_t njobs = 0;

        if (error_is_connection(d->conn, sqlstate)) {
            db_lost(d, err);
            return;
        }
        if (db_sqlstate_transient(sqlstate)) {
            /* Nothing was relayed: the same pieces go again, in order, after the pause. */
            log_error("stream_failed", "sqlstate=%s reason=%s pieces=%zu next=retry_after_pause", sqlstate,
                      log_quote(q, sizeof q, err), sent);
            lease_outbox_sent_retry(&d->chunks);
            d->pause_until = clock_monotonic_ms() + backoff_next_ms(&d->error_backoff);
            return;
        }
        /* The database refuses these pieces: their streams cannot go on without a gap,
         * so those jobs fail (not retryable: their clients may have earlier chunks). */
        log_error("stream_failed", "sqlstate=%s reason=%s pieces=%zu next=fail_those_streams", sqlstate,
                  log_quote(q, sizeof q, err), sent);
        ids = malloc((sent ? sent : 1) * sizeof *ids);
        attempts = malloc((sent ? sent : 1) * sizeof *attempts);
        for (size_t i = 0; ids && attempts && i < sent; i++) {
            const lease_outcome_meta_t *m = &d->chunks.meta[i];
            if (m->id == last_id && m->attempt == last_attempt)
                continue;
            last_id = m->id;
            last_attempt = m->attempt;
            ids[njobs] = m->id;
            attempts[njobs++] = m->attempt;
        }
        lease_outbox_sent_done(&d->chunks);
        for (size_t i = 0; i < njobs; i++) {
            job_t gone = { 0 };
            gone.id = ids[i];
            gone.attempt = attempts[i];
            forget_attempt(d, gone.id, gone.attempt);
            queue_error(d, &gone, "stream_broken", "the control plane refused the stream's chunks", false);
        }
        free(ids);
        free(attempts);
        d->pause_until = clock_monotonic_ms() + backoff_next_ms(&d->error_backoff);
        return;
    }
    lease_outbox_sent_done(&d->chunks);
    backoff_reset(&d->error_backoff);
    n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        int attempt = atoi(PQgetvalue(res, i, 1));

        if (PQgetvalue(res, i, 2)[0] == 't')
            continue;
        log_info("stream_refused", "job=%" PRId64 " attempt=%d next=abort_transfer "
                 "reason=\"the attempt no longer holds its lease (cancelled or taken back)\"", id, attempt);
        forget_attempt(d, id, attempt);
    }
}

static void on_report_result(daemon_t *d, const char *sqlstate, const char *err)
{
    char q[600];

    if (err != NULL) {
        if (error_is_connection(d->conn, sqlstate)) {
            db_lost(d, err);
            return;
        }
        log_error("report_failed", "sqlstate=%s reason=%s next=retry_after_pause", sqlstate,
                  log_quote(q, sizeof q, err));
        d->pause_until = clock_monotonic_ms() + backoff_next_ms(&d->error_backoff);
        return;
    }
    d->db_healthy = d->sent_healthy;
    d->db_capacity = d->sent_capacity;
    log_info("reported", "node=%s health=%s capacity=%ld reason=%s", d->node_name,
             d->db_healthy ? "healthy" : "degraded", d->db_capacity,
             log_quote(q, sizeof q, d->db_healthy ? "" : d->reason));
    if (d->db_healthy)
        queue_changed(d);            /* catch up on what queued while degraded */
}

static void on_deregister_result(daemon_t *d, const PGresult *res, const char *sqlstate, const char *err)
{
    char q[600];

    if (err != NULL) {
        log_error("deregister_failed", "sqlstate=%s reason=%s next=exit", sqlstate, log_quote(q, sizeof q, err));
        d->exit_code = DAEMON_EXIT_FAILED;
    } else {
        log_info("deregistered", "node=%s handed_back=%s", d->node_name, PQgetvalue(res, 0, 0));
    }
    d->done = true;
}

/* One result of the query in flight. */
static void on_result(daemon_t *d, const PGresult *res)
{
    char sqlstate[6] = "";
    char err[1024];
    bool ok = db_result_ok(res, d->conn, sqlstate, err, sizeof err);
    const char *e = ok ? NULL : err;

    if (!ok)
        d->query_ok = false;
    switch (d->query) {
    case Q_REGISTER:
        on_register_result(d, res, sqlstate, e);
        break;
    case Q_LISTEN:
    case Q_PREPARE:
        if (!ok)
            db_lost(d, err);
        break;
    case Q_EXCHANGE:
        on_exchange_result(d, res, sqlstate, e);
        break;
    case Q_EXTEND:
        on_extend_result(d, res, sqlstate, e);
        break;
    case Q_REPORT:
        on_report_result(d, sqlstate, e);
        break;
    case Q_DEREGISTER:
        on_deregister_result(d, res, sqlstate, e);
        break;
    case Q_STREAM:
        on_stream_result(d, res, sqlstate, e);
        break;
    case Q_REFUSE_PUSHES:
        /* Asked once: if it failed, at most a few more pushes arrive, and deregister
         * hands back any that are not run. */
        d->pushes_accepted = false;
        if (e != NULL && error_is_connection(d->conn, sqlstate)) {
            db_lost(d, e);
        } else if (e != NULL) {
            char q[1100];
            log_error("refuse_pushes_failed", "sqlstate=%s reason=%s next=continue_shutdown", sqlstate,
                      log_quote(q, sizeof q, e));
        }
        break;
    case Q_NONE:
        break;
    }
}

/* The query in flight has delivered all its results: the setup chain moves on. */
static void on_query_done(daemon_t *d, query_kind_t kind)
{
    char q[600];

    if (!d->query_ok || d->conn == NULL)
        return;
    switch (kind) {
    case Q_REGISTER:
        send_listen(d);
        break;
    case Q_LISTEN:
        d->pushes_accepted = true;
        d->prepared = 0;
        db_send(d, Q_PREPARE, PREPARED[0].sql, PREPARED[0].name, 0, NULL);
        break;
    case Q_PREPARE:
        if (++d->prepared < sizeof PREPARED / sizeof PREPARED[0]) {
            db_send(d, Q_PREPARE, PREPARED[d->prepared].sql, PREPARED[d->prepared].name, 0, NULL);
            break;
        }
        db_set_state(d, DB_READY);
        backoff_reset(&d->backoff);
        queue_changed(d);            /* notifications sent while away are gone: catch up */
        log_info(d->registered_once ? "reregistered" : "registered",
                 "node=%s node_id=%d family=%s capacity=%ld slots=%ld in_flight=%zu outcomes_waiting=%zu channels=%s",
                 d->node_name, d->node_id, d->family, d->capacity, daemon_slots(d), provider_in_flight(d->prov),
                 d->outbox.count, log_quote(q, sizeof q, d->channels ? d->channels : ""));
        d->registered_once = true;
        break;
    default:
        break;
    }
}

/* A job a submit handed this node (dispatch.accept_pushes): already leased to it, so
 * it starts now, like a leased one. Its lease began at the submit, a moment before the
 * notification: the few milliseconds are far inside the renewal margin (a third). */
static void on_push(daemon_t *d, char *text)
{
    lease_row_t row;
    char model[LEASE_MODEL_MAX + 1];
    int64_t now = clock_monotonic_ms();
    char q[200];

    if (!lease_push_parse(text, &row, model, sizeof model)) {
        log_error("push_unreadable", "start=%s next=ignored reason=\"not a pushed job; if it was one, its lease "
                  "runs out and it is retried\"", log_quote(q, sizeof q, text));
        return;
    }
    if (d->aborted_rest) {
        log_info("push_declined", "job=%" PRId64 " attempt=%d next=hand_back_on_deregister reason=shutting_down",
                 row.id, (int)row.attempt);
        return;
    }
    d->jobs_pushed++;
    start_job_row(d, &row, now, now);
    provider_kick(d->prov);
}

static void on_notify(daemon_t *d, const PGnotify *n)
{
    bool after_own_push = d->last_notify_was_push;

    d->last_notify_was_push = false;
    if (strcmp(n->relname, d->node_channel) == 0) {
        int64_t id;
        job_t *j;

        if (n->extra[0] == 'P') {
            on_push(d, n->extra);
            d->last_notify_was_push = true;
            return;
        }
        id = strtoll(n->extra, NULL, 10);
        j = provider_find_job(d->prov, id);

        /* A cancelled stream's waiting pieces are no use to anyone: drop them now. */
        if (j != NULL && j->relayed > 0)
            lease_outbox_drop_job(&d->chunks, id, j->attempt);
        if (provider_abort_job(d->prov, id, -1))
            log_debug("job_cancelled", "job=%" PRId64 " next=transfer_aborted", id);
        return;
    }
    /* A submit names the nodes it wakes (an empty payload wakes all). One not named
     * looks anyway a little later, in case every named node died before it could:
     * work never waits on a node that is gone. A push's wake names node 0, for the
     * nodes that did not get the push; it comes right after the push (a transaction's
     * notifications arrive together, in the order sent), and the node that got it
     * need not look. */
    if (lease_wake_names(n->extra, d->node_id)) {
        queue_changed(d);
    } else if (after_own_push && strcmp(n->extra, "0") == 0) {
        log_debug("wake_skipped", "reason=\"the wake of a push to this node\"");
    } else if (d->standby_at == 0) {
        d->standby_at = clock_monotonic_ms() + STANDBY_WAKE_MS;
    }
}

static void db_io(daemon_t *d, short revents)
{
    PGnotify *n;

    if (d->db == DB_CONNECTING) {
        if (revents)
            db_connect_step(d);
        return;
    }
    if (d->flush_pending && (revents & POLLOUT)) {
        int flushed = PQflush(d->conn);
        if (flushed < 0) {
            db_lost(d, PQerrorMessage(d->conn));
            return;
        }
        d->flush_pending = flushed == 1;
    }
    if ((revents & (POLLIN | POLLERR | POLLHUP)) && !PQconsumeInput(d->conn)) {
        db_lost(d, PQerrorMessage(d->conn));
        return;
    }
    while (d->conn != NULL && d->query != Q_NONE && !PQisBusy(d->conn)) {
        PGresult *res = PQgetResult(d->conn);
        if (res == NULL) {
            query_kind_t kind = d->query;
            d->query = Q_NONE;
            on_query_done(d, kind);
            continue;
        }
        on_result(d, res);
        PQclear(res);
    }
    while (d->conn != NULL && (n = PQnotifies(d->conn)) != NULL) {
        on_notify(d, n);
        PQfreemem(n);
    }
    if (d->conn != NULL && PQstatus(d->conn) == CONNECTION_BAD)
        db_lost(d, PQerrorMessage(d->conn));
}

/* ------------------------------------------------------------------ timers, signals */

static void abort_all(daemon_t *d, const char *why)
{
    size_t n = provider_in_flight(d->prov);

    if (n > 0)
        log_warn("transfers_aborted", "count=%zu reason=%s next=hand_back_on_deregister", n, why);
    while (provider_in_flight(d->prov) > 0) {
        job_t copy = *provider_job_at(d->prov, 0);
        provider_abort_job(d->prov, copy.id, copy.attempt);
        /* A stream some of which the client already has cannot start over elsewhere. */
        if (copy.relayed > 0)
            queue_error(d, &copy, "stream_broken", "the daemon shut down while the answer was streaming", false);
    }
}

static void on_signal(daemon_t *d)
{
    struct signalfd_siginfo si;
    int64_t now = clock_monotonic_ms();

    while (read(d->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        int sig = (int)si.ssi_signo;

        if (sig == SIGHUP) {
            log_info("sighup", "next=nothing_reloaded reason=\"settings are read once; restart to change them\"");
            continue;
        }
        if (!d->stopping) {
            d->stopping = true;
            d->need_exchange = false;
            d->grace_deadline = now + d->cfg->grace_ms;
            d->hard_deadline = d->grace_deadline + SHUTDOWN_FLUSH_MS;
            log_info("shutdown", "signal=%s in_flight=%zu grace_ms=%ld next=stop_leasing_and_drain",
                     sig == SIGINT ? "SIGINT" : "SIGTERM", provider_in_flight(d->prov), d->cfg->grace_ms);
        } else {
            d->grace_deadline = now;
            log_info("shutdown", "signal=%s next=abort_in_flight_now", sig == SIGINT ? "SIGINT" : "SIGTERM");
        }
    }
}

/* Runs what is due and returns the nearest future deadline to wait for. */
static int run_timers(daemon_t *d, int64_t now)
{
    int64_t t[8];
    size_t nt = 0;
    size_t n;
    int64_t nearest_job = 0;
    bool can_connect, can_send;

    if (d->wake_at && now >= d->wake_at) {
        d->wake_at = 0;
        queue_changed(d);
    }
    if (d->standby_at && now >= d->standby_at) {
        d->standby_at = 0;
        queue_changed(d);
    }
    /* Deadlines passed: abort and report, not retryable. */
    for (size_t i = 0; i < provider_in_flight(d->prov);) {
        job_t *j = provider_job_at(d->prov, i);
        if (j->deadline_mono && now >= j->deadline_mono) {
            job_t copy = *j;
            provider_abort_job(d->prov, copy.id, copy.attempt);
            queue_error(d, &copy, "deadline_exceeded", "the job's deadline passed while the provider was working",
                        false);
            continue;
        }
        i++;
    }
    if (now >= d->next_probe_at) {
        provider_start_probe(d->prov, PROBE_HEALTH);
        d->next_probe_at = now + d->cfg->health_interval_ms;
    }
    if (d->stopping) {
        if (!d->aborted_rest && (provider_in_flight(d->prov) == 0 || now >= d->grace_deadline)) {
            abort_all(d, "grace_period_over");
            d->aborted_rest = true;
        }
        if (d->aborted_rest && d->outbox.count == 0 && (d->db == DB_DOWN || !d->registered_once)) {
            /* Nothing held and no session to end: the lock went with the connection. */
            log_info("shutdown_complete", "deregistered=false reason=\"no database session\"");
            d->done = true;
        } else if (now >= d->hard_deadline) {
            log_error("shutdown_incomplete", "outcomes_lost=%zu reason=\"database unavailable\" next=exit status=1",
                      d->outbox.count);
            d->exit_code = DAEMON_EXIT_FAILED;
            d->done = true;
        }
    }
    can_connect = d->db == DB_DOWN && d->nmodels > 0 && d->probed_once && !d->discovery_running && !d->done;
    if (can_connect && now >= d->reconnect_at) {
        db_start_connect(d);
        can_connect = false;
    }
    can_send = d->db == DB_READY && d->query == Q_NONE && now >= d->pause_until;

    t[nt++] = d->wake_at;
    t[nt++] = d->standby_at;
    t[nt++] = d->next_probe_at;
    if (can_connect)
        t[nt++] = d->reconnect_at;
    if (d->stopping) {
        t[nt++] = d->aborted_rest ? 0 : d->grace_deadline;
        t[nt++] = d->hard_deadline;
    }
    n = provider_in_flight(d->prov);
    for (size_t i = 0; i < n; i++) {
        job_t *j = provider_job_at(d->prov, i);
        if (j->deadline_mono && (nearest_job == 0 || j->deadline_mono < nearest_job))
            nearest_job = j->deadline_mono;
        /* A lease renewal can only go out when the connection is free; when it is
         * not, the answer to the query in flight wakes the loop anyway. */
        if (can_send && !j->extending &&
            (nearest_job == 0 || loop_extend_due(j) < nearest_job))
            nearest_job = loop_extend_due(j);
    }
    t[nt++] = nearest_job;
    if (d->db == DB_READY && d->query == Q_NONE && d->pause_until > now)
        t[nt++] = d->pause_until;
    if (can_send && d->hold_until_us > 0 && d->outbox.count > 0)
        t[nt++] = (d->hold_until_us + 999) / 1000;
    return loop_timeout_ms(now, t, nt, MAX_WAIT_MS);
}

/* ------------------------------------------------------------------ the loop */

static void daemon_free(daemon_t *d)
{
    if (d->conn)
        PQfinish(d->conn);
    provider_free(d->prov);
    lease_outbox_free(&d->outbox);
    buf_free(&d->param);
    lease_outbox_free(&d->chunks);
    buf_free(&d->chunk_param);
    lease_free_list(d->models, d->nmodels);
    lease_free_list(d->found_models, d->nfound_models);
    free(d->channels);
}

int loop_run(const daemon_config_t *cfg, int sigfd)
{
    daemon_t d;
    char err[256];
    provider_options_t popt = {
        cfg->provider_url, cfg->health_path, cfg->request_timeout_ms,
        cfg->health_interval_ms < 1000 ? cfg->health_interval_ms : 1000, (size_t)cfg->max_response_bytes,
    };
    uint64_t seed = (uint64_t)clock_wall_ms() ^ ((uint64_t)getpid() << 32);

    memset(&d, 0, sizeof d);
    d.cfg = cfg;
    d.sigfd = sigfd;
    d.capacity = cfg->max_concurrency > 0 ? cfg->max_concurrency : -1;
    d.db_capacity = -2;
    d.healthy = true;
    d.db_healthy = true;
    d.exit_code = DAEMON_EXIT_OK;
    d.db = DB_DOWN;
    d.found_slots = d.found_running = -1;
    snprintf(d.family, sizeof d.family, "%s", cfg->provider_family ? cfg->provider_family : "openai");
    lease_outbox_init(&d.outbox);
    lease_outbox_init(&d.chunks);
    backoff_init(&d.backoff, RECONNECT_BASE_MS, RECONNECT_CAP_MS, seed);
    backoff_init(&d.error_backoff, RECONNECT_BASE_MS, RECONNECT_CAP_MS, seed * 31 + 7);
    if (cfg->models != NULL) {
        d.nmodels = lease_split_list(cfg->models, &d.models);
        if (d.nmodels < 0) {
            d.nmodels = 0;
            log_error("start_failed", "reason=out_of_memory");
            return DAEMON_EXIT_FAILED;
        }
    }
    d.prov = provider_new(&popt, err, sizeof err);
    if (d.prov == NULL) {
        log_error("start_failed", "reason=\"%s\"", err);
        return DAEMON_EXIT_FAILED;
    }
    provider_set_chunk_sink(d.prov, on_chunk, &d);

    discovery_start(&d);
    d.next_probe_at = clock_monotonic_ms();

    while (!d.done) {
        struct curl_waitfd fds[2];
        unsigned nfds = 0;
        int64_t now = clock_monotonic_ms();
        int timeout;
        int pq_index = -1;

        maybe_send(&d, now);
        timeout = run_timers(&d, now);
        if (d.done)
            break;
        maybe_send(&d, now);     /* timers may have made work (wake, deadline outcomes) */
        if (d.db == DB_CONNECTING && PQsocket(d.conn) < 0) {
            db_connect_step(&d);
            continue;
        }

        fds[nfds++] = (struct curl_waitfd){ sigfd, CURL_WAIT_POLLIN, 0 };
        if (d.conn != NULL && PQsocket(d.conn) >= 0) {
            short ev = 0;
            if (d.db == DB_CONNECTING)
                ev = d.connect_poll == PGRES_POLLING_READING ? CURL_WAIT_POLLIN : CURL_WAIT_POLLOUT;
            else
                ev = CURL_WAIT_POLLIN | (d.flush_pending ? CURL_WAIT_POLLOUT : 0);
            pq_index = (int)nfds;
            fds[nfds++] = (struct curl_waitfd){ PQsocket(d.conn), ev, 0 };
        }
        if (provider_wait(d.prov, fds, nfds, timeout) != CURLM_OK) {
            log_error("wait_failed", "reason=%s next=exit", strerror(errno));
            d.exit_code = DAEMON_EXIT_FAILED;
            break;
        }
        if (fds[0].revents)
            on_signal(&d);
        provider_run(d.prov, &provider_events, &d);
        if (pq_index >= 0 && d.conn != NULL) {
            short rev = fds[pq_index].revents;
            short want = 0;
            if (rev & CURL_WAIT_POLLIN)
                want |= POLLIN;
            if (rev & CURL_WAIT_POLLOUT)
                want |= POLLOUT;
            if (rev & ~(CURL_WAIT_POLLIN | CURL_WAIT_POLLOUT))
                want |= POLLIN;
            db_io(&d, want);
        }
    }
    log_info("exit", "status=%d jobs_started=%" PRIu64 " jobs_pushed=%" PRIu64 " jobs_finished=%" PRIu64 " exchanges=%" PRIu64
             " stream_calls=%" PRIu64 " pieces_relayed=%" PRIu64,
             d.exit_code, d.jobs_started, d.jobs_pushed, d.jobs_done, d.exchanges, d.stream_calls, d.pieces_relayed);
    daemon_free(&d);
    return d.exit_code;
}
