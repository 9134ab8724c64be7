/* http: libmicrohttpd handlers. Each request gets a context on its first call;
 * bodies are collected up to the limit; a request that needs the database is
 * suspended and handed to the dispatcher, which resumes it with the reply, and the
 * handler (called again) queues it. Contexts are freed in the completed callback. */
#include "http.h"

#include <netdb.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <microhttpd.h>

#include "buf.h"
#include "clock.h"
#include "errors.h"
#include "log.h"
#include "metrics.h"
#include "request.h"
#include "stream.h"

/* A body past the limit is read and dropped up to this much more, so the client
 * can be told 413; beyond it the connection is closed. */
#define HTTP_DISCARD_SLACK (1024u * 1024u)

/* Each connection's libmicrohttpd memory pool: the request head (line, headers
 * and their index) must fit in it, or libmicrohttpd answers 431 itself; a few
 * hundred headers or an 8 KB URL need more than 16 KiB. More than 32 KiB, so that
 * libmicrohttpd 0.9.75 maps each pool on its own and unmaps it when the connection
 * closes (a pool of up to 32 KiB comes from malloc, and its pages stay in the
 * allocator after the close); 36 KiB is 9 pages. */
#define HTTP_POOL_BYTES (36u * 1024u)

/* More query arguments than this and the request is refused (414) before
 * libmicrohttpd parses them: the gateway reads one (?wait), and libmicrohttpd 0.9.75
 * runs out of its per-connection pool at a few hundred and then may never answer. */
#define HTTP_MAX_QUERY_ARGS 64

typedef enum {
    ROUTE_NONE,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_EMBEDDINGS,
    ROUTE_MODELS,
    ROUTE_JOBS,
    ROUTE_JOB,
    ROUTE_HEALTHZ,
    ROUTE_READYZ,
    ROUTE_METRICS,
    ROUTE_STATUS,
} route_t;

typedef struct {
    const char *path;    /* NULL: matched by prefix in http_route */
    const char *label;   /* the endpoint label in metrics */
    const char *allow;   /* methods, as sent in Allow */
    bool open;           /* served without an API key */
} route_info_t;

static const route_info_t http_routes[] = {
    [ROUTE_NONE] = {NULL, "other", "", true},
    [ROUTE_CHAT] = {"/v1/chat/completions", "/v1/chat/completions", "POST", false},
    [ROUTE_COMPLETIONS] = {"/v1/completions", "/v1/completions", "POST", false},
    [ROUTE_EMBEDDINGS] = {"/v1/embeddings", "/v1/embeddings", "POST", false},
    [ROUTE_MODELS] = {"/v1/models", "/v1/models", "GET, HEAD", false},
    [ROUTE_JOBS] = {"/v1/jobs", "/v1/jobs", "POST", false},
    [ROUTE_JOB] = {NULL, "/v1/jobs/{id}", "GET, HEAD, DELETE", false},
    [ROUTE_HEALTHZ] = {"/healthz", "/healthz", "GET, HEAD", true},
    [ROUTE_READYZ] = {"/readyz", "/readyz", "GET, HEAD", true},
    [ROUTE_METRICS] = {"/metrics", "/metrics", "GET, HEAD", true},
    [ROUTE_STATUS] = {"/v1/status", "/v1/status", "GET, HEAD", false},
};

struct http_server {
    http_options_t opt;
    struct MHD_Daemon *daemon;
    atomic_bool quiescing;
    atomic_uint kept;    /* connections holding a keep-alive place (http_keep_alive) */
    struct sockaddr_storage addr;
};

/* One connection, from accept to close (libmicrohttpd's socket context). Only the
 * thread serving the connection touches it. */
typedef struct {
    bool kept;           /* holds one of the server's --max-keepalive-connections places */
} http_conn_t;

/* One request. call is first so the dispatcher's call_t* is this context. */
typedef struct {
    call_t call;
    http_server_t *server;
    struct MHD_Connection *conn;
    route_t route;
    int64_t start_us;
    buf_t body;
    size_t discarded;
    bool too_large;
    bool too_many_args;  /* the URI had more than HTTP_MAX_QUERY_ARGS arguments */
    bool close;          /* framing was refused: the connection must not be reused */
    bool handed_over;    /* suspended and given to the dispatcher */
    bool replied;        /* a response is queued */
    int status;          /* what was queued */
    const char *allow;   /* Allow header of a 405 */
} request_t;

static route_t http_route(const char *url)
{
    int64_t id;

    for (size_t r = ROUTE_CHAT; r < sizeof http_routes / sizeof http_routes[0]; r++) {
        if (http_routes[r].path && strcmp(url, http_routes[r].path) == 0)
            return (route_t)r;
    }
    if (strncmp(url, "/v1/jobs/", 9) == 0 && request_parse_job_path(url, &id))
        return ROUTE_JOB;
    return ROUTE_NONE;
}

static bool http_method_allowed(route_t route, const char *method)
{
    const char *allow = http_routes[route].allow;
    size_t n = strlen(method);

    for (const char *p = allow; (p = strstr(p, method)) != NULL; p += n) {
        bool start = p == allow || p[-1] == ' ';
        bool end = p[n] == '\0' || p[n] == ',';

        if (start && end)
            return true;
    }
    return false;
}

/* What keeps an event stream from being cached or held back by a reverse proxy. */
static void http_stream_headers(struct MHD_Response *resp)
{
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
}

/* Whether rq's connection may stay open for another request after this response.
 * A connection kept open once holds its whole memory pool (HTTP_POOL_BYTES) from
 * then until it closes: libmicrohttpd 0.9.75 zeroes the pool when a response ends on
 * a connection that stays open, while a connection waiting for its first answer has
 * touched two pages of it. So at most --max-keepalive-connections connections are
 * kept: the first response that keeps a connection takes a place, which the
 * connection holds until it closes (or times out idle); with every place taken,
 * responses on other connections close theirs, and those clients reconnect. */
static bool http_keep_alive(request_t *rq)
{
    http_server_t *s = rq->server;
    const union MHD_ConnectionInfo *info;
    http_conn_t *c;

    if (rq->close || atomic_load(&s->quiescing))
        return false;
    info = MHD_get_connection_info(rq->conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    c = info ? info->socket_context : NULL;
    if (!c)
        return false;   /* its context could not be allocated: nothing to count it by */
    if (c->kept)
        return true;
    if (atomic_fetch_add(&s->kept, 1) >= s->opt.max_keepalive) {
        atomic_fetch_sub(&s->kept, 1);
        return false;
    }
    c->kept = true;
    return true;
}

/* Connection opened and closed: the context that records its keep-alive place. */
static void http_connection_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                                   enum MHD_ConnectionNotificationCode code)
{
    http_server_t *s = cls;
    http_conn_t *c = *socket_context;

    (void)conn;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        *socket_context = calloc(1, sizeof(http_conn_t));
        return;
    }
    if (code != MHD_CONNECTION_NOTIFY_CLOSED || !c)
        return;
    if (c->kept)
        atomic_fetch_sub(&s->kept, 1);
    free(c);
    *socket_context = NULL;
}

/* Queue r as the response (taking its body). MHD_NO only when MHD refuses. */
static enum MHD_Result http_send(request_t *rq, gw_reply_t *r)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;

    if (r->status == 0)
        errors_reply(r, 500, "internal_error", "no reply was prepared");
    if (r->body) {
        resp = MHD_create_response_from_buffer(r->body_len, r->body, MHD_RESPMEM_MUST_FREE);
        if (resp)
            r->body = NULL;   /* MHD frees it now */
    } else {
        resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    }
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            r->content_type ? r->content_type : "application/json");
    if (r->content_type && strncmp(r->content_type, "text/event-stream", 17) == 0)
        http_stream_headers(resp);
    if (r->retry_after_s > 0) {
        char v[16];

        snprintf(v, sizeof v, "%d", r->retry_after_s);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    if (r->status == 405 && rq->allow)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, rq->allow);
    if (!http_keep_alive(rq))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    ret = MHD_queue_response(rq->conn, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    rq->replied = true;
    rq->status = r->status;
    errors_reply_clear(r);
    return ret;
}

/* The event stream: MHD asks for more as the socket drains. With nothing to give,
 * the connection is suspended (no busy loop; libmicrohttpd's rule for a content
 * reader returning 0) and the dispatcher resumes it when the next event is framed. */
static void http_stream_suspend(void *ctx)
{
    MHD_suspend_connection(ctx);
}

static void http_stream_resume(void *ctx)
{
    MHD_resume_connection(ctx);
}

static ssize_t http_stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    ssize_t n = stream_take(cls, buf, max);

    (void)pos;
    if (n == STREAM_TAKE_END)
        return MHD_CONTENT_READER_END_OF_STREAM;
    if (n == STREAM_TAKE_ABORT)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    return n;
}

/* The dispatcher has the first event: 200 and the event stream, fed as it comes. */
static enum MHD_Result http_send_stream(request_t *rq)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;

    stream_attach(rq->call.stream, http_stream_suspend, http_stream_resume, rq->conn);
    resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, http_stream_read, rq->call.stream, NULL);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
    http_stream_headers(resp);
    if (!http_keep_alive(rq))
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    ret = MHD_queue_response(rq->conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    rq->replied = true;
    rq->status = 200;
    errors_reply_clear(&rq->call.reply);
    metrics_stream_first_event((double)(clock_monotonic_us() - rq->start_us) / 1e6);
    return ret;
}

static enum MHD_Result http_error(request_t *rq, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static enum MHD_Result http_error(request_t *rq, int status, const char *code, const char *fmt, ...)
{
    char message[1024];
    gw_reply_t r = {0};
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    errors_reply(&r, status, code, "%s", message);
    if (status == 503)
        r.retry_after_s = 1;
    return http_send(rq, &r);
}

static enum MHD_Result http_json(request_t *rq, int status, const char *json)
{
    gw_reply_t r = {0};

    r.status = status;
    r.body = strdup(json);
    if (!r.body)
        return MHD_NO;
    r.body_len = strlen(json);
    return http_send(rq, &r);
}

/* The dispatcher gives a call back: wake the connection; MHD calls the handler
 * again, which queues the reply. Runs on the dispatcher thread. */
static void http_resume(call_t *c)
{
    request_t *rq = (request_t *)c;

    MHD_resume_connection(rq->conn);
}

/* Suspend the connection and give the call to the dispatcher. The suspend comes
 * first so the dispatcher can never resume a connection that is not suspended. */
static enum MHD_Result http_hand_over(request_t *rq, call_kind_t kind)
{
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(rq->conn, MHD_CONNECTION_INFO_CONNECTION_FD);

    rq->call.kind = kind;
    rq->call.client_fd = info ? info->connect_fd : -1;
    rq->call.resume = http_resume;
    rq->handed_over = true;
    MHD_suspend_connection(rq->conn);
    dispatcher_enqueue(rq->server->opt.dispatcher, &rq->call);
    return MHD_YES;
}

static const char *http_header(request_t *rq, const char *name)
{
    return MHD_lookup_connection_value(rq->conn, MHD_HEADER_KIND, name);
}

/* What the framing checks learn from the request head. */
#define HTTP_HEAD_READ_MAX 16

typedef struct {
    const char *start, *end;   /* the head in libmicrohttpd's read buffer; NULL: unknown */
    struct {
        const char *from, *to; /* after the value, up to the next thing libmicrohttpd parsed */
    } read[HTTP_HEAD_READ_MAX];
    size_t n_read;             /* entries of the headers the gateway reads */
    bool too_many;             /* more of those than read[] holds */
    unsigned hosts, lengths;
    unsigned te_fields;        /* Transfer-Encoding fields */
    unsigned codings, chunked; /* the codings they list, chunked among them */
    bool chunked_last, te_malformed;
} http_head_t;

/* The headers whose values the gateway reads or relies on. */
static bool http_header_read(const char *key)
{
    static const char *const names[] = {
        MHD_HTTP_HEADER_HOST, MHD_HTTP_HEADER_CONTENT_LENGTH, MHD_HTTP_HEADER_TRANSFER_ENCODING,
        MHD_HTTP_HEADER_CONTENT_TYPE, MHD_HTTP_HEADER_AUTHORIZATION, "X-Request-Timeout", "X-Priority",
        "Idempotency-Key",
    };

    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcasecmp(key, names[i]) == 0)
            return true;
    return false;
}

static bool http_in_head(const http_head_t *hd, const char *p)
{
    return hd->start && (uintptr_t)p >= (uintptr_t)hd->start && (uintptr_t)p <= (uintptr_t)hd->end;
}

static bool http_tchar(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* One Transfer-Encoding field: a list of codings (RFC 9112 6.1), empty elements
 * ignored, parameters allowed on codings other than chunked. */
static void http_transfer_codings(http_head_t *hd, const char *v, size_t len)
{
    size_t i = 0;

    while (i <= len) {
        size_t start, end, tok;

        while (i < len && (v[i] == ' ' || v[i] == '\t'))
            i++;
        start = i;
        while (i < len && v[i] != ',')
            i++;
        end = i++;               /* past the comma */
        while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t'))
            end--;
        if (end == start)
            continue;
        for (tok = start; tok < end && http_tchar(v[tok]); tok++)
            ;
        if (tok == start || (tok < end && v[tok] != ';' && v[tok] != ' ' && v[tok] != '\t'))
            hd->te_malformed = true;
        hd->codings++;
        hd->chunked_last = tok - start == 7 && strncasecmp(v + start, "chunked", 7) == 0;
        if (hd->chunked_last) {
            hd->chunked++;
            if (tok != end)
                hd->te_malformed = true;   /* chunked takes no parameters */
        }
    }
}

static enum MHD_Result http_head_entry(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_len,
                                       const char *value, size_t value_len)
{
    http_head_t *hd = cls;

    (void)kind;
    (void)key_len;
    if (strcasecmp(key, MHD_HTTP_HEADER_HOST) == 0)
        hd->hosts++;
    else if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0)
        hd->lengths++;
    else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        hd->te_fields++;
        http_transfer_codings(hd, value, value_len);
    }
    if (!http_header_read(key))
        return MHD_YES;
    if (hd->n_read == HTTP_HEAD_READ_MAX) {
        hd->too_many = true;
        return MHD_YES;
    }
    hd->read[hd->n_read].from = value + value_len;
    hd->read[hd->n_read].to = hd->end;
    hd->n_read++;
    return MHD_YES;
}

/* Second pass: each read value's gap ends at the nearest name or value after it. */
static enum MHD_Result http_head_bound(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_len,
                                       const char *value, size_t value_len)
{
    http_head_t *hd = cls;
    const char *p[2] = {key, value};

    (void)kind;
    (void)key_len;
    (void)value_len;
    for (size_t i = 0; i < hd->n_read; i++)
        for (int k = 0; k < 2; k++)
            if (http_in_head(hd, p[k]) && (uintptr_t)p[k] > (uintptr_t)hd->read[i].from &&
                (uintptr_t)p[k] < (uintptr_t)hd->read[i].to)
                hd->read[i].to = p[k];
    return MHD_YES;
}

/* A NUL inside a header value the gateway reads (RFC 9110 5.5: reject).
 * libmicrohttpd 0.9.75 measures values with strlen, so "X-Priority: 1\0 2" arrives
 * as "1" with length 1 and MHD_lookup_connection_value_n cannot tell. The head is
 * still in its read buffer (method points at its start, REQUEST_HEADER_SIZE gives
 * its length), with each line's CR LF and colon overwritten by NULs: from a value's
 * end to the next header name there are only NULs (and the blanks before a value).
 * Any other byte there is the rest of a value cut at a NUL, or an obs-fold, which
 * RFC 9112 5.2 allows refusing too. Only bytes proven to lie inside the head are
 * read; with another layout (another libmicrohttpd) nothing is concluded. */
static bool http_head_has_nul(struct MHD_Connection *conn, http_head_t *hd)
{
    MHD_get_connection_values_n(conn, MHD_HEADER_KIND, http_head_bound, hd);
    for (size_t i = 0; i < hd->n_read; i++) {
        if (!http_in_head(hd, hd->read[i].from))
            continue;
        for (const char *c = hd->read[i].from; c < hd->read[i].to; c++)
            if (*c != '\0' && *c != ' ' && *c != '\t')
                return true;
    }
    return false;
}

/* Framing and head checks (RFC 9110, 9112), before anything else: 0 when fine,
 * else the status to refuse with and *why. */
static int http_check_head(request_t *rq, const char *method, const char *version, const char **why)
{
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(rq->conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
    http_head_t hd = {0};

    if (info && method) {
        hd.start = method;
        hd.end = method + info->header_size;
    }
    MHD_get_connection_values_n(rq->conn, MHD_HEADER_KIND, http_head_entry, &hd);
    *why = NULL;
    if (hd.too_many)
        *why = "too many Host, Content-Length, Transfer-Encoding or option headers";
    else if (hd.hosts == 0 && strcmp(version, MHD_HTTP_VERSION_1_0) != 0)
        *why = "an HTTP/1.1 request must have a Host header";
    else if (hd.hosts > 1)
        *why = "more than one Host header";
    else if (hd.lengths > 1)
        *why = "more than one Content-Length header";
    else if (hd.te_malformed || hd.chunked > 1)
        *why = "Transfer-Encoding is malformed, or names chunked more than once";
    else if (hd.te_fields > 0 && !hd.chunked_last)
        /* RFC 9112 6.3: the length cannot be known; 400 and close. */
        *why = "Transfer-Encoding must end with chunked";
    else if (hd.codings > hd.chunked) {
        /* RFC 9112 6.1: a coding the server does not implement. */
        *why = "only the chunked transfer coding is supported";
        return 501;
    } else if (hd.te_fields > 0 &&
               (hd.te_fields > 1 || strcasecmp(MHD_lookup_connection_value(rq->conn, MHD_HEADER_KIND,
                                                                           MHD_HTTP_HEADER_TRANSFER_ENCODING),
                                               "chunked") != 0))
        /* libmicrohttpd reads the body as chunked only for exactly this value. */
        *why = "Transfer-Encoding must be just \"chunked\"";
    if (!*why && http_head_has_nul(rq->conn, &hd))
        *why = "a header value contains a NUL byte";
    return *why ? 400 : 0;
}

/* First call: framing, route, method, shutdown, key presence, content type and
 * declared length. Anything refused here is answered before the body is read. */
static enum MHD_Result http_begin(request_t *rq, const char *url, const char *method, const char *version)
{
    http_server_t *s = rq->server;
    const char *v, *why;
    int status;

    if (rq->too_many_args)
        return http_error(rq, 414, "uri_too_long", "the URL has more than %d query arguments",
                          HTTP_MAX_QUERY_ARGS);
    status = http_check_head(rq, method, version, &why);
    if (status != 0) {
        rq->close = true;
        return http_error(rq, status, status == 501 ? "not_implemented" : "malformed_request", "%s", why);
    }
    rq->route = http_route(url);
    if (rq->route == ROUTE_NONE)
        return http_error(rq, 404, "unknown_path", "no such endpoint: %s %s", method, url);
    if (!http_method_allowed(rq->route, method)) {
        rq->allow = http_routes[rq->route].allow;
        return http_error(rq, 405, "method_not_allowed", "%s is not allowed on %s; allowed: %s", method,
                          http_routes[rq->route].label, rq->allow);
    }
    if (atomic_load(&s->quiescing) && rq->route != ROUTE_HEALTHZ)
        return http_error(rq, 503, "shutting_down", "the gateway is shutting down; try again on another instance");
    if (s->opt.require_api_key && !http_routes[rq->route].open) {
        const char *token;
        size_t len;

        if (!request_bearer_token(http_header(rq, MHD_HTTP_HEADER_AUTHORIZATION), &token, &len))
            return http_error(rq, 401, "missing_api_key",
                              "an API key is required: send Authorization: Bearer <key>");
        rq->call.api_key = strndup(token, len);
        if (!rq->call.api_key)
            return MHD_NO;
    }
    if (strcmp(method, "POST") == 0) {
        if (!request_content_type_ok(http_header(rq, MHD_HTTP_HEADER_CONTENT_TYPE)))
            return http_error(rq, 415, "unsupported_media_type",
                              "request body must be sent with Content-Type: application/json");
        v = http_header(rq, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (v) {
            char *end;
            unsigned long long n = strtoull(v, &end, 10);

            if (*end == '\0' && n > s->opt.max_body_bytes)
                return http_error(rq, 413, "request_too_large",
                                  "request body of %llu bytes is over the limit of %zu bytes", n,
                                  s->opt.max_body_bytes);
        }
    }
    return MHD_YES;
}

static enum MHD_Result http_take_body(request_t *rq, const char *data, size_t size)
{
    size_t max = rq->server->opt.max_body_bytes;

    if (rq->replied)
        return MHD_YES;
    if (!rq->too_large && rq->body.len + size > max) {
        rq->too_large = true;
        rq->discarded = rq->body.len;
        buf_free(&rq->body);
    }
    if (rq->too_large) {
        rq->discarded += size;
        /* Reading on costs nothing but time; past the slack the client gets cut off. */
        return rq->discarded > max + HTTP_DISCARD_SLACK ? MHD_NO : MHD_YES;
    }
    buf_append(&rq->body, data, size);
    if (rq->body.oom) {
        buf_free(&rq->body);
        rq->too_large = true;
    }
    return MHD_YES;
}

static const char *http_arg(request_t *rq, const char *name)
{
    return MHD_lookup_connection_value(rq->conn, MHD_GET_ARGUMENT_KIND, name);
}

/* The whole request is here: answer it or hand it over. */
static enum MHD_Result http_complete(request_t *rq, const char *url, const char *method)
{
    http_server_t *s = rq->server;
    request_options_t opt;
    gw_reply_t r = {0};
    const char *endpoint = http_routes[rq->route].path;
    bool stream = false;
    int rc;

    if (rq->too_large)
        return http_error(rq, 413, "request_too_large", "request body is over the limit of %zu bytes",
                          s->opt.max_body_bytes);
    if (rq->route == ROUTE_HEALTHZ)
        return http_json(rq, 200, "{\"status\":\"ok\"}");
    if (rq->route == ROUTE_METRICS)
        return http_hand_over(rq, CALL_METRICS);
    if (!dispatcher_db_ready(s->opt.dispatcher))
        return http_error(rq, 503, "database_unavailable",
                          "the gateway cannot reach its database right now (reconnecting); try again shortly");

    switch (rq->route) {
    case ROUTE_READYZ:
        return http_hand_over(rq, CALL_READY);
    case ROUTE_MODELS:
        return http_hand_over(rq, CALL_MODELS);
    case ROUTE_STATUS:
        return http_hand_over(rq, CALL_STATUS);
    case ROUTE_CHAT:
    case ROUTE_COMPLETIONS:
    case ROUTE_EMBEDDINGS:
    case ROUTE_JOBS:
        if (request_parse_options(http_header(rq, "X-Request-Timeout"), http_header(rq, "X-Priority"),
                                  http_header(rq, "Idempotency-Key"), s->opt.request_timeout_ms, &opt, &r) != 0)
            return http_send(rq, &r);
        if (rq->route == ROUTE_JOBS)
            rc = request_build_job(rq->body.data, rq->body.len, &opt, &rq->call.element, &rq->call.element_len, &r);
        else
            rc = request_build_openai(rq->body.data, rq->body.len, endpoint, &opt, &rq->call.element,
                                      &rq->call.element_len, &stream, &r);
        buf_free(&rq->body);
        if (rc != 0)
            return http_send(rq, &r);
        rq->call.timeout_ms = opt.timeout_ms;
        rq->call.keyed = opt.idempotency_key != NULL;
        if (stream) {
            rq->call.stream = stream_new();
            if (!rq->call.stream)
                return http_error(rq, 500, "internal_error", "out of memory");
            metrics_stream_request();
        }
        return http_hand_over(rq, rq->route == ROUTE_JOBS ? CALL_JOB_CREATE : CALL_SUBMIT);
    case ROUTE_JOB:
        request_parse_job_path(url, &rq->call.job_id);
        if (strcmp(method, "DELETE") == 0)
            return http_hand_over(rq, CALL_JOB_CANCEL);
        if (!request_parse_wait(http_arg(rq, "wait"), &rq->call.wait_ms))
            return http_error(rq, 400, "invalid_wait", "wait must be a number of seconds from 0 to %.0f",
                              REQUEST_MAX_WAIT_S);
        return http_hand_over(rq, CALL_JOB_GET);
    default:
        return http_error(rq, 404, "unknown_path", "no such endpoint: %s %s", method, url);
    }
}

/* The context of a request whose URI has too many query arguments, until the
 * handler replaces it with a request_t. */
static request_t http_too_many_args;

/* libmicrohttpd calls this with the raw URI, before it splits off and parses the
 * query arguments, and makes the return value the request's first context. Past
 * HTTP_MAX_QUERY_ARGS the request is marked (the handler answers 414) and the
 * query is cut to nothing so libmicrohttpd does not parse it: in 0.9.75 a few
 * hundred arguments exhaust the connection's memory pool, and the 431 it then
 * decides on may never be sent. The URI is libmicrohttpd's own buffer (const only
 * in the callback's type); 0.9.75 finds the '?' before this call and parses from
 * the byte after it, which is made the terminating NUL. */
static void *http_uri_log(void *cls, const char *uri, struct MHD_Connection *conn)
{
    char *q = strchr(uri, '?');
    size_t args = 0;

    (void)cls;
    (void)conn;
    if (!q || !q[1])
        return NULL;
    for (const char *p = q + 1; *p; p++)
        if (*p == '&' && p[1])
            args++;
    if (args + 1 <= HTTP_MAX_QUERY_ARGS)
        return NULL;
    q[1] = '\0';
    return &http_too_many_args;
}

static enum MHD_Result http_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                   const char *version, const char *upload_data, size_t *upload_data_size,
                                   void **con_cls)
{
    http_server_t *s = cls;
    request_t *rq = *con_cls;

    if (!rq || rq == &http_too_many_args) {
        rq = calloc(1, sizeof *rq);
        if (!rq)
            return MHD_NO;
        rq->server = s;
        rq->conn = conn;
        rq->start_us = clock_monotonic_us();
        rq->call.client_fd = -1;
        rq->too_many_args = *con_cls == &http_too_many_args;
        *con_cls = rq;
        return http_begin(rq, url, method, version);
    }
    if (rq->handed_over) {
        /* Called again after the dispatcher resumed the connection. */
        if (rq->replied)
            return MHD_YES;
        if (rq->call.streaming)
            return http_send_stream(rq);
        return http_send(rq, &rq->call.reply);
    }
    if (*upload_data_size > 0) {
        enum MHD_Result ret = http_take_body(rq, upload_data, *upload_data_size);

        *upload_data_size = 0;
        return ret;
    }
    if (rq->replied)
        return MHD_YES;
    return http_complete(rq, url, method);
}

static void http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode toe)
{
    request_t *rq = *con_cls;
    int status;
    double seconds;

    (void)cls;
    (void)conn;
    if (!rq || rq == &http_too_many_args) {
        *con_cls = NULL;
        return;
    }
    status = rq->status ? rq->status : 499;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && rq->status < 400)
        status = 499;
    seconds = (double)(clock_monotonic_us() - rq->start_us) / 1e6;
    /* A started stream that the dispatcher had not ended was left by the client:
     * its job is cancelled below (the dispatcher drops its side on its own). */
    if (rq->call.stream && stream_detach(rq->call.stream) && rq->call.streaming)
        rq->call.job_final = true;
    /* A waiting request whose client vanished while its connection was active
     * again: the job must not be left running for nobody. */
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && rq->handed_over && rq->call.kind == CALL_SUBMIT &&
        rq->call.job_id > 0 && !rq->call.job_final)
        dispatcher_cancel_job(rq->server->opt.dispatcher, rq->call.job_id, rq->call.created_us, "client went away");
    metrics_request_done(http_routes[rq->route].label, status, seconds);
    if (log_enabled(LOG_DEBUG))
        log_debug("request", "endpoint=%s status=%d ms=%.3f job=%lld", http_routes[rq->route].label, status,
                  seconds * 1000.0, (long long)rq->call.job_id);
    free(rq->call.element);
    free(rq->call.api_key);
    stream_release(rq->call.stream);
    errors_reply_clear(&rq->call.reply);
    buf_free(&rq->body);
    free(rq);
    *con_cls = NULL;
}

static void http_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512], q[600];

    (void)cls;
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    log_warn("http_server", "detail=%s", log_quote(q, sizeof q, msg));
}

bool http_parse_listen(const char *listen, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *colon, *h = listen;
    size_t hl;

    if (!listen || !*listen)
        return false;
    if (listen[0] == '[') {
        const char *close = strchr(listen, ']');

        if (!close || close[1] != ':')
            return false;
        h = listen + 1;
        hl = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(listen, ':');
        if (!colon)
            return false;
        hl = (size_t)(colon - listen);
    }
    if (hl >= hostlen || strlen(colon + 1) >= portlen || !colon[1])
        return false;
    for (const char *p = colon + 1; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
    }
    if (atoi(colon + 1) > 65535)
        return false;
    memcpy(host, h, hl);
    host[hl] = '\0';
    strcpy(port, colon + 1);
    return true;
}

http_server_t *http_server_start(const http_options_t *opt, char *err, size_t errlen)
{
    http_server_t *s = calloc(1, sizeof *s);
    char host[256], port[16];
    struct addrinfo hints = {0}, *ai = NULL;
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    struct MHD_OptionItem ops[14];
    size_t n = 0;
    int rc;

    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->opt = *opt;
    if (!http_parse_listen(opt->listen, host, sizeof host, port, sizeof port)) {
        snprintf(err, errlen, "--listen must be host:port (or [v6 address]:port), got \"%s\"",
                 opt->listen ? opt->listen : "");
        free(s);
        return NULL;
    }
    /* No host: all IPv4 addresses (as 0.0.0.0 would); a v6 host binds v6. */
    hints.ai_family = host[0] ? AF_UNSPEC : AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &ai);
    if (rc != 0 || !ai) {
        snprintf(err, errlen, "cannot resolve --listen %s: %s", opt->listen, gai_strerror(rc));
        free(s);
        return NULL;
    }
    memcpy(&s->addr, ai->ai_addr, ai->ai_addrlen);
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    freeaddrinfo(ai);

    /* The logger goes first, or MHD logs the options before it to stderr itself. */
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)http_mhd_log, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)http_completed, s};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)http_connection_notify, s};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_MEMORY_LIMIT, HTTP_POOL_BYTES, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_URI_LOG_CALLBACK, (intptr_t)http_uri_log, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_SOCK_ADDR, 0, &s->addr};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, (intptr_t)opt->max_connections, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT, 120, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024, NULL};
    if (opt->threads > 1)
        ops[n++] = (struct MHD_OptionItem){MHD_OPTION_THREAD_POOL_SIZE, (intptr_t)opt->threads, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};

    s->daemon = MHD_start_daemon(flags, (uint16_t)atoi(port), NULL, NULL, http_access, s, MHD_OPTION_ARRAY, ops,
                                 MHD_OPTION_END);
    if (!s->daemon) {
        snprintf(err, errlen, "cannot listen on %s (address in use, or not allowed)", opt->listen);
        free(s);
        return NULL;
    }
    return s;
}

void http_server_quiesce(http_server_t *s)
{
    int fd;

    atomic_store(&s->quiescing, true);
    fd = MHD_quiesce_daemon(s->daemon);
    if (fd >= 0)
        close(fd);
}

unsigned http_server_connections(http_server_t *s)
{
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);

    return info ? info->num_connections : 0;
}

void http_server_stop(http_server_t *s)
{
    if (!s)
        return;
    if (s->daemon)
        MHD_stop_daemon(s->daemon);
    free(s);
}
