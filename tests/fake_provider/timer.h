/* timer: one thread that resumes suspended MHD connections when their wait is over
 * (latency, stream intervals) and notices clients that hang up while suspended
 * (hangs, long waits), so no HTTP thread ever sleeps. */
#ifndef FAKE_TIMER_H
#define FAKE_TIMER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <microhttpd.h>

#define FAKE_TIMER_FOREVER INT64_MAX

/* Starts the thread. Returns false if it could not be started. */
bool fake_timer_start(void);

/* Resumes `conn` at `due_us`, a clock_monotonic_us() time (FAKE_TIMER_FOREVER: only
 * when the client leaves or at shutdown). The caller must have suspended `conn` already. While
 * waiting, `fd` is checked for a hang-up every 100 ms; on hang-up, or at shutdown,
 * *gone is set before the resume. `gone` must live until the connection resumes. */
void fake_timer_resume_at(int64_t due_us, struct MHD_Connection *conn, int fd, atomic_bool *gone);

/* Resumes every waiting connection with *gone set, then stops and joins the thread.
 * Call before MHD_stop_daemon. */
void fake_timer_stop(void);

#endif
