/* metrics: the gateway's own counters and histograms (requests by endpoint and
 * status, request duration, job queue wait and run time, database reconnects) and
 * the Prometheus text that adds the control plane's gauges from dispatch.metrics().
 * Owns process-wide counters behind one mutex; safe from any thread. */
#ifndef PGD_GATEWAY_METRICS_H
#define PGD_GATEWAY_METRICS_H

#include <stdbool.h>
#include <stddef.h>

#include "buf.h"

/* One row of dispatch.metrics(): name, labels as a JSON object text, value. */
typedef struct {
    const char *name;
    const char *labels_json;
    double value;
} metrics_sample_t;

/* Gateway state shown as gauges, read by the caller at render time. */
typedef struct {
    long waiting;        /* requests waiting for a job */
    bool db_up;          /* connected and listening */
} metrics_gateway_t;

/* endpoint is a static route label ("/v1/chat/completions", "/v1/jobs/{id}"). */
void metrics_request_done(const char *endpoint, int status, double seconds);
/* A waited-for job finished: created->started and created->finished, seconds
 * (negative: unknown, not recorded). */
void metrics_job_finished(double queue_wait_s, double total_s);
void metrics_db_reconnect(void);
/* A request with "stream": true was taken (handed to the dispatcher). */
void metrics_stream_request(void);
/* A stream's headers and first event went out, seconds after the request came. */
void metrics_stream_first_event(double seconds);
/* A stream ended: "done" ([DONE] after the relayed events), "whole" (answered from the
 * finished result: nothing could be relayed), "error" (an error event), "client_gone". */
void metrics_stream_end(const char *how);

/* Prometheus text exposition (version 0.0.4) of everything, appended to out.
 * samples must be sorted by name (rows of one name together).
 * samples may be NULL (database down): only the gateway's own series are shown. */
void metrics_render(buf_t *out, const metrics_sample_t *samples, size_t n, const metrics_gateway_t *g);

/* Forget every counter (unit tests). */
void metrics_reset(void);

#endif
