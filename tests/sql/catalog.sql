-- Catalog-wide rules: every function documented, search_path pinned (or every name bound
-- when the function was created), no table or function open to PUBLIC, SECURITY DEFINER
-- on every function a role may call.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(13);

CREATE FUNCTION pg_temp.plan_of(q text) RETURNS json LANGUAGE plpgsql AS $$
DECLARE p json;
BEGIN
    EXECUTE 'EXPLAIN (VERBOSE, FORMAT JSON) ' || q INTO p;
    RETURN p;
END
$$;

SELECT has_schema('dispatch');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace AND obj_description(p.oid, 'pg_proc') IS NULL
$$, 'every dispatch function has COMMENT ON FUNCTION');

-- A function with a standard SQL body (RETURN ...) had every name in it bound when it
-- was created, so no search_path can change what it calls; it has no SET clause, which
-- would keep the planner from inlining it into the statement that calls it (017), and
-- inlined it runs under that statement's settings.
SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace
      AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)
      AND NOT (p.prosqlbody IS NOT NULL AND p.proconfig IS NULL)
$$, 'every dispatch function pins search_path to pg_catalog, pg_temp, or binds its names at creation');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace
      AND NOT coalesce(p.proconfig @> ARRAY['jit=off'], false)
      AND NOT (p.prosqlbody IS NOT NULL AND p.proconfig IS NULL)
$$, 'no dispatch function JIT-compiles (compiling costs ~100 ms per call once tables are large)');

-- The helpers a submit calls in its statements are planned into them: no call is left.
SELECT doesnt_match(plan::text, 'model_channel', 'model_channel is inlined')
FROM (SELECT pg_temp.plan_of($$SELECT dispatch.model_channel(m) FROM unnest(ARRAY['a', 'b']) m$$) AS plan) x;
SELECT doesnt_match(plan::text, 'node_channel', 'node_channel is inlined')
FROM (SELECT pg_temp.plan_of($$SELECT dispatch.node_channel(i) FROM generate_series(1, 2) i$$) AS plan) x;
SELECT doesnt_match(plan::text, 'fields_problem', '_fields_problem is inlined')
FROM (SELECT pg_temp.plan_of($$SELECT dispatch._fields_problem(e.r, f) FROM json_array_elements('[{}]') e(r)
                               CROSS JOIN LATERAL json_populate_record(NULL::dispatch.request_fields, e.r) f$$)
      AS plan) x;

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace
      AND has_function_privilege('public', p.oid, 'EXECUTE')
$$, 'no dispatch function is executable by PUBLIC');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace AND NOT p.prosecdef
      AND (has_function_privilege('dispatch_gateway', p.oid, 'EXECUTE')
        OR has_function_privilege('dispatch_daemon', p.oid, 'EXECUTE')
        OR has_function_privilege('dispatch_admin', p.oid, 'EXECUTE'))
      AND p.provolatile <> 'i'
$$, 'every non-immutable function a role may call is SECURITY DEFINER');

SELECT is_empty($$
    SELECT c.relname || ' ' || r.rolname FROM pg_class c CROSS JOIN
        (VALUES ('dispatch_gateway'), ('dispatch_daemon')) r(rolname)
    WHERE c.relnamespace = 'dispatch'::regnamespace AND c.relkind IN ('r', 'S', 'v')
      AND (has_table_privilege(r.rolname, c.oid, 'SELECT') OR has_table_privilege(r.rolname, c.oid, 'INSERT')
        OR has_table_privilege(r.rolname, c.oid, 'UPDATE') OR has_table_privilege(r.rolname, c.oid, 'DELETE'))
$$, 'gateway and daemon roles have no privilege on any table or view');

-- A statement with parameters can otherwise be planned again on every call, for the
-- life of the session (migration 012: half of a submit's instructions went to it).
SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM unnest(ARRAY['dispatch.submit_many(json, text)',
                                                    'dispatch.exchange(json, integer)',
                                                    'dispatch.settle(json, boolean)',
                                                    'dispatch.results(bigint[])',
                                                    'dispatch.stream(json)']::regprocedure[]) AS f(oid)
    JOIN pg_proc p ON p.oid = f.oid
    WHERE NOT coalesce(p.proconfig @> ARRAY['plan_cache_mode=force_generic_plan'], false)
$$, 'the functions on a request''s path keep one generic plan per session');

-- 026: pglz cost a settlement of long answers more than parsing them.
SELECT is((SELECT array_agg(a.attname::text || ' ' || a.attcompression::text ORDER BY a.attname) FROM pg_attribute a
           WHERE a.attrelid = 'dispatch.jobs'::regclass AND a.attname IN ('payload', 'result')),
          CASE WHEN EXISTS (SELECT 1 FROM pg_settings s
                            WHERE s.name = 'default_toast_compression' AND 'lz4' = ANY (s.enumvals))
               THEN ARRAY['payload l', 'result l'] ELSE ARRAY['payload ', 'result '] END,
          'payloads and results are compressed with lz4 where the server has it');

SELECT is(dispatch.schema_version(), (SELECT max(version) FROM dispatch.migrations),
          'schema_version reports the newest migration');

SELECT * FROM finish();
ROLLBACK;
