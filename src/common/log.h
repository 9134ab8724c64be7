/* log: logfmt lines on stderr with a level gate. Owns the process's log level and
 * program name, set once from main() by log_init(). */
#ifndef PGD_LOG_H
#define PGD_LOG_H

#include <stdbool.h>

typedef enum {
    LOG_DEBUG = 0,
    LOG_INFO,
    LOG_WARN,
    LOG_ERROR,
} log_level_t;

/* Set the program name (a static string) and minimum level. Call once from main. */
void log_init(const char *program, log_level_t level);

/* Parse "debug" | "info" | "warn" | "error". Returns false on anything else. */
bool log_parse_level(const char *text, log_level_t *out);

/* Cheap gate for callers that would do work to build a message. */
bool log_enabled(log_level_t level);

/* Writes one line: ts=<RFC3339 ms> level=<l> prog=<program> event=<event> <fields>
 * `fields` is a printf format for further key=value pairs; values that may hold
 * spaces or quotes should go through %s with log_quote(). One write(2) per line.
 * fields may be NULL when there is nothing to add. Lines over 8 KiB are cut and end
 * with truncated=true. */
void log_event(log_level_t level, const char *event, const char *fields, ...)
    __attribute__((format(printf, 3, 4)));

/* Quote a value for logfmt into buf (always NUL-terminated, truncated to size).
 * Returns buf, so it can be used inline as a %s argument. */
const char *log_quote(char *buf, unsigned long size, const char *value);

#define log_debug(ev, ...) do { if (log_enabled(LOG_DEBUG)) log_event(LOG_DEBUG, ev, __VA_ARGS__); } while (0)
#define log_info(ev, ...)  log_event(LOG_INFO, ev, __VA_ARGS__)
#define log_warn(ev, ...)  log_event(LOG_WARN, ev, __VA_ARGS__)
#define log_error(ev, ...) log_event(LOG_ERROR, ev, __VA_ARGS__)

#endif
