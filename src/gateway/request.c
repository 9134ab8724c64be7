/* request: client input to submit elements. Bodies are checked with jansson (valid
 * JSON, an object, a model) and then embedded raw, so the provider gets the bytes
 * the client sent; headers become timeout_ms, priority and idempotency_key. */
#include "request.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "buf.h"
#include "errors.h"

bool request_content_type_ok(const char *value)
{
    static const char want[] = "application/json";
    const char *p = value;

    if (!p)
        return false;
    while (*p == ' ' || *p == '\t')
        p++;
    if (strncasecmp(p, want, sizeof want - 1) != 0)
        return false;
    p += sizeof want - 1;
    while (*p == ' ' || *p == '\t')
        p++;
    return *p == '\0' || *p == ';';
}

/* Seconds as a positive decimal ("30", "0.5"), no exponent, no junk. */
static bool request_parse_seconds(const char *text, double max, bool allow_zero, double *out)
{
    char *end;
    double v;

    if (!text || !*text)
        return false;
    for (const char *p = text; *p; p++) {
        if (!isdigit((unsigned char)*p) && *p != '.')
            return false;
    }
    errno = 0;
    v = strtod(text, &end);
    if (errno || *end || !isfinite(v) || v > max || v < 0 || (!allow_zero && v <= 0))
        return false;
    *out = v;
    return true;
}

int request_parse_options(const char *timeout, const char *priority, const char *idempotency_key,
                          int64_t default_timeout_ms, request_options_t *out, gw_reply_t *r)
{
    memset(out, 0, sizeof *out);
    out->timeout_ms = default_timeout_ms > 0 ? default_timeout_ms : 1;

    if (timeout) {
        double s;

        if (!request_parse_seconds(timeout, REQUEST_MAX_TIMEOUT_S, false, &s)) {
            errors_reply(r, 400, "invalid_header",
                         "X-Request-Timeout must be a number of seconds greater than 0 and at most %.0f",
                         REQUEST_MAX_TIMEOUT_S);
            return -1;
        }
        out->timeout_ms = (int64_t)ceil(s * 1000.0);
        if (out->timeout_ms < 1)
            out->timeout_ms = 1;
        out->timeout_given = true;
    }
    if (priority) {
        const char *p = priority;
        size_t digits = 0;
        char *end;
        long v;

        if (*p == '-' || *p == '+')
            p++;
        for (; p[digits]; digits++) {
            if (!isdigit((unsigned char)p[digits]))
                break;
        }
        v = strtol(priority, &end, 10);
        if (digits == 0 || digits > 9 || p[digits] != '\0' || *end) {
            errors_reply(r, 400, "invalid_header", "X-Priority must be an integer of at most 9 digits");
            return -1;
        }
        out->has_priority = true;
        out->priority = (int32_t)v;
    }
    if (idempotency_key) {
        size_t len = strlen(idempotency_key);
        bool ok = len >= 1 && len <= 255;

        for (size_t i = 0; ok && i < len; i++)
            ok = idempotency_key[i] >= 0x20 && idempotency_key[i] <= 0x7e;
        if (!ok) {
            errors_reply(r, 400, "invalid_header",
                         "Idempotency-Key must be 1 to 255 printable ASCII characters");
            return -1;
        }
        out->idempotency_key = idempotency_key;
    }
    return 0;
}

bool request_endpoint_ok(const char *endpoint)
{
    /* The inference surface only: a job must not reach a model server's admin paths
     * (Ollama's /api/pull, llama.cpp's /slots, ...). */
    static const char *const allowed[] = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"};

    if (!endpoint)
        return false;
    for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
        if (strcmp(endpoint, allowed[i]) == 0)
            return true;
    return false;
}

/* Parses the body; NULL with r filled when it is not a JSON object. */
static json_t *request_parse_object(const char *body, size_t len, gw_reply_t *r)
{
    json_error_t jerr;
    json_t *root;

    if (!body || len == 0) {
        errors_reply(r, 400, "invalid_json", "request body is empty; expected a JSON object");
        return NULL;
    }
    /* jansson 2.14 skips a NUL byte that follows a number ("{\"n\":1\0}" parses), but
     * the body is embedded as sent and goes to PostgreSQL as a C string: refuse it
     * here, or the whole batched submit fails. No valid JSON text holds a raw NUL. */
    if (memchr(body, '\0', len) != NULL) {
        errors_reply(r, 400, "invalid_json", "request body is not valid JSON: it contains a NUL byte");
        return NULL;
    }
    /* Big integers are fine (they are passed on as sent); duplicate keys are too. */
    root = json_loadb(body, len, JSON_DECODE_INT_AS_REAL | JSON_DECODE_ANY, &jerr);
    if (!root) {
        errors_reply(r, 400, "invalid_json", "request body is not valid JSON: %s (line %d, column %d)",
                     jerr.text, jerr.line, jerr.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        errors_reply(r, 400, "invalid_request", "request body must be a JSON object");
        json_decref(root);
        return NULL;
    }
    return root;
}

/* A model name as the control plane takes it, or NULL with r filled. */
static const char *request_model(json_t *holder, const char *where, gw_reply_t *r)
{
    json_t *model = json_object_get(holder, "model");
    size_t len;

    if (!model) {
        errors_reply(r, 400, "missing_model", "missing required field \"model\"%s", where);
        return NULL;
    }
    if (!json_is_string(model)) {
        errors_reply(r, 400, "invalid_model", "\"model\"%s must be a string", where);
        return NULL;
    }
    len = json_string_length(model);
    if (len < 1 || len > 256 || strlen(json_string_value(model)) != len) {
        errors_reply(r, 400, "invalid_model", "\"model\"%s must be 1 to 256 characters", where);
        return NULL;
    }
    return json_string_value(model);
}

/* {"model":..,"endpoint":..,"payload":<raw>,"timeout_ms":..,"priority":..,"idempotency_key":..} */
static int request_element(const char *model, const char *endpoint, const char *payload,
                           size_t payload_len, const request_options_t *opt, bool with_timeout,
                           char **element, size_t *element_len, gw_reply_t *r)
{
    buf_t b = BUF_INIT;

    buf_append_str(&b, "{\"model\":");
    buf_append_json_string(&b, model, strlen(model));
    buf_append_str(&b, ",\"endpoint\":");
    buf_append_json_string(&b, endpoint, strlen(endpoint));
    buf_append_str(&b, ",\"payload\":");
    buf_append(&b, payload, payload_len);
    if (with_timeout)
        buf_printf(&b, ",\"timeout_ms\":%lld", (long long)opt->timeout_ms);
    if (opt->has_priority)
        buf_printf(&b, ",\"priority\":%d", (int)opt->priority);
    if (opt->idempotency_key) {
        buf_append_str(&b, ",\"idempotency_key\":");
        buf_append_json_string(&b, opt->idempotency_key, strlen(opt->idempotency_key));
    }
    buf_append_char(&b, '}');
    if (b.oom) {
        buf_free(&b);
        errors_reply(r, 500, "internal_error", "out of memory");
        return -1;
    }
    *element = b.data;
    *element_len = b.len;
    return 0;
}

bool request_add_stream_token(char **element, size_t *element_len, const char *token)
{
    static const char key[] = ",\"stream_token\":\"";
    size_t tlen = token ? strlen(token) : 0, len = *element_len, add;
    char *e = *element, *grown;

    if (tlen < 1 || tlen > 64 || !e || len < 2 || e[len - 1] != '}')
        return false;
    for (size_t i = 0; i < tlen; i++)
        if (!isalnum((unsigned char)token[i]) || (unsigned char)token[i] > 127)
            return false;
    /* "{}" takes no leading comma. */
    add = (len == 2 ? sizeof key - 2 : sizeof key - 1) + tlen + 2;
    grown = realloc(e, len + add + 1);
    if (!grown)
        return false;
    if (len == 2)
        memcpy(grown + 1, key + 1, sizeof key - 2);
    else
        memcpy(grown + len - 1, key, sizeof key - 1);
    len += (len == 2 ? sizeof key - 2 : sizeof key - 1) - 1;
    memcpy(grown + len, token, tlen);
    len += tlen;
    memcpy(grown + len, "\"}", 3);
    len += 2;
    *element = grown;
    *element_len = len;
    return true;
}

bool request_endpoint_streams(const char *endpoint)
{
    size_t n = endpoint ? strlen(endpoint) : 0;

    return n >= 12 && strcmp(endpoint + n - 12, "/completions") == 0;
}

/* "max_tokens" on the completion routes: absent, null, or a whole number from 1 to
 * INT32_MAX (numbers are decoded as reals here). Anything else is the client's
 * mistake, refused before it becomes a job; 0 otherwise, -1 with r filled. */
static int request_check_max_tokens(json_t *root, const char *endpoint, gw_reply_t *r)
{
    json_t *mt = json_object_get(root, "max_tokens");
    double v;

    if (!mt || json_is_null(mt) || !request_endpoint_streams(endpoint))
        return 0;
    v = json_is_number(mt) ? json_number_value(mt) : 0.0;
    if (v >= 1.0 && v <= 2147483647.0 && v == floor(v))
        return 0;
    errors_reply(r, 400, "invalid_request", "\"max_tokens\" must be an integer from 1 to 2147483647");
    return -1;
}

int request_build_openai(const char *body, size_t len, const char *endpoint,
                         const request_options_t *opt, char **element, size_t *element_len,
                         bool *stream, gw_reply_t *r)
{
    json_t *root = request_parse_object(body, len, r);
    const char *model;
    json_t *st;
    int rc = -1;

    *stream = false;
    if (!root)
        return -1;
    model = request_model(root, "", r);
    if (!model)
        goto out;
    st = json_object_get(root, "stream");
    if (st && !json_is_boolean(st) && !json_is_null(st)) {
        errors_reply(r, 400, "invalid_request", "\"stream\" must be true or false");
        goto out;
    }
    if (json_is_true(st)) {
        if (!request_endpoint_streams(endpoint)) {
            errors_reply(r, 400, "stream_unsupported", "\"stream\": true is not supported on %s", endpoint);
            goto out;
        }
        *stream = true;
    }
    if (request_check_max_tokens(root, endpoint, r) != 0)
        goto out;
    rc = request_element(model, endpoint, body, len, opt, true, element, element_len, r);
out:
    json_decref(root);
    return rc;
}

int request_build_job(const char *body, size_t len, const request_options_t *opt, char **element,
                      size_t *element_len, gw_reply_t *r)
{
    json_t *root = request_parse_object(body, len, r);
    json_t *payload, *ep;
    const char *model, *endpoint = REQUEST_DEFAULT_ENDPOINT;
    char *text = NULL;
    int rc = -1;

    if (!root)
        return -1;
    payload = json_object_get(root, "payload");
    if (!payload) {
        /* A plain OpenAI body: queued for /v1/chat/completions as sent. */
        model = request_model(root, "", r);
        if (model)
            rc = request_element(model, endpoint, body, len, opt, opt->timeout_given, element,
                                 element_len, r);
        goto out;
    }
    if (!json_is_object(payload)) {
        errors_reply(r, 400, "invalid_request", "\"payload\" must be a JSON object");
        goto out;
    }
    ep = json_object_get(root, "endpoint");
    if (ep && !json_is_null(ep)) {
        if (!json_is_string(ep) || !request_endpoint_ok(json_string_value(ep))) {
            errors_reply(r, 400, "invalid_endpoint",
                         "\"endpoint\" must be /v1/chat/completions, /v1/completions or /v1/embeddings");
            goto out;
        }
        endpoint = json_string_value(ep);
    }
    if (json_object_get(root, "model"))
        model = request_model(root, "", r);
    else
        model = request_model(payload, " (in the job or its payload)", r);
    if (!model)
        goto out;
    text = json_dumps(payload, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text) {
        errors_reply(r, 500, "internal_error", "out of memory");
        goto out;
    }
    rc = request_element(model, endpoint, text, strlen(text), opt, opt->timeout_given, element,
                         element_len, r);
out:
    free(text);
    json_decref(root);
    return rc;
}

bool request_parse_job_path(const char *url, int64_t *id)
{
    static const char prefix[] = "/v1/jobs/";
    const char *p;
    int64_t v = 0;

    if (!url || strncmp(url, prefix, sizeof prefix - 1) != 0)
        return false;
    p = url + sizeof prefix - 1;
    if (!*p)
        return false;
    for (; *p; p++) {
        if (!isdigit((unsigned char)*p))
            return false;
        if (v > (INT64_MAX - (*p - '0')) / 10)
            return false;
        v = v * 10 + (*p - '0');
    }
    if (v <= 0)
        return false;
    *id = v;
    return true;
}

bool request_parse_wait(const char *value, int64_t *wait_ms)
{
    double s;

    if (!value) {
        *wait_ms = 0;
        return true;
    }
    if (!request_parse_seconds(value, REQUEST_MAX_WAIT_S, true, &s))
        return false;
    *wait_ms = (int64_t)ceil(s * 1000.0);
    return true;
}

bool request_bearer_token(const char *value, const char **token, size_t *len)
{
    const char *p;
    size_t n;

    if (!value || strncasecmp(value, "Bearer", 6) != 0 || (value[6] != ' ' && value[6] != '\t'))
        return false;
    p = value + 6;
    while (*p == ' ' || *p == '\t')
        p++;
    n = strlen(p);
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    if (n < 1 || n > 512)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (p[i] <= 0x20 || p[i] > 0x7e)
            return false;
    }
    *token = p;
    *len = n;
    return true;
}
