/* pgdispatch-gateway: flags, signals and wiring. Starts the dispatcher (the
 * database thread) and the HTTP server, then waits for SIGTERM/SIGINT and shuts
 * down in order: stop accepting, let waiting requests finish within --grace-ms,
 * hand back the rest, close. */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "clock.h"
#include "config.h"
#include "dispatcher.h"
#include "http.h"
#include "log.h"

/* The migration this build was written against; /readyz wants at least this. */
#define GATEWAY_SCHEMA_VERSION 1

static struct {
    const char *listen;
    const char *database_url;
    long db_connections;
    long max_body_bytes;
    long request_timeout_s;
    bool require_api_key;
    long api_key_cache_s;
    bool durable_submits;
    long grace_ms;
    long threads;
    long max_connections;
    long max_keepalive_connections;
    const char *log_level;
} cfg;

static const config_option_t options[] = {
    {"listen", "PGDISPATCH_LISTEN", CONFIG_STRING, &cfg.listen, "0.0.0.0:8080", 0, 0,
     "address to serve HTTP on: host:port, [v6]:port or :port"},
    {"database-url", "PGDISPATCH_DATABASE_URL", CONFIG_STRING, &cfg.database_url, NULL, 0, 0,
     "libpq connection string or URL (unset: the PG* environment)"},
    {"db-connections", "PGDISPATCH_DB_CONNECTIONS", CONFIG_INT, &cfg.db_connections, "2", 1, 64,
     "worker connections for submits and result fetches (plus one LISTEN connection)"},
    {"max-body-bytes", "PGDISPATCH_MAX_BODY_BYTES", CONFIG_INT, &cfg.max_body_bytes, "8388608", 1024, 1073741824,
     "largest request body accepted; larger ones get 413"},
    {"request-timeout-s", "PGDISPATCH_REQUEST_TIMEOUT_S", CONFIG_INT, &cfg.request_timeout_s, "300", 1, 86400,
     "deadline of a request without X-Request-Timeout, seconds (then 504 and the job expires)"},
    {"require-api-key", "PGDISPATCH_REQUIRE_API_KEY", CONFIG_BOOL, &cfg.require_api_key, "false", 0, 0,
     "require Authorization: Bearer <key>, checked with dispatch.check_api_key (health and metrics stay open)"},
    {"api-key-cache-s", "PGDISPATCH_API_KEY_CACHE_S", CONFIG_INT, &cfg.api_key_cache_s, "10", 0, 3600,
     "how long a key found valid is trusted without asking the database again"},
    {"durable-submits", "PGDISPATCH_DURABLE_SUBMITS", CONFIG_BOOL, &cfg.durable_submits, "false", 0, 0,
     "store every request's job on disk before the provider sees it; by default only POST /v1/jobs and "
     "requests with an Idempotency-Key wait for that, and a PostgreSQL crash can fail a waiting request "
     "with 503 (send it again)"},
    {"grace-ms", "PGDISPATCH_GRACE_MS", CONFIG_INT, &cfg.grace_ms, "10000", 0, 3600000,
     "on SIGTERM, how long waiting requests may still finish before they get 503"},
    {"threads", "PGDISPATCH_THREADS", CONFIG_INT, &cfg.threads, "1", 1, 64,
     "HTTP polling threads (each an epoll loop); the database thread is one more"},
    {"max-connections", "PGDISPATCH_MAX_CONNECTIONS", CONFIG_INT, &cfg.max_connections, "10000", 16, 1000000,
     "most HTTP connections open at once"},
    {"max-keepalive-connections", "PGDISPATCH_MAX_KEEPALIVE_CONNECTIONS", CONFIG_INT, &cfg.max_keepalive_connections,
     "256", 0, 1000000,
     "most connections kept open for more requests after a response (each holds a 36 KiB buffer until "
     "it closes); past it, responses close their connection"},
    {"log-level", "PGDISPATCH_LOG_LEVEL", CONFIG_STRING, &cfg.log_level, "info", 0, 0,
     "debug, info, warn or error"},
};

static const char usage[] =
    "pgdispatch-gateway [options]   (OpenAI-compatible HTTP front end of the dispatch queue)";

/* Enough descriptors for --max-connections waiting requests: raise the soft limit
 * to the hard one. */
static void raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
    char err[1024], q[1100];
    config_result_t cr;
    log_level_t level;
    sigset_t sigs;
    int sig = 0;
    dispatcher_t *d;
    http_server_t *http;
    dispatcher_options_t dopt;
    http_options_t hopt;
    int64_t until;

    cr = config_parse(options, sizeof options / sizeof options[0], argc, argv, usage, err, sizeof err);
    if (cr == CONFIG_EXIT_HELP)
        return 0;
    if (cr != CONFIG_OK) {
        fprintf(stderr, "pgdispatch-gateway: %s\n", err);
        return 2;
    }
    if (!log_parse_level(cfg.log_level, &level)) {
        fprintf(stderr, "pgdispatch-gateway: --log-level (PGDISPATCH_LOG_LEVEL) must be debug, info, warn or error\n");
        return 2;
    }
    log_init("pgdispatch-gateway", level);

    /* Signals are taken by sigwait below; every thread started later inherits the mask. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();

    dopt = (dispatcher_options_t){
        .conninfo = cfg.database_url ? cfg.database_url : "",
        .connections = (int)cfg.db_connections,
        .require_api_key = cfg.require_api_key,
        .key_cache_ms = cfg.api_key_cache_s * 1000,
        .schema_version = GATEWAY_SCHEMA_VERSION,
        .durable_submits = cfg.durable_submits,
    };
    d = dispatcher_new(&dopt, err, sizeof err);
    if (!d || dispatcher_start(d, err, sizeof err) != 0) {
        log_error("startup_failed", "error=%s", log_quote(q, sizeof q, err));
        dispatcher_free(d);
        return 1;
    }
    hopt = (http_options_t){
        .listen = cfg.listen,
        .threads = (unsigned)cfg.threads,
        .max_connections = (unsigned)cfg.max_connections,
        .max_keepalive = (unsigned)cfg.max_keepalive_connections,
        .max_body_bytes = (size_t)cfg.max_body_bytes,
        .request_timeout_ms = cfg.request_timeout_s * 1000,
        .require_api_key = cfg.require_api_key,
        .dispatcher = d,
    };
    http = http_server_start(&hopt, err, sizeof err);
    if (!http) {
        log_error("startup_failed", "error=%s", log_quote(q, sizeof q, err));
        dispatcher_free(d);
        return 1;
    }
    log_info("listening", "listen=%s reply_channel=%s db_connections=%ld threads=%ld require_api_key=%s",
             cfg.listen, dispatcher_reply_channel(d), cfg.db_connections, cfg.threads,
             cfg.require_api_key ? "true" : "false");

    while (sigwait(&sigs, &sig) != 0 || (sig != SIGTERM && sig != SIGINT))
        ;

    log_info("shutting_down", "signal=%s waiting=%ld grace_ms=%ld next=\"no new connections; waiting requests "
                              "may finish\"",
             sig == SIGTERM ? "SIGTERM" : "SIGINT", dispatcher_outstanding(d), cfg.grace_ms);
    http_server_quiesce(http);
    dispatcher_begin_drain(d);
    until = clock_monotonic_ms() + cfg.grace_ms;
    while (dispatcher_outstanding(d) > 0 && clock_monotonic_ms() < until)
        sleep_ms(10);
    if (dispatcher_outstanding(d) > 0)
        log_warn("grace_expired", "waiting=%ld next=\"answering them 503 and cancelling their jobs\"",
                 dispatcher_outstanding(d));
    dispatcher_stop(d);
    /* Let the last responses go out; idle keep-alive connections are simply closed. */
    until = clock_monotonic_ms() + 1000;
    while (http_server_connections(http) > 0 && clock_monotonic_ms() < until)
        sleep_ms(10);
    http_server_stop(http);
    dispatcher_free(d);
    log_info("stopped", "exit=0");
    return 0;
}
