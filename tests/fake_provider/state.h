/* state: the fake provider's runtime settings (startup flags, changed by POST
 * /_fake/config, restored by /_fake/reset), its request statistics (GET
 * /_fake/stats) and the receive times of marked requests (GET /_fake/arrivals).
 * Owns all three; every function is safe to call from any thread. */
#ifndef FAKE_STATE_H
#define FAKE_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "responses.h"

/* Injected faults, by flag (--fault), runtime config or the X-Fake-Fault header. */
typedef enum {
    FAKE_FAULT_NONE = 0,
    FAKE_FAULT_500,          /* 500 with an OpenAI error body */
    FAKE_FAULT_503,          /* 503 with an OpenAI error body */
    FAKE_FAULT_400,          /* 400 invalid_request_error */
    FAKE_FAULT_429,          /* 429 rate_limit_error, Retry-After: 1 */
    FAKE_FAULT_MALFORMED,    /* 200, application/json, the first half of the real body */
    FAKE_FAULT_HTML,         /* 200, text/html "<html>oops" */
    FAKE_FAULT_EMPTY,        /* 200, application/json, empty body */
    FAKE_FAULT_HANG,         /* never answers; ends when the client goes away */
    FAKE_FAULT_SLOW,         /* the body (or stream) trickles: slow-interval-ms per piece */
    FAKE_FAULT_DIE,          /* connection closed in the middle of the body / stream */
    FAKE_FAULT_CLOSE,        /* connection closed at once, no response at all */
} fake_fault_t;

bool fake_fault_parse(const char *text, fake_fault_t *out);
const char *fake_fault_name(fake_fault_t fault);

/* What GET /health does. */
typedef enum {
    FAKE_HEALTH_OK = 0, /* 200 {"status":"ok"} */
    FAKE_HEALTH_DOWN,   /* 503 llama.cpp-style "Loading model" error */
    FAKE_HEALTH_HANG,   /* never answers (a probe times out) */
} fake_health_t;

/* The settings a request reads (one consistent copy per request). */
typedef struct {
    long latency_ms;         /* added before the response of inference endpoints */
    long latency_jitter_ms;  /* plus uniform [0, jitter] */
    fake_fault_t fault;      /* applied to inference requests with probability fault_rate */
    double fault_rate;
    fake_health_t health;
    long stream_chunks;      /* content deltas per stream (at most one per character) */
    long stream_interval_ms; /* pause between stream events */
    long slow_interval_ms;   /* pause between pieces under the "slow" fault */
    long slots;              /* /props total_slots, /server_info max_running_requests; 0: 404 */
} fake_settings_t;

/* Called once before any thread starts. models_csv is a comma list. Returns false
 * on an empty model list. */
bool fake_state_init(const fake_settings_t *initial, fake_family_t family, const char *models_csv);
void fake_state_free(void);

fake_family_t fake_state_family(void);
void fake_state_snapshot(fake_settings_t *out);
/* A new reference to a copy of the served models (JSON array of strings). */
json_t *fake_state_models(void);

/* Applies a /_fake/config body: all fields are checked before any is applied.
 * Returns false with the reason in err (nothing changed). */
bool fake_state_apply(json_t *patch, char *err, size_t errlen);
/* The current settings as JSON (new reference). */
json_t *fake_state_config_json(void);
/* Settings back to the startup values; statistics and arrivals cleared
 * (max_in_flight restarts from the current in-flight count). */
void fake_state_reset(void);

/* Statistics. `path` is a known endpoint path or "other". An inference request is
 * in flight from arrival (headers in) until fake_stats_release(), which the server
 * calls *before* the last byte of the answer goes out (or when the connection ends
 * first). So in_flight never counts a request its client already sees as finished:
 * a client that keeps at most N requests open never makes max_in_flight exceed N. */
void fake_stats_arrival(const char *path, bool inference);
void fake_stats_release(bool inference);
/* A response was queued with this status (counted before the client can see it). */
void fake_stats_answered(unsigned status);
/* The connection ended without a complete answer (client left, close/die/hang fault,
 * shutdown). Counted when MHD reports it, a moment after the client may notice. */
void fake_stats_aborted(void);
void fake_stats_marker(const char *marker);
json_t *fake_stats_json(void);

/* Arrivals: when each marked inference request was received, so a harness can match
 * its own send times to the provider's receive times by marker (same machine clock).
 * The marker is the one fake_stats_marker() counts (X-Fake-Marker header, else the
 * body's top-level "user" string); requests without one are not recorded. Only the
 * last FAKE_ARRIVALS_MAX are kept (a ring), so memory stays bounded; a marker longer
 * than FAKE_ARRIVAL_MARKER_MAX bytes is kept cut to that length (on a UTF-8 boundary). */
#define FAKE_ARRIVALS_MAX 100000
#define FAKE_ARRIVAL_MARKER_MAX 256
/* t_us: CLOCK_REALTIME microseconds, taken when headers and body were complete. */
void fake_arrivals_record(const char *marker, int64_t t_us);
/* {"arrivals": [{"user": "...", "t_us": N}, ...], "dropped": N}: oldest recorded
 * first (requests received at the same moment on different HTTP threads may be a few
 * µs out of t_us order); dropped counts entries the ring overwrote (or could not
 * store) since the last reset. New reference; NULL on allocation failure. */
json_t *fake_arrivals_json(void);

/* Thread-local pseudo-random numbers (seeded per thread) for jitter and fault rates. */
uint64_t fake_rand_u64(void);
double fake_rand_unit(void); /* [0, 1) */

#endif
