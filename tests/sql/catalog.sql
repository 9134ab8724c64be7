-- Catalog-wide rules: every function documented, search_path pinned, no table or
-- function open to PUBLIC, SECURITY DEFINER on every function a role may call.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(9);

SELECT has_schema('dispatch');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace AND obj_description(p.oid, 'pg_proc') IS NULL
$$, 'every dispatch function has COMMENT ON FUNCTION');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace
      AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)
$$, 'every dispatch function pins search_path to pg_catalog, pg_temp');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'dispatch'::regnamespace
      AND NOT coalesce(p.proconfig @> ARRAY['jit=off'], false)
$$, 'no dispatch function JIT-compiles (compiling costs ~100 ms per call once tables are large)');

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
                                                    'dispatch.results(bigint[])',
                                                    'dispatch.stream(json)']::regprocedure[]) AS f(oid)
    JOIN pg_proc p ON p.oid = f.oid
    WHERE NOT coalesce(p.proconfig @> ARRAY['plan_cache_mode=force_generic_plan'], false)
$$, 'the functions on a request''s path keep one generic plan per session');

SELECT is(dispatch.schema_version(), (SELECT max(version) FROM dispatch.migrations),
          'schema_version reports the newest migration');

SELECT * FROM finish();
ROLLBACK;
