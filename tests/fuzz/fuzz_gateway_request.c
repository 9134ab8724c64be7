/* libFuzzer target: the gateway's request parsing and validation (src/gateway/request.c)
 * and the reply-notification parser (batch_parse_ids), on arbitrary bytes.
 *
 * Input: byte 0 picks the route (chat, completions, embeddings, jobs), byte 1 which
 * option headers are present; the rest is split at NUL bytes into X-Request-Timeout,
 * X-Priority, Idempotency-Key and Content-Type (header values are NUL-terminated
 * strings, as libmicrohttpd hands them over); what follows the fourth NUL is the body
 * (which may itself hold NULs).
 *
 * Oracles beyond "no crash, no leak, no UB": a refusal always carries a 4xx status and
 * an OpenAI error body that parses; an accepted request's submit element is a JSON
 * object without NUL bytes that parses, whose model is a 1..256 character string, whose endpoint passes
 * request_endpoint_ok, and whose payload is an object (it goes to
 * dispatch.submit_many as it is). */
#include <assert.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"
#include "errors.h"
#include "request.h"

static const char *const endpoints[] = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"};

static void check_refusal(gw_reply_t *r)
{
    json_t *doc;

    if (r->status < 400 || r->status >= 600) {
        fprintf(stderr, "refusal with status %d\n", r->status);
        abort();
    }
    if (r->body) {
        doc = json_loadb(r->body, r->body_len, 0, NULL);
        if (!json_is_object(doc) || !json_is_object(json_object_get(doc, "error")) ||
            !json_is_string(json_object_get(json_object_get(doc, "error"), "message"))) {
            fprintf(stderr, "error body is not an OpenAI error: %.*s\n", (int)r->body_len, r->body);
            abort();
        }
        json_decref(doc);
    }
    errors_reply_clear(r);
}

static void check_element(const char *element, size_t len, const request_options_t *opt)
{
    json_error_t jerr;
    json_t *doc = json_loadb(element, len, JSON_DECODE_INT_AS_REAL, &jerr);
    json_t *model, *endpoint, *key;

    /* It goes to PostgreSQL as a C string: a NUL inside would cut it short. */
    if (strlen(element) != len) {
        fprintf(stderr, "element holds a NUL byte at %zu of %zu\n", strlen(element), len);
        abort();
    }

    if (!json_is_object(doc)) {
        fprintf(stderr, "element is not a JSON object (%s): %.*s\n", jerr.text, (int)len, element);
        abort();
    }
    model = json_object_get(doc, "model");
    endpoint = json_object_get(doc, "endpoint");
    key = json_object_get(doc, "idempotency_key");
    if (!json_is_string(model) || json_string_length(model) < 1 || json_string_length(model) > 256) {
        fprintf(stderr, "element model is not a 1..256 string: %.*s\n", (int)len, element);
        abort();
    }
    if (!json_is_string(endpoint) || !request_endpoint_ok(json_string_value(endpoint))) {
        fprintf(stderr, "element endpoint is not a path: %.*s\n", (int)len, element);
        abort();
    }
    if (!json_is_object(json_object_get(doc, "payload"))) {
        fprintf(stderr, "element payload is not an object: %.*s\n", (int)len, element);
        abort();
    }
    if ((opt->idempotency_key != NULL) != (key != NULL) ||
        (key && strcmp(json_string_value(key), opt->idempotency_key) != 0)) {
        fprintf(stderr, "element idempotency_key differs from the header: %.*s\n", (int)len, element);
        abort();
    }
    json_decref(doc);
}

static void count_id(void *ctx, int64_t id)
{
    if (id <= 0)
        abort();
    (*(int *)ctx)++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *copy, *field[4] = {NULL, NULL, NULL, NULL};
    const char *body;
    size_t body_len, at = 2;
    unsigned route, flags;
    request_options_t opt;
    gw_reply_t r = {0};
    char *element = NULL;
    size_t element_len = 0;
    bool stream = false;
    int64_t id, wait_ms;
    const char *token;
    size_t token_len;
    int rc, seen = 0;

    if (size < 2)
        return 0;
    route = data[0] % 4;
    flags = data[1];
    /* A NUL-terminated copy, so every field is a C string as MHD would give it. */
    copy = malloc(size + 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    copy[size] = '\0';
    for (int i = 0; i < 4; i++) {
        field[i] = copy + at;
        while (at < size && copy[at] != '\0')
            at++;
        if (at < size)
            at++;   /* past the NUL */
    }
    body = copy + at;
    body_len = size - at;

    /* The small parsers, on every field. */
    for (int i = 0; i < 4; i++) {
        (void)request_content_type_ok(field[i]);
        (void)request_endpoint_ok(field[i]);
        if (request_parse_job_path(field[i], &id) && id <= 0)
            abort();
        if (request_parse_wait(field[i], &wait_ms) && (wait_ms < 0 || wait_ms > (int64_t)(REQUEST_MAX_WAIT_S * 1000)))
            abort();
        if (request_bearer_token(field[i], &token, &token_len) && (token_len < 1 || token_len > 512))
            abort();
        seen = 0;
        rc = batch_parse_ids(field[i], count_id, &seen);
        if ((rc < 0 && seen != 0) || (rc >= 0 && rc != seen))
            abort();
    }

    /* Headers to options, then the body to a submit element. */
    if (request_parse_options((flags & 1) ? field[0] : NULL, (flags & 2) ? field[1] : NULL,
                              (flags & 4) ? field[2] : NULL, 300000, &opt, &r) != 0) {
        check_refusal(&r);
        free(copy);
        return 0;
    }
    if (opt.timeout_ms < 1 || opt.timeout_ms > (int64_t)(REQUEST_MAX_TIMEOUT_S * 1000))
        abort();
    if (route == 3)
        rc = request_build_job(body, body_len, &opt, &element, &element_len, &r);
    else
        rc = request_build_openai(body, body_len, endpoints[route], &opt, &element, &element_len, &stream, &r);
    if (rc == 0) {
        if (!element || element[element_len] != '\0')
            abort();
        check_element(element, element_len, &opt);
        free(element);
    } else {
        if (element)
            abort();
        check_refusal(&r);
    }
    free(copy);
    return 0;
}
