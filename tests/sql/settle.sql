-- Daemon side: dispatch.settle (023), the round trip that settles without leasing.
-- Each case is a pair of twin jobs: one settled by exchange(outcomes, 0), the other by
-- settle(outcomes); both must answer the same rows and leave the same job rows.
-- now() is fixed inside the test transaction.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(24);

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
SELECT is(dispatch.enroll('gpu-c'), 'dispatch_node_gpu_c', 'enroll gpu-c (never registers)');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 10)).node_name, 'gpu-a', 'gpu-a serves m1');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 10)).node_name, 'gpu-b', 'gpu-b serves m1');
RESET SESSION AUTHORIZATION;
SELECT dispatch.set_setting('retry_base_ms', 1000) \g /dev/null
SELECT id AS node_a FROM dispatch.nodes WHERE name = 'gpu-a' \gset

CREATE TEMP TABLE cases (name text, attempt integer, max_attempts integer, past_deadline boolean, holder text,
                         outcome jsonb, reply text);
INSERT INTO cases VALUES
    ('success',             1, 3, false, 'gpu-a', '{"attempt": 1, "result": {"ok": 1}}', 'gw_1'),
    ('error',               1, 3, false, 'gpu-a', '{"attempt": 1, "error": {"code": "provider_4xx"}}', 'gw_1'),
    ('retry',               1, 3, false, 'gpu-a', '{"attempt": 1, "error": {"code": "provider_5xx"}, "retryable": true}', 'gw_2'),
    ('retry, spent',        3, 3, false, 'gpu-a', '{"attempt": 3, "error": {"code": "timeout"}, "retryable": true}', NULL),
    ('retry, past deadline', 1, 3, true, 'gpu-a', '{"attempt": 1, "error": {"code": "x"}, "retryable": "true"}', NULL),
    ('wrong attempt',       2, 3, false, 'gpu-a', '{"attempt": 1, "result": {}}', NULL),
    ('gpu-b''s lease',      1, 3, false, 'gpu-b', '{"attempt": 1, "result": {}}', NULL);
CREATE TEMP TABLE twins (name text, via text, id bigint);
INSERT INTO twins
SELECT c.name, v.via, dispatch.submit('m1', NULL, '{}', 0, NULL, c.max_attempts, NULL, c.reply)
FROM cases c CROSS JOIN (VALUES ('exchange'), ('settle')) v(via);
UPDATE dispatch.jobs j SET state = 'leased', attempt = c.attempt, leased_by = n.id, started_at = now(),
                           lease_expires_at = now() + interval '60 s',
                           deadline = CASE WHEN c.past_deadline THEN now() - interval '1 s' END
FROM twins t JOIN cases c ON c.name = t.name JOIN dispatch.nodes n ON n.name = c.holder
WHERE j.id = t.id;
SELECT dispatch.submit('m1', NULL, '{"waits": true}') AS waiting \gset
CREATE TEMP TABLE got (via text, kind text, id bigint, attempt integer);
CREATE TEMP VIEW outcomes_of AS
    SELECT t.via, json_agg(c.outcome || jsonb_build_object('id', t.id)
                           ORDER BY t.id)::jsonb || '[{"id": 987654321, "attempt": 1, "result": {}}]' AS outcomes
    FROM cases c JOIN twins t ON t.name = c.name GROUP BY t.via;
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
INSERT INTO got SELECT 'exchange', r.kind, r.id, r.attempt
FROM outcomes_of o, dispatch.exchange(o.outcomes::json, 0) r WHERE o.via = 'exchange';
INSERT INTO got SELECT 'settle', r.kind, r.id, r.attempt
FROM outcomes_of o, dispatch.settle(o.outcomes::json) r WHERE o.via = 'settle';
SELECT is(current_setting('synchronous_commit'), 'on', 'settle: a call that settles keeps the durable commit');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- What it answers and what it leaves: as exchange(outcomes, 0)
------------------------------------------------------------------------------
SELECT results_eq(
    $$SELECT coalesce(t.name, 'unknown id'), g.kind, g.attempt FROM got g LEFT JOIN twins t ON t.id = g.id
      WHERE g.via = 'settle' ORDER BY 1$$,
    $$VALUES ('gpu-b''s lease', 'stale', 1), ('unknown id', 'stale', 1), ('wrong attempt', 'stale', 1)$$,
    'settle: the outcomes that hold no lease of this node are answered stale, nothing else');
SELECT results_eq(
    $$SELECT coalesce(t.name, 'unknown id'), g.kind, g.attempt FROM got g LEFT JOIN twins t ON t.id = g.id
      WHERE g.via = 'settle' ORDER BY g.id$$,
    $$SELECT coalesce(t.name, 'unknown id'), g.kind, g.attempt FROM got g LEFT JOIN twins t ON t.id = g.id
      WHERE g.via = 'exchange' ORDER BY g.id$$,
    'settle answers the rows exchange(outcomes, 0) answers, in the same order');
CREATE TEMP VIEW after AS
    SELECT t.name, t.via, jsonb_build_object('state', j.state, 'attempt', j.attempt, 'result', j.result::jsonb,
                                             'error', j.error, 'run_in', j.run_at - now(),
                                             'finished', j.finished_at IS NOT NULL, 'lease', j.lease_expires_at,
                                             'leased_by', j.leased_by) AS row
    FROM twins t JOIN dispatch.jobs j ON j.id = t.id;
SELECT results_eq($$SELECT name, row->>'state', row->>'run_in', (row->>'finished')::boolean FROM after
                    WHERE via = 'settle' ORDER BY name$$,
                  $$VALUES ('error', 'failed', '00:00:00', true), ('gpu-b''s lease', 'leased', '00:00:00', false),
                           ('retry', 'queued', '00:00:01', false), ('retry, past deadline', 'expired', '00:00:01', true),
                           ('retry, spent', 'failed', '00:00:00', true), ('success', 'succeeded', '00:00:00', true),
                           ('wrong attempt', 'leased', '00:00:00', false)$$,
                  'settle: success, final error, retry with backoff, attempts spent, deadline passed; stale rows untouched');
SELECT is_empty($$SELECT s.name FROM after s JOIN after e ON e.name = s.name AND e.via = 'exchange'
                  WHERE s.via = 'settle' AND s.row IS DISTINCT FROM e.row$$,
                'settle leaves every job row as exchange(outcomes, 0) leaves its twin');
SELECT results_eq(format('SELECT state, attempt FROM dispatch.jobs WHERE id = %s', :waiting),
                  $$VALUES ('queued', 0)$$, 'settle leases nothing, though a job waits for the node''s model');

------------------------------------------------------------------------------
-- The wake row (p_wake): when to look again, for the jobs as the call leaves them
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.settle(NULL, true)$$,
                  $$VALUES ('wake', now() + interval '1 s')$$, 'settle, wake: the retries it queued come due first');
RESET SESSION AUTHORIZATION;
-- 027: a retry already due when settle runs (it came due after the node's last
-- exchange) is a reason to look now; 025's rule skipped it and the job waited for its deadline.
UPDATE dispatch.jobs SET created_at = now() - interval '10 s', run_at = now() - interval '1 s'
WHERE id IN (SELECT id FROM twins WHERE name = 'retry');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.settle(NULL, true)$$,
                  $$VALUES ('wake', now() - interval '1 s')$$, 'settle, wake: a retry already due says look now');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET state = 'failed', finished_at = now() WHERE id IN (SELECT id FROM twins WHERE name = 'retry');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.settle(NULL, true)$$,
                  $$VALUES ('wake', now() + interval '60 s')$$, 'settle, wake: then the leases on its models run out');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL WHERE state = 'leased';
UPDATE dispatch.jobs SET state = 'leased', attempt = 1, leased_by = :node_a, started_at = now(),
                         lease_expires_at = now() + interval '30 s'
WHERE id = :waiting;
SELECT dispatch.drain('gpu-a') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.settle(NULL, true)$$,
                  $$VALUES ('wake', NULL::timestamptz)$$, 'settle, wake: a drained node has no reason to look');
RESET SESSION AUTHORIZATION;
SELECT dispatch.enable('gpu-a') \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.settle(NULL, true)$$,
                  $$VALUES ('wake', now() + interval '30 s')$$, 'settle, wake: its own lease counts while it holds it');
SELECT results_eq(format($$SELECT kind, lease_expires_at FROM dispatch.settle('[{"id": %s, "attempt": 1, "result": {}}]', true)$$,
                         :waiting),
                  $$VALUES ('wake', NULL::timestamptz)$$,
                  'settle, wake: the lease it settles no longer counts (nothing left to look for)');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- Its cost in statements: B8 counts every statement a call runs, nested ones too
------------------------------------------------------------------------------
-- A job with a waiting gateway, settled with a wake asked for: the settlement, then
-- one statement for the reply NOTIFY and the wake time (025; 023 ran four).
SELECT id AS replied FROM twins WHERE name = 'success' AND via = 'settle' \gset
UPDATE dispatch.jobs SET state = 'leased', attempt = 1, leased_by = :node_a, started_at = now(),
                         lease_expires_at = now() + interval '30 s', finished_at = NULL, result = NULL
WHERE id = :replied;
SELECT pg_stat_statements_reset() \g /dev/null
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT count(*) FROM dispatch.settle(format('[{"id": %s, "attempt": 1, "result": {}}]', :replied)::json, true) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT coalesce(sum(calls), 0) AS nested FROM pg_stat_statements
WHERE NOT toplevel AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \gset
SELECT is(:nested::integer, 2, 'settle with a reply and a wake runs two statements inside it');

------------------------------------------------------------------------------
-- Bad input and sessions: the errors exchange gives
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok($$SELECT * FROM dispatch.settle('{"id": 1}')$$, '22023', 'outcomes must be a JSON array',
                 'settle: outcomes not an array');
SELECT throws_ok($$SELECT * FROM dispatch.settle('[{"id": 1, "attempt": 1, "result": {}, "error": {}}]')$$, '22023',
                 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}',
                 'settle: a malformed outcome');
SELECT is_empty($$SELECT * FROM dispatch.settle(NULL) UNION ALL SELECT * FROM dispatch.settle('[]')$$,
                'settle: no outcomes, no rows');
SELECT is(current_setting('synchronous_commit'), 'off', 'settle: a call that settled nothing does not wait for the disk');
SET SESSION AUTHORIZATION dispatch_node_gpu_c;
SELECT throws_ok($$SELECT * FROM dispatch.settle(NULL)$$, 'PD005', 'node "gpu-c" is not registered in this session',
                 'settle: a node that has not registered is told to');
RESET SESSION AUTHORIZATION;
SELECT throws_ok($$SELECT * FROM dispatch.settle(NULL)$$, 'PD005', 'role "postgres" is not enrolled as a node',
                 'settle: a role that is not a node is told so');

SELECT * FROM finish();
ROLLBACK;
