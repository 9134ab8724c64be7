-- Jobs pushed to an idle node (migration 015): when a submit stores its jobs already
-- leased to a node, when it does not, and that a pushed job is an ordinary lease
-- afterwards (settled, handed back). What the node's notification carries is checked
-- end to end in tests/integration/test_daemon.py (a transaction cannot read its own
-- notifications).
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(35);

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 2)).node_name, 'gpu-a', 'gpu-a serves m1 with 2 slots');
RESET SESSION AUTHORIZATION;

CREATE FUNCTION pg_temp.submit(p_batch json) RETURNS bigint[] LANGUAGE sql AS $$
    SELECT array_agg(s.id ORDER BY s.idx) FROM dispatch.submit_many(p_batch, 'gw_push') s
$$;
CREATE FUNCTION pg_temp.states(p_ids bigint[]) RETURNS text LANGUAGE sql AS $$
    SELECT string_agg(j.state, ',' ORDER BY j.id) FROM dispatch.jobs j WHERE j.id = ANY (p_ids)
$$;
CREATE FUNCTION pg_temp.one_job(p_model text DEFAULT 'm1', p_size integer DEFAULT 1) RETURNS json LANGUAGE sql AS $$
    SELECT json_build_array(json_build_object('model', p_model, 'payload',
                                              json_build_object('messages', repeat('x', p_size))))
$$;
-- Settles what gpu-a holds, so that its slots are free again.
CREATE FUNCTION pg_temp.settle_all() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatch.jobs SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL
    WHERE state IN ('leased', 'queued');
END
$$;

------------------------------------------------------------------------------
-- Who takes pushes
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.accept_pushes(true)$$, 'PD005', NULL,
    'accept_pushes from a session that is not a node is refused');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok($$SELECT dispatch.accept_pushes(NULL)$$, '22023',
    'accept_pushes takes true or false, got NULL', 'accept_pushes(NULL) is refused');
RESET SESSION AUTHORIZATION;

SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued',
    'a node that did not accept pushes: the job is queued');
SELECT pg_temp.settle_all();

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.accept_pushes(true), true, 'gpu-a accepts pushed jobs');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT push_pid FROM dispatch.nodes WHERE name = 'gpu-a'), pg_backend_pid(),
    'accept_pushes records the calling session');

------------------------------------------------------------------------------
-- A push
------------------------------------------------------------------------------
CREATE TEMP TABLE first_push AS SELECT unnest(pg_temp.submit(pg_temp.one_job())) AS id;
SELECT results_eq(
    $$SELECT j.state, j.attempt, j.leased_by, j.lease_expires_at - now(), j.started_at = now(), j.run_at = now()
      FROM dispatch.jobs j JOIN first_push f USING (id)$$,
    $$SELECT 'leased'::text, 1, (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a'), interval '2 seconds', true, true$$,
    'an empty queue and a free slot: the job is stored leased to gpu-a, attempt 1, for push_lease_seconds');
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'leased',
    'a second job while one slot is still free: pushed too');
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued',
    'no free slot left: queued (and the node woken as before)');
SELECT pg_temp.settle_all();

SELECT is(pg_temp.states(pg_temp.submit('[{"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}]')),
    'leased,leased', 'a batch that fits the free slots goes to the node whole');
SELECT pg_temp.settle_all();
CREATE TEMP TABLE pushed_pair AS
SELECT s.id, s.idx FROM unnest(pg_temp.submit('[{"model": "m1", "payload": {"n": 1}}, {"model": "m1", "payload": {"n": 2}}]'))
                        WITH ORDINALITY AS s(id, idx);
SELECT is((SELECT string_agg(j.state || ' ' || (j.payload->>'n'), ',' ORDER BY p.idx)
           FROM pushed_pair p JOIN dispatch.jobs j ON j.id = p.id),
    'leased 1,leased 2', 'a pushed batch: each element gets the id of the job that holds its payload');
SELECT pg_temp.settle_all();
SELECT is(pg_temp.states(pg_temp.submit(
    '[{"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}, {"model": "m1", "payload": {}}]')),
    'queued,queued,queued', 'a batch larger than the free slots is queued whole');
SELECT pg_temp.settle_all();

------------------------------------------------------------------------------
-- When a submit does not push
------------------------------------------------------------------------------
-- Something waits in the queue: a push would overtake it.
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts) VALUES ('m1', '/v1/chat/completions', '{}', 3);
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued',
    'a job already queued for the model: the new one queues behind it');
SELECT pg_temp.settle_all();
-- A retry waiting for its time counts as queued too.
INSERT INTO dispatch.jobs (model, endpoint, payload, max_attempts, run_at)
VALUES ('m1', '/v1/chat/completions', '{}', 3, now() + interval '1 minute');
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued',
    'a delayed retry for the model: the new job is queued');
SELECT pg_temp.settle_all();

SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job('m1', 7400))), 'leased',
    'a payload that fits a notification is pushed');
SELECT pg_temp.settle_all();
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job('m1', 7500))), 'queued',
    'a payload too large for a notification is queued');
SELECT pg_temp.settle_all();

SELECT is(pg_temp.states(pg_temp.submit(
    '[{"model": "m1", "payload": {}, "idempotency_key": "push-1"}]')), 'queued',
    'the general path (an idempotency key) never pushes');
SELECT pg_temp.settle_all();

SELECT lives_ok($$SELECT dispatch.set_setting('push_jobs', 0)$$, 'push_jobs = 0');
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued', 'push_jobs = 0: queued');
SELECT lives_ok($$SELECT dispatch.set_setting('push_jobs', 1)$$, 'push_jobs = 1');
SELECT pg_temp.settle_all();

UPDATE dispatch.nodes SET push_pid = pg_backend_pid() + 1 WHERE name = 'gpu-a';
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued',
    'accepted by another session than the registered one (an old connection): queued');
UPDATE dispatch.nodes SET push_pid = pg_backend_pid() WHERE name = 'gpu-a';
SELECT pg_temp.settle_all();

SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 2)).node_name, 'gpu-b',
    'gpu-b serves m1 too (and takes no pushes)');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.drain('gpu-a'), 'draining', 'gpu-a drains');
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued', 'a draining node gets no pushes');
SELECT is(dispatch.enable('gpu-a'), 'active', 'gpu-a is active again');
SELECT pg_temp.settle_all();

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.accept_pushes(false), false, 'gpu-a stops accepting pushed jobs');
RESET SESSION AUTHORIZATION;
SELECT is(pg_temp.states(pg_temp.submit(pg_temp.one_job())), 'queued', 'after accept_pushes(false): queued');
SELECT pg_temp.settle_all();
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.accept_pushes(true), true, 'gpu-a accepts pushed jobs again');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- A pushed job is an ordinary lease
------------------------------------------------------------------------------
CREATE TEMP TABLE settled_push AS SELECT unnest(pg_temp.submit(pg_temp.one_job())) AS id;
GRANT SELECT ON settled_push TO PUBLIC;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT count(*) FROM dispatch.exchange(
              json_build_array(json_build_object('id', (SELECT id FROM settled_push), 'attempt', 1,
                                                 'result', json_build_object('ok', true))), 0)
           WHERE kind = 'stale'), 0::bigint, 'exchange settles a pushed job by (id, attempt 1)');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = (SELECT id FROM settled_push)), 'succeeded',
    'the pushed job succeeded');

CREATE TEMP TABLE handed_push AS SELECT unnest(pg_temp.submit(pg_temp.one_job())) AS id;
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is(dispatch.deregister(), 1, 'deregister hands back the pushed job it holds');
RESET SESSION AUTHORIZATION;
SELECT results_eq(
    $$SELECT j.state, j.attempt, j.leased_by, j.max_attempts FROM dispatch.jobs j JOIN handed_push USING (id)$$,
    $$VALUES ('queued'::text, 1, NULL::integer, 4)$$,
    'handed back: queued again, its attempt kept, one more attempt allowed');
SELECT isnt_empty($$SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid()
                      AND l.classid = dispatch._push_lock_class()::oid AND l.mode = 'ExclusiveLock' AND l.granted$$,
    'the hand-back took the node''s push lock exclusively (pushes in flight commit first)');

SELECT * FROM finish();
ROLLBACK;
