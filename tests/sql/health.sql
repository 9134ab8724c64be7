-- Health signals: stuck queues, stale nodes, degraded nodes (dispatch.health) and the
-- gauges built on them (dispatch.metrics).
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(32);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b (never connects)');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1', 'm2'], 2)).node_name, 'gpu-a', 'gpu-a serves m1, m2 with 2 slots');
RESET SESSION AUTHORIZATION;
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: all is well, no rows');

------------------------------------------------------------------------------
-- stuck queue
------------------------------------------------------------------------------
SELECT dispatch.submit('m1', NULL, '{}') AS j1 \gset
SELECT dispatch.submit('m2', NULL, '{}') AS j2 \gset
UPDATE dispatch.jobs SET run_at = now() - interval '5 s' WHERE id = :j1;
UPDATE dispatch.jobs SET run_at = now() + interval '1 hour' WHERE id = :j2;
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: queued work a live node serves is not stuck');
SELECT is(dispatch.drain('gpu-a'), 'draining', 'drain gpu-a');
SELECT results_eq($$SELECT kind, subject, detail, since FROM dispatch.health()$$,
    $$VALUES ('stuck_queue', 'm1', 'queued jobs for "m1" and no live healthy node serves it', now() - interval '5 s')$$,
    'health: ready work no serving node can take is a stuck queue (work due later is not)');
SELECT results_eq($$SELECT name, labels->>'model', value FROM dispatch.metrics() WHERE name = 'pgdispatch_model_stuck' ORDER BY 2$$,
    $$VALUES ('pgdispatch_model_stuck', 'm1', 1::float8), ('pgdispatch_model_stuck', 'm2', 0::float8)$$,
    'metrics: the stuck flag per model');
SELECT is(dispatch.enable('gpu-a'), 'active', 'enable gpu-a');
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: no longer stuck once a node serves it');

------------------------------------------------------------------------------
-- degraded node
------------------------------------------------------------------------------
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.report('degraded', 'provider refused connection', 2)).node_name, 'gpu-a', 'gpu-a reports degraded');
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT kind, subject, detail, since FROM dispatch.health() ORDER BY kind$$,
    $$VALUES ('degraded_node', 'gpu-a', 'provider refused connection', now()),
             ('stuck_queue', 'm1', 'queued jobs for "m1" and no live healthy node serves it', now() - interval '5 s')$$,
    'health: a degraded node is reported with its reason; its models are stuck');
SELECT results_eq($$SELECT labels->>'state', value FROM dispatch.metrics() WHERE name = 'pgdispatch_nodes' ORDER BY 1$$,
    $$VALUES ('degraded', 1::float8), ('disconnected', 1::float8), ('live', 1::float8), ('stale', 0::float8)$$,
    'metrics: nodes live, disconnected (gpu-b), degraded, stale');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.report('healthy', NULL, 2)).node_name, 'gpu-a', 'gpu-a reports healthy');
RESET SESSION AUTHORIZATION;
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: healthy again, nothing to report');

------------------------------------------------------------------------------
-- stale node: live, free slots, has not looked at work waiting past stale_seconds
------------------------------------------------------------------------------
UPDATE dispatch.jobs SET run_at = now() - interval '90 s' WHERE id = :j1;
UPDATE dispatch.nodes SET registered_at = now() - interval '10 min', last_poll_started_at = now() - interval '5 min',
                          last_poll_completed_at = now() - interval '5 min' WHERE name = 'gpu-a';
SELECT results_eq($$SELECT kind, subject, since FROM dispatch.health()$$,
    $$VALUES ('stale_node', 'gpu-a', now() - interval '90 s')$$,
    'health: a node that has not polled since work waited past stale_seconds (60) is stale');
SELECT matches((SELECT detail FROM dispatch.health() WHERE kind = 'stale_node'),
               '^has free slots but has not polled since .* while "m1" waits since ',
               'health: the stale detail names the waiting model');
SELECT is((SELECT value FROM dispatch.metrics() WHERE name = 'pgdispatch_nodes' AND labels->>'state' = 'stale'), 1::float8,
          'metrics: one stale node');
SELECT is(dispatch.set_setting('stale_seconds', 120), 120::numeric, 'stale_seconds 120');
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: work waiting less than stale_seconds is not stale');
SELECT is(dispatch.set_setting('stale_seconds', 60), 60::numeric, 'stale_seconds 60');
SELECT is((SELECT count(*) FROM dispatch.health() WHERE kind = 'stale_node'), 1::bigint, 'stale again');

-- A node with no free slot is not stale: it cannot take the work.
SELECT dispatch.submit('m2', NULL, '{}', 10) AS j3 \gset
SELECT dispatch.submit('m2', NULL, '{}', 10) AS j4 \gset
UPDATE dispatch.jobs SET state = 'leased', attempt = 1, leased_by = (SELECT id FROM dispatch.nodes WHERE name = 'gpu-a'),
                         lease_expires_at = now() + interval '1 min' WHERE id IN (:j3, :j4);
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: a node with every slot busy is not stale');
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now(), leased_by = NULL, lease_expires_at = NULL
 WHERE id IN (:j3, :j4);

-- Polling clears it.
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT id FROM dispatch.lease(1)), :j1::bigint, 'gpu-a polls and takes the waiting job');
RESET SESSION AUTHORIZATION;
SELECT is_empty($$SELECT * FROM dispatch.health()$$, 'health: after a poll the node is not stale');

-- A node that is not live, or not active, is never stale (a stuck queue is reported instead).
SELECT dispatch.submit('m1', NULL, '{}') AS j5 \gset
UPDATE dispatch.jobs SET run_at = now() - interval '90 s' WHERE id = :j5;
UPDATE dispatch.nodes SET last_poll_completed_at = now() - interval '5 min' WHERE name = 'gpu-a';
SELECT is((SELECT count(*) FROM dispatch.health() WHERE kind = 'stale_node'), 1::bigint, 'stale once more');
SELECT is(dispatch.disable('gpu-a'), 'disabled', 'disable gpu-a');
SELECT results_eq($$SELECT kind, subject FROM dispatch.health()$$, $$VALUES ('stuck_queue', 'm1')$$,
                  'health: a disabled node is not stale; its model is stuck');

------------------------------------------------------------------------------
-- metrics
------------------------------------------------------------------------------
SELECT is(dispatch.enable('gpu-a'), 'active', 'enable gpu-a');
SELECT results_eq($$SELECT name, labels, value FROM dispatch.metrics()
                    WHERE name IN ('pgdispatch_model_capacity', 'pgdispatch_model_queue_limit', 'pgdispatch_model_in_flight',
                                   'pgdispatch_model_queued') AND labels->>'model' = 'm1' ORDER BY name$$,
    $$VALUES ('pgdispatch_model_capacity', '{"model": "m1", "tier": "reported"}'::jsonb, 2::float8),
             ('pgdispatch_model_in_flight', '{"model": "m1"}'::jsonb, 1::float8),
             ('pgdispatch_model_queue_limit', '{"model": "m1"}'::jsonb, 64::float8),
             ('pgdispatch_model_queued', '{"model": "m1"}'::jsonb, 1::float8)$$,
    'metrics: capacity with its tier, in flight, queue limit and queued per model');
SELECT is((SELECT count(*) FROM dispatch.metrics() WHERE name = 'pgdispatch_notification_queue_usage' AND value >= 0),
          1::bigint, 'metrics: the notification queue usage gauge');
SELECT is((SELECT count(*) FROM dispatch.health() WHERE kind = 'notification_backlog'), 0::bigint,
          'health: no notification backlog while the queue is nearly empty');

SELECT * FROM finish();
ROLLBACK;
