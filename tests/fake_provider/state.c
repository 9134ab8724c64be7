/* state: runtime settings, request statistics and the arrival ring of the fake
 * provider, shared by the HTTP threads and changed by the /_fake/ control endpoints.
 * Settings, per-key counters and the ring sit behind mutexes; the in-flight gauge is
 * atomic. */
#include "state.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const fault_names[] = {
    "none", "500", "503", "400", "429", "malformed", "html", "empty", "hang", "slow",
    "die-mid-stream", "close",
};

bool fake_fault_parse(const char *text, fake_fault_t *out)
{
    for (size_t i = 0; i < sizeof fault_names / sizeof fault_names[0]; i++) {
        if (strcmp(text, fault_names[i]) == 0) {
            *out = (fake_fault_t)i;
            return true;
        }
    }
    if (strcmp(text, "") == 0) {
        *out = FAKE_FAULT_NONE;
        return true;
    }
    if (strcmp(text, "slow-stream") == 0) {
        *out = FAKE_FAULT_SLOW;
        return true;
    }
    if (strcmp(text, "die") == 0) {
        *out = FAKE_FAULT_DIE;
        return true;
    }
    return false;
}

const char *fake_fault_name(fake_fault_t fault)
{
    return fault_names[fault];
}

/* ---- settings ------------------------------------------------------------------ */

static const char *const health_names[] = {"ok", "down", "hang"};

static pthread_mutex_t settings_lock = PTHREAD_MUTEX_INITIALIZER;
static fake_settings_t settings;       /* current */
static fake_settings_t initial_settings;
static json_t *models;                 /* current, array of strings */
static json_t *initial_models;
static fake_family_t family;

/* "a,b , c" → ["a","b","c"]; NULL when no name is left. */
static json_t *models_from_csv(const char *csv)
{
    json_t *arr = json_array();
    const char *p = csv;

    while (arr && p && *p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        const char *s = p;
        while (n > 0 && (*s == ' ' || *s == '\t')) {
            s++;
            n--;
        }
        while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
            n--;
        if (n > 0)
            json_array_append_new(arr, json_stringn(s, n));
        p = end ? end + 1 : NULL;
    }
    if (arr && json_array_size(arr) == 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

bool fake_state_init(const fake_settings_t *initial, fake_family_t fam, const char *models_csv)
{
    initial_models = models_from_csv(models_csv);
    if (!initial_models)
        return false;
    models = json_deep_copy(initial_models);
    initial_settings = *initial;
    settings = *initial;
    family = fam;
    return models != NULL;
}

fake_family_t fake_state_family(void)
{
    return family;
}

void fake_state_snapshot(fake_settings_t *out)
{
    pthread_mutex_lock(&settings_lock);
    *out = settings;
    pthread_mutex_unlock(&settings_lock);
}

json_t *fake_state_models(void)
{
    json_t *copy;

    pthread_mutex_lock(&settings_lock);
    copy = json_deep_copy(models);
    pthread_mutex_unlock(&settings_lock);
    return copy;
}

/* Reads an integer field in [0, max] if present. */
static bool get_long(json_t *patch, const char *key, long max, long *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(patch, key);

    if (!v)
        return true;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > max) {
        snprintf(err, errlen, "%s must be an integer in [0, %ld]", key, max);
        return false;
    }
    *out = (long)json_integer_value(v);
    return true;
}

bool fake_state_apply(json_t *patch, char *err, size_t errlen)
{
    static const char *const known[] = {
        "latency_ms", "latency_jitter_ms", "fault", "fault_rate", "health", "stream_chunks",
        "stream_interval_ms", "slow_interval_ms", "slots", "models",
    };
    fake_settings_t next;
    json_t *next_models = NULL;
    const char *key;
    json_t *v;
    bool ok = true;

    if (!json_is_object(patch)) {
        snprintf(err, errlen, "the body must be a JSON object");
        return false;
    }
    json_object_foreach(patch, key, v) {
        size_t i;
        for (i = 0; i < sizeof known / sizeof known[0]; i++)
            if (strcmp(key, known[i]) == 0)
                break;
        if (i == sizeof known / sizeof known[0]) {
            snprintf(err, errlen, "unknown setting '%s'", key);
            return false;
        }
    }

    pthread_mutex_lock(&settings_lock);
    next = settings;
    ok = get_long(patch, "latency_ms", 3600000, &next.latency_ms, err, errlen)
         && get_long(patch, "latency_jitter_ms", 3600000, &next.latency_jitter_ms, err, errlen)
         && get_long(patch, "stream_interval_ms", 3600000, &next.stream_interval_ms, err, errlen)
         && get_long(patch, "slow_interval_ms", 3600000, &next.slow_interval_ms, err, errlen)
         && get_long(patch, "stream_chunks", 100000, &next.stream_chunks, err, errlen)
         && get_long(patch, "slots", 1000000, &next.slots, err, errlen);
    if (ok && (v = json_object_get(patch, "fault"))) {
        if (!json_is_string(v) || !fake_fault_parse(json_string_value(v), &next.fault)) {
            snprintf(err, errlen, "unknown fault (none|500|503|400|429|malformed|html|empty|"
                                  "hang|slow|die-mid-stream|close)");
            ok = false;
        }
    }
    if (ok && (v = json_object_get(patch, "fault_rate"))) {
        if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 1) {
            snprintf(err, errlen, "fault_rate must be a number in [0, 1]");
            ok = false;
        } else {
            next.fault_rate = json_number_value(v);
        }
    }
    if (ok && (v = json_object_get(patch, "health"))) {
        const char *h = json_string_value(v);
        size_t i;
        for (i = 0; h && i < sizeof health_names / sizeof health_names[0]; i++)
            if (strcmp(h, health_names[i]) == 0)
                break;
        if (!h || i == sizeof health_names / sizeof health_names[0]) {
            snprintf(err, errlen, "health must be \"ok\", \"down\" or \"hang\"");
            ok = false;
        } else {
            next.health = (fake_health_t)i;
        }
    }
    if (ok && next.stream_chunks < 1) {
        snprintf(err, errlen, "stream_chunks must be at least 1");
        ok = false;
    }
    if (ok && (v = json_object_get(patch, "models"))) {
        if (json_is_string(v)) {
            next_models = models_from_csv(json_string_value(v));
        } else if (json_is_array(v) && json_array_size(v) > 0) {
            json_t *m;
            size_t i;
            next_models = json_deep_copy(v);
            json_array_foreach(v, i, m)
                if (!json_is_string(m) || json_string_length(m) == 0) {
                    json_decref(next_models);
                    next_models = NULL;
                    break;
                }
        }
        if (!next_models) {
            snprintf(err, errlen, "models must be a non-empty list of names");
            ok = false;
        }
    }
    if (ok) {
        settings = next;
        if (next_models) {
            json_decref(models);
            models = next_models;
        }
    }
    pthread_mutex_unlock(&settings_lock);
    return ok;
}

json_t *fake_state_config_json(void)
{
    fake_settings_t s;
    json_t *m = fake_state_models();

    fake_state_snapshot(&s);
    return json_pack("{s:s, s:I, s:I, s:s, s:f, s:s, s:I, s:I, s:I, s:I, s:o}", "family",
                     fake_family_name(family), "latency_ms", (json_int_t)s.latency_ms,
                     "latency_jitter_ms", (json_int_t)s.latency_jitter_ms, "fault",
                     fake_fault_name(s.fault), "fault_rate", s.fault_rate, "health",
                     health_names[s.health], "stream_chunks", (json_int_t)s.stream_chunks,
                     "stream_interval_ms", (json_int_t)s.stream_interval_ms, "slow_interval_ms",
                     (json_int_t)s.slow_interval_ms, "slots", (json_int_t)s.slots, "models", m);
}

/* ---- statistics ---------------------------------------------------------------- */

static pthread_mutex_t stats_lock = PTHREAD_MUTEX_INITIALIZER;
static json_t *by_path;     /* path → count of requests that arrived */
static json_t *by_status;   /* "200" → count of responses queued */
static json_t *markers;     /* marker → count of inference requests carrying it */
static long long requests_total, aborted;
static atomic_long in_flight;
static atomic_long max_in_flight;

static void bump(json_t **obj, const char *key)
{
    if (!*obj)
        *obj = json_object();
    json_t *v = json_object_get(*obj, key);
    json_object_set_new(*obj, key, json_integer(v ? json_integer_value(v) + 1 : 1));
}

void fake_stats_arrival(const char *path, bool inference)
{
    if (inference) {
        long now = atomic_fetch_add(&in_flight, 1) + 1;
        long max = atomic_load(&max_in_flight);
        while (now > max && !atomic_compare_exchange_weak(&max_in_flight, &max, now))
            ;
    }
    pthread_mutex_lock(&stats_lock);
    requests_total++;
    bump(&by_path, path);
    pthread_mutex_unlock(&stats_lock);
}

void fake_stats_marker(const char *marker)
{
    pthread_mutex_lock(&stats_lock);
    bump(&markers, marker);
    pthread_mutex_unlock(&stats_lock);
}

void fake_stats_release(bool inference)
{
    if (inference)
        atomic_fetch_sub(&in_flight, 1);
}

void fake_stats_answered(unsigned status)
{
    char key[16];

    snprintf(key, sizeof key, "%u", status);
    pthread_mutex_lock(&stats_lock);
    bump(&by_status, key);
    pthread_mutex_unlock(&stats_lock);
}

void fake_stats_aborted(void)
{
    pthread_mutex_lock(&stats_lock);
    aborted++;
    pthread_mutex_unlock(&stats_lock);
}

static json_t *copy_or_empty(json_t *obj)
{
    return obj ? json_deep_copy(obj) : json_object();
}

json_t *fake_stats_json(void)
{
    json_t *out;

    pthread_mutex_lock(&stats_lock);
    out = json_pack("{s:I, s:I, s:I, s:I, s:o, s:o, s:o}", "requests_total",
                    (json_int_t)requests_total, "aborted",
                    (json_int_t)aborted, "in_flight", (json_int_t)atomic_load(&in_flight),
                    "max_in_flight", (json_int_t)atomic_load(&max_in_flight), "by_path",
                    copy_or_empty(by_path), "by_status", copy_or_empty(by_status), "markers",
                    copy_or_empty(markers));
    pthread_mutex_unlock(&stats_lock);
    return out;
}

/* ---- arrivals ------------------------------------------------------------------ */

typedef struct {
    int64_t t_us; /* CLOCK_REALTIME microseconds */
    char *user;   /* the marker, malloc'd */
} arrival_t;

static pthread_mutex_t arrivals_lock = PTHREAD_MUTEX_INITIALIZER;
static arrival_t *arrivals;         /* FAKE_ARRIVALS_MAX slots, allocated on first use */
static size_t arrivals_next;        /* the slot the next arrival goes to */
static size_t arrivals_count;       /* slots in use, at most FAKE_ARRIVALS_MAX */
static long long arrivals_dropped;  /* overwritten or not stored since the last reset */

/* A copy of at most FAKE_ARRIVAL_MARKER_MAX bytes of marker, not cut inside a UTF-8
 * character (jansson refuses invalid UTF-8). NULL on allocation failure. */
static char *marker_copy(const char *marker)
{
    size_t n = strnlen(marker, FAKE_ARRIVAL_MARKER_MAX + 1);

    if (n > FAKE_ARRIVAL_MARKER_MAX) {
        n = FAKE_ARRIVAL_MARKER_MAX;
        /* back off over continuation bytes to the start of the character cut */
        while (n > 0 && ((unsigned char)marker[n] & 0xC0) == 0x80)
            n--;
    }
    return strndup(marker, n);
}

/* Frees every entry's marker; the caller holds arrivals_lock. */
static void arrivals_clear_locked(void)
{
    for (size_t i = 0; arrivals && i < FAKE_ARRIVALS_MAX; i++) {
        free(arrivals[i].user);
        arrivals[i].user = NULL;
    }
    arrivals_next = arrivals_count = 0;
    arrivals_dropped = 0;
}

void fake_arrivals_record(const char *marker, int64_t t_us)
{
    char *user = marker_copy(marker);

    pthread_mutex_lock(&arrivals_lock);
    if (!arrivals)
        arrivals = calloc(FAKE_ARRIVALS_MAX, sizeof *arrivals);
    if (!user || !arrivals) {
        arrivals_dropped++; /* out of memory: counted, so a reader sees the gap */
        pthread_mutex_unlock(&arrivals_lock);
        free(user);
        return;
    }
    if (arrivals_count == FAKE_ARRIVALS_MAX) {
        free(arrivals[arrivals_next].user); /* the oldest entry makes room */
        arrivals_dropped++;
    } else {
        arrivals_count++;
    }
    arrivals[arrivals_next].t_us = t_us;
    arrivals[arrivals_next].user = user;
    arrivals_next = (arrivals_next + 1) % FAKE_ARRIVALS_MAX;
    pthread_mutex_unlock(&arrivals_lock);
}

json_t *fake_arrivals_json(void)
{
    json_t *list = json_array();
    json_t *out;
    size_t first;

    if (!list)
        return NULL;
    pthread_mutex_lock(&arrivals_lock);
    first = (arrivals_next + FAKE_ARRIVALS_MAX - arrivals_count) % FAKE_ARRIVALS_MAX;
    for (size_t i = 0; i < arrivals_count; i++) {
        const arrival_t *a = &arrivals[(first + i) % FAKE_ARRIVALS_MAX];
        /* NULL for a marker that is not UTF-8 (only an X-Fake-Marker header can carry
         * one) or on allocation failure: that entry is left out */
        json_t *e = json_pack("{s:s, s:I}", "user", a->user, "t_us", (json_int_t)a->t_us);
        if (e)
            json_array_append_new(list, e);
    }
    out = json_pack("{s:o, s:I}", "arrivals", list, "dropped", (json_int_t)arrivals_dropped);
    pthread_mutex_unlock(&arrivals_lock);
    return out;
}

void fake_state_reset(void)
{
    pthread_mutex_lock(&settings_lock);
    settings = initial_settings;
    json_decref(models);
    models = json_deep_copy(initial_models);
    pthread_mutex_unlock(&settings_lock);

    pthread_mutex_lock(&stats_lock);
    json_decref(by_path);
    json_decref(by_status);
    json_decref(markers);
    by_path = by_status = markers = NULL;
    requests_total = aborted = 0;
    atomic_store(&max_in_flight, atomic_load(&in_flight));
    pthread_mutex_unlock(&stats_lock);

    pthread_mutex_lock(&arrivals_lock);
    arrivals_clear_locked();
    pthread_mutex_unlock(&arrivals_lock);
}

void fake_state_free(void)
{
    json_decref(models);
    json_decref(initial_models);
    json_decref(by_path);
    json_decref(by_status);
    json_decref(markers);
    models = initial_models = by_path = by_status = markers = NULL;
    arrivals_clear_locked(); /* no thread is left to race with */
    free(arrivals);
    arrivals = NULL;
}

/* ---- random -------------------------------------------------------------------- */

static _Thread_local uint64_t rng_state;
static atomic_uint_fast64_t rng_seq;

uint64_t fake_rand_u64(void)
{
    if (rng_state == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        rng_state = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec
                    ^ (atomic_fetch_add(&rng_seq, 1) + 1) * 0x9E3779B97F4A7C15ULL;
        if (rng_state == 0)
            rng_state = 1;
    }
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

double fake_rand_unit(void)
{
    return (double)(fake_rand_u64() >> 11) * (1.0 / 9007199254740992.0);
}
