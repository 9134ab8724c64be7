/* libFuzzer target: the daemon's classification of what a provider answered
 * (daemon/provider.c: provider_classify, provider_probe_healthy and the /props,
 * /server_info and /v1/models parsers), on arbitrary responses.
 *
 * Input: bytes 0-1 the HTTP status (mod 700), byte 2 the curl result code (mod 100,
 * mostly CURLE_OK), byte 3 flags (too_large; a streamed answer and how it went);
 * the rest is the body.
 *
 * Oracles: an unsettled verdict always names a code and a NUL-terminated message; a
 * complete verdict only for a 2xx (or a clean stream) and then its result is a JSON
 * object with no NUL byte (it is embedded raw in dispatch.exchange's JSON text); 4xx is never retryable, 5xx and transport failures always are; the
 * capacity parsers give -1 or 1..100000; the model list parser gives -1 or that many
 * non-empty strings of at most 256 bytes. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "provider.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fail(const char *why, const provider_verdict_t *v)
{
    fprintf(stderr, "%s (code %s, message %s)\n", why, v->code ? v->code : "(null)", v->message);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    provider_response_t r;
    provider_stream_t st;
    provider_verdict_t v;
    char reason[200], *body, **ids = NULL;
    size_t len;
    long n;
    int count;

    if (size < 4)
        return 0;
    len = size - 4;
    body = malloc(len + 1);   /* the transfer's buffer is NUL-terminated */
    if (!body)
        return 0;
    memcpy(body, data + 4, len);
    body[len] = '\0';

    memset(&r, 0, sizeof r);
    r.status = ((long)data[0] << 8 | data[1]) % 700;
    r.curl_code = (data[2] < 200) ? CURLE_OK : (CURLcode)(data[2] % 100);
    r.curl_error = r.curl_code == CURLE_OK ? "" : "fuzzed transfer error";
    r.body = body;
    r.body_len = len;
    r.too_large = (data[3] & 1) != 0;
    r.size_limit = 1 << 20;
    if (data[3] & 2) {
        /* A streamed answer: the body stands for the assembled result. */
        memset(&st, 0, sizeof st);
        st.events = data[3] >> 5;
        st.clean = (data[3] & 4) != 0;
        st.too_large = (data[3] & 8) != 0;
        st.error = (data[3] & 16) ? "fuzzed stream error" : NULL;
        st.result = (data[3] & 4) ? body : NULL;
        st.result_len = (data[3] & 4) ? len : 0;
        r.stream = &st;
    }

    provider_classify(&r, &v);
    if (memchr(v.message, '\0', sizeof v.message) == NULL)
        fail("message is not NUL-terminated", &v);
    if (v.complete) {
        json_t *doc;

        if (!r.stream && (r.status < 200 || r.status >= 300 || r.curl_code != CURLE_OK || r.too_large))
            fail("complete for a response that is not a whole 2xx", &v);
        if (!v.result)
            fail("complete without a result", &v);
        /* The result is embedded as sent in dispatch.exchange's JSON text, which goes
         * to PostgreSQL as a C string. */
        if (memchr(v.result, '\0', v.result_len) != NULL)
            fail("complete with a result that holds a NUL byte", &v);
        doc = json_loadb(v.result, v.result_len, 0, NULL);
        if (!r.stream && !json_is_object(doc))
            fail("complete with a result that is not a JSON object", &v);
        json_decref(doc);
    } else {
        if (!v.code || !*v.code)
            fail("refused without a code", &v);
        if (!r.stream && !r.too_large && r.curl_code == CURLE_OK) {
            if (r.status >= 400 && r.status < 500 && v.retryable)
                fail("4xx classified retryable", &v);
            if (r.status >= 500 && r.status < 600 && !v.retryable)
                fail("5xx classified not retryable", &v);
        }
        if (!r.stream && !r.too_large && r.curl_code != CURLE_OK && !v.retryable)
            fail("transport failure classified not retryable", &v);
    }

    (void)provider_probe_healthy(&r, reason, sizeof reason);
    if (memchr(reason, '\0', sizeof reason) == NULL)
        abort();

    n = provider_parse_total_slots(body, len);
    if (n != -1 && (n < 1 || n > 100000))
        abort();
    n = provider_parse_max_running(body, len);
    if (n != -1 && (n < 1 || n > 100000))
        abort();
    count = provider_parse_models(body, len, &ids);
    if (count >= 0) {
        for (int i = 0; i < count; i++) {
            size_t l = strlen(ids[i]);

            if (l < 1 || l > 256)
                abort();
            free(ids[i]);
        }
        free(ids);
    } else if (ids) {
        abort();
    }
    free(body);
    return 0;
}
