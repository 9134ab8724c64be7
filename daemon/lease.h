/* lease: the daemon's side of the SQL API: the outcome batch (outbox) that the next
 * dispatch.exchange settles, the same kind of batch for streamed chunks that the next
 * dispatch.stream relays, the statements the daemon sends and the parsing of their
 * rows. No I/O: the loop sends what this module builds. */
#ifndef PGD_LEASE_H
#define PGD_LEASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <libpq-fe.h>

#include "buf.h"

/* Statements (parameters in the comments). Times come back as milliseconds from the
 * database's now(), so the daemon's clock never has to agree with the server's. */
extern const char LEASE_SQL_REGISTER[];    /* $1 family, $2 text[] models, $3 int, $4 region, $5 jsonb */
extern const char LEASE_SQL_EXCHANGE[];    /* $1 json outcomes, $2 int max_jobs; prepared as "pgd_exchange" */
extern const char LEASE_SQL_EXTEND[];      /* $1 bigint[] ids, $2 int[] attempts; prepared as "pgd_extend" */
extern const char LEASE_SQL_REPORT[];      /* $1 health, $2 reason, $3 int max_concurrency,
                                            * $4 int lease-ahead allowance */
extern const char LEASE_SQL_DEREGISTER[];
extern const char LEASE_SQL_STREAM[];      /* $1 json chunks → id, attempt, ok; prepared as "pgd_stream" */
extern const char LEASE_SQL_REFUSE_PUSHES[];   /* dispatch.accept_pushes(false) */
extern const char LEASE_SQL_SETTLE[];      /* $1 json outcomes, $2 boolean wake row wanted; same
                                            * columns as LEASE_SQL_EXCHANGE; prepared as "pgd_settle" */
#define LEASE_EXCHANGE_STMT "pgd_exchange"
#define LEASE_SETTLE_STMT "pgd_settle"
#define LEASE_EXTEND_STMT "pgd_extend"
#define LEASE_STREAM_STMT "pgd_stream"

/* An error outcome as the daemon reports it to dispatch.exchange. */
typedef struct {
    const char *code;        /* provider_5xx | provider_4xx | bad_response | connect_failed | ... */
    const char *message;     /* one line for humans */
    long status;             /* provider HTTP status, 0 when there was none */
    const char *body;        /* provider body (first LEASE_ERROR_BODY_MAX bytes kept), may be NULL */
    size_t body_len;
    bool retryable;
} lease_error_t;

#define LEASE_ERROR_BODY_MAX 4096

/* Outcomes waiting for the next exchange, as JSON text ready to send. The first
 * `sent` entries belong to the exchange in flight: they leave on success
 * (lease_outbox_sent_done) and stay for the next try when the connection broke
 * (lease_outbox_sent_retry). */
typedef struct {
    int64_t id;
    int32_t attempt;
    bool rewritten;          /* already replaced once after the database refused it */
    size_t end;              /* offset just past this entry's trailing comma */
} lease_outcome_meta_t;

/* One entry of a batch being sent, for putting the batch in job order. */
typedef struct {
    int64_t id;
    size_t index;            /* position in the outbox */
} lease_outbox_slot_t;

typedef struct {
    buf_t json;              /* "entry,entry,...," */
    lease_outcome_meta_t *meta;
    lease_outbox_slot_t *order;  /* scratch of lease_outbox_take, cap entries */
    size_t count, cap;
    size_t sent;
} lease_outbox_t;

void lease_outbox_init(lease_outbox_t *ob);
void lease_outbox_free(lease_outbox_t *ob);

/* Queue {"id","attempt","result":<body>}. The body must already be known to be a JSON
 * object (it is embedded as is). Returns 0, or -1 when out of memory (nothing queued). */
int lease_outbox_add_result(lease_outbox_t *ob, int64_t id, int32_t attempt, const char *body, size_t len);
/* Queue {"id","attempt","error":{...},"retryable":b}. 0, or -1 when out of memory. */
int lease_outbox_add_error(lease_outbox_t *ob, int64_t id, int32_t attempt, const lease_error_t *e);

/* Queue a streamed piece {"id","attempt","seq","more","data"} (an outbox used as the
 * batch of dispatch.stream). data must be valid UTF-8. 0, or -1 when out of memory. */
int lease_outbox_add_chunk(lease_outbox_t *ob, int64_t id, int32_t attempt, uint32_t seq, bool more,
                           const char *data, size_t len);
/* Removes the unsent entries of (id, attempt). Returns how many were removed. */
size_t lease_outbox_drop_job(lease_outbox_t *ob, int64_t id, int32_t attempt);
/* How many entries at the front of outcomes belong to jobs that have no entry in
 * chunks (a job's outcome must not overtake its own chunks). */
size_t lease_outbox_ready_prefix(const lease_outbox_t *outcomes, const lease_outbox_t *chunks);

/* Marks the first min(max, count) entries as sent and writes the JSON array of them
 * into param (reset first), ordered by job id (a job's own entries keep their order).
 * Returns how many were taken. */
size_t lease_outbox_take(lease_outbox_t *ob, size_t max, buf_t *param);
void lease_outbox_sent_done(lease_outbox_t *ob);
void lease_outbox_sent_retry(lease_outbox_t *ob);
/* The database refused the single outcome in flight: if it carried a result it is
 * replaced by a not-retryable bad_response error naming `why` and true is returned;
 * if it was already a replacement it is dropped and false is returned. */
bool lease_outbox_sent_refused(lease_outbox_t *ob, const char *why);

/* One row of dispatch.exchange; strings point into the PGresult. */
typedef enum {
    LEASE_ROW_JOB,           /* a leased job to start */
    LEASE_ROW_STALE,         /* an outcome refused by fencing */
    LEASE_ROW_WAKE,          /* when to look again */
    LEASE_ROW_UNKNOWN,
} lease_row_kind_t;

typedef struct {
    lease_row_kind_t kind;
    int64_t id;
    int32_t attempt;
    const char *model;
    const char *endpoint;
    const char *payload;
    size_t payload_len;
    bool has_deadline;
    int64_t deadline_in_ms;  /* from the database's now(); may be <= 0 */
    bool has_lease;          /* job: lease; wake: next wake (false: sleep until NOTIFY) */
    int64_t lease_in_ms;
} lease_row_t;

/* Parses row i of an exchange result. Returns false when the row is malformed. */
bool lease_row_parse(const PGresult *res, int i, lease_row_t *out);

/* Longest model name in a pushed job's notification (256 characters of UTF-8). */
#define LEASE_MODEL_MAX 1024

/* Parses a job pushed on the node's channel (dispatch.accept_pushes):
 * "P<id>:<attempt>:<lease ms>:<deadline ms or empty>:<endpoint>:<model bytes>:<model><payload>"
 * into a LEASE_ROW_JOB row. Writes into text (the fields are cut at their ':') and the
 * model into model[model_cap]; endpoint and payload point into text. False when the
 * text is not such a message. */
bool lease_push_parse(char *text, lease_row_t *out, char *model, size_t model_cap);

/* Reads the next "<id>:<attempt>" of a comma-separated list (register's stale_holding
 * as LEASE_SQL_REGISTER writes it) and moves *cursor past it. False at the end of the
 * list or at anything else. */
bool lease_pair_next(const char **cursor, int64_t *id, int32_t *attempt);

/* Whether a wake notification on a model channel is for this node: its payload is
 * empty (every node serving the model) or a comma-separated list of node ids. A
 * payload that is not such a list wakes every node: waking too many is only cost. */
bool lease_wake_names(const char *payload, int node_id);

/* Writes a PostgreSQL array literal of the given strings ({"a","b"}) into out. */
void lease_text_array(buf_t *out, const char *const *items, size_t count);
/* Splits a comma-separated list (spaces trimmed, empties skipped) into a malloc'ed
 * array of malloc'ed strings. Returns the count (0 for none), or -1 on OOM. */
int lease_split_list(const char *text, char ***out);
void lease_free_list(char **items, int count);

#endif
