/* Unit tests for the gateway's half of streaming: stream piece payloads and their
 * tokens, putting pieces back in order, gap and restart detection, joining split
 * events, SSE framing, the answer built from a finished result, and the buffer
 * between the dispatcher and the content reader (suspend/resume handshake, ends,
 * limits). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "stream.h"

/* ---- payloads ---------------------------------------------------------------------- */

static void test_parse_payload(void **state)
{
    stream_payload_t p;

    (void)state;
    assert_true(stream_parse_payload("S42:0:e:abcDEF123456:{\"a\":1}", &p));
    assert_int_equal(p.id, 42);
    assert_int_equal(p.seq, 0);
    assert_false(p.more);
    assert_int_equal(p.token_len, 12);
    assert_memory_equal(p.token, "abcDEF123456", 12);
    assert_int_equal(p.len, 7);
    assert_memory_equal(p.data, "{\"a\":1}", 7);

    /* Data may hold colons and be empty; 'm' marks a piece that continues. */
    assert_true(stream_parse_payload("S9223372036854775807:2147483647:m:T0k3n:a:b:c", &p));
    assert_true(p.id == INT64_MAX);
    assert_int_equal(p.seq, 2147483647u);
    assert_true(p.more);
    assert_int_equal(p.token_len, 5);
    assert_string_equal(p.data, "a:b:c");
    assert_true(stream_parse_payload("S1:5:e:tok:", &p));
    assert_int_equal(p.len, 0);
    assert_string_equal(p.data, "");

    /* A job submitted without a token: the field is empty (and the piece not ours). */
    assert_true(stream_parse_payload("S7:3:e::{}", &p));
    assert_int_equal(p.token_len, 0);
    assert_string_equal(p.data, "{}");
    assert_true(stream_parse_payload("S7:3:e:::", &p));
    assert_int_equal(p.token_len, 0);
    assert_string_equal(p.data, ":");

    /* The longest token submit_many takes; one more is not a token. */
    {
        char buf[200];

        snprintf(buf, sizeof buf, "S1:0:e:%064d:x", 0);
        assert_true(stream_parse_payload(buf, &p));
        assert_int_equal(p.token_len, 64);
        assert_string_equal(p.data, "x");
        snprintf(buf, sizeof buf, "S1:0:e:%065d:x", 0);
        assert_false(stream_parse_payload(buf, &p));
    }

    /* Everything else is not a piece, nor is the format before tokens when its data
     * does not happen to start with letters and a colon. */
    static const char *const bad[] = {
        "", "12,13", "S", "S1", "S1:", "S1:2", "S1:2:", "S1:2:e", "S1:2:x:t:data", "S0:1:e:t:x", "S-1:1:e:t:x",
        "S1:-1:e:t:x", "Sx:1:e:t:x", "S1:y:e:t:x", "S1::e:t:x", ":1:e:t:x", "s1:1:e:t:x",
        "S9223372036854775808:1:e:t:x", "S1:2147483648:e:t:x", "S1:2:ee:t:x", " S1:2:e:t:x", "S1:2:e:",
        "S1:2:e:tok", "S1:2:e:{\"a\":1}", "S1:2:e:to-ken:x", "S1:2:e:to ken:x", "S1:2:e:tok\xc3\xa9:x",
        "S1:2:e:\"tok\":x",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(stream_parse_payload(bad[i], &p));
    assert_false(stream_parse_payload(NULL, &p));
}

/* ---- tokens ------------------------------------------------------------------------- */

static bool is_token(const char *t)
{
    if (strlen(t) != STREAM_TOKEN_LEN)
        return false;
    for (const char *c = t; *c; c++)
        if (!((*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9')))
            return false;
    return true;
}

static void test_token_make(void **state)
{
    char a[STREAM_TOKEN_LEN + 1], b[STREAM_TOKEN_LEN + 1];
    unsigned seen[128] = {0};
    size_t distinct = 0;

    (void)state;
    assert_true(stream_token_make(a));
    assert_true(stream_token_make(b));
    assert_true(is_token(a));
    assert_true(is_token(b));
    assert_string_not_equal(a, b);
    /* What a token may hold: letters and digits, all of them in use. */
    for (int i = 0; i < 200; i++) {
        assert_true(stream_token_make(a));
        assert_true(is_token(a));
        for (const char *c = a; *c; c++)
            if (seen[(unsigned char)*c]++ == 0)
                distinct++;
    }
    assert_int_equal(distinct, 62);
}

static void test_token_equal(void **state)
{
    const char *ours = "abcdefghijklmnopqrstuvwx";

    (void)state;
    assert_int_equal(strlen(ours), STREAM_TOKEN_LEN);
    assert_true(stream_token_equal(ours, "abcdefghijklmnopqrstuvwx:data", STREAM_TOKEN_LEN));
    assert_false(stream_token_equal(ours, "abcdefghijklmnopqrstuvwX", STREAM_TOKEN_LEN));
    assert_false(stream_token_equal(ours, "Abcdefghijklmnopqrstuvwx", STREAM_TOKEN_LEN));
    /* A prefix, a longer one, none. */
    assert_false(stream_token_equal(ours, "abcdefghijklmnopqrstuvw", STREAM_TOKEN_LEN - 1));
    assert_false(stream_token_equal(ours, "abcdefghijklmnopqrstuvwxy", STREAM_TOKEN_LEN + 1));
    assert_false(stream_token_equal(ours, "", 0));
    /* No token of ours (a request whose submit has not gone out) matches nothing. */
    assert_false(stream_token_equal("", "", 0));
    assert_false(stream_token_equal("", "abcdefghijklmnopqrstuvwx", STREAM_TOKEN_LEN));
    assert_false(stream_token_equal(NULL, "abcdefghijklmnopqrstuvwx", STREAM_TOKEN_LEN));

    /* A piece's token as parsed. */
    {
        stream_payload_t p;

        assert_true(stream_parse_payload("S3:0:e:abcdefghijklmnopqrstuvwx:{}", &p));
        assert_true(stream_token_equal(ours, p.token, p.token_len));
        assert_true(stream_parse_payload("S3:0:e:abcdefghijklmnopqrstuvwxyz:{}", &p));
        assert_false(stream_token_equal(ours, p.token, p.token_len));
        assert_true(stream_parse_payload("S3:0:e::{}", &p));
        assert_false(stream_token_equal(ours, p.token, p.token_len));
    }
}

/* ---- framing ------------------------------------------------------------------------- */

static void test_frame_event(void **state)
{
    buf_t b = BUF_INIT;

    (void)state;
    stream_frame_event(&b, "{\"x\":1}", 7);
    assert_string_equal(b.data, "data: {\"x\":1}\n\n");
    buf_reset(&b);
    /* Line breaks in the data become one data: line each (LF, CRLF, CR). */
    stream_frame_event(&b, "a\nb\r\nc\rd", 8);
    assert_string_equal(b.data, "data: a\ndata: b\ndata: c\ndata: d\n\n");
    buf_reset(&b);
    stream_frame_event(&b, "", 0);
    assert_string_equal(b.data, "data: \n\n");
    buf_reset(&b);
    stream_frame_done(&b);
    assert_string_equal(b.data, "data: [DONE]\n\n");
    buf_reset(&b);
    stream_frame_error(&b, "it \"broke\"", "server_error", "stream_broken");
    assert_string_equal(b.data,
                        "data: {\"error\":{\"message\":\"it \\\"broke\\\"\",\"type\":\"server_error\",\"code\":\"stream_broken\"}}\n\n");
    buf_free(&b);
}

static void test_frame_result(void **state)
{
    buf_t b = BUF_INIT;
    json_t *doc, *choice;
    char *nl;

    (void)state;
    stream_frame_result(&b, "{\"id\":\"c1\",\"object\":\"chat.completion\",\"created\":5,\"model\":\"m\","
                            "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},"
                            "\"finish_reason\":\"stop\"}],\"usage\":{\"total_tokens\":3}}");
    assert_non_null(b.data);
    assert_int_equal(strncmp(b.data, "data: ", 6), 0);
    nl = strstr(b.data, "\n\n");
    assert_non_null(nl);
    assert_string_equal(nl, "\n\ndata: [DONE]\n\n");
    *nl = '\0';
    doc = json_loads(b.data + 6, 0, NULL);
    assert_non_null(doc);
    assert_string_equal(json_string_value(json_object_get(doc, "object")), "chat.completion.chunk");
    assert_string_equal(json_string_value(json_object_get(doc, "id")), "c1");
    choice = json_array_get(json_object_get(doc, "choices"), 0);
    assert_null(json_object_get(choice, "message"));
    assert_string_equal(json_string_value(json_object_get(json_object_get(choice, "delta"), "content")), "hi");
    assert_string_equal(json_string_value(json_object_get(choice, "finish_reason")), "stop");
    json_decref(doc);
    buf_reset(&b);

    /* A text completion already has the shape of its stream chunks: sent as it is. */
    stream_frame_result(&b, "{\"object\":\"text_completion\",\"choices\":[{\"text\":\"x\"}]}");
    assert_string_equal(b.data, "data: {\"object\":\"text_completion\",\"choices\":[{\"text\":\"x\"}]}\n\ndata: [DONE]\n\n");
    buf_reset(&b);
    stream_frame_result(&b, NULL);
    assert_string_equal(b.data, "data: [DONE]\n\n");
    buf_free(&b);
}

/* ---- reassembly ------------------------------------------------------------------------ */

static stream_status_t feed(stream_rx_t *rx, uint32_t seq, bool more, const char *data, buf_t *out)
{
    return stream_rx_feed(rx, seq, more, data, strlen(data), out);
}

static void test_in_order(void **state)
{
    stream_rx_t rx;
    buf_t out = BUF_INIT;

    (void)state;
    stream_rx_init(&rx);
    assert_int_equal(feed(&rx, 0, false, "a", &out), STREAM_OK);
    assert_int_equal(feed(&rx, 1, false, "b", &out), STREAM_OK);
    assert_string_equal(out.data, "data: a\n\ndata: b\n\n");
    assert_true(stream_rx_complete(&rx));
    assert_int_equal(rx.events, 2);
    assert_null(rx.ring);            /* nothing came early: no window allocated */
    /* The provider's own [DONE] is swallowed: the gateway writes its own. */
    assert_int_equal(feed(&rx, 2, false, "[DONE]", &out), STREAM_OK);
    assert_string_equal(out.data, "data: a\n\ndata: b\n\n");
    assert_true(rx.saw_done);
    assert_int_equal(rx.events, 2);
    stream_rx_reset(&rx);
    buf_free(&out);
}

static void test_reordering(void **state)
{
    stream_rx_t rx;
    buf_t out = BUF_INIT;

    (void)state;
    stream_rx_init(&rx);
    /* 2 and 1 come before 0: held back, then released in order. */
    assert_int_equal(feed(&rx, 2, false, "c", &out), STREAM_OK);
    assert_int_equal(feed(&rx, 1, false, "b", &out), STREAM_OK);
    assert_int_equal(out.len, 0);
    assert_false(stream_rx_complete(&rx));
    assert_int_equal(rx.npending, 2);
    assert_int_equal(feed(&rx, 0, false, "a", &out), STREAM_OK);
    assert_string_equal(out.data, "data: a\n\ndata: b\n\ndata: c\n\n");
    assert_true(stream_rx_complete(&rx));
    assert_int_equal(rx.npending, 0);
    assert_int_equal(rx.pending_bytes, 0);
    assert_int_equal(rx.next, 3);
    /* 5 waits for 3 and 4; 4 alone does not release it. */
    buf_reset(&out);
    assert_int_equal(feed(&rx, 5, false, "f", &out), STREAM_OK);
    assert_int_equal(feed(&rx, 4, false, "e", &out), STREAM_OK);
    assert_int_equal(out.len, 0);
    assert_int_equal(feed(&rx, 3, false, "d", &out), STREAM_OK);
    assert_string_equal(out.data, "data: d\n\ndata: e\n\ndata: f\n\n");
    stream_rx_reset(&rx);
    buf_free(&out);
}

static void test_split_events(void **state)
{
    stream_rx_t rx;
    buf_t out = BUF_INIT;

    (void)state;
    stream_rx_init(&rx);
    /* An event in three pieces ('m', 'm', 'e'), the last two out of order. */
    assert_int_equal(feed(&rx, 0, true, "{\"te", &out), STREAM_OK);
    assert_int_equal(feed(&rx, 2, false, "lo\"}", &out), STREAM_OK);
    assert_int_equal(out.len, 0);
    assert_false(stream_rx_complete(&rx));
    assert_int_equal(feed(&rx, 1, true, "xt\":\"hel", &out), STREAM_OK);
    assert_string_equal(out.data, "data: {\"text\":\"hello\"}\n\n");
    assert_true(stream_rx_complete(&rx));
    assert_int_equal(rx.events, 1);
    /* A half event is a gap at the end. */
    assert_int_equal(feed(&rx, 3, true, "{", &out), STREAM_OK);
    assert_false(stream_rx_complete(&rx));
    stream_rx_reset(&rx);
    buf_free(&out);
}

static void test_gaps_and_limits(void **state)
{
    stream_rx_t rx;
    buf_t out = BUF_INIT;
    char *big;

    (void)state;
    stream_rx_init(&rx);
    assert_int_equal(feed(&rx, 0, false, "a", &out), STREAM_OK);
    /* 1 never comes: 2 waits, and the stream is not complete. */
    assert_int_equal(feed(&rx, 2, false, "c", &out), STREAM_OK);
    assert_false(stream_rx_complete(&rx));
    /* A piece past the window is refused, and so is a repeat (a new attempt). */
    assert_int_equal(feed(&rx, 1 + STREAM_WINDOW, false, "z", &out), STREAM_TOO_FAR);
    assert_int_equal(feed(&rx, STREAM_WINDOW, false, "y", &out), STREAM_OK);   /* last slot of the window */
    assert_int_equal(feed(&rx, 0, false, "a", &out), STREAM_REPEAT);
    assert_int_equal(feed(&rx, 2, false, "c", &out), STREAM_REPEAT);
    assert_string_equal(out.data, "data: a\n\n");
    /* Reset starts over at 0. */
    stream_rx_reset(&rx);
    assert_int_equal(rx.next, 0);
    assert_int_equal(rx.npending, 0);

    /* Bytes held for a missing piece are bounded. */
    big = malloc(STREAM_MAX_PENDING_BYTES / 2 + 1);
    memset(big, 'x', STREAM_MAX_PENDING_BYTES / 2);
    big[STREAM_MAX_PENDING_BYTES / 2] = '\0';
    assert_int_equal(feed(&rx, 1, false, big, &out), STREAM_OK);
    assert_int_equal(feed(&rx, 2, false, big, &out), STREAM_OK);
    assert_int_equal(feed(&rx, 3, false, "x", &out), STREAM_TOO_FAR);
    assert_int_equal(rx.pending_bytes, STREAM_MAX_PENDING_BYTES);
    stream_rx_reset(&rx);
    free(big);

    /* One event joined from pieces is bounded too. */
    big = malloc(1024 * 1024 + 1);
    memset(big, 'y', 1024 * 1024);
    big[1024 * 1024] = '\0';
    {
        uint32_t seq = 0;
        stream_status_t st = STREAM_OK;

        while (st == STREAM_OK && seq < 10)
            st = feed(&rx, seq++, true, big, &out);
        assert_int_equal(st, STREAM_TOO_BIG);
        assert_true(seq * 1024u * 1024u > STREAM_MAX_EVENT_BYTES);
    }
    stream_rx_reset(&rx);
    free(big);
    buf_free(&out);
}

/* A thousand pieces in a shuffled order within the window come out in order. */
static void test_shuffled_window(void **state)
{
    enum { N = 1000 };
    stream_rx_t rx;
    buf_t out = BUF_INIT, want = BUF_INIT;
    uint32_t order[N];
    unsigned seed = 7;

    (void)state;
    stream_rx_init(&rx);
    for (uint32_t i = 0; i < N; i++)
        order[i] = i;
    /* Shuffle within blocks of 64 (less than the window). */
    for (uint32_t b = 0; b < N; b += 64) {
        uint32_t n = b + 64 <= N ? 64 : N - b;

        for (uint32_t i = n - 1; i > 0; i--) {
            uint32_t j = (seed = seed * 1103515245u + 12345u) % (i + 1), t = order[b + i];

            order[b + i] = order[b + j];
            order[b + j] = t;
        }
    }
    for (uint32_t i = 0; i < N; i++) {
        char piece[32], ev[48];

        snprintf(piece, sizeof piece, "%u", order[i]);
        assert_int_equal(feed(&rx, order[i], false, piece, &out), STREAM_OK);
        snprintf(ev, sizeof ev, "data: %u\n\n", i);
        buf_append_str(&want, ev);
    }
    assert_string_equal(out.data, want.data);
    assert_true(stream_rx_complete(&rx));
    stream_rx_reset(&rx);
    buf_free(&out);
    buf_free(&want);
}

/* ---- the shared buffer ----------------------------------------------------------------- */

static int suspends, resumes;

static void fake_suspend(void *ctx)
{
    (void)ctx;
    suspends++;
}

static void fake_resume(void *ctx)
{
    (void)ctx;
    resumes++;
}

static void test_take_push_end(void **state)
{
    gw_stream_t *s = stream_new();
    char buf[8];

    (void)state;
    suspends = resumes = 0;
    assert_non_null(s);
    stream_attach(s, fake_suspend, fake_resume, NULL);
    /* Nothing yet: the reader suspends; a push resumes it exactly once. */
    assert_int_equal(stream_take(s, buf, sizeof buf), STREAM_TAKE_WAIT);
    assert_int_equal(suspends, 1);
    assert_true(stream_push(s, "0123456789", 10));
    assert_int_equal(resumes, 1);
    assert_true(stream_push(s, "ab", 2));
    assert_int_equal(resumes, 1);   /* not suspended any more: no second resume */
    /* Taken in pieces no bigger than asked. */
    assert_int_equal(stream_take(s, buf, sizeof buf), 8);
    assert_memory_equal(buf, "01234567", 8);
    assert_int_equal(stream_take(s, buf, sizeof buf), 4);
    assert_memory_equal(buf, "89ab", 4);
    assert_int_equal(stream_take(s, buf, sizeof buf), STREAM_TAKE_WAIT);
    assert_int_equal(suspends, 2);
    /* The end brings its last bytes, then END; later pushes are refused. */
    stream_end(s, "[D]", 3, false);
    assert_int_equal(resumes, 2);
    assert_false(stream_push(s, "x", 1));
    stream_end(s, "again", 5, true);   /* only the first end counts */
    assert_int_equal(stream_take(s, buf, sizeof buf), 3);
    assert_memory_equal(buf, "[D]", 3);
    assert_int_equal(stream_take(s, buf, sizeof buf), STREAM_TAKE_END);
    assert_int_equal(stream_take(s, buf, sizeof buf), STREAM_TAKE_END);
    assert_true(stream_detach(s));
    stream_release(s);
}

static void test_abort_detach_and_limits(void **state)
{
    gw_stream_t *s = stream_new();
    char buf[16];
    char *big = malloc(STREAM_MAX_OUT_BYTES);

    (void)state;
    suspends = resumes = 0;
    stream_attach(s, fake_suspend, fake_resume, NULL);
    stream_retain(s);               /* the dispatcher's reference */
    /* The client falls behind: past the bound, pushes are refused. */
    memset(big, 'x', STREAM_MAX_OUT_BYTES);
    assert_true(stream_push(s, big, STREAM_MAX_OUT_BYTES - 1));
    assert_true(stream_push(s, "y", 1));
    assert_false(stream_push(s, "z", 1));
    free(big);
    stream_end(s, NULL, 0, true);
    /* An abort is reported after what was queued before it. */
    assert_int_equal(stream_take(s, buf, sizeof buf), (ssize_t)sizeof buf);
    /* The HTTP side leaves: no more wakes, even when the reader had suspended. */
    assert_true(stream_detach(s));
    assert_true(stream_is_gone(s));
    stream_release(s);              /* HTTP */
    stream_release(s);              /* dispatcher: freed here */

    /* Left by the client before the end: detach says so, and no resume is called. */
    s = stream_new();
    suspends = resumes = 0;
    stream_attach(s, fake_suspend, fake_resume, NULL);
    assert_int_equal(stream_take(s, buf, sizeof buf), STREAM_TAKE_WAIT);
    assert_false(stream_detach(s));
    assert_true(stream_push(s, "late", 4));
    stream_end(s, "x", 1, false);
    assert_int_equal(resumes, 0);
    stream_release(s);

    /* An abort with nothing queued cuts at once. */
    s = stream_new();
    stream_end(s, NULL, 0, true);
    assert_int_equal(stream_take(s, buf, sizeof buf), STREAM_TAKE_ABORT);
    stream_release(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_payload),
        cmocka_unit_test(test_token_make),
        cmocka_unit_test(test_token_equal),
        cmocka_unit_test(test_frame_event),
        cmocka_unit_test(test_frame_result),
        cmocka_unit_test(test_in_order),
        cmocka_unit_test(test_reordering),
        cmocka_unit_test(test_split_events),
        cmocka_unit_test(test_gaps_and_limits),
        cmocka_unit_test(test_shuffled_window),
        cmocka_unit_test(test_take_push_end),
        cmocka_unit_test(test_abort_detach_and_limits),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
