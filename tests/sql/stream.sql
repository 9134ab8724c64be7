-- dispatch.stream: relays pieces of a leased job to its reply channel, refuses
-- stale attempts, validates its input, and is the daemon's alone.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(14);
GRANT USAGE ON SCHEMA public TO PUBLIC;

SELECT dispatch.enroll('st-a') AS role_a \gset
SELECT dispatch.enroll('st-b') AS role_b \gset
SET SESSION AUTHORIZATION dispatch_node_st_b;
SELECT node_id AS registered FROM dispatch.register('fake', ARRAY['sm'], 4) \gset
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION dispatch_node_st_a;
SELECT node_id AS registered FROM dispatch.register('fake', ARRAY['sm'], 4) \gset
RESET SESSION AUTHORIZATION;

SELECT dispatch.submit('sm', NULL, '{"stream":true}', 0, NULL, NULL, NULL, 'gw_stream') AS job \gset
SELECT dispatch.submit('sm', NULL, '{"stream":true}') AS async_job \gset
SET SESSION AUTHORIZATION dispatch_node_st_a;
SELECT count(*) AS leased FROM dispatch.lease(2) \gset

SELECT results_eq(
    format($$SELECT * FROM dispatch.stream('[{"id":%s,"attempt":1,"seq":0,"more":false,"data":"{\"a\":1}"},
                                            {"id":%s,"attempt":1,"seq":1,"more":true,"data":"part"},
                                            {"id":%s,"attempt":1,"seq":0,"more":false,"data":"x"}]')$$,
           :job, :job, :async_job),
    format($$VALUES (%s::bigint, 1, true), (%s::bigint, 1, true)$$, least(:job, :async_job), greatest(:job, :async_job)),
    'stream: one ok row per leased (id, attempt)');
SELECT is(current_setting('synchronous_commit'), 'off', 'stream: the transaction does not wait for a disk flush');
SELECT results_eq(format($$SELECT * FROM dispatch.stream('[{"id":%s,"attempt":2,"seq":0,"more":false,"data":"x"}]')$$, :job),
                  format($$VALUES (%s::bigint, 2, false)$$, :job), 'stream: a stale attempt gets ok = false');
SELECT results_eq($$SELECT * FROM dispatch.stream('[{"id":999999999,"attempt":1,"seq":0,"more":false,"data":"x"}]')$$,
                  $$VALUES (999999999::bigint, 1, false)$$, 'stream: an unknown job gets ok = false');
SELECT is_empty($$SELECT * FROM dispatch.stream('[]')$$, 'stream: an empty batch is a no-op');
SELECT throws_ok($$SELECT * FROM dispatch.stream('{}')$$, '22023', 'chunks must be a JSON array', 'stream: not an array');
SELECT throws_ok($$SELECT * FROM dispatch.stream(NULL)$$, '22023', 'chunks must be a JSON array', 'stream: NULL');
SELECT throws_ok(format($$SELECT * FROM dispatch.stream('[{"id":%s,"attempt":1,"data":"x"}]')$$, :job), '22023', NULL,
                 'stream: missing seq');
SELECT throws_ok(format($$SELECT * FROM dispatch.stream('[{"id":%s,"attempt":1,"seq":0,"data":"%s"}]')$$, :job, repeat('x', 7001)),
                 '22023', NULL, 'stream: a piece over 7000 bytes');
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION dispatch_node_st_b;
SELECT results_eq(format($$SELECT * FROM dispatch.stream('[{"id":%s,"attempt":1,"seq":2,"more":false,"data":"x"}]')$$, :job),
                  format($$VALUES (%s::bigint, 1, false)$$, :job), 'stream: another node''s job gets ok = false');
RESET SESSION AUTHORIZATION;

-- A node role whose daemon has not registered in this session relays nothing.
SELECT dispatch.enroll('st-c') AS role_c \gset
SET SESSION AUTHORIZATION dispatch_node_st_c;
SELECT throws_ok(format($$SELECT * FROM dispatch.stream('[{"id":%s,"attempt":1,"seq":3,"more":false,"data":"x"}]')$$, :job),
                 'PD005', NULL, 'stream: a node not registered in this session is refused');
SELECT throws_ok($$SELECT * FROM dispatch.stream('[]')$$, 'PD005', NULL,
                 'stream: even with an empty batch');
RESET SESSION AUTHORIZATION;

SELECT ok(NOT has_function_privilege('dispatch_gateway', 'dispatch.stream(json)', 'EXECUTE'), 'stream: not for the gateway');
SELECT ok(has_function_privilege('dispatch_daemon', 'dispatch.stream(json)', 'EXECUTE'), 'stream: for the daemon');

SELECT * FROM finish();
ROLLBACK;
