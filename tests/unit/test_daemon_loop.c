/* Unit tests for daemon/loop.c's timer selection, lease renewal schedule and lease-ahead
 * sizing, and for
 * src/common/buf.c's JSON string escaping that every outcome goes through. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "buf.h"
#include "loop.h"

static void test_timeout_picks_nearest_and_ignores_unset(void **state)
{
    int64_t t[] = { 0, 1500, 1200, 0, 5000 };

    (void)state;
    assert_int_equal(loop_timeout_ms(1000, t, 5, 60000), 200);
    assert_int_equal(loop_timeout_ms(1000, t, 1, 60000), 60000);      /* nothing set: the cap */
    assert_int_equal(loop_timeout_ms(1000, NULL, 0, 250), 250);
}

static void test_timeout_past_deadline_is_zero_and_cap_holds(void **state)
{
    int64_t past[] = { 900, 5000 };
    int64_t far[] = { INT64_C(1) << 40 };

    (void)state;
    assert_int_equal(loop_timeout_ms(1000, past, 2, 60000), 0);
    assert_int_equal(loop_timeout_ms(1000, far, 1, 60000), 60000);
}

static void test_extend_due_after_a_third_of_the_lease(void **state)
{
    job_t j = { 0 };

    (void)state;
    j.lease_len_ms = 60000;
    j.lease_expires_mono = 100000;             /* leased at 40000 */
    assert_int_equal(loop_extend_due(&j), 60000);
    j.lease_len_ms = 1000;
    j.lease_expires_mono = 2000;
    assert_int_equal(loop_extend_due(&j), 1334);
}

static void test_json_string_escaping(void **state)
{
    buf_t b = BUF_INIT;

    (void)state;
    buf_append_json_string(&b, "a\"b\\c\n\t\x01z", 9);
    assert_string_equal(b.data, "\"a\\\"b\\\\c\\n\\t\\u0001z\"");
    buf_reset(&b);
    buf_append_json_string(&b, "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14);   /* valid UTF-8 kept */
    assert_string_equal(b.data, "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
    buf_reset(&b);
    buf_append_json_string(&b, "x\0y\xc3(\xed\xa0\x80\xc0\xaf", 10);  /* NUL, truncated, surrogate, overlong */
    assert_string_equal(b.data, "\"x\\ufffdy\\ufffd(\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\"");
    buf_free(&b);
}

static void test_buf_growth_and_consume(void **state)
{
    buf_t b = BUF_INIT;

    (void)state;
    for (int i = 0; i < 1000; i++)
        buf_printf(&b, "%03d,", i);
    assert_int_equal(b.len, 4000);
    assert_false(b.oom);
    buf_consume(&b, 3996);
    assert_string_equal(b.data, "999,");
    buf_consume(&b, 100);
    assert_int_equal(b.len, 0);
    buf_free(&b);
    assert_null(b.data);
}

static void test_lease_ahead_only_for_fast_jobs(void **state)
{
    (void)state;
    assert_int_equal(loop_lease_ahead(10, -1, 0, 1500), 0);          /* pace not measured yet */
    assert_int_equal(loop_lease_ahead(10, -1, 200, 0), 0);
    assert_int_equal(loop_lease_ahead(10, -1, 3001, 1500), 0);       /* slower than two round trips */
    assert_int_equal(loop_lease_ahead(10, 0, 200, 1500), 0);         /* --lease-ahead 0 */
    assert_int_equal(loop_lease_ahead(10, 7, 200, 1500), 7);         /* a fixed number is kept */
    assert_int_equal(loop_lease_ahead(10, 7, 3001, 1500), 0);
}

static void test_lease_ahead_covers_one_round_trip(void **state)
{
    (void)state;
    /* Each slot finishes rtt / service jobs in a round trip. */
    assert_int_equal(loop_lease_ahead(10, -1, 500, 1500), 30);
    assert_int_equal(loop_lease_ahead(3, -1, 700, 1500), 7);           /* rounded up */
    /* At least as many as the slots, at most LOOP_LEASE_AHEAD_MAX_SLOTS times them. */
    assert_int_equal(loop_lease_ahead(10, -1, 2900, 1500), 10);
    assert_int_equal(loop_lease_ahead(10, -1, 100, 1500), 10 * LOOP_LEASE_AHEAD_MAX_SLOTS);
    assert_int_equal(loop_lease_ahead(100000, -1, 1, 60000000), 100000L * LOOP_LEASE_AHEAD_MAX_SLOTS);
}

static void test_lease_ahead_allowance(void **state)
{
    (void)state;
    assert_int_equal(loop_lease_ahead_allowance(10, -1), 10 * LOOP_LEASE_AHEAD_MAX_SLOTS);
    assert_int_equal(loop_lease_ahead_allowance(10, 0), 0);
    assert_int_equal(loop_lease_ahead_allowance(10, 25), 25);
    assert_int_equal(loop_lease_ahead_allowance(50000, -1), 100000);  /* set_lease_ahead's bound */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_timeout_picks_nearest_and_ignores_unset),
        cmocka_unit_test(test_timeout_past_deadline_is_zero_and_cap_holds),
        cmocka_unit_test(test_extend_due_after_a_third_of_the_lease),
        cmocka_unit_test(test_lease_ahead_only_for_fast_jobs),
        cmocka_unit_test(test_lease_ahead_covers_one_round_trip),
        cmocka_unit_test(test_lease_ahead_allowance),
        cmocka_unit_test(test_json_string_escaping),
        cmocka_unit_test(test_buf_growth_and_consume),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
