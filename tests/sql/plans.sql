-- The functions on every request's path (submit_many's two paths, exchange, settle, stream,
-- cancel, results, extend), those the gateway calls for /metrics, /v1/status and
-- stuck queues (capacity, queues, health, nodes, metrics: 021), and requeue and
-- deregister, find their jobs
-- through indexes however much the table has grown
-- since a session planned them: a plan made while the statistics said the table held a
-- few rows (a new install, analysed early) must not go on reading the whole table until
-- autovacuum next analyses it (migrations 008 and 009). Each function is planned here
-- on an analysed table of three jobs, called past the point where a plan is kept, then
-- called once more after 22,000 jobs have been added; scans of dispatch.jobs and the
-- rows and index entries they read are counted around each call.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(38);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

-- Other test files leave dead rows behind: a table that is large on disk would
-- be planned with indexes whatever its statistics say. Start from an empty file.
TRUNCATE dispatch.jobs;

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 10)).node_name, 'gpu-a', 'gpu-a serves m1');
RESET SESSION AUTHORIZATION;

-- Three jobs, leased by gpu-a, and statistics that say the table is that small.
SELECT count(*) FROM dispatch.submit_many(
    '[{"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}]',
    'r1') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.exchange(NULL, 3) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT min(id) AS streamed, max(id) AS extended FROM dispatch.jobs \gset
SELECT set_config('pgd_test.streamed', :'streamed', false) \g /dev/null
SELECT set_config('pgd_test.extended', :'extended', false) \g /dev/null
ANALYZE dispatch.jobs;

-- Each function planned in this session: ten calls, past the five after which
-- PL/pgSQL may keep a generic plan. cancel is planned on ids that do not exist.
CREATE FUNCTION pg_temp.cancel_unknown(p_id bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dispatch.cancel(p_id);
    RAISE EXCEPTION 'cancel(%) found a job', p_id;
EXCEPTION WHEN sqlstate 'PD007' THEN
    NULL;
END
$$;
DO $$
BEGIN
    FOR i IN 1..10 LOOP
        PERFORM * FROM dispatch.submit_many('[{"model": "m1", "payload": {}}]', 'r1');
        PERFORM * FROM dispatch.submit_many(format('[{"model": "m1", "payload": {}, "idempotency_key": "plan-%s"}]', i)::json,
                                            'r1');
        PERFORM pg_temp.cancel_unknown(-i);
        PERFORM * FROM dispatch.results(ARRAY[current_setting('pgd_test.streamed')::bigint]);
        PERFORM * FROM dispatch.metrics();     -- and capacity, health, nodes within it
        PERFORM * FROM dispatch.queues();
    END LOOP;
END
$$;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
DO $$
DECLARE
    outs json;
BEGIN
    -- Settle the previous call's lease and lease one more, as a daemon does.
    FOR i IN 1..10 LOOP
        SELECT json_agg(json_build_object('id', e.id, 'attempt', e.attempt, 'result', '{}'::json)) INTO outs
        FROM dispatch.exchange(outs, 1) e WHERE e.kind = 'job';
        PERFORM * FROM dispatch.stream(json_build_array(json_build_object(
            'id', current_setting('pgd_test.streamed')::bigint, 'attempt', 1, 'seq', i, 'more', true, 'data', 'x')));
        PERFORM * FROM dispatch.extend(ARRAY[current_setting('pgd_test.extended')::bigint], ARRAY[1]);
        PERFORM * FROM dispatch.settle(NULL, true);
    END LOOP;
    PERFORM set_config('pgd_test.outs', outs::text, false);
END
$$;
RESET SESSION AUTHORIZATION;

-- The table grows by 20,000 finished and 2,000 queued jobs, not analysed, and another
-- node takes 2,000 leases.
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, state, result, finished_at)
SELECT 'm1', '/v1/chat/completions', '{}', 3, 'succeeded', '{}', now() FROM generate_series(1, 20000);
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts)
SELECT 'm1', '/v1/chat/completions', '{}', 3 FROM generate_series(1, 2000);
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, state, attempt, leased_by, lease_expires_at,
                           started_at)
SELECT 'm1', '/v1/chat/completions', '{}', 3, 'leased', 1, (SELECT id FROM dispatch.nodes WHERE name = 'gpu-b'),
       now() + interval '1 hour', now()
FROM generate_series(1, 2000);

-- Sequential scans of dispatch.jobs, and rows read from it so far in this transaction:
-- rows returned by its sequential and bitmap scans plus entries returned by its indexes
-- (a plain index scan's rows are counted on the index).
CREATE FUNCTION pg_temp.jobs_reads(OUT scans bigint, OUT tuples bigint) LANGUAGE sql AS $$
    SELECT pg_stat_get_xact_numscans('dispatch.jobs'::regclass),
           pg_stat_get_xact_tuples_returned('dispatch.jobs'::regclass)
           + pg_stat_get_xact_tuples_fetched('dispatch.jobs'::regclass)
           + (SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid))::bigint
              FROM pg_index i WHERE i.indrelid = 'dispatch.jobs'::regclass)
$$;
CREATE TEMP TABLE reads (call text PRIMARY KEY, scans bigint, tuples bigint);
CREATE FUNCTION pg_temp.mark(p_call text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pg_temp.reads SELECT p_call, r.scans, r.tuples FROM pg_temp.jobs_reads() r
$$;
CREATE FUNCTION pg_temp.since(p_call text, OUT scans bigint, OUT tuples bigint) LANGUAGE sql AS $$
    SELECT r.scans - m.scans, r.tuples - m.tuples FROM pg_temp.jobs_reads() r, pg_temp.reads m
    WHERE m.call = p_call
$$;

SELECT pg_temp.mark('submit_many') \g /dev/null
SELECT count(*) FROM dispatch.submit_many('[{"model": "m1", "payload": {}}]', 'r1') \g /dev/null
SELECT is((pg_temp.since('submit_many')).scans, 0::bigint, 'submit_many: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('submit_many')).tuples, '<', 10000::bigint,
              'submit_many: reads a fraction of the table');

-- A keyed request takes submit_many's general path (010).
SELECT pg_temp.mark('submit_many keyed') \g /dev/null
SELECT count(*) FROM dispatch.submit_many('[{"model": "m1", "payload": {}, "idempotency_key": "grown"}]', 'r1') \g /dev/null
SELECT is((pg_temp.since('submit_many keyed')).scans, 0::bigint,
          'submit_many, general path: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('submit_many keyed')).tuples, '<', 10000::bigint,
              'submit_many, general path: reads a fraction of the table');

SELECT pg_temp.mark('exchange') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.exchange(current_setting('pgd_test.outs')::json, 5) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT is((pg_temp.since('exchange')).scans, 0::bigint, 'exchange: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('exchange')).tuples, '<', 10000::bigint, 'exchange: reads a fraction of the table');
-- Before 019 the settlement, the expired-lease probe and the count of gpu-a's own
-- leases each read one of the two leased-job indexes whole (4,049 entries here).
SELECT cmp_ok((pg_temp.since('exchange')).tuples, '<', 200::bigint,
              'exchange: settles, probes and counts without reading the other node''s 2,000 leases');

-- settle (023) on the leases gpu-a took in the exchange above (it keeps the two that
-- stream and extend use), among gpu-b's 2,000, and the wake time
-- after it (_next_wake: the earliest delayed job or lease expiry on its models).
SELECT json_agg(json_build_object('id', j.id, 'attempt', j.attempt, 'result', '{}'::json)) AS settle_outs
FROM dispatch.jobs j JOIN dispatch.nodes n ON n.id = j.leased_by
WHERE n.name = 'gpu-a' AND j.state = 'leased' AND j.id NOT IN (:streamed, :extended) \gset
SELECT pg_temp.mark('settle') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq(format('SELECT kind, lease_expires_at FROM dispatch.settle(%L, true)', :'settle_outs'),
                  $$VALUES ('wake', now() + interval '1 minute')$$,
                  'settle: the leases settled; gpu-a''s two others run out next');
RESET SESSION AUTHORIZATION;
SELECT is((pg_temp.since('settle')).scans, 0::bigint, 'settle: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('settle')).tuples, '<', 200::bigint,
              'settle: settles and finds the wake time without reading the other node''s 2,000 leases');

SELECT pg_temp.mark('stream') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.stream(json_build_array(json_build_object(
    'id', :streamed, 'attempt', 1, 'seq', 11, 'more', false, 'data', 'x'))) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT is((pg_temp.since('stream')).scans, 0::bigint, 'stream: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('stream')).tuples, '<=', 20::bigint, 'stream: reads the job it relays for, not the table');

-- The last job added: a scan of the table in its physical order meets it last.
SELECT max(id) AS cancelled FROM dispatch.jobs \gset
SELECT pg_temp.mark('cancel') \g /dev/null
SELECT is(dispatch.cancel(:cancelled), 'cancelled', 'cancel: cancels a queued job');
SELECT is((pg_temp.since('cancel')).scans, 0::bigint, 'cancel: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('cancel')).tuples, '<=', 20::bigint, 'cancel: reads the job it cancels, not the table');

SELECT pg_temp.mark('results') \g /dev/null
SELECT count(*) FROM dispatch.results(ARRAY[:streamed, :extended]::bigint[]) \g /dev/null
SELECT is((pg_temp.since('results')).scans, 0::bigint, 'results: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('results')).tuples, '<=', 20::bigint, 'results: reads the jobs asked for, not the table');

SELECT pg_temp.mark('extend') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.extend(ARRAY[:streamed, :extended]::bigint[], ARRAY[1, 1]) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT is((pg_temp.since('extend')).scans, 0::bigint, 'extend: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('extend')).tuples, '<=', 20::bigint, 'extend: reads the jobs asked for, not the table');

-- The gateway's status and metrics reads count the 2,000 queued and 2,000+ leased jobs;
-- the table holds 24,000. Before 021 each call read all of it (metrics() five times).
SELECT count(*) AS whole FROM dispatch.jobs \gset
CREATE FUNCTION pg_temp.reads_less_than_whole(p_fn text, p_what text, p_whole bigint) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM pg_temp.mark(p_fn);
    EXECUTE format('SELECT count(*) FROM dispatch.%I()', p_fn);
    r := pg_temp.since(p_fn);
    RETURN NEXT is(r.scans, 0::bigint, p_fn || ': no sequential scan of the grown table');
    RETURN NEXT cmp_ok(r.tuples, '<', p_whole, p_fn || ': ' || p_what || ' without reading the whole table');
END
$$;
SELECT pg_temp.reads_less_than_whole(v.fn, v.what, :whole)
FROM (VALUES (1, 'capacity', 'counts queued and leased jobs'), (2, 'queues', 'counts queued and leased jobs'),
             (3, 'health', 'finds waiting work and busy nodes'), (4, 'nodes', 'counts each node''s leases'),
             (5, 'metrics', 'reads capacity, health and nodes')) AS v(n, fn, what)
ORDER BY v.n;

-- Calls made once in a while, planned at their first call of a session (here, on the
-- statistics of three jobs): an operator's requeue of one of gpu-b's leases, and
-- gpu-a's deregister, which hands back the two it still holds (024).
SELECT max(id) AS requeued FROM dispatch.jobs WHERE state = 'leased' \gset
SELECT pg_temp.mark('requeue') \g /dev/null
SELECT is(dispatch.requeue(ARRAY[:requeued::bigint]), 1, 'requeue: the lease goes back to the queue');
SELECT is((pg_temp.since('requeue')).scans, 0::bigint, 'requeue: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('requeue')).tuples, '<=', 20::bigint, 'requeue: reads the jobs asked for, not the table');
SELECT pg_temp.mark('deregister') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.deregister(), 2, 'deregister: gpu-a hands back its two leases');
RESET SESSION AUTHORIZATION;
SELECT is((pg_temp.since('deregister')).scans, 0::bigint, 'deregister: no sequential scan of the grown table');
SELECT cmp_ok((pg_temp.since('deregister')).tuples, '<', 200::bigint,
              'deregister: finds its leases without reading the other node''s 2,000');

SELECT * FROM finish();
ROLLBACK;
