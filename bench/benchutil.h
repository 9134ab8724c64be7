/* benchutil.h: what the benchmarks' libpq clients (hopfloor, pgsubmit) share: clock
 * readings in nanoseconds, the open-loop schedule, an error message written into the
 * caller's buffer, and libpq's multi-line messages folded to one line. Each program is one C file that
 * includes this header; everything here is static. */
#ifndef PGD_BENCHUTIL_H
#define PGD_BENCHUTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define NS_PER_SEC 1000000000LL
#define NS_PER_US 1000LL

static inline int64_t clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * NS_PER_SEC + ts.tv_nsec;
}

/* Open loop: request i is due at start + i/rate, whenever the ones before it answer. */
static inline int64_t due_ns(int64_t start, long i, double rate)
{
    return start + (int64_t)((double)i * (double)NS_PER_SEC / rate);
}

__attribute__((format(printf, 3, 4))) static inline void set_err(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

/* libpq's messages span lines (DETAIL, LINE 1 with a caret, a tab-indented hint); ours
 * are one line: every run of white space becomes one space. Returns a static buffer,
 * overwritten by the next call. */
static inline const char *one_line(const char *msg)
{
    static char buf[512];
    size_t n = 0;
    for (const char *p = msg ? msg : ""; *p && n < sizeof buf - 1; p++) {
        bool space = *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r';
        if (!space)
            buf[n++] = *p;
        else if (n > 0 && buf[n - 1] != ' ')
            buf[n++] = ' ';
    }
    while (n > 0 && buf[n - 1] == ' ')
        n--;
    buf[n] = '\0';
    return buf;
}

#endif
