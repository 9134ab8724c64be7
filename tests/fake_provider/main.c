/* fake-provider: a stand-in model server for tests, benchmarks and the demo. Serves
 * OpenAI-shaped endpoints with switchable latency and faults, plus /_fake/ control
 * endpoints; owns the HTTP daemon, each request's context and the fault plan.
 *
 * Control endpoints (not counted in the statistics):
 *   GET|POST /_fake/config   the settings; a POSTed JSON object changes some of them
 *   GET /_fake/stats         request counts by path, status and marker; in-flight gauge
 *   GET /_fake/arrivals      {"arrivals": [{"user": "<marker>", "t_us": N}, ...],
 *                            "dropped": N}: wall-clock receive time (CLOCK_REALTIME µs,
 *                            headers and body complete, before any latency or fault) of
 *                            each inference request that carried a marker (X-Fake-Marker
 *                            header, else the body's "user" string), in the order
 *                            recorded, the last FAKE_ARRIVALS_MAX only; dropped = entries
 *                            overwritten
 *   POST /_fake/reset        settings back to the flags; statistics and arrivals cleared
 * Per-request headers: X-Fake-Fault, X-Fake-Latency-Ms, X-Fake-Marker. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include <jansson.h>
#include <microhttpd.h>

#include "clock.h"
#include "config.h"
#include "log.h"
#include "responses.h"
#include "state.h"
#include "timer.h"

#define FAKE_MAX_BODY (32u * 1024 * 1024) /* larger request bodies get 413 */
#define FAKE_BLOCK_SIZE 16384             /* callback response buffer */
#define FAKE_HTML_BODY "<html><body>oops</body></html>"

/* ---- configuration -------------------------------------------------------------- */

static long opt_port, opt_slots, opt_latency, opt_jitter, opt_chunks, opt_interval, opt_slow,
    opt_threads;
static double opt_fault_rate;
static const char *opt_bind, *opt_family, *opt_models, *opt_fault, *opt_log_level;

static const config_option_t options[] = {
    {"port", "FAKE_PROVIDER_PORT", CONFIG_INT, &opt_port, "8000", 0, 65535,
     "TCP port to listen on; 0 picks a free port (logged in the start line)"},
    {"bind", "FAKE_PROVIDER_BIND", CONFIG_STRING, &opt_bind, "127.0.0.1", 0, 0,
     "address to listen on (an IPv4 or IPv6 literal)"},
    {"family", "FAKE_PROVIDER_FAMILY", CONFIG_STRING, &opt_family, "llamacpp", 0, 0,
     "server to imitate: llamacpp (GET /props), vllm (no capacity endpoint), sglang "
     "(GET /server_info), ollama (GET /, /api/tags)"},
    {"models", "FAKE_PROVIDER_MODELS", CONFIG_STRING, &opt_models, "demo", 0, 0,
     "comma list of model names listed by GET /v1/models"},
    {"slots", "FAKE_PROVIDER_SLOTS", CONFIG_INT, &opt_slots, "4", 0, 1000000,
     "capacity reported as /props total_slots or /server_info max_running_requests; "
     "0: those endpoints answer 404 (capacity unreported)"},
    {"latency-ms", "FAKE_PROVIDER_LATENCY_MS", CONFIG_INT, &opt_latency, "0", 0, 3600000,
     "delay before each inference response (the connection is suspended, no thread waits)"},
    {"latency-jitter-ms", "FAKE_PROVIDER_LATENCY_JITTER_MS", CONFIG_INT, &opt_jitter, "0", 0,
     3600000, "extra random delay per inference request, uniform in [0, N] ms"},
    {"fault", "FAKE_PROVIDER_FAULT", CONFIG_STRING, &opt_fault, "none", 0, 0,
     "fault for inference requests: none|500|503|400|429|malformed|html|empty|hang|slow|"
     "die-mid-stream|close"},
    {"fault-rate", "FAKE_PROVIDER_FAULT_RATE", CONFIG_DOUBLE, &opt_fault_rate, "1", 0, 0,
     "probability in [0, 1] that --fault applies to a request"},
    {"stream-chunks", "FAKE_PROVIDER_STREAM_CHUNKS", CONFIG_INT, &opt_chunks, "4", 1, 100000,
     "content deltas per streamed reply (at most one per character)"},
    {"stream-interval-ms", "FAKE_PROVIDER_STREAM_INTERVAL_MS", CONFIG_INT, &opt_interval, "0",
     0, 3600000, "pause between stream events"},
    {"slow-interval-ms", "FAKE_PROVIDER_SLOW_INTERVAL_MS", CONFIG_INT, &opt_slow, "500", 0,
     3600000, "pause between pieces of a reply under the slow fault"},
    {"threads", "FAKE_PROVIDER_THREADS", CONFIG_INT, &opt_threads, "2", 1, 256,
     "HTTP threads (each runs its own epoll loop)"},
    {"log-level", "FAKE_PROVIDER_LOG_LEVEL", CONFIG_STRING, &opt_log_level, "info", 0, 0,
     "debug|info|warn|error; debug logs one line per request"},
};

static const char usage[] = "fake-provider [options]   (a fake OpenAI-compatible model server)";

/* ---- routes ----------------------------------------------------------------------- */

typedef enum {
    EP_CHAT,          /* inference endpoints: counted in in_flight, faults apply */
    EP_COMPLETIONS,
    EP_EMBEDDINGS,
    EP_MODELS,        /* discovery and health */
    EP_HEALTH,
    EP_PROPS,
    EP_SERVER_INFO,
    EP_OLLAMA_ROOT,
    EP_OLLAMA_TAGS,
    EP_OLLAMA_VERSION,
    EP_FAKE_CONFIG,   /* control endpoints: not counted in statistics */
    EP_FAKE_STATS,
    EP_FAKE_ARRIVALS,
    EP_FAKE_RESET,
    EP_UNKNOWN,
} endpoint_t;

static const struct {
    const char *path;
    endpoint_t ep;
} routes[] = {
    {"/v1/chat/completions", EP_CHAT},
    {"/v1/completions", EP_COMPLETIONS},
    {"/v1/embeddings", EP_EMBEDDINGS},
    {"/v1/models", EP_MODELS},
    {"/health", EP_HEALTH},
    {"/props", EP_PROPS},
    {"/server_info", EP_SERVER_INFO},
    {"/get_server_info", EP_SERVER_INFO},
    {"/", EP_OLLAMA_ROOT},
    {"/api/tags", EP_OLLAMA_TAGS},
    {"/api/version", EP_OLLAMA_VERSION},
    {"/_fake/config", EP_FAKE_CONFIG},
    {"/_fake/stats", EP_FAKE_STATS},
    {"/_fake/arrivals", EP_FAKE_ARRIVALS},
    {"/_fake/reset", EP_FAKE_RESET},
};

/* ---- per-request context ------------------------------------------------------------ */

typedef enum {
    REQ_RECEIVING, /* headers in; body (if any) arriving */
    REQ_WAITING,   /* suspended until the timer resumes it (latency or hang) */
    REQ_ANSWERED,  /* a response is queued; the reader may still run */
} req_state_t;

/* Lives in MHD's per-request slot from the first handler call to on_completed(),
 * which frees it. While suspended, the timer holds &gone and the connection. */
typedef struct {
    endpoint_t ep;
    const char *path;       /* the route's path, or "other" */
    bool is_post;
    req_state_t state;
    struct MHD_Connection *conn;
    int fd;
    atomic_bool gone;       /* set by the timer: client hung up or shutdown */
    bool released;          /* no longer counted in flight (see fake_stats_release) */
    fake_fault_t fault;
    int64_t started_us;

    char *body;             /* request body as received */
    size_t body_len, body_cap;
    bool body_too_large;

    /* the planned answer */
    unsigned status;
    const char *content_type;
    bool sse;               /* text/event-stream, chunked */
    bool retry_after;       /* add Retry-After: 1 */
    fake_pieces_t pieces;
    size_t next_piece;      /* reader position: piece index and offset in it */
    size_t piece_off;
    size_t waited_piece;    /* the piece whose pause has been taken */
    int64_t interval_ms;    /* pause before each piece after the first */
    size_t die_after;       /* pieces sent before the connection is dropped; SIZE_MAX: never */
} fake_request_t;

static atomic_ullong id_seq;

static bool is_inference(endpoint_t ep)
{
    return ep == EP_CHAT || ep == EP_COMPLETIONS || ep == EP_EMBEDDINGS;
}

static bool is_control(endpoint_t ep)
{
    return ep == EP_FAKE_CONFIG || ep == EP_FAKE_STATS || ep == EP_FAKE_ARRIVALS
           || ep == EP_FAKE_RESET;
}

/* Wall-clock microseconds (CLOCK_REALTIME): receive times a harness compares with its
 * own send times taken on the same machine. */
static int64_t wall_clock_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static fake_request_t *request_new(struct MHD_Connection *conn, const char *url, const char *method)
{
    fake_request_t *r = calloc(1, sizeof *r);
    const union MHD_ConnectionInfo *info;

    if (!r)
        return NULL;
    r->ep = EP_UNKNOWN;
    r->path = "other";
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        if (strcmp(url, routes[i].path) == 0) {
            r->ep = routes[i].ep;
            r->path = routes[i].path;
            break;
        }
    }
    r->is_post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
    r->conn = conn;
    info = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = info ? info->connect_fd : -1;
    atomic_init(&r->gone, false);
    r->started_us = clock_monotonic_us();
    r->waited_piece = SIZE_MAX;
    r->die_after = SIZE_MAX;
    if (!is_control(r->ep))
        fake_stats_arrival(r->path, is_inference(r->ep));
    return r;
}

/* Ends the request's in-flight time; idempotent. Called just before the last bytes of
 * the answer are handed to MHD, or when the connection ends first. */
static void request_release(fake_request_t *r)
{
    if (r->released)
        return;
    r->released = true;
    if (!is_control(r->ep))
        fake_stats_release(is_inference(r->ep));
}

/* MHD_queue_response plus the status count. */
static enum MHD_Result queue(fake_request_t *r, unsigned status, struct MHD_Response *resp)
{
    enum MHD_Result ret;

    r->status = status;
    r->state = REQ_ANSWERED;
    ret = MHD_queue_response(r->conn, status, resp);
    if (ret == MHD_YES && !is_control(r->ep))
        fake_stats_answered(status);
    return ret;
}

static void request_free(fake_request_t *r)
{
    fake_pieces_free(&r->pieces);
    free(r->body);
    free(r);
}

static void request_append_body(fake_request_t *r, const char *data, size_t n)
{
    if (r->body_too_large)
        return;
    if (r->body_len + n + 1 > FAKE_MAX_BODY) {
        r->body_too_large = true;
        return;
    }
    if (r->body_len + n + 1 > r->body_cap) {
        size_t cap = r->body_cap ? r->body_cap : 1024;
        while (cap < r->body_len + n + 1)
            cap *= 2;
        char *p = realloc(r->body, cap);
        if (!p) {
            r->body_too_large = true;
            return;
        }
        r->body = p;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, data, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
}

/* ---- answering ------------------------------------------------------------------------ */

/* Queues a whole body (malloc'd; ownership taken, NULL means allocation failure). */
static enum MHD_Result respond(fake_request_t *r, unsigned status, const char *content_type,
                               char *body)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;

    if (!body)
        return MHD_NO;
    resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (r->retry_after)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    ret = queue(r, status, resp);
    request_release(r); /* the body goes out only after the handler returns */
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result respond_json(fake_request_t *r, unsigned status, json_t *body)
{
    char *text = body ? json_dumps(body, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(body);
    return respond(r, status, "application/json", text);
}

static enum MHD_Result respond_error(fake_request_t *r, unsigned status, const char *message,
                                     const char *type, const char *code)
{
    return respond(r, status, "application/json", fake_resp_error(message, type, code));
}

static void suspend_until(fake_request_t *r, int64_t due_us)
{
    MHD_suspend_connection(r->conn);
    fake_timer_resume_at(due_us, r->conn, r->fd, &r->gone);
}

/* Content reader of piecewise answers: sends the pieces in order, pausing
 * interval_ms before each one after the first (suspended, resumed by the timer), and
 * drops the connection after die_after pieces. */
static ssize_t reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    fake_request_t *r = cls;
    size_t out = 0;

    (void)pos;
    if (atomic_load(&r->gone)) {
        request_release(r);
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    while (out < max) {
        if (r->next_piece >= r->die_after) {
            request_release(r);
            return out > 0 ? (ssize_t)out : MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (r->next_piece >= r->pieces.count) {
            request_release(r);
            return out > 0 ? (ssize_t)out : MHD_CONTENT_READER_END_OF_STREAM;
        }
        if (r->piece_off == 0 && r->next_piece > 0 && r->interval_ms > 0
            && r->waited_piece != r->next_piece) {
            if (out > 0)
                return (ssize_t)out; /* send what we have, pause on the next call */
            r->waited_piece = r->next_piece;
            suspend_until(r, clock_monotonic_us() + r->interval_ms * 1000);
            return 0;
        }
        const char *piece = r->pieces.parts[r->next_piece];
        size_t left = strlen(piece + r->piece_off);
        size_t n = left < max - out ? left : max - out;
        memcpy(buf + out, piece + r->piece_off, n);
        out += n;
        r->piece_off += n;
        if (r->piece_off == strlen(piece)) {
            r->next_piece++;
            r->piece_off = 0;
            if (r->next_piece >= r->pieces.count)
                request_release(r); /* the last bytes are in buf */
        }
    }
    return (ssize_t)out;
}

/* Queues the planned answer in r->pieces. */
static enum MHD_Result answer(fake_request_t *r)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;

    if (r->pieces.count == 1 && r->die_after == SIZE_MAX && !r->sse) {
        char *body = r->pieces.parts[0];
        r->pieces.parts[0] = NULL;
        r->pieces.count = 0;
        return respond(r, r->status, r->content_type, body);
    }
    resp = MHD_create_response_from_callback(
        r->sse ? MHD_SIZE_UNKNOWN : (uint64_t)fake_pieces_total(&r->pieces), FAKE_BLOCK_SIZE,
        reader, r, NULL);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->content_type);
    if (r->sse) {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    }
    ret = queue(r, r->status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* The fault for this request: the X-Fake-Fault header, else the configured fault with
 * its rate. Returns false for an unknown header value. */
static bool choose_fault(fake_request_t *r, const fake_settings_t *s, fake_fault_t *out)
{
    const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Fake-Fault");

    if (h)
        return fake_fault_parse(h, out);
    *out = FAKE_FAULT_NONE;
    if (s->fault != FAKE_FAULT_NONE && (s->fault_rate >= 1.0 || fake_rand_unit() < s->fault_rate))
        *out = s->fault;
    return true;
}

/* Latency in ms: the X-Fake-Latency-Ms header, else the flag plus jitter; -1 when
 * the header is not a number in [0, 3600000]. */
static long choose_latency(fake_request_t *r, const fake_settings_t *s)
{
    const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Fake-Latency-Ms");

    if (h) {
        char *end;
        long v = strtol(h, &end, 10);
        return (end == h || *end != '\0' || v < 0 || v > 3600000) ? -1 : v;
    }
    if (s->latency_jitter_ms > 0)
        return s->latency_ms + (long)(fake_rand_u64() % (uint64_t)(s->latency_jitter_ms + 1));
    return s->latency_ms;
}

/* Builds r->pieces and the status for an inference request after its fault is known. */
static bool plan_inference(fake_request_t *r, fake_api_t api, json_t *req,
                           const fake_settings_t *s)
{
    bool stream = api != FAKE_API_EMBEDDING && json_is_true(json_object_get(req, "stream"));
    size_t chunks = (size_t)s->stream_chunks;

    r->status = MHD_HTTP_OK;
    r->content_type = "application/json";
    switch (r->fault) {
    case FAKE_FAULT_500:
        r->status = 500;
        return fake_pieces_split(&r->pieces, fake_resp_error("fake provider: injected internal "
                                                             "error", "server_error",
                                                             "internal_error"), 1);
    case FAKE_FAULT_503:
        r->status = 503;
        return fake_pieces_split(&r->pieces, fake_resp_error("fake provider: injected overload",
                                                             "server_error",
                                                             "service_unavailable"), 1);
    case FAKE_FAULT_400:
        r->status = 400;
        return fake_pieces_split(&r->pieces, fake_resp_error("fake provider: injected bad "
                                                             "request", "invalid_request_error",
                                                             "invalid_request"), 1);
    case FAKE_FAULT_429:
        r->status = 429;
        r->retry_after = true;
        return fake_pieces_split(&r->pieces, fake_resp_error("fake provider: injected rate "
                                                             "limit", "rate_limit_error",
                                                             "rate_limit_exceeded"), 1);
    case FAKE_FAULT_HTML:
        r->content_type = "text/html";
        return fake_pieces_split(&r->pieces, strdup(FAKE_HTML_BODY), 1);
    case FAKE_FAULT_EMPTY:
        return fake_pieces_split(&r->pieces, strdup(""), 1);
    case FAKE_FAULT_MALFORMED: {
        fake_pieces_t whole = {0};
        bool ok = fake_resp_build(api, req, false, 1, atomic_fetch_add(&id_seq, 1), &whole);
        if (ok) {
            char *body = whole.parts[0];
            body[strlen(body) / 2] = '\0';
            whole.parts[0] = NULL;
            ok = fake_pieces_split(&r->pieces, body, 1);
        }
        fake_pieces_free(&whole);
        return ok;
    }
    case FAKE_FAULT_NONE:
    case FAKE_FAULT_SLOW:
    case FAKE_FAULT_DIE:
    case FAKE_FAULT_HANG:
    case FAKE_FAULT_CLOSE:
        break;
    }
    if (!fake_resp_build(api, req, stream, chunks, atomic_fetch_add(&id_seq, 1), &r->pieces))
        return false;
    if (stream) {
        r->sse = true;
        r->content_type = "text/event-stream";
        r->interval_ms = r->fault == FAKE_FAULT_SLOW ? s->slow_interval_ms : s->stream_interval_ms;
        /* role event + half the content, then the connection drops */
        if (r->fault == FAKE_FAULT_DIE)
            r->die_after = 1 + (r->pieces.count >= 4 ? (r->pieces.count - 3 + 1) / 2 : 0);
        return true;
    }
    if (r->fault == FAKE_FAULT_SLOW || r->fault == FAKE_FAULT_DIE) {
        char *body = r->pieces.parts[0];
        r->pieces.parts[0] = NULL;
        r->pieces.count = 0;
        if (!fake_pieces_split(&r->pieces, body, r->fault == FAKE_FAULT_SLOW ? chunks : 2))
            return false;
        if (r->fault == FAKE_FAULT_SLOW)
            r->interval_ms = s->slow_interval_ms;
        else
            r->die_after = 1;
    }
    return true;
}

static enum MHD_Result start_inference(fake_request_t *r)
{
    static const fake_api_t apis[] = {
        [EP_CHAT] = FAKE_API_CHAT,
        [EP_COMPLETIONS] = FAKE_API_COMPLETION,
        [EP_EMBEDDINGS] = FAKE_API_EMBEDDING,
    };
    fake_api_t api = apis[r->ep];
    /* headers and body are complete now: the receive time of /_fake/arrivals */
    int64_t received_us = wall_clock_us();
    fake_settings_t s;
    json_error_t jerr;
    json_t *req;
    char err[256];
    long latency;
    const char *marker;

    if (!r->is_post)
        return respond_error(r, 405, "use POST", "invalid_request_error", "method_not_allowed");
    if (r->body_too_large)
        return respond_error(r, 413, "request body too large", "invalid_request_error",
                             "body_too_large");
    req = r->body ? json_loadb(r->body, r->body_len, 0, &jerr) : NULL;
    if (!json_is_object(req)) {
        json_decref(req);
        return respond_error(r, 400, "could not parse the JSON body of your request",
                             "invalid_request_error", "invalid_json");
    }
    if (!fake_resp_validate(api, req, err, sizeof err)) {
        json_decref(req);
        return respond_error(r, 400, err, "invalid_request_error", "invalid_request");
    }
    marker = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Fake-Marker");
    if (!marker)
        marker = json_string_value(json_object_get(req, "user"));
    if (marker) {
        fake_stats_marker(marker);
        fake_arrivals_record(marker, received_us);
    }

    fake_state_snapshot(&s);
    latency = choose_latency(r, &s);
    if (!choose_fault(r, &s, &r->fault) || latency < 0) {
        json_decref(req);
        return respond_error(r, 400, "bad X-Fake-Fault or X-Fake-Latency-Ms header",
                             "invalid_request_error", "bad_fake_header");
    }
    if (r->fault == FAKE_FAULT_CLOSE) {
        json_decref(req);
        return MHD_NO;
    }
    if (r->fault == FAKE_FAULT_HANG) {
        json_decref(req);
        r->state = REQ_WAITING;
        suspend_until(r, FAKE_TIMER_FOREVER);
        return MHD_YES;
    }
    bool planned = plan_inference(r, api, req, &s);
    json_decref(req);
    if (!planned)
        return MHD_NO;
    if (latency > 0) {
        r->state = REQ_WAITING;
        suspend_until(r, clock_monotonic_us() + (int64_t)latency * 1000);
        return MHD_YES;
    }
    return answer(r);
}

static enum MHD_Result start_control(fake_request_t *r)
{
    char err[256];

    switch (r->ep) {
    case EP_FAKE_STATS:
        return respond_json(r, 200, fake_stats_json());
    case EP_FAKE_ARRIVALS:
        return respond_json(r, 200, fake_arrivals_json());
    case EP_FAKE_RESET:
        if (!r->is_post)
            return respond_error(r, 405, "use POST", "invalid_request_error", "method_not_allowed");
        fake_state_reset();
        return respond_json(r, 200, fake_state_config_json());
    case EP_FAKE_CONFIG:
        if (r->is_post) {
            json_error_t jerr;
            json_t *patch = r->body ? json_loadb(r->body, r->body_len, 0, &jerr) : NULL;
            bool ok = fake_state_apply(patch, err, sizeof err);
            json_decref(patch);
            if (!ok)
                return respond_error(r, 400, err, "invalid_request_error", "bad_config");
            log_info("config_changed", "source=/_fake/config");
        }
        return respond_json(r, 200, fake_state_config_json());
    default:
        return MHD_NO;
    }
}

static enum MHD_Result not_found(fake_request_t *r, const char *method, const char *url)
{
    char msg[300];

    snprintf(msg, sizeof msg, "Invalid URL (%s %.200s)", method, url);
    return respond_error(r, 404, msg, "invalid_request_error", "unknown_url");
}

static enum MHD_Result start_info(fake_request_t *r, const char *method, const char *url)
{
    fake_family_t family = fake_state_family();
    fake_settings_t s;
    json_t *models;
    char *body = NULL;

    if (r->ep == EP_UNKNOWN)
        return not_found(r, method, url);
    if (r->is_post)
        return respond_error(r, 405, "use GET", "invalid_request_error", "method_not_allowed");
    fake_state_snapshot(&s);
    switch (r->ep) {
    case EP_HEALTH:
        if (s.health == FAKE_HEALTH_HANG) {
            r->fault = FAKE_FAULT_HANG;
            r->state = REQ_WAITING;
            suspend_until(r, FAKE_TIMER_FOREVER);
            return MHD_YES;
        }
        if (s.health == FAKE_HEALTH_OK)
            return respond(r, 200, "application/json", strdup("{\"status\":\"ok\"}"));
        return respond(r, 503, "application/json",
                       strdup("{\"error\":{\"code\":503,\"message\":\"Loading model\","
                              "\"type\":\"unavailable_error\"}}"));
    case EP_MODELS:
        models = fake_state_models();
        body = fake_resp_models(family, models);
        json_decref(models);
        return respond(r, 200, "application/json", body);
    case EP_PROPS:
    case EP_SERVER_INFO:
        if (s.slots == 0 || family != (r->ep == EP_PROPS ? FAKE_FAMILY_LLAMACPP : FAKE_FAMILY_SGLANG))
            return not_found(r, method, url);
        models = fake_state_models();
        body = r->ep == EP_PROPS ? fake_resp_props(models, s.slots)
                                 : fake_resp_server_info(models, s.slots);
        json_decref(models);
        return respond(r, 200, "application/json", body);
    case EP_OLLAMA_ROOT:
        if (family != FAKE_FAMILY_OLLAMA)
            return not_found(r, method, url);
        return respond(r, 200, "text/plain; charset=utf-8", strdup("Ollama is running"));
    case EP_OLLAMA_TAGS:
        if (family != FAKE_FAMILY_OLLAMA)
            return not_found(r, method, url);
        models = fake_state_models();
        body = fake_resp_ollama_tags(models);
        json_decref(models);
        return respond(r, 200, "application/json", body);
    case EP_OLLAMA_VERSION:
        if (family != FAKE_FAMILY_OLLAMA)
            return not_found(r, method, url);
        return respond(r, 200, "application/json", strdup("{\"version\":\"0.0.0-fake\"}"));
    default:
        return not_found(r, method, url);
    }
}

/* MHD access handler: called once when the headers are in, once per body piece, then
 * with no data when the request is complete, and again after each resume. */
static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload_data,
                              size_t *upload_data_size, void **con_cls)
{
    fake_request_t *r = *con_cls;

    (void)cls;
    (void)version;
    if (!r) {
        r = request_new(conn, url, method);
        if (!r)
            return MHD_NO;
        *con_cls = r;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        request_append_body(r, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    switch (r->state) {
    case REQ_RECEIVING:
        if (is_inference(r->ep))
            return start_inference(r);
        if (is_control(r->ep))
            return start_control(r);
        return start_info(r, method, url);
    case REQ_WAITING:
        /* resumed by the timer: latency over, or the client left / shutdown */
        if (atomic_load(&r->gone) || r->fault == FAKE_FAULT_HANG)
            return MHD_NO;
        return answer(r);
    case REQ_ANSWERED:
        return MHD_YES;
    }
    return MHD_NO;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    fake_request_t *r = *con_cls;

    (void)cls;
    (void)conn;
    if (!r)
        return;
    request_release(r);
    if (!is_control(r->ep) && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
        fake_stats_aborted();
    log_debug("request", "path=%s status=%u fault=%s ms=%.3f end=%s", r->path, r->status,
              fake_fault_name(r->fault), (double)(clock_monotonic_us() - r->started_us) / 1000.0,
              toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "ok" : "aborted");
    request_free(r);
    *con_cls = NULL;
}

__attribute__((format(printf, 2, 0)))
static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    char msg[512], quoted[600];
    size_t n;

    (void)cls;
    vsnprintf(msg, sizeof msg, fmt, ap);
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    /* Closes this program asked for (faults, clients gone) are expected: debug. */
    if (strcasestr(msg, "application"))
        log_debug("mhd", "message=%s", log_quote(quoted, sizeof quoted, msg));
    else
        log_warn("mhd", "message=%s", log_quote(quoted, sizeof quoted, msg));
}

/* ---- startup ----------------------------------------------------------------------------- */

/* Raises the open-file limit to its hard maximum; returns the connection limit to use. */
static unsigned connection_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 1000;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > 65536)
        return 65000;
    return rl.rlim_cur > 128 ? (unsigned)rl.rlim_cur - 64 : 64;
}

int main(int argc, char **argv)
{
    char err[512];
    log_level_t level;
    fake_family_t family;
    fake_fault_t fault;
    fake_settings_t initial;
    struct sockaddr_storage addr;
    struct MHD_Daemon *httpd = NULL;
    unsigned int flags;
    sigset_t sigs;
    int sig = 0;
    int rc = 1;

    switch (config_parse(options, sizeof options / sizeof options[0], argc, argv, usage, err,
                         sizeof err)) {
    case CONFIG_OK:
        break;
    case CONFIG_EXIT_HELP:
        return 0;
    case CONFIG_ERROR:
        fprintf(stderr, "fake-provider: %s\n", err);
        return 2;
    }
    if (!log_parse_level(opt_log_level, &level)) {
        fprintf(stderr, "fake-provider: --log-level (FAKE_PROVIDER_LOG_LEVEL) must be "
                        "debug|info|warn|error\n");
        return 2;
    }
    log_init("fake-provider", level);
    if (!fake_family_parse(opt_family, &family)) {
        fprintf(stderr, "fake-provider: --family (FAKE_PROVIDER_FAMILY) must be "
                        "llamacpp|vllm|sglang|ollama\n");
        return 2;
    }
    if (!fake_fault_parse(opt_fault, &fault)) {
        fprintf(stderr, "fake-provider: unknown --fault (FAKE_PROVIDER_FAULT) '%s'\n", opt_fault);
        return 2;
    }
    if (!(opt_fault_rate >= 0 && opt_fault_rate <= 1)) {
        fprintf(stderr, "fake-provider: --fault-rate (FAKE_PROVIDER_FAULT_RATE) must be in [0, 1]\n");
        return 2;
    }

    memset(&addr, 0, sizeof addr);
    flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME
            | MHD_USE_ERROR_LOG;
    if (strchr(opt_bind, ':')) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&addr;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)opt_port);
        if (inet_pton(AF_INET6, opt_bind, &a6->sin6_addr) != 1)
            goto bad_bind;
        flags |= MHD_USE_IPv6;
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)&addr;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)opt_port);
        if (inet_pton(AF_INET, opt_bind, &a4->sin_addr) != 1)
            goto bad_bind;
    }

    initial = (fake_settings_t){
        .latency_ms = opt_latency,
        .latency_jitter_ms = opt_jitter,
        .fault = fault,
        .fault_rate = opt_fault_rate,
        .health = FAKE_HEALTH_OK,
        .stream_chunks = opt_chunks,
        .stream_interval_ms = opt_interval,
        .slow_interval_ms = opt_slow,
        .slots = opt_slots,
    };
    json_object_seed(0);
    if (!fake_state_init(&initial, family, opt_models)) {
        fprintf(stderr, "fake-provider: --models (FAKE_PROVIDER_MODELS) names no model\n");
        fake_state_free();
        return 2;
    }

    /* Signals are taken synchronously by main(); every other thread blocks them. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (!fake_timer_start()) {
        log_error("start_failed", "reason=timer_thread action=exit");
        goto out;
    }
    httpd = MHD_start_daemon(
        flags, (uint16_t)opt_port, NULL, NULL, handle, NULL, MHD_OPTION_EXTERNAL_LOGGER,
        mhd_logger, NULL, MHD_OPTION_SOCK_ADDR, &addr,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)opt_threads, MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, NULL, MHD_OPTION_CONNECTION_LIMIT, connection_limit(),
        MHD_OPTION_LISTEN_BACKLOG_SIZE, 4096u, MHD_OPTION_CONNECTION_TIMEOUT, 0u,
        MHD_OPTION_END);
    if (!httpd) {
        log_error("start_failed", "bind=%s port=%ld reason=listen action=exit", opt_bind, opt_port);
        goto out;
    }
    {
        const union MHD_DaemonInfo *info = MHD_get_daemon_info(httpd, MHD_DAEMON_INFO_BIND_PORT);
        char models[256];
        log_info("listening", "port=%u bind=%s family=%s models=%s slots=%ld threads=%ld",
                 info ? (unsigned)info->port : (unsigned)opt_port, opt_bind,
                 fake_family_name(family), log_quote(models, sizeof models, opt_models), opt_slots,
                 opt_threads);
    }

    while (sigwait(&sigs, &sig) != 0)
        ;
    log_info("stopping", "signal=%s", sig == SIGINT ? "SIGINT" : "SIGTERM");
    rc = 0;

out:
    fake_timer_stop();
    if (httpd)
        MHD_stop_daemon(httpd);
    fake_state_free();
    if (rc == 0)
        log_info("stopped", "exit=0");
    return rc;

bad_bind:
    fprintf(stderr, "fake-provider: --bind (FAKE_PROVIDER_BIND) '%s' is not an IP address\n",
            opt_bind);
    return 2;
}
