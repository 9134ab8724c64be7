/* db: libpq helpers for both programs: connect with keepalives, LISTEN with quoted
 * identifiers, drain notifications, turn a failed result into "SQLSTATE: message".
 * Owns no connection or result; every PGconn and PGresult stays the caller's. */
#include "db.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void db_error(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void db_error(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Copies a libpq message (often "...\n" or several lines, the later ones indented
 * with a tab) as one line: trailing whitespace dropped, inner line breaks as "; ". */
static void db_copy_message(char *dst, size_t len, const char *msg)
{
    size_t out = 0, end;

    if (!dst || len == 0)
        return;
    if (!msg)
        msg = "";
    end = strlen(msg);
    while (end > 0 && (msg[end - 1] == '\n' || msg[end - 1] == '\r' || msg[end - 1] == ' ' ||
                       msg[end - 1] == '\t'))
        end--;
    for (size_t i = 0; i < end && out + 1 < len; i++) {
        if (msg[i] == '\n' || msg[i] == '\r') {
            while (i + 1 < end && (msg[i + 1] == '\n' || msg[i + 1] == '\r' || msg[i + 1] == ' ' ||
                                   msg[i + 1] == '\t'))
                i++;
            if (out + 2 < len) {
                dst[out++] = ';';
                dst[out++] = ' ';
            }
            continue;
        }
        dst[out++] = msg[i];
    }
    dst[out] = '\0';
}

/* libpq's own test (recognized_connection_string): a URI or anything with '='.
 * Anything else is a plain database name that PQconninfoParse would reject. */
static bool db_is_conninfo(const char *s)
{
    return strncmp(s, "postgresql://", 13) == 0 || strncmp(s, "postgres://", 11) == 0 ||
           strchr(s, '=') != NULL;
}

/* "cannot connect to PostgreSQL at host=H port=P: <libpq>". PQhost/PQport name the
 * last host tried; for a multi-host conninfo (failover) the whole list is named
 * instead, since libpq's message covers every host it tried. */
static void db_describe_failure(PGconn *conn, const char *msg, char *err, size_t errlen)
{
    const char *host = PQhost(conn);
    const char *port = PQport(conn);
    PQconninfoOption *opts = PQconninfo(conn);
    bool listed = false;

    for (PQconninfoOption *o = opts; o && o->keyword; o++) {
        if (strcmp(o->keyword, "host") == 0 && o->val && strchr(o->val, ',')) {
            host = o->val;
            listed = true;
        } else if (strcmp(o->keyword, "port") == 0 && o->val && strchr(o->val, ','))
            port = o->val;
    }
    if (host && *host)
        db_error(err, errlen, "cannot connect to PostgreSQL at %s=%s port%s=%s: %s",
                 listed ? "hosts" : "host", host, listed ? "s" : "",
                 port && *port ? port : "(default)", msg);
    else
        db_error(err, errlen, "cannot connect to PostgreSQL: %s", msg);
    PQconninfoFree(opts);
}

/* Keepalives bound how long a dead peer's session lingers (see DESIGN "Liveness");
 * tcp_user_timeout bounds it when unacknowledged data is in flight, where the kernel
 * uses retransmission timing (minutes) instead of keepalives: 10 + 5 x 3 = 25 s. */
static const char *const db_keepalive_keys[] = {"keepalives", "keepalives_idle", "keepalives_interval",
                                                "keepalives_count", "tcp_user_timeout"};
static const char *const db_keepalive_values[] = {"1", "10", "5", "3", "25000"};
#define DB_N_KEEPALIVE (sizeof db_keepalive_keys / sizeof db_keepalive_keys[0])
#define DB_N_PARAMS (DB_N_KEEPALIVE + 3)

/* Fills keys/values (NULL-terminated, DB_N_PARAMS entries at most) for
 * PQconnectdbParams/PQconnectStartParams with expand_dbname. The conninfo goes last
 * as an expanded dbname, so anything it sets overrides what precedes it; the
 * PQconninfoParse check additionally keeps our defaults out when it sets them. The
 * application name is passed as fallback_application_name: the conninfo's
 * application_name and then PGAPPNAME win over it, as in psql. Returns -1 with err
 * filled when the conninfo does not parse (the message never repeats it: it may
 * hold a password). */
static int db_params(const char *conninfo, const char *application_name, const char **keys,
                     const char **values, char *err, size_t errlen)
{
    bool given[DB_N_KEEPALIVE] = {false};
    size_t n = 0;

    if (db_is_conninfo(conninfo)) {
        char *perr = NULL;
        PQconninfoOption *opts = PQconninfoParse(conninfo, &perr);

        if (!opts) {
            char msg[512];

            db_copy_message(msg, sizeof msg, perr ? perr : "out of memory");
            db_error(err, errlen, "invalid connection string: %s", msg);
            PQfreemem(perr);
            return -1;
        }
        for (PQconninfoOption *o = opts; o->keyword; o++) {
            if (!o->val || !*o->val)
                continue;
            for (size_t k = 0; k < DB_N_KEEPALIVE; k++) {
                if (strcmp(o->keyword, db_keepalive_keys[k]) == 0)
                    given[k] = true;
            }
        }
        PQconninfoFree(opts);
    }

    for (size_t k = 0; k < DB_N_KEEPALIVE; k++) {
        if (!given[k]) {
            keys[n] = db_keepalive_keys[k];
            values[n++] = db_keepalive_values[k];
        }
    }
    if (application_name && *application_name) {
        keys[n] = "fallback_application_name";
        values[n++] = application_name;
    }
    keys[n] = "dbname";
    values[n++] = conninfo;
    keys[n] = NULL;
    values[n] = NULL;
    return 0;
}

/* Both connects: blocking waits for the outcome, otherwise the caller polls. */
static PGconn *db_open(const char *conninfo, const char *application_name, bool blocking, char *err,
                       size_t errlen)
{
    const char *keys[DB_N_PARAMS];
    const char *values[DB_N_PARAMS];
    PGconn *conn;

    if (!conninfo)
        conninfo = "";
    if (db_params(conninfo, application_name, keys, values, err, errlen) != 0)
        return NULL;
    conn = blocking ? PQconnectdbParams(keys, values, 1) : PQconnectStartParams(keys, values, 1);
    if (!conn)
        db_error(err, errlen, "cannot connect to PostgreSQL: out of memory");
    return conn;
}

PGconn *db_connect(const char *conninfo, const char *application_name, char *err, size_t errlen)
{
    PGconn *conn = db_open(conninfo, application_name, true, err, errlen);

    if (conn && PQstatus(conn) != CONNECTION_OK) {
        char msg[1024];

        db_copy_message(msg, sizeof msg, PQerrorMessage(conn));
        db_describe_failure(conn, msg, err, errlen);
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

PGconn *db_connect_start(const char *conninfo, const char *application_name, char *err, size_t errlen)
{
    return db_open(conninfo, application_name, false, err, errlen);
}

/* One round trip for all channels. A channel name longer than 63 bytes is truncated
 * by the server (with a NOTICE), as for any identifier. */
int db_listen(PGconn *conn, const char *const *channels, size_t count, char *err, size_t errlen)
{
    char *sql = NULL;
    size_t len = 0, cap = 0;
    PGresult *res = NULL;
    int rc = -1;

    if (!conn) {
        db_error(err, errlen, "LISTEN: no connection");
        return -1;
    }
    if (count == 0)
        return 0;
    if (!channels) {
        db_error(err, errlen, "LISTEN: no channels given");
        return -1;
    }

    for (size_t i = 0; i < count; i++) {
        char *quoted;
        size_t need;

        if (!channels[i] || !*channels[i]) {
            db_error(err, errlen, "LISTEN: channel %zu is empty", i);
            goto out;
        }
        quoted = PQescapeIdentifier(conn, channels[i], strlen(channels[i]));
        if (!quoted) {
            char msg[512];

            db_copy_message(msg, sizeof msg, PQerrorMessage(conn));
            db_error(err, errlen, "LISTEN: cannot quote channel %zu: %s", i, msg);
            goto out;
        }
        need = len + strlen("LISTEN ; ") + strlen(quoted) + 1;
        if (need > cap) {
            size_t ncap = cap ? cap : 128;
            char *grown;

            while (ncap < need)
                ncap *= 2;
            grown = realloc(sql, ncap);
            if (!grown) {
                PQfreemem(quoted);
                db_error(err, errlen, "LISTEN: out of memory");
                goto out;
            }
            sql = grown;
            cap = ncap;
        }
        len += (size_t)snprintf(sql + len, cap - len, "%sLISTEN %s", i ? "; " : "", quoted);
        PQfreemem(quoted);
    }

    res = PQexec(conn, sql);
    if (!db_result_ok(res, conn, NULL, err, errlen))
        goto out;
    rc = 0;
out:
    PQclear(res);
    free(sql);
    return rc;
}

/* fn may run queries on conn but must not PQfinish it. On a read failure -1 comes
 * back at once, without handing out what was already queued: the caller reconnects
 * and catches up in full anyway, and PQfinish frees the queued notifications. */
int db_drain_notifications(PGconn *conn, db_notify_fn fn, void *ctx, char *err, size_t errlen)
{
    PGnotify *note;
    int handled = 0;

    if (!conn) {
        db_error(err, errlen, "no connection");
        return -1;
    }
    if (!PQconsumeInput(conn) || PQstatus(conn) == CONNECTION_BAD) {
        char msg[512];

        db_copy_message(msg, sizeof msg, PQerrorMessage(conn));
        db_error(err, errlen, "connection lost: %s", *msg ? msg : "unknown error");
        return -1;
    }
    while ((note = PQnotifies(conn)) != NULL) {
        if (fn)
            fn(ctx, note->relname, note->extra ? note->extra : "");
        PQfreemem(note);
        handled++;
    }
    return handled;
}

int db_prepare(PGconn *conn, const char *name, const char *sql, char *err, size_t errlen)
{
    char why[900];
    PGresult *res = PQprepare(conn, name, sql, 0, NULL);
    bool ok = db_result_ok(res, conn, NULL, why, sizeof why);

    PQclear(res);
    if (!ok)
        db_error(err, errlen, "cannot prepare statement %s: %s", name, why);
    return ok ? 0 : -1;
}

bool db_result_ok(const PGresult *res, const PGconn *conn, char *sqlstate, char *err, size_t errlen)
{
    const char *code, *primary;
    char msg[1024];
    ExecStatusType status;

    if (sqlstate)
        sqlstate[0] = '\0';
    if (!res) {
        /* PQexec returns NULL only for out-of-memory or a connection that is gone;
         * the reason is on the connection. */
        db_copy_message(msg, sizeof msg, conn ? PQerrorMessage(conn) : "");
        db_error(err, errlen, "no result: %s", *msg ? msg : "out of memory or no connection");
        return false;
    }
    status = PQresultStatus(res);
    if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK)
        return true;

    code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    if (primary && *primary)
        db_copy_message(msg, sizeof msg, primary);
    else
        db_copy_message(msg, sizeof msg, PQresultErrorMessage(res));
    if (!*msg && conn)
        db_copy_message(msg, sizeof msg, PQerrorMessage(conn));
    if (!*msg)
        snprintf(msg, sizeof msg, "unexpected result status %s", PQresStatus(status));

    if (code && *code) {
        if (sqlstate)
            snprintf(sqlstate, 6, "%s", code);
        db_error(err, errlen, "%s: %s", code, msg);
    } else {
        db_error(err, errlen, "%s", msg);
    }
    return false;
}

bool db_connection_lost(const PGconn *conn)
{
    return !conn || PQstatus(conn) == CONNECTION_BAD;
}
