/* Unit tests for daemon/provider.c's pure parts: the classification of provider
 * responses, health verdicts, and parsing of /props, /server_info and /v1/models. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "provider.h"

static provider_response_t http(long status, const char *body)
{
    provider_response_t r = { .curl_code = CURLE_OK, .status = status, .body = body, .body_len = strlen(body),
                              .curl_error = "", .size_limit = 1 << 20 };
    return r;
}

static provider_response_t transport(CURLcode code, const char *msg)
{
    provider_response_t r = { .curl_code = code, .body = "", .curl_error = msg, .size_limit = 1 << 20 };
    return r;
}

static void test_2xx_json_object_completes(void **state)
{
    provider_verdict_t v;
    provider_response_t r = http(200, "{\"id\":\"x\",\"choices\":[]}");

    (void)state;
    provider_classify(&r, &v);
    assert_true(v.complete);
    r = http(201, " {} ");
    provider_classify(&r, &v);
    assert_true(v.complete);
}

static void test_2xx_not_an_object_is_bad_response_not_retryable(void **state)
{
    const char *bodies[] = { "{\"id\": \"x\", \"choi", "<html>oops</html>", "[1,2]", "\"text\"", "{} trailing" };
    provider_verdict_t v;

    (void)state;
    for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++) {
        provider_response_t r = http(200, bodies[i]);
        provider_classify(&r, &v);
        assert_false(v.complete);
        assert_false(v.retryable);
        assert_string_equal(v.code, "bad_response");
        assert_int_equal(v.status, 200);
        assert_non_null(strstr(v.message, "HTTP 200"));
    }
    {
        provider_response_t r = http(200, "");
        provider_classify(&r, &v);
        assert_string_equal(v.code, "bad_response");
        assert_non_null(strstr(v.message, "empty body"));
    }
    {
        provider_response_t r = http(200, "{\"a\":1}");
        r.too_large = true;
        provider_classify(&r, &v);
        assert_string_equal(v.code, "bad_response");
        assert_non_null(strstr(v.message, "larger than"));
    }
}

static void test_4xx_not_retryable_with_provider_message(void **state)
{
    provider_verdict_t v;
    provider_response_t r = http(400, "{\"error\":{\"message\":\"context too long\",\"type\":\"invalid_request_error\"}}");

    (void)state;
    provider_classify(&r, &v);
    assert_false(v.complete);
    assert_false(v.retryable);
    assert_false(v.provider_unreachable);
    assert_string_equal(v.code, "provider_4xx");
    assert_int_equal(v.status, 400);
    assert_string_equal(v.message, "provider answered HTTP 400: context too long");
    r = http(404, "not found");
    provider_classify(&r, &v);
    assert_string_equal(v.message, "provider answered HTTP 404");
    r = http(429, "{\"error\":\"slow down\"}");
    provider_classify(&r, &v);
    assert_string_equal(v.code, "provider_4xx");
    assert_string_equal(v.message, "provider answered HTTP 429: slow down");
}

static void test_5xx_and_transport_failures_are_retryable(void **state)
{
    provider_verdict_t v;
    provider_response_t r = http(503, "{\"error\":{\"message\":\"overloaded\"}}");

    (void)state;
    provider_classify(&r, &v);
    assert_true(v.retryable);
    assert_string_equal(v.code, "provider_5xx");
    assert_false(v.provider_unreachable);
    r = transport(CURLE_COULDNT_CONNECT, "Failed to connect to 127.0.0.1 port 1: Connection refused");
    provider_classify(&r, &v);
    assert_true(v.retryable);
    assert_true(v.provider_unreachable);
    assert_string_equal(v.code, "connect_failed");
    assert_non_null(strstr(v.message, "Connection refused"));
    r = transport(CURLE_OPERATION_TIMEDOUT, "Operation timed out after 100 milliseconds");
    provider_classify(&r, &v);
    assert_true(v.retryable);
    assert_string_equal(v.code, "timeout");
    r = transport(CURLE_GOT_NOTHING, "Empty reply from server");
    provider_classify(&r, &v);
    assert_true(v.retryable);
    assert_string_equal(v.code, "transport_error");
    r = http(302, "");
    provider_classify(&r, &v);
    assert_false(v.retryable);
    assert_string_equal(v.code, "bad_response");
}

static void test_probe_health(void **state)
{
    char reason[256];
    provider_response_t r = http(200, "{\"status\":\"ok\"}");

    (void)state;
    assert_true(provider_probe_healthy(&r, reason, sizeof reason));
    r = http(404, "");      /* no health endpoint, but the server answers */
    assert_true(provider_probe_healthy(&r, reason, sizeof reason));
    r = http(503, "{\"error\":\"loading model\"}");
    assert_false(provider_probe_healthy(&r, reason, sizeof reason));
    assert_string_equal(reason, "health probe answered HTTP 503");
    r = transport(CURLE_COULDNT_CONNECT, "Connection refused");
    assert_false(provider_probe_healthy(&r, reason, sizeof reason));
    assert_string_equal(reason, "health probe failed: Connection refused");
}

static void test_capacity_parsing(void **state)
{
    const char props[] = "{\"default_generation_settings\":{\"n_ctx\":4096},\"total_slots\":8}";
    const char info[] = "{\"max_running_requests\":48,\"tp_size\":1}";
    const char nested[] = "{\"internal_states\":[{\"max_running_requests\":12}]}";

    (void)state;
    assert_int_equal(provider_parse_total_slots(props, strlen(props)), 8);
    assert_int_equal(provider_parse_total_slots("{}", 2), -1);
    assert_int_equal(provider_parse_total_slots("{\"total_slots\":0}", 17), -1);
    assert_int_equal(provider_parse_total_slots("{\"total_slots\":\"8\"}", 19), -1);
    assert_int_equal(provider_parse_total_slots("<html>", 6), -1);
    assert_int_equal(provider_parse_max_running(info, strlen(info)), 48);
    assert_int_equal(provider_parse_max_running(nested, strlen(nested)), 12);
    assert_int_equal(provider_parse_max_running("[]", 2), -1);
}

static void test_models_parsing(void **state)
{
    const char body[] = "{\"object\":\"list\",\"data\":[{\"id\":\"llama3\",\"object\":\"model\"},"
                        "{\"object\":\"model\"},{\"id\":\"meta/x:q4\"},{\"id\":\"\"}]}";
    char **ids;
    int n;

    (void)state;
    n = provider_parse_models(body, strlen(body), &ids);
    assert_int_equal(n, 2);
    assert_string_equal(ids[0], "llama3");
    assert_string_equal(ids[1], "meta/x:q4");
    for (int i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
    assert_int_equal(provider_parse_models("{\"data\":{}}", 11, &ids), -1);
    assert_null(ids);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_2xx_json_object_completes),
        cmocka_unit_test(test_2xx_not_an_object_is_bad_response_not_retryable),
        cmocka_unit_test(test_4xx_not_retryable_with_provider_message),
        cmocka_unit_test(test_5xx_and_transport_failures_are_retryable),
        cmocka_unit_test(test_probe_health),
        cmocka_unit_test(test_capacity_parsing),
        cmocka_unit_test(test_models_parsing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
