/* Unit tests for daemon/lease.c: outcome JSON, the outbox's sent/retry/refused
 * bookkeeping, array literals, list splitting and exchange row parsing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include <jansson.h>

#include "lease.h"

/* Parses the exchange parameter the outbox produced; fails the test if not JSON. */
static json_t *take_all(lease_outbox_t *ob, buf_t *param)
{
    json_error_t err;
    json_t *arr;

    lease_outbox_take(ob, 1000, param);
    arr = json_loads(param->data, 0, &err);
    if (arr == NULL)
        fail_msg("not JSON: %s in %s", err.text, param->data);
    assert_true(json_is_array(arr));
    return arr;
}

static void test_result_is_embedded_raw(void **state)
{
    lease_outbox_t ob;
    buf_t param = BUF_INIT;
    json_t *arr, *e;
    const char body[] = "{\"choices\": [{\"text\": \"hi\"}]}";

    (void)state;
    lease_outbox_init(&ob);
    assert_int_equal(lease_outbox_add_result(&ob, 42, 3, body, strlen(body)), 0);
    arr = take_all(&ob, &param);
    assert_int_equal(json_array_size(arr), 1);
    e = json_array_get(arr, 0);
    assert_int_equal(json_integer_value(json_object_get(e, "id")), 42);
    assert_int_equal(json_integer_value(json_object_get(e, "attempt")), 3);
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(
                            json_object_get(e, "result"), "choices"), 0), "text")), "hi");
    assert_null(json_object_get(e, "error"));
    json_decref(arr);
    buf_free(&param);
    lease_outbox_free(&ob);
}

static void test_error_carries_code_status_body_retryable(void **state)
{
    lease_outbox_t ob;
    buf_t param = BUF_INIT;
    json_t *arr, *e, *err;
    char body[6000];
    lease_error_t le;

    (void)state;
    memset(body, 'x', sizeof body);
    body[0] = '\0';                      /* NUL and invalid UTF-8 must not break the JSON */
    body[1] = (char)0xff;
    body[2] = '"';
    le = (lease_error_t){ "provider_5xx", "provider answered \"HTTP 503\"\n", 503, body, sizeof body, true };
    lease_outbox_init(&ob);
    assert_int_equal(lease_outbox_add_error(&ob, 7, 1, &le), 0);
    arr = take_all(&ob, &param);
    e = json_array_get(arr, 0);
    err = json_object_get(e, "error");
    assert_string_equal(json_string_value(json_object_get(err, "code")), "provider_5xx");
    assert_string_equal(json_string_value(json_object_get(err, "message")), "provider answered \"HTTP 503\"\n");
    assert_int_equal(json_integer_value(json_object_get(err, "status")), 503);
    assert_int_equal(json_integer_value(json_object_get(err, "body_truncated_from")), 6000);
    /* 4096 bytes kept: 2 replaced by U+FFFD (3 bytes each in UTF-8), the rest ASCII. */
    assert_int_equal(json_string_length(json_object_get(err, "body")), 4096 + 2 * 2);
    assert_memory_equal(json_string_value(json_object_get(err, "body")), "\xef\xbf\xbd\xef\xbf\xbd\"x", 8);
    assert_true(json_is_true(json_object_get(e, "retryable")));
    json_decref(arr);
    buf_free(&param);
    lease_outbox_free(&ob);
}

static void test_error_without_status_or_body(void **state)
{
    lease_outbox_t ob;
    buf_t param = BUF_INIT;
    json_t *arr, *err;
    lease_error_t le = { "deadline_exceeded", "too late", 0, NULL, 0, false };

    (void)state;
    lease_outbox_init(&ob);
    lease_outbox_add_error(&ob, 1, 1, &le);
    arr = take_all(&ob, &param);
    err = json_object_get(json_array_get(arr, 0), "error");
    assert_null(json_object_get(err, "status"));
    assert_null(json_object_get(err, "body"));
    assert_true(json_is_false(json_object_get(json_array_get(arr, 0), "retryable")));
    json_decref(arr);
    buf_free(&param);
    lease_outbox_free(&ob);
}

static void test_sent_done_retry_and_limit(void **state)
{
    lease_outbox_t ob;
    buf_t param = BUF_INIT;
    json_t *arr;

    (void)state;
    lease_outbox_init(&ob);
    for (int i = 1; i <= 5; i++)
        lease_outbox_add_result(&ob, i, 1, "{}", 2);
    assert_int_equal(lease_outbox_take(&ob, 2, &param), 2);
    assert_string_equal(param.data, "[{\"id\":1,\"attempt\":1,\"result\":{}},{\"id\":2,\"attempt\":1,\"result\":{}}]");
    lease_outbox_add_result(&ob, 6, 1, "{}", 2);    /* arrives while the exchange is in flight */
    lease_outbox_sent_retry(&ob);                   /* connection broke: all six wait */
    assert_int_equal(ob.count, 6);
    assert_int_equal(ob.sent, 0);
    assert_int_equal(lease_outbox_take(&ob, 3, &param), 3);
    lease_outbox_sent_done(&ob);
    assert_int_equal(ob.count, 3);
    arr = take_all(&ob, &param);
    assert_int_equal(json_array_size(arr), 3);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 0), "id")), 4);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 2), "id")), 6);
    json_decref(arr);
    lease_outbox_sent_done(&ob);
    assert_int_equal(ob.count, 0);
    assert_int_equal(lease_outbox_take(&ob, 10, &param), 0);
    assert_string_equal(param.data, "[]");
    buf_free(&param);
    lease_outbox_free(&ob);
}

/* A batch leaves in job id order (the lock order every multi-job transaction shares);
 * the entries of one job keep the order they were queued in, and what stays behind
 * after a partial take is the same set as before. */
static void test_take_orders_by_job_id(void **state)
{
    lease_outbox_t ob;
    buf_t param = BUF_INIT;

    (void)state;
    lease_outbox_init(&ob);
    lease_outbox_add_chunk(&ob, 9, 1, 0, true, "a", 1);
    lease_outbox_add_chunk(&ob, 3, 2, 0, true, "b", 1);
    lease_outbox_add_chunk(&ob, 9, 1, 1, false, "c", 1);
    lease_outbox_add_chunk(&ob, 3, 2, 1, false, "d", 1);
    lease_outbox_add_chunk(&ob, 1, 1, 0, false, "e", 1);
    assert_int_equal(lease_outbox_take(&ob, 4, &param), 4);
    assert_string_equal(param.data,
                        "[{\"id\":3,\"attempt\":2,\"seq\":0,\"more\":true,\"data\":\"b\"},"
                        "{\"id\":3,\"attempt\":2,\"seq\":1,\"more\":false,\"data\":\"d\"},"
                        "{\"id\":9,\"attempt\":1,\"seq\":0,\"more\":true,\"data\":\"a\"},"
                        "{\"id\":9,\"attempt\":1,\"seq\":1,\"more\":false,\"data\":\"c\"}]");
    lease_outbox_sent_done(&ob);
    assert_int_equal(ob.count, 1);
    assert_int_equal(ob.meta[0].id, 1);
    for (int i = 40; i > 0; i--)     /* past the first allocation: the scratch grows too */
        lease_outbox_add_result(&ob, 100 + i, 1, "{}", 2);
    assert_int_equal(lease_outbox_take(&ob, 100, &param), 41);
    assert_true(strncmp(param.data, "[{\"id\":1,", 9) == 0);
    assert_non_null(strstr(param.data, "{\"id\":101,\"attempt\":1,\"result\":{}},{\"id\":102,"));
    assert_non_null(strstr(param.data, "{\"id\":140,\"attempt\":1,\"result\":{}}]"));
    buf_free(&param);
    lease_outbox_free(&ob);
}

static void test_refused_outcome_is_rewritten_once_then_dropped(void **state)
{
    lease_outbox_t ob;
    buf_t param = BUF_INIT;
    json_t *arr, *e;

    (void)state;
    lease_outbox_init(&ob);
    lease_outbox_add_result(&ob, 9, 2, "{\"bad\":1}", 9);
    lease_outbox_add_result(&ob, 10, 1, "{}", 2);
    lease_outbox_take(&ob, 1, &param);
    assert_true(lease_outbox_sent_refused(&ob, "refused"));
    assert_int_equal(ob.count, 2);
    assert_int_equal(ob.meta[1].id, 9);       /* the replacement goes to the back */
    arr = take_all(&ob, &param);
    e = json_array_get(arr, 0);               /* and leaves in id order */
    assert_int_equal(json_integer_value(json_object_get(e, "id")), 9);
    assert_int_equal(json_integer_value(json_object_get(e, "attempt")), 2);
    assert_string_equal(json_string_value(json_object_get(json_object_get(e, "error"), "code")), "bad_response");
    json_decref(arr);
    lease_outbox_sent_done(&ob);
    lease_outbox_add_result(&ob, 11, 1, "{}", 2);
    assert_int_equal(ob.count, 1);
    buf_free(&param);
    lease_outbox_free(&ob);

    /* A replacement refused again is dropped. */
    lease_outbox_init(&ob);
    lease_outbox_add_result(&ob, 9, 2, "{}", 2);
    lease_outbox_take(&ob, 1, &param);
    assert_true(lease_outbox_sent_refused(&ob, "refused"));
    lease_outbox_take(&ob, 1, &param);
    assert_false(lease_outbox_sent_refused(&ob, "refused"));
    assert_int_equal(ob.count, 0);
    buf_free(&param);
    lease_outbox_free(&ob);
}

static void test_text_array_and_split(void **state)
{
    buf_t b = BUF_INIT;
    const char *items[] = { "llama3", "meta/x:q4", "we\"ird\\" };
    char **list;
    int n;

    (void)state;
    lease_text_array(&b, items, 3);
    assert_string_equal(b.data, "{\"llama3\",\"meta/x:q4\",\"we\\\"ird\\\\\"}");
    buf_free(&b);
    n = lease_split_list(" a, b ,,c ", &list);
    assert_int_equal(n, 3);
    assert_string_equal(list[0], "a");
    assert_string_equal(list[1], "b");
    assert_string_equal(list[2], "c");
    lease_free_list(list, n);
    assert_int_equal(lease_split_list(" , ", &list), 0);
    lease_free_list(list, 0);
}

/* Builds a result shaped like the exchange query's. */
static PGresult *exchange_result(int rows, const char *const values[][8])
{
    PGresAttDesc attrs[8];
    const char *names[8] = { "kind", "id", "attempt", "model", "endpoint", "payload", "deadline", "lease" };
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);

    memset(attrs, 0, sizeof attrs);
    for (int i = 0; i < 8; i++) {
        attrs[i].name = (char *)names[i];
        attrs[i].typlen = -1;
        attrs[i].format = 0;
    }
    assert_true(PQsetResultAttrs(res, 8, attrs));
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < 8; c++) {
            const char *v = values[r][c];
            assert_true(PQsetvalue(res, r, c, (char *)v, v ? (int)strlen(v) : -1));
        }
    }
    return res;
}

static void test_row_parse(void **state)
{
    const char *const values[][8] = {
        { "job", "12", "1", "demo", "/v1/chat/completions", "{\"a\":1}", "2500", "60000" },
        { "job", "13", "2", "demo", "/v1/embeddings", "{}", NULL, "59999" },
        { "stale", "7", "1", NULL, NULL, NULL, NULL, NULL },
        { "wake", NULL, NULL, NULL, NULL, NULL, NULL, "1234" },
        { "wake", NULL, NULL, NULL, NULL, NULL, NULL, NULL },
        { "job", "x", "1", "demo", "/v1", "{}", NULL, "1" },
        { "job", "14", "1", "demo", "/v1", "{}", NULL, NULL },
        { "what", "1", "1", NULL, NULL, NULL, NULL, NULL },
    };
    PGresult *res = exchange_result(8, values);
    lease_row_t row;

    (void)state;
    assert_true(lease_row_parse(res, 0, &row));
    assert_int_equal(row.kind, LEASE_ROW_JOB);
    assert_int_equal(row.id, 12);
    assert_int_equal(row.attempt, 1);
    assert_string_equal(row.endpoint, "/v1/chat/completions");
    assert_int_equal(row.payload_len, 7);
    assert_true(row.has_deadline);
    assert_int_equal(row.deadline_in_ms, 2500);
    assert_int_equal(row.lease_in_ms, 60000);
    assert_true(lease_row_parse(res, 1, &row));
    assert_false(row.has_deadline);
    assert_true(lease_row_parse(res, 2, &row));
    assert_int_equal(row.kind, LEASE_ROW_STALE);
    assert_int_equal(row.id, 7);
    assert_true(lease_row_parse(res, 3, &row));
    assert_int_equal(row.kind, LEASE_ROW_WAKE);
    assert_true(row.has_lease);
    assert_int_equal(row.lease_in_ms, 1234);
    assert_true(lease_row_parse(res, 4, &row));
    assert_false(row.has_lease);
    assert_false(lease_row_parse(res, 5, &row));     /* bad id */
    assert_false(lease_row_parse(res, 6, &row));     /* a job without a lease */
    assert_false(lease_row_parse(res, 7, &row));     /* unknown kind */
    assert_false(lease_row_parse(res, 8, &row));     /* out of range */
    PQclear(res);
}

static void test_wake_names(void **state)
{
    (void)state;
    assert_true(lease_wake_names("", 7));          /* everyone */
    assert_true(lease_wake_names(NULL, 7));
    assert_true(lease_wake_names("7", 7));
    assert_true(lease_wake_names("3,7,12", 7));
    assert_false(lease_wake_names("3,12", 7));
    assert_false(lease_wake_names("77", 7));
    assert_false(lease_wake_names("17,70", 7));
    /* Anything else wakes: a wake too many costs a round trip, one too few a job. */
    assert_true(lease_wake_names("x", 7));
    assert_true(lease_wake_names("3,,12", 7));
    assert_true(lease_wake_names("3; 12", 7));
    assert_true(lease_wake_names("99999999999999999999", 7));
}

static void test_pair_next(void **state)
{
    const char *cursor = "12:1,9007199254740993:3,7:0";
    int64_t id = 0;
    int32_t attempt = -1;

    (void)state;
    assert_true(lease_pair_next(&cursor, &id, &attempt));
    assert_int_equal(id, 12);
    assert_int_equal(attempt, 1);
    assert_true(lease_pair_next(&cursor, &id, &attempt));
    assert_int_equal(id, INT64_C(9007199254740993));
    assert_int_equal(attempt, 3);
    assert_true(lease_pair_next(&cursor, &id, &attempt));
    assert_int_equal(id, 7);
    assert_int_equal(attempt, 0);
    assert_false(lease_pair_next(&cursor, &id, &attempt));
    assert_string_equal(cursor, "");

    /* Anything else stops the walk where it is, and the pair is not written. */
    const char *bad[] = { "12", "12:", ":1", "12:1;13:1", "x:1", "-4:1", "12:-1", "12:99999999999" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cursor = bad[i];
        id = 55;
        attempt = 55;
        assert_false(lease_pair_next(&cursor, &id, &attempt));
        assert_ptr_equal(cursor, bad[i]);
        assert_int_equal(id, 55);
        assert_int_equal(attempt, 55);
    }
    cursor = NULL;
    assert_false(lease_pair_next(&cursor, &id, &attempt));
}

/* Parses a copy of text (the parser writes into it); the copy is returned for the
 * pointers of row to stay valid. */
static char *push_parse(const char *text, lease_row_t *row, char *model, size_t cap, bool *ok)
{
    char *copy = strdup(text);
    assert_non_null(copy);
    *ok = lease_push_parse(copy, row, model, cap);
    return copy;
}

static void test_push_parse(void **state)
{
    lease_row_t row;
    char model[LEASE_MODEL_MAX + 1];
    bool ok;
    char *t;

    (void)state;
    t = push_parse("P42:1:60000::/v1/chat/completions:5:llama{\"a\":\"x:y\"}", &row, model, sizeof model, &ok);
    assert_true(ok);
    assert_int_equal(row.kind, LEASE_ROW_JOB);
    assert_int_equal(row.id, 42);
    assert_int_equal(row.attempt, 1);
    assert_true(row.has_lease);
    assert_int_equal(row.lease_in_ms, 60000);
    assert_false(row.has_deadline);
    assert_string_equal(row.endpoint, "/v1/chat/completions");
    assert_string_equal(row.model, "llama");
    assert_int_equal(row.payload_len, strlen("{\"a\":\"x:y\"}"));
    assert_memory_equal(row.payload, "{\"a\":\"x:y\"}", row.payload_len);
    free(t);

    /* A deadline; a model with ':' and multi-byte characters (its length is in bytes). */
    t = push_parse("P7:2:1000:250:/v1/completions:6:a:\xc3\xa9:b{}", &row, model, sizeof model, &ok);
    assert_true(ok);
    assert_true(row.has_deadline);
    assert_int_equal(row.deadline_in_ms, 250);
    assert_int_equal(row.attempt, 2);
    assert_string_equal(row.model, "a:\xc3\xa9:b");
    assert_int_equal(row.payload_len, 2);
    free(t);

    /* What is not a pushed job: a cancel (a bare id), missing or bad fields, a model
     * longer than the buffer or than what follows it. */
    const char *bad[] = {
        "42", "", "P", "P42:1:60000::/v1/x:5", "Px:1:60000::/v1/x:1:m{}", "P0:1:60000::/v1/x:1:m{}",
        "P42:0:60000::/v1/x:1:m{}", "P42:1:x::/v1/x:1:m{}", "P42:1:60000:soon:/v1/x:1:m{}",
        "P42:1:60000::v1/x:1:m{}", "P42:1:60000::/v1/x:0:m{}", "P42:1:60000::/v1/x:3:m{}",
        "P42:1:60000::/v1/x:-1:m{}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        t = push_parse(bad[i], &row, model, sizeof model, &ok);
        if (ok)
            fail_msg("accepted as a pushed job: \"%s\"", bad[i]);
        free(t);
    }
    t = push_parse("P42:1:60000::/v1/x:4:mode{}", &row, model, 4, &ok);
    assert_false(ok);                                 /* model buffer too small */
    free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_result_is_embedded_raw),
        cmocka_unit_test(test_error_carries_code_status_body_retryable),
        cmocka_unit_test(test_error_without_status_or_body),
        cmocka_unit_test(test_sent_done_retry_and_limit),
        cmocka_unit_test(test_take_orders_by_job_id),
        cmocka_unit_test(test_refused_outcome_is_rewritten_once_then_dropped),
        cmocka_unit_test(test_text_array_and_split),
        cmocka_unit_test(test_wake_names),
        cmocka_unit_test(test_pair_next),
        cmocka_unit_test(test_push_parse),
        cmocka_unit_test(test_row_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
