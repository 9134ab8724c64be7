-- 014: the short submit path reads one model's capacity, not every model's.
--
-- Under load (bench B9, 50 concurrent streams) a submit took 2.0 ms from send to
-- answer, 0.9 ms of it executing: the largest step between a request and its first
-- token. Plans logged by auto_explain showed why. The check statement read capacity
-- from dispatch.model_capacity, which builds the capacity of every known model (a
-- UNION of every node's models and the overrides, grouped by a hash table sized by the
-- planner's estimate, 121 kB allocated and cleared on every call) and keeps one row;
-- its executor start alone set up about thirty plan nodes. The serving nodes were
-- looked for twice, in that view and again to choose whom to wake, each time asking
-- every node whether its daemon is connected (_node_live) and counting every lease
-- each holds, though with one node serving the model (or as many jobs as nodes) the
-- wake names nobody and the counts are thrown away.
--
-- Now the check statement reads the settings it needs in one pass, the model's override,
-- and the model's serving nodes (filtered by model before anyone is asked whether it is
-- live), kept as two arrays; capacity follows model_capacity's rule for that one model.
-- The INSERT's NOTIFY picks targets from those arrays, and counts the leases of the
-- candidates only when it names fewer nodes than serve the model. What is accepted,
-- refused and stored, and whom a submit wakes, do not change: tests/sql/submit.sql and
-- tests/sql/submit_paths.sql pass unchanged, and submit_paths.sql now also compares
-- both paths where capacity has each of its tiers.

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
    -- (dispatch.model_capacity's rule, for this model alone) and the free queue.
    IF v_model IS NOT NULL THEN
        SELECT chk.ok, st.default_attempts, st.depth, cap.capacity, lim.queue_limit,
               lim.queue_limit - (SELECT count(*) FROM (SELECT 1 FROM dispatch.jobs j
                                                         WHERE chk.ok AND j.state = 'queued' AND j.model = v_model
                                                         LIMIT lim.queue_limit) q),
               sn.ids, sn.slots
        INTO v_short, v_attempts, v_depth, v_capacity, v_limit, v_free, v_node_ids, v_node_slots
        FROM (SELECT bool_and(dispatch._request_problem(e.r) IS NULL AND e.r->>'model' = v_model
                              AND e.r->>'idempotency_key' IS NULL) AS ok
              FROM json_array_elements(p_requests) AS e(r)) chk
        CROSS JOIN (SELECT max(s.value) FILTER (WHERE s.key = 'default_max_attempts')::integer AS default_attempts,
                           max(s.value) FILTER (WHERE s.key = 'queue_depth_per_slot') AS depth,
                           max(s.value) FILTER (WHERE s.key = 'default_slots_per_node')::integer AS default_slots,
                           max(s.value) FILTER (WHERE s.key = 'fallback_capacity')::integer AS fallback
                    FROM dispatch.settings s
                    WHERE s.key IN ('default_max_attempts', 'queue_depth_per_slot', 'default_slots_per_node',
                                    'fallback_capacity')) st
        CROSS JOIN LATERAL (
            SELECT array_agg(n.id) AS ids, array_agg(n.slots) AS slots, sum(n.slots)::integer AS total
            FROM (SELECT nd.id, coalesce(nd.max_concurrency, st.default_slots) AS slots
                  FROM dispatch.nodes nd
                  WHERE v_model = ANY (nd.models) AND nd.admin_state = 'active' AND nd.health = 'healthy'
                    AND nd.backend_pid IS NOT NULL AND dispatch._node_live(nd.id, nd.backend_pid)) n) sn
        LEFT JOIN dispatch.capacity_overrides o ON o.model = v_model
        CROSS JOIN LATERAL (
            SELECT CASE WHEN o.capacity IS NOT NULL THEN o.capacity
                        WHEN sn.ids IS NOT NULL THEN sn.total
                        WHEN EXISTS (SELECT 1 FROM dispatch.nodes n WHERE v_model = ANY (n.models))
                        THEN st.fallback END AS capacity) cap
        CROSS JOIN LATERAL (SELECT floor(coalesce(cap.capacity, 0) * st.depth)::bigint AS queue_limit) lim;
    END IF;

    IF NOT coalesce(v_short, false) OR coalesce(v_capacity, 0) <= 0 THEN
        RETURN QUERY SELECT * FROM dispatch._submit_many_general(p_requests, p_reply_channel);
        RETURN;
    END IF;

    -- The first v_free elements, in order. One NOTIFY wakes the model's nodes: it names
    -- as many as jobs came, those with the most free slots first; when that is all of
    -- them (or none serves) its payload is empty, which wakes every listener.
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
model''s own capacity; every other batch runs dispatch._submit_many_general.
Example: SELECT * FROM dispatch.submit_many(''[{"model":"m","payload":{"x":1}}]'');';
