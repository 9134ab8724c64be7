/* hopfloor: the floor of B2's and B4's paths on this machine, measured with trivial SQL
 * (bench/run.py runs it for the "Physical limits" table). One thread, two sessions: a
 * client submits a job durably and NOTIFYs, a worker woken by LISTEN leases it (async
 * commit), then settles it durably and NOTIFYs back, and the client woken by that reads
 * the result. No HTTP, no daemon, no provider: every real design that records a request
 * before dispatching it and its result before answering is at least this slow. One
 * request in flight, open-loop pacing; latencies count from the actual send. With
 * --submit-no-flush the submit's commit does not wait for the disk, as the gateway
 * commits the submit of a request whose client waits (B4's path). The result is one
 * JSON object on stdout; any failure is one line on stderr and exit status 1. */
#include <errno.h>
#include <getopt.h>
#include <libpq-fe.h>
#include <math.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "benchutil.h"

#define WAIT_MS 10000 /* a request that makes no progress for this long is an error */

/* ----------------------------------------------------------------- sessions --- */
typedef struct {
    PGconn *conn;
    const char *name;  /* "client" or "worker", in messages */
    /* the query in flight (query_send sets these, query_take checks them) */
    const char *what;  /* "submit", "lease", "settle", "read" */
    int results;       /* results read so far */
    int want_results;  /* results the query string yields */
    int row_at;        /* index of the result that must be one row of want_row; -1 none */
    int one_at;        /* index of the result that must report one row changed; -1 none */
    char want_row[32];
} hop_sess_t;

/* The phases of one request on each side; step() is the one place they change. */
typedef enum {
    CLIENT_SUBMIT = 0, /* INSERT + NOTIFY + COMMIT sent, its results not all read */
    CLIENT_WAIT_REPLY, /* committed; waiting for NOTIFY hopfloor_reply */
    CLIENT_READ,       /* SELECT result sent, its row not read yet */
    CLIENT_DONE,       /* the client has the result */
} client_phase_t;

typedef enum {
    WORKER_WAIT_JOB = 0, /* waiting for NOTIFY hopfloor_jobs */
    WORKER_LEASE,        /* UPDATE ... RETURNING sent (async commit), result not read */
    WORKER_SETTLE,       /* durable UPDATE + NOTIFY sent, results not all read */
    WORKER_DONE,         /* settled */
} worker_phase_t;

typedef struct {
    long long id;
    char id_text[24];  /* the id as the NOTIFY payload carries it */
    client_phase_t cp;
    worker_phase_t wp;
    int64_t t0;        /* when the submit was sent */
    int64_t commit_ns; /* submit sent → its COMMIT read by the client */
    int64_t lease_ns;  /* submit sent → the worker has its leased row */
    int64_t done_ns;   /* submit sent → the client has read the result */
} hop_req_t;

/* Connects and checks. Returns the connection, or NULL with err set (nothing to free). */
static PGconn *sess_connect(const char *dsn, char *err, size_t errlen)
{
    PGconn *c = PQconnectdb(dsn);
    if (!c) {
        set_err(err, errlen, "cannot connect to %s: out of memory", dsn);
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_OK) {
        set_err(err, errlen, "cannot connect to %s: %s", dsn, one_line(PQerrorMessage(c)));
        PQfinish(c);
        return NULL;
    }
    return c;
}

/* Runs one statement to completion (setup only). Returns 0, or -1 with err set. */
static int sess_exec(PGconn *c, const char *name, const char *sql, char *err, size_t errlen)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        set_err(err, errlen, "%s on the %s connection failed: %s", sql, name,
                one_line(r ? PQresultErrorMessage(r) : PQerrorMessage(c)));
        PQclear(r);
        return -1;
    }
    PQclear(r);
    return 0;
}

/* Sends a (multi-statement) simple query and records what its results must be.
 * Returns 0, or -1 with err set. */
static int query_send(hop_sess_t *s, const char *what, const char *sql, int want_results, int row_at,
                      int one_at, const char *want_row, char *err, size_t errlen)
{
    s->what = what;
    s->results = 0;
    s->want_results = want_results;
    s->row_at = row_at;
    s->one_at = one_at;
    snprintf(s->want_row, sizeof s->want_row, "%s", want_row ? want_row : "");
    if (!PQsendQuery(s->conn, sql)) {
        set_err(err, errlen, "cannot send the %s on the %s connection: %s", what, s->name,
                one_line(PQerrorMessage(s->conn)));
        return -1;
    }
    return 0;
}

/* Checks result number s->results of the query in flight. Returns 0, or -1 with err set. */
static int query_check(hop_sess_t *s, PGresult *r, char *err, size_t errlen)
{
    int idx = s->results++;
    ExecStatusType st = PQresultStatus(r);
    if (idx >= s->want_results) {
        set_err(err, errlen, "%s on the %s connection: more than %d results", s->what, s->name, s->want_results);
        return -1;
    }
    if (st == PGRES_FATAL_ERROR || st == PGRES_NONFATAL_ERROR) {
        set_err(err, errlen, "%s on the %s connection failed: %s", s->what, s->name,
                one_line(PQresultErrorMessage(r)));
        return -1;
    }
    if (idx == s->row_at) {
        const char *v = st == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQnfields(r) == 1 ? PQgetvalue(r, 0, 0)
                                                                                        : NULL;
        if (!v || strcmp(v, s->want_row) != 0) {
            set_err(err, errlen, "%s on the %s connection: wanted one row '%s', got %s with %d rows%s%s",
                    s->what, s->name, s->want_row, PQresStatus(st), st == PGRES_TUPLES_OK ? PQntuples(r) : 0,
                    v ? ", first " : "", v ? v : "");
            return -1;
        }
    } else if (st != PGRES_COMMAND_OK) {
        set_err(err, errlen, "%s on the %s connection: result %d is %s, wanted PGRES_COMMAND_OK", s->what,
                s->name, idx + 1, PQresStatus(st));
        return -1;
    }
    if (idx == s->one_at && strcmp(PQcmdTuples(r), "1") != 0) {
        set_err(err, errlen, "%s on the %s connection: %s changed %s rows, wanted 1", s->what, s->name,
                PQcmdStatus(r), PQcmdTuples(r));
        return -1;
    }
    /* A transaction whose COMMIT turned into ROLLBACK must not count as done. */
    if (s->want_results > 1 && idx == s->want_results - 1 && strcmp(PQcmdStatus(r), "COMMIT") != 0) {
        set_err(err, errlen, "%s on the %s connection ended in %s, not COMMIT", s->what, s->name,
                PQcmdStatus(r));
        return -1;
    }
    return 0;
}

/* Reads and checks the results that have arrived, without blocking. Returns 1 when the
 * query in flight is complete and all its results were right, 0 when more are to come,
 * -1 with err set on a failure. */
static int query_take(hop_sess_t *s, char *err, size_t errlen)
{
    while (!PQisBusy(s->conn)) {
        PGresult *r = PQgetResult(s->conn);
        if (!r) {
            if (s->results != s->want_results) {
                set_err(err, errlen, "%s on the %s connection: %d results, wanted %d", s->what, s->name,
                        s->results, s->want_results);
                return -1;
            }
            return 1;
        }
        int rc = query_check(s, r, err, errlen);
        PQclear(r);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* Takes the notifications that have arrived. Returns 1 when the one expected came (on
 * `channel`, payload `payload`), 0 when none, -1 with err set on any other. */
static int notify_take(hop_sess_t *s, const char *channel, const char *payload, char *err, size_t errlen)
{
    int got = 0;
    PGnotify *n;
    while ((n = PQnotifies(s->conn)) != NULL) {
        bool ok = !got && strcmp(n->relname, channel) == 0 && strcmp(n->extra, payload) == 0;
        if (!ok)
            set_err(err, errlen, "the %s got %s notification on %s with payload '%s', wanted one on %s with '%s'",
                    s->name, got ? "a second" : "a", n->relname, n->extra, channel, payload);
        PQfreemem(n);
        if (!ok)
            return -1;
        got = 1;
    }
    return got;
}

/* ------------------------------------------------------------------ request --- */

/* Sends request req's submit from the client. Returns 0, or -1 with err set. */
static int req_start(hop_req_t *req, hop_sess_t *c, long long id, char *err, size_t errlen)
{
    char sql[256];
    memset(req, 0, sizeof *req);
    req->id = id;
    snprintf(req->id_text, sizeof req->id_text, "%lld", id);
    req->cp = CLIENT_SUBMIT;
    req->wp = WORKER_WAIT_JOB;
    snprintf(sql, sizeof sql, "BEGIN; INSERT INTO hopfloor_q (id) VALUES (%lld); NOTIFY hopfloor_jobs, '%lld'; COMMIT",
             id, id);
    req->t0 = clock_ns(CLOCK_MONOTONIC);
    return query_send(c, "submit", sql, 4, -1, 1, NULL, err, errlen);
}

/* Moves the request on with what has arrived, sending the next query where one is due;
 * never blocks. Returns 1 when something moved, 0 when nothing did, -1 with err set. */
static int req_step(hop_req_t *req, hop_sess_t *c, hop_sess_t *w, char *err, size_t errlen)
{
    char sql[256];
    int rc, moved = 0;
    if (req->cp == CLIENT_SUBMIT) {
        if ((rc = query_take(c, err, errlen)) < 0)
            return -1;
        if (rc == 1) {
            req->commit_ns = clock_ns(CLOCK_MONOTONIC) - req->t0;
            req->cp = CLIENT_WAIT_REPLY;
            moved = 1;
        }
    }
    if (req->wp == WORKER_WAIT_JOB) {
        if ((rc = notify_take(w, "hopfloor_jobs", req->id_text, err, errlen)) < 0)
            return -1;
        if (rc == 1) {
            snprintf(sql, sizeof sql, "BEGIN; SET LOCAL synchronous_commit = off; UPDATE hopfloor_q SET taken = true "
                                      "WHERE id = %lld AND NOT taken RETURNING id; COMMIT", req->id);
            if (query_send(w, "lease", sql, 4, 2, 2, req->id_text, err, errlen) < 0)
                return -1;
            req->wp = WORKER_LEASE;
            moved = 1;
        }
    }
    if (req->wp == WORKER_LEASE) {
        if ((rc = query_take(w, err, errlen)) < 0)
            return -1;
        if (rc == 1) {
            req->lease_ns = clock_ns(CLOCK_MONOTONIC) - req->t0;
            snprintf(sql, sizeof sql, "BEGIN; UPDATE hopfloor_q SET result = 'ok' WHERE id = %lld; "
                                      "NOTIFY hopfloor_reply, '%lld'; COMMIT", req->id, req->id);
            if (query_send(w, "settle", sql, 4, -1, 1, NULL, err, errlen) < 0)
                return -1;
            req->wp = WORKER_SETTLE;
            moved = 1;
        }
    }
    if (req->wp == WORKER_SETTLE) {
        if ((rc = query_take(w, err, errlen)) < 0)
            return -1;
        if (rc == 1) {
            req->wp = WORKER_DONE;
            moved = 1;
        }
    }
    if (req->cp == CLIENT_WAIT_REPLY) {
        if ((rc = notify_take(c, "hopfloor_reply", req->id_text, err, errlen)) < 0)
            return -1;
        if (rc == 1) {
            snprintf(sql, sizeof sql, "SELECT result FROM hopfloor_q WHERE id = %lld", req->id);
            if (query_send(c, "read", sql, 1, 0, -1, "ok", err, errlen) < 0)
                return -1;
            req->cp = CLIENT_READ;
            moved = 1;
        }
    }
    if (req->cp == CLIENT_READ) {
        if ((rc = query_take(c, err, errlen)) < 0)
            return -1;
        if (rc == 1) {
            req->done_ns = clock_ns(CLOCK_MONOTONIC) - req->t0;
            req->cp = CLIENT_DONE;
            moved = 1;
        }
    }
    return moved;
}

static const char *req_waiting_for(const hop_req_t *req)
{
    if (req->cp == CLIENT_SUBMIT)
        return "the submit's COMMIT";
    if (req->wp == WORKER_WAIT_JOB)
        return "NOTIFY hopfloor_jobs at the worker";
    if (req->wp == WORKER_LEASE)
        return "the lease's row";
    if (req->wp == WORKER_SETTLE)
        return "the settle's COMMIT";
    if (req->cp == CLIENT_WAIT_REPLY)
        return "NOTIFY hopfloor_reply at the client";
    return "the client's read of the result";
}

/* Runs one request to the end: one poll() over both sockets, reading what arrives and
 * stepping until both sides are done. Returns 0, or -1 with err set. */
static int req_run(hop_req_t *req, hop_sess_t *c, hop_sess_t *w, long long id, char *err, size_t errlen)
{
    if (req_start(req, c, id, err, errlen) < 0)
        return -1;
    hop_sess_t *sess[2] = { c, w };
    while (req->cp != CLIENT_DONE || req->wp != WORKER_DONE) {
        int rc;
        while ((rc = req_step(req, c, w, err, errlen)) > 0) {
        }
        if (rc < 0)
            return -1;
        if (req->cp == CLIENT_DONE && req->wp == WORKER_DONE)
            break;
        struct pollfd pfd[2];
        for (int i = 0; i < 2; i++)
            pfd[i] = (struct pollfd){ .fd = PQsocket(sess[i]->conn), .events = POLLIN };
        int n = poll(pfd, 2, WAIT_MS);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            set_err(err, errlen, "poll: %s", strerror(errno));
            return -1;
        }
        if (n == 0) {
            set_err(err, errlen, "request %lld: nothing for %d ms while waiting for %s", id, WAIT_MS,
                    req_waiting_for(req));
            return -1;
        }
        for (int i = 0; i < 2; i++) {
            if (pfd[i].revents && !PQconsumeInput(sess[i]->conn)) {
                set_err(err, errlen, "lost the %s connection: %s", sess[i]->name,
                        one_line(PQerrorMessage(sess[i]->conn)));
                return -1;
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------- report --- */
static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest sample with at least p % of the samples at or below it. */
static double pct_ms(const int64_t *sorted_us, long n, double p)
{
    long rank = (long)ceil(p / 100.0 * (double)n);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)sorted_us[rank - 1] / 1000.0;
}

/* Sorts us[0..n) in place and prints it as "name": {...} in milliseconds. */
static void print_dist(const char *name, int64_t *us, long n, bool last)
{
    qsort(us, (size_t)n, sizeof *us, cmp_i64);
    printf("  \"%s\": {\"min\": %.3f, \"p50\": %.3f, \"p95\": %.3f, \"p99\": %.3f, \"max\": %.3f}%s\n", name,
           (double)us[0] / 1000.0, pct_ms(us, n, 50), pct_ms(us, n, 95), pct_ms(us, n, 99),
           (double)us[n - 1] / 1000.0, last ? "" : ",");
}

static void usage(void)
{
    fprintf(stderr,
            "usage: hopfloor --dsn DSN [--count N] [--rate R] [--submit-no-flush]\n"
            "  --dsn DSN    libpq connection string or URI (the role must be able to create a table)\n"
            "  --count N    requests, one at a time (default 2000)\n"
            "  --rate R     requests per second, on a fixed schedule (default 200)\n"
            "  --submit-no-flush  the submit commits without waiting for the disk\n"
            "Each request: the client commits INSERT + NOTIFY hopfloor_jobs; the worker, woken, leases\n"
            "the row (UPDATE ... RETURNING, async commit), then commits UPDATE + NOTIFY hopfloor_reply;\n"
            "the client, woken, reads the result. Creates table hopfloor_q and empties it.\n"
            "Output: one JSON object, milliseconds from the submit's send: submit_to_lease_ms,\n"
            "request_ms (until the client has the result), commit_ms (the submit's durable commit).\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "dsn", required_argument, 0, 'd' },
        { "count", required_argument, 0, 'n' },
        { "rate", required_argument, 0, 'r' },
        { "submit-no-flush", no_argument, 0, 'f' },
        { "help", no_argument, 0, 'h' },
        { 0, 0, 0, 0 },
    };
    struct {
        const char *dsn;
        long count;  /* requests, one after another */
        double rate; /* requests per second, open loop */
        bool submit_no_flush;
    } opt = { .dsn = NULL, .count = 2000, .rate = 200, .submit_no_flush = false };
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case 'd': opt.dsn = optarg; break;
        case 'n': opt.count = atol(optarg); break;
        case 'r': opt.rate = atof(optarg); break;
        case 'f': opt.submit_no_flush = true; break;
        default: usage();
        }
    }
    if (!opt.dsn || optind != argc || opt.count <= 0 || !(opt.rate > 0))
        usage();

    int rc = 1;
    char err[1024] = "";
    PGconn *setup = NULL;
    hop_sess_t c = { .name = "client" }, w = { .name = "worker" };
    int64_t *commit_us = calloc((size_t)opt.count, sizeof(int64_t));
    int64_t *lease_us = calloc((size_t)opt.count, sizeof(int64_t));
    int64_t *request_us = calloc((size_t)opt.count, sizeof(int64_t));
    if (!commit_us || !lease_us || !request_us) {
        set_err(err, sizeof err, "out of memory for %ld samples", opt.count);
        goto done;
    }

    /* The table: logged, so the submit's and the settle's commits wait for the WAL flush. */
    if (!(setup = sess_connect(opt.dsn, err, sizeof err)) ||
        sess_exec(setup, "setup", "SET client_min_messages = warning", err, sizeof err) < 0 ||
        sess_exec(setup, "setup",
                  "CREATE TABLE IF NOT EXISTS hopfloor_q (id bigint PRIMARY KEY, "
                  "taken boolean NOT NULL DEFAULT false, result text)", err, sizeof err) < 0 ||
        sess_exec(setup, "setup", "TRUNCATE hopfloor_q", err, sizeof err) < 0)
        goto done;
    PQfinish(setup);
    setup = NULL;

    if (!(c.conn = sess_connect(opt.dsn, err, sizeof err)) || !(w.conn = sess_connect(opt.dsn, err, sizeof err)) ||
        sess_exec(c.conn, c.name, opt.submit_no_flush ? "SET synchronous_commit = off" : "SET synchronous_commit = on",
                  err, sizeof err) < 0 ||
        sess_exec(w.conn, w.name, "SET synchronous_commit = on", err, sizeof err) < 0 ||
        sess_exec(c.conn, c.name, "LISTEN hopfloor_reply", err, sizeof err) < 0 ||
        sess_exec(w.conn, w.name, "LISTEN hopfloor_jobs", err, sizeof err) < 0)
        goto done;

    int64_t start = clock_ns(CLOCK_MONOTONIC);
    for (long i = 1; i <= opt.count; i++) {
        /* A late request goes at once. */
        int64_t due = due_ns(start, i, opt.rate);
        struct timespec ts = { .tv_sec = (time_t)(due / NS_PER_SEC), .tv_nsec = (long)(due % NS_PER_SEC) };
        int e;
        while ((e = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL)) == EINTR) {
        }
        if (e != 0) {
            set_err(err, sizeof err, "clock_nanosleep: %s", strerror(e));
            goto done;
        }
        hop_req_t req;
        if (req_run(&req, &c, &w, (long long)i, err, sizeof err) < 0)
            goto done;
        commit_us[i - 1] = req.commit_ns / NS_PER_US;
        lease_us[i - 1] = req.lease_ns / NS_PER_US;
        request_us[i - 1] = req.done_ns / NS_PER_US;
    }

    printf("{\n  \"count\": %ld,\n  \"rate\": %g,\n  \"submit_no_flush\": %s,\n", opt.count, opt.rate,
           opt.submit_no_flush ? "true" : "false");
    print_dist("submit_to_lease_ms", lease_us, opt.count, false);
    print_dist("request_ms", request_us, opt.count, false);
    print_dist("commit_ms", commit_us, opt.count, true);
    printf("}\n");
    if (fflush(stdout) != 0) {
        set_err(err, sizeof err, "cannot write the result: %s", strerror(errno));
        goto done;
    }
    rc = 0;

done:
    if (rc != 0)
        fprintf(stderr, "hopfloor: %s\n", err);
    PQfinish(setup);
    PQfinish(c.conn);
    PQfinish(w.conn);
    free(commit_us);
    free(lease_us);
    free(request_us);
    return rc;
}
