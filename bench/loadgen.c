/* loadgen: the HTTP/1.1 load generator of the benchmarks (bench/run.py drives it).
 * One thread, epoll, non-blocking sockets, keep-alive. Open-loop mode sends on a fixed
 * schedule and counts latency from the scheduled send time (coordinated omission cannot
 * hide a stall); closed-loop mode keeps N connections busy for peak throughput. Latencies
 * go into a log-linear histogram (about 0.1 % precision); the result is one JSON object.
 * With --stream each 2xx answer is also read as text/event-stream: the time from the send
 * (open loop: the scheduled send) to the first `data:` event (TTFT) and to the first event
 * with non-empty "content", and every gap between consecutive `data:` events up to and
 * including `data: [DONE]`, go into histograms of their own; an answer that ends without
 * `data: [DONE]` counts as an error. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SEC 1000000000LL
#define NS_PER_MS 1000000LL

/* ---------------------------------------------------------------- histogram ---
 * Log-linear buckets over nanoseconds, the HdrHistogram layout with 11 significant
 * bits: values below 2048 are exact, above that every power-of-two range is cut in
 * 1024 equal buckets, so a reported percentile is at most 0.1 % above the truth.
 * Range: up to 2^44 ns (about 4.9 hours); larger values land in the last bucket. */
#define H_SUB_BITS 11
#define H_SUB (1 << H_SUB_BITS)
#define H_HALF (H_SUB / 2)
#define H_MAX_SHIFT 33
#define H_LEN (H_SUB + H_MAX_SHIFT * H_HALF)

typedef struct {
    uint64_t counts[H_LEN];
    uint64_t total;
    int64_t min, max;
    double sum;
} hist_t;

static size_t hist_index(int64_t v)
{
    if (v < H_SUB)
        return v < 0 ? 0 : (size_t)v;
    int msb = 63 - __builtin_clzll((unsigned long long)v);
    int shift = msb - (H_SUB_BITS - 1);
    if (shift > H_MAX_SHIFT)
        return H_LEN - 1;
    return (size_t)H_SUB + (size_t)(shift - 1) * H_HALF + (size_t)((v >> shift) - H_HALF);
}

/* The highest value that lands in bucket i (what a percentile reports). */
static int64_t hist_upper(size_t i)
{
    if (i < H_SUB)
        return (int64_t)i;
    size_t j = i - H_SUB;
    int shift = (int)(j / H_HALF) + 1;
    int64_t m = (int64_t)(j % H_HALF) + H_HALF;
    return ((m + 1) << shift) - 1;
}

static void hist_init(hist_t *h)
{
    memset(h, 0, sizeof *h);
    h->min = INT64_MAX;
}

static void hist_add(hist_t *h, int64_t v)
{
    if (v < 0)
        v = 0;
    h->counts[hist_index(v)]++;
    h->total++;
    h->sum += (double)v;
    if (v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
}

/* Value at percentile p (0..100): the smallest bucket bound that covers
 * ceil(p% of the samples), never above the exact maximum. 0 when empty. */
static int64_t hist_pct(const hist_t *h, double p)
{
    if (h->total == 0)
        return 0;
    uint64_t rank = (uint64_t)ceil(p / 100.0 * (double)h->total);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < H_LEN; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            int64_t u = hist_upper(i);
            return u > h->max ? h->max : u;
        }
    }
    return h->max;
}

/* ------------------------------------------------------------------ options --- */
typedef enum { MODE_OPEN = 0, MODE_CLOSED } mode_t_;

static struct {
    const char *url;
    const char *method;
    char *body;
    size_t body_len;
    char **headers;
    size_t nheaders;
    mode_t_ mode;
    double rate;        /* open loop: requests per second */
    int closed_conns;   /* closed loop: connections */
    double duration;    /* measured seconds */
    double warmup;      /* seconds sent but not recorded, before the measured window */
    int init_conns;     /* open loop: connections opened up front */
    int max_conns;      /* open loop: cap on connections */
    double timeout;     /* per request, seconds */
    double drain;       /* seconds to wait for in-flight requests after the window */
    bool stream;        /* read 2xx bodies as server-sent events (TTFT, inter-event gaps) */
    const char *label;
    const char *out;
} opt = {
    .method = NULL, .mode = MODE_OPEN, .rate = 0, .closed_conns = 0, .duration = 10,
    .warmup = 0, .init_conns = 16, .max_conns = 1024, .timeout = 30, .drain = -1,
    .label = "",
};

/* ------------------------------------------------------------- connections --- */
typedef enum {
    C_FREE = 0,    /* slot unused */
    C_CONNECTING,  /* connect() in progress */
    C_IDLE,        /* connected, no request on it */
    C_BUSY,        /* request written or being written, response not complete */
} conn_state_t;

typedef enum {
    P_HEAD = 0,   /* waiting for the end of the header block */
    P_LEN,        /* Content-Length body: `remaining` bytes to go */
    P_EOF,        /* body runs to connection close */
    P_CHUNK_SIZE, /* chunked: next chunk-size line */
    P_CHUNK_DATA, /* chunked: `remaining` data bytes */
    P_CHUNK_CRLF, /* chunked: CRLF after data */
    P_TRAILER,    /* chunked: trailer lines until an empty one */
} parse_state_t;

typedef struct conn {
    int fd;
    conn_state_t state;   /* changed only by conn_set_state */
    struct conn *idle_prev, *idle_next; /* on g.idle while C_IDLE */
    size_t woff;          /* bytes of the request written so far */
    int64_t origin_ns;    /* latency origin: scheduled time (open) or send time (closed) */
    int64_t sent_ns;      /* when the first byte was written */
    bool record;          /* inside the measured window */
    parse_state_t ps;
    int status;
    int64_t remaining;
    bool close_after;     /* the server said Connection: close (or HTTP/1.0) */
    bool want_out;        /* EPOLLOUT armed */
    char *rbuf;
    size_t rlen, rcap;
    /* --stream: the SSE reader of the current answer (see sse_feed) */
    char sse_head[16];    /* first bytes of the current line */
    size_t sse_len;       /* bytes in the current line so far */
    bool sse_cr;          /* the last byte was CR (a following LF ends nothing more) */
    bool sse_data_line;   /* the current line starts with "data:" */
    int sse_match;        /* bytes of CONTENT_KEY matched so far on this data line */
    bool ev_data;         /* the current event has a data line */
    bool ev_done;         /* ... and it is [DONE] */
    bool ev_content;      /* ... and it carries non-empty "content" */
    uint64_t events;      /* data events of this answer */
    int64_t last_ev_ns;   /* when the previous data event ended */
    bool content_seen;    /* first-content time recorded */
    bool saw_done;        /* data: [DONE] arrived */
} conn_t;

#define MAX_STATUS 600

static struct {
    int ep;
    int tfd;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *req;            /* the whole request, sent as is every time */
    size_t req_len;
    conn_t *conns;
    int nconns_cap;
    int nopen;            /* connections in C_CONNECTING/C_IDLE/C_BUSY */
    int nstate[4];        /* connections per conn_state_t */
    conn_t *idle;         /* head of the idle list */
    int64_t armed_ns;     /* what the timerfd is set to */
    int64_t t0, measure_start, end_ns;
    int64_t interval_ns;  /* open loop */
    uint64_t next_sched;  /* open loop: index of the next request to schedule */
    uint64_t next_send;   /* open loop: index of the next scheduled request to send */
    bool stopping;        /* window over: schedule and send nothing more */
    volatile sig_atomic_t interrupted;
    /* results */
    hist_t lat;           /* 2xx responses in the window */
    hist_t lag;           /* open loop: actual send minus scheduled send */
    hist_t ttft;          /* --stream: origin to the first data event */
    hist_t ttfc;          /* --stream: origin to the first event with non-empty content */
    hist_t gap;           /* --stream: between consecutive data events of one answer */
    uint64_t streams_done, events_window, err_stream;
    uint64_t sent, sent_window, completed_window, ok_window;
    uint64_t status_count[MAX_STATUS];
    uint64_t err_connect, err_reset, err_timeout, err_parse;
    uint64_t conns_opened;
    int peak_busy;
    char err_sample[512];
    size_t err_sample_len;
    bool err_sample_done;
    int64_t last_connect_fail_ns;
} g;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

__attribute__((format(printf, 1, 2), noreturn)) static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void ep_ctl(int op, conn_t *c, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.ptr = c };
    if (epoll_ctl(g.ep, op, c->fd, &ev) != 0 && op != EPOLL_CTL_DEL)
        die("epoll_ctl: %s", strerror(errno));
}

static void set_out(conn_t *c, bool on)
{
    if (c->want_out == on)
        return;
    c->want_out = on;
    ep_ctl(EPOLL_CTL_MOD, c, EPOLLIN | (on ? EPOLLOUT : 0));
}

/* The one place a connection changes state: keeps the counters and the idle list. */
static void conn_set_state(conn_t *c, conn_state_t st)
{
    if (c->state == C_IDLE) {
        if (c->idle_prev)
            c->idle_prev->idle_next = c->idle_next;
        else
            g.idle = c->idle_next;
        if (c->idle_next)
            c->idle_next->idle_prev = c->idle_prev;
        c->idle_prev = c->idle_next = NULL;
    }
    g.nstate[c->state]--;
    c->state = st;
    g.nstate[st]++;
    if (st == C_IDLE) {
        c->idle_next = g.idle;
        if (g.idle)
            g.idle->idle_prev = c;
        g.idle = c;
    }
}

/* Opens one more connection in a free slot; false when there is none or socket() fails. */
static bool conn_open(void)
{
    conn_t *c = NULL;
    for (int i = 0; i < g.nconns_cap; i++) {
        if (g.conns[i].state == C_FREE) {
            c = &g.conns[i];
            break;
        }
    }
    if (!c)
        return false;
    int fd = socket(g.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        g.err_connect++;
        return false;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->rlen = 0;
    c->want_out = true;
    c->ps = P_HEAD;
    if (connect(fd, (struct sockaddr *)&g.addr, g.addrlen) == 0) {
        conn_set_state(c, C_IDLE);
        c->want_out = false;
    } else if (errno == EINPROGRESS) {
        conn_set_state(c, C_CONNECTING);
    } else {
        close(fd);
        c->fd = -1;
        g.err_connect++;
        g.last_connect_fail_ns = now_ns();
        return false;
    }
    ep_ctl(EPOLL_CTL_ADD, c, EPOLLIN | (c->want_out ? EPOLLOUT : 0));
    g.nopen++;
    g.conns_opened++;
    return true;
}

static void conn_close(conn_t *c)
{
    if (c->state == C_FREE)
        return;
    ep_ctl(EPOLL_CTL_DEL, c, 0);
    close(c->fd);
    c->fd = -1;
    conn_set_state(c, C_FREE);
    c->want_out = false;
    c->rlen = 0;
    g.nopen--;
}

/* Writes what is left of the request; arms EPOLLOUT on a short write.
 * Returns false when the connection failed (it is closed and the request counted). */
static bool conn_flush(conn_t *c)
{
    while (c->woff < g.req_len) {
        ssize_t n = send(c->fd, g.req + c->woff, g.req_len - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out(c, true);
            return true;
        }
        if (c->record)
            g.err_reset++;
        conn_close(c);
        return false;
    }
    set_out(c, false);
    return true;
}

static void conn_send(conn_t *c, int64_t origin, int64_t now)
{
    conn_set_state(c, C_BUSY);
    c->woff = 0;
    c->origin_ns = origin;
    c->sent_ns = now;
    c->record = origin >= g.measure_start && origin < g.end_ns;
    c->ps = P_HEAD;
    c->status = 0;
    c->close_after = false;
    c->sse_len = 0;
    c->sse_cr = c->sse_data_line = false;
    c->sse_match = 0;
    c->ev_data = c->ev_done = c->ev_content = false;
    c->events = 0;
    c->last_ev_ns = 0;
    c->content_seen = c->saw_done = false;
    g.sent++;
    if (c->record) {
        g.sent_window++;
        if (opt.mode == MODE_OPEN)
            hist_add(&g.lag, now - origin);
    }
    conn_flush(c);
}


/* Sends what is due: open loop, every scheduled request in order while a connection is
 * idle (opening more up to the cap); closed loop, one request per idle connection. */
static void dispatch(int64_t now)
{
    if (g.stopping)
        return;
    if (opt.mode == MODE_OPEN) {
        while (g.next_send < g.next_sched) {
            conn_t *c = g.idle;
            if (!c) {
                int connecting = g.nstate[C_CONNECTING];
                /* Open as many as there are queued requests not already covered. */
                if ((uint64_t)connecting < g.next_sched - g.next_send && g.nopen < opt.max_conns &&
                    now - g.last_connect_fail_ns > 100 * NS_PER_MS)
                    conn_open();
                return;
            }
            int64_t origin = g.t0 + (int64_t)g.next_send * g.interval_ns;
            g.next_send++;
            conn_send(c, origin, now);
        }
    } else {
        while (g.idle)
            conn_send(g.idle, now, now);
        if (g.nopen < opt.closed_conns && now - g.last_connect_fail_ns > 100 * NS_PER_MS) {
            while (g.nopen < opt.closed_conns && conn_open()) {
            }
        }
    }
}

static void sample_error_body(conn_t *c, const char *p, size_t n)
{
    if (g.err_sample_done || (c->status >= 200 && c->status < 300))
        return;
    size_t room = sizeof g.err_sample - 1 - g.err_sample_len;
    if (n > room)
        n = room;
    memcpy(g.err_sample + g.err_sample_len, p, n);
    g.err_sample_len += n;
}

/* A response ended: record it and make the connection idle (or close it). */
static void response_done(conn_t *c, int64_t now)
{
    if (c->record) {
        g.completed_window++;
        if (c->status > 0 && c->status < MAX_STATUS)
            g.status_count[c->status]++;
        if (c->status >= 200 && c->status < 300) {
            g.ok_window++;
            hist_add(&g.lat, now - c->origin_ns);
            if (opt.stream) {
                if (c->saw_done)
                    g.streams_done++;
                else
                    g.err_stream++;
            }
        }
    }
    if (!(c->status >= 200 && c->status < 300) && g.err_sample_len > 0)
        g.err_sample_done = true;
    c->ps = P_HEAD;
    if (c->close_after) {
        conn_close(c);
        return;
    }
    conn_set_state(c, C_IDLE);
}

/* ------------------------------------------------------------- --stream: SSE ---
 * A byte-at-a-time reader of text/event-stream (lines end in LF, CR or CRLF; a blank
 * line ends an event; only events with a data line count). It keeps the first bytes of
 * each line (enough to see "data:" and "[DONE]") and, on data lines, a matcher for
 * "content":" followed by anything but a quote (a non-empty content delta). */
static const char CONTENT_KEY[] = "\"content\":\"";
#define CONTENT_KEY_LEN (sizeof CONTENT_KEY - 1)

/* A data event ended at `now`. */
static void sse_event(conn_t *c, int64_t now)
{
    c->events++;
    if (c->record) {
        g.events_window++;
        if (c->events == 1)
            hist_add(&g.ttft, now - c->origin_ns);
        else
            hist_add(&g.gap, now - c->last_ev_ns);
        if (c->ev_content && !c->content_seen)
            hist_add(&g.ttfc, now - c->origin_ns);
    }
    if (c->ev_content)
        c->content_seen = true;
    if (c->ev_done)
        c->saw_done = true;
    c->last_ev_ns = now;
}

static void sse_line_end(conn_t *c, int64_t now)
{
    if (c->sse_len == 0) {
        if (c->ev_data)
            sse_event(c, now);
        c->ev_data = c->ev_done = c->ev_content = false;
    } else if (c->sse_data_line) {
        const char *v = c->sse_head + 5;
        size_t vl = c->sse_len - 5;
        if (vl > 0 && *v == ' ') {
            v++;
            vl--;
        }
        c->ev_data = true;
        if (vl == 6 && memcmp(v, "[DONE]", 6) == 0)
            c->ev_done = true;
    }
    c->sse_len = 0;
    c->sse_data_line = false;
    c->sse_match = 0;
}

/* One step of the "content":" matcher. The key's only repeated byte is the quote that
 * starts it, so after a mismatch the longest match still possible is the quote just
 * seen (then this byte is tried as the key's second) or nothing (then as its first). */
static void sse_match_step(conn_t *c, char ch)
{
    int k = c->sse_match;
    if (k == (int)CONTENT_KEY_LEN) {
        if (ch != '"')
            c->ev_content = true;
        k = 1; /* the key's closing quote may open the next match */
    }
    if (ch == CONTENT_KEY[k]) {
        c->sse_match = k + 1;
        return;
    }
    if (k > 0 && CONTENT_KEY[k - 1] == '"' && ch == CONTENT_KEY[1])
        c->sse_match = 2;
    else
        c->sse_match = ch == CONTENT_KEY[0] ? 1 : 0;
}

static void sse_feed(conn_t *c, const char *p, size_t n, int64_t now)
{
    if (c->status < 200 || c->status >= 300)
        return;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '\n' && c->sse_cr) {
            c->sse_cr = false;
            continue;
        }
        c->sse_cr = ch == '\r';
        if (ch == '\r' || ch == '\n') {
            sse_line_end(c, now);
            continue;
        }
        if (c->sse_len < sizeof c->sse_head)
            c->sse_head[c->sse_len] = ch;
        c->sse_len++;
        if (c->sse_len == 5)
            c->sse_data_line = memcmp(c->sse_head, "data:", 5) == 0;
        else if (c->sse_len > 5 && c->sse_data_line)
            sse_match_step(c, ch);
    }
}

static bool header_is(const char *line, size_t len, const char *name, const char **value)
{
    size_t n = strlen(name);
    if (len <= n || strncasecmp(line, name, n) != 0 || line[n] != ':')
        return false;
    const char *v = line + n + 1;
    while (v < line + len && (*v == ' ' || *v == '\t'))
        v++;
    *value = v;
    return true;
}

/* Parses the status line and headers in [p, p+len) (len excludes the blank line). */
static bool parse_head(conn_t *c, const char *p, size_t len)
{
    if (len < 12 || strncmp(p, "HTTP/1.", 7) != 0)
        return false;
    bool http10 = p[7] == '0';
    int st = 0;
    for (int i = 9; i < 12; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        st = st * 10 + (p[i] - '0');
    }
    c->status = st;
    c->close_after = http10;
    bool have_len = false, chunked = false;
    int64_t clen = 0;
    const char *end = p + len;
    const char *line = memchr(p, '\n', len);
    line = line ? line + 1 : end;
    while (line < end) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol)
            eol = end;
        size_t ll = (size_t)(eol - line);
        if (ll > 0 && line[ll - 1] == '\r')
            ll--;
        const char *v;
        if (header_is(line, ll, "content-length", &v)) {
            clen = strtoll(v, NULL, 10);
            have_len = true;
        } else if (header_is(line, ll, "transfer-encoding", &v)) {
            if (ll - (size_t)(v - line) >= 7 && strncasecmp(v, "chunked", 7) == 0)
                chunked = true;
        } else if (header_is(line, ll, "connection", &v)) {
            size_t vl = ll - (size_t)(v - line);
            if (vl >= 5 && strncasecmp(v, "close", 5) == 0)
                c->close_after = true;
            else if (vl >= 10 && strncasecmp(v, "keep-alive", 10) == 0)
                c->close_after = false;
        }
        line = eol + 1;
    }
    if (st == 204 || st == 304 || (st >= 100 && st < 200)) {
        c->ps = P_LEN;
        c->remaining = 0;
    } else if (chunked) {
        c->ps = P_CHUNK_SIZE;
    } else if (have_len) {
        c->ps = P_LEN;
        c->remaining = clen;
    } else {
        c->ps = P_EOF;
        c->close_after = true;
    }
    return true;
}

/* Consumes what rbuf holds. Returns false on a protocol error (connection closed). */
static bool conn_parse(conn_t *c, int64_t now)
{
    size_t off = 0;
    for (;;) {
        char *p = c->rbuf + off;
        size_t avail = c->rlen - off;
        if (c->state != C_BUSY) {
            if (avail > 0) { /* bytes nobody asked for */
                g.err_parse++;
                conn_close(c);
                return false;
            }
            break;
        }
        if (c->ps == P_HEAD) {
            char *e = memmem(p, avail, "\r\n\r\n", 4);
            if (!e)
                break;
            if (!parse_head(c, p, (size_t)(e - p))) {
                if (c->record)
                    g.err_parse++;
                conn_close(c);
                return false;
            }
            off += (size_t)(e - p) + 4;
            if (c->status >= 100 && c->status < 200) { /* interim response: wait for the real one */
                c->ps = P_HEAD;
                continue;
            }
            if (c->ps == P_LEN && c->remaining == 0) {
                response_done(c, now);
                if (c->state == C_FREE)
                    return true;
            }
        } else if (c->ps == P_LEN || c->ps == P_CHUNK_DATA) {
            size_t take = avail < (uint64_t)c->remaining ? avail : (size_t)c->remaining;
            sample_error_body(c, p, take);
            if (opt.stream)
                sse_feed(c, p, take, now);
            off += take;
            c->remaining -= (int64_t)take;
            if (c->remaining > 0)
                break;
            if (c->ps == P_CHUNK_DATA) {
                c->ps = P_CHUNK_CRLF;
            } else {
                response_done(c, now);
                if (c->state == C_FREE)
                    return true;
            }
        } else if (c->ps == P_EOF) {
            sample_error_body(c, p, avail);
            if (opt.stream)
                sse_feed(c, p, avail, now);
            off += avail;
            break;
        } else if (c->ps == P_CHUNK_CRLF) {
            if (avail < 2)
                break;
            off += 2;
            c->ps = P_CHUNK_SIZE;
        } else { /* P_CHUNK_SIZE or P_TRAILER: line based */
            char *eol = memmem(p, avail, "\r\n", 2);
            if (!eol)
                break;
            off += (size_t)(eol - p) + 2;
            if (c->ps == P_CHUNK_SIZE) {
                char *endp;
                errno = 0;
                long long sz = strtoll(p, &endp, 16);
                if (endp == p || sz < 0 || errno) {
                    if (c->record)
                        g.err_parse++;
                    conn_close(c);
                    return false;
                }
                if (sz == 0) {
                    c->ps = P_TRAILER;
                } else {
                    c->ps = P_CHUNK_DATA;
                    c->remaining = sz;
                }
            } else if (eol == p) { /* empty line ends the trailers and the response */
                response_done(c, now);
                if (c->state == C_FREE)
                    return true;
            }
        }
    }
    if (off > 0 && c->state != C_FREE) {
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
    }
    return true;
}

static void conn_readable(conn_t *c, int64_t now)
{
    for (;;) {
        if (c->rcap - c->rlen < 16384) {
            size_t ncap = c->rcap ? c->rcap * 2 : 65536;
            char *nb = realloc(c->rbuf, ncap);
            if (!nb)
                die("%s", "out of memory");
            c->rbuf = nb;
            c->rcap = ncap;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
        if (n > 0) {
            c->rlen += (size_t)n;
            if (opt.stream)
                now = now_ns(); /* events are timed at their arrival, not at the epoll wake-up */
            if (!conn_parse(c, now))
                return;
            if (c->state == C_FREE)
                return;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        /* EOF or error */
        if (c->state == C_BUSY && c->ps == P_EOF) {
            response_done(c, now);
            conn_close(c);
            return;
        }
        if (c->state == C_BUSY && c->record)
            g.err_reset++;
        conn_close(c);
        return;
    }
}

static void conn_event(conn_t *c, uint32_t ev, int64_t now)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err != 0 || (ev & (EPOLLERR | EPOLLHUP))) {
            g.err_connect++;
            g.last_connect_fail_ns = now;
            conn_close(c);
            return;
        }
        if (ev & EPOLLOUT) {
            conn_set_state(c, C_IDLE);
            set_out(c, false);
        }
        return;
    }
    if ((ev & EPOLLOUT) && c->state == C_BUSY && c->woff < g.req_len) {
        if (!conn_flush(c))
            return;
    }
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
        conn_readable(c, now);
}

static void check_timeouts(int64_t now)
{
    int64_t limit = (int64_t)(opt.timeout * NS_PER_SEC);
    if (g.nstate[C_BUSY] == 0)
        return;
    for (int i = 0; i < g.nconns_cap; i++) {
        conn_t *c = &g.conns[i];
        if (c->state == C_BUSY && now - c->sent_ns > limit) {
            if (c->record)
                g.err_timeout++;
            conn_close(c);
        }
    }
}

static void arm_timer(int64_t at)
{
    if (at == g.armed_ns)
        return;
    g.armed_ns = at;
    struct itimerspec its = { 0 };
    if (at > 0) {
        its.it_value.tv_sec = at / NS_PER_SEC;
        its.it_value.tv_nsec = at % NS_PER_SEC;
    }
    timerfd_settime(g.tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void on_signal(int sig)
{
    (void)sig;
    g.interrupted = 1;
}

/* ---------------------------------------------------------------- setup --- */
static void parse_url(const char *url, char **host, char **port, char **path)
{
    if (strncmp(url, "http://", 7) != 0)
        die("only http:// URLs are supported, got %s", url);
    const char *h = url + 7;
    const char *slash = strchr(h, '/');
    const char *hend = slash ? slash : h + strlen(h);
    *path = strdup(slash ? slash : "/");
    const char *colon = memchr(h, ':', (size_t)(hend - h));
    if (colon) {
        *host = strndup(h, (size_t)(colon - h));
        *port = strndup(colon + 1, (size_t)(hend - colon - 1));
    } else {
        *host = strndup(h, (size_t)(hend - h));
        *port = strdup("80");
    }
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot open %s", path);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n == cap)
            buf = realloc(buf, cap *= 2);
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0)
            break;
        n += r;
    }
    fclose(f);
    *len = n;
    return buf;
}

static void build_request(const char *host, const char *port, const char *path)
{
    size_t cap = 1024 + opt.body_len;
    for (size_t i = 0; i < opt.nheaders; i++)
        cap += strlen(opt.headers[i]) + 2;
    g.req = malloc(cap);
    int n = snprintf(g.req, cap, "%s %s HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: pgdispatch-loadgen\r\n",
                     opt.method, path, host, port);
    bool have_ct = false;
    for (size_t i = 0; i < opt.nheaders; i++) {
        if (strncasecmp(opt.headers[i], "content-type:", 13) == 0)
            have_ct = true;
        n += snprintf(g.req + n, cap - (size_t)n, "%s\r\n", opt.headers[i]);
    }
    if (opt.body) {
        if (!have_ct)
            n += snprintf(g.req + n, cap - (size_t)n, "Content-Type: application/json\r\n");
        n += snprintf(g.req + n, cap - (size_t)n, "Content-Length: %zu\r\n", opt.body_len);
    }
    n += snprintf(g.req + n, cap - (size_t)n, "\r\n");
    if (opt.body) {
        memcpy(g.req + n, opt.body, opt.body_len);
        n += (int)opt.body_len;
    }
    g.req_len = (size_t)n;
}

static void json_str(FILE *f, const char *s, size_t n)
{
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void print_hist(FILE *f, const char *name, const hist_t *h)
{
    fprintf(f, "  \"%s\": {\"count\": %" PRIu64, name, h->total);
    if (h->total > 0) {
        static const struct { const char *k; double p; } pc[] = {
            { "p50", 50 }, { "p75", 75 }, { "p90", 90 }, { "p95", 95 },
            { "p99", 99 }, { "p999", 99.9 }, { "p9999", 99.99 },
        };
        fprintf(f, ", \"min\": %.4f, \"mean\": %.4f", (double)h->min / NS_PER_MS,
                h->sum / (double)h->total / NS_PER_MS);
        for (size_t i = 0; i < sizeof pc / sizeof pc[0]; i++)
            fprintf(f, ", \"%s\": %.4f", pc[i].k, (double)hist_pct(h, pc[i].p) / NS_PER_MS);
        fprintf(f, ", \"max\": %.4f", (double)h->max / NS_PER_MS);
    }
    fprintf(f, "}");
}

static void report(int64_t window_ns, uint64_t unsent, uint64_t inflight)
{
    FILE *f = stdout;
    if (opt.out && !(f = fopen(opt.out, "w")))
        die("cannot write %s", opt.out);
    double secs = (double)window_ns / NS_PER_SEC;
    fprintf(f, "{\n  \"label\": ");
    json_str(f, opt.label, strlen(opt.label));
    fprintf(f, ",\n  \"url\": ");
    json_str(f, opt.url, strlen(opt.url));
    fprintf(f, ",\n  \"mode\": \"%s\",\n", opt.mode == MODE_OPEN ? "open" : "closed");
    if (opt.mode == MODE_OPEN)
        fprintf(f, "  \"target_rate\": %.3f,\n", opt.rate);
    else
        fprintf(f, "  \"connections\": %d,\n", opt.closed_conns);
    fprintf(f, "  \"warmup_s\": %.3f,\n  \"duration_s\": %.3f,\n", opt.warmup, secs);
    fprintf(f, "  \"sent\": %" PRIu64 ",\n  \"sent_in_window\": %" PRIu64 ",\n", g.sent, g.sent_window);
    fprintf(f, "  \"completed\": %" PRIu64 ",\n  \"ok\": %" PRIu64 ",\n", g.completed_window, g.ok_window);
    fprintf(f, "  \"ok_rate\": %.3f,\n", secs > 0 ? (double)g.ok_window / secs : 0.0);
    fprintf(f, "  \"status\": {");
    bool first = true;
    for (int s = 0; s < MAX_STATUS; s++) {
        if (g.status_count[s]) {
            fprintf(f, "%s\"%d\": %" PRIu64, first ? "" : ", ", s, g.status_count[s]);
            first = false;
        }
    }
    uint64_t non2xx = g.completed_window - g.ok_window;
    fprintf(f, "},\n  \"errors\": {\"non_2xx\": %" PRIu64 ", \"connect\": %" PRIu64 ", \"reset\": %" PRIu64
               ", \"timeout\": %" PRIu64 ", \"parse\": %" PRIu64 ", \"unsent\": %" PRIu64
               ", \"unfinished\": %" PRIu64 ", \"stream_incomplete\": %" PRIu64 "},\n",
            non2xx, g.err_connect, g.err_reset, g.err_timeout, g.err_parse, unsent, inflight, g.err_stream);
    fprintf(f, "  \"error_total\": %" PRIu64 ",\n",
            non2xx + g.err_reset + g.err_timeout + g.err_parse + unsent + inflight + g.err_stream);
    fprintf(f, "  \"connections_opened\": %" PRIu64 ",\n  \"peak_busy_connections\": %d,\n", g.conns_opened,
            g.peak_busy);
    print_hist(f, "latency_ms", &g.lat);
    if (opt.mode == MODE_OPEN) {
        fprintf(f, ",\n");
        print_hist(f, "send_lag_ms", &g.lag);
    }
    if (opt.stream) {
        fprintf(f, ",\n  \"stream\": {\"streams_done\": %" PRIu64 ", \"events\": %" PRIu64
                   ", \"events_per_stream\": %.2f},\n",
                g.streams_done, g.events_window,
                g.ok_window ? (double)g.events_window / (double)g.ok_window : 0.0);
        print_hist(f, "ttft_ms", &g.ttft);
        fprintf(f, ",\n");
        print_hist(f, "first_content_ms", &g.ttfc);
        fprintf(f, ",\n");
        print_hist(f, "inter_event_ms", &g.gap);
    }
    fprintf(f, ",\n  \"error_sample\": ");
    json_str(f, g.err_sample, g.err_sample_len);
    fprintf(f, "\n}\n");
    if (f != stdout)
        fclose(f);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --url http://HOST:PORT/PATH (--rate R | --closed N) [options]\n"
            "  --rate R            open loop: R requests/s on a fixed schedule; latency from the scheduled time\n"
            "  --closed N          closed loop: N connections, each sends again as soon as it has its answer\n"
            "  --duration S        measured window in seconds (default 10)\n"
            "  --warmup S          seconds of load before the window, not recorded (default 0)\n"
            "  --method M          HTTP method (default POST with a body, else GET)\n"
            "  --body TEXT         request body; --body-file FILE reads it from a file\n"
            "  -H, --header 'K: V' extra header (repeatable)\n"
            "  --connections N     open loop: connections opened up front (default 16)\n"
            "  --max-connections N open loop: most connections (default 1024)\n"
            "  --timeout S         per-request timeout (default 30)\n"
            "  --drain S           wait for in-flight requests after the window (default: timeout)\n"
            "  --stream            read 2xx answers as text/event-stream: TTFT (first data event), first\n"
            "                      non-empty content, gaps between data events; no data: [DONE] = error\n"
            "  --label TEXT        copied into the JSON\n"
            "  --out FILE          write the JSON there instead of stdout\n"
            "Output: one JSON object; latency percentiles of 2xx responses in ms; errors by kind and status.\n"
            "With --stream also ttft_ms, first_content_ms, inter_event_ms and stream counts.\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "url", required_argument, 0, 'u' },           { "rate", required_argument, 0, 'r' },
        { "closed", required_argument, 0, 'c' },        { "duration", required_argument, 0, 'd' },
        { "warmup", required_argument, 0, 'w' },        { "method", required_argument, 0, 'm' },
        { "body", required_argument, 0, 'b' },          { "body-file", required_argument, 0, 'B' },
        { "header", required_argument, 0, 'H' },        { "connections", required_argument, 0, 'n' },
        { "max-connections", required_argument, 0, 'N' }, { "timeout", required_argument, 0, 't' },
        { "drain", required_argument, 0, 'D' },         { "label", required_argument, 0, 'l' },
        { "out", required_argument, 0, 'o' },           { "help", no_argument, 0, 'h' },
        { "stream", no_argument, 0, 'S' },
        { 0, 0, 0, 0 },
    };
    opt.headers = calloc((size_t)argc, sizeof(char *));
    int ch;
    while ((ch = getopt_long(argc, argv, "H:h", lo, NULL)) != -1) {
        switch (ch) {
        case 'u': opt.url = optarg; break;
        case 'r': opt.rate = atof(optarg); opt.mode = MODE_OPEN; break;
        case 'c': opt.closed_conns = atoi(optarg); opt.mode = MODE_CLOSED; break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'm': opt.method = optarg; break;
        case 'b': opt.body = optarg; opt.body_len = strlen(optarg); break;
        case 'B': opt.body = read_file(optarg, &opt.body_len); break;
        case 'H': opt.headers[opt.nheaders++] = optarg; break;
        case 'n': opt.init_conns = atoi(optarg); break;
        case 'N': opt.max_conns = atoi(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 'D': opt.drain = atof(optarg); break;
        case 'l': opt.label = optarg; break;
        case 'o': opt.out = optarg; break;
        case 'S': opt.stream = true; break;
        default: usage();
        }
    }
    if (!opt.url || (opt.mode == MODE_OPEN && opt.rate <= 0) ||
        (opt.mode == MODE_CLOSED && opt.closed_conns <= 0) || opt.duration <= 0)
        usage();
    if (!opt.method)
        opt.method = opt.body ? "POST" : "GET";
    if (opt.drain < 0)
        opt.drain = opt.timeout;

    char *host, *port, *path;
    parse_url(opt.url, &host, &port, &path);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0)
        die("cannot resolve: %s", gai_strerror(rc));
    memcpy(&g.addr, ai->ai_addr, ai->ai_addrlen);
    g.addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);
    build_request(host, port, path);

    int want = (opt.mode == MODE_OPEN ? opt.max_conns : opt.closed_conns) + 64;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)want) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)want ? rl.rlim_max : (rlim_t)want;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    g.nconns_cap = opt.mode == MODE_OPEN ? opt.max_conns : opt.closed_conns;
    g.conns = calloc((size_t)g.nconns_cap, sizeof(conn_t));
    for (int i = 0; i < g.nconns_cap; i++)
        g.conns[i].fd = -1;
    g.nstate[C_FREE] = g.nconns_cap;
    hist_init(&g.lat);
    hist_init(&g.lag);
    hist_init(&g.ttft);
    hist_init(&g.ttfc);
    hist_init(&g.gap);
    g.ep = epoll_create1(EPOLL_CLOEXEC);
    g.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(g.ep, EPOLL_CTL_ADD, g.tfd, &tev);

    /* Open the connections first and wait (at most 5 s) until they are up, so the
     * window does not include connection setup. */
    int initial = opt.mode == MODE_OPEN ? (opt.init_conns < opt.max_conns ? opt.init_conns : opt.max_conns)
                                        : opt.closed_conns;
    for (int i = 0; i < initial; i++)
        if (!conn_open())
            break;
    struct epoll_event evs[256];
    int64_t setup_deadline = now_ns() + 5 * NS_PER_SEC;
    for (;;) {
        if (g.nstate[C_CONNECTING] == 0 || now_ns() > setup_deadline)
            break;
        int n = epoll_wait(g.ep, evs, 256, 50);
        for (int i = 0; i < n; i++)
            if (evs[i].data.ptr)
                conn_event(evs[i].data.ptr, evs[i].events, now_ns());
    }
    if (g.nopen == 0)
        die("could not connect to %s", opt.url);

    g.t0 = now_ns();
    g.measure_start = g.t0 + (int64_t)(opt.warmup * NS_PER_SEC);
    g.end_ns = g.measure_start + (int64_t)(opt.duration * NS_PER_SEC);
    g.interval_ns = opt.mode == MODE_OPEN ? (int64_t)(NS_PER_SEC / opt.rate) : 0;
    if (g.interval_ns < 1)
        g.interval_ns = 1;
    int64_t drain_end = g.end_ns + (int64_t)(opt.drain * NS_PER_SEC);
    int64_t next_timeout_scan = g.t0;

    for (;;) {
        int64_t now = now_ns();
        if (g.interrupted && !g.stopping) {
            g.end_ns = now;
            drain_end = now + (int64_t)(opt.drain * NS_PER_SEC);
        }
        if (!g.stopping && now >= g.end_ns)
            g.stopping = true;
        if (opt.mode == MODE_OPEN && !g.stopping) {
            while (g.t0 + (int64_t)g.next_sched * g.interval_ns <= now &&
                   g.t0 + (int64_t)g.next_sched * g.interval_ns < g.end_ns)
                g.next_sched++;
        }
        dispatch(now);
        int busy = g.nstate[C_BUSY];
        if (busy > g.peak_busy)
            g.peak_busy = busy;
        if (g.stopping && (busy == 0 || now >= drain_end))
            break;
        if (now >= next_timeout_scan) {
            check_timeouts(now);
            next_timeout_scan = now + 50 * NS_PER_MS;
        }
        /* Sleep until the next scheduled send (timerfd: sub-millisecond), the end of
         * the window, or 50 ms for the timeout scan, whichever is first. */
        int64_t wake = g.stopping ? drain_end : g.end_ns;
        if (opt.mode == MODE_OPEN && !g.stopping) {
            int64_t next = g.t0 + (int64_t)g.next_sched * g.interval_ns;
            if (next < wake)
                wake = next;
        }
        if (next_timeout_scan < wake)
            wake = next_timeout_scan;
        arm_timer(wake > now ? wake : now + 1);
        int n = epoll_wait(g.ep, evs, 256, 100);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                uint64_t exp;
                ssize_t r = read(g.tfd, &exp, sizeof exp);
                (void)r;
                g.armed_ns = 0; /* fired: the next arm_timer must set it again */
                continue;
            }
            conn_event(evs[i].data.ptr, evs[i].events, now);
        }
    }

    uint64_t unsent = 0, inflight = 0;
    if (opt.mode == MODE_OPEN)
        unsent = g.next_sched - g.next_send; /* scheduled in the window, never sent */
    for (int i = 0; i < g.nconns_cap; i++)
        if (g.conns[i].state == C_BUSY && g.conns[i].record)
            inflight++;
    int64_t window = g.end_ns - g.measure_start;
    report(window > 0 ? window : 0, unsent, inflight);
    for (int i = 0; i < g.nconns_cap; i++) {
        conn_close(&g.conns[i]);
        free(g.conns[i].rbuf);
    }
    free(g.conns);
    free(g.req);
    free(host);
    free(port);
    free(path);
    free(opt.headers);
    return 0;
}
