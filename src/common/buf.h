/* buf: a growable byte buffer (always NUL-terminated) with JSON string escaping.
 * Owns its memory; buf_free releases it and leaves an empty, reusable buffer. */
#ifndef PGD_BUF_H
#define PGD_BUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    char *data;     /* NULL until the first append; data[len] == '\0' after any append */
    size_t len;
    size_t cap;
    bool oom;       /* an allocation failed: the content is truncated, callers check once */
} buf_t;

#define BUF_INIT { NULL, 0, 0, false }

/* Appends never fail loudly: on allocation failure they set b->oom and drop the data,
 * so a caller can build a whole message and check b->oom once at the end. */
void buf_append(buf_t *b, const void *data, size_t len);
void buf_append_str(buf_t *b, const char *s);
void buf_append_char(buf_t *b, char c);
void buf_printf(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Appends `len` bytes of `s` as a quoted JSON string. Invalid UTF-8 and NUL bytes are
 * replaced by U+FFFD, so the result is always valid JSON text PostgreSQL accepts (jsonb
 * refuses \u0000). */
void buf_append_json_string(buf_t *b, const char *s, size_t len);

/* Forget the content, keep the allocation. */
void buf_reset(buf_t *b);
/* Release the allocation. */
void buf_free(buf_t *b);
/* Drop the first n bytes (memmove), keeping the rest. */
void buf_consume(buf_t *b, size_t n);

#endif
