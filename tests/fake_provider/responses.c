/* responses: builds the fake provider's JSON bodies and SSE events from a request.
 * The reply text is "echo: " + the last user message (or the prompt), so a test can
 * tell which request produced which answer, streamed or not. */
#include "responses.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FAKE_ECHO_PREFIX "echo: "
#define FAKE_ECHO_MAX 256          /* bytes of request text echoed back */
#define FAKE_EMBED_DIM 16          /* embedding length unless the request asks */
#define FAKE_EMBED_DIM_MAX 4096
#define FAKE_MODEL_CREATED 1700000000
#define FAKE_CTX 4096

static const char *const family_names[] = {"llamacpp", "vllm", "sglang", "ollama"};

bool fake_family_parse(const char *text, fake_family_t *out)
{
    for (size_t i = 0; i < sizeof family_names / sizeof family_names[0]; i++) {
        if (strcmp(text, family_names[i]) == 0) {
            *out = (fake_family_t)i;
            return true;
        }
    }
    if (strcmp(text, "llama.cpp") == 0) {
        *out = FAKE_FAMILY_LLAMACPP;
        return true;
    }
    return false;
}

const char *fake_family_name(fake_family_t family)
{
    return family_names[family];
}

/* ---- growable text buffer ---------------------------------------------------- */

typedef struct {
    char *p;
    size_t len;
    size_t cap;
    bool failed;
} textbuf_t;

static void tb_append(textbuf_t *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void tb_puts(textbuf_t *b, const char *s)
{
    tb_append(b, s, strlen(s));
}

/* ---- pieces ------------------------------------------------------------------ */

void fake_pieces_free(fake_pieces_t *p)
{
    for (size_t i = 0; i < p->count; i++)
        free(p->parts[i]);
    free(p->parts);
    p->parts = NULL;
    p->count = p->cap = 0;
}

size_t fake_pieces_total(const fake_pieces_t *p)
{
    size_t total = 0;
    for (size_t i = 0; i < p->count; i++)
        total += strlen(p->parts[i]);
    return total;
}

/* Takes ownership of s (freed on failure). */
static bool pieces_push(fake_pieces_t *p, char *s)
{
    if (!s)
        return false;
    if (p->count == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 8;
        char **parts = realloc(p->parts, cap * sizeof *parts);
        if (!parts) {
            free(s);
            return false;
        }
        p->parts = parts;
        p->cap = cap;
    }
    p->parts[p->count++] = s;
    return true;
}

/* Splits [0, len) into at most n ranges of similar size that start on UTF-8 character
 * boundaries; bounds[0..k] receives the k+1 edges. Returns k (0 when len is 0). */
static size_t split_bounds(const char *s, size_t len, size_t n, size_t *bounds)
{
    size_t k = 0;

    if (len == 0)
        return 0;
    if (n == 0)
        n = 1;
    bounds[0] = 0;
    for (size_t i = 1; i < n; i++) {
        size_t b = len * i / n;
        while (b < len && ((unsigned char)s[b] & 0xC0) == 0x80)
            b++;
        if (b > bounds[k] && b < len)
            bounds[++k] = b;
    }
    bounds[++k] = len;
    return k;
}

bool fake_pieces_split(fake_pieces_t *p, char *body, size_t n)
{
    size_t len;
    size_t *bounds;
    size_t k;
    bool ok = true;

    if (!body)
        return false;
    len = strlen(body);
    if (n <= 1 || len <= 1)
        return pieces_push(p, body);
    bounds = malloc((n + 1) * sizeof *bounds);
    if (!bounds) {
        free(body);
        return false;
    }
    k = split_bounds(body, len, n, bounds);
    for (size_t i = 0; ok && i < k; i++)
        ok = pieces_push(p, strndup(body + bounds[i], bounds[i + 1] - bounds[i]));
    free(bounds);
    free(body);
    return ok;
}

/* ---- request text ------------------------------------------------------------- */

/* Appends the text of an OpenAI message content: a string, or an array of parts of
 * which the {"type":"text","text":...} ones count. */
static void content_text(textbuf_t *b, json_t *content)
{
    if (json_is_string(content)) {
        tb_append(b, json_string_value(content), json_string_length(content));
    } else if (json_is_array(content)) {
        size_t i;
        json_t *part;
        json_array_foreach(content, i, part) {
            json_t *text = json_object_get(part, "text");
            if (json_is_string(text))
                tb_append(b, json_string_value(text), json_string_length(text));
        }
    }
}

/* A prompt or embedding input item as text: strings as they are, anything else (token
 * arrays) as compact JSON. */
static void item_text(textbuf_t *b, json_t *item)
{
    if (json_is_string(item)) {
        tb_append(b, json_string_value(item), json_string_length(item));
    } else {
        char *dump = json_dumps(item, JSON_COMPACT | JSON_ENCODE_ANY);
        if (dump)
            tb_puts(b, dump);
        else
            b->failed = true;
        free(dump);
    }
}

/* Rough token count, the same rule everywhere: one token per 4 bytes, rounded up. */
static long tokens_of(size_t bytes)
{
    return (long)((bytes + 3) / 4);
}

/* The reply text and the prompt size (bytes) of a chat or completion request. */
static char *reply_text(fake_api_t api, json_t *req, size_t *prompt_bytes)
{
    textbuf_t src = {0}, out = {0};
    size_t n;

    *prompt_bytes = 0;
    if (api == FAKE_API_CHAT) {
        json_t *messages = json_object_get(req, "messages");
        json_t *last_user = NULL, *msg;
        size_t i;
        json_array_foreach(messages, i, msg) {
            textbuf_t all = {0};
            content_text(&all, json_object_get(msg, "content"));
            *prompt_bytes += all.len;
            free(all.p);
            json_t *role = json_object_get(msg, "role");
            if (json_is_string(role) && strcmp(json_string_value(role), "user") == 0)
                last_user = msg;
        }
        if (!last_user)
            last_user = json_array_get(messages, json_array_size(messages) - 1);
        content_text(&src, json_object_get(last_user, "content"));
    } else {
        json_t *prompt = json_object_get(req, "prompt");
        if (json_is_array(prompt) && json_array_size(prompt) > 0
            && json_is_string(json_array_get(prompt, 0)))
            prompt = json_array_get(prompt, 0);
        item_text(&src, prompt);
        *prompt_bytes = src.len;
    }
    if (src.failed) {
        free(src.p);
        return NULL;
    }
    n = src.len;
    if (n > FAKE_ECHO_MAX) {
        n = FAKE_ECHO_MAX;
        while (n > 0 && ((unsigned char)src.p[n] & 0xC0) == 0x80)
            n--;
    }
    tb_puts(&out, FAKE_ECHO_PREFIX);
    tb_append(&out, src.p ? src.p : "", n);
    free(src.p);
    if (out.failed) {
        free(out.p);
        return NULL;
    }
    return out.p;
}

/* ---- validation --------------------------------------------------------------- */

bool fake_resp_validate(fake_api_t api, json_t *req, char *err, size_t errlen)
{
    json_t *model = json_object_get(req, "model");
    json_t *stream = json_object_get(req, "stream");

    if (!json_is_string(model) || json_string_length(model) == 0) {
        snprintf(err, errlen, "you must provide a model parameter");
        return false;
    }
    if (stream && !json_is_boolean(stream) && !json_is_null(stream)) {
        snprintf(err, errlen, "'stream' must be a boolean");
        return false;
    }
    switch (api) {
    case FAKE_API_CHAT: {
        json_t *messages = json_object_get(req, "messages");
        json_t *msg;
        size_t i;
        if (!json_is_array(messages) || json_array_size(messages) == 0) {
            snprintf(err, errlen, "'messages' must be a non-empty array");
            return false;
        }
        json_array_foreach(messages, i, msg) {
            if (!json_is_object(msg) || !json_is_string(json_object_get(msg, "role"))) {
                snprintf(err, errlen, "messages[%zu] must be an object with a 'role'", i);
                return false;
            }
        }
        return true;
    }
    case FAKE_API_COMPLETION: {
        json_t *prompt = json_object_get(req, "prompt");
        if (!json_is_string(prompt) && !json_is_array(prompt)) {
            snprintf(err, errlen, "'prompt' must be a string or an array");
            return false;
        }
        return true;
    }
    case FAKE_API_EMBEDDING: {
        json_t *input = json_object_get(req, "input");
        if (!json_is_string(input) && !(json_is_array(input) && json_array_size(input) > 0)) {
            snprintf(err, errlen, "'input' must be a string or a non-empty array");
            return false;
        }
        return true;
    }
    }
    return false;
}

/* ---- bodies ------------------------------------------------------------------- */

static char *dump(json_t *j)
{
    char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(j);
    return s;
}

/* "data: <json>\n\n"; consumes j. */
static char *sse_event(json_t *j)
{
    char *body = dump(j);
    char *ev;

    if (!body)
        return NULL;
    ev = malloc(strlen(body) + 9);
    if (ev)
        sprintf(ev, "data: %s\n\n", body);
    free(body);
    return ev;
}

static json_t *usage_json(long prompt, long completion)
{
    return json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)prompt,
                     "completion_tokens", (json_int_t)completion,
                     "total_tokens", (json_int_t)(prompt + completion));
}

static json_t *chunk_base(fake_api_t api, const char *id, long created, const char *model)
{
    return json_pack("{s:s, s:s, s:I, s:s}", "id", id, "object",
                     api == FAKE_API_CHAT ? "chat.completion.chunk" : "text_completion",
                     "created", (json_int_t)created, "model", model);
}

/* One stream choice: chat → delta (role and/or content), completion → text. */
static json_t *stream_choice(fake_api_t api, const char *role, const char *text, size_t len,
                             const char *finish)
{
    json_t *choice = json_pack("{s:i, s:n, s:o}", "index", 0, "logprobs", "finish_reason",
                               finish ? json_string(finish) : json_null());
    if (!choice)
        return NULL;
    if (api == FAKE_API_CHAT) {
        json_t *delta = json_object();
        if (role)
            json_object_set_new(delta, "role", json_string(role));
        if (text)
            json_object_set_new(delta, "content", json_stringn(text, len));
        json_object_set_new(choice, "delta", delta);
    } else {
        json_object_set_new(choice, "text", json_stringn(text ? text : "", text ? len : 0));
    }
    return choice;
}

static bool stream_push(fake_pieces_t *out, fake_api_t api, const char *id, long created,
                        const char *model, json_t *choice)
{
    json_t *chunk = chunk_base(api, id, created, model);
    if (!chunk || !choice) {
        json_decref(chunk);
        json_decref(choice);
        return false;
    }
    json_object_set_new(chunk, "choices", json_pack("[o]", choice));
    return pieces_push(out, sse_event(chunk));
}

static bool build_stream(fake_api_t api, json_t *req, const char *id, long created,
                         const char *model, const char *text, long prompt_tokens,
                         size_t chunks, fake_pieces_t *out)
{
    size_t len = strlen(text);
    size_t *bounds = malloc((chunks + 2) * sizeof *bounds);
    size_t k;
    bool ok = true;
    json_t *opts = json_object_get(req, "stream_options");

    if (!bounds)
        return false;
    k = split_bounds(text, len, chunks, bounds);
    if (api == FAKE_API_CHAT)
        ok = stream_push(out, api, id, created, model, stream_choice(api, "assistant", "", 0, NULL));
    for (size_t i = 0; ok && i < k; i++)
        ok = stream_push(out, api, id, created, model,
                         stream_choice(api, NULL, text + bounds[i], bounds[i + 1] - bounds[i], NULL));
    free(bounds);
    if (ok)
        ok = stream_push(out, api, id, created, model,
                         stream_choice(api, NULL, api == FAKE_API_CHAT ? NULL : "", 0, "stop"));
    if (ok && json_is_true(json_object_get(opts, "include_usage"))) {
        json_t *chunk = chunk_base(api, id, created, model);
        if (chunk) {
            json_object_set_new(chunk, "choices", json_array());
            json_object_set_new(chunk, "usage", usage_json(prompt_tokens, tokens_of(len)));
        }
        ok = pieces_push(out, sse_event(chunk));
    }
    if (ok)
        ok = pieces_push(out, strdup("data: [DONE]\n\n"));
    return ok;
}

static char *build_whole(fake_api_t api, const char *id, long created, const char *model,
                         const char *text, long prompt_tokens)
{
    json_t *choice;
    json_t *body;

    if (api == FAKE_API_CHAT)
        choice = json_pack("{s:i, s:{s:s, s:s}, s:n, s:s}", "index", 0, "message", "role",
                           "assistant", "content", text, "logprobs", "finish_reason", "stop");
    else
        choice = json_pack("{s:i, s:s, s:n, s:s}", "index", 0, "text", text, "logprobs",
                           "finish_reason", "stop");
    body = json_pack("{s:s, s:s, s:I, s:s, s:[o], s:o}", "id", id, "object",
                     api == FAKE_API_CHAT ? "chat.completion" : "text_completion", "created",
                     (json_int_t)created, "model", model, "choices", choice, "usage",
                     usage_json(prompt_tokens, tokens_of(strlen(text))));
    return dump(body);
}

/* splitmix64: a well-mixed 64-bit value from a counter. */
static uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 0xCBF29CE484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001B3ULL;
    }
    return h;
}

/* A unit-length vector that depends only on the text and the dimension. */
static json_t *embedding_of(const char *text, size_t len, size_t dim)
{
    uint64_t seed = fnv1a(text, len);
    double *v = malloc(dim * sizeof *v);
    double norm = 0;
    json_t *arr = json_array();

    if (!v || !arr) {
        free(v);
        json_decref(arr);
        return NULL;
    }
    for (size_t j = 0; j < dim; j++) {
        double u = (double)(mix64(seed + j) >> 11) * (1.0 / 9007199254740992.0);
        v[j] = 2.0 * u - 1.0;
        norm += v[j] * v[j];
    }
    norm = norm > 0 ? sqrt(norm) : 1.0;
    for (size_t j = 0; j < dim; j++)
        json_array_append_new(arr, json_real(v[j] / norm));
    free(v);
    return arr;
}

static char *build_embeddings(json_t *req, const char *model)
{
    json_t *input = json_object_get(req, "input");
    json_t *dims = json_object_get(req, "dimensions");
    size_t dim = FAKE_EMBED_DIM;
    json_t *data = json_array();
    size_t total = 0;
    size_t n_items;

    if (json_is_integer(dims) && json_integer_value(dims) > 0
        && json_integer_value(dims) <= FAKE_EMBED_DIM_MAX)
        dim = (size_t)json_integer_value(dims);
    /* A string, or an array of token ids, is one input; any other array is a list. */
    bool single = json_is_string(input) || json_is_integer(json_array_get(input, 0));
    n_items = single ? 1 : json_array_size(input);
    for (size_t i = 0; data && i < n_items; i++) {
        textbuf_t t = {0};
        item_text(&t, single ? input : json_array_get(input, i));
        json_t *vec = t.failed ? NULL : embedding_of(t.p ? t.p : "", t.len, dim);
        total += t.len;
        free(t.p);
        if (!vec || json_array_append_new(data, json_pack("{s:s, s:I, s:o}", "object", "embedding",
                                                          "index", (json_int_t)i, "embedding", vec))) {
            json_decref(data);
            data = NULL;
        }
    }
    if (!data)
        return NULL;
    json_t *body = json_pack("{s:s, s:o, s:s, s:{s:I, s:I}}", "object", "list", "data", data,
                             "model", model, "usage", "prompt_tokens", (json_int_t)tokens_of(total),
                             "total_tokens", (json_int_t)tokens_of(total));
    char *s = body ? json_dumps(body, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(body);
    return s;
}

bool fake_resp_build(fake_api_t api, json_t *req, bool stream, size_t chunks,
                     unsigned long long id_seq, fake_pieces_t *out)
{
    const char *model = json_string_value(json_object_get(req, "model"));
    long created = (long)time(NULL);
    char id[64];
    size_t prompt_bytes;
    char *text;
    bool ok;

    if (api == FAKE_API_EMBEDDING)
        return pieces_push(out, build_embeddings(req, model));
    snprintf(id, sizeof id, "%s-fake%016llx", api == FAKE_API_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)mix64(id_seq));
    text = reply_text(api, req, &prompt_bytes);
    if (!text)
        return false;
    if (stream)
        ok = build_stream(api, req, id, created, model, text, tokens_of(prompt_bytes), chunks, out);
    else
        ok = pieces_push(out, build_whole(api, id, created, model, text, tokens_of(prompt_bytes)));
    free(text);
    return ok;
}

char *fake_resp_error(const char *message, const char *type, const char *code)
{
    return dump(json_pack("{s:{s:s, s:s, s:n, s:s?}}", "error", "message", message, "type", type,
                          "param", "code", code));
}

static const char *first_model(json_t *models)
{
    const char *m = json_string_value(json_array_get(models, 0));
    return m ? m : "demo";
}

char *fake_resp_models(fake_family_t family, json_t *models)
{
    static const char *const owners[] = {"llamacpp", "vllm", "sglang", "library"};
    json_t *data = json_array();
    json_t *m;
    size_t i;

    json_array_foreach(models, i, m) {
        json_t *entry = json_pack("{s:O, s:s, s:I, s:s}", "id", m, "object", "model", "created",
                                  (json_int_t)FAKE_MODEL_CREATED, "owned_by", owners[family]);
        if (entry && family == FAKE_FAMILY_VLLM) {
            json_object_set(entry, "root", m);
            json_object_set_new(entry, "max_model_len", json_integer(FAKE_CTX));
        }
        json_array_append_new(data, entry);
    }
    return dump(json_pack("{s:s, s:o}", "object", "list", "data", data));
}

char *fake_resp_props(json_t *models, long slots)
{
    char path[512];

    snprintf(path, sizeof path, "/models/%s.gguf", first_model(models));
    return dump(json_pack(
        "{s:{s:I, s:b, s:s, s:{s:I, s:f, s:I, s:f, s:f}}, s:I, s:s, s:s, s:s}",
        "default_generation_settings", "n_ctx", (json_int_t)FAKE_CTX, "is_processing", 0,
        "model", path, "params", "n_predict", (json_int_t)-1, "temperature", 0.8, "top_k",
        (json_int_t)40, "top_p", 0.95, "min_p", 0.05, "total_slots", (json_int_t)slots,
        "model_path", path, "chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}",
        "build_info", "fake-provider"));
}

char *fake_resp_server_info(json_t *models, long slots)
{
    const char *m = first_model(models);

    return dump(json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:i, s:i, s:s, s:s}", "model_path", m,
                          "tokenizer_path", m, "served_model_name", m, "max_running_requests",
                          (json_int_t)slots, "max_total_num_tokens", (json_int_t)(FAKE_CTX * 16),
                          "context_length", (json_int_t)FAKE_CTX, "tp_size", 1, "dp_size", 1,
                          "schedule_policy", "fcfs", "version", "fake-provider"));
}

char *fake_resp_ollama_tags(json_t *models)
{
    json_t *list = json_array();
    json_t *m;
    size_t i;

    json_array_foreach(models, i, m)
        json_array_append_new(list, json_pack("{s:O, s:O, s:s, s:i, s:s, s:{s:s, s:s}}", "name",
                                              m, "model", m, "modified_at", "2024-01-01T00:00:00Z",
                                              "size", 0, "digest", "fake", "details", "family",
                                              "fake", "format", "gguf"));
    return dump(json_pack("{s:o}", "models", list));
}
