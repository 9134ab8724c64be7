/* clock: monotonic milliseconds for timers and deadlines; wall time for logs. */
#ifndef PGD_CLOCK_H
#define PGD_CLOCK_H

#include <stdint.h>

int64_t clock_monotonic_ms(void);
int64_t clock_monotonic_us(void);
int64_t clock_wall_ms(void);   /* Unix epoch milliseconds */

/* Capped exponential backoff with full jitter for reconnects. */
typedef struct {
    int64_t base_ms;
    int64_t cap_ms;
    int attempt;        /* 0 after backoff_reset */
    uint64_t rng;       /* xorshift state, seeded by the caller */
} backoff_t;

void backoff_init(backoff_t *b, int64_t base_ms, int64_t cap_ms, uint64_t seed);
void backoff_reset(backoff_t *b);
/* The next wait: uniform in [delay/2, delay] where delay = min(cap, base * 2^attempt). */
int64_t backoff_next_ms(backoff_t *b);

#endif
