-- Operator side: enroll, drain, disable, enable, revoke, nodes, requeue, prune,
-- settings and set_setting (capacity overrides are in capacity.sql).
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(93);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

------------------------------------------------------------------------------
-- enroll
------------------------------------------------------------------------------
SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll: returns the role it created');
SELECT is((SELECT rolcanlogin AND NOT rolsuper FROM pg_roles WHERE rolname = 'dispatch_node_gpu_a'), true,
          'enroll: the role can log in and is not a superuser');
SELECT is(pg_has_role('dispatch_node_gpu_a', 'dispatch_daemon', 'MEMBER'), true, 'enroll: the role is in dispatch_daemon');
SELECT is((SELECT jsonb_build_object('role', role_name, 'created', role_created, 'admin', admin_state, 'health', health,
                                     'models', models, 'pid', backend_pid, 'enrolled', enrolled_at = now())
           FROM dispatch.nodes WHERE name = 'gpu-a'),
          '{"role": "dispatch_node_gpu_a", "created": true, "admin": "active", "health": "healthy", "models": [],
            "pid": null, "enrolled": true}'::jsonb,
          'enroll: the node row, not registered yet');
SELECT is(dispatch.enroll('GPU.b-2'), 'dispatch_node_gpu_b_2', 'enroll: the role name is the node name, lower case, _ for others');
SELECT is(dispatch.enroll('gpu-p', 's3cret'), 'dispatch_node_gpu_p', 'enroll with a password');
SELECT is((SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'dispatch_node_gpu_p'), true,
          'enroll: the password is set');
SELECT is((SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'dispatch_node_gpu_a'), true,
          'enroll: no password when none is given');
SELECT is(dispatch.enroll(repeat('n', 63)), left('dispatch_node_' || repeat('n', 63), 63),
          'enroll: a 63-character name; the role name is cut at 63');
CREATE ROLE pgd_test_adopted LOGIN;
SELECT is(dispatch.enroll('gpu-x', 'pw', 'pgd_test_adopted'), 'pgd_test_adopted', 'enroll: adopts an existing role');
SELECT is((SELECT role_created FROM dispatch.nodes WHERE name = 'gpu-x'), false, 'enroll: an adopted role is marked as such');
SELECT is(pg_has_role('pgd_test_adopted', 'dispatch_daemon', 'MEMBER'), true, 'enroll: the adopted role joins dispatch_daemon');
SELECT is((SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'pgd_test_adopted'), true,
          'enroll: the adopted role gets the password');

SELECT throws_ok($$SELECT dispatch.enroll(NULL)$$, '22023', NULL, 'enroll: name NULL');
SELECT throws_ok($$SELECT dispatch.enroll('')$$, '22023', NULL, 'enroll: name empty');
SELECT throws_ok($$SELECT dispatch.enroll('-gpu')$$, '22023', NULL, 'enroll: name starting with -');
SELECT throws_ok($$SELECT dispatch.enroll('gpu a')$$, '22023', NULL, 'enroll: name with a space');
SELECT throws_ok($$SELECT dispatch.enroll('gpu"; DROP ROLE x; --')$$, '22023', NULL, 'enroll: name with quotes');
SELECT throws_ok($$SELECT dispatch.enroll(repeat('n', 64))$$, '22023', NULL, 'enroll: name over 63 characters');
SELECT throws_ok($$SELECT dispatch.enroll('gpu-a')$$, '22023', 'node "gpu-a" is already enrolled', 'enroll: the same name twice');
SELECT throws_ok($$SELECT dispatch.enroll('gpu_a')$$, '22023', 'role "dispatch_node_gpu_a" already belongs to another node',
                 'enroll: a name that maps to another node''s role');
SELECT throws_ok($$SELECT dispatch.enroll('gpu-s', NULL, 'postgres')$$, '22023',
                 'role "postgres" cannot be a node role: it is a superuser, can create roles, or is (in) a gateway or admin group',
                 'enroll: adopting a superuser role');
SELECT throws_ok($$SELECT dispatch.enroll('gpu-g', NULL, 'dispatch_gateway')$$, '22023',
                 'role "dispatch_gateway" cannot be a node role: it is a superuser, can create roles, or is (in) a gateway or admin group',
                 'enroll: adopting the gateway group role');
CREATE ROLE pgd_test_gateway_login LOGIN IN ROLE dispatch_gateway;
SELECT throws_ok($$SELECT dispatch.enroll('gpu-h', NULL, 'pgd_test_gateway_login')$$, '22023',
                 'role "pgd_test_gateway_login" cannot be a node role: it is a superuser, can create roles, or is (in) a gateway or admin group',
                 'enroll: adopting a gateway login role');
SELECT throws_ok($$SELECT dispatch.enroll('gpu-e', NULL, '')$$, '22023', 'role name must be 1 to 63 characters',
                 'enroll: empty role name');
SELECT throws_ok($$SELECT dispatch.enroll('gpu-l', NULL, repeat('r', 64))$$, '22023', NULL, 'enroll: role name over 63');
SELECT is((SELECT count(*) FROM dispatch.nodes WHERE name IN ('gpu_a', 'gpu-s', 'gpu-e', 'gpu-l')), 0::bigint,
          'refused enrolls create no node');

------------------------------------------------------------------------------
-- drain, disable, enable
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.drain('nope')$$, 'PD007', 'no node named "nope"', 'drain: unknown node is PD007');
SELECT throws_ok($$SELECT dispatch.disable('nope')$$, 'PD007', NULL, 'disable: unknown node is PD007');
SELECT throws_ok($$SELECT dispatch.enable('nope')$$, 'PD007', NULL, 'enable: unknown node is PD007');
SELECT throws_ok($$SELECT dispatch.drain(NULL)$$, 'PD007', NULL, 'drain: NULL node is PD007');
SELECT is(dispatch.drain('gpu-a'), 'draining', 'drain returns draining');
SELECT is((SELECT admin_state FROM dispatch.nodes() WHERE name = 'gpu-a'), 'draining', 'nodes() shows draining');
SELECT is(dispatch.disable('gpu-a'), 'disabled', 'disable returns disabled');
SELECT is((SELECT admin_state FROM dispatch.nodes() WHERE name = 'gpu-a'), 'disabled', 'nodes() shows disabled');
SELECT is(dispatch.enable('gpu-a'), 'active', 'enable returns active');
SELECT is((SELECT admin_state FROM dispatch.nodes() WHERE name = 'gpu-a'), 'active', 'nodes() shows active');
SELECT results_eq($$SELECT name FROM dispatch.nodes()$$,
                  format($$VALUES ('GPU.b-2'), ('gpu-a'), ('gpu-p'), ('gpu-x'), (%L)$$, repeat('n', 63)),
                  'nodes(): every enrolled node, by name');

------------------------------------------------------------------------------
-- revoke
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.revoke('nope')$$, 'PD007', NULL, 'revoke: unknown node is PD007');
SELECT is(dispatch.revoke('gpu-p'), 0, 'revoke: a node holding nothing hands back 0');
SELECT is((SELECT count(*) FROM pg_roles WHERE rolname = 'dispatch_node_gpu_p'), 0::bigint, 'revoke: the created role is dropped');
SELECT is((SELECT count(*) FROM dispatch.nodes WHERE name = 'gpu-p'), 0::bigint, 'revoke: the node is gone');
SELECT is(dispatch.revoke('gpu-x'), 0, 'revoke an adopted role''s node');
SELECT is((SELECT count(*) FROM pg_roles WHERE rolname = 'pgd_test_adopted'), 1::bigint, 'revoke: an adopted role is kept');
SELECT is(pg_has_role('pgd_test_adopted', 'dispatch_daemon', 'MEMBER'), false, 'revoke: but loses dispatch_daemon');
SELECT is(dispatch.enroll('gpu-p'), 'dispatch_node_gpu_p', 'a revoked name can be enrolled again');

-- A node that held leases: revoke hands them back (here its lock is released first,
-- since in this test the node's session is the test's own).
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 4)).node_name, 'gpu-a', 'gpu-a registers');
RESET SESSION AUTHORIZATION;
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 2) AS h1 \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 2) AS h2 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT count(*) FROM dispatch.lease(4)), 2::bigint, 'gpu-a leases two jobs');
RESET SESSION AUTHORIZATION;
SELECT is(pg_advisory_unlock(1885627504, (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a')), true,
          'the node''s session goes away (its lock is released)');
SELECT is(dispatch.revoke('gpu-a'), 2, 'revoke returns the number of jobs handed back');
SELECT results_eq(format('SELECT state, attempt, max_attempts, leased_by FROM dispatch.jobs WHERE id IN (%s, %s) ORDER BY id', :h1, :h2),
                  $$VALUES ('queued', 1, 3, NULL::integer), ('queued', 1, 3, NULL::integer)$$,
                  'revoke: held jobs are queued again, the hand-back not counted as a failed attempt');
SELECT is((SELECT count(*) FROM pg_roles WHERE rolname = 'dispatch_node_gpu_a'), 0::bigint, 'revoke: gpu-a''s role is dropped');

------------------------------------------------------------------------------
-- requeue
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_p;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 10)).node_name, 'gpu-p', 'gpu-p registers');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3) AS q_leased \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_p;
SELECT is((SELECT id FROM dispatch.lease(1)), :q_leased::bigint, 'gpu-p leases one job');
RESET SESSION AUTHORIZATION;
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3) AS q_failed \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3) AS q_expired \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3) AS q_cancelled \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3) AS q_succeeded \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', 3) AS q_queued \gset
UPDATE dispatch.jobs SET state = 'failed', attempt = 3, finished_at = now() - interval '1 min',
                         run_at = now() - interval '2 min', error = '{"code": "x"}' WHERE id = :q_failed;
UPDATE dispatch.jobs SET state = 'expired', attempt = 1, finished_at = now() WHERE id = :q_expired;
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE id = :q_cancelled;
UPDATE dispatch.jobs SET state = 'succeeded', attempt = 1, result = '{"ok": 1}', finished_at = now() WHERE id = :q_succeeded;
UPDATE dispatch.jobs SET run_at = now() + interval '1 min' WHERE id = :q_queued;
SELECT is(dispatch.requeue(ARRAY[:q_leased, :q_failed, :q_expired, :q_cancelled, :q_succeeded, :q_queued, -1]::bigint[]), 4,
          'requeue: moves leased, failed, expired and cancelled jobs; returns how many');
SELECT results_eq(format($$SELECT id, state, attempt, max_attempts, run_at = now(), finished_at, result::text, deadline,
                                  leased_by, lease_expires_at
                           FROM dispatch.jobs WHERE id IN (%s, %s, %s, %s) ORDER BY id$$, :q_leased, :q_failed, :q_expired, :q_cancelled),
                  format($$VALUES (%s::bigint, 'queued', 1, 4, true, NULL::timestamptz, NULL::text, NULL::timestamptz, NULL::integer, NULL::timestamptz),
                                  (%s::bigint, 'queued', 3, 6, true, NULL, NULL, NULL, NULL, NULL),
                                  (%s::bigint, 'queued', 1, 4, true, NULL, NULL, NULL, NULL, NULL),
                                  (%s::bigint, 'queued', 0, 3, true, NULL, NULL, NULL, NULL, NULL)$$,
                         :q_leased, :q_failed, :q_expired, :q_cancelled),
                  'requeue: queued now, a fresh set of attempts, no deadline, no lease');
SELECT results_eq(format('SELECT state, run_at > now() FROM dispatch.jobs WHERE id IN (%s, %s) ORDER BY id', :q_succeeded, :q_queued),
                  $$VALUES ('succeeded', false), ('queued', true)$$, 'requeue: succeeded and queued jobs are left alone');
SET SESSION AUTHORIZATION dispatch_node_gpu_p;
SELECT throws_ok(format('SELECT dispatch.complete(%s, 1, %L)', :q_leased, '{}'), 'PD004', NULL,
                 'requeue: the former holder''s late result is refused');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.requeue(NULL), 0, 'requeue: NULL moves nothing');
SELECT is(dispatch.requeue('{}'), 0, 'requeue: no ids moves nothing');

------------------------------------------------------------------------------
-- prune
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.prune(0)$$, '22023', 'max rows must be positive, got 0', 'prune: 0 rows');
SELECT throws_ok($$SELECT dispatch.prune(-5)$$, '22023', NULL, 'prune: negative rows');
DELETE FROM dispatch.jobs;
SELECT dispatch.submit('m1', NULL, '{}') AS p_old1 \gset
SELECT dispatch.submit('m1', NULL, '{}') AS p_old2 \gset
SELECT dispatch.submit('m1', NULL, '{}') AS p_old3 \gset
SELECT dispatch.submit('m1', NULL, '{}') AS p_recent \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, '1 hour', NULL, NULL, 'gw_p') AS p_overdue \gset
SELECT dispatch.submit('m1', NULL, '{}') AS p_queued \gset
-- A job is created before it finishes (a second before, here).
UPDATE dispatch.jobs SET state = 'succeeded', finished_at = now() - interval '2 days',
                         created_at = now() - interval '2 days 1 second' WHERE id IN (:p_old1, :p_old2);
UPDATE dispatch.jobs SET state = 'failed', finished_at = now() - interval '25 hours',
                         created_at = now() - interval '25 hours 1 second' WHERE id = :p_old3;
UPDATE dispatch.jobs SET state = 'succeeded', finished_at = now() - interval '23 hours',
                         created_at = now() - interval '23 hours 1 second' WHERE id = :p_recent;
UPDATE dispatch.jobs SET deadline = now() - interval '1 s' WHERE id = :p_overdue;
SELECT is(dispatch.prune(2), 2::bigint, 'prune: deletes at most max rows');
SELECT results_eq($$SELECT id FROM dispatch.jobs WHERE state IN ('succeeded', 'failed') ORDER BY id$$,
                  format('VALUES (%s::bigint), (%s::bigint)', :p_old3, :p_recent), 'prune: the oldest go first');
SELECT is((SELECT jsonb_build_object('state', state, 'code', error->>'code', 'finished', finished_at = now())
           FROM dispatch.jobs WHERE id = :p_overdue),
          '{"state": "expired", "code": "deadline_exceeded", "finished": true}'::jsonb,
          'prune: a queued job past its deadline is expired');
SELECT is(dispatch.set_setting('prune_batch', 1), 1::numeric, 'prune_batch 1');
SELECT is(dispatch.prune(), 1::bigint, 'prune: the batch defaults to prune_batch');
SELECT is(dispatch.prune(), 0::bigint, 'prune: nothing older than retention_seconds is left');
SELECT results_eq($$SELECT id, state FROM dispatch.jobs ORDER BY id$$,
                  format($$VALUES (%s::bigint, 'succeeded'), (%s::bigint, 'expired'), (%s::bigint, 'queued')$$,
                         :p_recent, :p_overdue, :p_queued),
                  'prune: recent finished jobs and unfinished jobs are kept');
SELECT is(dispatch.set_setting('retention_seconds', 3600), 3600::numeric, 'retention_seconds 3600');
SELECT is(dispatch.prune(10), 1::bigint, 'prune: retention_seconds decides what is old');
-- A call reads the jobs created before the cutoff, not the table (022): here 3,000
-- recent finished jobs behind one old one.
DELETE FROM dispatch.jobs;
SELECT dispatch.submit('m1', NULL, '{}') AS p_old4 \gset
UPDATE dispatch.jobs SET state = 'succeeded', finished_at = now() - interval '2 hours',
                         created_at = now() - interval '2 hours 1 second' WHERE id = :p_old4;
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, state, result, finished_at)
SELECT 'm1', '/v1/chat/completions', '{}', 3, 'succeeded', '{}', now() FROM generate_series(1, 3000);
-- A job created before the cutoff whose id came after a younger one's (its submit's
-- transaction began first) waits until that one is old too.
SELECT dispatch.submit('m1', NULL, '{}') AS p_late_id \gset
UPDATE dispatch.jobs SET state = 'succeeded', finished_at = now() - interval '3 hours',
                         created_at = now() - interval '3 hours 1 second' WHERE id = :p_late_id;
CREATE FUNCTION pg_temp.jobs_rows_read() RETURNS bigint LANGUAGE sql AS $$
    SELECT pg_stat_get_xact_tuples_returned('dispatch.jobs'::regclass)
           + pg_stat_get_xact_tuples_fetched('dispatch.jobs'::regclass)
           + (SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid))::bigint
              FROM pg_index i WHERE i.indrelid = 'dispatch.jobs'::regclass)
$$;
SELECT pg_temp.jobs_rows_read() AS before_prune \gset
SELECT is(dispatch.prune(10), 1::bigint, 'prune: deletes the old job before the 3,000 recent ones');
-- (Index entries of the jobs deleted earlier in this transaction are read too: ~100.)
SELECT cmp_ok(pg_temp.jobs_rows_read() - :before_prune, '<', 300::bigint,
              'prune: reads the jobs created before the cutoff and stops at the first younger one');
SELECT is((SELECT count(*) FROM dispatch.jobs WHERE id IN (:p_old4, :p_late_id)), 1::bigint,
          'prune: an old job whose id comes after a younger one''s waits for a later call');
UPDATE dispatch.jobs SET created_at = now() - interval '2 hours', finished_at = now() - interval '2 hours'
WHERE state = 'succeeded' AND id < :p_late_id;
SELECT is(dispatch.prune(10000), 3001::bigint, 'prune: it goes once the jobs before it are old too');
-- An expired lease on a model no live node serves is taken back by prune.
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 2) AS p_orphan \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 1) AS p_orphan_spent \gset
UPDATE dispatch.jobs SET state = 'leased', attempt = 1, leased_by = 999999, lease_expires_at = now() - interval '1 s'
WHERE id IN (:p_orphan, :p_orphan_spent);
SELECT is(dispatch.prune(10), 0::bigint, 'prune: taking back leases deletes nothing');
SELECT results_eq(format($$SELECT state, attempt, error->>'code' FROM dispatch.jobs WHERE id IN (%s, %s) ORDER BY id$$,
                         :p_orphan, :p_orphan_spent),
                  $$VALUES ('queued'::text, 1, 'lease_expired'::text), ('failed', 1, 'lease_expired')$$,
                  'prune: an expired lease goes back to the queue, or fails when its attempts are spent');

------------------------------------------------------------------------------
-- settings
------------------------------------------------------------------------------
SELECT results_eq($$SELECT key FROM dispatch.settings()$$,
    $$VALUES ('default_max_attempts'), ('default_slots_per_node'), ('fallback_capacity'), ('lease_seconds'),
             ('prune_batch'), ('push_jobs'), ('push_lease_seconds'), ('queue_depth_per_slot'), ('retention_seconds'), ('retry_base_ms'), ('retry_cap_ms'),
             ('retry_factor'), ('stale_seconds')$$,
    'settings(): every knob, by key');
SELECT is((SELECT ROW(value, min_value, max_value)::text FROM dispatch.settings() WHERE key = 'lease_seconds'),
          '(60,1,86400)', 'settings(): value and allowed range');
SELECT is(dispatch.set_setting('lease_seconds', 86400), 86400::numeric, 'set_setting: the maximum is accepted');
SELECT is((SELECT value FROM dispatch.settings() WHERE key = 'lease_seconds'), 86400::numeric, 'set_setting: stored');
SELECT is(dispatch.set_setting('lease_seconds', 1), 1::numeric, 'set_setting: the minimum is accepted');
SELECT throws_ok($$SELECT dispatch.set_setting('no_such_knob', 1)$$, '22023', 'unknown setting "no_such_knob"',
                 'set_setting: unknown key');
SELECT throws_ok($$SELECT dispatch.set_setting(NULL, 1)$$, '22023', NULL, 'set_setting: NULL key');
SELECT throws_ok($$SELECT dispatch.set_setting('lease_seconds', NULL)$$, '22023', NULL, 'set_setting: NULL value');
SELECT throws_ok($$SELECT dispatch.set_setting('lease_seconds', 0)$$, '22023', 'setting lease_seconds must be between 1 and 86400, got 0',
                 'set_setting: below the minimum');
SELECT throws_ok($$SELECT dispatch.set_setting('lease_seconds', 86401)$$, '22023', NULL, 'set_setting: above the maximum');
SELECT throws_ok($$SELECT dispatch.set_setting('lease_seconds', 1.5)$$, '22023', 'setting lease_seconds takes a whole number, got 1.5',
                 'set_setting: a fraction where a whole number is needed');
SELECT is(dispatch.set_setting('retry_factor', 2.5), 2.5, 'set_setting: retry_factor takes a fraction');
SELECT is((SELECT value FROM dispatch.settings() WHERE key = 'lease_seconds'), 1::numeric, 'refused changes keep the old value');

-- The one row a submit reads its settings from (018) follows every change: each key is
-- a column holding the setting's value, and nothing else is.
SELECT is((SELECT count(*) FROM dispatch.setting_values), 1::bigint, 'setting_values: one row');
SELECT is_empty($$SELECT s.key FROM dispatch.settings s, dispatch.setting_values v
                  WHERE (to_jsonb(v) ->> s.key)::numeric IS DISTINCT FROM s.value$$,
                'setting_values: every setting, with the value set_setting gave it');
SELECT is_empty($$SELECT k FROM dispatch.setting_values v, jsonb_object_keys(to_jsonb(v)) k
                  WHERE k NOT IN (SELECT key FROM dispatch.settings)$$,
                'setting_values: no column that is not a setting');

SELECT * FROM finish();
ROLLBACK;
