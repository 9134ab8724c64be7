-- 017: the small helpers a submit calls are planned into its statements.
--
-- A pushed submit of one request called five PL/pgSQL functions besides itself:
-- _request_problem (once per element), _node_live twice, model_channel and
-- node_channel. Each call of a function with a SET clause saves and restores the
-- settings and starts the PL/pgSQL interpreter (callgrind, bench/sqlcost.py: 242,000
-- of the submit's 1.40 million instructions went to the five).
--
-- model_channel and node_channel are now SQL functions with a standard body
-- (RETURN ...), which PostgreSQL parses when the function is created, binding every
-- name then, and which the planner inlines into the calling statement: no call at all.
-- A SET clause would stop the inlining, so these do without one; no name in them is
-- looked up at run time, which is what the pinned search_path of the other functions
-- guarantees (tests/sql/catalog.sql holds both rules). node_channel casts the id to
-- text first so that its body is immutable as declared (text || integer calls the
-- stable anytextcat; a body less immutable than its function is not inlined).
--
-- _node_live stays PL/pgSQL, although inlined it saved 22,000 instructions a call: it
-- takes a lock, and a PL/pgSQL call is costed high enough that the planner tests it
-- after every other condition, while its inlined CASE looked cheap and went first, so
-- that a submit locked the gone nodes of every model, not only its own
-- (tests/sql/submit_paths.sql).
--
-- The rules of a well-formed element move from _request_problem into _fields_problem,
-- which reads the fields one parse of the element has produced. submit_many's short
-- path parses each element once in its check statement (json_populate_record in the
-- FROM clause) and has _fields_problem inlined there; it also compares the model and
-- looks for an idempotency key in those fields, where it parsed the element twice more
-- with ->>. _request_problem (the general path's) parses into a variable and calls it.

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION dispatch.model_channel(p_model text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN 'dispatch_m_' || md5(p_model);

CREATE OR REPLACE FUNCTION dispatch.node_channel(p_node_id integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN 'dispatch_n_' || p_node_id::text;

CREATE FUNCTION dispatch._fields_problem(r json, f dispatch.request_fields) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE
    WHEN json_typeof(r) IS DISTINCT FROM 'object' THEN 'each request must be a JSON object'
    WHEN json_typeof(f.model) IS DISTINCT FROM 'string' OR length(f.model #>> '{}') NOT BETWEEN 1 AND 256
        THEN 'model must be a string of 1 to 256 characters'
    WHEN f.endpoint IS NOT NULL
         AND (json_typeof(f.endpoint) <> 'string' OR (f.endpoint #>> '{}') !~ '^/[A-Za-z0-9/_.-]{0,255}$')
        THEN 'endpoint must be a path such as /v1/chat/completions'
    WHEN f.payload IS NULL THEN 'payload is required'
    WHEN f.priority IS NOT NULL
         AND NOT (json_typeof(f.priority) = 'number' AND f.priority::text ~ '^-?\d{1,9}$')
        THEN 'priority must be an integer'
    WHEN f.timeout_ms IS NOT NULL
         AND NOT (json_typeof(f.timeout_ms) = 'number' AND f.timeout_ms::text ~ '^\d{1,12}$'
                  AND f.timeout_ms::text::bigint > 0)
        THEN 'timeout_ms must be a positive integer'
    WHEN f.max_attempts IS NOT NULL
         AND NOT (json_typeof(f.max_attempts) = 'number' AND f.max_attempts::text ~ '^\d{1,3}$'
                  AND f.max_attempts::text::integer BETWEEN 1 AND 100)
        THEN 'max_attempts must be an integer from 1 to 100'
    WHEN f.idempotency_key IS NOT NULL
         AND (json_typeof(f.idempotency_key) <> 'string' OR length(f.idempotency_key #>> '{}') NOT BETWEEN 1 AND 255)
        THEN 'idempotency_key must be a string of 1 to 255 characters'
    WHEN f.stream_token IS NOT NULL
         AND (json_typeof(f.stream_token) <> 'string' OR (f.stream_token #>> '{}') !~ '^[A-Za-z0-9]{8,64}$')
        THEN 'stream_token must be 8 to 64 letters and digits'
END;
COMMENT ON FUNCTION dispatch._fields_problem(json, dispatch.request_fields) IS
'Internal: the reason a submit element is malformed, or NULL: r is the element, f its
fields as json_populate_record read them (any row when r is not an object).';
REVOKE EXECUTE ON FUNCTION dispatch._fields_problem(json, dispatch.request_fields) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dispatch._request_problem(r json) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    f dispatch.request_fields;
BEGIN
    IF json_typeof(r) = 'object' THEN
        f := json_populate_record(NULL::dispatch.request_fields, r);
    END IF;
    RETURN dispatch._fields_problem(r, f);
END
$$;

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

