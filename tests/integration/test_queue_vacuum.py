"""dispatch.jobs is vacuumed after a fixed number of changes (sql/007), not after a
fifth of the table: a job that leaves the queue leaves a dead entry in the queue
index, and every lease steps over those entries until VACUUM removes them.

Runs its own PostgreSQL with autovacuum_naptime = 1 s, so autovacuum's decision is
seen in seconds; everything else is the fixed test configuration."""
import json

import psycopg

import pgharness
from conftest import wait_for

HISTORY = 2000000  # finished jobs kept for the retention window
QUEUED = 200000
# 16,000 dead row versions (lease and completion of 8,000 jobs): above 007's 10,000,
# far below the default trigger (a fifth of the table), and on fewer than 2 % of the
# table's pages, where PostgreSQL would skip the index pass unless told not to.
PASSED = 8000


def lease_scan_pages(conn):
    """Index and heap pages the lease scan reads to find the head of the queue."""
    plan = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT id FROM dispatch.jobs "
        "WHERE state = 'queued' AND model = 'm' AND run_at <= now() "
        "ORDER BY priority DESC, run_at, id LIMIT 10").fetchone()[0]
    return plan[0]["Plan"]["Shared Hit Blocks"] + plan[0]["Plan"]["Shared Read Blocks"]


def autovacuums(conn):
    return conn.execute("SELECT autovacuum_count FROM pg_stat_user_tables "
                        "WHERE relid = 'dispatch.jobs'::regclass").fetchone()[0]


def test_jobs_are_vacuumed_after_a_fixed_number_of_changes():
    cluster = pgharness.Cluster(settings={"autovacuum_naptime": "1s"})
    try:
        cluster.start()
        cluster.create_database("vac")
        cluster.migrate("vac")
        with psycopg.connect(cluster.dsn("vac"), autocommit=True) as su:
            su.execute("INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, state, result, finished_at) "
                       "SELECT 'm', '/v1/chat/completions', '{\"model\":\"m\"}', 3, 'succeeded', '{\"ok\":true}', "
                       "now() FROM generate_series(1, %s)", (HISTORY,))
            su.execute("INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts) "
                       "SELECT 'm', '/v1/chat/completions', '{\"model\":\"m\"}', 3 FROM generate_series(1, %s)",
                       (QUEUED,))
            su.execute("VACUUM ANALYZE dispatch.jobs")
            role = su.execute("SELECT dispatch.enroll('vac')").fetchone()[0]
            vacuums = autovacuums(su)
            fresh_pages = lease_scan_pages(su)
            # Held off while the jobs pass through, so that the scan is measured first.
            su.execute("ALTER TABLE dispatch.jobs SET (autovacuum_enabled = off)")

            # PASSED jobs leased and completed the way a daemon does it.
            with psycopg.connect(cluster.dsn("vac", user=role), autocommit=True) as node:
                node.execute("SELECT dispatch.register('llamacpp', ARRAY['m'], 1000)")
                outcomes, leased = None, 0
                while leased < PASSED:
                    rows = node.execute("SELECT id, attempt FROM dispatch.exchange(%s, 1000) WHERE kind = 'job'",
                                        (outcomes,)).fetchall()
                    leased += len(rows)
                    outcomes = json.dumps([{"id": i, "attempt": a, "result": {"ok": True}} for i, a in rows])
                node.execute("SELECT dispatch.exchange(%s, 0)", (outcomes,))
            assert su.execute("SELECT count(*) FROM dispatch.jobs WHERE state = 'succeeded'").fetchone()[0] \
                == HISTORY + PASSED
            # Until a vacuum runs, the lease scan steps over every job that passed through.
            stale_pages = lease_scan_pages(su)
            assert stale_pages > fresh_pages + 20, (fresh_pages, stale_pages)

            su.execute("ALTER TABLE dispatch.jobs RESET (autovacuum_enabled)")

            wait_for(lambda: autovacuums(su) > vacuums,
                     timeout=60, interval=0.5, what="autovacuum of dispatch.jobs after %d jobs passed through" % PASSED)
            assert lease_scan_pages(su) <= fresh_pages + 2
    finally:
        cluster.destroy()
