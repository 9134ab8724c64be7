/* request: turns what a client sent into a submit element or a refusal: content
 * type, body JSON, model, the request option headers, job paths and bearer tokens.
 * Pure functions on the caller's strings; no I/O, no state. */
#ifndef PGD_GATEWAY_REQUEST_H
#define PGD_GATEWAY_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "call.h"

#define REQUEST_DEFAULT_ENDPOINT "/v1/chat/completions"
#define REQUEST_MAX_TIMEOUT_S 86400.0   /* X-Request-Timeout ceiling */
#define REQUEST_MAX_WAIT_S 600.0        /* ?wait= ceiling */

/* Options from the request headers, already validated. */
typedef struct {
    int64_t timeout_ms;          /* > 0 */
    bool timeout_given;          /* from X-Request-Timeout rather than the default */
    bool has_priority;
    int32_t priority;
    const char *idempotency_key; /* borrowed from the header; NULL when absent */
} request_options_t;

/* True for application/json with optional parameters (charset=utf-8), any case. */
bool request_content_type_ok(const char *value);

/* Validate the option headers (each may be NULL). X-Request-Timeout: seconds, > 0,
 * fractions allowed, at most REQUEST_MAX_TIMEOUT_S. X-Priority: an integer of at most
 * 9 digits. Idempotency-Key: 1 to 255 printable ASCII characters. Returns 0, or -1
 * with r filled with a 400. */
int request_parse_options(const char *timeout, const char *priority, const char *idempotency_key,
                          int64_t default_timeout_ms, request_options_t *out, gw_reply_t *r);

/* An OpenAI request body (chat/completions/embeddings) to a submit_many element:
 * {"model", "endpoint", "payload": <the body as sent>, "timeout_ms", ...}. The body
 * must be a JSON object with a "model" string of 1..256 characters; "stream", when
 * present, must be a boolean (or null), and true only on an endpoint that streams
 * (request_endpoint_streams). Returns 0 with *element (malloc'd, NUL-terminated),
 * its length and *stream (the client asked for an event stream), or -1 with r
 * filled (400). */
int request_build_openai(const char *body, size_t len, const char *endpoint,
                         const request_options_t *opt, char **element, size_t *element_len,
                         bool *stream, gw_reply_t *r);

/* Add "stream_token": token (1..64 letters and digits) to a submit element built
 * above (a JSON object), in place. False, the element unchanged, when the token or
 * the element is not as said or memory ran out. */
bool request_add_stream_token(char **element, size_t *element_len, const char *token);

/* Endpoints that answer "stream": true with Server-Sent Events: chat and text
 * completions (paths ending in /completions). */
bool request_endpoint_streams(const char *endpoint);

/* A POST /v1/jobs body to a submit_many element: either {"model", "endpoint",
 * "payload": {...}} (model defaults to payload.model, endpoint to
 * /v1/chat/completions) or a plain OpenAI body. Same contract as above. */
int request_build_job(const char *body, size_t len, const request_options_t *opt, char **element,
                      size_t *element_len, gw_reply_t *r);

/* True for the inference endpoints a job may target: /v1/chat/completions,
 * /v1/completions, /v1/embeddings. */
bool request_endpoint_ok(const char *endpoint);

/* "/v1/jobs/<id>" with a positive decimal id that fits in int64. */
bool request_parse_job_path(const char *url, int64_t *id);

/* "?wait=N": seconds, 0..REQUEST_MAX_WAIT_S, fractions allowed. NULL means 0. */
bool request_parse_wait(const char *value, int64_t *wait_ms);

/* "Bearer <token>" (scheme in any case): points *token into value. The token must be
 * 1..512 printable ASCII characters. */
bool request_bearer_token(const char *value, const char **token, size_t *len);

#endif
