-- Daemon side: dispatch.exchange, complete, fail, extend, next_wake.
-- Fencing by (id, attempt), retries with backoff, lease expiry, the wake row.
-- now() is fixed inside the test transaction: time passes by moving rows' timestamps.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(112);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1', 'm2'], 10)).node_name, 'gpu-a', 'gpu-a serves m1, m2');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 10)).node_name, 'gpu-b', 'gpu-b serves m1');
RESET SESSION AUTHORIZATION;
SELECT id AS node_a FROM dispatch.nodes WHERE name = 'gpu-a' \gset
SELECT id AS node_b FROM dispatch.nodes WHERE name = 'gpu-b' \gset

------------------------------------------------------------------------------
-- exchange: bad arguments
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok($$SELECT * FROM dispatch.exchange(NULL, NULL)$$, '22023', NULL, 'exchange: max_jobs NULL');
SELECT throws_ok($$SELECT * FROM dispatch.exchange(NULL, -1)$$, '22023', NULL, 'exchange: max_jobs -1');
SELECT throws_ok($$SELECT * FROM dispatch.exchange(NULL, 10001)$$, '22023', NULL, 'exchange: max_jobs 10001');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('{"id": 1}', 0)$$, '22023', 'outcomes must be a JSON array',
                 'exchange: outcomes not an array');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[5]', 0)$$, '22023', NULL, 'exchange: an outcome that is not an object');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"attempt": 1, "result": {}}]', 0)$$, '22023',
                 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}',
                 'exchange: an outcome without id');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"id": 1, "result": {}}]', 0)$$, '22023', NULL,
                 'exchange: an outcome without attempt');
-- Outcome ids and attempts that are not well formed, each refused with 22023.
SELECT throws_ok(format('SELECT * FROM dispatch.exchange(%L, 0)', t.outcomes), '22023', NULL, 'exchange: ' || t.what)
FROM (VALUES
    ('[{"id": "x", "attempt": 1, "result": {}}]', 'a non-numeric id'),
    ('[{"id": 1.5, "attempt": 1, "result": {}}]', 'a fractional id'),
    ('[{"id": 9223372036854775808, "attempt": 1, "result": {}}]', 'an id beyond bigint'),
    ('[{"id": 10000000000000000000, "attempt": 1, "result": {}}]', 'an id of twenty digits'),
    ('[{"id": -1, "attempt": 1, "result": {}}]', 'a negative id'),
    ('[{"id": 1e3, "attempt": 1, "result": {}}]', 'an id with an exponent'),
    ('[{"id": "", "attempt": 1, "result": {}}]', 'an empty id'),
    ('[{"id": 1, "attempt": 1000000000, "result": {}}]', 'an attempt of ten digits')) AS t(outcomes, what);
SELECT results_eq($$SELECT kind, id, attempt
                    FROM dispatch.exchange('[{"id": 9223372036854775807, "attempt": 999999999, "result": {}},
                                             {"id": "0012", "attempt": "3", "result": {}}]', 0)$$,
                  $$VALUES ('stale', 12::bigint, 3), ('stale', 9223372036854775807::bigint, 999999999)$$,
                  'exchange: the largest id, a nine-digit attempt and digits given as strings are well formed (stale here)');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"id": 1, "attempt": -1, "result": {}}]', 0)$$, '22023', NULL,
                 'exchange: a negative attempt');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"id": 1, "attempt": 1}]', 0)$$, '22023', NULL,
                 'exchange: neither result nor error');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"id": 1, "attempt": 1, "result": {}, "error": {}}]', 0)$$, '22023', NULL,
                 'exchange: both result and error');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"id": 1, "attempt": 1, "error": "boom"}]', 0)$$, '22023', NULL,
                 'exchange: an error that is not an object');
SELECT throws_ok($$SELECT * FROM dispatch.exchange('[{"id": 1, "attempt": 1, "error": {}, "retryable": "maybe"}]', 0)$$,
                 '22023', NULL, 'exchange: retryable that is not a boolean');
SELECT throws_ok($$SELECT dispatch.fail(1, 1, '[1]', false)$$, '22023', NULL, 'fail: an error that is not an object');
SELECT throws_ok($$SELECT dispatch.complete(1, 1, NULL)$$, '22023', NULL,
                 'complete: a NULL result is refused (an outcome needs a result)');
SELECT is_empty($$SELECT * FROM dispatch.exchange('[]', 0)$$, 'exchange: no outcomes, max_jobs 0: no rows');
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.exchange(NULL, 5)$$,
                  $$VALUES ('wake', NULL::timestamptz)$$,
                  'exchange: nothing to lease gives one wake row, NULL when there is no reason to look');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- complete and fencing
------------------------------------------------------------------------------
SELECT dispatch.submit('m1', NULL, '{"n": 1}', 0, NULL, 3, NULL, 'gw_1') AS j1 \gset
SELECT dispatch.submit('m1', NULL, '{"n": 2}', 0, NULL, 3, NULL, 'gw_1') AS j2 \gset
SELECT dispatch.submit('m2', NULL, '{"n": 3}', 0, NULL, 3, NULL, 'gw_1') AS j3 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT id, attempt FROM dispatch.lease(2)$$, format('VALUES (%s::bigint, 1), (%s::bigint, 1)', :j1, :j2),
                  'gpu-a leases two jobs');
SELECT lives_ok(format('SELECT dispatch.complete(%s, 1, %L)', :j1, '{"choices": [{"text": "hi"}]}'), 'complete: the holder completes');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'result', result::jsonb, 'error', error, 'lease', lease_expires_at,
                                     'finished', finished_at >= now(), 'leased_by', leased_by)
           FROM dispatch.jobs WHERE id = :j1),
          jsonb_build_object('state', 'succeeded', 'result', '{"choices": [{"text": "hi"}]}'::jsonb, 'error', NULL,
                             'lease', NULL, 'finished', true, 'leased_by', :node_a),
          'complete: succeeded with the result, lease cleared, finished');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok(format('SELECT dispatch.complete(%s, 1, %L)', :j1, '{}'), 'PD004',
                 format('attempt 1 of job %s no longer holds its lease; result refused', :j1),
                 'complete: completing twice is PD004');
SELECT throws_ok(format('SELECT dispatch.complete(%s, 2, %L)', :j2, '{}'), 'PD004', NULL,
                 'complete: a wrong attempt is PD004');
SELECT throws_ok(format('SELECT dispatch.fail(%s, 2, %L, false)', :j2, '{}'), 'PD004', NULL,
                 'fail: a wrong attempt is PD004');
SELECT throws_ok(format('SELECT dispatch.complete(%s, 0, %L)', :j3, '{}'), 'PD004', NULL,
                 'complete: a queued job is PD004');
SELECT throws_ok($$SELECT dispatch.complete(987654321, 1, '{}')$$, 'PD004', NULL, 'complete: an unknown job is PD004');
SELECT throws_ok($$SELECT dispatch.complete(-1, 1, '{}')$$, '22023', NULL, 'complete: a negative id is a bad argument');
SELECT is((SELECT ROW(e.id, e.attempt)::text FROM dispatch.extend(ARRAY[:j2::bigint], ARRAY[2]) e WHERE NOT e.ok),
          format('(%s,2)', :j2), 'extend: a wrong attempt is not extended (ok false)');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT throws_ok(format('SELECT dispatch.complete(%s, 1, %L)', :j2, '{}'), 'PD004', NULL,
                 'complete: another node''s job is PD004');
SELECT throws_ok(format('SELECT dispatch.fail(%s, 1, %L, true)', :j2, '{}'), 'PD004', NULL,
                 'fail: another node''s job is PD004');
SELECT is((SELECT ok FROM dispatch.extend(ARRAY[:j2::bigint], ARRAY[1])), false, 'extend: another node''s job is not extended');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'leased_by', leased_by,
                                     'lease', lease_expires_at = now() + interval '60 s', 'result', result)
           FROM dispatch.jobs WHERE id = :j2),
          jsonb_build_object('state', 'leased', 'attempt', 1, 'leased_by', :node_a, 'lease', true, 'result', NULL),
          'refused outcomes and extensions never change the row');

-- A batch: one success, one stale, leases in the same round trip.
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq(format($$SELECT kind, id, attempt FROM dispatch.exchange('[{"id": %s, "attempt": 1, "result": {"ok": 1}},
                                                                        {"id": %s, "attempt": 7, "result": {}}]', 5)$$, :j2, :j2),
                  format($$VALUES ('stale', %s::bigint, 7), ('job', %s::bigint, 1), ('wake', NULL, NULL)$$, :j2, :j3),
                  'exchange: settles, reports the stale outcome, leases the next job and says when to wake');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :j2), 'succeeded', 'exchange: the good outcome is settled');

------------------------------------------------------------------------------
-- fail: not retryable, retryable with backoff, attempts spent, deadline passed
------------------------------------------------------------------------------
SELECT is(dispatch.set_setting('retry_base_ms', 1000), 1000::numeric, 'retry_base_ms 1000');
SELECT is(dispatch.set_setting('retry_factor', 3), 3::numeric, 'retry_factor 3');
SELECT is(dispatch.set_setting('retry_cap_ms', 5000), 5000::numeric, 'retry_cap_ms 5000');

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT lives_ok(format('SELECT dispatch.fail(%s, 1, %L, false)', :j3, '{"code": "provider_4xx", "status": 400, "message": "bad"}'),
                'fail: not retryable');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'error', error, 'finished', finished_at >= now(), 'lease', lease_expires_at)
           FROM dispatch.jobs WHERE id = :j3),
          '{"state": "failed", "error": {"code": "provider_4xx", "status": 400, "message": "bad"}, "finished": true,
            "lease": null}'::jsonb,
          'fail: not retryable ends failed with the error kept');

SELECT dispatch.submit('m2', NULL, '{"n": 4}', 0, NULL, 3) AS r1 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT attempt FROM dispatch.lease(1)), 1, 'lease attempt 1 of the retry job');
SELECT lives_ok(format('SELECT dispatch.fail(%s, 1, %L, true)', :r1, '{"code": "provider_5xx", "status": 503}'), 'attempt 1 fails, retryable');
SELECT is(dispatch.next_wake(), now() + interval '1 s', 'next_wake: the retry''s run_at');
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.exchange(NULL, 1)$$,
                  $$VALUES ('wake', now() + interval '1 s')$$,
                  'exchange: the job is not due yet; the wake row reports its run_at');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'run_at', run_at = now() + interval '1 s',
                                     'finished', finished_at, 'lease', lease_expires_at, 'code', error->>'code')
           FROM dispatch.jobs WHERE id = :r1),
          '{"state": "queued", "attempt": 1, "run_at": true, "finished": null, "lease": null, "code": "provider_5xx"}'::jsonb,
          'fail: retryable goes back to the queue with run_at = now + retry_base_ms');

UPDATE dispatch.jobs SET run_at = now() - interval '1 ms' WHERE id = :r1;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT attempt FROM dispatch.lease(1)), 2, 'once due, the job is leased with attempt 2');
SELECT lives_ok(format('SELECT dispatch.fail(%s, 2, %L, true)', :r1, '{"code": "timeout"}'), 'attempt 2 fails, retryable');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT run_at FROM dispatch.jobs WHERE id = :r1), now() + interval '3 s',
          'backoff after attempt 2 is base x factor = 3 s');
UPDATE dispatch.jobs SET max_attempts = 4, run_at = now() - interval '1 ms' WHERE id = :r1;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT attempt FROM dispatch.lease(1)), 3, 'attempt 3');
SELECT lives_ok(format('SELECT dispatch.fail(%s, 3, %L, true)', :r1, '{"code": "timeout"}'), 'attempt 3 fails, retryable');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT run_at FROM dispatch.jobs WHERE id = :r1), now() + interval '5 s',
          'backoff after attempt 3 is capped at retry_cap_ms (9 s -> 5 s)');
UPDATE dispatch.jobs SET run_at = now() - interval '1 ms' WHERE id = :r1;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT attempt FROM dispatch.lease(1)), 4, 'attempt 4 (the last)');
SELECT lives_ok(format('SELECT dispatch.fail(%s, 4, %L, true)', :r1, '{"code": "timeout"}'), 'the last attempt fails, retryable');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'finished', finished_at IS NOT NULL, 'code', error->>'code')
           FROM dispatch.jobs WHERE id = :r1),
          '{"state": "failed", "attempt": 4, "finished": true, "code": "timeout"}'::jsonb,
          'fail: retryable with attempts spent ends failed');

SELECT is(dispatch.set_setting('retry_factor', 1.5), 1.5, 'retry_factor 1.5 (fractional factors are allowed)');
SELECT dispatch.submit('m2', NULL, '{"n": 5}', 0, NULL, 5) AS r2 \gset
UPDATE dispatch.jobs SET attempt = 2 WHERE id = :r2;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT attempt FROM dispatch.lease(1)), 3, 'lease attempt 3');
SELECT lives_ok(format('SELECT dispatch.fail(%s, 3, %L, true)', :r2, '{"code": "x"}'), 'attempt 3 fails');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT run_at FROM dispatch.jobs WHERE id = :r2), now() + interval '2.25 s', 'backoff 1000 x 1.5^2 = 2.25 s');

SELECT dispatch.submit('m2', NULL, '{"n": 6}', 0, '1 hour', 3) AS r3 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT attempt FROM dispatch.lease(1)), 1, 'lease a job with a deadline');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET deadline = now() - interval '1 s' WHERE id = :r3;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT lives_ok(format('SELECT dispatch.fail(%s, 1, %L, true)', :r3, '{"code": "provider_5xx"}'), 'it fails retryable after its deadline');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'finished', finished_at IS NOT NULL) FROM dispatch.jobs WHERE id = :r3),
          '{"state": "expired", "finished": true}'::jsonb, 'fail: past the deadline ends expired, not retried');

------------------------------------------------------------------------------
-- next_wake: retries and lease expiries on the node's models only
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state IN ('queued', 'leased');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.next_wake(), NULL, 'next_wake: NULL with nothing queued or leased');
RESET SESSION AUTHORIZATION;
SELECT dispatch.submit('m2', NULL, '{}') AS w1 \gset
SELECT dispatch.submit('m1', NULL, '{}') AS w2 \gset
UPDATE dispatch.jobs SET run_at = now() + interval '40 s' WHERE id = :w1;
UPDATE dispatch.jobs SET run_at = now() + interval '30 s' WHERE id = :w2;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.next_wake(), now() + interval '30 s', 'next_wake: the earliest delayed job on its models');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is(dispatch.next_wake(), now() + interval '30 s', 'next_wake: gpu-b sees the m1 job');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET run_at = now() + interval '90 s' WHERE id = :w2;
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is(dispatch.next_wake(), now() + interval '90 s', 'next_wake: a delayed job of a model it does not serve is ignored');
RESET SESSION AUTHORIZATION;
SELECT dispatch.submit('m1', NULL, '{}') AS w3 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :w3::bigint, 'gpu-a leases the ready m1 job');
SELECT is(dispatch.next_wake(), now() + interval '40 s', 'next_wake: gpu-a''s own lease (60 s) is later than its retry (40 s)');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is(dispatch.next_wake(), now() + interval '60 s', 'next_wake: gpu-b wakes when the lease on its model runs out');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.drain('gpu-b'), 'draining', 'drain gpu-b');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.exchange(NULL, 1)$$, $$VALUES ('wake', NULL::timestamptz)$$,
                  'exchange: a draining node is told no wake time');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.enable('gpu-b'), 'active', 'enable gpu-b');

------------------------------------------------------------------------------
-- extend
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok($$SELECT * FROM dispatch.extend(ARRAY[1::bigint, 2], ARRAY[1])$$, '22023',
                 'ids and attempts must have the same length', 'extend: arrays of different lengths');
SELECT throws_ok($$SELECT * FROM dispatch.extend(ARRAY[1::bigint], NULL)$$, '22023', NULL, 'extend: attempts NULL');
SELECT is_empty($$SELECT * FROM dispatch.extend(NULL, NULL)$$, 'extend: nothing to extend');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.set_setting('lease_seconds', 120), 120::numeric, 'lease_seconds 120');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq(format('SELECT id, attempt, ok, lease_expires_at FROM dispatch.extend(ARRAY[%s, -5]::bigint[], ARRAY[1, 1])', :w3),
                  format($$VALUES (-5::bigint, 1, false, NULL), (%s::bigint, 1, true, now() + interval '120 s')$$, :w3),
                  'extend: renews a held lease by lease_seconds; an unknown job is ok = false; rows in id order');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT lease_expires_at FROM dispatch.jobs WHERE id = :w3), now() + interval '120 s', 'extend: the row''s lease moved');

------------------------------------------------------------------------------
-- lease expiry: taken back by another node with attempt + 1; attempts spent -> failed
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :w3;
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT results_eq($$SELECT id, attempt FROM dispatch.lease(5)$$, format('VALUES (%s::bigint, 2)', :w3),
                  'an expired lease is taken back by another node''s lease and leased again with attempt + 1');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'leased_by', leased_by, 'code', error->>'code')
           FROM dispatch.jobs WHERE id = :w3),
          jsonb_build_object('state', 'leased', 'attempt', 2, 'leased_by', :node_b, 'code', 'lease_expired'),
          'the row is leased by gpu-b, attempt 2, with the lease_expired error of attempt 1 kept');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok(format('SELECT dispatch.complete(%s, 1, %L)', :w3, '{}'), 'PD004', NULL,
                 'the old holder''s late completion is refused');
SELECT is((SELECT ok FROM dispatch.extend(ARRAY[:w3::bigint], ARRAY[1])), false, 'the old holder cannot extend it');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT leased_by FROM dispatch.jobs WHERE id = :w3), :node_b, 'the stale attempt changed nothing');

UPDATE dispatch.jobs SET max_attempts = 2, lease_expires_at = now() - interval '1 s' WHERE id = :w3;
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3, NULL, 'gw_exp') AS w4 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT id, attempt FROM dispatch.lease(1)$$, format('VALUES (%s::bigint, 1)', :w4),
                  'gpu-a leases another job; the expired one has spent its attempts');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'code', error->>'code', 'finished', finished_at IS NOT NULL,
                                     'lease', lease_expires_at)
           FROM dispatch.jobs WHERE id = :w3),
          '{"state": "failed", "attempt": 2, "code": "lease_expired", "finished": true, "lease": null}'::jsonb,
          'lease expiry with attempts spent ends failed with error code lease_expired');

UPDATE dispatch.jobs SET deadline = now() - interval '1 s', lease_expires_at = now() - interval '1 s' WHERE id = :w4;
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is_empty($$SELECT * FROM dispatch.lease(1)$$, 'nothing to lease');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'code', error->>'code') FROM dispatch.jobs WHERE id = :w4),
          '{"state": "expired", "code": "deadline_exceeded"}'::jsonb,
          'an expired lease past the job''s deadline ends expired with deadline_exceeded');

-- A lease that has not run out is not taken back.
SELECT dispatch.submit('m1', NULL, '{}') AS w5 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :w5::bigint, 'gpu-a leases w5');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is_empty($$SELECT * FROM dispatch.lease(5)$$, 'a live lease is not taken back');
RESET SESSION AUTHORIZATION;
-- Expired leases are only taken back by nodes serving the job's model.
SELECT dispatch.submit('m2', NULL, '{}') AS w6 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :w6::bigint, 'gpu-a leases an m2 job');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :w6;
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is_empty($$SELECT * FROM dispatch.lease(5)$$, 'gpu-b does not serve m2');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :w6), 'leased', 'an expired lease on another model is left alone');

-- Durability: a round trip that only leases commits without waiting for the disk;
-- one that settles an outcome waits.
UPDATE dispatch.jobs SET state = 'cancelled' WHERE state IN ('queued', 'leased');
SELECT dispatch.submit('m1', NULL, '{}') AS w7 \gset
SET synchronous_commit = on;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :w7::bigint, 'gpu-a leases w7');
SELECT is(current_setting('synchronous_commit'), 'off', 'a lease-only exchange commits without waiting for fsync');
RESET SESSION AUTHORIZATION;
SET synchronous_commit = on;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT count(*) FROM dispatch.exchange(format('[{"id":%s,"attempt":1,"result":{}}]', :w7)::json, 0)),
          0::bigint, 'gpu-a completes w7');
SELECT is(current_setting('synchronous_commit'), 'on', 'an exchange that settles an outcome keeps the durable commit');
RESET SESSION AUTHORIZATION;
-- The same when the call also meets a job whose deadline passed in the queue, so that
-- it looks again for the slot that job left: the second look settles nothing, yet the
-- outcome settled in the first must still wait for the disk.
SELECT dispatch.submit('m1', NULL, '{}') AS w8 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :w8::bigint, 'gpu-a leases w8');
RESET SESSION AUTHORIZATION;
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour') AS w9 \gset
UPDATE dispatch.jobs SET deadline = now() - interval '1 s' WHERE id = :w9;
SET synchronous_commit = on;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq(format($$SELECT kind, id FROM dispatch.exchange('[{"id":%s,"attempt":1,"result":{}}]', 1)$$, :w8),
                  $$VALUES ('wake', NULL::bigint)$$,
                  'exchange: w8 settled, w9 met expired in the queue, nothing left to lease');
SELECT is(current_setting('synchronous_commit'), 'on',
          'an exchange that settles an outcome and looks again keeps the durable commit');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :w9), 'expired', 'w9 ended expired');

------------------------------------------------------------------------------
-- The wake row is computed in the statement that settles: a lease settled in it is
-- not a reason to look again; a lease taken in it is.
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state IN ('queued', 'leased');
SELECT dispatch.submit('m1', NULL, '{}') AS x1 \gset
SELECT dispatch.submit('m1', NULL, '{}') AS x2 \gset
SELECT dispatch.submit('m1', NULL, '{}') AS x3 \gset
UPDATE dispatch.jobs SET run_at = now() + interval '300 s' WHERE id = :x2;
UPDATE dispatch.jobs SET run_at = now() + interval '400 s' WHERE id = :x3;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT kind, lease_expires_at FROM dispatch.exchange(NULL, 2)$$,
                  $$VALUES ('job', now() + interval '120 s'), ('wake', now() + interval '120 s')$$,
                  'exchange: a lease taken in the call is a reason to look (its expiry)');
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.next_wake(), now() + interval '120 s', 'next_wake: the lease just taken counts (lease_seconds 120)');
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq(format($$SELECT kind, lease_expires_at FROM dispatch.exchange('[{"id": %s, "attempt": 1, "result": {}}]', 1)$$, :x1),
                  $$VALUES ('wake', now() + interval '300 s')$$,
                  'exchange: settling the only lease wakes for the delayed job, not for the lease it just ended');
RESET SESSION AUTHORIZATION;

SELECT * FROM finish();
ROLLBACK;
