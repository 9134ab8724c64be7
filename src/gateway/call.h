/* call: one HTTP request's errand to the database, handed from the HTTP thread to
 * the dispatcher thread and back. The HTTP side allocates and frees it; in between
 * the dispatcher owns it, and gives it back exactly once through resume(). */
#ifndef PGD_GATEWAY_CALL_H
#define PGD_GATEWAY_CALL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    CALL_SUBMIT,      /* OpenAI endpoint: submit, wait for the job's outcome */
    CALL_JOB_CREATE,  /* POST /v1/jobs: submit, answer 202 at once */
    CALL_JOB_GET,     /* GET /v1/jobs/{id}, optionally long-polling */
    CALL_JOB_CANCEL,  /* DELETE /v1/jobs/{id} */
    CALL_MODELS,      /* GET /v1/models */
    CALL_STATUS,      /* GET /v1/status */
    CALL_METRICS,     /* GET /metrics */
    CALL_READY,       /* GET /readyz */
    CALL_STREAM,      /* dispatcher-internal: relays a started stream (the shadow in gw_stream_t) */
} call_kind_t;

struct gw_stream;

/* What goes back to the client. body is malloc'd and owned by whoever holds the
 * reply (the call, then the HTTP side that frees it); the strings are static. */
typedef struct {
    int status;                /* 0: not answered yet */
    char *body;
    size_t body_len;
    const char *content_type;  /* NULL: application/json */
    int retry_after_s;         /* > 0: send Retry-After */
} gw_reply_t;

typedef struct call call_t;
typedef void (*call_resume_fn)(call_t *call);

struct call {
    /* Inputs, set by the HTTP side before dispatcher_enqueue and not changed after
     * (but element, see there). */
    call_kind_t kind;
    char *element;             /* submit: JSON object for submit_many; the dispatcher
                                * adds a stream request's "stream_token" to it (may
                                * move it), frees it (and sets NULL) once submit_many
                                * answered for it; the HTTP side frees what is left */
    size_t element_len;
    int64_t job_id;            /* get/cancel: the job; submit: set when admitted */
    int64_t wait_ms;           /* get: long-poll this long for a final state */
    int64_t timeout_ms;        /* submit: gateway-side deadline, counted from admission */
    bool keyed;                /* submit carries an idempotency key (may be a replay) */
    char *api_key;             /* bearer token to check, or NULL; owned by the HTTP side */
    int client_fd;             /* the client's socket, watched for hang-ups while waiting */
    struct gw_stream *stream;  /* submit with "stream": true: the event stream (the HTTP side
                                * holds a reference); NULL otherwise */
    call_resume_fn resume;     /* hands the call back; the dispatcher never touches it after */

    /* Dispatcher-private bookkeeping. */
    call_t *next;              /* queue link */
    call_t *hnext;             /* waiter table: chain of one hash bucket */
    call_t *all_prev, *all_next; /* waiter table: list of every waiter */
    int64_t deadline_ms;       /* monotonic; 0: none */
    bool solo;                 /* submit alone (its batch failed as a whole once) */
    bool answer_now;           /* get: answer with the current state, stop waiting */
    bool waiting;              /* in the waiter table */
    int64_t created_us;        /* submit stored without waiting for the disk: its job's
                                * created_at in µs since the epoch, so that a job found
                                * under the same id after a crash is known not to be its
                                * own; 0: stored durably */

    /* Output, written by the dispatcher before resume. */
    gw_reply_t reply;
    bool job_final;            /* the job is finished or cancelled: nothing to clean up */
    bool streaming;            /* stream: the first event is ready; answer 200 with the event
                                * stream, which the dispatcher goes on feeding */
};

#endif
