-- Daemon side: dispatch.register, dispatch.report, dispatch.deregister, dispatch.lease.
-- Identity from the session, ordering, slots, served models, admin state and health.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(122);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
CREATE ROLE pgd_test_stray LOGIN IN ROLE dispatch_daemon;

------------------------------------------------------------------------------
-- register: who may, and bad arguments
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'])$$, 'PD005',
                 'role "postgres" is not enrolled as a node', 'register: a role that is not a node is PD005');
SET SESSION AUTHORIZATION pgd_test_stray;
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'])$$, 'PD005', NULL,
                 'register: a dispatch_daemon member that was never enrolled is PD005');
SELECT throws_ok($$SELECT * FROM dispatch.lease(1)$$, 'PD005', NULL, 'lease: a role that is not a node is PD005');
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok($$SELECT * FROM dispatch.lease(1)$$, 'PD005', 'node "gpu-a" is not registered in this session',
                 'lease: an enrolled node that did not register is PD005');
SELECT throws_ok($$SELECT * FROM dispatch.report('healthy')$$, 'PD005', NULL, 'report: before register is PD005');
SELECT throws_ok($$SELECT dispatch.deregister()$$, 'PD005', NULL, 'deregister: before register is PD005');
SELECT throws_ok($$SELECT dispatch.next_wake()$$, 'PD005', NULL, 'next_wake: before register is PD005');
SELECT throws_ok($$SELECT * FROM dispatch.exchange(NULL, 1)$$, 'PD005', NULL, 'exchange: before register is PD005');
SELECT throws_ok($$SELECT dispatch.set_lease_ahead(1)$$, 'PD005', NULL, 'set_lease_ahead: before register is PD005');
SELECT throws_ok($$SELECT dispatch.complete(1, 1, '{}')$$, 'PD005', NULL, 'complete: before register is PD005');
SELECT throws_ok($$SELECT dispatch.fail(1, 1, '{}', true)$$, 'PD005', NULL, 'fail: before register is PD005');
SELECT throws_ok($$SELECT * FROM dispatch.extend(ARRAY[1::bigint], ARRAY[1])$$, 'PD005', NULL,
                 'extend: before register is PD005');

SELECT throws_ok($$SELECT dispatch.register(NULL, ARRAY['m1'])$$, '22023', NULL, 'register: provider family NULL');
SELECT throws_ok($$SELECT dispatch.register('', ARRAY['m1'])$$, '22023', NULL, 'register: provider family empty');
SELECT throws_ok($$SELECT dispatch.register('LlamaCpp', ARRAY['m1'])$$, '22023', NULL,
                 'register: provider family with upper case');
SELECT throws_ok($$SELECT dispatch.register(repeat('p', 33), ARRAY['m1'])$$, '22023', NULL,
                 'register: provider family over 32 characters');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', NULL)$$, '22023', 'models must list at least one model',
                 'register: models NULL');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', '{}')$$, '22023', 'models must list at least one model',
                 'register: models empty');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1', NULL])$$, '22023', 'model name is required',
                 'register: a NULL model name');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY[''])$$, '22023', NULL, 'register: an empty model name');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY[repeat('m', 257)])$$, '22023', NULL,
                 'register: a model name over 256 characters');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY(SELECT 'm' || g FROM generate_series(1, 1001) g))$$,
                 '22023', 'models lists 1001 models; at most 1000', 'register: over 1000 models');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 0)$$, '22023', NULL, 'register: max concurrency 0');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 100001)$$, '22023', NULL,
                 'register: max concurrency over 100000');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 1, '')$$, '22023', NULL, 'register: empty region');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 1, repeat('r', 65))$$, '22023', NULL,
                 'register: region over 64 characters');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 1, NULL, NULL)$$, '22023', NULL,
                 'register: labels NULL');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 1, NULL, '[1]')$$, '22023', NULL,
                 'register: labels not an object');
SELECT throws_ok($$SELECT dispatch.register('llamacpp', ARRAY['m1'], 1, NULL, jsonb_build_object('k', repeat('v', 4100)))$$,
                 '22023', 'labels must be a JSON object of at most 4096 bytes', 'register: labels over 4096 bytes');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT live FROM dispatch.nodes() WHERE name = 'gpu-a'), false, 'refused registers leave the node not live');

------------------------------------------------------------------------------
-- register: happy path
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT ROW(s.node_name, s.node_channel = 'dispatch_n_' || s.node_id,
                      s.model_channels = ARRAY[dispatch.model_channel('m1'), dispatch.model_channel('m2')])::text
           FROM dispatch.register('vllm', ARRAY['m1', 'm2'], 3, 'eu-west', '{"gpu": "a100"}') s),
          '(gpu-a,t,t)', 'register returns the node id, name, its channel and one channel per model');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('provider', provider_family, 'models', models, 'max', max_concurrency,
                                     'slots', slots, 'region', region, 'labels', labels, 'admin', admin_state,
                                     'health', health, 'live', live, 'pid_is_me', backend_pid = pg_backend_pid(),
                                     'in_flight', in_flight, 'registered', registered_at = now())
           FROM dispatch.nodes() WHERE name = 'gpu-a'),
          '{"provider": "vllm", "models": ["m1", "m2"], "max": 3, "slots": 3, "region": "eu-west",
            "labels": {"gpu": "a100"}, "admin": "active", "health": "healthy", "live": true, "pid_is_me": true,
            "in_flight": 0, "registered": true}'::jsonb,
          'register records what the node serves and makes it live in this backend');
SELECT is((SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
             AND classid = 1885627504 AND objid = (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a') AND objsubid = 2),
          1::bigint, 'register holds the node''s session advisory lock');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT lives_ok($$SELECT dispatch.register('vllm', ARRAY['m1', 'm2'], 3, 'eu-west', '{"gpu": "a100"}')$$,
                'register again in the same session is allowed');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
             AND classid = 1885627504 AND objid = (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a')),
          1::bigint, 'registering twice takes the lock once');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('llamacpp', ARRAY['m3'], 4)).node_name, 'gpu-b', 'gpu-b registers for m3');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- lease: bad arguments
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok($$SELECT * FROM dispatch.lease(NULL)$$, '22023', 'max_jobs must be between 0 and 10000, got <NULL>',
                 'lease: max_jobs NULL');
SELECT throws_ok($$SELECT * FROM dispatch.lease(-1)$$, '22023', NULL, 'lease: max_jobs -1');
SELECT throws_ok($$SELECT * FROM dispatch.lease(10001)$$, '22023', NULL, 'lease: max_jobs 10001');
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: an empty queue gives nothing');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- lease: order, served models, due time
------------------------------------------------------------------------------
SELECT dispatch.submit('m1', NULL, '{"job": "a"}', 0) AS a \gset
SELECT dispatch.submit('m2', '/v1/embeddings', '{"job": "b"}', 5, '1 hour') AS b \gset
SELECT dispatch.submit('m1', NULL, '{"job": "c"}', 5) AS c \gset
SELECT dispatch.submit('m1', NULL, '{"job": "d"}', 0) AS d \gset
SELECT dispatch.submit('m3', NULL, '{"job": "e"}', 100) AS e \gset
SELECT dispatch.submit('m1', NULL, '{"job": "f"}', 100) AS f \gset
UPDATE dispatch.jobs SET run_at = now() - interval '1 minute' WHERE id = :d;
UPDATE dispatch.jobs SET run_at = now() + interval '1 minute' WHERE id = :f;

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
CREATE TEMP TABLE leased1 AS SELECT row_number() OVER () AS n, l.* FROM dispatch.lease(2) l;
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT id FROM leased1 ORDER BY n$$, format('VALUES (%s::bigint), (%s::bigint)', :b, :c),
                  'lease: highest priority first, then id; max_jobs caps the batch');
SELECT is((SELECT jsonb_build_object('attempt', attempt, 'model', model, 'endpoint', endpoint, 'payload', payload::jsonb,
                                     'deadline', deadline = now() + interval '1 hour',
                                     'lease', lease_expires_at = now() + interval '60 s')
           FROM leased1 WHERE id = :b),
          '{"attempt": 1, "model": "m2", "endpoint": "/v1/embeddings", "payload": {"job": "b"}, "deadline": true,
            "lease": true}'::jsonb,
          'lease: returns attempt, model, endpoint, payload, deadline and lease expiry');
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'leased_by', leased_by,
                                     'expires', lease_expires_at = now() + interval '60 s', 'started', started_at = now())
           FROM dispatch.jobs WHERE id = :b),
          jsonb_build_object('state', 'leased', 'attempt', 1, 'leased_by', (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a'),
                             'expires', true, 'started', true),
          'lease: the row is leased by the node for lease_seconds');
SELECT is((SELECT last_poll_started_at = now() AND last_poll_completed_at >= now() FROM dispatch.nodes WHERE name = 'gpu-a'),
          true, 'lease: stamps the node''s poll timestamps');

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT results_eq($$SELECT id FROM dispatch.lease(10)$$, format('VALUES (%s::bigint)', :d),
                  'lease: never more than the free slots (3 slots, 2 held); earlier run_at first');
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: no free slot, no job');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :a), 'queued', 'the job left over is still queued');
SELECT is((SELECT in_flight FROM dispatch.nodes() WHERE name = 'gpu-a'), 3::bigint, 'nodes() counts 3 in flight');

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT count(*) FROM dispatch.exchange(
              format('[{"id": %s, "attempt": 1, "result": {}}, {"id": %s, "attempt": 1, "result": {}}, {"id": %s, "attempt": 1, "result": {}}]',
                     :b, :c, :d)::json, 0)), 0::bigint, 'complete the three jobs');
SELECT results_eq($$SELECT id FROM dispatch.lease(10)$$, format('VALUES (%s::bigint)', :a),
                  'lease: finished jobs free their slots; a future run_at and another node''s model are not leased');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :e), 'queued', 'a job of a model the node does not serve stays queued');
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :f), 'queued', 'a job due later stays queued');

SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT results_eq($$SELECT id FROM dispatch.lease(10)$$, format('VALUES (%s::bigint)', :e), 'gpu-b leases its own model''s job');
SELECT is_empty($$SELECT * FROM dispatch.lease(0)$$, 'lease: max_jobs 0 leases nothing');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- lease: a job whose deadline passed in the queue expires and uses no slot
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state IN ('queued', 'leased');
SELECT dispatch.submit('m3', NULL, '{"job": "late"}', 10, '1 minute', NULL, NULL, 'gw_late') AS late \gset
SELECT dispatch.submit('m3', NULL, '{"job": "on-time"}', 0) AS ontime \gset
UPDATE dispatch.jobs SET deadline = now() - interval '1 s' WHERE id = :late;
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is(dispatch.report('healthy', NULL, 1) IS NOT NULL, true, 'gpu-b now has a single slot');
SELECT results_eq($$SELECT id FROM dispatch.lease(1)$$, format('VALUES (%s::bigint)', :ontime),
                  'lease: skips past an expired job to fill the slot');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('state', state, 'attempt', attempt, 'code', error->>'code', 'finished', finished_at IS NOT NULL)
           FROM dispatch.jobs WHERE id = :late),
          '{"state": "expired", "attempt": 0, "code": "deadline_exceeded", "finished": true}'::jsonb,
          'lease: a queued job past its deadline ends expired with deadline_exceeded');

------------------------------------------------------------------------------
-- lease: default slots, admin state, health
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state IN ('queued', 'leased');
SELECT is(dispatch.set_setting('default_slots_per_node', 2), 2::numeric, 'default_slots_per_node 2');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.report('healthy', NULL, NULL)).node_name, 'gpu-b', 'gpu-b reports no max concurrency');
RESET SESSION AUTHORIZATION;
SELECT is(count(dispatch.submit('m3', NULL, '{}')), 3::bigint, 'three jobs for m3') FROM generate_series(1, 3);
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((SELECT count(*) FROM dispatch.lease(10)), 2::bigint, 'lease: an unreported node gets default_slots_per_node slots');
RESET SESSION AUTHORIZATION;
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'leased';

------------------------------------------------------------------------------
-- set_lease_ahead: leases beyond the slots, only for a node that asked for them
------------------------------------------------------------------------------
SELECT is(count(dispatch.submit('m3', NULL, '{}')), 4::bigint, 'four more jobs for m3 (five queued)') FROM generate_series(1, 4);
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT throws_ok($$SELECT dispatch.set_lease_ahead(-2)$$, '22023',
                 'lease-ahead must be -1 (as many as the slots) or 0 to 100000 jobs, got -2',
                 'set_lease_ahead: below -1 is refused');
SELECT throws_ok($$SELECT dispatch.set_lease_ahead(NULL)$$, '22023', NULL, 'set_lease_ahead: NULL is refused');
SELECT is(dispatch.set_lease_ahead(1), 1, 'set_lease_ahead 1');
SELECT is((SELECT count(*) FROM dispatch.lease(10)), 3::bigint, 'lease: 2 slots and 1 ahead, 3 leases');
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: holding slots and allowance, none more');
SELECT is(dispatch.set_lease_ahead(-1), -1, 'set_lease_ahead -1: as many as the slots');
SELECT is((SELECT count(*) FROM dispatch.lease(10)), 1::bigint, 'lease: -1 lets 2 slots hold 4 (3 held, 1 more)');
SELECT is(dispatch.set_lease_ahead(0), 0, 'set_lease_ahead 0');
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: back to 0 ahead, 4 held on 2 slots, none more');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT lease_ahead FROM dispatch.nodes WHERE name = 'gpu-b'), 0, 'the allowance is kept on the node');
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'leased';

SELECT is(dispatch.drain('gpu-b'), 'draining', 'drain gpu-b');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: a draining node gets nothing');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.disable('gpu-b'), 'disabled', 'disable gpu-b');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: a disabled node gets nothing');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.enable('gpu-b'), 'active', 'enable gpu-b');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.report('degraded', 'connection refused', NULL)).node_name, 'gpu-b', 'gpu-b reports degraded');
SELECT is_empty($$SELECT * FROM dispatch.lease(10)$$, 'lease: a degraded node gets nothing');
SELECT is((dispatch.report('healthy')).node_name, 'gpu-b', 'gpu-b reports healthy');
SELECT is((SELECT count(*) FROM dispatch.lease(10)), 1::bigint, 'lease: a healthy, active node leases again');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- report
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT throws_ok($$SELECT dispatch.report(NULL)$$, '22023', NULL, 'report: health NULL');
SELECT throws_ok($$SELECT dispatch.report('down')$$, '22023', 'health must be healthy or degraded, got "down"',
                 'report: unknown health');
SELECT throws_ok($$SELECT dispatch.report('degraded', '')$$, '22023', NULL, 'report: empty reason');
SELECT throws_ok($$SELECT dispatch.report('degraded', repeat('r', 1001))$$, '22023', NULL, 'report: reason over 1000');
SELECT throws_ok($$SELECT dispatch.report('healthy', NULL, 0)$$, '22023', NULL, 'report: max concurrency 0');
SELECT throws_ok($$SELECT dispatch.report('healthy', NULL, 100001)$$, '22023', NULL, 'report: max concurrency over 100000');
SELECT throws_ok($$SELECT dispatch.report('healthy', NULL, NULL, '{}')$$, '22023', NULL, 'report: empty models');
SELECT throws_ok($$SELECT dispatch.report('healthy', NULL, NULL, ARRAY[''])$$, '22023', NULL, 'report: empty model name');
SELECT is((SELECT model_channels FROM dispatch.report('degraded', 'OOM', 16, ARRAY['m3', 'm4'])),
          ARRAY[dispatch.model_channel('m3'), dispatch.model_channel('m4')],
          'report returns the channels of the new models');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('health', health, 'reason', health_reason, 'max', max_concurrency, 'models', models,
                                     'changed', health_changed_at = now())
           FROM dispatch.nodes WHERE name = 'gpu-b'),
          '{"health": "degraded", "reason": "OOM", "max": 16, "models": ["m3", "m4"], "changed": true}'::jsonb,
          'report records health, reason, max concurrency and models');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.report('healthy', 'ignored')).node_name, 'gpu-b', 'report healthy without models');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT jsonb_build_object('health', health, 'reason', health_reason, 'max', max_concurrency, 'models', models)
           FROM dispatch.nodes WHERE name = 'gpu-b'),
          '{"health": "healthy", "reason": null, "max": null, "models": ["m3", "m4"]}'::jsonb,
          'report: healthy clears the reason, NULL models keeps them, NULL max concurrency means unreported');

------------------------------------------------------------------------------
-- deregister: hands back without using up an attempt, releases the lock
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state IN ('queued', 'leased');
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 2) AS h1 \gset
SELECT dispatch.submit('m2', NULL, '{}', 0, NULL, 100) AS h2 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT count(*) FROM dispatch.lease(10)), 2::bigint, 'gpu-a leases two jobs');
SELECT is(dispatch.deregister(), 2, 'deregister returns the number of jobs handed back');
SELECT throws_ok($$SELECT * FROM dispatch.lease(1)$$, 'PD005', NULL, 'lease: after deregister is PD005');
RESET SESSION AUTHORIZATION;
SELECT results_eq(format('SELECT state, attempt, max_attempts, leased_by IS NULL, lease_expires_at IS NULL FROM dispatch.jobs WHERE id IN (%s, %s) ORDER BY id', :h1, :h2),
                  $$VALUES ('queued', 1, 3, true, true), ('queued', 1, 100, true, true)$$,
                  'deregister: held jobs are queued again with one more allowed attempt (not counted as a failure)');
SELECT is((SELECT live FROM dispatch.nodes() WHERE name = 'gpu-a'), false, 'deregister: the node is no longer live');
SELECT is((SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
             AND classid = 1885627504 AND objid = (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a')),
          0::bigint, 'deregister releases the advisory lock');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('vllm', ARRAY['m1', 'm2'], 3)).node_name, 'gpu-a', 'gpu-a registers again');
SELECT results_eq($$SELECT id, attempt FROM dispatch.lease(10) ORDER BY id$$,
                  format('VALUES (%s::bigint, 2), (%s::bigint, 2)', :h1, :h2), 'handed-back jobs are leased with attempt + 1');
SELECT lives_ok(format('SELECT dispatch.fail(%s, 2, %L, true)', :h1, '{"code": "provider_5xx"}'),
                'the second attempt fails, retryable');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :h1), 'queued',
          'a job of max_attempts 2 that was handed back still has a retry after one real failure');

-- register(p_holding): leases the daemon does not know of are taken back at once.
SELECT dispatch.enroll('gpu-h') AS role_h \gset
UPDATE dispatch.jobs SET state = 'cancelled' WHERE state IN ('queued', 'leased');
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 3) AS k1 \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 1) AS k2 \gset
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 3) AS k3 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_h;
SELECT node_id AS node_h FROM dispatch.register('fake', ARRAY['m1'], 4, p_holding => '[]') \gset
SELECT is((SELECT count(*) FROM dispatch.lease(3)), 3::bigint, 'gpu-h leases three jobs');
SELECT throws_ok($$SELECT * FROM dispatch.register('fake', ARRAY['m1'], 4, p_holding => '{}')$$, '22023',
                 'holding must be a JSON array of {"id", "attempt"}', 'register: holding must be an array');
SELECT lives_ok(format($$SELECT * FROM dispatch.register('fake', ARRAY['m1'], 4, p_holding => '[{"id":%s,"attempt":1}]')$$, :k1),
                'register: re-register holding only k1');
RESET SESSION AUTHORIZATION;
SELECT results_eq(format($$SELECT state, attempt, error->>'code' FROM dispatch.jobs WHERE id IN (%s, %s, %s) ORDER BY id$$, :k1, :k2, :k3),
                  $$VALUES ('leased'::text, 1, NULL::text), ('failed', 1, 'lease_abandoned'), ('queued', 1, 'lease_abandoned')$$,
                  'register: the held lease stays; the others are taken back (failed when attempts are spent)');
SET SESSION AUTHORIZATION dispatch_node_gpu_h;
SELECT lives_ok($$SELECT * FROM dispatch.register('fake', ARRAY['m1'], 4)$$, 'register without holding');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :k1), 'leased', 'register without holding takes nothing back');

-- register(p_holding) also answers which held pairs are not this node's leases: after a
-- database crash a lost job's id can come round as another job (020).
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, state, attempt, leased_by, lease_expires_at)
VALUES ('m1', '/v1/chat/completions', '{}', 3, 'leased', 1, (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a'),
        now() + interval '1 min')
RETURNING id AS k4 \gset
UPDATE dispatch.nodes SET push_pid = pg_backend_pid() + 1 WHERE id = :node_h;
SET SESSION AUTHORIZATION dispatch_node_gpu_h;
CREATE TEMP TABLE stale AS
SELECT stale_holding FROM dispatch.register('fake', ARRAY['m1'], 4, p_holding => format(
    '[{"id":%s,"attempt":1},{"id":%s,"attempt":2},{"id":%s,"attempt":1},{"id":%s,"attempt":1},{"id":%s,"attempt":1},{"id":-5,"attempt":1}]',
    :k1, :k1, :k2, :k3, :k4)::json);
RESET SESSION AUTHORIZATION;
SELECT is((SELECT stale_holding::jsonb FROM stale), format(
    '[{"id":-5,"attempt":1},{"id":%s,"attempt":2},{"id":%s,"attempt":1},{"id":%s,"attempt":1},{"id":%s,"attempt":1}]',
    :k1, :k2, :k3, :k4)::jsonb,
    'register: stale_holding lists the held pairs that are not this node''s leases (gone, another attempt, finished, queued, another node''s)');
SELECT results_eq(format($$SELECT state, leased_by FROM dispatch.jobs WHERE id IN (%s, %s) ORDER BY id$$, :k1, :k4),
                  format($$VALUES ('leased'::text, %s), ('leased', (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a'))$$, :node_h),
                  'register: stale pairs are only reported; the held lease and the other node''s stay as they are');
SELECT is((SELECT push_pid FROM dispatch.nodes WHERE id = :node_h), NULL,
          'register: pushes stop until this session accepts them (push_pid of another session cleared)');
SELECT ok(EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
                  AND classid::bigint = dispatch._push_lock_class() AND objid::bigint = :node_h AND objsubid = 2
                  AND mode = 'ExclusiveLock'),
          'register: holds the node''s push lock exclusively to the end of its transaction (no push during it)');
UPDATE dispatch.nodes SET push_pid = pg_backend_pid() WHERE id = :node_h;
SET SESSION AUTHORIZATION dispatch_node_gpu_h;
SELECT is((SELECT stale_holding::text FROM dispatch.register('fake', ARRAY['m1'], 4, p_holding => '[]')), '[]',
          'register: holding nothing, nothing is stale');
SELECT ok((SELECT stale_holding IS NULL FROM dispatch.register('fake', ARRAY['m1'], 4)),
          'register without holding: stale_holding is NULL');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT push_pid FROM dispatch.nodes WHERE id = :node_h), pg_backend_pid(),
          'register: a push_pid of this very session stays');
UPDATE dispatch.jobs SET state = 'cancelled' WHERE id = :k4;

-- Poll stamps are renewed at most once a second (a write per round trip would cost a
-- row version each time), and the round trip runs on generic plans only.
UPDATE dispatch.nodes SET last_poll_started_at = now() - interval '0.5 s',
                          last_poll_completed_at = now() - interval '0.5 s' WHERE id = :node_h;
SET SESSION AUTHORIZATION dispatch_node_gpu_h;
SELECT lives_ok($$SELECT * FROM dispatch.exchange(NULL, 1)$$, 'exchange with a stamp half a second old');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT last_poll_completed_at FROM dispatch.nodes WHERE id = :node_h), now() - interval '0.5 s',
          'exchange: a poll stamp younger than a second is left alone');
UPDATE dispatch.nodes SET last_poll_completed_at = now() - interval '1.5 s' WHERE id = :node_h;
SET SESSION AUTHORIZATION dispatch_node_gpu_h;
SELECT * FROM dispatch.exchange(NULL, 1) \g /dev/null
RESET SESSION AUTHORIZATION;
SELECT is((SELECT last_poll_started_at = now() AND last_poll_completed_at >= now() FROM dispatch.nodes WHERE id = :node_h),
          true, 'exchange: an older poll stamp is renewed');
SELECT ok((SELECT 'plan_cache_mode=force_generic_plan' = ANY (proconfig) FROM pg_proc
           WHERE oid = 'dispatch.exchange(json,integer)'::regprocedure),
          'exchange runs with generic plans (nothing is planned per call)');

SELECT * FROM finish();
ROLLBACK;
