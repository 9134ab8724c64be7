/* Unit tests for src/gateway/request.c: content type, option headers, OpenAI and job
 * bodies to submit elements (the body embedded byte for byte), a stream token added
 * to an element, job paths, long-poll waits and bearer tokens. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "errors.h"
#include "request.h"

static request_options_t default_options(void)
{
    request_options_t o;
    gw_reply_t r = {0};

    assert_int_equal(request_parse_options(NULL, NULL, NULL, 300000, &o, &r), 0);
    return o;
}

/* The error code of a refusal, checked to be a well-formed OpenAI error. */
static void assert_refused(gw_reply_t *r, int status, const char *code)
{
    json_t *doc = json_loads(r->body, 0, NULL);
    json_t *err = json_object_get(doc, "error");

    assert_int_equal(r->status, status);
    assert_non_null(err);
    assert_non_null(json_string_value(json_object_get(err, "message")));
    assert_non_null(json_string_value(json_object_get(err, "type")));
    assert_string_equal(json_string_value(json_object_get(err, "code")), code);
    json_decref(doc);
    errors_reply_clear(r);
}

static void test_content_type(void **state)
{
    (void)state;
    assert_true(request_content_type_ok("application/json"));
    assert_true(request_content_type_ok("Application/JSON; charset=utf-8"));
    assert_true(request_content_type_ok("application/json ;charset=UTF-8"));
    assert_false(request_content_type_ok(NULL));
    assert_false(request_content_type_ok(""));
    assert_false(request_content_type_ok("text/plain"));
    assert_false(request_content_type_ok("application/jsonx"));
    assert_false(request_content_type_ok("application/json-patch+json"));
}

static void test_options(void **state)
{
    request_options_t o;
    gw_reply_t r = {0};

    (void)state;
    o = default_options();
    assert_int_equal(o.timeout_ms, 300000);
    assert_false(o.timeout_given);
    assert_false(o.has_priority);
    assert_null(o.idempotency_key);

    assert_int_equal(request_parse_options("1.5", "-7", "k-1", 300000, &o, &r), 0);
    assert_int_equal(o.timeout_ms, 1500);
    assert_true(o.timeout_given);
    assert_true(o.has_priority);
    assert_int_equal(o.priority, -7);
    assert_string_equal(o.idempotency_key, "k-1");

    assert_int_equal(request_parse_options("0.0001", NULL, NULL, 1, &o, &r), 0);
    assert_int_equal(o.timeout_ms, 1);

    static const char *const bad_timeouts[] = {"0", "-1", "abc", "1e3", "", "86401", "nan", "1 "};
    for (size_t i = 0; i < sizeof bad_timeouts / sizeof bad_timeouts[0]; i++) {
        assert_int_equal(request_parse_options(bad_timeouts[i], NULL, NULL, 1000, &o, &r), -1);
        assert_refused(&r, 400, "invalid_header");
    }
    static const char *const bad_priorities[] = {"high", "", "1.5", "1234567890", "+", "5 "};
    for (size_t i = 0; i < sizeof bad_priorities / sizeof bad_priorities[0]; i++) {
        assert_int_equal(request_parse_options(NULL, bad_priorities[i], NULL, 1000, &o, &r), -1);
        assert_refused(&r, 400, "invalid_header");
    }
    {
        char long_key[300];

        memset(long_key, 'k', sizeof long_key - 1);
        long_key[sizeof long_key - 1] = '\0';
        assert_int_equal(request_parse_options(NULL, NULL, long_key, 1000, &o, &r), -1);
        assert_refused(&r, 400, "invalid_header");
        long_key[255] = '\0';
        assert_int_equal(request_parse_options(NULL, NULL, long_key, 1000, &o, &r), 0);
    }
    assert_int_equal(request_parse_options(NULL, NULL, "tab\tkey", 1000, &o, &r), -1);
    assert_refused(&r, 400, "invalid_header");
    assert_int_equal(request_parse_options(NULL, NULL, "", 1000, &o, &r), -1);
    assert_refused(&r, 400, "invalid_header");
}

static void test_openai_element_embeds_the_body(void **state)
{
    static const char body[] = "{ \"model\" : \"llama\\/3\",\n \"messages\": [], \"x\": 1.50, \"n\": 123456789012345678901234 }";
    request_options_t o = default_options();
    gw_reply_t r = {0};
    char *element = NULL;
    size_t len = 0;
    json_t *doc;

    (void)state;
    o.has_priority = true;
    o.priority = 5;
    o.idempotency_key = "key \"quoted\"";
    bool stream = true;

    assert_int_equal(request_build_openai(body, strlen(body), "/v1/completions", &o, &element, &len, &stream, &r), 0);
    assert_false(stream);
    assert_int_equal(len, strlen(element));
    /* The payload is the body's bytes, not a re-serialization. */
    assert_non_null(strstr(element, body));
    doc = json_loads(element, JSON_DECODE_INT_AS_REAL, NULL);
    assert_non_null(doc);
    assert_string_equal(json_string_value(json_object_get(doc, "model")), "llama/3");
    assert_string_equal(json_string_value(json_object_get(doc, "endpoint")), "/v1/completions");
    /* (decoded with ints as reals because the body holds a huge integer) */
    assert_true(json_number_value(json_object_get(doc, "timeout_ms")) == 300000.0);
    assert_true(json_number_value(json_object_get(doc, "priority")) == 5.0);
    assert_string_equal(json_string_value(json_object_get(doc, "idempotency_key")), "key \"quoted\"");
    assert_true(json_is_object(json_object_get(doc, "payload")));
    json_decref(doc);
    free(element);
}

static void test_stream_token_added(void **state)
{
    static const char body[] = "{\"model\":\"m\",\"stream\":true,\"messages\":[{\"content\":\"}\"}]}";
    request_options_t o = default_options();
    gw_reply_t r = {0};
    char *element = NULL, *before;
    size_t len = 0, before_len;
    bool stream = false;
    json_t *doc;

    (void)state;
    assert_int_equal(request_build_openai(body, strlen(body), "/v1/chat/completions", &o, &element, &len, &stream, &r),
                     0);
    assert_true(stream);
    before = strdup(element);
    before_len = len;
    assert_true(request_add_stream_token(&element, &len, "abcDEF0123456789xyzXYZ00"));
    assert_int_equal(len, strlen(element));
    assert_int_equal(len, before_len + strlen(",\"stream_token\":\"abcDEF0123456789xyzXYZ00\""));
    /* The rest is as it was: the body still byte for byte. */
    assert_memory_equal(element, before, before_len - 1);
    assert_non_null(strstr(element, body));
    doc = json_loads(element, 0, NULL);
    assert_non_null(doc);
    assert_string_equal(json_string_value(json_object_get(doc, "stream_token")), "abcDEF0123456789xyzXYZ00");
    assert_string_equal(json_string_value(json_object_get(doc, "model")), "m");
    json_decref(doc);

    /* Refused, the element unchanged: no token, too long, not letters and digits. */
    static const char *const bad[] = {
        "", "abc\"def", "abc def1", "abc-def1", "tok\xc3\xa9n123",
        "12345678901234567890123456789012345678901234567890123456789012345",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *same = element;
        size_t same_len = len;

        assert_false(request_add_stream_token(&element, &len, bad[i]));
        assert_ptr_equal(element, same);
        assert_int_equal(len, same_len);
    }
    assert_false(request_add_stream_token(&element, &len, NULL));
    free(element);
    free(before);

    /* An empty object takes no leading comma; what is not an object is refused. */
    element = strdup("{}");
    len = 2;
    assert_true(request_add_stream_token(&element, &len, "t0k3n999"));
    assert_string_equal(element, "{\"stream_token\":\"t0k3n999\"}");
    assert_int_equal(len, strlen(element));
    free(element);
    element = strdup("[1]");
    len = 3;
    assert_false(request_add_stream_token(&element, &len, "t0k3n999"));
    assert_string_equal(element, "[1]");
    free(element);
    element = NULL;
    len = 0;
    assert_false(request_add_stream_token(&element, &len, "t0k3n999"));
}

static void test_openai_refusals(void **state)
{
    static const struct {
        const char *body;
        const char *code;
    } cases[] = {
        {"", "invalid_json"},
        {"{", "invalid_json"},
        {"{\"model\": \"m\"} x", "invalid_json"},
        {"{\"model\": \"m\", \"s\": \"\xc3\x28\"}", "invalid_json"},
        {"{\"model\": \"m\\u0000x\"}", "invalid_json"},
        {"[]", "invalid_request"},
        {"null", "invalid_request"},
        {"42", "invalid_request"},
        {"{}", "missing_model"},
        {"{\"model\": null}", "invalid_model"},
        {"{\"model\": [\"m\"]}", "invalid_model"},
        {"{\"model\": \"\"}", "invalid_model"},
        {"{\"model\": \"m\", \"stream\": \"yes\"}", "invalid_request"},
        {"{\"model\": \"m\", \"stream\": 1}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": \"100\"}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": {}}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": true}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": 0}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": -1}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": 1.5}", "invalid_request"},
        {"{\"model\": \"m\", \"max_tokens\": 2147483648}", "invalid_request"},
    };
    bool stream;
    request_options_t o = default_options();

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gw_reply_t r = {0};
        char *element = NULL;
        size_t len = 0;

        assert_int_equal(request_build_openai(cases[i].body, strlen(cases[i].body), REQUEST_DEFAULT_ENDPOINT, &o,
                                              &element, &len, &stream, &r),
                         -1);
        assert_null(element);
        assert_refused(&r, 400, cases[i].code);
    }
    {
        /* A model name of 257 characters, and nesting deeper than the parser allows. */
        char body[400];
        size_t depth = 5000;
        char *deep = malloc(2 * depth + 1);
        gw_reply_t r = {0};
        char *element = NULL;
        size_t len;

        snprintf(body, sizeof body, "{\"model\": \"%0257d\"}", 0);
        assert_int_equal(request_build_openai(body, strlen(body), "/v1/x", &o, &element, &len, &stream, &r), -1);
        assert_refused(&r, 400, "invalid_model");
        memset(deep, '[', depth);
        memset(deep + depth, ']', depth);
        deep[2 * depth] = '\0';
        assert_int_equal(request_build_openai(deep, 2 * depth, "/v1/x", &o, &element, &len, &stream, &r), -1);
        assert_refused(&r, 400, "invalid_json");
        free(deep);
    }
    {
        /* A whole max_tokens (or null) is fine; embeddings do not check it. */
        static const char *const ok[][2] = {
            {"{\"model\": \"m\", \"max_tokens\": 1}", "/v1/completions"},
            {"{\"model\": \"m\", \"max_tokens\": 2147483647}", "/v1/chat/completions"},
            {"{\"model\": \"m\", \"max_tokens\": null}", "/v1/chat/completions"},
            {"{\"model\": \"m\", \"max_tokens\": \"x\"}", "/v1/embeddings"},
        };

        for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
            gw_reply_t r = {0};
            char *element = NULL;
            size_t len;

            assert_int_equal(request_build_openai(ok[i][0], strlen(ok[i][0]), ok[i][1], &o, &element, &len, &stream,
                                                  &r),
                             0);
            free(element);
        }
    }
    {
        /* "stream": false is fine. */
        static const char ok[] = "{\"model\": \"m\", \"stream\": false}";
        gw_reply_t r = {0};
        char *element = NULL;
        size_t len;

        assert_int_equal(request_build_openai(ok, strlen(ok), "/v1/x", &o, &element, &len, &stream, &r), 0);
        assert_false(stream);
        free(element);
    }
    {
        /* "stream": true on chat and text completions; refused where nothing streams. */
        static const char on[] = "{\"model\": \"m\", \"stream\": true, \"messages\": []}";
        gw_reply_t r = {0};
        char *element = NULL;
        size_t len;

        assert_int_equal(request_build_openai(on, strlen(on), "/v1/chat/completions", &o, &element, &len, &stream, &r),
                         0);
        assert_true(stream);
        assert_non_null(strstr(element, on));   /* the payload is still the body as sent */
        free(element);
        element = NULL;
        stream = false;
        assert_int_equal(request_build_openai(on, strlen(on), "/v1/completions", &o, &element, &len, &stream, &r), 0);
        assert_true(stream);
        free(element);
        element = NULL;
        assert_int_equal(request_build_openai(on, strlen(on), "/v1/embeddings", &o, &element, &len, &stream, &r), -1);
        assert_null(element);
        assert_refused(&r, 400, "stream_unsupported");
    }
}

static json_t *build_job(const char *body, const request_options_t *o, gw_reply_t *r)
{
    char *element = NULL;
    size_t len;
    json_t *doc;

    if (request_build_job(body, strlen(body), o, &element, &len, r) != 0)
        return NULL;
    doc = json_loads(element, 0, NULL);
    free(element);
    assert_non_null(doc);
    return doc;
}

static void test_job_bodies(void **state)
{
    request_options_t o = default_options();
    gw_reply_t r = {0};
    json_t *doc;

    (void)state;
    doc = build_job("{\"model\": \"m\", \"endpoint\": \"/v1/embeddings\", \"payload\": {\"input\": \"x\"}}", &o, &r);
    assert_non_null(doc);
    assert_string_equal(json_string_value(json_object_get(doc, "model")), "m");
    assert_string_equal(json_string_value(json_object_get(doc, "endpoint")), "/v1/embeddings");
    assert_string_equal(json_string_value(json_object_get(json_object_get(doc, "payload"), "input")), "x");
    /* No X-Request-Timeout: an async job has no deadline. */
    assert_null(json_object_get(doc, "timeout_ms"));
    json_decref(doc);

    /* Model from the payload, default endpoint. */
    doc = build_job("{\"payload\": {\"model\": \"p\", \"messages\": []}}", &o, &r);
    assert_string_equal(json_string_value(json_object_get(doc, "model")), "p");
    assert_string_equal(json_string_value(json_object_get(doc, "endpoint")), "/v1/chat/completions");
    json_decref(doc);

    /* A plain OpenAI body is a chat job; a given timeout is kept. */
    o.timeout_given = true;
    o.timeout_ms = 2500;
    doc = build_job("{\"model\": \"q\", \"messages\": []}", &o, &r);
    assert_string_equal(json_string_value(json_object_get(doc, "model")), "q");
    assert_string_equal(json_string_value(json_object_get(json_object_get(doc, "payload"), "model")), "q");
    assert_int_equal(json_integer_value(json_object_get(doc, "timeout_ms")), 2500);
    json_decref(doc);

    assert_null(build_job("{\"model\": \"m\", \"payload\": [1]}", &o, &r));
    assert_refused(&r, 400, "invalid_request");
    assert_null(build_job("{\"model\": \"m\", \"endpoint\": \"v1/x\", \"payload\": {}}", &o, &r));
    assert_refused(&r, 400, "invalid_endpoint");
    assert_null(build_job("{\"model\": \"m\", \"endpoint\": \"/v1/x?y=1\", \"payload\": {}}", &o, &r));
    assert_refused(&r, 400, "invalid_endpoint");
    assert_null(build_job("{\"model\": \"m\", \"endpoint\": \"/api/pull\", \"payload\": {}}", &o, &r));
    assert_refused(&r, 400, "invalid_endpoint");
    assert_null(build_job("{\"endpoint\": \"/v1/completions\", \"payload\": {}}", &o, &r));
    assert_refused(&r, 400, "missing_model");
    assert_null(build_job("{\"model\": 1, \"payload\": {\"model\": \"m\"}}", &o, &r));
    assert_refused(&r, 400, "invalid_model");
}

static void test_endpoint_and_paths(void **state)
{
    int64_t id = 0, wait = -1;

    (void)state;
    assert_true(request_endpoint_ok("/v1/chat/completions"));
    assert_true(request_endpoint_ok("/v1/completions"));
    assert_true(request_endpoint_ok("/v1/embeddings"));
    assert_false(request_endpoint_ok("/"));
    assert_false(request_endpoint_ok("/api/pull"));
    assert_false(request_endpoint_ok("/_fake/config"));
    assert_false(request_endpoint_ok("/v1/chat/completions/.."));
    assert_false(request_endpoint_ok("v1"));
    assert_false(request_endpoint_ok("/v1/a b"));
    assert_false(request_endpoint_ok(NULL));

    assert_true(request_parse_job_path("/v1/jobs/42", &id));
    assert_int_equal(id, 42);
    assert_true(request_parse_job_path("/v1/jobs/9223372036854775807", &id));
    assert_int_equal(id, INT64_MAX);
    assert_false(request_parse_job_path("/v1/jobs/9223372036854775808", &id));
    assert_false(request_parse_job_path("/v1/jobs/0", &id));
    assert_false(request_parse_job_path("/v1/jobs/", &id));
    assert_false(request_parse_job_path("/v1/jobs/-1", &id));
    assert_false(request_parse_job_path("/v1/jobs/12/x", &id));
    assert_false(request_parse_job_path("/v1/jobsx/1", &id));

    assert_true(request_parse_wait(NULL, &wait));
    assert_int_equal(wait, 0);
    assert_true(request_parse_wait("2.5", &wait));
    assert_int_equal(wait, 2500);
    assert_true(request_parse_wait("0", &wait));
    assert_int_equal(wait, 0);
    assert_false(request_parse_wait("601", &wait));
    assert_false(request_parse_wait("-1", &wait));
    assert_false(request_parse_wait("soon", &wait));
}

static void test_bearer_token(void **state)
{
    const char *token;
    size_t len;

    (void)state;
    assert_true(request_bearer_token("Bearer abc.def", &token, &len));
    assert_int_equal(len, 7);
    assert_memory_equal(token, "abc.def", 7);
    assert_true(request_bearer_token("bearer   xyz  ", &token, &len));
    assert_int_equal(len, 3);
    assert_false(request_bearer_token(NULL, &token, &len));
    assert_false(request_bearer_token("Basic abc", &token, &len));
    assert_false(request_bearer_token("Bearer", &token, &len));
    assert_false(request_bearer_token("Bearer ", &token, &len));
    assert_false(request_bearer_token("Bearerabc", &token, &len));
    assert_false(request_bearer_token("Bearer a b", &token, &len));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_content_type),
        cmocka_unit_test(test_options),
        cmocka_unit_test(test_openai_element_embeds_the_body),
        cmocka_unit_test(test_stream_token_added),
        cmocka_unit_test(test_openai_refusals),
        cmocka_unit_test(test_job_bodies),
        cmocka_unit_test(test_endpoint_and_paths),
        cmocka_unit_test(test_bearer_token),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
