/* timer: a min-heap of suspended connections ordered by when they next need a look,
 * served by one thread sleeping on a condition variable (CLOCK_MONOTONIC). Resumes
 * happen outside the lock, and the entry is dropped before the resume, because the
 * connection may complete (and its context be freed) right after. */
#include "timer.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#include "clock.h"
#include "log.h"

#define FAKE_TIMER_PROBE_US 100000 /* hang-up check period for long waits */
#define FAKE_TIMER_BATCH 64

typedef struct {
    int64_t check_us; /* next look: min(due, now + probe period) */
    int64_t due_us;
    struct MHD_Connection *conn;
    int fd;
    atomic_bool *gone;
} timer_entry_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake;
static pthread_t thread;
static bool running;
static bool stopping;
static timer_entry_t *heap;
static size_t heap_len, heap_cap;

static void heap_swap(size_t a, size_t b)
{
    timer_entry_t t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
}

/* Returns false when the heap cannot grow (the entry is not added). */
static bool heap_push(timer_entry_t e)
{
    if (heap_len == heap_cap) {
        size_t cap = heap_cap ? heap_cap * 2 : 256;
        timer_entry_t *h = realloc(heap, cap * sizeof *h);
        if (!h)
            return false;
        heap = h;
        heap_cap = cap;
    }
    size_t i = heap_len++;
    heap[i] = e;
    while (i > 0 && heap[(i - 1) / 2].check_us > heap[i].check_us) {
        heap_swap(i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    return true;
}

static timer_entry_t heap_pop(void)
{
    timer_entry_t top = heap[0];
    size_t i = 0;

    heap[0] = heap[--heap_len];
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_len && heap[l].check_us < heap[m].check_us)
            m = l;
        if (r < heap_len && heap[r].check_us < heap[m].check_us)
            m = r;
        if (m == i)
            break;
        heap_swap(i, m);
        i = m;
    }
    return top;
}

static int64_t next_check(int64_t due_us, int64_t now)
{
    return due_us - now > FAKE_TIMER_PROBE_US ? now + FAKE_TIMER_PROBE_US : due_us;
}

/* True when the peer has closed or reset the connection. Safe while MHD has the
 * connection suspended: MHD does not touch a suspended socket, and MSG_PEEK consumes
 * nothing. */
static bool peer_gone(int fd)
{
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0)
        return true;
    return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

static void *timer_main(void *arg)
{
    (void)arg;
    timer_entry_t ready[FAKE_TIMER_BATCH];

    pthread_mutex_lock(&lock);
    for (;;) {
        size_t n = 0;
        int64_t now = clock_monotonic_us();

        if (stopping) {
            /* Hand every waiter back to MHD marked gone, so it closes them. */
            while (heap_len > 0 && n < FAKE_TIMER_BATCH) {
                ready[n] = heap_pop();
                atomic_store(ready[n].gone, true);
                n++;
            }
        } else {
            while (heap_len > 0 && heap[0].check_us <= now && n < FAKE_TIMER_BATCH) {
                timer_entry_t e = heap_pop();
                if (e.due_us <= now) {
                    ready[n++] = e;
                } else if (e.fd >= 0 && peer_gone(e.fd)) {
                    atomic_store(e.gone, true);
                    ready[n++] = e;
                } else {
                    e.check_us = next_check(e.due_us, now);
                    heap_push(e); /* cannot fail: the slot was just freed */
                }
            }
        }
        if (n > 0) {
            pthread_mutex_unlock(&lock);
            for (size_t i = 0; i < n; i++)
                MHD_resume_connection(ready[i].conn);
            pthread_mutex_lock(&lock);
            continue;
        }
        if (stopping)
            break;
        if (heap_len == 0) {
            pthread_cond_wait(&wake, &lock);
        } else {
            int64_t at = heap[0].check_us;
            struct timespec ts = {.tv_sec = at / 1000000, .tv_nsec = (at % 1000000) * 1000};
            pthread_cond_timedwait(&wake, &lock, &ts);
        }
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

bool fake_timer_start(void)
{
    pthread_condattr_t attr;

    if (pthread_condattr_init(&attr) != 0)
        return false;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (pthread_cond_init(&wake, &attr) != 0) {
        pthread_condattr_destroy(&attr);
        return false;
    }
    pthread_condattr_destroy(&attr);
    if (pthread_create(&thread, NULL, timer_main, NULL) != 0) {
        pthread_cond_destroy(&wake);
        return false;
    }
    running = true;
    return true;
}

void fake_timer_resume_at(int64_t due_us, struct MHD_Connection *conn, int fd, atomic_bool *gone)
{
    timer_entry_t e = {.due_us = due_us, .conn = conn, .fd = fd, .gone = gone};
    bool added = false;
    bool was_stopping;

    e.check_us = next_check(due_us, clock_monotonic_us());
    pthread_mutex_lock(&lock);
    was_stopping = stopping;
    if (!was_stopping) {
        added = heap_push(e);
        /* Wake the thread only when this entry became the earliest. */
        if (added && heap[0].conn == conn)
            pthread_cond_signal(&wake);
    }
    pthread_mutex_unlock(&lock);
    if (!added) {
        if (!was_stopping)
            log_error("timer_full", "action=resume_now");
        atomic_store(gone, true);
        MHD_resume_connection(conn);
    }
}

void fake_timer_stop(void)
{
    if (!running)
        return;
    pthread_mutex_lock(&lock);
    stopping = true;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
    pthread_join(thread, NULL);
    pthread_cond_destroy(&wake);
    free(heap);
    heap = NULL;
    heap_len = heap_cap = 0;
    running = false;
}
