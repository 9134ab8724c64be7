/* db: libpq helpers shared by both programs: connecting with keepalives, LISTEN
 * with correct identifier quoting, draining notifications, and turning a failed
 * result into one error message that names the SQLSTATE. Owns no connection:
 * callers own their PGconn and every PGresult they get. */
#ifndef PGD_DB_H
#define PGD_DB_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>
#include <libpq-fe.h>

/* Connect (blocking) with TCP keepalives (idle 10 s, interval 5 s, count 3, and a
 * 25 s tcp_user_timeout) and the given application_name unless the conninfo sets
 * them. conninfo may be a URL, a
 * key=value string or empty (PG* environment). Returns NULL with err filled. */
PGconn *db_connect(const char *conninfo, const char *application_name, char *err, size_t errlen);

/* The same settings for a non-blocking connect: returns PQconnectStartParams' result
 * (drive it with PQconnectPoll; it may already be CONNECTION_BAD), or NULL with err
 * filled when the conninfo does not parse or memory ran out. */
PGconn *db_connect_start(const char *conninfo, const char *application_name, char *err, size_t errlen);

/* LISTEN on each channel (quoted with PQescapeIdentifier). 0 on success, -1 with err. */
int db_listen(PGconn *conn, const char *const *channels, size_t count, char *err, size_t errlen);

/* Prepare sql as the named statement (blocking, one round trip). 0 on success, -1 with
 * err naming the statement and the server's reason. */
int db_prepare(PGconn *conn, const char *name, const char *sql, char *err, size_t errlen);

/* Consume input and call fn for each pending notification (payload may be "").
 * Returns the number handled, or -1 when the connection is broken (err filled). */
typedef void (*db_notify_fn)(void *ctx, const char *channel, const char *payload);
int db_drain_notifications(PGconn *conn, db_notify_fn fn, void *ctx, char *err, size_t errlen);

/* For a result that is not PGRES_TUPLES_OK/COMMAND_OK: "<SQLSTATE>: <message>" into
 * err; sqlstate (6 bytes, may be NULL) gets the code or "" when there is none
 * (connection lost). Returns true when the result is OK. Does not PQclear. */
bool db_result_ok(const PGresult *res, const PGconn *conn, char *sqlstate, char *err, size_t errlen);

/* True when the connection is unusable and must be re-established. */
bool db_connection_lost(const PGconn *conn);

/* True when a statement failed because its session is going or gone: no SQLSTATE
 * (the connection broke), class 08 (connection exception) or 57P (the server is
 * shutting down, the database was dropped, or the session timed out). The statement
 * may or may not have been applied; only a new connection can say. */
static inline bool db_sqlstate_session_lost(const char *sqlstate)
{
    return sqlstate == NULL || sqlstate[0] == '\0' || strncmp(sqlstate, "08", 2) == 0 ||
           strncmp(sqlstate, "57P", 3) == 0;
}

/* True when a statement failed because of the moment, not because of what it asked:
 * rolled back to break a deadlock or a serialization conflict (class 40), a lock or
 * statement timeout (55P03, 57014), the server short of resources (class 53).
 * Nothing it did was kept, and the same statement later may well succeed. */
static inline bool db_sqlstate_transient(const char *sqlstate)
{
    return sqlstate != NULL && (strncmp(sqlstate, "40", 2) == 0 || strncmp(sqlstate, "53", 2) == 0 ||
                                strcmp(sqlstate, "55P03") == 0 || strcmp(sqlstate, "57014") == 0);
}

#endif
