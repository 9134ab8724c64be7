/* Unit tests for src/common: config precedence and errors, logfmt output and quoting,
 * backoff bounds, and the db helpers' edge cases. The db tests that need a server run
 * against the server named by PGDISPATCH_TEST_DATABASE_URL (make test-unit starts one). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "clock.h"
#include "config.h"
#include "db.h"
#include "log.h"

/* ---------- helpers ---------- */

/* Runs fn with file descriptor fd redirected to a temporary file and returns what was
 * written there (malloc'd, NUL-terminated). */
static char *capture_fd(int fd, void (*fn)(void *), void *arg)
{
    FILE *tmp = tmpfile();
    int saved;
    long size;
    char *buf;

    assert_non_null(tmp);
    fflush(NULL);
    saved = dup(fd);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(tmp), fd) >= 0);
    fn(arg);
    fflush(NULL);
    assert_true(dup2(saved, fd) >= 0);
    close(saved);

    assert_int_equal(fseek(tmp, 0, SEEK_END), 0);
    size = ftell(tmp);
    rewind(tmp);
    buf = calloc(1, (size_t)size + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)size, tmp), (size_t)size);
    fclose(tmp);
    return buf;
}

static size_t count_char(const char *s, char c)
{
    size_t n = 0;

    for (; *s; s++)
        n += *s == c;
    return n;
}

/* ---------- config ---------- */

/* One table shaped like a program's, with a fresh set of targets per test. */
typedef struct {
    const char *db;
    const char *name;
    long port;
    double ratio;
    bool verbose;
    config_option_t opts[5];
} cfg_t;

#define ENV_DB "PGD_TEST_DB"
#define ENV_NAME "PGD_TEST_NAME"
#define ENV_PORT "PGD_TEST_PORT"
#define ENV_RATIO "PGD_TEST_RATIO"
#define ENV_VERBOSE "PGD_TEST_VERBOSE"

static void cfg_setup_table(cfg_t *c)
{
    const config_option_t opts[] = {
        {"db", ENV_DB, CONFIG_STRING, &c->db, NULL, 0, 0, "PostgreSQL connection string"},
        {"name", ENV_NAME, CONFIG_STRING, &c->name, "gpu-a", 0, 0, "node name"},
        {"port", ENV_PORT, CONFIG_INT, &c->port, "8080", 1, 65535, "HTTP port"},
        {"ratio", ENV_RATIO, CONFIG_DOUBLE, &c->ratio, "0.5", 0, 0, "a fraction"},
        {"verbose", ENV_VERBOSE, CONFIG_BOOL, &c->verbose, NULL, 0, 0, "log more"},
    };

    memset(c, 0, sizeof *c);
    memcpy(c->opts, opts, sizeof opts);
}

static int cfg_setup(void **state)
{
    static cfg_t c;

    unsetenv(ENV_DB);
    unsetenv(ENV_NAME);
    unsetenv(ENV_PORT);
    unsetenv(ENV_RATIO);
    unsetenv(ENV_VERBOSE);
    cfg_setup_table(&c);
    *state = &c;
    return 0;
}

static config_result_t cfg_parse(cfg_t *c, char *err, size_t errlen, int argc, char **argv)
{
    return config_parse(c->opts, 5, argc, argv, "test [options]", err, errlen);
}

#define ARGV(...) (char *[]){"prog", __VA_ARGS__, NULL}
#define ARGC(...) ((int)(sizeof((char *[]){"prog", __VA_ARGS__}) / sizeof(char *)))
#define PARSE(c, err, ...) cfg_parse((c), (err), sizeof(err), ARGC(__VA_ARGS__), ARGV(__VA_ARGS__))

static void test_config_defaults(void **state)
{
    cfg_t *c = *state;
    char err[256];
    char *argv[] = {"prog", NULL};

    assert_int_equal(cfg_parse(c, err, sizeof err, 1, argv), CONFIG_OK);
    assert_null(c->db);
    assert_string_equal(c->name, "gpu-a");
    assert_int_equal(c->port, 8080);
    assert_true(c->ratio > 0.49 && c->ratio < 0.51);
    assert_false(c->verbose);
}

static void test_config_precedence(void **state)
{
    cfg_t *c = *state;
    char err[256];

    setenv(ENV_PORT, "9000", 1);
    setenv(ENV_NAME, "from-env", 1);
    assert_int_equal(PARSE(c, err, "--port", "9100"), CONFIG_OK);
    assert_int_equal(c->port, 9100);             /* flag beats env */
    assert_string_equal(c->name, "from-env");    /* env beats default */
    assert_string_equal(c->db == NULL ? "null" : c->db, "null");

    assert_int_equal(PARSE(c, err, "--name=from-flag"), CONFIG_OK);
    assert_string_equal(c->name, "from-flag");
    assert_int_equal(c->port, 9000);

    /* An empty variable counts as unset. */
    setenv(ENV_PORT, "", 1);
    assert_int_equal(PARSE(c, err, "--name", "x"), CONFIG_OK);
    assert_int_equal(c->port, 8080);
}

static void test_config_flag_forms(void **state)
{
    cfg_t *c = *state;
    char err[256];

    assert_int_equal(PARSE(c, err, "--db=host=a port=5", "--port", "7", "--ratio=0.25"), CONFIG_OK);
    assert_string_equal(c->db, "host=a port=5");   /* only the first '=' splits */
    assert_int_equal(c->port, 7);
    assert_true(c->ratio > 0.24 && c->ratio < 0.26);

    assert_int_equal(PARSE(c, err, "--name", "a b", "--name=", "--db", "x"), CONFIG_OK);
    assert_string_equal(c->name, "");             /* last one wins, may be empty */
    assert_string_equal(c->db, "x");
}

static void test_config_unknown_flag(void **state)
{
    cfg_t *c = *state;
    char err[256];

    assert_int_equal(PARSE(c, err, "--port", "1", "--bogus=3"), CONFIG_ERROR);
    assert_non_null(strstr(err, "unknown option --bogus"));
    assert_null(strstr(err, "=3"));

    assert_int_equal(PARSE(c, err, "positional"), CONFIG_ERROR);
    assert_non_null(strstr(err, "positional"));

    assert_int_equal(PARSE(c, err, "-p", "1"), CONFIG_ERROR);
    assert_non_null(strstr(err, "-p"));
}

static void test_config_missing_value(void **state)
{
    cfg_t *c = *state;
    char err[256];

    assert_int_equal(PARSE(c, err, "--port"), CONFIG_ERROR);
    assert_non_null(strstr(err, "--port"));
    assert_non_null(strstr(err, ENV_PORT));

    assert_int_equal(PARSE(c, err, "--db", "--port", "5"), CONFIG_ERROR);
    assert_non_null(strstr(err, "--db"));
    assert_non_null(strstr(err, ENV_DB));
}

static void test_config_int_errors(void **state)
{
    cfg_t *c = *state;
    char err[256];

    assert_int_equal(PARSE(c, err, "--port", "0"), CONFIG_ERROR);
    assert_non_null(strstr(err, "--port"));
    assert_non_null(strstr(err, ENV_PORT));
    assert_non_null(strstr(err, "1..65535"));

    assert_int_equal(PARSE(c, err, "--port=65536"), CONFIG_ERROR);
    assert_non_null(strstr(err, "out of range"));

    assert_int_equal(PARSE(c, err, "--port", "65535"), CONFIG_OK);
    assert_int_equal(c->port, 65535);
    assert_int_equal(PARSE(c, err, "--port", "1"), CONFIG_OK);
    assert_int_equal(c->port, 1);

    assert_int_equal(PARSE(c, err, "--port", "12abc"), CONFIG_ERROR);
    assert_non_null(strstr(err, "not an integer"));
    assert_int_equal(PARSE(c, err, "--port", "99999999999999999999999"), CONFIG_ERROR);
    assert_int_equal(PARSE(c, err, "--port="), CONFIG_ERROR);

    setenv(ENV_PORT, "70000", 1);
    assert_int_equal(PARSE(c, err, "--name", "x"), CONFIG_ERROR);
    assert_non_null(strstr(err, ENV_PORT));
    assert_non_null(strstr(err, "environment"));
    /* ...but a flag cannot rescue a bad environment: it is reported, not hidden. */

    setenv(ENV_PORT, "80", 1);
    assert_int_equal(PARSE(c, err, "--ratio", "nan"), CONFIG_ERROR);
    assert_non_null(strstr(err, "--ratio"));
    assert_int_equal(PARSE(c, err, "--ratio", "1e999"), CONFIG_ERROR);
}

static void test_config_unchecked_int(void **state)
{
    long v = 1;
    config_option_t opts[] = {
        {"n", NULL, CONFIG_INT, &v, NULL, 0, 0, "no range"},
    };
    char err[128];
    char *argv[] = {"prog", "--n", "-42", NULL};

    (void)state;
    assert_int_equal(config_parse(opts, 1, 1, argv, NULL, err, sizeof err), CONFIG_OK);
    assert_int_equal(v, 0);
    assert_int_equal(config_parse(opts, 1, 3, argv, NULL, err, sizeof err), CONFIG_OK);
    assert_int_equal(v, -42);
}

static void test_config_bool(void **state)
{
    cfg_t *c = *state;
    char err[256];
    char *none[] = {"prog", NULL};

    assert_int_equal(PARSE(c, err, "--verbose"), CONFIG_OK);
    assert_true(c->verbose);
    assert_int_equal(PARSE(c, err, "--verbose", "--port", "3"), CONFIG_OK);
    assert_true(c->verbose);
    assert_int_equal(c->port, 3);

    setenv(ENV_VERBOSE, "true", 1);
    assert_int_equal(cfg_parse(c, err, sizeof err, 1, none), CONFIG_OK);
    assert_true(c->verbose);
    setenv(ENV_VERBOSE, "1", 1);
    assert_int_equal(cfg_parse(c, err, sizeof err, 1, none), CONFIG_OK);
    assert_true(c->verbose);
    assert_int_equal(PARSE(c, err, "--verbose=false"), CONFIG_OK);
    assert_false(c->verbose);

    setenv(ENV_VERBOSE, "0", 1);
    assert_int_equal(cfg_parse(c, err, sizeof err, 1, none), CONFIG_OK);
    assert_false(c->verbose);
    setenv(ENV_VERBOSE, "FALSE", 1);
    assert_int_equal(cfg_parse(c, err, sizeof err, 1, none), CONFIG_OK);
    assert_false(c->verbose);

    setenv(ENV_VERBOSE, "maybe", 1);
    assert_int_equal(cfg_parse(c, err, sizeof err, 1, none), CONFIG_ERROR);
    assert_non_null(strstr(err, ENV_VERBOSE));
    assert_non_null(strstr(err, "--verbose"));
    unsetenv(ENV_VERBOSE);

    /* A bool flag does not swallow the next argument. */
    assert_int_equal(PARSE(c, err, "--verbose", "yes"), CONFIG_ERROR);
    assert_non_null(strstr(err, "yes"));
}

static void print_help_into(void *arg)
{
    cfg_t *c = arg;

    config_print_help(stdout, c->opts, 5, "pgdispatch-test [options]");
}

static void test_config_help_text(void **state)
{
    cfg_t *c = *state;
    char *out = capture_fd(STDOUT_FILENO, print_help_into, c);

    assert_non_null(strstr(out, "usage: pgdispatch-test [options]"));
    for (size_t i = 0; i < 5; i++) {
        char flag[64];

        snprintf(flag, sizeof flag, "--%s", c->opts[i].flag);
        assert_non_null(strstr(out, flag));
        assert_non_null(strstr(out, c->opts[i].env));
        assert_non_null(strstr(out, c->opts[i].help));
    }
    assert_non_null(strstr(out, "default 'gpu-a'"));
    assert_non_null(strstr(out, "default '8080'"));
    assert_non_null(strstr(out, "default '0.5'"));
    assert_non_null(strstr(out, "default 'false'"));
    assert_non_null(strstr(out, "default unset"));
    assert_non_null(strstr(out, "range 1..65535"));
    assert_non_null(strstr(out, "--help"));
    free(out);
}

typedef struct {
    cfg_t *c;
    char **argv;
    int argc;
    config_result_t result;
} parse_call_t;

static void parse_into(void *arg)
{
    parse_call_t *p = arg;
    char err[256];

    p->result = cfg_parse(p->c, err, sizeof err, p->argc, p->argv);
}

static void test_config_help_flag(void **state)
{
    cfg_t *c = *state;
    char *argv[] = {"prog", "--port", "1", "--help", NULL};
    parse_call_t call = {c, argv, 4, CONFIG_ERROR};
    char *out;

    setenv(ENV_PORT, "not-a-number", 1);   /* help works even with a broken env */
    out = capture_fd(STDOUT_FILENO, parse_into, &call);
    assert_int_equal(call.result, CONFIG_EXIT_HELP);
    assert_non_null(strstr(out, ENV_PORT));
    free(out);

    argv[3] = "-h";
    out = capture_fd(STDOUT_FILENO, parse_into, &call);
    assert_int_equal(call.result, CONFIG_EXIT_HELP);
    free(out);
}

static void test_config_markdown(void **state)
{
    cfg_t *c = *state;
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);

    assert_non_null(f);
    c->opts[0].help = "a | b";
    config_print_markdown(f, c->opts, 5);
    fclose(f);
    assert_non_null(strstr(out, "| flag | env | default | meaning |"));
    assert_non_null(strstr(out, "| `--port` | `PGD_TEST_PORT` | `8080` | HTTP port (1..65535) |"));
    assert_non_null(strstr(out, "| `--db` | `PGD_TEST_DB` | (unset) | a \\| b |"));
    assert_int_equal(count_char(out, '\n'), 7);
    free(out);
}

/* ---------- log ---------- */

static void test_log_parse_level(void **state)
{
    log_level_t l = LOG_ERROR;

    (void)state;
    assert_true(log_parse_level("debug", &l));
    assert_int_equal(l, LOG_DEBUG);
    assert_true(log_parse_level("info", &l));
    assert_int_equal(l, LOG_INFO);
    assert_true(log_parse_level("warn", &l));
    assert_int_equal(l, LOG_WARN);
    assert_true(log_parse_level("ERROR", &l));
    assert_int_equal(l, LOG_ERROR);
    assert_true(log_parse_level("warning", &l));
    assert_int_equal(l, LOG_WARN);

    l = LOG_INFO;
    assert_false(log_parse_level("verbose", &l));
    assert_false(log_parse_level("", &l));
    assert_false(log_parse_level("info ", &l));
    assert_false(log_parse_level(NULL, &l));
    assert_int_equal(l, LOG_INFO);   /* untouched on failure */
}

static void test_log_enabled(void **state)
{
    (void)state;
    log_init("pgdispatch-test", LOG_WARN);
    assert_false(log_enabled(LOG_DEBUG));
    assert_false(log_enabled(LOG_INFO));
    assert_true(log_enabled(LOG_WARN));
    assert_true(log_enabled(LOG_ERROR));
    log_init("pgdispatch-test", LOG_DEBUG);
    assert_true(log_enabled(LOG_DEBUG));
    log_init("pgdispatch-test", LOG_INFO);
}

static void quote_check(unsigned long size, const char *in, const char *want)
{
    char buf[128];

    assert_true(size <= sizeof buf);
    assert_ptr_equal(log_quote(buf, size, in), buf);
    assert_string_equal(buf, want);
}

static void test_log_quote(void **state)
{
    (void)state;
    quote_check(128, "gpu-a", "gpu-a");
    quote_check(128, "/v1/chat/completions", "/v1/chat/completions");
    quote_check(128, "two words", "\"two words\"");
    quote_check(128, "say \"hi\"", "\"say \\\"hi\\\"\"");
    quote_check(128, "line1\nline2", "\"line1\\nline2\"");
    quote_check(128, "cr\rtab\t", "\"cr\\rtab\\t\"");
    quote_check(128, "", "\"\"");
    quote_check(128, NULL, "\"\"");
    quote_check(128, "a=b", "\"a=b\"");
    quote_check(128, "back\\slash", "\"back\\\\slash\"");
    quote_check(128, "bell\a", "\"bell\\u0007\"");
    quote_check(128, "caf\xc3\xa9", "caf\xc3\xa9");   /* UTF-8 passes through */
}

static void test_log_quote_truncation(void **state)
{
    (void)state;
    quote_check(4, "abcdef", "abc");
    quote_check(7, "ab cdef", "\"ab c\"");
    quote_check(6, "ab cdef", "\"ab \"");
    quote_check(5, "a\"b", "\"a\"");       /* the escape \" does not fit: not split */
    quote_check(6, "a\"b", "\"a\\\"\"");
    quote_check(3, "x y", "\"\"");
    quote_check(2, "x y", "");
    quote_check(1, "abc", "");
    quote_check(12, "\n\n\n\n\n\n", "\"\\n\\n\\n\\n\"");

    {
        char c = 'z';

        assert_ptr_equal(log_quote(&c, 0, "abc"), &c);
        assert_int_equal(c, 'z');          /* size 0 writes nothing */
    }
}

typedef struct {
    log_level_t level;
    int kind;
} log_call_t;

static void log_into(void *arg)
{
    log_call_t *c = arg;
    char q[64];

    switch (c->kind) {
    case 0:
        log_event(c->level, "register", "node=%s slots=%d", "gpu-a", 4);
        break;
    case 1:
        log_event(c->level, "started", NULL);
        break;
    case 2:
        log_warn("provider_error", "reason=%s", log_quote(q, sizeof q, "connection refused\n"));
        break;
    case 3:
        log_debug("tick", "n=%d", 1);
        break;
    case 4: {
        static char big[20000];

        memset(big, 'x', sizeof big - 1);
        log_event(LOG_ERROR, "huge", "blob=%s", big);
        break;
    }
    }
}

static char *log_capture(log_level_t level, int kind)
{
    log_call_t call = {level, kind};

    return capture_fd(STDERR_FILENO, log_into, &call);
}

static void test_log_event_format(void **state)
{
    char *out;
    const char *p;

    (void)state;
    log_init("pgdispatch-daemon", LOG_INFO);
    out = log_capture(LOG_INFO, 0);
    /* ts=2026-11-25T16:23:16.123Z */
    assert_true(strlen(out) > 28);
    assert_memory_equal(out, "ts=", 3);
    p = out + 3;
    assert_true(p[4] == '-' && p[7] == '-' && p[10] == 'T' && p[13] == ':' && p[16] == ':' &&
                p[19] == '.' && p[23] == 'Z' && p[24] == ' ');
    assert_string_equal(p + 25, "level=info prog=pgdispatch-daemon event=register node=gpu-a slots=4\n");
    free(out);

    out = log_capture(LOG_ERROR, 1);
    assert_non_null(strstr(out, " level=error prog=pgdispatch-daemon event=started\n"));
    assert_int_equal(count_char(out, '\n'), 1);
    free(out);

    out = log_capture(LOG_WARN, 2);
    assert_non_null(strstr(out, " level=warn "));
    assert_non_null(strstr(out, " event=provider_error reason=\"connection refused\\n\"\n"));
    assert_int_equal(count_char(out, '\n'), 1);
    free(out);
}

static void test_log_event_gate(void **state)
{
    char *out;

    (void)state;
    log_init("pgdispatch-gateway", LOG_WARN);
    out = log_capture(LOG_INFO, 0);
    assert_string_equal(out, "");
    free(out);
    out = log_capture(LOG_DEBUG, 3);
    assert_string_equal(out, "");
    free(out);

    log_init("pgdispatch-gateway", LOG_DEBUG);
    out = log_capture(LOG_DEBUG, 3);
    assert_non_null(strstr(out, " level=debug prog=pgdispatch-gateway event=tick n=1\n"));
    free(out);
    log_init("pgdispatch-test", LOG_INFO);
}

static void test_log_event_truncated(void **state)
{
    char *out;
    size_t len;

    (void)state;
    out = log_capture(LOG_ERROR, 4);
    len = strlen(out);
    assert_true(len > 1000 && len <= 8192);
    assert_int_equal(count_char(out, '\n'), 1);
    assert_string_equal(out + len - strlen(" truncated=true\n"), " truncated=true\n");
    free(out);
}

/* ---------- clock and backoff ---------- */

static void test_clock(void **state)
{
    int64_t a = clock_monotonic_ms(), b;
    int64_t ua = clock_monotonic_us(), ub;

    (void)state;
    usleep(2000);
    b = clock_monotonic_ms();
    ub = clock_monotonic_us();
    assert_true(b >= a + 1);
    assert_true(ub - ua >= 2000);
    assert_true(clock_wall_ms() > INT64_C(1700000000000));   /* after 2023 */
}

static int64_t nominal(int64_t base, int64_t cap, int attempt)
{
    int64_t d = base;

    for (int i = 0; i < attempt && d < cap; i++)
        d *= 2;
    return d < cap ? d : cap;
}

static void test_backoff_bounds(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= 50; seed++) {
        backoff_t b;

        backoff_init(&b, 100, 30000, seed);
        for (int attempt = 0; attempt < 40; attempt++) {
            int64_t d = nominal(100, 30000, attempt);
            int64_t w = backoff_next_ms(&b);

            assert_true(w <= 30000);
            assert_true(w <= d);
            assert_true(2 * w >= d);
        }
        assert_int_equal(b.attempt, 40);
    }
}

static void test_backoff_spreads(void **state)
{
    backoff_t b;
    int64_t lo = INT64_MAX, hi = 0;

    (void)state;
    backoff_init(&b, 1000, 1000, 42);
    for (int i = 0; i < 2000; i++) {
        int64_t w = backoff_next_ms(&b);

        lo = w < lo ? w : lo;
        hi = w > hi ? w : hi;
    }
    assert_true(lo >= 500 && lo < 520);   /* jitter covers the whole range */
    assert_true(hi <= 1000 && hi > 980);
}

static void test_backoff_reset(void **state)
{
    backoff_t b;

    (void)state;
    backoff_init(&b, 50, 5000, 7);
    for (int i = 0; i < 10; i++)
        backoff_next_ms(&b);
    assert_true(backoff_next_ms(&b) >= 2500);
    backoff_reset(&b);
    assert_int_equal(b.attempt, 0);
    for (int i = 0; i < 100; i++) {
        int64_t w;

        backoff_reset(&b);
        w = backoff_next_ms(&b);
        assert_true(w >= 25 && w <= 50);
    }
}

static void test_backoff_edges(void **state)
{
    backoff_t b, b2;

    (void)state;
    /* Many failures: the delay stays at the cap, nothing overflows. */
    backoff_init(&b, 1, INT64_MAX / 4, 3);
    b.attempt = 1 << 30;
    for (int i = 0; i < 10; i++) {
        int64_t w = backoff_next_ms(&b);

        assert_true(w >= INT64_MAX / 8 && w <= INT64_MAX / 4);
    }

    /* Degenerate inputs still give a positive, capped wait. */
    backoff_init(&b, 0, 0, 0);
    assert_int_equal(backoff_next_ms(&b), 1);
    backoff_init(&b, 100, 10, 9);
    for (int i = 0; i < 5; i++) {
        int64_t w = backoff_next_ms(&b);

        assert_true(w >= 50 && w <= 100);
    }

    /* Same seed, same sequence. */
    backoff_init(&b, 10, 10000, 1234);
    backoff_init(&b2, 10, 10000, 1234);
    for (int i = 0; i < 20; i++)
        assert_int_equal(backoff_next_ms(&b), backoff_next_ms(&b2));
}

/* ---------- db (no server) ---------- */

static void assert_one_line(const char *s)
{
    size_t len = strlen(s);

    assert_true(len > 0);
    assert_null(strchr(s, '\n'));
    assert_true(s[len - 1] != ' ' && s[len - 1] != '\t');
}

static void test_db_connect_refused(void **state)
{
    char err[512] = "";
    PGconn *c;

    (void)state;
    c = db_connect("host=127.0.0.1 port=1 connect_timeout=5", "pgdispatch-test", err, sizeof err);
    assert_null(c);
    assert_non_null(strstr(err, "host=127.0.0.1 port=1"));
    assert_non_null(strstr(err, "refused"));
    assert_one_line(err);

    err[0] = '\0';
    c = db_connect("postgresql://app:sekret@127.0.0.1:1/pgdispatch?connect_timeout=5", "x", err,
                   sizeof err);
    assert_null(c);
    assert_non_null(strstr(err, "127.0.0.1"));
    assert_null(strstr(err, "sekret"));   /* the password is never echoed */
    assert_one_line(err);

    err[0] = '\0';
    c = db_connect("postgresql://127.0.0.1:1,127.0.0.1:2/x?connect_timeout=5", "x", err, sizeof err);
    assert_null(c);
    assert_non_null(strstr(err, "hosts=127.0.0.1,127.0.0.1 ports=1,2"));
    assert_one_line(err);

    err[0] = '\0';
    c = db_connect("host=/nonexistent/pgd-socket-dir port=5999", NULL, err, sizeof err);
    assert_null(c);
    assert_non_null(strstr(err, "/nonexistent/pgd-socket-dir"));
    assert_one_line(err);
}

static void test_db_connect_bad_conninfo(void **state)
{
    char err[512] = "";

    (void)state;
    assert_null(db_connect("host=127.0.0.1 no_such_option=1", "t", err, sizeof err));
    assert_non_null(strstr(err, "invalid connection string"));
    assert_non_null(strstr(err, "no_such_option"));
    assert_one_line(err);

    assert_null(db_connect("postgresql://[::1", "t", err, sizeof err));
    assert_non_null(strstr(err, "invalid connection string"));

    assert_null(db_connect("host='unterminated", "t", err, sizeof err));
    assert_one_line(err);

    /* A tiny or absent error buffer is fine. */
    assert_null(db_connect("bogus=1", "t", err, 4));
    assert_int_equal(strlen(err), 3);
    assert_null(db_connect("bogus=1", "t", NULL, 0));
}

static void test_db_null_handling(void **state)
{
    char err[256];
    char sqlstate[6] = "XXXXX";
    const char *chans[] = {"a"};

    (void)state;
    assert_int_equal(db_listen(NULL, chans, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "no connection"));
    assert_int_equal(db_drain_notifications(NULL, NULL, NULL, err, sizeof err), -1);
    assert_true(db_connection_lost(NULL));

    assert_false(db_result_ok(NULL, NULL, sqlstate, err, sizeof err));
    assert_string_equal(sqlstate, "");
    assert_true(strlen(err) > 0);
    assert_false(db_result_ok(NULL, NULL, NULL, NULL, 0));
}

static void test_db_result_ok(void **state)
{
    char err[256] = "untouched";
    char sqlstate[6];
    PGresult *res;

    (void)state;
    res = PQmakeEmptyPGresult(NULL, PGRES_COMMAND_OK);
    assert_true(db_result_ok(res, NULL, sqlstate, err, sizeof err));
    assert_string_equal(sqlstate, "");
    PQclear(res);

    res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    assert_true(db_result_ok(res, NULL, NULL, err, sizeof err));
    PQclear(res);

    res = PQmakeEmptyPGresult(NULL, PGRES_FATAL_ERROR);
    assert_false(db_result_ok(res, NULL, sqlstate, err, sizeof err));
    assert_string_equal(sqlstate, "");
    assert_one_line(err);
    PQclear(res);

    res = PQmakeEmptyPGresult(NULL, PGRES_EMPTY_QUERY);
    assert_false(db_result_ok(res, NULL, sqlstate, err, sizeof err));
    assert_non_null(strstr(err, "PGRES_EMPTY_QUERY"));
    PQclear(res);
}

/* A connection object that never got connected: every helper refuses it cleanly. */
static void test_db_bad_connection(void **state)
{
    PGconn *c = PQconnectdb("host=127.0.0.1 port=1 connect_timeout=5");
    const char *chans[] = {"jobs"};
    char err[512];

    (void)state;
    assert_non_null(c);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_true(db_connection_lost(c));
    assert_int_equal(db_listen(c, chans, 1, err, sizeof err), -1);
    assert_one_line(err);
    assert_int_equal(db_drain_notifications(c, NULL, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "connection lost"));
    assert_int_equal(db_listen(c, chans, 0, err, sizeof err), 0);
    PQfinish(c);
}

/* ---------- db (real server, optional) ---------- */

typedef struct {
    int n;
    char channel[64];
    char payload[64];
} notes_t;

static void note_cb(void *ctx, const char *channel, const char *payload)
{
    notes_t *n = ctx;

    n->n++;
    snprintf(n->channel, sizeof n->channel, "%s", channel);
    snprintf(n->payload, sizeof n->payload, "%s", payload);
}

/* The value libpq used for a connection option, or NULL. */
static char *conn_option(PGconn *conn, const char *key)
{
    PQconninfoOption *opts = PQconninfo(conn);
    char *val = NULL;

    assert_non_null(opts);
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (strcmp(o->keyword, key) == 0 && o->val)
            val = strdup(o->val);
    }
    PQconninfoFree(opts);
    return val;
}

static void assert_option(PGconn *conn, const char *key, const char *want)
{
    char *val = conn_option(conn, key);

    assert_non_null(val);
    assert_string_equal(val, want);
    free(val);
}

static void test_db_live(void **state)
{
    const char *url = getenv("PGDISPATCH_TEST_DATABASE_URL");
    const char *chans[] = {"model:llama 3", "Mixed\"Case", "plain"};
    char err[512], sqlstate[6];
    notes_t notes = {0};
    PGconn *listener, *sender;
    PGresult *res;
    const char *params[2];

    (void)state;
    if (!url || !*url)
        fail_msg("PGDISPATCH_TEST_DATABASE_URL is not set: run the unit tests with make test-unit");
    listener = db_connect(url, "pgdispatch-unit", err, sizeof err);
    if (!listener)
        fail_msg("%s", err);
    sender = db_connect(url, "pgdispatch-unit", err, sizeof err);
    assert_non_null(sender);

    res = PQexec(listener, "SELECT current_setting('application_name')");
    assert_true(db_result_ok(res, listener, sqlstate, err, sizeof err));
    if (!getenv("PGAPPNAME"))
        assert_string_equal(PQgetvalue(res, 0, 0), "pgdispatch-unit");
    PQclear(res);
    assert_option(listener, "keepalives", "1");
    assert_option(listener, "keepalives_idle", "10");
    assert_option(listener, "keepalives_interval", "5");
    assert_option(listener, "keepalives_count", "3");

    /* What the conninfo sets wins over the defaults. */
    {
        char custom[1024];
        PGconn *c;

        if (strncmp(url, "postgres", 8) == 0)
            snprintf(custom, sizeof custom, "%s%ckeepalives_idle=30&application_name=mine", url,
                     strchr(url, '?') ? '&' : '?');
        else
            snprintf(custom, sizeof custom, "%s keepalives_idle=30 application_name=mine", url);
        c = db_connect(custom, "pgdispatch-unit", err, sizeof err);
        if (!c)
            fail_msg("%s", err);
        assert_option(c, "keepalives_idle", "30");
        assert_option(c, "keepalives_interval", "5");
        assert_string_equal(PQparameterStatus(c, "application_name"), "mine");
        PQfinish(c);
    }

    assert_int_equal(db_listen(listener, chans, 3, err, sizeof err), 0);
    assert_int_equal(db_drain_notifications(listener, note_cb, &notes, err, sizeof err), 0);

    params[0] = chans[0];
    params[1] = "job 42";
    res = PQexecParams(sender, "SELECT pg_notify($1, $2)", 2, NULL, params, NULL, NULL, 0);
    assert_true(db_result_ok(res, sender, sqlstate, err, sizeof err));
    PQclear(res);
    params[0] = chans[1];
    params[1] = "";
    res = PQexecParams(sender, "SELECT pg_notify($1, $2)", 2, NULL, params, NULL, NULL, 0);
    assert_true(db_result_ok(res, sender, sqlstate, err, sizeof err));
    PQclear(res);

    for (int i = 0; i < 200 && notes.n < 2; i++) {
        assert_true(db_drain_notifications(listener, note_cb, &notes, err, sizeof err) >= 0);
        if (notes.n < 2)
            usleep(10000);
    }
    assert_int_equal(notes.n, 2);
    assert_string_equal(notes.channel, "Mixed\"Case");
    assert_string_equal(notes.payload, "");

    res = PQexec(sender, "SELECT 1/0");
    assert_false(db_result_ok(res, sender, sqlstate, err, sizeof err));
    assert_string_equal(sqlstate, "22012");
    assert_string_equal(err, "22012: division by zero");
    PQclear(res);

    assert_false(db_connection_lost(listener));
    PQfinish(listener);
    PQfinish(sender);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_config_defaults, cfg_setup),
        cmocka_unit_test_setup(test_config_precedence, cfg_setup),
        cmocka_unit_test_setup(test_config_flag_forms, cfg_setup),
        cmocka_unit_test_setup(test_config_unknown_flag, cfg_setup),
        cmocka_unit_test_setup(test_config_missing_value, cfg_setup),
        cmocka_unit_test_setup(test_config_int_errors, cfg_setup),
        cmocka_unit_test(test_config_unchecked_int),
        cmocka_unit_test_setup(test_config_bool, cfg_setup),
        cmocka_unit_test_setup(test_config_help_text, cfg_setup),
        cmocka_unit_test_setup(test_config_help_flag, cfg_setup),
        cmocka_unit_test_setup(test_config_markdown, cfg_setup),
        cmocka_unit_test(test_log_parse_level),
        cmocka_unit_test(test_log_enabled),
        cmocka_unit_test(test_log_quote),
        cmocka_unit_test(test_log_quote_truncation),
        cmocka_unit_test(test_log_event_format),
        cmocka_unit_test(test_log_event_gate),
        cmocka_unit_test(test_log_event_truncated),
        cmocka_unit_test(test_clock),
        cmocka_unit_test(test_backoff_bounds),
        cmocka_unit_test(test_backoff_spreads),
        cmocka_unit_test(test_backoff_reset),
        cmocka_unit_test(test_backoff_edges),
        cmocka_unit_test(test_db_connect_refused),
        cmocka_unit_test(test_db_connect_bad_conninfo),
        cmocka_unit_test(test_db_null_handling),
        cmocka_unit_test(test_db_result_ok),
        cmocka_unit_test(test_db_bad_connection),
        cmocka_unit_test(test_db_live),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
