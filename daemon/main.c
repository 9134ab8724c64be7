/* main: pgdispatch-daemon's entry point: the option table (flags, environment,
 * defaults, --help), logging, signal routing into the loop's signalfd, exit status. */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "config.h"
#include "log.h"
#include "loop.h"

static const char usage[] =
    "pgdispatch-daemon [options]\n"
    "\n"
    "Runs jobs from the pgdispatch control plane against a local model server. Logs in\n"
    "with its node's own role (SELECT dispatch.enroll('<name>') creates it), registers,\n"
    "sleeps on LISTEN and leases up to its free slots when woken. A job whose payload\n"
    "has \"stream\": true is relayed to its waiting gateway event by event as the provider\n"
    "streams it (dispatch.stream), then completed with the assembled response.\n"
    "\n"
    "Signals: SIGTERM/SIGINT stop leasing, let in-flight jobs finish within --grace-ms,\n"
    "hand the rest back and exit 0 (a second signal aborts at once). SIGHUP reloads\n"
    "nothing: settings are read once at start; restart the daemon to change them.\n"
    "Exit status: 0 clean stop, 1 failure, 2 bad options, 3 another daemon already runs\n"
    "with this node's identity.";

static daemon_config_t cfg;
static const char *log_level_text;

static const config_option_t options[] = {
    { "database-url", "PGDISPATCH_DATABASE_URL", CONFIG_STRING, &cfg.database_url, NULL, 0, 0,
      "libpq connection string or URL of the node's role (unset: the PG* environment)" },
    { "provider-url", "PGDISPATCH_PROVIDER_URL", CONFIG_STRING, &cfg.provider_url, "http://127.0.0.1:8000", 0, 0,
      "base URL of the local model server" },
    { "models", "PGDISPATCH_MODELS", CONFIG_STRING, &cfg.models, NULL, 0, 0,
      "comma-separated models this node serves (unset: the provider's GET /v1/models)" },
    { "max-concurrency", "PGDISPATCH_MAX_CONCURRENCY", CONFIG_INT, &cfg.max_concurrency, "0", 0, 100000,
      "jobs run at once (0: the provider's /props total_slots or /server_info max_running_requests, "
      "else unreported)" },
    { "default-slots", "PGDISPATCH_DEFAULT_SLOTS", CONFIG_INT, &cfg.default_slots, "4", 1, 100000,
      "jobs run at once when capacity is unreported (keep equal to the default_slots_per_node setting)" },
    { "lease-ahead", "PGDISPATCH_LEASE_AHEAD", CONFIG_INT, &cfg.lease_ahead, "-1", -1, 100000,
      "jobs leased beyond the slots while the provider answers faster than two database round trips; "
      "they wait in the daemon and start as running jobs end, so no slot idles through a round trip "
      "(-1: enough for one round trip at the provider's pace, 1 to 4 times the slots; 0: never)" },
    { "provider-family", "PGDISPATCH_PROVIDER_FAMILY", CONFIG_STRING, &cfg.provider_family, NULL, 0, 0,
      "llamacpp | vllm | sglang | ollama | openai (unset: guessed from /props, /server_info)" },
    { "region", "PGDISPATCH_REGION", CONFIG_STRING, &cfg.region, NULL, 0, 0,
      "region label recorded with the node" },
    { "labels", "PGDISPATCH_LABELS", CONFIG_STRING, &cfg.labels, "{}", 0, 0,
      "JSON object of labels recorded with the node" },
    { "health-path", "PGDISPATCH_HEALTH_PATH", CONFIG_STRING, &cfg.health_path, "/health", 0, 0,
      "provider path probed for health (down, timeout or HTTP 5xx: degraded)" },
    { "health-interval-ms", "PGDISPATCH_HEALTH_INTERVAL_MS", CONFIG_INT, &cfg.health_interval_ms, "2000", 50,
      3600000, "time between health probes (local HTTP only, never a database statement)" },
    { "request-timeout-ms", "PGDISPATCH_REQUEST_TIMEOUT_MS", CONFIG_INT, &cfg.request_timeout_ms, "600000", 100,
      86400000, "longest a provider request may take before it fails as retryable timeout" },
    { "grace-ms", "PGDISPATCH_GRACE_MS", CONFIG_INT, &cfg.grace_ms, "30000", 0, 3600000,
      "on SIGTERM: time in-flight jobs get to finish before the rest are handed back" },
    { "max-response-bytes", "PGDISPATCH_MAX_RESPONSE_BYTES", CONFIG_INT, &cfg.max_response_bytes, "67108864",
      1024, 1073741824, "largest provider response accepted (larger: bad_response); for a stream, the largest event and the "
      "assembled content" },
    { "log-level", "PGDISPATCH_LOG_LEVEL", CONFIG_STRING, &log_level_text, "info", 0, 0,
      "debug | info | warn | error" },
};

#define N_OPTIONS (sizeof options / sizeof options[0])

/* Blocks the signals the loop handles and returns a non-blocking signalfd for them. */
static int signals_setup(void)
{
    sigset_t set;

    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        return -1;
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

static bool labels_valid(const char *text)
{
    json_t *v = json_loads(text, 0, NULL);
    bool ok = json_is_object(v);

    json_decref(v);
    return ok;
}

int main(int argc, char **argv)
{
    char err[512];
    log_level_t level;
    int sigfd, status;

    switch (config_parse(options, N_OPTIONS, argc, argv, usage, err, sizeof err)) {
    case CONFIG_OK:
        break;
    case CONFIG_EXIT_HELP:
        return DAEMON_EXIT_OK;
    default:
        fprintf(stderr, "pgdispatch-daemon: %s\n", err);
        return DAEMON_EXIT_USAGE;
    }
    if (!log_parse_level(log_level_text, &level)) {
        fprintf(stderr, "pgdispatch-daemon: --log-level (PGDISPATCH_LOG_LEVEL) must be debug, info, warn or "
                        "error, got \"%s\"\n", log_level_text);
        return DAEMON_EXIT_USAGE;
    }
    if (!labels_valid(cfg.labels)) {
        fprintf(stderr, "pgdispatch-daemon: --labels (PGDISPATCH_LABELS) must be a JSON object, got \"%s\"\n",
                cfg.labels);
        return DAEMON_EXIT_USAGE;
    }
    if (cfg.health_path[0] == '\0' || cfg.provider_url[0] == '\0') {
        fprintf(stderr, "pgdispatch-daemon: --provider-url and --health-path must not be empty\n");
        return DAEMON_EXIT_USAGE;
    }
    if (cfg.region != NULL && cfg.region[0] == '\0')
        cfg.region = NULL;
    if (cfg.models != NULL && cfg.models[0] == '\0')
        cfg.models = NULL;
    if (cfg.provider_family != NULL && cfg.provider_family[0] == '\0')
        cfg.provider_family = NULL;
    log_init("pgdispatch-daemon", level);

    sigfd = signals_setup();
    if (sigfd < 0) {
        log_error("start_failed", "reason=\"cannot set up signal handling\"");
        return DAEMON_EXIT_FAILED;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        log_error("start_failed", "reason=\"cannot initialise libcurl\"");
        close(sigfd);
        return DAEMON_EXIT_FAILED;
    }
    {
        char q1[512], q2[512];
        log_info("start", "pid=%d provider=%s models=%s max_concurrency=%ld default_slots=%ld lease_ahead=%ld "
                 "health_path=%s health_interval_ms=%ld request_timeout_ms=%ld grace_ms=%ld",
                 (int)getpid(), log_quote(q1, sizeof q1, cfg.provider_url),
                 log_quote(q2, sizeof q2, cfg.models ? cfg.models : "(discover)"), cfg.max_concurrency,
                 cfg.default_slots, cfg.lease_ahead, cfg.health_path, cfg.health_interval_ms, cfg.request_timeout_ms,
                 cfg.grace_ms);
    }
    status = loop_run(&cfg, sigfd);
    curl_global_cleanup();
    close(sigfd);
    return status;
}
