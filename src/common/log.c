/* log: logfmt lines on stderr, one write(2) each, behind a level gate. Owns the only
 * mutable globals in src/common: the minimum level and program name that log_init()
 * sets once from main() before any other thread exists; afterwards they are only read. */
#include "log.h"
#include "clock.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* A line longer than this is cut and marked with truncated=true. */
#define LOG_LINE_MAX 8192

static log_level_t log_min_level = LOG_INFO;
static const char *log_program = "pgdispatch";

static const char *const log_level_names[] = {
    [LOG_DEBUG] = "debug",
    [LOG_INFO] = "info",
    [LOG_WARN] = "warn",
    [LOG_ERROR] = "error",
};

void log_init(const char *program, log_level_t level)
{
    if (program && *program)
        log_program = program;
    if (level >= LOG_DEBUG && level <= LOG_ERROR)
        log_min_level = level;
}

/* Case-insensitive; "warning" is accepted as well since operators type it. */
bool log_parse_level(const char *text, log_level_t *out)
{
    if (!text)
        return false;
    for (int l = LOG_DEBUG; l <= LOG_ERROR; l++) {
        if (strcasecmp(text, log_level_names[l]) == 0) {
            if (out)
                *out = (log_level_t)l;
            return true;
        }
    }
    if (strcasecmp(text, "warning") == 0) {
        if (out)
            *out = LOG_WARN;
        return true;
    }
    return false;
}

bool log_enabled(log_level_t level)
{
    return level >= log_min_level;
}

/* Writes the whole buffer; a short write to a pipe is continued rather than lost. */
static void log_write_all(const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(STDERR_FILENO, buf, len);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;   /* nowhere left to report it */
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* fields may be NULL for an event without further pairs (an empty format string
 * would trip -Wformat-zero-length in callers). */
void log_event(log_level_t level, const char *event, const char *fields, ...)
{
    static const char marker[] = " truncated=true\n";
    char line[LOG_LINE_MAX];
    int64_t now = clock_wall_ms();
    time_t secs = (time_t)(now / 1000);
    struct tm tm;
    size_t len;
    int n;
    bool truncated = false;

    if (!log_enabled(level))
        return;
    if (level < LOG_DEBUG || level > LOG_ERROR)
        level = LOG_ERROR;
    gmtime_r(&secs, &tm);

    n = snprintf(line, sizeof line,
                 "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ level=%s prog=%s event=%s",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 (int)(now % 1000), log_level_names[level], log_program,
                 event && *event ? event : "unknown");
    len = n < 0 ? 0 : (size_t)n;

    if (fields && *fields && len < sizeof line - sizeof marker) {
        size_t room = sizeof line - sizeof marker - len;
        va_list ap;

        line[len++] = ' ';
        room--;
        va_start(ap, fields);
        n = vsnprintf(line + len, room + 1, fields, ap);
        va_end(ap);
        if (n < 0)
            n = 0;
        if ((size_t)n > room) {
            truncated = true;
            n = (int)room;
        }
        len += (size_t)n;
    } else if (len >= sizeof line - sizeof marker) {
        truncated = true;
        len = sizeof line - sizeof marker;
    }

    if (truncated) {
        memcpy(line + len, marker, sizeof marker - 1);
        len += sizeof marker - 1;
    } else {
        line[len++] = '\n';
    }
    log_write_all(line, len);
}

/* A logfmt value needs quotes when it is empty or holds a space, '=', '"', a
 * backslash or a control character. */
static bool log_needs_quotes(const char *value)
{
    if (*value == '\0')
        return true;
    for (const unsigned char *p = (const unsigned char *)value; *p; p++) {
        if (*p <= ' ' || *p == '=' || *p == '"' || *p == '\\' || *p == 0x7f)
            return true;
    }
    return false;
}

/* NULL is written as "" (so a missing value still parses). When the value does not
 * fit, it is cut before an escape sequence, never inside one, and a quoted value
 * keeps its closing quote; size < 3 cannot hold a quoted value and yields "". */
const char *log_quote(char *buf, unsigned long size, const char *value)
{
    size_t out = 0;

    if (!buf || size == 0)
        return buf;
    if (!value)
        value = "";
    if (!log_needs_quotes(value)) {
        size_t len = strlen(value);

        if (len >= size)
            len = size - 1;
        memcpy(buf, value, len);
        buf[len] = '\0';
        return buf;
    }
    if (size < 3) {
        buf[0] = '\0';
        return buf;
    }

    buf[out++] = '"';
    for (const unsigned char *p = (const unsigned char *)value; *p; p++) {
        char esc[8];
        size_t elen;

        switch (*p) {
        case '"': elen = (size_t)snprintf(esc, sizeof esc, "\\\""); break;
        case '\\': elen = (size_t)snprintf(esc, sizeof esc, "\\\\"); break;
        case '\n': elen = (size_t)snprintf(esc, sizeof esc, "\\n"); break;
        case '\r': elen = (size_t)snprintf(esc, sizeof esc, "\\r"); break;
        case '\t': elen = (size_t)snprintf(esc, sizeof esc, "\\t"); break;
        default:
            if (*p < 0x20 || *p == 0x7f) {
                elen = (size_t)snprintf(esc, sizeof esc, "\\u%04x", *p);
            } else {
                esc[0] = (char)*p;
                elen = 1;
            }
        }
        if (out + elen + 2 > size)   /* room for the closing quote and the NUL */
            break;
        memcpy(buf + out, esc, elen);
        out += elen;
    }
    buf[out++] = '"';
    buf[out] = '\0';
    return buf;
}
