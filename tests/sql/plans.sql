-- Lookups of jobs by id (dispatch.results, dispatch.extend) read only the rows asked
-- for, however much the table has grown since the session planned them: a plan made
-- while the table held a few rows (a new install) must not go on scanning it whole
-- until autovacuum next analyses it.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(4);
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
    '[{"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}]') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.exchange(NULL, 3) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT min(id) AS j1, max(id) AS j3 FROM dispatch.jobs \gset
ANALYZE dispatch.jobs;

-- Both lookups planned in this session, past the calls after which a plan is kept.
SELECT set_config('pgd_test.j1', :'j1', false) \g /dev/null
DO $$
BEGIN
    FOR i IN 1..10 LOOP
        PERFORM * FROM dispatch.results(ARRAY[current_setting('pgd_test.j1')::bigint]);
    END LOOP;
END
$$;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
DO $$
BEGIN
    FOR i IN 1..10 LOOP
        PERFORM * FROM dispatch.extend(ARRAY[current_setting('pgd_test.j1')::bigint], ARRAY[1]);
    END LOOP;
END
$$;
RESET SESSION AUTHORIZATION;

-- The table grows by 20,000 finished jobs, not analysed.
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, state, result, finished_at)
SELECT 'm1', '/v1/chat/completions', '{}', 3, 'succeeded', '{}', now() FROM generate_series(1, 20000);

-- Sequential scans of dispatch.jobs, and rows read from it: rows returned by its
-- sequential and bitmap scans plus entries returned by its indexes (a plain index
-- scan's rows are counted on the index).
CREATE FUNCTION pg_temp.jobs_reads(OUT scans bigint, OUT tuples bigint) LANGUAGE sql AS $$
    SELECT pg_stat_get_xact_numscans('dispatch.jobs'::regclass),
           pg_stat_get_xact_tuples_returned('dispatch.jobs'::regclass)
           + pg_stat_get_xact_tuples_fetched('dispatch.jobs'::regclass)
           + (SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid))::bigint
              FROM pg_index i WHERE i.indrelid = 'dispatch.jobs'::regclass)
$$;
CREATE TEMP TABLE reads AS SELECT * FROM pg_temp.jobs_reads();
SELECT count(*) FROM dispatch.results(ARRAY[:j1, :j3]::bigint[]) \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.extend(ARRAY[:j1, :j3]::bigint[], ARRAY[1, 1]) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT is(now_.scans - reads.scans, 0::bigint, 'results and extend: no sequential scan of the grown table')
FROM reads, pg_temp.jobs_reads() now_;
SELECT cmp_ok(now_.tuples - reads.tuples, '<=', 20::bigint,
              'results and extend: read the rows asked for, not the table')
FROM reads, pg_temp.jobs_reads() now_;

SELECT * FROM finish();
ROLLBACK;
