/* provider: the daemon's HTTP side (libcurl multi): one transfer per leased job (a
 * streaming job's text/event-stream answer is relayed chunk by chunk through a sink
 * as it arrives and assembled into one response), the local health and discovery
 * probes, the classification of what came back, and the parsing of /props,
 * /server_info and /v1/models bodies. */
#ifndef PGD_PROVIDER_H
#define PGD_PROVIDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <curl/curl.h>

typedef struct provider provider_t;

/* What the loop knows about a running job; the transfer itself is provider's. */
typedef struct {
    int64_t id;
    int32_t attempt;
    int64_t deadline_mono;       /* monotonic ms after which nobody wants the answer; 0: none */
    int64_t lease_expires_mono;  /* monotonic ms when the lease runs out (conservative) */
    int64_t lease_len_ms;        /* length of a lease, for the extension schedule */
    bool extending;              /* in the dispatch.extend call in flight */
    bool stream;                 /* the payload asked for "stream": true */
    uint32_t relayed;            /* stream pieces handed to the chunk sink so far */
} job_t;

typedef enum {
    PROBE_HEALTH = 0,
    PROBE_PROPS,                 /* llama.cpp: total_slots */
    PROBE_SERVER_INFO,           /* SGLang: max_running_requests */
    PROBE_MODELS,                /* OpenAI: /v1/models ids */
    PROBE__COUNT,
} probe_kind_t;

/* What came back from one transfer. */
typedef struct {
    CURLcode curl_code;
    long status;                 /* 0 when no HTTP response */
    const char *body;            /* NUL-terminated; "" when empty */
    size_t body_len;
    const char *curl_error;      /* curl's message for curl_code != CURLE_OK, else "" */
    bool too_large;              /* the body passed the size limit and was cut off */
    size_t size_limit;
    const struct provider_stream *stream;   /* set when a streaming job got a 2xx event stream */
    int64_t service_us;          /* job: the transfer's own time, from its start to its end */
} provider_response_t;

/* How a streaming job's event stream went (its body was parsed, not kept). */
typedef struct provider_stream {
    size_t events;               /* events relayed to the chunk sink */
    bool clean;                  /* ended with [DONE], or the body ended after a finish_reason */
    bool too_large;              /* an event or the assembled content passed the size limit */
    const char *error;           /* why the daemon stopped reading it; NULL: it did not */
    const char *result;          /* the assembled response when clean; NULL: out of memory */
    size_t result_len;
} provider_stream_t;

/* How a job's response is settled. */
typedef struct {
    bool complete;               /* true: the body is the result */
    bool retryable;
    bool provider_unreachable;   /* connect failure or timeout: probe health now */
    const char *code;            /* static error code when !complete */
    long status;
    char message[320];
    const char *result;          /* when complete: the result to store (the body or the assembled stream) */
    size_t result_len;
} provider_verdict_t;

typedef struct {
    const char *base_url;        /* http://host:port, no trailing slash needed */
    const char *health_path;
    long request_timeout_ms;
    long probe_timeout_ms;
    size_t max_response_bytes;
} provider_options_t;

typedef struct {
    /* A job's transfer ended; job is valid during the call only. */
    void (*job_done)(void *ctx, const job_t *job, const provider_response_t *r);
    void (*probe_done)(void *ctx, probe_kind_t kind, const provider_response_t *r);
} provider_events_t;

/* Receives each piece of a streaming job's events as it arrives (see relay.h's
 * stream_emit_fn); called from inside provider_run/provider_kick, so it must not call
 * back into the provider. Returns 0, or -1 when the piece could not be queued (the
 * transfer then ends as a broken stream). */
typedef int (*provider_chunk_fn)(void *ctx, const job_t *job, uint32_t seq, bool more, const char *data,
                                 size_t len);

/* NULL with err filled when curl cannot be set up. The options' strings must outlive p. */
provider_t *provider_new(const provider_options_t *opt, char *err, size_t errlen);
void provider_free(provider_t *p);
/* Where streaming jobs' pieces go (none: they are only assembled). */
void provider_set_chunk_sink(provider_t *p, provider_chunk_fn fn, void *ctx);

/* Waits until a transfer's socket or an extra fd (at most 4) is ready or curl's timer
 * is due, for at most timeout_ms. Errors and hang-ups of an extra fd come back as
 * CURL_WAIT_POLLPRI. Not CURLM_OK when poll fails (errno says why). */
CURLMcode provider_wait(provider_t *p, struct curl_waitfd *extra, unsigned n, int timeout_ms);
/* Lets curl act on its ready sockets and due timer, and reports each finished
 * transfer through ev. Call it after every provider_wait. */
void provider_run(provider_t *p, const provider_events_t *ev, void *ctx);

/* Starts POST {base}{endpoint} with payload (copied); job->stream says whether the
 * answer is read as an event stream (when it is one). At most provider_set_max_active
 * transfers run at once: past that the job waits, and starts (first come, first
 * served) as running ones end. Returns the job record (owned by p, valid until the
 * job ends or is aborted), or NULL when out of memory. */
job_t *provider_start_job(provider_t *p, const job_t *job, const char *endpoint,
                          const char *payload, size_t payload_len);
/* Sends what the newly started transfers have to send now, not after the next wait
 * (this is submit-to-provider latency). Completions are still reported by provider_run. */
void provider_kick(provider_t *p);
/* Aborts the transfer of job id (any attempt when attempt < 0); no event follows.
 * Returns false when there was none. */
bool provider_abort_job(provider_t *p, int64_t id, int32_t attempt);
/* Held jobs (running or waiting to), for timers: index 0..provider_in_flight()-1;
 * order changes on removal. */
size_t provider_in_flight(const provider_t *p);
/* How many transfers may run at once (0: no limit); a lower limit stops no running one. */
void provider_set_max_active(provider_t *p, size_t n);
job_t *provider_job_at(provider_t *p, size_t i);
job_t *provider_find_job(provider_t *p, int64_t id);

/* Starts a GET probe unless one of that kind is running. Returns false if running. */
bool provider_start_probe(provider_t *p, probe_kind_t kind);
bool provider_probe_running(const provider_t *p, probe_kind_t kind);

/* Classification of a job's response (pure): 2xx with a JSON object → complete;
 * 2xx otherwise → bad_response, not retryable; 4xx → provider_4xx, not retryable;
 * 5xx, refused connection, timeout, broken transfer → retryable. An event stream
 * (r->stream): clean → complete with the assembled response; broken before any chunk
 * was relayed → as above (transport failures retryable, anything else bad_response);
 * broken after → stream_broken, not retryable (the client has part of the answer). */
void provider_classify(const provider_response_t *r, provider_verdict_t *out);
/* Health from a probe: reachable and status < 500. reason filled when unhealthy. */
bool provider_probe_healthy(const provider_response_t *r, char *reason, size_t len);

/* Capacity from llama.cpp /props (total_slots) or SGLang /server_info
 * (max_running_requests, also inside internal_states[0]); -1 when absent. */
long provider_parse_total_slots(const char *body, size_t len);
long provider_parse_max_running(const char *body, size_t len);
/* Model ids of an OpenAI /v1/models body, as a malloc'ed array of malloc'ed strings.
 * Returns the count, or -1 when the body is not a model list. */
int provider_parse_models(const char *body, size_t len, char ***out);

#endif
