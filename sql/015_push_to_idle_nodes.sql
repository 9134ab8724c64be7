-- 015: a submit hands its jobs straight to an idle node.
--
-- Under light load every request crossed the database twice before its provider saw
-- it: the submit committed the job and woke the node, and the node's exchange leased
-- it in a transaction of its own (bench B2: 1.1 ms from the client's send to the
-- lease's start, 0.6 ms more to the provider). When the model's queue is empty and a
-- live node serving it has free slots for the whole batch, the submit now inserts the
-- jobs already leased to that node (attempt 1) and sends them on the node's channel,
-- one NOTIFY per job: the node starts them on the notification, with no round trip
-- in between. Every other submit queues and wakes as before.
--
-- A node can look live and not answer (its process stopped, or its host gone with the
-- connection not yet timed out). A job pushed to it must not wait out a whole lease,
-- so a push leases for push_lease_seconds (2) only, and the model's wake NOTIFY still
-- goes out, naming node 0 (nobody): the other nodes look a second later (the standby
-- look daemons already make when a wake names someone else), and from then on wake
-- when that short lease runs out and take the job back. A node that did start the job
-- renews the lease to lease_seconds when a third of it has passed, as for any lease;
-- jobs that end sooner never need to.
--
-- Only a daemon that says it takes pushed jobs gets them (dispatch.accept_pushes, in
-- the transaction of its LISTEN, so it cannot miss one), only while it is the session
-- that said so, and only jobs whose message fits a notification. A pushed job is an
-- ordinary lease from then on: settled by exchange, renewed by extend, cancelled
-- through the node's channel, taken back when the lease runs out, and handed back by
-- deregister, revoke or a re-register that does not hold it. So nothing is lost if a
-- notification is: the daemon's connection broke (its re-register takes back what it
-- does not hold), or the daemon died (the lease runs out, as for a leased job).
--
-- Races. Submits choose among live nodes; a node that deregisters in between must not
-- be chosen. _hand_back (deregister, revoke) now takes the node's push lock
-- exclusively before it looks for jobs to hand back, and a submit takes it shared and
-- only then asks again whether the node is connected: a submit that got in first has
-- committed before the hand-back looks, one that comes after finds the node gone.
-- Two submits at once may each see the same free slot (each counts the other's jobs
-- only once committed): the node then holds a batch more than its slots for a moment,
-- which it runs as slots free up, as it does with leases taken ahead.
--
-- The setting push_jobs (1) turns it off with 0.

ALTER TABLE dispatch.nodes ADD COLUMN push_pid integer;

INSERT INTO dispatch.settings (key, value, min_value, max_value, description) VALUES
  ('push_jobs', 1, 0, 1, 'hand a submitted job straight to an idle node that takes pushed jobs (1), or always queue it (0)'),
  ('push_lease_seconds', 2, 1, 86400, 'first lease of a pushed job, renewed by a node that started it (a stuck node''s pushes come back this soon)');

CREATE FUNCTION dispatch._push_lock_class() RETURNS integer
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    RETURN 1885627505;  -- 'pgdq'
END
$$;
COMMENT ON FUNCTION dispatch._push_lock_class() IS
'Internal: first key of the transaction advisory lock on a node that a submit pushing
jobs to it holds shared and a hand-back (deregister, revoke) takes exclusively.';
REVOKE EXECUTE ON FUNCTION dispatch._push_lock_class() FROM PUBLIC;

CREATE FUNCTION dispatch.accept_pushes(p_accept boolean) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE n dispatch.nodes := dispatch._session_node(true);
BEGIN
    IF p_accept IS NULL THEN
        RAISE EXCEPTION 'accept_pushes takes true or false, got NULL' USING ERRCODE = '22023';
    END IF;
    UPDATE dispatch.nodes SET push_pid = CASE WHEN p_accept THEN pg_backend_pid() END, updated_at = now()
    WHERE id = n.id AND push_pid IS DISTINCT FROM CASE WHEN p_accept THEN pg_backend_pid() END;
    RETURN p_accept;
END
$$;
COMMENT ON FUNCTION dispatch.accept_pushes(boolean) IS
'From a registered node''s session: whether submits may hand this node jobs directly
(true) or not (false, the default). A pushed job arrives on the node''s channel as
"P<id>:<attempt>:<lease ms>:<deadline ms or empty>:<endpoint>:<model bytes>:<model><payload>",
already leased to the node for push_lease_seconds: renew it (dispatch.extend) once a
third has passed if the job is still running; an ordinary lease from then on. Call it in the transaction
that LISTENs on that channel, so no push can come before the LISTEN; it holds for this
session only (a new session must call it again). A submit pushes only when the model''s
queue is empty and the node has free slots for the whole batch.
Example: SELECT dispatch.accept_pushes(true);';
REVOKE EXECUTE ON FUNCTION dispatch.accept_pushes(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.accept_pushes(boolean) TO dispatch_daemon;

COMMENT ON FUNCTION dispatch.node_channel(integer) IS
'The LISTEN channel of a node: a job id as payload tells it to abort that job; a payload
starting with P hands it a job (see dispatch.accept_pushes).';

CREATE OR REPLACE FUNCTION dispatch._hand_back(p_node_id integer) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE v_models text[];
BEGIN
    -- Submits pushing to this node hold this lock shared until they commit: wait for
    -- them, so that their jobs are visible below (see the head of 015).
    PERFORM pg_advisory_xact_lock(dispatch._push_lock_class(), p_node_id);
    WITH back AS (
        -- The attempt number stays (it is the fencing token of the abandoned lease);
        -- one more allowed attempt keeps the hand-back from counting as a failure.
        UPDATE dispatch.jobs SET state = 'queued', run_at = now(), leased_by = NULL, lease_expires_at = NULL,
            max_attempts = least(100, max_attempts + 1)
        WHERE state = 'leased' AND leased_by = p_node_id
        RETURNING model
    )
    SELECT array_agg(model) INTO v_models FROM back;
    PERFORM dispatch._notify_models(v_models);
    RETURN coalesce(cardinality(v_models), 0);
END
$$;
COMMENT ON FUNCTION dispatch._hand_back(integer) IS
'Internal: requeue every job leased by a node (deregister, revoke) and wake its models,
after any submit pushing jobs to the node has committed.';

CREATE OR REPLACE FUNCTION dispatch.submit_many(p_requests json, p_reply_channel text DEFAULT NULL)
RETURNS TABLE (idx integer, id bigint, sqlstate text, message text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_count integer;
    v_model text;
    v_short boolean;
    v_attempts integer;
    v_depth numeric;
    v_capacity integer;
    v_limit bigint;
    v_free bigint;
    v_node_ids integer[];
    v_node_slots integer[];
    v_push_ids integer[];              -- nodes a push may go to (NULL: no push)
    v_push_slots integer[];
    v_push_pids integer[];
    v_push_node integer;
    v_lease interval;
    v_ids bigint[];
BEGIN
    IF p_reply_channel IS NOT NULL AND p_reply_channel !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'reply channel "%" is not a valid channel name (lower-case letters, digits, _; at most 63)',
            p_reply_channel USING ERRCODE = '22023';
    END IF;
    IF p_requests IS NULL OR json_typeof(p_requests) <> 'array' THEN
        RAISE EXCEPTION 'requests must be a JSON array' USING ERRCODE = '22023';
    END IF;

    v_count := json_array_length(p_requests);
    IF v_count = 0 THEN
        RETURN;
    END IF;
    v_model := p_requests->0->>'model';

    -- The short path takes a batch of well-formed requests for one model without
    -- idempotency keys, for a model with capacity. One statement checks the elements
    -- (one parse each) and reads the settings, the model's serving nodes, its capacity
    -- (dispatch.model_capacity's rule, for this model alone), the free queue, and the
    -- nodes the batch could be pushed to: only past an empty queue (nothing waits that
    -- the batch would overtake), and only when each element fits a notification.
    IF v_model IS NOT NULL THEN
        SELECT chk.ok, st.default_attempts, st.depth, cap.capacity, lim.queue_limit,
               lim.queue_limit - q.queued, sn.ids, sn.slots, st.lease,
               CASE WHEN st.push AND chk.ok AND chk.largest <= 7500 AND q.queued = 0
                         AND lim.queue_limit >= v_count THEN sn.push_ids END,
               sn.push_slots, sn.push_pids
        INTO v_short, v_attempts, v_depth, v_capacity, v_limit, v_free, v_node_ids, v_node_slots,
             v_lease, v_push_ids, v_push_slots, v_push_pids
        FROM (SELECT bool_and(dispatch._request_problem(e.r) IS NULL AND e.r->>'model' = v_model
                              AND e.r->>'idempotency_key' IS NULL) AS ok,
                     -- A push's notification holds an element's model, endpoint and
                     -- payload: the element's length bounds it (without parsing it again).
                     max(octet_length(e.r::text)) AS largest
              FROM json_array_elements(p_requests) AS e(r)) chk
        CROSS JOIN (SELECT max(s.value) FILTER (WHERE s.key = 'default_max_attempts')::integer AS default_attempts,
                           max(s.value) FILTER (WHERE s.key = 'queue_depth_per_slot') AS depth,
                           max(s.value) FILTER (WHERE s.key = 'default_slots_per_node')::integer AS default_slots,
                           max(s.value) FILTER (WHERE s.key = 'fallback_capacity')::integer AS fallback,
                           max(s.value) FILTER (WHERE s.key = 'push_jobs') = 1 AS push,
                           make_interval(secs => least(max(s.value) FILTER (WHERE s.key = 'lease_seconds'),
                                                       max(s.value) FILTER (WHERE s.key = 'push_lease_seconds'))) AS lease
                    FROM dispatch.settings s
                    WHERE s.key IN ('default_max_attempts', 'queue_depth_per_slot', 'default_slots_per_node',
                                    'fallback_capacity', 'push_jobs', 'lease_seconds', 'push_lease_seconds')) st
        CROSS JOIN LATERAL (
            SELECT array_agg(n.id) AS ids, array_agg(n.slots) AS slots, sum(n.slots)::integer AS total,
                   array_agg(n.pid) FILTER (WHERE n.pushes) AS push_pids,
                   array_agg(n.id) FILTER (WHERE n.pushes) AS push_ids,
                   array_agg(n.slots) FILTER (WHERE n.pushes) AS push_slots
            FROM (SELECT nd.id, coalesce(nd.max_concurrency, st.default_slots) AS slots, nd.backend_pid AS pid,
                         nd.push_pid = nd.backend_pid AS pushes
                  FROM dispatch.nodes nd
                  WHERE v_model = ANY (nd.models) AND nd.admin_state = 'active' AND nd.health = 'healthy'
                    AND nd.backend_pid IS NOT NULL AND dispatch._node_live(nd.id, nd.backend_pid)) n) sn
        LEFT JOIN dispatch.capacity_overrides o ON o.model = v_model
        CROSS JOIN LATERAL (
            SELECT CASE WHEN o.capacity IS NOT NULL THEN o.capacity
                        WHEN sn.ids IS NOT NULL THEN sn.total
                        WHEN EXISTS (SELECT 1 FROM dispatch.nodes n WHERE v_model = ANY (n.models))
                        THEN st.fallback END AS capacity) cap
        CROSS JOIN LATERAL (SELECT floor(coalesce(cap.capacity, 0) * st.depth)::bigint AS queue_limit) lim
        CROSS JOIN LATERAL (SELECT count(*) AS queued FROM (SELECT 1 FROM dispatch.jobs j
                                                         WHERE chk.ok AND j.state = 'queued' AND j.model = v_model
                                                         LIMIT lim.queue_limit) l) q;
    END IF;

    IF NOT coalesce(v_short, false) OR coalesce(v_capacity, 0) <= 0 THEN
        RETURN QUERY SELECT * FROM dispatch._submit_many_general(p_requests, p_reply_channel);
        RETURN;
    END IF;

    -- A statement of its own, run only when a push may happen: the node with the most
    -- free slots that has room for the whole batch. The push lock comes before the
    -- second liveness check (see the head of 015).
    IF v_push_ids IS NOT NULL THEN
        SELECT c.id INTO v_push_node
        FROM unnest(v_push_ids, v_push_slots, v_push_pids) AS c(id, slots, pid)
        CROSS JOIN LATERAL (SELECT c.slots - count(*) AS free FROM dispatch.jobs j
                            WHERE j.state = 'leased' AND j.leased_by = c.id) f
        WHERE f.free >= v_count
          AND CASE WHEN pg_try_advisory_xact_lock_shared(dispatch._push_lock_class(), c.id)
                   THEN dispatch._node_live(c.id, c.pid) ELSE false END
        ORDER BY f.free DESC, random()
        LIMIT 1;
    END IF;

    -- The first v_free elements, in order. Queued: one NOTIFY wakes the model's nodes:
    -- it names as many as jobs came, those with the most free slots first; when that
    -- is all of them (or none serves) its payload is empty, which wakes every listener.
    -- Pushed: one NOTIFY per job on the node's channel, and the model's wake names
    -- node 0 (the others look a second later, in case the node does not answer).
    -- Two statements, not one with both branches: starting the unused branch cost
    -- every submit 0.06-0.11 million instructions (bench/sqlcost.py).
    IF v_push_node IS NULL THEN
        WITH ins AS (
            INSERT INTO dispatch.jobs (model, endpoint, payload, priority, max_attempts, deadline,
                                       reply_channel, stream_token)
            SELECT v_model, coalesce(e.endpoint #>> '{}', '/v1/chat/completions'), e.payload,
                   coalesce(e.priority::text::integer, 0), coalesce(e.max_attempts::text::integer, v_attempts),
                   now() + make_interval(secs => e.timeout_ms::text::bigint / 1000.0), p_reply_channel,
                   e.stream_token #>> '{}'
            FROM json_populate_recordset(NULL::dispatch.request_fields, p_requests) WITH ORDINALITY AS e
            WHERE e.ordinality <= v_free
            ORDER BY e.ordinality
            RETURNING dispatch.jobs.id
        ),
        woken AS MATERIALIZED (
            SELECT count(pg_notify(dispatch.model_channel(v_model),
                                   CASE WHEN m.k >= coalesce(cardinality(v_node_ids), 0) THEN ''
                                        ELSE (SELECT string_agg(c.id::text, ',')
                                              FROM (SELECT t.id
                                                    FROM unnest(v_node_ids, v_node_slots) AS t(id, slots)
                                                    ORDER BY (SELECT count(*) FROM dispatch.jobs j
                                                              WHERE j.state = 'leased' AND j.leased_by = t.id) - t.slots,
                                                             random()
                                                    LIMIT m.k) c) END)) AS n
            FROM (SELECT count(*) AS k FROM ins) m
            WHERE m.k > 0
        )
        SELECT array_agg(i.id ORDER BY i.id) INTO v_ids FROM ins i CROSS JOIN woken;
    ELSE
        WITH ins AS (
            INSERT INTO dispatch.jobs (model, endpoint, payload, priority, max_attempts, deadline,
                                       reply_channel, stream_token, state, attempt, leased_by, lease_expires_at,
                                       started_at)
            SELECT v_model, coalesce(e.endpoint #>> '{}', '/v1/chat/completions'), e.payload,
                   coalesce(e.priority::text::integer, 0), coalesce(e.max_attempts::text::integer, v_attempts),
                   now() + make_interval(secs => e.timeout_ms::text::bigint / 1000.0), p_reply_channel,
                   e.stream_token #>> '{}', 'leased', 1, v_push_node, now() + v_lease, now()
            FROM json_populate_recordset(NULL::dispatch.request_fields, p_requests) WITH ORDINALITY AS e
            WHERE e.ordinality <= v_free
            ORDER BY e.ordinality
            RETURNING dispatch.jobs.id, dispatch.jobs.endpoint, dispatch.jobs.payload, dispatch.jobs.deadline
        ),
        pushed AS MATERIALIZED (
            SELECT count(pg_notify(dispatch.node_channel(v_push_node),
                                   format('P%s:1:%s:%s:%s:%s:%s%s', i.id, round(extract(epoch FROM v_lease) * 1000),
                                          round(extract(epoch FROM i.deadline - now()) * 1000),
                                          i.endpoint, octet_length(v_model), v_model, i.payload::text))) AS n,
                   pg_notify(dispatch.model_channel(v_model), '0') AS standby
            FROM ins i
        )
        SELECT array_agg(i.id ORDER BY i.id) INTO v_ids FROM ins i CROSS JOIN pushed;
    END IF;

    -- Identity values are drawn in the order rows are inserted: the ids ascend with idx.
    FOR i IN 1 .. v_count LOOP
        idx := i;
        id := v_ids[i];
        sqlstate := NULL;
        message := NULL;
        IF i > coalesce(cardinality(v_ids), 0) THEN
            sqlstate := 'PD003';
            message := format('queue for model "%s" is full (limit %s: capacity %s x %s per slot)',
                              v_model, v_limit, v_capacity, v_depth);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION dispatch.submit_many(json, text) IS
'Submits a batch of jobs in one transaction. p_requests is a JSON array of objects
{"model", "endpoint" (default /v1/chat/completions), "payload" (stored as sent),
"priority" (higher first, default 0), "timeout_ms" (deadline), "max_attempts",
"idempotency_key", "stream_token" (a secret of the caller''s, 8-64 letters and digits,
echoed in every streamed piece of the job so forged notifications can be told apart)}.
Returns one row per element: its job id, or the SQLSTATE and
message that refused it (22023 malformed element, PD001 unknown model, PD002 no live
node, PD003 queue full, PD008 idempotency key reused for a different request).
Refusals do not disturb the other elements. A replayed idempotency key returns the
existing job. Finished jobs are NOTIFYed on p_reply_channel; one NOTIFY per
distinct model wakes the daemons, naming as many of its serving nodes as jobs came
(most free slots first), or none (all wake) when that is every one of them. A batch of
well-formed requests for one served model without idempotency keys, of any length,
takes a short path of two small statements that read each element once and the
model''s own capacity; every other batch runs dispatch._submit_many_general. On the
short path, when the model''s queue is empty and a live node that takes pushed jobs
(dispatch.accept_pushes) has free slots for the whole batch, the jobs are stored
already leased to it for push_lease_seconds and sent on its channel, and the wake names
node 0, so that the others look a second later in case it does not answer (setting
push_jobs = 0 turns pushing off).
Example: SELECT * FROM dispatch.submit_many(''[{"model":"m","payload":{"x":1}}]'');';
