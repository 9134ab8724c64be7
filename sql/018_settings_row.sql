-- 018: a submit reads the settings from one row.
--
-- Counted with callgrind (bench/sqlcost.py; instructions a backend runs per call), a
-- submit of one request spent 0.16 million of its 1.34 million instructions reading
-- seven settings: an aggregate of seven filtered maxima over the settings table, which
-- the executor sets up anew on every call. dispatch.setting_values holds every setting
-- as a typed column of its one row (integer where set_setting takes whole numbers only;
-- queue_depth_per_slot stays numeric because capacity times depth can pass the integer
-- range), kept equal to dispatch.settings by a statement trigger, so the submit reads
-- them with a scan of one row. dispatch.settings stays what the admin functions read
-- and change (settings(), set_setting); a migration that adds a setting adds its column
-- here and restates _copy_setting_values. Tried first: seven scalar subqueries (1.42
-- million), one jsonb_object_agg read seven times (1.37 million).
--
-- Two smaller things in the same statements: the capacity's CASE (with an EXISTS over
-- the nodes) was copied into each of the five places that read it, each copy an
-- InitPlan the executor set up; and a pushed batch was numbered, cut and sorted,
-- though a push only happens when the whole batch fits.
--
-- One request: 1,258,891 -> 1,116,025 instructions; pushed: 1,340,727 -> 1,177,424;
-- 16 requests: 3,022,241 -> 2,878,452. The daemon's exchange reads two settings the
-- old way: read from this row it ran no fewer instructions, so it is unchanged.

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE dispatch.setting_values (
    lease_seconds          integer NOT NULL,
    retry_base_ms          integer NOT NULL,
    retry_factor           numeric NOT NULL,
    retry_cap_ms           integer NOT NULL,
    default_max_attempts   integer NOT NULL,
    default_slots_per_node integer NOT NULL,
    fallback_capacity      integer NOT NULL,
    queue_depth_per_slot   numeric NOT NULL,
    stale_seconds          integer NOT NULL,
    retention_seconds      integer NOT NULL,
    prune_batch            integer NOT NULL,
    push_jobs              integer NOT NULL,
    push_lease_seconds     integer NOT NULL
);
COMMENT ON TABLE dispatch.setting_values IS
'Internal: every setting''s value as a column of the one row, kept equal to dispatch.settings
by its trigger; read where a statement needs several settings at little cost.';
GRANT SELECT ON dispatch.setting_values TO dispatch_admin;

CREATE FUNCTION dispatch._copy_setting_values() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    -- One writer at a time (readers are not blocked): under READ COMMITTED the
    -- statements after the lock see every change committed while this one waited, so
    -- two set_setting calls at once cannot leave one of their values out of the row.
    LOCK TABLE dispatch.setting_values IN EXCLUSIVE MODE;
    DELETE FROM dispatch.setting_values;
    INSERT INTO dispatch.setting_values (lease_seconds, retry_base_ms, retry_factor, retry_cap_ms,
        default_max_attempts, default_slots_per_node, fallback_capacity, queue_depth_per_slot, stale_seconds,
        retention_seconds, prune_batch, push_jobs, push_lease_seconds)
    SELECT max(s.value) FILTER (WHERE s.key = 'lease_seconds')::integer,
           max(s.value) FILTER (WHERE s.key = 'retry_base_ms')::integer,
           max(s.value) FILTER (WHERE s.key = 'retry_factor'),
           max(s.value) FILTER (WHERE s.key = 'retry_cap_ms')::integer,
           max(s.value) FILTER (WHERE s.key = 'default_max_attempts')::integer,
           max(s.value) FILTER (WHERE s.key = 'default_slots_per_node')::integer,
           max(s.value) FILTER (WHERE s.key = 'fallback_capacity')::integer,
           max(s.value) FILTER (WHERE s.key = 'queue_depth_per_slot'),
           max(s.value) FILTER (WHERE s.key = 'stale_seconds')::integer,
           max(s.value) FILTER (WHERE s.key = 'retention_seconds')::integer,
           max(s.value) FILTER (WHERE s.key = 'prune_batch')::integer,
           max(s.value) FILTER (WHERE s.key = 'push_jobs')::integer,
           max(s.value) FILTER (WHERE s.key = 'push_lease_seconds')::integer
    FROM dispatch.settings s;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dispatch._copy_setting_values() IS
'Internal (trigger): copies dispatch.settings into the one row of dispatch.setting_values.';
REVOKE EXECUTE ON FUNCTION dispatch._copy_setting_values() FROM PUBLIC;

CREATE TRIGGER copy_setting_values AFTER INSERT OR UPDATE OR DELETE ON dispatch.settings
FOR EACH STATEMENT EXECUTE FUNCTION dispatch._copy_setting_values();
UPDATE dispatch.settings SET value = value;   -- fills the row

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
        FROM (SELECT bool_and(dispatch._fields_problem(e.r, f) IS NULL AND f.model #>> '{}' = v_model
                              AND f.idempotency_key IS NULL) AS ok,
                     -- A push's notification holds an element's model, endpoint and
                     -- payload: the element's length bounds it (without parsing it again).
                     max(octet_length(e.r::text)) AS largest
              FROM json_array_elements(p_requests) AS e(r)
              CROSS JOIN LATERAL json_populate_record(NULL::dispatch.request_fields,
                                                      CASE WHEN json_typeof(e.r) = 'object' THEN e.r END) AS f) chk
        CROSS JOIN (SELECT v.default_max_attempts AS default_attempts, v.queue_depth_per_slot AS depth,
                           v.default_slots_per_node AS default_slots, v.fallback_capacity AS fallback,
                           v.push_jobs = 1 AS push,
                           make_interval(secs => least(v.lease_seconds, v.push_lease_seconds)) AS lease
                    FROM dispatch.setting_values v) st
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
                        THEN st.fallback END AS capacity
            -- Kept a subquery of its own (OFFSET 0): pulled up, its CASE was copied to
            -- each of the five places that read the capacity, and with it the EXISTS.
            OFFSET 0) cap
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
            -- A push takes the whole batch (the queue was empty and has room for it), in
            -- the order the function reads it: nothing to number, cut or sort.
            FROM json_populate_recordset(NULL::dispatch.request_fields, p_requests) AS e
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

