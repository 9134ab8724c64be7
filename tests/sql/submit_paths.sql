-- submit_many's two paths (migration 010): which batches take the short path, and
-- that it stores and answers exactly what the general path does for the same batch,
-- however the elements are written (013 reads each element once, with
-- json_populate_record, where the general path reads field by field).
-- Calls of the general path are counted with track_functions.
BEGIN;
CREATE EXTENSION IF NOT EXISTS pgtap;
SELECT plan(49);
GRANT ALL ON ALL TABLES IN SCHEMA pg_temp TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pg_temp TO PUBLIC;
SET LOCAL track_functions = 'pl';

-- One live node serving m1 with 10 slots; m-off is known but has no capacity.
SELECT is(dispatch.enroll('gpu-a'), 'dispatch_node_gpu_a', 'enroll gpu-a');
SET SESSION AUTHORIZATION dispatch_node_gpu_a;
SELECT is((dispatch.register('llamacpp', ARRAY['m1'], 10)).node_name, 'gpu-a', 'gpu-a serves m1 with 10 slots');
RESET SESSION AUTHORIZATION;
SELECT lives_ok($$SELECT dispatch.set_capacity('m-off', 0)$$, 'm-off: known, capacity 0');

CREATE FUNCTION pg_temp.general_calls() RETURNS bigint LANGUAGE sql AS $$
    SELECT coalesce(sum(f.calls), 0)::bigint FROM pg_stat_xact_user_functions f
    WHERE f.funcid = 'dispatch._submit_many_general(json, text)'::regprocedure
$$;
CREATE FUNCTION pg_temp.takes_general(p_requests json) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    before bigint := pg_temp.general_calls();
BEGIN
    PERFORM * FROM dispatch.submit_many(p_requests, 'gw_paths');
    RETURN pg_temp.general_calls() > before;
END
$$;
-- What a job stores, without its id and times (deadline as an offset from its creation).
CREATE FUNCTION pg_temp.stored(p_ids bigint[]) RETURNS TABLE (n bigint, row_text text) LANGUAGE sql AS $$
    SELECT row_number() OVER (ORDER BY j.id),
           format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', j.model, j.endpoint, j.payload::text, j.priority, j.state,
                  j.attempt, j.max_attempts, j.deadline - j.created_at, j.run_at = j.created_at, j.reply_channel,
                  j.stream_token)
    FROM dispatch.jobs j WHERE j.id = ANY (p_ids)
$$;

-- Submits a batch on both paths (the queue emptied first) and checks that they answer
-- and store the same; the short path's rows stay in the temp table short_<tag>.
CREATE FUNCTION pg_temp.both_paths_agree(p_batch json, p_tag text) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
    EXECUTE format('CREATE TEMP TABLE short_%s AS SELECT * FROM dispatch.submit_many($1, %L)', p_tag, 'gw_' || p_tag)
        USING p_batch;
    EXECUTE format('CREATE TEMP TABLE general_%s AS SELECT * FROM dispatch._submit_many_general($1, %L)',
                   p_tag, 'gw_' || p_tag) USING p_batch;
    RETURN NEXT results_eq(format('SELECT idx, sqlstate, message, id IS NOT NULL FROM short_%s ORDER BY idx', p_tag),
                           format('SELECT idx, sqlstate, message, id IS NOT NULL FROM general_%s ORDER BY idx', p_tag),
                           p_tag || ': both paths answer the same rows');
    RETURN NEXT results_eq(format('SELECT * FROM pg_temp.stored((SELECT array_agg(id) FROM short_%s))', p_tag),
                           format('SELECT * FROM pg_temp.stored((SELECT array_agg(id) FROM general_%s))', p_tag),
                           p_tag || ': both paths store the same jobs');
END
$$;

------------------------------------------------------------------------------
-- Which path
------------------------------------------------------------------------------
SELECT ok(NOT pg_temp.takes_general('[{"model": "m1", "payload": {}}]'), 'one request for a served model: short path');
SELECT ok(NOT pg_temp.takes_general(
    '[{"model": "m1", "payload": {"a": 1}, "priority": 2, "timeout_ms": 100, "max_attempts": 4,
       "endpoint": "/v1/embeddings", "stream_token": "abcdefgh1", "idempotency_key": null}]'),
    'every optional field (and a null idempotency key): short path');
SELECT ok(NOT pg_temp.takes_general(format('[%s]', array_to_string(array_fill('{"model": "m1", "payload": {}}'::text,
                                                                                ARRAY[16]), ','))::json),
    '16 requests: short path');
SELECT ok(NOT pg_temp.takes_general(format('[%s]', array_to_string(array_fill('{"model": "m1", "payload": {}}'::text,
                                                                               ARRAY[1000]), ','))::json),
    '1000 requests: short path (it reads each element once, so no batch is too long for it)');
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
SELECT ok(NOT pg_temp.takes_general(json_build_array(json_build_object('model', 'm1', 'payload', repeat('x', 70000)))),
    'a batch of more than 64 kB: short path');
SELECT ok(pg_temp.takes_general('[{"model": "m1", "payload": {}}, 5]'),
    'an element that is not an object: general path');
SELECT results_eq($$SELECT idx, sqlstate, message FROM dispatch.submit_many('[{"model": "m1", "payload": {}}, 5]')$$,
    $$VALUES (1, NULL::text, NULL::text), (2, '22023', 'each request must be a JSON object')$$,
    'an element that is not an object is refused alone');
SELECT ok(pg_temp.takes_general('[{"model": "m1", "payload": {}, "idempotency_key": "k-1"}]'),
    'an idempotency key: general path');
SELECT ok(pg_temp.takes_general('[{"model": "m1", "payload": {}}, {"model": "m1"}]'),
    'a malformed element: general path');
SELECT ok(pg_temp.takes_general('[{"model": "m1", "payload": {}}, {"model": "m2", "payload": {}}]'),
    'two models: general path');
SELECT ok(pg_temp.takes_general('[{"model": "nobody-serves", "payload": {}}]'),
    'an unknown model: general path (it words the refusal)');
SELECT results_eq($$SELECT sqlstate FROM dispatch.submit_many('[{"model": "m-off", "payload": {}}]')$$,
    ARRAY['PD002'], 'a model without capacity is refused as before');
SELECT ok(pg_temp.takes_general('[{"model": "m-off", "payload": {}}]'),
    'a model without capacity: general path');
SELECT ok(NOT pg_temp.takes_general('[]'), 'an empty batch: no path, no rows');

------------------------------------------------------------------------------
-- Same batch, both paths: same rows stored, same answers
------------------------------------------------------------------------------
SELECT $$[{"model": "m1", "payload": {"n": 1,  "keep":  "spacing"}},
          {"model": "m1", "payload": {"n": 2}, "priority": -3, "timeout_ms": 1500, "max_attempts": 7,
           "endpoint": "/v1/completions", "stream_token": "Token12345678"},
          {"model": "m1", "payload": [3], "endpoint": null, "priority": null, "max_attempts": null}]$$ AS batch \gset
SELECT * FROM pg_temp.both_paths_agree(:'batch', 'same');
SELECT is((SELECT array_agg(j.payload::text ORDER BY r.idx) FROM short_same r JOIN dispatch.jobs j ON j.id = r.id),
          ARRAY['{"n": 1,  "keep":  "spacing"}', '{"n": 2}', '[3]'],
          'short path: each row''s id is the job of its element, payload stored as sent');
SELECT is((SELECT array_agg(id ORDER BY idx) = array_agg(id ORDER BY id) FROM short_same), true,
          'short path: ids ascend with the elements');

-- Written unusually: a repeated key (the last one counts, as with ->), escaped strings,
-- a payload with escapes and odd spacing (stored as sent), explicit nulls.
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
SELECT $$[{"model": "m-off", "model": "m1", "payload": {"first": true}, "payload": {"t" :  "\u00e9\/"}},
          {"model": "m\u0031", "payload": {}, "endpoint": "\/v1\/embeddings", "stream_token": "abc\u0064efgh1",
           "priority": 7, "idempotency_key": null, "timeout_ms": null},
          {"payload": null, "model": "m1", "payload": {"n": 3}, "priority": -2, "max_attempts": 100}]$$ AS odd \gset
SELECT ok(NOT pg_temp.takes_general(:'odd'), 'unusually written, well-formed requests: short path');
SELECT * FROM pg_temp.both_paths_agree(:'odd', 'odd');
SELECT is((SELECT array_agg(format('%s %s %s', j.payload::text, j.endpoint, j.stream_token) ORDER BY r.idx)
           FROM short_odd r JOIN dispatch.jobs j ON j.id = r.id),
          ARRAY['{"t" :  "\u00e9\/"} /v1/chat/completions ', '{} /v1/embeddings abcdefgh1', '{"n": 3} /v1/chat/completions '],
          'unusually written: the last of a repeated key counts, strings are read unescaped, payloads kept as sent');

-- A queue with room for 5 (capacity set to 5, 1 per slot): 7 requests admit 5 and
-- refuse 2 on both paths.
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
SELECT lives_ok($$SELECT dispatch.set_capacity('m1', 5)$$, 'm1: capacity 5');
SELECT is(dispatch.set_setting('queue_depth_per_slot', 1), 1::numeric, 'queue_depth_per_slot 1: room for 5');
SELECT format('[%s]', array_to_string(array_fill('{"model": "m1", "payload": {}}'::text, ARRAY[7]), ',')) AS seven \gset
CREATE TEMP TABLE short_full AS SELECT * FROM dispatch.submit_many(:'seven', 'gw_full');
UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
CREATE TEMP TABLE general_full AS SELECT * FROM dispatch._submit_many_general(:'seven', 'gw_full');
SELECT results_eq($$SELECT idx, sqlstate, message, id IS NOT NULL FROM short_full ORDER BY idx$$,
                  $$SELECT idx, sqlstate, message, id IS NOT NULL FROM general_full ORDER BY idx$$,
                  'a full queue: both paths admit and refuse the same elements with the same message');
SELECT results_eq($$SELECT idx, sqlstate, message FROM short_full WHERE sqlstate IS NOT NULL ORDER BY idx$$,
    $$VALUES (6, 'PD003', 'queue for model "m1" is full (limit 5: capacity 5 x 1 per slot)'),
             (7, 'PD003', 'queue for model "m1" is full (limit 5: capacity 5 x 1 per slot)')$$,
    'a full queue: the overflow is refused with PD003');

-- Capacity in each of its tiers (014 reads the model's own, where 010-013 read the
-- view of every model's): a full queue's answer quotes it, so both paths must agree.
-- Each path gets the batch on an empty queue; only the answers are compared.
CREATE FUNCTION pg_temp.overflow_agrees(p_model text, p_n integer, p_tag text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_batch json := (SELECT json_agg(json_build_object('model', p_model, 'payload', '{}'::json))
                     FROM generate_series(1, p_n));
BEGIN
    UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
    RETURN NEXT ok(NOT pg_temp.takes_general(v_batch), p_tag || ': short path');
    UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
    EXECUTE format('CREATE TEMP TABLE short_%s AS SELECT * FROM dispatch.submit_many($1)', p_tag) USING v_batch;
    UPDATE dispatch.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued';
    EXECUTE format('CREATE TEMP TABLE general_%s AS SELECT * FROM dispatch._submit_many_general($1, NULL)', p_tag)
        USING v_batch;
    RETURN NEXT results_eq(format('SELECT idx, sqlstate, message, id IS NOT NULL FROM short_%s ORDER BY idx', p_tag),
                           format('SELECT idx, sqlstate, message, id IS NOT NULL FROM general_%s ORDER BY idx', p_tag),
                           p_tag || ': both paths admit and refuse the same elements with the same message');
END
$$;

-- Reported and unreported slots: gpu-b reports 3, gpu-c nothing (default_slots_per_node, 4).
SELECT is(dispatch.enroll('gpu-b'), 'dispatch_node_gpu_b', 'enroll gpu-b');
SELECT is(dispatch.enroll('gpu-c'), 'dispatch_node_gpu_c', 'enroll gpu-c');
SET SESSION AUTHORIZATION dispatch_node_gpu_b;
SELECT is((dispatch.register('vllm', ARRAY['m-rep'], 3)).node_name, 'gpu-b', 'gpu-b serves m-rep with 3 slots');
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION dispatch_node_gpu_c;
SELECT is((dispatch.register('ollama', ARRAY['m-rep', 'm-fb'])).node_name, 'gpu-c',
          'gpu-c serves m-rep and m-fb, reports no slots');
RESET SESSION AUTHORIZATION;
SELECT * FROM pg_temp.overflow_agrees('m-rep', 9, 'mixed');
SELECT results_eq($$SELECT DISTINCT message FROM short_mixed WHERE sqlstate = 'PD003'$$,
    ARRAY['queue for model "m-rep" is full (limit 7: capacity 7 x 1 per slot)'],
    'mixed: capacity is the reported 3 and the default 4');

-- Known, but no node serves it now: the fallback capacity.
SELECT is(dispatch.drain('gpu-c'), 'draining', 'gpu-c drains: nobody serves m-fb');
SELECT is(dispatch.set_setting('fallback_capacity', 2), 2::numeric, 'fallback_capacity 2');
SELECT * FROM pg_temp.overflow_agrees('m-fb', 3, 'fallback');
SELECT results_eq($$SELECT DISTINCT message FROM short_fallback WHERE sqlstate = 'PD003'$$,
    ARRAY['queue for model "m-fb" is full (limit 2: capacity 2 x 1 per slot)'],
    'fallback: capacity is fallback_capacity');
SELECT is(dispatch.set_setting('fallback_capacity', 0), 0::numeric, 'fallback_capacity 0');
SELECT ok(pg_temp.takes_general('[{"model": "m-fb", "payload": {}}]'),
    'known, nobody serves it, no fallback: general path (it words the refusal)');

------------------------------------------------------------------------------
-- The short path asks the liveness of its model's nodes only: asking takes a shared
-- lock on a node that looks registered but is gone, until the submit commits, and that
-- node's daemon registering again waits for it (017 keeps _node_live a PL/pgSQL call:
-- inlined, the planner asked before it tested the model).
SELECT is(dispatch.enroll('gpu-gone'), 'dispatch_node_gpu_gone', 'enroll gpu-gone');
UPDATE dispatch.nodes SET models = ARRAY['m-gone'], backend_pid = 999999, registered_at = now()
WHERE name = 'gpu-gone';
CREATE FUNCTION pg_temp.gone_node_locked() RETURNS boolean LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN dispatch.nodes n ON n.name = 'gpu-gone'
                   WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.objid = n.id::oid
                     AND l.objsubid = 2)
$$;
SELECT ok(NOT pg_temp.gone_node_locked(), 'gpu-gone: its liveness lock is not taken yet');
SELECT is((SELECT count(*) FROM dispatch.submit_many('[{"model": "m1", "payload": {}}]', 'gw_gone')
           WHERE id IS NOT NULL), 1::bigint, 'a submit for m1 (short path) is taken');
SELECT ok(NOT pg_temp.gone_node_locked(), 'the short path did not ask whether gpu-gone (not serving m1) is live');
SELECT is((SELECT count(*) FROM dispatch.submit_many('[{"model": "m-gone", "payload": {}}]', 'gw_gone')
           WHERE sqlstate = 'PD002'), 1::bigint, 'a submit for m-gone is refused: no live node');
SELECT ok(pg_temp.gone_node_locked(), 'that submit did ask (the check above can see the lock)');

SELECT * FROM finish();
ROLLBACK;
