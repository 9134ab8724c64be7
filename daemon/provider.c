/* provider: the daemon's HTTP side, one curl multi handle driven through its socket
 * interface (an epoll set of curl's sockets and curl's timer, so a wake-up costs the
 * sockets that are ready, not every transfer held): job transfers (pooled easy
 * handles, bodies trimmed on completion; a streaming job's event stream goes through
 * a relay_job_t in the write callback, whose pieces leave through the chunk sink),
 * health and discovery probes, classification of responses, parsing of discovery
 * bodies. Owns every transfer and its stream state, and the epoll fd. */
#include "provider.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "buf.h"
#include "clock.h"
#include "log.h"
#include "relay.h"

#define PROVIDER_POOL_MAX 1024           /* idle job transfers kept for reuse */
#define PROVIDER_KEEP_BODY_BYTES 65536   /* a reused transfer keeps at most this much */
#define PROVIDER_WAIT_EXTRA_MAX 4        /* the caller's own fds in one provider_wait */
#define PROVIDER_EVENTS_PER_WAKE 256     /* ready sockets taken from epoll at a time */

typedef enum {
    BODY_PLAIN = 0,              /* kept whole in body */
    BODY_UNDECIDED,              /* a streaming job before its first body bytes */
    BODY_SSE,                    /* parsed as it arrives by st */
} body_mode_t;

typedef struct transfer {
    CURL *easy;
    struct provider *owner;
    body_mode_t mode;
    relay_job_t *st;            /* BODY_SSE: the stream's state */
    relay_kind_t kind;
    buf_t body;
    char *payload;               /* job: request body (owned) */
    size_t limit;
    bool too_large;
    bool is_probe;
    probe_kind_t probe;
    size_t index;                /* job: position in provider.jobs */
    bool active;                 /* job: in the multi handle (else waiting for a slot) */
    uint64_t seq;                /* job: start order, so waiting jobs start first come first */
    job_t job;
    char errbuf[CURL_ERROR_SIZE];
} transfer_t;

struct provider {
    CURLM *multi;
    int epfd;                    /* curl's sockets, as curl asks (CURLMOPT_SOCKETFUNCTION) */
    int64_t timer_due_ms;        /* curl's next timeout, monotonic; -1: none */
    provider_options_t opt;
    char *base;                  /* base_url without trailing slashes */
    struct curl_slist *json_headers;
    struct curl_slist *sse_headers;
    provider_chunk_fn chunk_fn;
    void *chunk_ctx;
    transfer_t **jobs;           /* every held job: running, or waiting for a slot */
    size_t njobs, jobs_cap;
    size_t max_active;           /* transfers run at once; 0: no limit */
    size_t nactive;
    uint64_t next_seq;
    transfer_t **pool;
    size_t npool, pool_cap;
    transfer_t *probes[PROBE__COUNT];
    bool probe_running[PROBE__COUNT];
};

static const char *const probe_paths[PROBE__COUNT] = {
    [PROBE_HEALTH] = NULL, [PROBE_PROPS] = "/props", [PROBE_SERVER_INFO] = "/server_info",
    [PROBE_MODELS] = "/v1/models",
};

static int transfer_emit(void *ctx, uint32_t seq, bool more, const char *data, size_t len)
{
    transfer_t *t = ctx;
    int rc = 0;

    if (t->owner->chunk_fn != NULL)
        rc = t->owner->chunk_fn(t->owner->chunk_ctx, &t->job, seq, more, data, len);
    if (rc == 0)
        t->job.relayed = seq + 1;
    return rc;
}

/* A streaming job's first body bytes: a 2xx text/event-stream is parsed as it
 * arrives; anything else is kept whole and classified as usual at the end. */
static void transfer_decide(transfer_t *t)
{
    long status = 0;
    char *type = NULL;

    t->mode = BODY_PLAIN;
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(t->easy, CURLINFO_CONTENT_TYPE, &type);
    if (status < 200 || status >= 300 || type == NULL || strncasecmp(type, "text/event-stream", 17) != 0)
        return;
    t->st = malloc(sizeof *t->st);
    if (t->st == NULL)
        return;                  /* read it whole: it will fail as bad_response */
    relay_job_init(t->st, t->kind, t->limit, transfer_emit, t);
    t->mode = BODY_SSE;
}

static size_t transfer_write(char *data, size_t size, size_t nmemb, void *userdata)
{
    transfer_t *t = userdata;
    size_t n = size * nmemb;

    if (t->mode == BODY_UNDECIDED)
        transfer_decide(t);
    if (t->mode == BODY_SSE)
        return relay_job_feed(t->st, data, n) ? n : 0;   /* 0: CURLE_WRITE_ERROR ends it */
    if (n > t->limit - t->body.len) {
        t->too_large = true;
        return 0;   /* CURLE_WRITE_ERROR ends the transfer */
    }
    buf_append(&t->body, data, n);
    return t->body.oom ? 0 : n;
}

static transfer_t *transfer_new(void)
{
    transfer_t *t = calloc(1, sizeof *t);

    if (t == NULL)
        return NULL;
    t->easy = curl_easy_init();
    if (t->easy == NULL) {
        free(t);
        return NULL;
    }
    curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, transfer_write);
    curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
    curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
    curl_easy_setopt(t->easy, CURLOPT_TCP_NODELAY, 1L);
    /* A 4 KiB receive buffer instead of 16: with hundreds of transfers in flight this
     * is most of the daemon's per-job memory (BENCHMARKS.md B7), and a typical reply
     * still arrives in a read or two. */
    curl_easy_setopt(t->easy, CURLOPT_BUFFERSIZE, 4096L);
    return t;
}

static void transfer_free(transfer_t *t)
{
    if (t == NULL)
        return;
    curl_easy_cleanup(t->easy);
    buf_free(&t->body);
    free(t->payload);
    if (t->st != NULL)
        relay_job_free(t->st);
    free(t->st);
    free(t);
}

/* CURLMOPT_SOCKETFUNCTION: curl says which of its sockets to watch, and for what. */
static int on_curl_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    provider_t *p = userp;
    struct epoll_event ev = { 0 };

    (void)easy;
    (void)socketp;
    if (what == CURL_POLL_REMOVE) {
        /* curl may have closed it already, which took it out of the set: ENOENT/EBADF. */
        epoll_ctl(p->epfd, EPOLL_CTL_DEL, s, NULL);
        return 0;
    }
    ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0) | (what & CURL_POLL_OUT ? EPOLLOUT : 0);
    ev.data.fd = s;
    if (epoll_ctl(p->epfd, EPOLL_CTL_MOD, s, &ev) == 0 ||
        (errno == ENOENT && epoll_ctl(p->epfd, EPOLL_CTL_ADD, s, &ev) == 0))
        return 0;
    log_error("provider_socket_unwatched", "fd=%d reason=\"%s\" next=fail_that_transfer", (int)s, strerror(errno));
    return -1;
}

/* CURLMOPT_TIMERFUNCTION: when curl next needs a call without socket activity. */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    provider_t *p = userp;

    (void)multi;
    p->timer_due_ms = timeout_ms < 0 ? -1 : clock_monotonic_ms() + timeout_ms;
    return 0;
}

provider_t *provider_new(const provider_options_t *opt, char *err, size_t errlen)
{
    provider_t *p = calloc(1, sizeof *p);
    size_t n;

    if (p == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    p->opt = *opt;
    p->timer_due_ms = -1;
    p->base = strdup(opt->base_url);
    p->multi = curl_multi_init();
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0) {
        snprintf(err, errlen, "cannot create an epoll set: %s", strerror(errno));
        provider_free(p);
        return NULL;
    }
    if (p->base == NULL || p->multi == NULL) {
        snprintf(err, errlen, "cannot initialise libcurl");
        provider_free(p);
        return NULL;
    }
    curl_multi_setopt(p->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(p->multi, CURLMOPT_SOCKETDATA, p);
    curl_multi_setopt(p->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(p->multi, CURLMOPT_TIMERDATA, p);
    n = strlen(p->base);
    while (n > 0 && p->base[n - 1] == '/')
        p->base[--n] = '\0';
    p->json_headers = curl_slist_append(NULL, "Content-Type: application/json");
    p->json_headers = curl_slist_append(p->json_headers, "Accept: application/json");
    p->json_headers = curl_slist_append(p->json_headers, "Expect:");   /* no 100-continue wait */
    p->sse_headers = curl_slist_append(NULL, "Content-Type: application/json");
    p->sse_headers = curl_slist_append(p->sse_headers, "Accept: text/event-stream, application/json");
    p->sse_headers = curl_slist_append(p->sse_headers, "Expect:");
    if (p->json_headers == NULL || p->sse_headers == NULL) {
        snprintf(err, errlen, "out of memory");
        provider_free(p);
        return NULL;
    }
    /* Keep a warm connection per concurrent transfer rather than the default 4x. */
    curl_multi_setopt(p->multi, CURLMOPT_MAXCONNECTS, 1024L);
    return p;
}

void provider_free(provider_t *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->njobs; i++) {
        if (p->jobs[i]->active)
            curl_multi_remove_handle(p->multi, p->jobs[i]->easy);
        transfer_free(p->jobs[i]);
    }
    for (size_t i = 0; i < p->npool; i++)
        transfer_free(p->pool[i]);
    for (int k = 0; k < PROBE__COUNT; k++) {
        if (p->probes[k] != NULL) {
            if (p->probe_running[k])
                curl_multi_remove_handle(p->multi, p->probes[k]->easy);
            transfer_free(p->probes[k]);
        }
    }
    free(p->jobs);
    free(p->pool);
    curl_slist_free_all(p->json_headers);
    curl_slist_free_all(p->sse_headers);
    if (p->multi)
        curl_multi_cleanup(p->multi);
    if (p->epfd >= 0)
        close(p->epfd);
    free(p->base);
    free(p);
}

/* Lets curl act on its timeouts, and start the transfers just added (curl gives each a
 * timeout of zero). The timer is cleared first: curl may set a new one meanwhile. */
static void curl_timeout_action(provider_t *p)
{
    int running;

    p->timer_due_ms = -1;
    curl_multi_socket_action(p->multi, CURL_SOCKET_TIMEOUT, 0, &running);
}

/* Lets curl read and write whatever of its sockets is ready now (without waiting),
 * then act on its timer if due. */
static void act_on_ready_sockets(provider_t *p)
{
    struct epoll_event ready[PROVIDER_EVENTS_PER_WAKE];
    int nready = epoll_wait(p->epfd, ready, PROVIDER_EVENTS_PER_WAKE, 0);
    int running;

    for (int i = 0; i < nready; i++) {
        int mask = (ready[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR) ? CURL_CSELECT_IN : 0) |
                   (ready[i].events & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
                   (ready[i].events & EPOLLERR ? CURL_CSELECT_ERR : 0);
        curl_multi_socket_action(p->multi, ready[i].data.fd, mask, &running);
    }
    if (p->timer_due_ms >= 0 && clock_monotonic_ms() >= p->timer_due_ms)
        curl_timeout_action(p);
}

CURLMcode provider_wait(provider_t *p, struct curl_waitfd *extra, unsigned n, int timeout_ms)
{
    struct pollfd fds[PROVIDER_WAIT_EXTRA_MAX + 1];

    if (n > PROVIDER_WAIT_EXTRA_MAX) {
        errno = EINVAL;
        return CURLM_BAD_FUNCTION_ARGUMENT;
    }
    if (p->timer_due_ms >= 0) {
        int64_t left = p->timer_due_ms - clock_monotonic_ms();
        if (left < 0)
            left = 0;
        if (timeout_ms < 0 || left < timeout_ms)
            timeout_ms = (int)left;
    }
    for (unsigned i = 0; i < n; i++) {
        fds[i] = (struct pollfd){ .fd = extra[i].fd,
                                  .events = (short)((extra[i].events & CURL_WAIT_POLLIN ? POLLIN : 0) |
                                                    (extra[i].events & CURL_WAIT_POLLPRI ? POLLPRI : 0) |
                                                    (extra[i].events & CURL_WAIT_POLLOUT ? POLLOUT : 0)) };
    }
    fds[n] = (struct pollfd){ .fd = p->epfd, .events = POLLIN };
    if (poll(fds, n + 1, timeout_ms) < 0) {
        if (errno != EINTR)
            return CURLM_INTERNAL_ERROR;
        fds[n].revents = 0;
        for (unsigned i = 0; i < n; i++)
            fds[i].revents = 0;
    }
    for (unsigned i = 0; i < n; i++) {
        short rev = fds[i].revents;
        /* Errors and hang-ups are reported as POLLPRI: the caller reads to learn what. */
        extra[i].revents = (short)((rev & POLLIN ? CURL_WAIT_POLLIN : 0) | (rev & POLLOUT ? CURL_WAIT_POLLOUT : 0) |
                                   (rev & (POLLPRI | POLLERR | POLLHUP | POLLNVAL) ? CURL_WAIT_POLLPRI : 0));
    }
    return CURLM_OK;   /* provider_run lets curl act on what is ready */
}

void provider_set_chunk_sink(provider_t *p, provider_chunk_fn fn, void *ctx)
{
    p->chunk_fn = fn;
    p->chunk_ctx = ctx;
}

/* Takes a job transfer out of the running set and back to the pool (or frees it).
 * Its body buffer is trimmed so a huge answer does not stay resident. */
static void job_release(provider_t *p, transfer_t *t)
{
    size_t i = t->index;

    if (t->active)
        p->nactive--;
    t->active = false;
    p->jobs[i] = p->jobs[--p->njobs];
    p->jobs[i]->index = i;
    free(t->payload);
    t->payload = NULL;
    if (t->st != NULL) {
        relay_job_free(t->st);
        free(t->st);
        t->st = NULL;
    }
    t->mode = BODY_PLAIN;
    if (t->body.cap > PROVIDER_KEEP_BODY_BYTES)
        buf_free(&t->body);
    else
        buf_reset(&t->body);
    t->too_large = false;
    t->errbuf[0] = '\0';
    if (p->npool < PROVIDER_POOL_MAX) {
        if (p->npool == p->pool_cap) {
            size_t cap = p->pool_cap ? p->pool_cap * 2 : 16;
            transfer_t **grown = realloc(p->pool, cap * sizeof *grown);
            if (grown == NULL) {
                transfer_free(t);
                return;
            }
            p->pool = grown;
            p->pool_cap = cap;
        }
        p->pool[p->npool++] = t;
        return;
    }
    transfer_free(t);
}

static void fill_response(const transfer_t *t, CURLcode code, provider_response_t *r)
{
    long status = 0;
    curl_off_t total_us = 0;

    memset(r, 0, sizeof *r);
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    r->curl_code = code;
    r->status = status;
    r->body = t->body.data ? t->body.data : "";
    r->body_len = t->body.len;
    r->too_large = t->too_large;
    r->size_limit = t->limit;
    r->curl_error = code == CURLE_OK ? "" : (t->errbuf[0] ? t->errbuf : curl_easy_strerror(code));
    if (t->active && curl_easy_getinfo(t->easy, CURLINFO_TOTAL_TIME_T, &total_us) == CURLE_OK)
        r->service_us = (int64_t)total_us;
}

static bool has_room(const provider_t *p)
{
    return p->max_active == 0 || p->nactive < p->max_active;
}

/* Starts waiting jobs, oldest first, while there is room; returns whether any
 * started. A transfer the multi handle refuses ends at once as a failed one. */
static bool start_waiting(provider_t *p, const provider_events_t *ev, void *ctx)
{
    bool started = false;

    while (p->nactive < p->njobs && has_room(p)) {
        transfer_t *next = NULL;

        for (size_t i = 0; i < p->njobs; i++) {
            if (!p->jobs[i]->active && (next == NULL || p->jobs[i]->seq < next->seq))
                next = p->jobs[i];
        }
        if (curl_multi_add_handle(p->multi, next->easy) == CURLM_OK) {
            next->active = true;
            p->nactive++;
            started = true;
        } else {
            provider_response_t r;
            job_t job = next->job;

            fill_response(next, CURLE_FAILED_INIT, &r);
            ev->job_done(ctx, &job, &r);
            job_release(p, next);
        }
    }
    return started;
}

void provider_run(provider_t *p, const provider_events_t *ev, void *ctx)
{
    int queued;
    CURLMsg *msg;

    /* Everything ready now, including answers that arrived since the wait, so they
     * ride in the exchange the caller may be about to send. */
    act_on_ready_sockets(p);
    while ((msg = curl_multi_info_read(p->multi, &queued)) != NULL) {
        transfer_t *t = NULL;
        provider_response_t r;
        CURLcode result;

        if (msg->msg != CURLMSG_DONE)
            continue;
        result = msg->data.result;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&t);
        curl_multi_remove_handle(p->multi, msg->easy_handle);   /* invalidates msg */
        fill_response(t, result, &r);
        if (t->is_probe) {
            p->probe_running[t->probe] = false;
            ev->probe_done(ctx, t->probe, &r);
            buf_reset(&t->body);
            t->too_large = false;
        } else {
            job_t job = t->job;
            provider_stream_t ps = { 0 };
            char *assembled = NULL;

            if (t->mode == BODY_SSE) {
                ps.events = t->st->events;
                ps.clean = relay_job_clean(t->st, result == CURLE_OK);
                ps.too_large = t->st->too_large;
                ps.error = t->st->failed ? t->st->error : NULL;
                if (ps.clean) {
                    assembled = relay_asm_result(&t->st->as, &ps.result_len);
                    ps.result = assembled;
                }
                r.stream = &ps;
            }
            ev->job_done(ctx, &job, &r);
            free(assembled);
            job_release(p, t);
        }
    }
    if (start_waiting(p, ev, ctx))
        curl_timeout_action(p);   /* their requests go out now */
}

void provider_kick(provider_t *p)
{
    curl_timeout_action(p);
}

job_t *provider_start_job(provider_t *p, const job_t *job, const char *endpoint, const char *payload,
                          size_t payload_len)
{
    transfer_t *t;
    buf_t url = BUF_INIT;

    if (p->njobs == p->jobs_cap) {
        size_t cap = p->jobs_cap ? p->jobs_cap * 2 : 16;
        transfer_t **grown = realloc(p->jobs, cap * sizeof *grown);
        if (grown == NULL)
            return NULL;
        p->jobs = grown;
        p->jobs_cap = cap;
    }
    t = p->npool > 0 ? p->pool[--p->npool] : transfer_new();
    if (t == NULL)
        return NULL;
    t->payload = malloc(payload_len + 1);
    buf_append_str(&url, p->base);
    buf_append_str(&url, endpoint);
    if (t->payload == NULL || url.oom) {
        buf_free(&url);
        free(t->payload);
        t->payload = NULL;
        transfer_free(t);
        return NULL;
    }
    memcpy(t->payload, payload, payload_len);
    t->payload[payload_len] = '\0';
    t->is_probe = false;
    t->owner = p;
    t->job = *job;
    t->job.relayed = 0;
    t->mode = job->stream ? BODY_UNDECIDED : BODY_PLAIN;
    t->kind = strstr(endpoint, "chat/completions") ? RELAY_KIND_CHAT
            : strstr(endpoint, "completions") ? RELAY_KIND_TEXT : RELAY_KIND_AUTO;
    t->limit = p->opt.max_response_bytes;
    t->too_large = false;
    t->errbuf[0] = '\0';
    buf_reset(&t->body);
    curl_easy_setopt(t->easy, CURLOPT_URL, url.data);
    curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, job->stream ? p->sse_headers : p->json_headers);
    curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)payload_len);
    curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, t->payload);
    curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, p->opt.request_timeout_ms);
    curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS,
                     p->opt.request_timeout_ms < 10000 ? p->opt.request_timeout_ms : 10000L);
    buf_free(&url);
    /* Runs now if a slot is free and nobody is waiting for one; else waits its turn. */
    t->active = p->nactive == p->njobs && has_room(p);
    if (t->active && curl_multi_add_handle(p->multi, t->easy) != CURLM_OK) {
        free(t->payload);
        t->payload = NULL;
        transfer_free(t);
        return NULL;
    }
    if (t->active)
        p->nactive++;
    t->seq = p->next_seq++;
    t->index = p->njobs;
    p->jobs[p->njobs++] = t;
    return &t->job;
}

bool provider_abort_job(provider_t *p, int64_t id, int32_t attempt)
{
    for (size_t i = 0; i < p->njobs; i++) {
        transfer_t *t = p->jobs[i];
        if (t->job.id == id && (attempt < 0 || t->job.attempt == attempt)) {
            if (t->active)
                curl_multi_remove_handle(p->multi, t->easy);
            job_release(p, t);
            return true;
        }
    }
    return false;
}

size_t provider_in_flight(const provider_t *p)
{
    return p->njobs;
}

void provider_set_max_active(provider_t *p, size_t n)
{
    p->max_active = n;
}

job_t *provider_job_at(provider_t *p, size_t i)
{
    return i < p->njobs ? &p->jobs[i]->job : NULL;
}

job_t *provider_find_job(provider_t *p, int64_t id)
{
    for (size_t i = 0; i < p->njobs; i++) {
        if (p->jobs[i]->job.id == id)
            return &p->jobs[i]->job;
    }
    return NULL;
}

bool provider_probe_running(const provider_t *p, probe_kind_t kind)
{
    return p->probe_running[kind];
}

bool provider_start_probe(provider_t *p, probe_kind_t kind)
{
    transfer_t *t = p->probes[kind];
    buf_t url = BUF_INIT;
    const char *path = kind == PROBE_HEALTH ? p->opt.health_path : probe_paths[kind];
    bool ok;

    if (p->probe_running[kind])
        return false;
    if (t == NULL) {
        t = p->probes[kind] = transfer_new();
        if (t == NULL)
            return false;
        t->is_probe = true;
        t->probe = kind;
        curl_easy_setopt(t->easy, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, p->opt.probe_timeout_ms);
        curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, p->opt.probe_timeout_ms);
    }
    buf_append_str(&url, p->base);
    if (path[0] != '/')
        buf_append_char(&url, '/');
    buf_append_str(&url, path);
    t->limit = 1 << 20;
    t->too_large = false;
    t->errbuf[0] = '\0';
    buf_reset(&t->body);
    ok = !url.oom && curl_easy_setopt(t->easy, CURLOPT_URL, url.data) == CURLE_OK &&
         curl_multi_add_handle(p->multi, t->easy) == CURLM_OK;
    buf_free(&url);
    p->probe_running[kind] = ok;
    return ok;
}

/* "provider answered HTTP 400: <its error message>" when the body carries an OpenAI
 * style {"error": {"message": ...}} or {"error": "..."}; otherwise just the status. */
static void describe_status(const provider_response_t *r, char *out, size_t len)
{
    json_t *root = json_loadb(r->body, r->body_len, 0, NULL);
    const char *detail = NULL;

    if (json_is_object(root)) {
        json_t *e = json_object_get(root, "error");
        if (json_is_string(e))
            detail = json_string_value(e);
        else if (json_is_object(e) && json_is_string(json_object_get(e, "message")))
            detail = json_string_value(json_object_get(e, "message"));
        else if (json_is_string(json_object_get(root, "message")))
            detail = json_string_value(json_object_get(root, "message"));
    }
    if (detail)
        snprintf(out, len, "provider answered HTTP %ld: %.200s", r->status, detail);
    else
        snprintf(out, len, "provider answered HTTP %ld", r->status);
    json_decref(root);
}

/* A transport failure before any answer could be used: retryable, and the provider's
 * health is worth a probe. */
static void classify_transport(const provider_response_t *r, provider_verdict_t *v)
{
    v->retryable = true;
    v->provider_unreachable = true;
    switch (r->curl_code) {
    case CURLE_OPERATION_TIMEDOUT:
        v->code = "timeout";
        break;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        v->code = "connect_failed";
        break;
    default:
        v->code = "transport_error";
        break;
    }
    snprintf(v->message, sizeof v->message, "%s: %s", curl_easy_strerror(r->curl_code),
             r->curl_error ? r->curl_error : "");
}

static void classify_stream(const provider_response_t *r, provider_verdict_t *v)
{
    const provider_stream_t *s = r->stream;
    char what[260];

    if (s->clean && s->result != NULL && memchr(s->result, '\0', s->result_len) == NULL) {
        v->complete = true;
        v->result = s->result;
        v->result_len = s->result_len;
        return;
    }
    if (s->clean && s->result != NULL)
        snprintf(what, sizeof what, "the assembled response holds a NUL byte");
    else if (s->clean)
        snprintf(what, sizeof what, "out of memory assembling the response");
    else if (s->error != NULL)
        snprintf(what, sizeof what, "%s", s->error);
    else if (r->curl_code != CURLE_OK)
        snprintf(what, sizeof what, "connection cut (%s: %s)", curl_easy_strerror(r->curl_code),
                 r->curl_error ? r->curl_error : "");
    else
        snprintf(what, sizeof what, "the stream ended without a finish_reason or [DONE]");
    if (s->events == 0) {
        /* Nothing reached the client: the job can still fail (or be retried) as a
         * non-stream job would. */
        if (s->error == NULL && !s->clean && r->curl_code != CURLE_OK) {
            classify_transport(r, v);
            return;
        }
        v->code = "bad_response";
        snprintf(v->message, sizeof v->message, "provider answered HTTP %ld with an unusable event stream: %.240s",
                 r->status, what);
        return;
    }
    v->code = "stream_broken";
    v->provider_unreachable = s->error == NULL && r->curl_code != CURLE_OK;
    snprintf(v->message, sizeof v->message, "the provider's stream broke after %zu chunk%s were relayed: %.240s",
             s->events, s->events == 1 ? "" : "s", what);
}

void provider_classify(const provider_response_t *r, provider_verdict_t *v)
{
    memset(v, 0, sizeof *v);
    v->status = r->status;
    if (r->stream != NULL) {
        classify_stream(r, v);
        return;
    }
    if (r->too_large) {
        v->code = "bad_response";
        snprintf(v->message, sizeof v->message, "provider response is larger than the %zu-byte limit",
                 r->size_limit);
        return;
    }
    if (r->curl_code != CURLE_OK) {
        classify_transport(r, v);
        return;
    }
    if (r->status >= 200 && r->status < 300) {
        json_error_t jerr;
        json_t *root;

        if (r->body_len == 0) {
            v->code = "bad_response";
            snprintf(v->message, sizeof v->message, "provider answered HTTP %ld with an empty body", r->status);
            return;
        }
        /* jansson accepts a NUL after a number, but the body is embedded as text into
         * the exchange, where a NUL would cut the whole batch short. */
        if (memchr(r->body, '\0', r->body_len) != NULL) {
            v->code = "bad_response";
            snprintf(v->message, sizeof v->message, "provider answered HTTP %ld with a NUL byte in its body",
                     r->status);
            return;
        }
        root = json_loadb(r->body, r->body_len, 0, &jerr);
        if (json_is_object(root)) {
            v->complete = true;
            v->result = r->body;
            v->result_len = r->body_len;
            json_decref(root);
            return;
        }
        v->code = "bad_response";
        if (root == NULL)
            snprintf(v->message, sizeof v->message,
                     "provider answered HTTP %ld with a body that is not valid JSON: %s (line %d, column %d)",
                     r->status, jerr.text, jerr.line, jerr.column);
        else
            snprintf(v->message, sizeof v->message,
                     "provider answered HTTP %ld with JSON that is not an object", r->status);
        json_decref(root);
        return;
    }
    if (r->status >= 400 && r->status < 500) {
        v->code = "provider_4xx";
        describe_status(r, v->message, sizeof v->message);
        return;
    }
    if (r->status >= 500 && r->status < 600) {
        v->code = "provider_5xx";
        v->retryable = true;
        describe_status(r, v->message, sizeof v->message);
        return;
    }
    v->code = "bad_response";
    snprintf(v->message, sizeof v->message, "provider answered unexpected HTTP status %ld", r->status);
}

bool provider_probe_healthy(const provider_response_t *r, char *reason, size_t len)
{
    if (r->curl_code != CURLE_OK && !r->too_large) {
        snprintf(reason, len, "health probe failed: %s", r->curl_error);
        return false;
    }
    if (r->status >= 500 || r->status < 100) {
        snprintf(reason, len, "health probe answered HTTP %ld", r->status);
        return false;
    }
    reason[0] = '\0';
    return true;
}

static long positive_int(json_t *v)
{
    if (json_is_integer(v) && json_integer_value(v) > 0 && json_integer_value(v) <= 100000)
        return (long)json_integer_value(v);
    return -1;
}

long provider_parse_total_slots(const char *body, size_t len)
{
    json_t *root = json_loadb(body, len, 0, NULL);
    long v = -1;

    if (json_is_object(root))
        v = positive_int(json_object_get(root, "total_slots"));
    json_decref(root);
    return v;
}

long provider_parse_max_running(const char *body, size_t len)
{
    json_t *root = json_loadb(body, len, 0, NULL);
    long v = -1;

    if (json_is_object(root)) {
        json_t *states = json_object_get(root, "internal_states");
        v = positive_int(json_object_get(root, "max_running_requests"));
        if (v < 0 && json_is_array(states))
            v = positive_int(json_object_get(json_array_get(states, 0), "max_running_requests"));
    }
    json_decref(root);
    return v;
}

int provider_parse_models(const char *body, size_t len, char ***out)
{
    json_t *root = json_loadb(body, len, 0, NULL);
    json_t *data, *item;
    char **ids = NULL;
    int count = 0;
    size_t i;

    *out = NULL;
    data = json_is_object(root) ? json_object_get(root, "data") : NULL;
    if (!json_is_array(data)) {
        json_decref(root);
        return -1;
    }
    ids = calloc(json_array_size(data) + 1, sizeof *ids);
    if (ids == NULL) {
        json_decref(root);
        return -1;
    }
    json_array_foreach(data, i, item) {
        json_t *id = json_object_get(item, "id");
        if (json_is_string(id) && json_string_length(id) > 0 && json_string_length(id) <= 256) {
            ids[count] = strdup(json_string_value(id));
            if (ids[count] == NULL)
                break;
            count++;
        }
    }
    json_decref(root);
    *out = ids;
    return count;
}
