/* Unit tests for daemon/relay.c: the SSE parser (events split across arbitrary
 * write boundaries, multi-line data, comments, CRLF and CR, BOM, limits), the
 * assembler of chat and completions streams, the relay's pieces (seq, more,
 * oversized events cut at UTF-8 boundaries, [DONE]), the stream verdicts of
 * provider_classify, and the chunk batch of lease.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <jansson.h>

#include "lease.h"
#include "provider.h"
#include "relay.h"

/* ------------------------------------------------------------------ helpers */

typedef struct {
    char *events[64];
    size_t n;
    size_t stop_after;       /* 0: never */
} events_t;

static bool collect(void *ctx, const char *data, size_t len)
{
    events_t *e = ctx;

    assert_true(e->n < 64);
    assert_int_equal(data[len], '\0');
    e->events[e->n] = malloc(len + 1);
    memcpy(e->events[e->n], data, len + 1);
    e->n++;
    return e->stop_after == 0 || e->n < e->stop_after;
}

static void events_free(events_t *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->events[i]);
    e->n = 0;
}

/* Feeds text to a fresh parser in pieces of `step` bytes (0: all at once). */
static relay_sse_status_t feed_in_steps(const char *text, size_t step, events_t *out, size_t limit)
{
    relay_sse_t p;
    size_t len = strlen(text), off = 0;
    relay_sse_status_t st = RELAY_SSE_OK;

    relay_sse_init(&p, limit);
    if (step == 0)
        step = len ? len : 1;
    while (off < len && st == RELAY_SSE_OK) {
        size_t n = len - off < step ? len - off : step;
        st = relay_sse_feed(&p, text + off, n, collect, out);
        off += n;
    }
    relay_sse_free(&p);
    return st;
}

/* ------------------------------------------------------------------ SSE parser */

static void test_sse_events_survive_any_write_boundary(void **state)
{
    const char *text = "data: {\"a\":1}\n\n"
                       ": keep-alive comment\n\n"
                       "event: message\nid: 7\nretry: 100\ndata: {\"b\":2}\n\n"
                       "data: [DONE]\n\n";
    (void)state;
    for (size_t step = 0; step <= strlen(text); step++) {
        events_t e = { 0 };
        assert_int_equal(feed_in_steps(text, step, &e, 1 << 20), RELAY_SSE_OK);
        assert_int_equal(e.n, 3);
        assert_string_equal(e.events[0], "{\"a\":1}");
        assert_string_equal(e.events[1], "{\"b\":2}");
        assert_string_equal(e.events[2], "[DONE]");
        events_free(&e);
    }
}

static void test_sse_multiline_data_joined_with_newline(void **state)
{
    events_t e = { 0 };

    (void)state;
    assert_int_equal(feed_in_steps("data: first\ndata:second\ndata:  third\ndata\n\n", 0, &e, 1 << 20), RELAY_SSE_OK);
    assert_int_equal(e.n, 1);
    /* one leading space is removed, no more; "data" without a colon adds an empty line */
    assert_string_equal(e.events[0], "first\nsecond\n third\n");
    events_free(&e);
}

static void test_sse_crlf_and_cr_line_endings(void **state)
{
    const char *texts[] = {
        "data: x\r\n\r\ndata: y\r\ndata: z\r\n\r\n",
        "data: x\r\rdata: y\rdata: z\r\r",
        "data: x\n\ndata: y\r\ndata: z\r\r\n",
    };
    (void)state;
    for (size_t t = 0; t < 3; t++) {
        for (size_t step = 0; step <= 5; step++) {
            events_t e = { 0 };
            assert_int_equal(feed_in_steps(texts[t], step, &e, 1 << 20), RELAY_SSE_OK);
            assert_int_equal(e.n, 2);
            assert_string_equal(e.events[0], "x");
            assert_string_equal(e.events[1], "y\nz");
            events_free(&e);
        }
    }
}

static void test_sse_comments_other_fields_and_empty_events_ignored(void **state)
{
    events_t e = { 0 };

    (void)state;
    assert_int_equal(feed_in_steps(":hello\n\nevent: ping\n\nid: 3\n\n\n\ndata: real\n\n", 1, &e, 1 << 20), RELAY_SSE_OK);
    assert_int_equal(e.n, 1);
    assert_string_equal(e.events[0], "real");
    events_free(&e);
}

static void test_sse_bom_skipped_and_unfinished_event_dropped(void **state)
{
    events_t e = { 0 };

    (void)state;
    assert_int_equal(feed_in_steps("\xEF\xBB\xBF" "data: a\n\ndata: cut off\n", 2, &e, 1 << 20), RELAY_SSE_OK);
    assert_int_equal(e.n, 1);
    assert_string_equal(e.events[0], "a");
    events_free(&e);
}

static void test_sse_limit_and_stop(void **state)
{
    events_t e = { 0 };
    char big[300];

    (void)state;
    memset(big, 'x', sizeof big);
    memcpy(big, "data: ", 6);
    big[sizeof big - 1] = '\0';
    assert_int_equal(feed_in_steps(big, 7, &e, 100), RELAY_SSE_TOO_LARGE);
    assert_int_equal(e.n, 0);
    /* many short data lines add up to one event over the limit */
    {
        char text[4000] = "";
        for (int i = 0; i < 100; i++)
            strcat(text, "data: 0123456789\n");
        strcat(text, "\n");
        assert_int_equal(feed_in_steps(text, 0, &e, 500), RELAY_SSE_TOO_LARGE);
        assert_int_equal(e.n, 0);
        assert_int_equal(feed_in_steps(text, 3, &e, 1 << 20), RELAY_SSE_OK);
        assert_int_equal(e.n, 1);
        events_free(&e);
    }
    e.stop_after = 1;
    assert_int_equal(feed_in_steps("data: 1\n\ndata: 2\n\n", 0, &e, 1 << 20), RELAY_SSE_STOPPED);
    assert_int_equal(e.n, 1);
    events_free(&e);
}

/* ------------------------------------------------------------------ helpers */

static void test_stream_requested_only_for_top_level_true(void **state)
{
    (void)state;
    assert_true(relay_requested("{\"model\":\"m\",\"stream\":true}", strlen("{\"model\":\"m\",\"stream\":true}")));
    assert_false(relay_requested("{\"model\":\"m\",\"stream\":false}", strlen("{\"model\":\"m\",\"stream\":false}")));
    assert_false(relay_requested("{\"model\":\"m\",\"stream\":\"true\"}", strlen("{\"model\":\"m\",\"stream\":\"true\"}")));
    assert_false(relay_requested("{\"x\":{\"stream\":true}}", strlen("{\"x\":{\"stream\":true}}")));
    assert_false(relay_requested("{\"model\":\"m\"}", strlen("{\"model\":\"m\"}")));
    assert_false(relay_requested("not json", strlen("not json")));
    assert_true(relay_requested("{\"\\u0073tream\": true}", strlen("{\"\\u0073tream\": true}")));
}

static void test_piece_len_keeps_utf8_sequences_whole(void **state)
{
    const char *s = "ab\xC3\xA9" "cd\xE2\x82\xAC" "e\xF0\x9F\x98\x80";   /* ab é cd € e 😀 */

    (void)state;
    assert_int_equal(relay_piece_len(s, 3, 10), 3);
    assert_int_equal(relay_piece_len(s, strlen(s), 2), 2);
    assert_int_equal(relay_piece_len(s, strlen(s), 3), 2);      /* would cut é */
    assert_int_equal(relay_piece_len(s, strlen(s), 4), 4);
    assert_int_equal(relay_piece_len(s, strlen(s), 7), 6);      /* would cut € after 1 byte */
    assert_int_equal(relay_piece_len(s, strlen(s), 8), 6);      /* after 2 bytes */
    assert_int_equal(relay_piece_len(s, strlen(s), 12), 10);    /* 😀 after 2 bytes */
    assert_int_equal(relay_piece_len(s, strlen(s), 13), 10);
}

/* ------------------------------------------------------------------ assembler */

static char *assemble(relay_kind_t kind, const char *const *events, size_t n)
{
    relay_asm_t a;
    char *out;

    relay_asm_init(&a, kind, 1 << 20);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(relay_asm_add(&a, events[i], strlen(events[i])), RELAY_EV_CHUNK);
    out = relay_asm_result(&a, NULL);
    relay_asm_free(&a);
    assert_non_null(out);
    return out;
}

static void test_assemble_chat(void **state)
{
    const char *ev[] = {
        "{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}",
        "{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}",
        "{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\u00e9\\n\"},\"finish_reason\":null}]}",
        "{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}",
        "{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[],"
        "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}",
    };
    char *out = assemble(RELAY_KIND_CHAT, ev, 5);

    (void)state;
    assert_string_equal(out, "{\"id\":\"c1\",\"object\":\"chat.completion\",\"created\":7,\"model\":\"m\","
                             "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":"
                             "\"Hello \xC3\xA9\\n\"},\"finish_reason\":\"stop\"}],"
                             "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}");
    free(out);
    /* auto-detected from the delta, no usage, two choices */
    {
        const char *ev2[] = {
            "{\"id\":\"x\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":1,\"delta\":{\"content\":\"B\"}},"
            "{\"index\":0,\"delta\":{\"content\":\"A\"}}]}",
            "{\"id\":\"y\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":\"length\"},"
            "{\"index\":1,\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}",
        };
        out = assemble(RELAY_KIND_AUTO, ev2, 2);
        assert_string_equal(out, "{\"id\":\"x\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"m\","
                                 "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Aa\"},"
                                 "\"finish_reason\":\"length\"},{\"index\":1,\"message\":{\"role\":\"assistant\","
                                 "\"content\":\"Bb\"},\"finish_reason\":\"stop\"}]}");
        free(out);
    }
}

static void test_assemble_completions(void **state)
{
    const char *ev[] = {
        "{\"id\":\"t1\",\"object\":\"text_completion\",\"created\":9,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"text\":\"echo: h\",\"finish_reason\":null}]}",
        "{\"id\":\"t1\",\"object\":\"text_completion\",\"created\":9,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"text\":\"i\",\"finish_reason\":null}]}",
        "{\"id\":\"t1\",\"object\":\"text_completion\",\"created\":9,\"model\":\"m\","
        "\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"stop\"}]}",
    };
    char *out;

    (void)state;
    out = assemble(RELAY_KIND_TEXT, ev, 3);
    assert_string_equal(out, "{\"id\":\"t1\",\"object\":\"text_completion\",\"created\":9,\"model\":\"m\","
                             "\"choices\":[{\"index\":0,\"text\":\"echo: hi\",\"finish_reason\":\"stop\"}]}");
    free(out);
    out = assemble(RELAY_KIND_AUTO, ev, 3);
    assert_non_null(strstr(out, "\"object\":\"text_completion\""));
    free(out);
}

static void test_assemble_refuses_what_is_not_a_chunk(void **state)
{
    relay_asm_t a;

    (void)state;
    relay_asm_init(&a, RELAY_KIND_CHAT, 10);
    assert_int_equal(relay_asm_add(&a, "[DONE]", strlen("[DONE]")), RELAY_EV_DONE);
    assert_int_equal(relay_asm_add(&a, "", strlen("")), RELAY_EV_SKIP);
    assert_int_equal(relay_asm_add(&a, "{\"choi", strlen("{\"choi")), RELAY_EV_ERROR);
    assert_non_null(strstr(a.error, "malformed event"));
    assert_int_equal(relay_asm_add(&a, "[1]", strlen("[1]")), RELAY_EV_ERROR);
    assert_int_equal(relay_asm_add(&a, "{\"choices\":3}", strlen("{\"choices\":3}")), RELAY_EV_ERROR);
    assert_int_equal(relay_asm_add(&a, "{\"error\":{\"message\":\"overloaded\"}}", strlen("{\"error\":{\"message\":\"overloaded\"}}")), RELAY_EV_ERROR);
    assert_non_null(strstr(a.error, "overloaded"));
    assert_int_equal(relay_asm_add(&a, "{\"choices\":[{\"delta\":{\"content\":\"0123456789\"}}]}", strlen("{\"choices\":[{\"delta\":{\"content\":\"0123456789\"}}]}")),
                     RELAY_EV_CHUNK);
    assert_int_equal(relay_asm_add(&a, "{\"choices\":[{\"delta\":{\"content\":\"x\"}}]}", strlen("{\"choices\":[{\"delta\":{\"content\":\"x\"}}]}")), RELAY_EV_ERROR);
    assert_true(a.too_large);
    relay_asm_free(&a);
}

/* ------------------------------------------------------------------ relay */

typedef struct {
    uint32_t seq[64];
    bool more[64];
    char *data[64];
    size_t n;
    bool fail;
} pieces_t;

static int take_piece(void *ctx, uint32_t seq, bool more, const char *data, size_t len)
{
    pieces_t *p = ctx;

    if (p->fail)
        return -1;
    assert_true(p->n < 64);
    p->seq[p->n] = seq;
    p->more[p->n] = more;
    p->data[p->n] = malloc(len + 1);
    memcpy(p->data[p->n], data, len);
    p->data[p->n][len] = '\0';
    p->n++;
    return 0;
}

static void pieces_free(pieces_t *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->data[i]);
    p->n = 0;
}

static const char CHAT_STREAM[] =
    "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n"
    ": comment\n\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n"
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}]}\n\n"
    "data: [DONE]\n\n"
    "data: {\"ignored\": true}\n\n";

static void test_relay_pieces_in_order_without_done(void **state)
{
    (void)state;
    for (size_t step = 1; step <= sizeof CHAT_STREAM; step += 3) {
        relay_job_t s;
        pieces_t p = { 0 };
        size_t len = strlen(CHAT_STREAM);
        char *out;

        relay_job_init(&s, RELAY_KIND_CHAT, 1 << 20, take_piece, &p);
        for (size_t off = 0; off < len; off += step)
            assert_true(relay_job_feed(&s, CHAT_STREAM + off, len - off < step ? len - off : step));
        assert_int_equal(p.n, 3);
        for (uint32_t i = 0; i < 3; i++) {
            assert_int_equal(p.seq[i], i);
            assert_false(p.more[i]);
        }
        assert_string_equal(p.data[1], "{\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}");
        assert_true(s.done);
        assert_int_equal(s.events, 3);
        assert_true(relay_job_clean(&s, false));
        out = relay_asm_result(&s.as, NULL);
        assert_string_equal(out, "{\"id\":\"c\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"m\",\"choices\":"
                                 "[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hi!\"},"
                                 "\"finish_reason\":\"stop\"}]}");
        free(out);
        relay_job_free(&s);
        pieces_free(&p);
    }
}

static void test_relay_oversized_event_is_cut_into_pieces(void **state)
{
    /* one chunk of 20000 bytes of content with multi-byte characters around the cuts */
    size_t content_len = 20000;
    char *content = malloc(content_len + 1);
    buf_t ev = BUF_INIT;
    relay_job_t s;
    pieces_t p = { 0 };
    buf_t joined = BUF_INIT;

    (void)state;
    for (size_t i = 0; i < content_len;) {
        if (i % 7 == 3 && i + 3 <= content_len) {
            memcpy(content + i, "\xE2\x82\xAC", 3);
            i += 3;
        } else {
            content[i++] = 'a';
        }
    }
    content[content_len] = '\0';
    buf_append_str(&ev, "data: {\"choices\":[{\"index\":0,\"text\":\"");
    buf_append_str(&ev, content);
    buf_append_str(&ev, "\",\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
    relay_job_init(&s, RELAY_KIND_TEXT, 1 << 20, take_piece, &p);
    assert_true(relay_job_feed(&s, ev.data, ev.len));
    assert_int_equal(s.events, 1);
    assert_true(p.n >= 3);
    for (size_t i = 0; i < p.n; i++) {
        size_t n = strlen(p.data[i]);
        assert_int_equal(p.seq[i], i);
        assert_int_equal(p.more[i], i + 1 < p.n);
        assert_true(n <= RELAY_PIECE_MAX);
        if (i + 1 < p.n)
            assert_true(n > RELAY_PIECE_MAX - 4);
        if (i + 1 < p.n)
            assert_true(((unsigned char)p.data[i + 1][0] & 0xC0) != 0x80);
        buf_append(&joined, p.data[i], n);
    }
    assert_int_equal(joined.len, ev.len - strlen("data: ") - strlen("\n\ndata: [DONE]\n\n"));
    assert_memory_equal(joined.data, ev.data + 6, joined.len);
    assert_true(relay_job_clean(&s, true));
    relay_job_free(&s);
    pieces_free(&p);
    buf_free(&joined);
    buf_free(&ev);
    free(content);
}

static void test_relay_failures(void **state)
{
    relay_job_t s;
    pieces_t p = { 0 };
    const char *good = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";

    (void)state;
    /* malformed after a good chunk: stops, one event relayed */
    relay_job_init(&s, RELAY_KIND_CHAT, 1 << 20, take_piece, &p);
    assert_true(relay_job_feed(&s, good, strlen(good)));
    assert_false(relay_job_feed(&s, "data: {oops\n\n", strlen("data: {oops\n\n")));
    assert_true(s.failed);
    assert_int_equal(s.events, 1);
    assert_non_null(strstr(s.error, "malformed event"));
    assert_false(relay_job_feed(&s, good, strlen(good)));     /* stays stopped */
    assert_false(relay_job_clean(&s, true));
    relay_job_free(&s);
    pieces_free(&p);

    /* no finish_reason, no [DONE]: not clean even when the body ended */
    relay_job_init(&s, RELAY_KIND_CHAT, 1 << 20, take_piece, &p);
    assert_true(relay_job_feed(&s, good, strlen(good)));
    assert_false(relay_job_clean(&s, true));
    relay_job_free(&s);
    pieces_free(&p);

    /* an event over the limit */
    relay_job_init(&s, RELAY_KIND_CHAT, 30, take_piece, &p);
    assert_false(relay_job_feed(&s, good, strlen(good)));
    assert_true(s.too_large);
    assert_non_null(strstr(s.error, "30-byte limit"));
    relay_job_free(&s);

    /* the sink refuses */
    p.fail = true;
    relay_job_init(&s, RELAY_KIND_CHAT, 1 << 20, take_piece, &p);
    assert_false(relay_job_feed(&s, good, strlen(good)));
    assert_non_null(strstr(s.error, "could not queue"));
    relay_job_free(&s);
}

/* ------------------------------------------------------------------ verdicts */

static void test_stream_verdicts(void **state)
{
    provider_stream_t ps = { 0 };
    provider_response_t r = { .curl_code = CURLE_OK, .status = 200, .body = "", .curl_error = "",
                              .size_limit = 1 << 20, .stream = &ps };
    provider_verdict_t v;

    (void)state;
    ps.clean = true;
    ps.result = "{\"a\":1}";
    ps.result_len = 7;
    ps.events = 3;
    provider_classify(&r, &v);
    assert_true(v.complete);
    assert_string_equal(v.result, "{\"a\":1}");

    /* cut after chunks: stream_broken, not retryable */
    ps.clean = false;
    ps.result = NULL;
    r.curl_code = CURLE_PARTIAL_FILE;
    r.curl_error = "transfer closed";
    provider_classify(&r, &v);
    assert_false(v.complete);
    assert_false(v.retryable);
    assert_string_equal(v.code, "stream_broken");
    assert_non_null(strstr(v.message, "after 3 chunks"));
    assert_non_null(strstr(v.message, "connection cut"));

    /* cut before any chunk: retryable like a non-stream transfer */
    ps.events = 0;
    provider_classify(&r, &v);
    assert_true(v.retryable);
    assert_string_equal(v.code, "transport_error");

    /* malformed first event: bad_response */
    ps.error = "malformed event: not valid JSON";
    r.curl_code = CURLE_WRITE_ERROR;
    provider_classify(&r, &v);
    assert_false(v.retryable);
    assert_string_equal(v.code, "bad_response");
    assert_non_null(strstr(v.message, "malformed event"));

    /* ended without finish_reason after chunks */
    ps.error = NULL;
    ps.events = 2;
    r.curl_code = CURLE_OK;
    provider_classify(&r, &v);
    assert_string_equal(v.code, "stream_broken");
    assert_non_null(strstr(v.message, "without a finish_reason"));
}

/* ------------------------------------------------------------------ chunk batch */

static void test_chunk_batch_and_outcome_order(void **state)
{
    lease_outbox_t chunks, outcomes;
    buf_t param = BUF_INIT;
    json_t *arr;

    (void)state;
    lease_outbox_init(&chunks);
    lease_outbox_init(&outcomes);
    assert_int_equal(lease_outbox_add_chunk(&chunks, 7, 1, 0, false, "{\"x\":\"\\\"q\"}", 11), 0);
    assert_int_equal(lease_outbox_add_chunk(&chunks, 8, 2, 0, true, "ab", 2), 0);
    assert_int_equal(lease_outbox_add_chunk(&chunks, 7, 1, 1, false, "[é]", 4), 0);
    assert_int_equal(lease_outbox_add_chunk(&chunks, 8, 2, 1, false, "cd", 2), 0);
    assert_int_equal(lease_outbox_add_result(&outcomes, 5, 1, "{}", 2), 0);
    assert_int_equal(lease_outbox_add_result(&outcomes, 8, 2, "{}", 2), 0);
    assert_int_equal(lease_outbox_add_result(&outcomes, 9, 1, "{}", 2), 0);
    assert_int_equal(lease_outbox_ready_prefix(&outcomes, &chunks), 1);     /* 8 still has pieces */

    assert_int_equal(lease_outbox_take(&chunks, 1000, &param), 4);
    arr = json_loads(param.data, 0, NULL);
    assert_true(json_is_array(arr));
    assert_int_equal(json_array_size(arr), 4);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "data")), "{\"x\":\"\\\"q\"}");
    /* in job order, each job's pieces in their own order */
    assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 1), "seq")), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 1), "data")), "[é]");
    assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 2), "id")), 8);
    assert_true(json_is_true(json_object_get(json_array_get(arr, 2), "more")));
    json_decref(arr);
    lease_outbox_sent_done(&chunks);
    assert_int_equal(lease_outbox_ready_prefix(&outcomes, &chunks), 3);

    /* dropping the pieces of one job keeps the others intact */
    lease_outbox_add_chunk(&chunks, 1, 1, 0, false, "a", 1);
    lease_outbox_add_chunk(&chunks, 2, 1, 0, false, "b", 1);
    lease_outbox_add_chunk(&chunks, 1, 1, 1, false, "c", 1);
    lease_outbox_add_chunk(&chunks, 3, 1, 0, false, "d", 1);
    assert_int_equal(lease_outbox_drop_job(&chunks, 1, 1), 2);
    assert_int_equal(lease_outbox_drop_job(&chunks, 1, 1), 0);
    assert_int_equal(lease_outbox_take(&chunks, 1000, &param), 2);
    assert_string_equal(param.data, "[{\"id\":2,\"attempt\":1,\"seq\":0,\"more\":false,\"data\":\"b\"},"
                                    "{\"id\":3,\"attempt\":1,\"seq\":0,\"more\":false,\"data\":\"d\"}]");
    assert_int_equal(lease_outbox_drop_job(&outcomes, 8, 2), 1);
    assert_int_equal(lease_outbox_take(&outcomes, 1000, &param), 2);
    assert_string_equal(param.data, "[{\"id\":5,\"attempt\":1,\"result\":{}},{\"id\":9,\"attempt\":1,\"result\":{}}]");
    lease_outbox_free(&chunks);
    lease_outbox_free(&outcomes);
    buf_free(&param);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sse_events_survive_any_write_boundary),
        cmocka_unit_test(test_sse_multiline_data_joined_with_newline),
        cmocka_unit_test(test_sse_crlf_and_cr_line_endings),
        cmocka_unit_test(test_sse_comments_other_fields_and_empty_events_ignored),
        cmocka_unit_test(test_sse_bom_skipped_and_unfinished_event_dropped),
        cmocka_unit_test(test_sse_limit_and_stop),
        cmocka_unit_test(test_stream_requested_only_for_top_level_true),
        cmocka_unit_test(test_piece_len_keeps_utf8_sequences_whole),
        cmocka_unit_test(test_assemble_chat),
        cmocka_unit_test(test_assemble_completions),
        cmocka_unit_test(test_assemble_refuses_what_is_not_a_chunk),
        cmocka_unit_test(test_relay_pieces_in_order_without_done),
        cmocka_unit_test(test_relay_oversized_event_is_cut_into_pieces),
        cmocka_unit_test(test_relay_failures),
        cmocka_unit_test(test_stream_verdicts),
        cmocka_unit_test(test_chunk_batch_and_outcome_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
