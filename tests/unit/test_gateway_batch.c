/* Unit tests for the gateway's batching: which queued submits fold into one
 * submit_many call and the array they make, result-row matching, reply
 * notification parsing, id lists; the waiter table; the Prometheus rendering. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "batch.h"
#include "metrics.h"
#include "waiters.h"

/* A queue of n calls with elements {"n":i} linked by ->next. */
static call_t *make_queue(call_t *calls, size_t n, char texts[][32])
{
    for (size_t i = 0; i < n; i++) {
        memset(&calls[i], 0, sizeof calls[i]);
        snprintf(texts[i], 32, "{\"n\":%zu}", i);
        calls[i].element = texts[i];
        calls[i].element_len = strlen(texts[i]);
        calls[i].next = i + 1 < n ? &calls[i + 1] : NULL;
    }
    return n ? &calls[0] : NULL;
}

static void test_take_count(void **state)
{
    call_t calls[10];
    char texts[10][32];
    call_t *q = make_queue(calls, 10, texts);

    (void)state;
    assert_int_equal(batch_take_count(NULL, 100, 1000), 0);
    assert_int_equal(batch_take_count(q, 100, 100000), 10);     /* everything pending folds */
    assert_int_equal(batch_take_count(q, 4, 100000), 4);        /* item cap */
    /* Byte cap: each element is 7 bytes + a comma; 3 fit in 24. */
    assert_int_equal(batch_take_count(q, 100, 24), 3);
    /* The first goes even when alone it is over the byte cap. */
    assert_int_equal(batch_take_count(q, 100, 1), 1);
    /* A solo call goes alone, and stops a batch before it. */
    calls[0].solo = true;
    assert_int_equal(batch_take_count(q, 100, 100000), 1);
    calls[0].solo = false;
    calls[5].solo = true;
    assert_int_equal(batch_take_count(q, 100, 100000), 5);
}

static void test_join_elements(void **state)
{
    call_t calls[3];
    char texts[3][32];
    call_t *q = make_queue(calls, 3, texts);
    buf_t b = BUF_INIT;
    json_t *doc;

    (void)state;
    batch_join_elements(&b, q, 3);
    assert_string_equal(b.data, "[{\"n\":0},{\"n\":1},{\"n\":2}]");
    doc = json_loads(b.data, 0, NULL);
    assert_int_equal(json_array_size(doc), 3);
    json_decref(doc);
    buf_reset(&b);
    batch_join_elements(&b, q, 1);
    assert_string_equal(b.data, "[{\"n\":0}]");
    buf_reset(&b);
    batch_join_elements(&b, q, 0);
    assert_string_equal(b.data, "[]");
    buf_free(&b);
}

static void test_call_for_row(void **state)
{
    call_t calls[3];
    call_t *arr[3] = {&calls[0], &calls[1], &calls[2]};

    (void)state;
    assert_ptr_equal(batch_call_for_row(arr, 3, "1"), &calls[0]);
    assert_ptr_equal(batch_call_for_row(arr, 3, "3"), &calls[2]);
    assert_null(batch_call_for_row(arr, 3, "0"));
    assert_null(batch_call_for_row(arr, 3, "4"));
    assert_null(batch_call_for_row(arr, 3, "-1"));
    assert_null(batch_call_for_row(arr, 3, ""));
    assert_null(batch_call_for_row(arr, 3, NULL));
    assert_null(batch_call_for_row(arr, 3, "99999999999999999999"));
}

static void collect(void *ctx, int64_t id)
{
    int64_t *out = ctx;

    out[++out[0]] = id;
}

static void test_parse_ids(void **state)
{
    int64_t got[8] = {0};

    (void)state;
    assert_int_equal(batch_parse_ids("12,13,400", collect, got), 3);
    assert_int_equal(got[0], 3);
    assert_int_equal(got[1], 12);
    assert_int_equal(got[2], 13);
    assert_int_equal(got[3], 400);
    memset(got, 0, sizeof got);
    assert_int_equal(batch_parse_ids("9223372036854775807", collect, got), 1);
    assert_int_equal(got[1], INT64_MAX);

    static const char *const bad[] = {"", "1,", ",1", "1,,2", "1 ,2", "a", "-1", "0",
                                      "9223372036854775808", "1;2", "12345678901234567890"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(got, 0, sizeof got);
        assert_int_equal(batch_parse_ids(bad[i], collect, got), -1);
        assert_int_equal(got[0], 0);   /* nothing reported from a bad payload */
    }
    assert_int_equal(batch_parse_ids(NULL, collect, got), -1);
}

static void test_ids_literal_and_unique(void **state)
{
    int64_t ids[] = {5, 3, 5, 1, 3, 9};
    buf_t b = BUF_INIT;
    size_t n;

    (void)state;
    n = batch_unique_ids(ids, 6);
    assert_int_equal(n, 4);
    batch_ids_literal(&b, ids, n);
    assert_string_equal(b.data, "{1,3,5,9}");
    buf_reset(&b);
    batch_ids_literal(&b, ids, 0);
    assert_string_equal(b.data, "{}");
    buf_free(&b);
    assert_int_equal(batch_unique_ids(ids, 0), 0);
}

static void test_waiters(void **state)
{
    enum { N = 1000 };
    call_t *calls = calloc(N, sizeof *calls);
    waiters_t w;
    size_t seen = 0;

    (void)state;
    waiters_init(&w);
    assert_null(waiters_find(&w, 1));
    for (int i = 0; i < N; i++) {
        calls[i].job_id = 1 + i / 2;   /* two waiters per job */
        assert_true(waiters_add(&w, &calls[i]));
    }
    assert_int_equal(waiters_count(&w), N);
    for (call_t *c = w.all; c; c = c->all_next)
        seen++;
    assert_int_equal(seen, N);

    /* Both waiters of a job are found, and nothing else. */
    {
        call_t *a = waiters_find(&w, 77);
        call_t *b = a ? waiters_find_next(a) : NULL;

        assert_non_null(a);
        assert_non_null(b);
        assert_int_equal(a->job_id, 77);
        assert_int_equal(b->job_id, 77);
        assert_ptr_not_equal(a, b);
        assert_null(waiters_find_next(b));
        waiters_remove(&w, a);
        assert_false(a->waiting);
        assert_ptr_equal(waiters_find(&w, 77), b);
        waiters_remove(&w, b);
        assert_null(waiters_find(&w, 77));
        waiters_remove(&w, b);   /* removing twice is harmless */
    }
    assert_int_equal(waiters_count(&w), N - 2);
    for (int i = 0; i < N; i++)
        waiters_remove(&w, &calls[i]);
    assert_int_equal(waiters_count(&w), 0);
    assert_null(w.all);
    assert_null(waiters_find(&w, 1));
    waiters_free(&w);
    free(calls);
}

static void test_metrics_render(void **state)
{
    const metrics_sample_t samples[] = {
        {"pgdispatch_model_capacity", "{\"tier\": \"reported\", \"model\": \"m\\\"1\"}", 3},
        {"pgdispatch_model_capacity", "{\"tier\": \"fallback\", \"model\": \"m2\"}", 0},
        {"pgdispatch_nodes", "{\"state\": \"live\"}", 1},
        {"pgdispatch_notification_queue_usage", "{}", 0.25},
        {"bad name!", "{}", 1},
    };
    metrics_gateway_t g = {5, true};
    buf_t b = BUF_INIT;
    const char *p;
    int types = 0;

    (void)state;
    metrics_reset();
    metrics_request_done("/v1/chat/completions", 200, 0.004);
    metrics_request_done("/v1/chat/completions", 200, 0.2);
    metrics_request_done("/v1/chat/completions", 504, 1.0);
    metrics_job_finished(0.001, 0.003);
    metrics_db_reconnect();
    metrics_render(&b, samples, sizeof samples / sizeof samples[0], &g);
    assert_false(b.oom);
    assert_non_null(strstr(b.data, "pgdispatch_gateway_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_requests_total{endpoint=\"/v1/chat/completions\",status=\"504\"} 1\n"));
    /* Cumulative buckets. */
    assert_non_null(strstr(b.data, "pgdispatch_gateway_request_duration_seconds_bucket{endpoint=\"/v1/chat/completions\",le=\"0.005\"} 1\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_request_duration_seconds_bucket{endpoint=\"/v1/chat/completions\",le=\"0.25\"} 2\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_request_duration_seconds_bucket{endpoint=\"/v1/chat/completions\",le=\"+Inf\"} 3\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_request_duration_seconds_count{endpoint=\"/v1/chat/completions\"} 3\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_job_queue_wait_seconds_count 1\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_db_reconnects_total 1\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_waiting_requests 5\n"));
    assert_non_null(strstr(b.data, "pgdispatch_gateway_db_up 1\n"));
    /* Labels sorted by name, values escaped; one TYPE line per name. */
    assert_non_null(strstr(b.data, "pgdispatch_model_capacity{model=\"m\\\"1\",tier=\"reported\"} 3\n"));
    assert_non_null(strstr(b.data, "pgdispatch_model_capacity{model=\"m2\",tier=\"fallback\"} 0\n"));
    assert_non_null(strstr(b.data, "pgdispatch_notification_queue_usage 0.25\n"));
    for (p = b.data; (p = strstr(p, "# TYPE pgdispatch_model_capacity gauge")) != NULL; p++)
        types++;
    assert_int_equal(types, 1);
    assert_null(strstr(b.data, "bad name!"));
    buf_free(&b);

    /* Database down: only the gateway's own series. */
    g.db_up = false;
    metrics_render(&b, NULL, 0, &g);
    assert_non_null(strstr(b.data, "pgdispatch_gateway_db_up 0\n"));
    assert_null(strstr(b.data, "pgdispatch_model_capacity"));
    buf_free(&b);
    metrics_reset();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_take_count),
        cmocka_unit_test(test_join_elements),
        cmocka_unit_test(test_call_for_row),
        cmocka_unit_test(test_parse_ids),
        cmocka_unit_test(test_ids_literal_and_unique),
        cmocka_unit_test(test_waiters),
        cmocka_unit_test(test_metrics_render),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
