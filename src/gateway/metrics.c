/* metrics: counters and fixed-bucket histograms for the gateway, rendered as
 * Prometheus text together with the control plane's gauges. Series are few and
 * bounded (route labels are static, statuses are three digits), so plain arrays. */
#include "metrics.h"

#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define METRICS_MAX_REQ_SERIES 512
#define METRICS_MAX_ENDPOINTS 32

static const double metrics_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                        0.5,   1,      2.5,   5,    10,    30,    60,  120, 300};
#define METRICS_NB (sizeof metrics_bounds / sizeof metrics_bounds[0])

typedef struct {
    uint64_t buckets[METRICS_NB]; /* non-cumulative; cumulated when rendered */
    uint64_t count;
    double sum;
} histogram_t;

typedef struct {
    const char *endpoint;
    int status;
    uint64_t count;
} req_series_t;

typedef struct {
    const char *endpoint;
    histogram_t h;
} dur_series_t;

static pthread_mutex_t metrics_mu = PTHREAD_MUTEX_INITIALIZER;
static req_series_t metrics_req[METRICS_MAX_REQ_SERIES];
static size_t metrics_nreq;
static dur_series_t metrics_dur[METRICS_MAX_ENDPOINTS];
static size_t metrics_ndur;
static histogram_t metrics_queue_wait;
static histogram_t metrics_job_total;
static uint64_t metrics_reconnects;
static uint64_t metrics_stream_requests;
static histogram_t metrics_stream_first;
static const char *const metrics_stream_hows[] = {"done", "whole", "error", "client_gone"};
#define METRICS_NHOWS (sizeof metrics_stream_hows / sizeof metrics_stream_hows[0])
static uint64_t metrics_stream_ends[METRICS_NHOWS];

static void histogram_observe(histogram_t *h, double v)
{
    for (size_t i = 0; i < METRICS_NB; i++) {
        if (v <= metrics_bounds[i]) {
            h->buckets[i]++;
            break;
        }
    }
    h->count++;
    h->sum += v;
}

void metrics_request_done(const char *endpoint, int status, double seconds)
{
    size_t i;

    if (!endpoint)
        endpoint = "other";
    pthread_mutex_lock(&metrics_mu);
    for (i = 0; i < metrics_nreq; i++) {
        if (metrics_req[i].status == status && strcmp(metrics_req[i].endpoint, endpoint) == 0)
            break;
    }
    if (i == metrics_nreq && metrics_nreq < METRICS_MAX_REQ_SERIES) {
        metrics_req[i].endpoint = endpoint;
        metrics_req[i].status = status;
        metrics_nreq++;
    }
    if (i < metrics_nreq)
        metrics_req[i].count++;

    for (i = 0; i < metrics_ndur; i++) {
        if (strcmp(metrics_dur[i].endpoint, endpoint) == 0)
            break;
    }
    if (i == metrics_ndur && metrics_ndur < METRICS_MAX_ENDPOINTS) {
        memset(&metrics_dur[i], 0, sizeof metrics_dur[i]);
        metrics_dur[i].endpoint = endpoint;
        metrics_ndur++;
    }
    if (i < metrics_ndur)
        histogram_observe(&metrics_dur[i].h, seconds);
    pthread_mutex_unlock(&metrics_mu);
}

void metrics_job_finished(double queue_wait_s, double total_s)
{
    pthread_mutex_lock(&metrics_mu);
    if (queue_wait_s >= 0)
        histogram_observe(&metrics_queue_wait, queue_wait_s);
    if (total_s >= 0)
        histogram_observe(&metrics_job_total, total_s);
    pthread_mutex_unlock(&metrics_mu);
}

void metrics_db_reconnect(void)
{
    pthread_mutex_lock(&metrics_mu);
    metrics_reconnects++;
    pthread_mutex_unlock(&metrics_mu);
}

void metrics_stream_request(void)
{
    pthread_mutex_lock(&metrics_mu);
    metrics_stream_requests++;
    pthread_mutex_unlock(&metrics_mu);
}

void metrics_stream_first_event(double seconds)
{
    pthread_mutex_lock(&metrics_mu);
    histogram_observe(&metrics_stream_first, seconds);
    pthread_mutex_unlock(&metrics_mu);
}

void metrics_stream_end(const char *how)
{
    pthread_mutex_lock(&metrics_mu);
    for (size_t i = 0; i < METRICS_NHOWS; i++) {
        if (strcmp(metrics_stream_hows[i], how) == 0)
            metrics_stream_ends[i]++;
    }
    pthread_mutex_unlock(&metrics_mu);
}

void metrics_reset(void)
{
    pthread_mutex_lock(&metrics_mu);
    metrics_stream_requests = 0;
    memset(&metrics_stream_first, 0, sizeof metrics_stream_first);
    memset(metrics_stream_ends, 0, sizeof metrics_stream_ends);
    metrics_nreq = 0;
    metrics_ndur = 0;
    memset(&metrics_queue_wait, 0, sizeof metrics_queue_wait);
    memset(&metrics_job_total, 0, sizeof metrics_job_total);
    metrics_reconnects = 0;
    pthread_mutex_unlock(&metrics_mu);
}

/* A label value with \, " and newline escaped. */
static void metrics_label_value(buf_t *out, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            buf_append_str(out, "\\\\");
        else if (*v == '"')
            buf_append_str(out, "\\\"");
        else if (*v == '\n')
            buf_append_str(out, "\\n");
        else
            buf_append_char(out, *v);
    }
}

static bool metrics_name_ok(const char *name)
{
    if (!name || !*name || (name[0] >= '0' && name[0] <= '9'))
        return false;
    for (const char *p = name; *p; p++) {
        char c = *p;

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == ':'))
            return false;
    }
    return true;
}

static void metrics_histogram(buf_t *out, const char *name, const char *label_key,
                              const char *label_value, const histogram_t *h)
{
    uint64_t cum = 0;

    for (size_t i = 0; i < METRICS_NB; i++) {
        cum += h->buckets[i];
        buf_printf(out, "%s_bucket{", name);
        if (label_key) {
            buf_printf(out, "%s=\"", label_key);
            metrics_label_value(out, label_value);
            buf_append_str(out, "\",");
        }
        buf_printf(out, "le=\"%g\"} %llu\n", metrics_bounds[i], (unsigned long long)cum);
    }
    buf_printf(out, "%s_bucket{", name);
    if (label_key) {
        buf_printf(out, "%s=\"", label_key);
        metrics_label_value(out, label_value);
        buf_append_str(out, "\",");
    }
    buf_printf(out, "le=\"+Inf\"} %llu\n", (unsigned long long)h->count);
    buf_printf(out, "%s_sum", name);
    if (label_key) {
        buf_printf(out, "{%s=\"", label_key);
        metrics_label_value(out, label_value);
        buf_append_str(out, "\"}");
    }
    buf_printf(out, " %.6f\n%s_count", h->sum, name);
    if (label_key) {
        buf_printf(out, "{%s=\"", label_key);
        metrics_label_value(out, label_value);
        buf_append_str(out, "\"}");
    }
    buf_printf(out, " %llu\n", (unsigned long long)h->count);
}

static int metrics_cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The labels of a dispatch.metrics() row ({"model": "m", "tier": "reported"}),
 * in name order so a series always prints the same way. */
static void metrics_labels(buf_t *out, const char *labels_json)
{
    json_t *labels = labels_json ? json_loads(labels_json, 0, NULL) : NULL;
    const char *keys[32];
    size_t nkeys = 0;
    const char *key;
    json_t *value;
    bool first = true;

    if (!json_is_object(labels) || json_object_size(labels) == 0) {
        json_decref(labels);
        return;
    }
    json_object_foreach(labels, key, value) {
        if (nkeys < sizeof keys / sizeof keys[0] && metrics_name_ok(key))
            keys[nkeys++] = key;
    }
    qsort(keys, nkeys, sizeof keys[0], metrics_cmp_str);
    buf_append_char(out, '{');
    for (size_t i = 0; i < nkeys; i++) {
        char num[64];
        const char *text;

        value = json_object_get(labels, keys[i]);
        text = json_string_value(value);
        if (!text) {
            if (json_is_number(value)) {
                snprintf(num, sizeof num, "%g", json_number_value(value));
                text = num;
            } else if (json_is_boolean(value)) {
                text = json_is_true(value) ? "true" : "false";
            } else {
                text = "";
            }
        }
        buf_printf(out, "%s%s=\"", first ? "" : ",", keys[i]);
        metrics_label_value(out, text);
        buf_append_char(out, '"');
        first = false;
    }
    buf_append_char(out, '}');
    json_decref(labels);
}

void metrics_render(buf_t *out, const metrics_sample_t *samples, size_t n, const metrics_gateway_t *g)
{
    pthread_mutex_lock(&metrics_mu);
    buf_append_str(out, "# HELP pgdispatch_gateway_requests_total HTTP requests answered, by endpoint and status.\n"
                        "# TYPE pgdispatch_gateway_requests_total counter\n");
    for (size_t i = 0; i < metrics_nreq; i++) {
        buf_append_str(out, "pgdispatch_gateway_requests_total{endpoint=\"");
        metrics_label_value(out, metrics_req[i].endpoint);
        buf_printf(out, "\",status=\"%d\"} %llu\n", metrics_req[i].status,
                   (unsigned long long)metrics_req[i].count);
    }
    buf_append_str(out, "# HELP pgdispatch_gateway_request_duration_seconds Time from request to response, by endpoint.\n"
                        "# TYPE pgdispatch_gateway_request_duration_seconds histogram\n");
    for (size_t i = 0; i < metrics_ndur; i++)
        metrics_histogram(out, "pgdispatch_gateway_request_duration_seconds", "endpoint",
                          metrics_dur[i].endpoint, &metrics_dur[i].h);
    buf_append_str(out, "# HELP pgdispatch_gateway_job_queue_wait_seconds Time waited jobs spent queued (submit to lease).\n"
                        "# TYPE pgdispatch_gateway_job_queue_wait_seconds histogram\n");
    metrics_histogram(out, "pgdispatch_gateway_job_queue_wait_seconds", NULL, NULL, &metrics_queue_wait);
    buf_append_str(out, "# HELP pgdispatch_gateway_job_total_seconds Time from submit to finish of waited jobs.\n"
                        "# TYPE pgdispatch_gateway_job_total_seconds histogram\n");
    metrics_histogram(out, "pgdispatch_gateway_job_total_seconds", NULL, NULL, &metrics_job_total);
    buf_printf(out, "# HELP pgdispatch_gateway_db_reconnects_total Database reconnects after a lost connection.\n"
                    "# TYPE pgdispatch_gateway_db_reconnects_total counter\n"
                    "pgdispatch_gateway_db_reconnects_total %llu\n",
               (unsigned long long)metrics_reconnects);
    buf_printf(out, "# HELP pgdispatch_gateway_stream_requests_total Requests with \"stream\": true taken.\n"
                    "# TYPE pgdispatch_gateway_stream_requests_total counter\n"
                    "pgdispatch_gateway_stream_requests_total %llu\n",
               (unsigned long long)metrics_stream_requests);
    buf_append_str(out, "# HELP pgdispatch_gateway_stream_first_event_seconds Time from request to the first "
                        "event sent (headers go out with it).\n"
                        "# TYPE pgdispatch_gateway_stream_first_event_seconds histogram\n");
    metrics_histogram(out, "pgdispatch_gateway_stream_first_event_seconds", NULL, NULL, &metrics_stream_first);
    buf_append_str(out, "# HELP pgdispatch_gateway_streams_ended_total Event streams ended, by how: done, whole "
                        "(from the finished result), error (error event), client_gone.\n"
                        "# TYPE pgdispatch_gateway_streams_ended_total counter\n");
    for (size_t i = 0; i < METRICS_NHOWS; i++)
        buf_printf(out, "pgdispatch_gateway_streams_ended_total{how=\"%s\"} %llu\n", metrics_stream_hows[i],
                   (unsigned long long)metrics_stream_ends[i]);
    pthread_mutex_unlock(&metrics_mu);

    buf_printf(out, "# HELP pgdispatch_gateway_waiting_requests Requests waiting for their job.\n"
                    "# TYPE pgdispatch_gateway_waiting_requests gauge\n"
                    "pgdispatch_gateway_waiting_requests %ld\n"
                    "# HELP pgdispatch_gateway_db_up 1 when the gateway is connected to PostgreSQL and listening.\n"
                    "# TYPE pgdispatch_gateway_db_up gauge\n"
                    "pgdispatch_gateway_db_up %d\n",
               g ? g->waiting : 0L, g && g->db_up ? 1 : 0);

    /* Control-plane gauges, sorted by name by the caller: one TYPE line per name. */
    for (size_t i = 0; samples && i < n; i++) {
        if (!metrics_name_ok(samples[i].name))
            continue;
        if (i == 0 || !samples[i - 1].name || strcmp(samples[i - 1].name, samples[i].name) != 0)
            buf_printf(out, "# TYPE %s gauge\n", samples[i].name);
        buf_append_str(out, samples[i].name);
        metrics_labels(out, samples[i].labels_json);
        buf_printf(out, " %.17g\n", samples[i].value);
    }
}
