/* clock: monotonic time for timers and deadlines, wall time for log stamps, and the
 * capped, jittered reconnect backoff. Owns no state: each backoff_t is the caller's. */
#include "clock.h"

#include <time.h>

static int64_t clock_read_us(clockid_t id)
{
    struct timespec ts;

    if (clock_gettime(id, &ts) != 0)
        return 0;   /* cannot happen for the clocks used here */
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t clock_monotonic_ms(void)
{
    return clock_read_us(CLOCK_MONOTONIC) / 1000;
}

int64_t clock_monotonic_us(void)
{
    return clock_read_us(CLOCK_MONOTONIC);
}

int64_t clock_wall_ms(void)
{
    return clock_read_us(CLOCK_REALTIME) / 1000;
}

/* xorshift64*: plenty for jitter, and deterministic for a given seed so tests can
 * check bounds over many draws. Never returns with a zero state. */
static uint64_t backoff_random(backoff_t *b)
{
    uint64_t x = b->rng ? b->rng : UINT64_C(0x9E3779B97F4A7C15);

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    b->rng = x;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

/* base <= 0 is treated as 1 ms and cap < base as cap == base, so the delay is always
 * positive and the sequence always grows towards the cap. */
void backoff_init(backoff_t *b, int64_t base_ms, int64_t cap_ms, uint64_t seed)
{
    b->base_ms = base_ms > 0 ? base_ms : 1;
    b->cap_ms = cap_ms >= b->base_ms ? cap_ms : b->base_ms;
    b->attempt = 0;
    b->rng = seed ? seed : UINT64_C(0x9E3779B97F4A7C15);
}

void backoff_reset(backoff_t *b)
{
    b->attempt = 0;
}

/* Doubling stops at the cap, so neither the delay nor the loop can overflow however
 * many attempts have failed; attempt itself saturates instead of wrapping. */
int64_t backoff_next_ms(backoff_t *b)
{
    int64_t delay = b->base_ms > 0 ? b->base_ms : 1;
    int64_t cap = b->cap_ms >= delay ? b->cap_ms : delay;
    int64_t lo, span;

    for (int i = 0; i < b->attempt && delay < cap; i++)
        delay = delay > cap / 2 ? cap : delay * 2;
    if (delay > cap)
        delay = cap;
    if (b->attempt < 1 << 30)
        b->attempt++;

    lo = delay - delay / 2;   /* ceil(delay / 2): never below half */
    span = delay - lo + 1;
    return lo + (int64_t)(backoff_random(b) % (uint64_t)span);
}
