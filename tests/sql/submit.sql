-- Gateway side: dispatch.submit, dispatch.submit_many, dispatch.results, dispatch.cancel.
-- Happy paths and every refusal with its SQLSTATE.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(103);
-- pgTAP keeps its bookkeeping in temp tables; node roles must be able to write them.
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;

-- One live node serving m1 and m2 with 2 slots each: capacity 2, queue limit 64.
SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll returns the node role');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1', 'm2'], 2)).node_name, 'gpu-a', 'the node registers');
RESET SESSION AUTHORIZATION;

------------------------------------------------------------------------------
-- submit: happy path
------------------------------------------------------------------------------
SELECT dispatch.submit('m1', '/v1/completions', '{"prompt": "hi", "stop": null, "n": {"x": null}}',
                       5, '30 s', 2, 'key-1', 'gw_reply') AS j1 \gset
SELECT is((SELECT jsonb_build_object('model', model, 'endpoint', endpoint, 'priority', priority, 'state', state,
                                     'attempt', attempt, 'max_attempts', max_attempts, 'reply', reply_channel,
                                     'key', idempotency_key, 'leased_by', leased_by, 'result', result, 'error', error)
           FROM dispatch.jobs WHERE id = :j1),
          '{"model": "m1", "endpoint": "/v1/completions", "priority": 5, "state": "queued", "attempt": 0,
            "max_attempts": 2, "reply": "gw_reply", "key": "key-1", "leased_by": null, "result": null, "error": null}'::jsonb,
          'submit stores a queued job with every argument');
SELECT is((SELECT payload::text FROM dispatch.jobs WHERE id = :j1),
          '{"prompt": "hi", "stop": null, "n": {"x": null}}',
          'the payload is stored exactly as sent (nulls and spacing kept)');
SELECT is((SELECT deadline FROM dispatch.jobs WHERE id = :j1), now() + interval '30 s', 'the timeout sets the deadline');
SELECT is((SELECT run_at FROM dispatch.jobs WHERE id = :j1), now(), 'a new job is due at once');

SELECT dispatch.submit('m1', NULL, '{"a": 1}') AS j2 \gset
SELECT is((SELECT jsonb_build_object('endpoint', endpoint, 'priority', priority, 'max_attempts', max_attempts,
                                     'deadline', deadline, 'reply', reply_channel, 'key', idempotency_key)
           FROM dispatch.jobs WHERE id = :j2),
          '{"endpoint": "/v1/chat/completions", "priority": 0, "max_attempts": 3, "deadline": null,
            "reply": null, "key": null}'::jsonb,
          'submit defaults: chat endpoint, priority 0, default_max_attempts, no deadline, no channel, no key');
SELECT dispatch.set_setting('default_max_attempts', 5) IS NOT NULL AS ignored \gset
SELECT dispatch.submit('m1', NULL, '{}') AS j3 \gset
SELECT is((SELECT max_attempts FROM dispatch.jobs WHERE id = :j3), 5, 'default_max_attempts is read at submit');
SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 100) AS j4 \gset
SELECT is((SELECT max_attempts FROM dispatch.jobs WHERE id = :j4), 100, 'max_attempts 100 is accepted');
SELECT dispatch.submit('m1', NULL, '{}', -7) AS j5 \gset
SELECT is((SELECT priority FROM dispatch.jobs WHERE id = :j5), -7, 'negative priorities are accepted');

------------------------------------------------------------------------------
-- submit: bad arguments (22023)
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.submit(NULL, NULL, '{}')$$, '22023', NULL, 'submit: model NULL');
SELECT throws_ok($$SELECT dispatch.submit('', NULL, '{}')$$, '22023', NULL, 'submit: model empty');
SELECT throws_ok($$SELECT dispatch.submit(repeat('m', 257), NULL, '{}')$$, '22023',
                 'model must be a string of 1 to 256 characters', 'submit: model over 256 characters');
SELECT throws_ok($$SELECT dispatch.submit('m1', 'v1/chat', '{}')$$, '22023',
                 'endpoint must be a path such as /v1/chat/completions', 'submit: endpoint without leading /');
SELECT throws_ok($$SELECT dispatch.submit('m1', '/v1/chat?x=1', '{}')$$, '22023', NULL,
                 'submit: endpoint with a query string');
SELECT throws_ok($$SELECT dispatch.submit('m1', '/' || repeat('a', 256), '{}')$$, '22023', NULL,
                 'submit: endpoint over 256 characters');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, NULL)$$, '22023', 'payload is required', 'submit: payload NULL');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, 'null')$$, '22023', 'payload is required', 'submit: payload JSON null');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, '0 s')$$, '22023',
                 'timeout_ms must be a positive integer', 'submit: zero timeout');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, '-5 s')$$, '22023', NULL, 'submit: negative timeout');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 0)$$, '22023',
                 'max_attempts must be an integer from 1 to 100', 'submit: max_attempts 0');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, 101)$$, '22023', NULL, 'submit: max_attempts 101');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, NULL, '')$$, '22023',
                 'idempotency_key must be a string of 1 to 255 characters', 'submit: empty idempotency key');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, NULL, repeat('k', 256))$$, '22023', NULL,
                 'submit: idempotency key over 255 characters');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, NULL, NULL, 'Gw_Upper')$$, '22023', NULL,
                 'submit: reply channel with upper case');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, NULL, NULL, '1gw')$$, '22023', NULL,
                 'submit: reply channel starting with a digit');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, NULL, NULL, repeat('g', 64))$$, '22023', NULL,
                 'submit: reply channel over 63 characters');
SELECT lives_ok($$SELECT dispatch.submit('m1', NULL, '{}', 0, NULL, NULL, NULL, repeat('g', 63))$$,
                'submit: a 63-character reply channel is accepted');

------------------------------------------------------------------------------
-- submit: admission (PD001 unknown model, PD002 no live node, PD003 queue full)
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.submit('nobody-serves-this', NULL, '{}')$$, 'PD001',
                 'model "nobody-serves-this" is not served by any node', 'submit: unknown model is PD001');

SELECT is(dispatch.drain('gpu-a'), 'draining', 'drain the only node');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, 'PD002', NULL, 'submit: model of a draining node is PD002');
SELECT is(dispatch.disable('gpu-a'), 'disabled', 'disable the only node');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, 'PD002', NULL, 'submit: model of a disabled node is PD002');
SELECT is(dispatch.enable('gpu-a'), 'active', 'enable it again');
SELECT lives_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, 'submit works again once the node is active');

SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.report('degraded', 'provider down', 2)).node_name, 'gpu-a', 'the node reports degraded');
RESET SESSION AUTHORIZATION;
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, 'PD002', NULL, 'submit: model of a degraded node is PD002');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.report('healthy', NULL, 2)).node_name, 'gpu-a', 'the node reports healthy');
RESET SESSION AUTHORIZATION;

SELECT lives_ok($$SELECT dispatch.set_capacity('m1', 0)$$, 'override m1 to capacity 0');
SELECT throws_ok($$SELECT dispatch.submit('m1', NULL, '{}')$$, 'PD002',
                 'no live healthy node serves model "m1" (capacity 0, tier override)', 'submit: override 0 is PD002');
SELECT is(dispatch.clear_capacity('m1'), true, 'clear the override');

SELECT lives_ok($$SELECT dispatch.set_capacity('only-override', 3)$$, 'a model known only by its override');
SELECT ok(dispatch.submit('only-override', NULL, '{}') > 0, 'submit: a model with an override and no node is admitted');

-- fallback_capacity admits work for a model whose nodes are all gone.
SELECT is(dispatch.enroll('gpu-gone'), 'dispatch_node_gpu_gone', 'enroll a second node');
SET SESSION AUTHORIZATION dispatch_node_gpu_gone;
SELECT is((dispatch.register('vllm', ARRAY['m-gone'])).node_name, 'gpu-gone', 'it registers for m-gone');
SELECT is(dispatch.deregister(), 0, 'and deregisters (its lock is released)');
RESET SESSION AUTHORIZATION;
SELECT throws_ok($$SELECT dispatch.submit('m-gone', NULL, '{}')$$, 'PD002', NULL,
                 'submit: known model, no live node, fallback 0 is PD002');
SELECT is(dispatch.set_setting('fallback_capacity', 1), 1::numeric, 'fallback_capacity 1');
SELECT ok(dispatch.submit('m-gone', NULL, '{}') > 0, 'submit: fallback capacity admits work');
SELECT is(dispatch.set_setting('fallback_capacity', 0), 0::numeric, 'fallback_capacity back to 0');

-- Queue limit = capacity x queue_depth_per_slot: 2 x 1 for m2.
SELECT is(dispatch.set_setting('queue_depth_per_slot', 1), 1::numeric, 'queue_depth_per_slot 1');
SELECT ok(dispatch.submit('m2', NULL, '{"n": 1}') > 0, 'first job of m2 fits');
SELECT ok(dispatch.submit('m2', NULL, '{"n": 2}') > 0, 'second job of m2 fits');
SELECT throws_ok($$SELECT dispatch.submit('m2', NULL, '{"n": 3}')$$, 'PD003',
                 'queue for model "m2" is full (limit 2: capacity 2 x 1 per slot)', 'submit: third job of m2 is PD003');
SELECT is((SELECT count(*) FROM dispatch.jobs WHERE model = 'm2'), 2::bigint, 'a refused submit inserts nothing');
SELECT is(dispatch.set_setting('queue_depth_per_slot', 32), 32::numeric, 'queue_depth_per_slot back to 32');

------------------------------------------------------------------------------
-- submit: idempotency (replay and PD008)
------------------------------------------------------------------------------
SELECT is(dispatch.submit('m1', '/v1/completions', '{"prompt": "hi", "stop": null, "n": {"x": null}}',
                          5, '30 s', 2, 'key-1', 'gw_other'), :j1::bigint,
          'submit: replaying an idempotency key returns the existing job');
SELECT is((SELECT count(*) FROM dispatch.jobs WHERE idempotency_key = 'key-1'), 1::bigint, 'a replay inserts nothing');
SELECT is((SELECT reply_channel FROM dispatch.jobs WHERE id = :j1), 'gw_other',
          'a replay moves the answer of an unfinished job to the new reply channel');
SELECT throws_ok($$SELECT dispatch.submit('m1', '/v1/completions', '{"prompt": "bye"}', 0, NULL, NULL, 'key-1')$$,
                 'PD008', NULL, 'submit: same key, different payload is PD008');
SELECT throws_ok($$SELECT dispatch.submit('m2', '/v1/completions', '{"prompt": "hi", "stop": null, "n": {"x": null}}',
                                           0, NULL, NULL, 'key-1')$$,
                 'PD008', NULL, 'submit: same key, different model is PD008');
SELECT throws_ok($$SELECT dispatch.submit('m1', '/v1/chat/completions', '{"prompt": "hi", "stop": null, "n": {"x": null}}',
                                           0, NULL, NULL, 'key-1')$$,
                 'PD008', NULL, 'submit: same key, different endpoint is PD008');
UPDATE dispatch.jobs SET state = 'succeeded', result = '{"ok": true}', finished_at = now() WHERE id = :j1;
SELECT is(dispatch.submit('m1', '/v1/completions', '{"prompt": "hi", "stop": null, "n": {"x": null}}',
                          5, '30 s', 2, 'key-1', 'gw_third'), :j1::bigint,
          'submit: replaying the key of a finished job returns it');
SELECT is((SELECT reply_channel FROM dispatch.jobs WHERE id = :j1), 'gw_other',
          'a replay of a finished job leaves its reply channel alone');

------------------------------------------------------------------------------
-- submit_many
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT * FROM dispatch.submit_many(NULL)$$, '22023', 'requests must be a JSON array',
                 'submit_many: NULL requests');
SELECT throws_ok($$SELECT * FROM dispatch.submit_many('{"model": "m1"}')$$, '22023', 'requests must be a JSON array',
                 'submit_many: an object instead of an array');
SELECT throws_ok($$SELECT * FROM dispatch.submit_many('[]', 'Bad-Channel')$$, '22023', NULL,
                 'submit_many: invalid reply channel');
SELECT is_empty($$SELECT * FROM dispatch.submit_many('[]')$$, 'submit_many: an empty batch returns no rows');

CREATE TEMP TABLE batch1 AS SELECT * FROM dispatch.submit_many($$[
    5,
    {"payload": {}},
    {"model": "m1", "endpoint": "nope", "payload": {}},
    {"model": "m1"},
    {"model": "m1", "payload": null},
    {"model": "m1", "payload": {}, "priority": 1.5},
    {"model": "m1", "payload": {}, "priority": "5"},
    {"model": "m1", "payload": {}, "timeout_ms": 0},
    {"model": "m1", "payload": {}, "max_attempts": 0},
    {"model": "m1", "payload": {}, "idempotency_key": 7},
    {"model": "unknown-x", "payload": {}},
    {"model": "m1", "payload": {"n": 12}, "priority": -3, "timeout_ms": 1500, "max_attempts": 7, "endpoint": null},
    {"model": "m2", "payload": {"n": 13}, "endpoint": "/v1/embeddings", "idempotency_key": "batch-key"}
]$$, 'gw_batch');
SELECT results_eq($$SELECT idx, sqlstate, id IS NOT NULL FROM batch1 ORDER BY idx$$,
    $$VALUES (1, '22023', false), (2, '22023', false), (3, '22023', false), (4, '22023', false),
             (5, '22023', false), (6, '22023', false), (7, '22023', false), (8, '22023', false),
             (9, '22023', false), (10, '22023', false), (11, 'PD001', false), (12, NULL, true), (13, NULL, true)$$,
    'submit_many: one row per element; each malformed element refused with 22023, unknown model with PD001');
SELECT results_eq($$SELECT message FROM batch1 WHERE idx IN (1, 4, 6, 8, 9, 10) ORDER BY idx$$,
    ARRAY['each request must be a JSON object', 'payload is required', 'priority must be an integer',
          'timeout_ms must be a positive integer', 'max_attempts must be an integer from 1 to 100',
          'idempotency_key must be a string of 1 to 255 characters'],
    'submit_many: each refusal names its problem');
SELECT is((SELECT jsonb_build_object('model', j.model, 'endpoint', j.endpoint, 'priority', j.priority,
                                     'max_attempts', j.max_attempts, 'reply', j.reply_channel, 'payload', j.payload::jsonb,
                                     'deadline_ok', j.deadline = now() + interval '1.5 s')
           FROM dispatch.jobs j JOIN batch1 b ON b.id = j.id WHERE b.idx = 12),
          '{"model": "m1", "endpoint": "/v1/chat/completions", "priority": -3, "max_attempts": 7, "reply": "gw_batch",
            "payload": {"n": 12}, "deadline_ok": true}'::jsonb,
          'submit_many: an admitted element is stored with its fields (endpoint null means the default)');
SELECT is((SELECT endpoint FROM dispatch.jobs j JOIN batch1 b ON b.id = j.id WHERE b.idx = 13), '/v1/embeddings',
          'submit_many: endpoint is taken from the element');

-- Partial admission: the limit refuses the overflow only, other models are unaffected.
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued' AND model = 'm1';
SELECT is(dispatch.set_setting('queue_depth_per_slot', 2), 2::numeric, 'queue_depth_per_slot 2 (m2 limit 4, 3 queued)');
SELECT results_eq($$SELECT idx, sqlstate, id IS NOT NULL FROM dispatch.submit_many(
        '[{"model": "m2", "payload": {"n": 21}}, {"model": "m2", "payload": {"n": 22}},
          {"model": "m1", "payload": {"n": 23}}, {"model": "m-gone", "payload": {}}]') ORDER BY idx$$,
    $$VALUES (1, NULL, true), (2, 'PD003', false), (3, NULL, true), (4, 'PD002', false)$$,
    'submit_many: queue full (PD003) and no live node (PD002) refuse only their elements');
SELECT is(dispatch.set_setting('queue_depth_per_slot', 32), 32::numeric, 'queue_depth_per_slot back to 32');

-- Keys: replay, reuse, and the same key twice in one batch.
SELECT results_eq($$SELECT idx, sqlstate, id FROM dispatch.submit_many(
        '[{"model": "m2", "payload": {"n": 13}, "endpoint": "/v1/embeddings", "idempotency_key": "batch-key"},
          {"model": "m2", "payload": {"n": 99}, "idempotency_key": "batch-key"}]') ORDER BY idx$$,
    format($$VALUES (1, NULL, %1$s::bigint), (2, 'PD008', %1$s::bigint)$$, (SELECT id FROM batch1 WHERE idx = 13)),
    'submit_many: a replayed key returns its job, a reused key is PD008 (with the job that holds the key)');
SELECT results_eq($$SELECT idx, sqlstate, id IS NOT NULL FROM dispatch.submit_many(
        '[{"model": "m1", "payload": {"a": 1}, "idempotency_key": "twice"},
          {"model": "m1", "payload": {"a": 1}, "idempotency_key": "twice"},
          {"model": "m1", "payload": {"a": 2}, "idempotency_key": "twice"}]') ORDER BY idx$$,
    $$VALUES (1, NULL, true), (2, NULL, true), (3, 'PD008', true)$$,
    'submit_many: a key repeated in one batch gives the same job, or PD008 for a different request');
SELECT is((SELECT count(*) FROM dispatch.jobs WHERE idempotency_key = 'twice'), 1::bigint,
          'submit_many: a key repeated in one batch inserts one job');

------------------------------------------------------------------------------
-- results
------------------------------------------------------------------------------
SELECT results_eq(format('SELECT id, state, attempt, result::text, model FROM dispatch.results(ARRAY[%s, %s, -1])', :j2, :j1),
    format($$VALUES (%s::bigint, 'succeeded', 0, '{"ok": true}', 'm1'), (%s::bigint, 'cancelled', 0, NULL::text, 'm1')$$,
           :j1, :j2),
    'results: state, attempt, result of the given jobs in id order; unknown ids are absent');
SELECT is_empty($$SELECT * FROM dispatch.results(NULL)$$, 'results: NULL ids give no rows');
SELECT is_empty($$SELECT * FROM dispatch.results('{}')$$, 'results: no ids give no rows');

------------------------------------------------------------------------------
-- cancel
------------------------------------------------------------------------------
SELECT throws_ok($$SELECT dispatch.cancel(-42)$$, 'PD007', 'no job -42', 'cancel: unknown id is PD007');

SELECT dispatch.submit('m1', NULL, '{}', p_reply_channel => 'gw_c') AS c1 \gset
SELECT is(dispatch.cancel(:c1, 'user pressed stop'), 'cancelled', 'cancel: a queued job is cancelled');
SELECT is((SELECT jsonb_build_object('state', state, 'error', error, 'finished', finished_at = now())
           FROM dispatch.jobs WHERE id = :c1),
          '{"state": "cancelled", "error": {"code": "cancelled", "message": "user pressed stop"}, "finished": true}'::jsonb,
          'cancel: state, error code and reason recorded');
SELECT is(dispatch.cancel(:c1, 'again'), 'cancelled', 'cancel: cancelling twice returns the state');
SELECT is((SELECT error->>'message' FROM dispatch.jobs WHERE id = :c1), 'user pressed stop',
          'cancel: a finished job is left as it is');
SELECT is(dispatch.cancel(:j1), 'succeeded', 'cancel: a succeeded job stays succeeded');

SELECT dispatch.submit('m1', NULL, '{}', p_timeout => '1 hour') AS c2 \gset
UPDATE dispatch.jobs SET deadline = now() - interval '1 s' WHERE id = :c2;
SELECT is(dispatch.cancel(:c2), 'expired', 'cancel: a job past its deadline ends expired');
SELECT is((SELECT error->>'code' FROM dispatch.jobs WHERE id = :c2), 'deadline_exceeded',
          'cancel: expired with deadline_exceeded');

SELECT dispatch.submit('m1', NULL, '{}') AS c3 \gset
SELECT is(dispatch.cancel(:c3, NULL), 'cancelled', 'cancel: NULL reason');
SELECT is((SELECT error->>'message' FROM dispatch.jobs WHERE id = :c3), 'cancelled', 'cancel: NULL reason reads "cancelled"');
SELECT dispatch.submit('m1', NULL, '{}') AS c4 \gset
SELECT is(dispatch.cancel(:c4, repeat('r', 5000)), 'cancelled', 'cancel: a long reason');
SELECT is((SELECT length(error->>'message') FROM dispatch.jobs WHERE id = :c4), 1000, 'cancel: the reason is cut at 1000');
SELECT dispatch.submit('m1', NULL, '{}') AS c5 \gset
SELECT is(dispatch.cancel(:c5), 'cancelled', 'cancel: default reason');
SELECT is((SELECT error->>'message' FROM dispatch.jobs WHERE id = :c5), 'cancelled by client', 'cancel: default reason text');

-- A leased job: cancelled, and the node's late result is refused.
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
SELECT dispatch.submit('m1', NULL, '{}', 9) AS c6 \gset
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((SELECT array_agg(id) FROM dispatch.lease(1)), ARRAY[:c6]::bigint[], 'the node leases the job');
RESET SESSION AUTHORIZATION;
SELECT is(dispatch.cancel(:c6, 'gone'), 'cancelled', 'cancel: a leased job is cancelled');
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :c6), 'cancelled', 'cancel: the leased row is cancelled');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT throws_ok(format('SELECT dispatch.complete(%s, 1, %L)', :c6, '{}'), 'PD004', NULL,
                 'cancel: the leasing node''s late completion is refused (PD004)');
RESET SESSION AUTHORIZATION;
SELECT is((SELECT state FROM dispatch.jobs WHERE id = :c6), 'cancelled', 'cancel: the refused completion changed nothing');

-- stream_token: stored with the job, validated, replaced by an idempotent replay.
SELECT id AS t1 FROM dispatch.submit_many('[{"model":"m1","payload":{},"idempotency_key":"tok-1","stream_token":"abcDEF123456"}]', 'gw_t') \gset
SELECT is((SELECT stream_token FROM dispatch.jobs WHERE id = :t1), 'abcDEF123456', 'submit_many stores the stream token');
SELECT id AS t1b FROM dispatch.submit_many('[{"model":"m1","payload":{},"idempotency_key":"tok-1","stream_token":"zzzzYYYY9999"}]', 'gw_u') \gset
SELECT is((SELECT stream_token || ' ' || reply_channel FROM dispatch.jobs WHERE id = :t1), 'zzzzYYYY9999 gw_u',
          'an idempotent replay moves the answer and the stream token to the new caller');
SELECT results_eq($$SELECT sqlstate, message FROM dispatch.submit_many('[{"model":"m1","payload":{},"stream_token":"short"},
                                                                        {"model":"m1","payload":{},"stream_token":"has space 123"},
                                                                        {"model":"m1","payload":{},"stream_token":12345678}]')$$,
                  $$VALUES ('22023'::text, 'stream_token must be 8 to 64 letters and digits'::text),
                           ('22023', 'stream_token must be 8 to 64 letters and digits'),
                           ('22023', 'stream_token must be 8 to 64 letters and digits')$$,
                  'submit_many refuses malformed stream tokens');

SELECT * FROM finish();
ROLLBACK;
