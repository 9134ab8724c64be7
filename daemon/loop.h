/* loop: the daemon's single event loop: one wait (provider_wait) on provider transfers,
 * the libpq socket and the signal fd, with a timeout from the nearest timer. */
#ifndef PGD_LOOP_H
#define PGD_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "provider.h"

/* Everything main() parsed; strings live as long as the process. */
typedef struct {
    const char *database_url;    /* "" or NULL: libpq's PG* environment */
    const char *provider_url;
    const char *models;          /* comma list; NULL: ask GET /v1/models */
    long max_concurrency;        /* 0: discover from the provider */
    long default_slots;          /* slots used when capacity is unreported */
    long lease_ahead;            /* leases held beyond the slots for fast jobs; -1: sized by loop_lease_ahead */
    const char *provider_family; /* NULL: guess from discovery */
    const char *region;
    const char *labels;          /* JSON object text */
    const char *health_path;
    long health_interval_ms;
    long request_timeout_ms;
    long grace_ms;
    long max_response_bytes;
} daemon_config_t;

/* Exit statuses of the daemon. */
enum {
    DAEMON_EXIT_OK = 0,
    DAEMON_EXIT_FAILED = 1,      /* could not register, or lost work at shutdown */
    DAEMON_EXIT_USAGE = 2,       /* bad flags */
    DAEMON_EXIT_DUPLICATE = 3,   /* another daemon holds this node's identity (PD006) */
};

/* Runs until shutdown. sigfd is a signalfd for SIGTERM, SIGINT and SIGHUP (those
 * signals blocked by the caller). Returns one of the exit statuses above. */
int loop_run(const daemon_config_t *cfg, int sigfd);

/* Milliseconds to wait from now until the nearest of the deadlines (0 entries are
 * unset), clamped to [0, cap]. Pure; exposed for tests. */
int loop_timeout_ms(int64_t now, const int64_t *deadlines, size_t count, int cap);

/* Most leases an automatic lease-ahead holds beyond the slots, in slots. */
#define LOOP_LEASE_AHEAD_MAX_SLOTS 4

/* Leases to hold beyond `slots` (why: at its definition in loop.c): none unless the
 * provider answers within two round trips (service_us, rtt_us: smoothed; 0: unknown);
 * `configured` when it is 0 or more; else (-1) enough to keep every slot busy through
 * one round trip at the provider's pace, from `slots` to LOOP_LEASE_AHEAD_MAX_SLOTS x
 * slots. Pure; exposed for tests. */
long loop_lease_ahead(long slots, long configured, int64_t service_us, int64_t rtt_us);

/* What the database is told the node may hold beyond its slots (set_lease_ahead):
 * the most loop_lease_ahead can ask for. */
long loop_lease_ahead_allowance(long slots, long configured);

/* When a running job's lease should be renewed: once a third of it has passed. */
int64_t loop_extend_due(const job_t *job);

#endif
