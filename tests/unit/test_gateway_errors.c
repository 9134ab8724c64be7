/* Unit tests for src/gateway/errors.c: the OpenAI error body, SQLSTATE to HTTP status,
 * and a finished job's state, result and error to the client's answer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "errors.h"

/* Parses an OpenAI error body and returns its "error" object's field. */
static char *error_field(const char *body, const char *field)
{
    json_t *doc = json_loads(body, 0, NULL);
    json_t *v;
    char *out = NULL;

    assert_non_null(doc);
    v = json_object_get(json_object_get(doc, "error"), field);
    if (json_is_string(v))
        out = strdup(json_string_value(v));
    json_decref(doc);
    return out;
}

static void test_body_shape_and_escaping(void **state)
{
    char *body = errors_body("bad \"thing\"\n\x01 here", "invalid_request_error", "bad_thing");
    char *v;

    (void)state;
    assert_non_null(body);
    v = error_field(body, "message");
    assert_string_equal(v, "bad \"thing\"\n\x01 here");
    free(v);
    v = error_field(body, "type");
    assert_string_equal(v, "invalid_request_error");
    free(v);
    v = error_field(body, "code");
    assert_string_equal(v, "bad_thing");
    free(v);
    free(body);

    body = errors_body("m", NULL, NULL);
    assert_string_equal(body, "{\"error\":{\"message\":\"m\",\"type\":null,\"code\":null}}");
    free(body);
}

static void test_types_by_status(void **state)
{
    (void)state;
    assert_string_equal(errors_type_for_status(400), "invalid_request_error");
    assert_string_equal(errors_type_for_status(404), "invalid_request_error");
    assert_string_equal(errors_type_for_status(401), "authentication_error");
    assert_string_equal(errors_type_for_status(429), "rate_limit_error");
    assert_string_equal(errors_type_for_status(502), "server_error");
    assert_string_equal(errors_type_for_status(503), "server_error");
    assert_string_equal(errors_type_for_status(504), "timeout_error");
}

static void test_sqlstate_mapping(void **state)
{
    static const struct {
        const char *sqlstate;
        int status;
        const char *code;
        int retry_after;
    } cases[] = {
        {"22023", 400, "invalid_request", 0},
        {"PD001", 404, "model_not_found", 0},
        {"PD002", 503, "no_live_node", 1},
        {"PD003", 429, "queue_full", 1},
        {"PD007", 404, "not_found", 0},
        {"PD008", 409, "idempotency_key_reused", 0},
        {"", 503, "database_unavailable", 0},
        {"08006", 503, "database_unavailable", 0},
        {"57P01", 503, "database_unavailable", 0},
        {"57P04", 503, "database_unavailable", 0},
        {"57P05", 503, "database_unavailable", 0},
        {"40P01", 503, "database_busy", 1},
        {"40001", 503, "database_busy", 1},
        {"55P03", 503, "database_busy", 1},
        {"57014", 503, "database_busy", 1},
        {"53300", 503, "database_busy", 1},
        {"55000", 500, "internal_error", 0},
        {"XX000", 500, "internal_error", 0},
    };

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gw_reply_t r = {0};
        char *code, *message;

        assert_int_equal(errors_status_for_sqlstate(cases[i].sqlstate), cases[i].status);
        errors_reply_sqlstate(&r, cases[i].sqlstate, "the database says no");
        assert_int_equal(r.status, cases[i].status);
        assert_int_equal(r.retry_after_s, cases[i].retry_after);
        assert_int_equal(r.body_len, strlen(r.body));
        code = error_field(r.body, "code");
        message = error_field(r.body, "message");
        assert_string_equal(code, cases[i].code);
        assert_string_equal(message, "the database says no");
        free(code);
        free(message);
        errors_reply_clear(&r);
        assert_null(r.body);
        assert_int_equal(r.status, 0);
    }
    assert_int_equal(errors_status_for_sqlstate(NULL), 503);
}

static void test_final_states(void **state)
{
    (void)state;
    assert_true(errors_state_is_final("succeeded"));
    assert_true(errors_state_is_final("failed"));
    assert_true(errors_state_is_final("cancelled"));
    assert_true(errors_state_is_final("expired"));
    assert_false(errors_state_is_final("queued"));
    assert_false(errors_state_is_final("leased"));
    assert_false(errors_state_is_final(NULL));
}

static void test_outcome_succeeded(void **state)
{
    gw_reply_t r = {0};

    (void)state;
    assert_true(errors_reply_outcome(&r, 7, "succeeded", "{\"choices\": []}", NULL));
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"choices\": []}");
    assert_null(r.content_type);
    errors_reply_clear(&r);

    assert_true(errors_reply_outcome(&r, 7, "succeeded", NULL, NULL));
    assert_string_equal(r.body, "null");
    errors_reply_clear(&r);

    assert_false(errors_reply_outcome(&r, 7, "leased", NULL, NULL));
    assert_int_equal(r.status, 0);
}

static void test_outcome_provider_4xx_passes_through(void **state)
{
    gw_reply_t r = {0};

    (void)state;
    /* Body kept as text by the daemon. */
    assert_true(errors_reply_outcome(&r, 1, "failed", NULL,
                                     "{\"code\": \"provider_4xx\", \"status\": 422, "
                                     "\"body\": \"{\\\"error\\\": {\\\"message\\\": \\\"no\\\"}}\"}"));
    assert_int_equal(r.status, 422);
    assert_string_equal(r.body, "{\"error\": {\"message\": \"no\"}}");
    assert_null(r.content_type);
    errors_reply_clear(&r);

    /* Body kept as JSON. */
    assert_true(errors_reply_outcome(&r, 1, "failed", NULL,
                                     "{\"status\": 400, \"body\": {\"error\": {\"message\": \"bad\"}}}"));
    assert_int_equal(r.status, 400);
    assert_string_equal(r.body, "{\"error\":{\"message\":\"bad\"}}");
    errors_reply_clear(&r);

    /* Not JSON at all: passed as text. */
    assert_true(errors_reply_outcome(&r, 1, "failed", NULL, "{\"status\": 404, \"body\": \"Not Found\"}"));
    assert_int_equal(r.status, 404);
    assert_string_equal(r.body, "Not Found");
    assert_non_null(r.content_type);
    assert_non_null(strstr(r.content_type, "text/plain"));
    errors_reply_clear(&r);

    /* No body: an OpenAI error with the provider's status. */
    assert_true(errors_reply_outcome(&r, 1, "failed", NULL,
                                     "{\"status\": 401, \"code\": \"provider_4xx\", \"message\": \"denied\"}"));
    assert_int_equal(r.status, 401);
    {
        char *m = error_field(r.body, "message");

        assert_string_equal(m, "denied");
        free(m);
    }
    errors_reply_clear(&r);
}

static void test_outcome_other_failures(void **state)
{
    gw_reply_t r = {0};
    char *m, *c;

    (void)state;
    assert_true(errors_reply_outcome(&r, 9, "failed", NULL,
                                     "{\"code\": \"provider_5xx\", \"status\": 503, \"message\": \"overloaded\"}"));
    assert_int_equal(r.status, 502);
    m = error_field(r.body, "message");
    c = error_field(r.body, "code");
    assert_non_null(strstr(m, "job 9 failed"));
    assert_non_null(strstr(m, "provider_5xx (HTTP 503)"));
    assert_non_null(strstr(m, "overloaded"));
    assert_string_equal(c, "provider_5xx");
    free(m);
    free(c);
    errors_reply_clear(&r);

    assert_true(errors_reply_outcome(&r, 9, "failed", NULL, "{\"code\": \"bad_response\", \"message\": \"not JSON\"}"));
    assert_int_equal(r.status, 502);
    m = error_field(r.body, "message");
    assert_non_null(strstr(m, "bad_response: not JSON"));
    free(m);
    errors_reply_clear(&r);

    /* A garbled or missing error still gives a clear 502. */
    assert_true(errors_reply_outcome(&r, 9, "failed", NULL, "not json"));
    assert_int_equal(r.status, 502);
    errors_reply_clear(&r);
    assert_true(errors_reply_outcome(&r, 9, "failed", NULL, NULL));
    assert_int_equal(r.status, 502);
    errors_reply_clear(&r);

    assert_true(errors_reply_outcome(&r, 9, "expired", NULL,
                                     "{\"code\": \"deadline_exceeded\", \"message\": \"deadline passed\"}"));
    assert_int_equal(r.status, 504);
    c = error_field(r.body, "code");
    assert_string_equal(c, "deadline_exceeded");
    free(c);
    errors_reply_clear(&r);

    assert_true(errors_reply_outcome(&r, 9, "cancelled", NULL, "{\"code\": \"cancelled\", \"message\": \"by user\"}"));
    assert_int_equal(r.status, 409);
    m = error_field(r.body, "message");
    assert_non_null(strstr(m, "cancelled: by user"));
    free(m);
    errors_reply_clear(&r);
}

static void test_reply_replaces_previous_body(void **state)
{
    gw_reply_t r = {0};

    (void)state;
    errors_reply(&r, 400, "a", "first %d", 1);
    errors_reply(&r, 503, "b", "second %s", "x");
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.body, "second x"));
    errors_reply_clear(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_body_shape_and_escaping),
        cmocka_unit_test(test_types_by_status),
        cmocka_unit_test(test_sqlstate_mapping),
        cmocka_unit_test(test_final_states),
        cmocka_unit_test(test_outcome_succeeded),
        cmocka_unit_test(test_outcome_provider_4xx_passes_through),
        cmocka_unit_test(test_outcome_other_failures),
        cmocka_unit_test(test_reply_replaces_previous_body),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
