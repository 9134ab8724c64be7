/* errors: SQLSTATE and job outcome to HTTP status, and the OpenAI error body. The
 * provider's own 4xx answers pass through unchanged; everything the gateway says
 * itself is {"error": {"message", "type", "code"}}. */
#include "errors.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "db.h"

char *errors_body(const char *message, const char *type, const char *code)
{
    buf_t b = BUF_INIT;

    buf_append_str(&b, "{\"error\":{\"message\":");
    buf_append_json_string(&b, message ? message : "", message ? strlen(message) : 0);
    buf_append_str(&b, ",\"type\":");
    if (type)
        buf_append_json_string(&b, type, strlen(type));
    else
        buf_append_str(&b, "null");
    buf_append_str(&b, ",\"code\":");
    if (code)
        buf_append_json_string(&b, code, strlen(code));
    else
        buf_append_str(&b, "null");
    buf_append_str(&b, "}}");
    if (b.oom) {
        buf_free(&b);
        return NULL;
    }
    return b.data;
}

const char *errors_type_for_status(int status)
{
    if (status == 401 || status == 403)
        return "authentication_error";
    if (status == 429)
        return "rate_limit_error";
    if (status == 504)
        return "timeout_error";
    if (status >= 500)
        return "server_error";
    return "invalid_request_error";
}

void errors_reply_clear(gw_reply_t *r)
{
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* The body is set from a finished string: an out-of-memory body falls back to a
 * static-free empty object so the status still goes out. */
static void errors_set(gw_reply_t *r, int status, const char *code, const char *message)
{
    errors_reply_clear(r);
    r->status = status;
    r->body = errors_body(message, errors_type_for_status(status), code);
    r->body_len = r->body ? strlen(r->body) : 0;
}

void errors_reply(gw_reply_t *r, int status, const char *code, const char *fmt, ...)
{
    char message[2048];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    errors_set(r, status, code, message);
}

/* The SQLSTATEs the control plane raises on purpose, with the HTTP status and code
 * each one answers; retry: the client is told when to try again (Retry-After). */
static const struct sqlstate_answer {
    const char *sqlstate;
    int status;
    const char *code;
    bool retry;
} sqlstate_answers[] = {
    {"22023", 400, "invalid_request", false},
    {"PD001", 404, "model_not_found", false},
    {"PD002", 503, "no_live_node", true},
    {"PD003", 429, "queue_full", true},
    {"PD007", 404, "not_found", false},
    {"PD008", 409, "idempotency_key_reused", false},
};

static const struct sqlstate_answer lost_answer = {NULL, 503, "database_unavailable", false};
static const struct sqlstate_answer busy_answer = {NULL, 503, "database_busy", true};
static const struct sqlstate_answer internal_answer = {NULL, 500, "internal_error", false};

/* A lost session is told apart first: it is also what a NULL SQLSTATE means. */
static const struct sqlstate_answer *errors_answer_for_sqlstate(const char *sqlstate)
{
    if (db_sqlstate_session_lost(sqlstate))
        return &lost_answer;
    for (size_t i = 0; i < sizeof sqlstate_answers / sizeof sqlstate_answers[0]; i++)
        if (strcmp(sqlstate, sqlstate_answers[i].sqlstate) == 0)
            return &sqlstate_answers[i];
    if (db_sqlstate_transient(sqlstate))
        return &busy_answer;
    return &internal_answer;
}

int errors_status_for_sqlstate(const char *sqlstate)
{
    return errors_answer_for_sqlstate(sqlstate)->status;
}

void errors_reply_sqlstate(gw_reply_t *r, const char *sqlstate, const char *message)
{
    const struct sqlstate_answer *answer = errors_answer_for_sqlstate(sqlstate);

    if (!message || !*message)
        message = answer->status == 503 ? "the database is unavailable; try again" : "request refused";
    errors_set(r, answer->status, answer->code, message);
    if (answer->retry)
        r->retry_after_s = 1;
}

bool errors_state_is_final(const char *state)
{
    return state && (strcmp(state, "succeeded") == 0 || strcmp(state, "failed") == 0 ||
                     strcmp(state, "cancelled") == 0 || strcmp(state, "expired") == 0);
}

/* Takes the body of a provider's 4xx as it came: a JSON string holds the raw text,
 * anything else (the daemon may have kept parsed JSON) is serialized back. */
static bool errors_take_provider_body(gw_reply_t *r, json_t *body)
{
    if (json_is_string(body)) {
        size_t len = json_string_length(body);
        char *copy = malloc(len + 1);

        if (!copy)
            return false;
        memcpy(copy, json_string_value(body), len);
        copy[len] = '\0';
        r->body = copy;
        r->body_len = len;
    } else if (body && !json_is_null(body)) {
        r->body = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!r->body)
            return false;
        r->body_len = strlen(r->body);
    } else {
        return false;
    }
    /* A body that does not look like JSON is passed as plain text. */
    {
        const char *p = r->body;

        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
            p++;
        r->content_type = (*p == '{' || *p == '[') ? NULL : "text/plain; charset=utf-8";
    }
    return true;
}

bool errors_reply_outcome(gw_reply_t *r, int64_t job_id, const char *state, const char *result,
                          const char *error)
{
    json_t *err = NULL;
    const char *code = NULL, *message = NULL;
    json_int_t provider_status = 0;

    if (!errors_state_is_final(state))
        return false;

    if (strcmp(state, "succeeded") == 0) {
        size_t len = result ? strlen(result) : 4;
        char *copy = malloc(len + 1);

        errors_reply_clear(r);
        if (!copy) {
            errors_set(r, 500, "internal_error", "out of memory");
            return true;
        }
        memcpy(copy, result ? result : "null", len + 1);
        r->status = 200;
        r->body = copy;
        r->body_len = len;
        return true;
    }

    if (error)
        err = json_loads(error, JSON_DECODE_ANY, NULL);
    if (json_is_object(err)) {
        json_t *s = json_object_get(err, "status");

        code = json_string_value(json_object_get(err, "code"));
        message = json_string_value(json_object_get(err, "message"));
        if (json_is_integer(s))
            provider_status = json_integer_value(s);
        else if (json_is_real(s))
            provider_status = (json_int_t)json_real_value(s);
        else if (json_is_string(s))
            provider_status = strtol(json_string_value(s), NULL, 10);
    }

    if (strcmp(state, "expired") == 0) {
        errors_reply(r, 504, "deadline_exceeded", "job %lld: deadline passed before it finished%s%s",
                     (long long)job_id, message ? ": " : "", message ? message : "");
    } else if (strcmp(state, "cancelled") == 0) {
        errors_reply(r, 409, "cancelled", "job %lld was cancelled%s%s", (long long)job_id,
                     message ? ": " : "", message ? message : "");
    } else if (provider_status >= 400 && provider_status <= 499) {
        errors_reply_clear(r);
        if (!errors_take_provider_body(r, json_object_get(err, "body")))
            errors_set(r, (int)provider_status, code ? code : "provider_error",
                       message ? message : "the provider refused the request");
        r->status = (int)provider_status;
    } else {
        char what[64];

        if (provider_status > 0)
            snprintf(what, sizeof what, "%s (HTTP %lld)", code ? code : "provider_error",
                     (long long)provider_status);
        else
            snprintf(what, sizeof what, "%s", code ? code : "failed");
        errors_reply(r, 502, code ? code : "bad_gateway", "job %lld failed: %s%s%s", (long long)job_id,
                     what, message ? ": " : "", message ? message : "");
    }
    json_decref(err);
    return true;
}
