/* responses: the JSON shapes the fake provider answers with (OpenAI chat, completions,
 * embeddings, models and errors; llama.cpp /props; SGLang /server_info; Ollama tags),
 * built deterministically from the request. Pure functions: no I/O, no shared state. */
#ifndef FAKE_RESPONSES_H
#define FAKE_RESPONSES_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

/* The model server a run imitates; decides which discovery endpoints exist. */
typedef enum {
    FAKE_FAMILY_LLAMACPP = 0, /* GET /props with total_slots */
    FAKE_FAMILY_VLLM,         /* neither /props nor /server_info */
    FAKE_FAMILY_SGLANG,       /* GET /server_info with max_running_requests */
    FAKE_FAMILY_OLLAMA,       /* GET / and /api/tags */
} fake_family_t;

bool fake_family_parse(const char *text, fake_family_t *out);
const char *fake_family_name(fake_family_t family);

/* A body cut into parts that are sent in order; joined they are the whole body.
 * Every part is malloc'd and owned by the struct until fake_pieces_free(). */
typedef struct {
    char **parts;
    size_t count;
    size_t cap;
} fake_pieces_t;

void fake_pieces_free(fake_pieces_t *p);
size_t fake_pieces_total(const fake_pieces_t *p);
/* Cuts body (taking ownership of it) into at most n parts of similar size, on UTF-8
 * character boundaries. Returns false on allocation failure (body is freed) or when
 * body is NULL (so a failed builder can be passed straight in). */
bool fake_pieces_split(fake_pieces_t *p, char *body, size_t n);

/* Which OpenAI endpoint a request went to. */
typedef enum {
    FAKE_API_CHAT = 0,   /* /v1/chat/completions */
    FAKE_API_COMPLETION, /* /v1/completions */
    FAKE_API_EMBEDDING,  /* /v1/embeddings */
} fake_api_t;

/* Checks the fields each endpoint requires (model, messages, prompt, input).
 * Returns false with a client-facing message in err. */
bool fake_resp_validate(fake_api_t api, json_t *req, char *err, size_t errlen);

/* The reply for a validated request: one part (the whole JSON body) when the request
 * did not ask to stream, otherwise the SSE events ("data: ...\n\n" each, content split
 * into at most `chunks` deltas, then "data: [DONE]\n\n"). `id_seq` makes the response
 * id unique. Returns false on allocation failure. */
bool fake_resp_build(fake_api_t api, json_t *req, bool stream, size_t chunks,
                     unsigned long long id_seq, fake_pieces_t *out);

/* The OpenAI error body {"error":{"message","type","param","code"}}; malloc'd. */
char *fake_resp_error(const char *message, const char *type, const char *code);

/* Discovery bodies; malloc'd. `models` is a JSON array of strings. */
char *fake_resp_models(fake_family_t family, json_t *models);
char *fake_resp_props(json_t *models, long slots);
char *fake_resp_server_info(json_t *models, long slots);
char *fake_resp_ollama_tags(json_t *models);

#endif
