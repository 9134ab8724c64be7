-- Capacity: the four tiers (override, reported, mixed, fallback), the drop when a node
-- goes degraded, draining, disabled or disconnected, in-flight and queue limits;
-- set_capacity / clear_capacity and what models() and queues() show.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(49);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

SELECT is_empty($$SELECT * FROM dispatch.capacity()$$, 'no node, no override: no model is known');

SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
SELECT is(dispatch.enroll('gpu-c'), 'dispatch_node_gpu_c', 'enroll gpu-c');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1', 'm2'], 8)).node_name, 'gpu-a', 'gpu-a: m1, m2, reports 8');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('vllm', ARRAY['m1'], 16)).node_name, 'gpu-b', 'gpu-b: m1, reports 16');
SET SESSION AUTHORIZATION dispatch_node_gpu_c;
SELECT is((dispatch.register('ollama', ARRAY['m2', 'm3'])).node_name, 'gpu-c', 'gpu-c: m2, m3, reports nothing');
RESET SESSION AUTHORIZATION;

SELECT results_eq($$SELECT model, capacity, tier, live_nodes, in_flight, queued, queue_limit FROM dispatch.capacity()$$,
    $$VALUES ('m1', 24, 'reported', 2, 0, 0::bigint, 768::bigint),
             ('m2', 12, 'mixed', 2, 0, 0::bigint, 384::bigint),
             ('m3', 4, 'mixed', 1, 0, 0::bigint, 128::bigint)$$,
    'reported: sum of reported; mixed: reported plus default slots for the others; queue limit = capacity x 32');

SELECT is(dispatch.set_setting('default_slots_per_node', 3), 3::numeric, 'default_slots_per_node 3');
SELECT is((SELECT capacity FROM dispatch.capacity() WHERE model = 'm2'), 11, 'mixed follows default_slots_per_node');
SELECT is(dispatch.set_setting('queue_depth_per_slot', 2), 2::numeric, 'queue_depth_per_slot 2');
SELECT is((SELECT queue_limit FROM dispatch.capacity() WHERE model = 'm2'), 22::bigint, 'queue limit follows queue_depth_per_slot');

-- override
SELECT lives_ok($$SELECT dispatch.set_capacity('m1', 5)$$, 'override m1 to 5');
SELECT results_eq($$SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm1'$$,
                  $$VALUES (5, 'override', 2)$$, 'override takes precedence over what nodes report');
SELECT lives_ok($$SELECT dispatch.set_capacity('m1', 7)$$, 'a second override replaces the first');
SELECT is((SELECT capacity FROM dispatch.capacity() WHERE model = 'm1'), 7, 'the override is updated');
SELECT lives_ok($$SELECT dispatch.set_capacity('m-pinned', 0)$$, 'override 0 for a model nobody serves');
SELECT results_eq($$SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm-pinned'$$,
                  $$VALUES (0, 'override', 0)$$, 'an override alone makes a model known');
SELECT lives_ok($$SELECT dispatch.set_capacity('m-max', 1000000)$$, 'override 1000000 is the maximum and is accepted');
SELECT is(dispatch.clear_capacity('m1'), true, 'clear_capacity: true when there was an override');
SELECT is(dispatch.clear_capacity('m1'), false, 'clear_capacity: false when there was none');
SELECT is(dispatch.clear_capacity(NULL), false, 'clear_capacity: NULL model, nothing to clear');
SELECT results_eq($$SELECT capacity, tier FROM dispatch.capacity() WHERE model = 'm1'$$, $$VALUES (24, 'reported')$$,
                  'after clearing, the reported tier is back');

SELECT throws_ok($$SELECT dispatch.set_capacity('m1', -1)$$, '22023',
                 'capacity override for "m1" must be between 0 and 1000000, got -1', 'set_capacity: -1 is refused');
SELECT throws_ok($$SELECT dispatch.set_capacity('m1', 1000001)$$, '22023', NULL, 'set_capacity: 1000001 is refused, not clamped');
SELECT throws_ok($$SELECT dispatch.set_capacity('m1', NULL)$$, '22023', NULL, 'set_capacity: NULL capacity');
SELECT throws_ok($$SELECT dispatch.set_capacity(NULL, 1)$$, '22023', 'model is required', 'set_capacity: NULL model');
SELECT throws_ok($$SELECT dispatch.set_capacity('', 1)$$, '22023', NULL, 'set_capacity: empty model');
SELECT throws_ok($$SELECT dispatch.set_capacity(repeat('m', 257), 1)$$, '22023', NULL, 'set_capacity: model over 256 characters');
SELECT is((SELECT count(*) FROM dispatch.capacity_overrides WHERE model = 'm1'), 0::bigint, 'refused overrides store nothing');

-- in flight and queued
SELECT is(count(dispatch.submit('m1', NULL, '{}')), 5::bigint, 'five jobs for m1') FROM generate_series(1, 5);
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((SELECT count(*) FROM dispatch.lease(2)), 2::bigint, 'gpu-b leases two');
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT in_flight, queued FROM dispatch.capacity() WHERE model = 'm1'$$, $$VALUES (2, 3::bigint)$$,
                  'in_flight counts leases, queued counts the queue');

-- The drop: degraded, draining, disabled, disconnected.
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.report('degraded', 'down', 16)).node_name, 'gpu-b', 'gpu-b degraded');
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm1'$$,
                  $$VALUES (8, 'reported', 1)$$, 'a degraded node counts for no capacity');
SELECT is(dispatch.drain('gpu-a'), 'draining', 'gpu-a draining');
SELECT results_eq($$SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm1'$$,
                  $$VALUES (0, 'fallback', 0)$$, 'no serving node left: fallback tier, fallback_capacity 0');
SELECT results_eq($$SELECT capacity, tier FROM dispatch.capacity() WHERE model = 'm2'$$,
                  $$VALUES (3, 'mixed')$$, 'a draining node leaves the totals of its other models too');
SELECT is(dispatch.set_setting('fallback_capacity', 6), 6::numeric, 'fallback_capacity 6');
SELECT results_eq($$SELECT capacity, tier, queue_limit FROM dispatch.capacity() WHERE model = 'm1'$$,
                  $$VALUES (6, 'fallback', 12::bigint)$$, 'the fallback tier reports fallback_capacity');
SELECT is(dispatch.set_setting('fallback_capacity', 0), 0::numeric, 'fallback_capacity 0');
SELECT is(dispatch.disable('gpu-c'), 'disabled', 'gpu-c disabled');
SELECT results_eq($$SELECT capacity, tier FROM dispatch.capacity() WHERE model = 'm3'$$,
                  $$VALUES (0, 'fallback')$$, 'a disabled node counts for no capacity');
SELECT is(dispatch.enable('gpu-c'), 'active', 'gpu-c enabled');
SET SESSION AUTHORIZATION dispatch_node_gpu_c;
SELECT is(dispatch.deregister(), 0, 'gpu-c disconnects (deregister releases its lock)');
RESET SESSION AUTHORIZATION;
SELECT results_eq($$SELECT capacity, tier, live_nodes FROM dispatch.capacity() WHERE model = 'm3'$$,
                  $$VALUES (0, 'fallback', 0)$$, 'a disconnected node counts for no capacity');

-- models() lists what a live, active, healthy node serves now; queues() the unfinished work.
SELECT is(dispatch.enable('gpu-a'), 'active', 'gpu-a active again');
SELECT results_eq($$SELECT model, live_nodes, capacity, tier FROM dispatch.models()$$,
                  $$VALUES ('m1', 1, 8, 'reported'), ('m2', 1, 8, 'reported')$$,
                  'models(): only models served by a live, active, healthy node');
SELECT results_eq($$SELECT model, queued, ready, leased, oldest_ready_at = now(), capacity, tier FROM dispatch.queues()$$,
                  $$VALUES ('m1', 3::bigint, 3::bigint, 2::bigint, true, 8, 'reported')$$,
                  'queues(): queued, ready, leased and capacity per model with work');

SELECT * FROM finish();
ROLLBACK;
