/* pgsubmit: the database client of B2 and of B8's 10 % load (bench/run.py drives it).
 * Submits jobs one per call of dispatch.submit_many, open loop: job i is due at
 * start + i/R and goes on the first idle one of N libpq connections, so one slow
 * submit delays no other (with every connection busy a due job waits, and the wait
 * counts: latency is taken from the due time). A C client, because a Python driver
 * spends about 0.2 ms of its own between its clock reading and the bytes leaving.
 *
 * Job i's request is the JSON text BEFORE + i + AFTER (run.py puts a marker that the
 * fake provider records into it). Output: one tab-separated line per job, in order:
 *   i  id  due_us  sent_us  returned_us  sqlstate  message
 * times in microseconds of the wall clock (CLOCK_REALTIME, the clock PostgreSQL and the
 * fake provider stamp with); id is empty when the submit refused the job or failed, and
 * sqlstate and message then say why. A failure of the client itself is one line on
 * stderr and exit status 1. */
#include <errno.h>
#include <getopt.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include "benchutil.h"

#define MAX_CONNECTIONS 64
#define WAIT_MS 30000 /* a submit that does not answer in this long is a failure */

static const char SUBMIT_SQL[] = "SELECT id, sqlstate, message FROM dispatch.submit_many($1::json, $2)";

typedef struct {
    long i;           /* the job */
    int64_t due_ns;   /* wall clock */
    int64_t sent_ns;
    int64_t returned_ns;
    char *id;         /* NULL until answered; "" when refused */
    char *sqlstate;
    char *message;
} job_t;

typedef struct {
    PGconn *conn;
    job_t *job; /* in flight on this connection, or NULL */
} link_t;

/* Copies s (NULL: ""), or returns NULL with err set. */
static char *copy_text(const char *s, char *err, size_t errlen)
{
    char *c = strdup(s ? s : "");
    if (!c)
        set_err(err, errlen, "out of memory");
    return c;
}

/* The first connection with nothing in flight, or NULL. */
static link_t *first_idle(link_t *links, int n)
{
    for (int k = 0; k < n; k++)
        if (!links[k].job)
            return &links[k];
    return NULL;
}

/* Records the answer to the job in flight on l. Returns 0, or -1 with err set. */
static int take_result(link_t *l, PGresult *r, char *err, size_t errlen)
{
    job_t *j = l->job;
    if (j->id) {
        set_err(err, errlen, "job %ld: a second result from its submit", j->i);
        return -1;
    }
    j->returned_ns = clock_ns(CLOCK_REALTIME);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQnfields(r) == 3) {
        bool refused = !PQgetisnull(r, 0, 1);
        j->id = copy_text(refused ? "" : PQgetvalue(r, 0, 0), err, errlen);
        j->sqlstate = copy_text(refused ? PQgetvalue(r, 0, 1) : "", err, errlen);
        j->message = copy_text(refused ? one_line(PQgetvalue(r, 0, 2)) : "", err, errlen);
    } else if (st == PGRES_FATAL_ERROR || st == PGRES_NONFATAL_ERROR) {
        j->id = copy_text("", err, errlen);
        j->sqlstate = copy_text(PQresultErrorField(r, PG_DIAG_SQLSTATE), err, errlen);
        j->message = copy_text(one_line(PQresultErrorMessage(r)), err, errlen);
    } else {
        set_err(err, errlen, "job %ld: the submit answered %s with %d rows, wanted one row of 3 columns", j->i,
                PQresStatus(st), st == PGRES_TUPLES_OK ? PQntuples(r) : 0);
        return -1;
    }
    return j->id && j->sqlstate && j->message ? 0 : -1;
}

/* Reads what has arrived on l without blocking. Returns 0, or -1 with err set. When the
 * submit in flight is over, l->job is NULL again. */
static int link_read(link_t *l, char *err, size_t errlen)
{
    if (!PQconsumeInput(l->conn)) {
        set_err(err, errlen, "job %ld: connection lost: %s", l->job->i,
                one_line(PQerrorMessage(l->conn)));
        return -1;
    }
    while (!PQisBusy(l->conn)) {
        PGresult *r = PQgetResult(l->conn);
        if (!r) {
            if (!l->job->id) {
                set_err(err, errlen, "job %ld: the submit ended without a result", l->job->i);
                return -1;
            }
            l->job = NULL;
            return 0;
        }
        int rc = take_result(l, r, err, errlen);
        PQclear(r);
        if (rc < 0)
            return -1;
    }
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: pgsubmit --dsn DSN --reply CHANNEL --before TEXT --after TEXT [--count N] [--rate R]\n"
            "                [--connections C]\n"
            "  --dsn DSN         libpq connection string (a role that may call dispatch.submit_many)\n"
            "  --reply CHANNEL   the reply channel passed to submit_many\n"
            "  --before, --after job i's request array is BEFORE + i + AFTER (JSON text)\n"
            "  --count N         jobs (default 2000)\n"
            "  --rate R          jobs per second, on a fixed schedule (default 200)\n"
            "  --connections C   connections a due job may go on (default 4, at most %d)\n"
            "Output: per job, tab-separated: i, id, due_us, sent_us, returned_us, sqlstate, message.\n",
            MAX_CONNECTIONS);
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "dsn", required_argument, 0, 'd' },     { "reply", required_argument, 0, 'c' },
        { "before", required_argument, 0, 'b' },  { "after", required_argument, 0, 'a' },
        { "count", required_argument, 0, 'n' },   { "rate", required_argument, 0, 'r' },
        { "connections", required_argument, 0, 'k' }, { "help", no_argument, 0, 'h' },
        { 0, 0, 0, 0 },
    };
    struct {
        const char *dsn, *reply, *before, *after;
        long count;
        double rate;
        int connections;
    } opt = { .count = 2000, .rate = 200, .connections = 4 };
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case 'd': opt.dsn = optarg; break;
        case 'c': opt.reply = optarg; break;
        case 'b': opt.before = optarg; break;
        case 'a': opt.after = optarg; break;
        case 'n': opt.count = atol(optarg); break;
        case 'r': opt.rate = atof(optarg); break;
        case 'k': opt.connections = atoi(optarg); break;
        default: usage();
        }
    }
    if (!opt.dsn || !opt.reply || !opt.before || !opt.after || optind != argc || opt.count <= 0 ||
        !(opt.rate > 0) || opt.connections < 1 || opt.connections > MAX_CONNECTIONS)
        usage();

    int rc = 1;
    char err[1024] = "";
    link_t links[MAX_CONNECTIONS] = { { 0 } };
    size_t req_cap = strlen(opt.before) + strlen(opt.after) + 24;
    char *request = malloc(req_cap);
    job_t *jobs = calloc((size_t)opt.count, sizeof *jobs);
    if (!request || !jobs) {
        set_err(err, sizeof err, "out of memory for %ld jobs", opt.count);
        goto done;
    }
    /* The kernel may otherwise wake this thread up to 50 µs after a due time. */
    if (prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL) != 0) {
        set_err(err, sizeof err, "prctl(PR_SET_TIMERSLACK): %s", strerror(errno));
        goto done;
    }
    for (int k = 0; k < opt.connections; k++) {
        PGconn *c = links[k].conn = PQconnectdb(opt.dsn);
        if (!c || PQstatus(c) != CONNECTION_OK) {
            set_err(err, sizeof err, "cannot connect to %s: %s", opt.dsn,
                    c ? one_line(PQerrorMessage(c)) : "out of memory");
            goto done;
        }
        PGresult *r = PQprepare(c, "submit", SUBMIT_SQL, 2, NULL);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok)
            set_err(err, sizeof err, "cannot prepare %s: %s", SUBMIT_SQL,
                    one_line(r ? PQresultErrorMessage(r) : PQerrorMessage(c)));
        PQclear(r);
        if (!ok)
            goto done;
    }

    int64_t start = clock_ns(CLOCK_REALTIME) + NS_PER_SEC / 100; /* 10 ms to settle in */
    long next = 0, answered = 0;
    while (answered < opt.count) {
        int64_t now = clock_ns(CLOCK_REALTIME);
        /* Send every due job that has an idle connection to go on. */
        link_t *idle_link;
        while (next < opt.count && due_ns(start, next, opt.rate) <= now &&
               (idle_link = first_idle(links, opt.connections))) {
            job_t *j = &jobs[next];
            j->i = next;
            j->due_ns = due_ns(start, next, opt.rate);
            snprintf(request, req_cap, "%s%ld%s", opt.before, next, opt.after);
            const char *params[2] = { request, opt.reply };
            j->sent_ns = clock_ns(CLOCK_REALTIME);
            if (!PQsendQueryPrepared(idle_link->conn, "submit", 2, params, NULL, NULL, 0)) {
                set_err(err, sizeof err, "job %ld: cannot send the submit: %s", next,
                        one_line(PQerrorMessage(idle_link->conn)));
                goto done;
            }
            idle_link->job = j;
            next++;
            now = clock_ns(CLOCK_REALTIME);
        }
        /* Sleep until an answer arrives or the next job is due. */
        struct pollfd pfd[MAX_CONNECTIONS];
        int busy[MAX_CONNECTIONS], nbusy = 0, idle = 0;
        for (int k = 0; k < opt.connections; k++) {
            if (links[k].job) {
                pfd[nbusy] = (struct pollfd){ .fd = PQsocket(links[k].conn), .events = POLLIN };
                busy[nbusy++] = k;
            } else {
                idle++;
            }
        }
        int64_t wait_ns = (int64_t)WAIT_MS * 1000 * NS_PER_US;
        if (next < opt.count && idle > 0) {
            int64_t due = due_ns(start, next, opt.rate);
            wait_ns = due > now ? due - now : 0;
        }
        struct timespec ts = { .tv_sec = (time_t)(wait_ns / NS_PER_SEC), .tv_nsec = (long)(wait_ns % NS_PER_SEC) };
        int n = ppoll(pfd, (nfds_t)nbusy, &ts, NULL);
        if (n < 0 && errno != EINTR) {
            set_err(err, sizeof err, "ppoll: %s", strerror(errno));
            goto done;
        }
        if (n == 0 && wait_ns >= (int64_t)WAIT_MS * 1000 * NS_PER_US) {
            set_err(err, sizeof err, "%d submits have not answered in %d ms", nbusy, WAIT_MS);
            goto done;
        }
        for (int b = 0; n > 0 && b < nbusy; b++) {
            if (!pfd[b].revents)
                continue;
            link_t *l = &links[busy[b]];
            if (link_read(l, err, sizeof err) < 0)
                goto done;
            if (!l->job)
                answered++;
        }
    }

    for (long i = 0; i < opt.count; i++) {
        const job_t *j = &jobs[i];
        printf("%ld\t%s\t%lld\t%lld\t%lld\t%s\t%s\n", j->i, j->id, (long long)(j->due_ns / NS_PER_US),
               (long long)(j->sent_ns / NS_PER_US), (long long)(j->returned_ns / NS_PER_US), j->sqlstate,
               j->message);
    }
    if (fflush(stdout) != 0) {
        set_err(err, sizeof err, "cannot write the result: %s", strerror(errno));
        goto done;
    }
    rc = 0;

done:
    if (rc != 0)
        fprintf(stderr, "pgsubmit: %s\n", err);
    for (int k = 0; k < opt.connections; k++)
        PQfinish(links[k].conn);
    for (long i = 0; jobs && i < opt.count; i++) {
        free(jobs[i].id);
        free(jobs[i].sqlstate);
        free(jobs[i].message);
    }
    free(jobs);
    free(request);
    return rc;
}
