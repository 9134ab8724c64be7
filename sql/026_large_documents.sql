-- 026: a large request or result costs a submit or a settlement less.
--
-- A chat request carries its context and an answer can be long; what a submit and a
-- settlement cost grows with their bytes, which bench/sqlcost.py's small shapes did
-- not show. Measured with new shapes (callgrind, instructions per call): one request
-- of 8 kB, the same with an idempotency key, and exchange_10x10 with answers of 4 kB,
-- each of words that compress about as well as a chat's (3:1 with zlib).
--
-- 1. submit_many's short path read its batch nine times: the parameter's own check,
--    json_array_length, ->0->>'model' (which reads the whole array, then the
--    element), the check statement's split and its parse of each element and of the
--    payload, and the INSERT's json_populate_recordset and payload again. Now the
--    check statement splits the array, parses each element once and keeps the fields
--    (a request_fields[]), and takes the count and the model from them; the INSERT
--    reads that array. Four readings: the parameter's check, the split, the element,
--    the payload (a json value is checked when it is made). Same paths, rows, errors.
-- 2. The general path (idempotency keys, malformed elements, several models) read
--    each element once in _request_problem and eight times more with -> and ->>.
--    It now reads the fields as the short path does, and _request_problem goes.
-- 3. exchange and settle parsed every outcome once more than they used it, with
--    json_array_length, only to tell whether any came (to keep the durable commit).
-- 4. A payload or a result over 2 kB is compressed when stored (TOAST), with pglz by
--    default: in the 4 kB answers' round trip, more instructions than parsing them.
--    lz4 costs a fraction of that and decompresses faster too; it is used for payload
--    and result where the server is built with it (Debian's is; a server without it
--    keeps pglz). Only values written from now on are compressed so: SET COMPRESSION
--    rewrites nothing, and holds the jobs table's lock only until this commits.
--
-- | instructions per call            | 025        | 026       |
-- |----------------------------------|------------|-----------|
-- | submit_many, one request of 8 kB |  4,888,704 | 2,193,165 |
-- | the same with a key (general)    |  9,606,321 | 4,448,559 |
-- | exchange 10x10, answers of 4 kB  | 14,327,408 | 8,505,902 |
-- | submit_many, 16 small requests   |  2,868,060 | 2,554,814 |
-- | exchange 10x10, small answers    |  3,707,721 | 3,605,342 |
--
-- Without lz4 (1-3 only): 3,576,513 and 13,630,262 for the first and the third. A
-- one-request submit of a small request costs 1 % more (1,136,026 -> 1,147,405: the
-- fields array), the light-load lease and settle the same.

SET LOCAL search_path = pg_catalog, pg_temp;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings s WHERE s.name = 'default_toast_compression' AND 'lz4' = ANY (s.enumvals)) THEN
        ALTER TABLE dispatch.jobs ALTER COLUMN payload SET COMPRESSION lz4,
                                  ALTER COLUMN result SET COMPRESSION lz4;
    END IF;
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
    v_fields dispatch.request_fields[];   -- each element's fields, from the check's parse
    v_ids bigint[];
BEGIN
    IF p_reply_channel IS NOT NULL AND p_reply_channel !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'reply channel "%" is not a valid channel name (lower-case letters, digits, _; at most 63)',
            p_reply_channel USING ERRCODE = '22023';
    END IF;
    IF p_requests IS NULL OR json_typeof(p_requests) <> 'array' THEN
        RAISE EXCEPTION 'requests must be a JSON array' USING ERRCODE = '22023';
    END IF;

    -- The short path takes a batch of well-formed requests for one model without
    -- idempotency keys, for a model with capacity. One statement parses the elements
    -- (the array once, then each element once) and keeps their fields for the INSERT,
    -- and reads the settings, the model's serving nodes, its capacity
    -- (dispatch.model_capacity's rule, for this model alone), the free queue, and the
    -- nodes the batch could be pushed to: only past an empty queue (nothing waits that
    -- the batch would overtake), and only when each element fits a notification.
    SELECT chk.n, chk.model, chk.fields, chk.ok, st.default_attempts, st.depth, cap.capacity, lim.queue_limit,
           lim.queue_limit - q.queued, sn.ids, sn.slots, st.lease,
           CASE WHEN st.push AND chk.ok AND chk.largest <= 7500 AND q.queued = 0
                     AND lim.queue_limit >= chk.n THEN sn.push_ids END,
           sn.push_slots, sn.push_pids
    INTO v_count, v_model, v_fields, v_short, v_attempts, v_depth, v_capacity, v_limit, v_free, v_node_ids,
         v_node_slots, v_lease, v_push_ids, v_push_slots, v_push_pids
    FROM (SELECT count(*)::integer AS n,
                 -- One model: the least and the greatest are the same (a model that
                 -- is not a string is a problem of its element).
                 min(f.model #>> '{}') AS model,
                 bool_and(dispatch._fields_problem(e.r, f) IS NULL AND f.idempotency_key IS NULL)
                     AND min(f.model #>> '{}') = max(f.model #>> '{}') AS ok,
                 -- A push's notification holds an element's model, endpoint and
                 -- payload: the element's length bounds it (without parsing it again).
                 max(octet_length(e.r::text)) AS largest,
                 array_agg(f ORDER BY e.ord) AS fields
          FROM json_array_elements(p_requests) WITH ORDINALITY AS e(r, ord)
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
              WHERE chk.model = ANY (nd.models) AND nd.admin_state = 'active' AND nd.health = 'healthy'
                AND nd.backend_pid IS NOT NULL AND dispatch._node_live(nd.id, nd.backend_pid)) n) sn
    LEFT JOIN dispatch.capacity_overrides o ON o.model = chk.model
    CROSS JOIN LATERAL (
        SELECT CASE WHEN o.capacity IS NOT NULL THEN o.capacity
                    WHEN sn.ids IS NOT NULL THEN sn.total
                    WHEN EXISTS (SELECT 1 FROM dispatch.nodes n WHERE chk.model = ANY (n.models))
                    THEN st.fallback END AS capacity
        -- Kept a subquery of its own (OFFSET 0): pulled up, its CASE was copied to
        -- each of the five places that read the capacity, and with it the EXISTS.
        OFFSET 0) cap
    CROSS JOIN LATERAL (SELECT floor(coalesce(cap.capacity, 0) * st.depth)::bigint AS queue_limit) lim
    CROSS JOIN LATERAL (SELECT count(*) AS queued FROM (SELECT 1 FROM dispatch.jobs j
                                                     WHERE chk.ok AND j.state = 'queued' AND j.model = chk.model
                                                     LIMIT lim.queue_limit) l) q;
    IF v_count = 0 THEN
        RETURN;
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
            FROM unnest(v_fields) WITH ORDINALITY AS e
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
            FROM unnest(v_fields) AS e
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

CREATE OR REPLACE FUNCTION dispatch._submit_many_general(p_requests json, p_reply_channel text DEFAULT NULL)
RETURNS TABLE (idx integer, id bigint, sqlstate text, message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    v_out dispatch.submit_outcome[] := '{}';
    v_row dispatch.submit_outcome;
    v_lost boolean := false;
BEGIN
    IF p_reply_channel IS NOT NULL AND p_reply_channel !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'reply channel "%" is not a valid channel name (lower-case letters, digits, _; at most 63)',
            p_reply_channel USING ERRCODE = '22023';
    END IF;
    IF p_requests IS NULL OR json_typeof(p_requests) <> 'array' THEN
        RAISE EXCEPTION 'requests must be a JSON array' USING ERRCODE = '22023';
    END IF;

    FOR v_row IN
        WITH settings AS MATERIALIZED (
            SELECT max(s.value) FILTER (WHERE s.key = 'default_max_attempts')::integer AS default_attempts,
                   max(s.value) FILTER (WHERE s.key = 'queue_depth_per_slot') AS depth
            FROM dispatch.settings s WHERE s.key IN ('default_max_attempts', 'queue_depth_per_slot')
        ),
        -- Each element parsed once (its fields read as the short path reads them).
        parsed AS MATERIALIZED (
            SELECT e.ord::integer AS idx, dispatch._fields_problem(e.r, f) AS problem,
                   f.model #>> '{}' AS model, coalesce(f.endpoint #>> '{}', '/v1/chat/completions') AS endpoint,
                   f.payload, f.idempotency_key #>> '{}' AS idempotency_key, f
            FROM json_array_elements(p_requests) WITH ORDINALITY AS e(r, ord)
            CROSS JOIN LATERAL json_populate_record(NULL::dispatch.request_fields,
                                                    CASE WHEN json_typeof(e.r) = 'object' THEN e.r END) AS f
        ),
        good AS MATERIALIZED (
            SELECT p.idx, p.model, p.endpoint, p.payload, p.idempotency_key, (p.f).stream_token #>> '{}' AS stream_token,
                   coalesce((p.f).priority::text::integer, 0) AS priority,
                   (p.f).timeout_ms::text::bigint AS timeout_ms,
                   coalesce((p.f).max_attempts::text::integer, st.default_attempts) AS max_attempts
            FROM parsed p, settings st WHERE p.problem IS NULL
        ),
        prior AS MATERIALIZED (
            SELECT g.idx, j.id, j.state, g.stream_token,
                   (j.model <> g.model OR j.endpoint <> g.endpoint OR j.payload::text <> g.payload::text) AS mismatch
            FROM good g JOIN dispatch.jobs j ON j.idempotency_key = g.idempotency_key
        ),
        redirected AS (
            -- A replay moves the answer of an unfinished job to this caller's channel.
            UPDATE dispatch.jobs j SET reply_channel = p_reply_channel, stream_token = prior.stream_token
            FROM prior
            WHERE prior.id = j.id AND NOT prior.mismatch AND p_reply_channel IS NOT NULL
              AND j.state IN ('queued', 'leased')
              AND (j.reply_channel IS DISTINCT FROM p_reply_channel OR j.stream_token IS DISTINCT FROM prior.stream_token)
            RETURNING j.id
        ),
        fresh AS MATERIALIZED (
            SELECT g.*, row_number() OVER (PARTITION BY g.model ORDER BY g.idx) AS nth
            FROM good g WHERE NOT EXISTS (SELECT 1 FROM prior WHERE prior.idx = g.idx)
        ),
        room AS MATERIALIZED (
            SELECT m.model, c.capacity, c.tier,
                   (EXISTS (SELECT 1 FROM dispatch.nodes n WHERE m.model = ANY (n.models))
                    OR EXISTS (SELECT 1 FROM dispatch.capacity_overrides o WHERE o.model = m.model)) AS known,
                   floor(coalesce(c.capacity, 0) * st.depth)::bigint AS queue_limit
            FROM (SELECT DISTINCT f.model FROM fresh f) m
            CROSS JOIN settings st
            LEFT JOIN dispatch.model_capacity c ON c.model = m.model
        ),
        free AS MATERIALIZED (
            SELECT r.*, r.queue_limit - (SELECT count(*) FROM (
                            SELECT 1 FROM dispatch.jobs j WHERE j.state = 'queued' AND j.model = r.model
                            LIMIT r.queue_limit) q) AS free
            FROM room r WHERE r.known AND coalesce(r.capacity, 0) > 0
        ),
        admitted AS MATERIALIZED (
            SELECT f.*, nextval(pg_get_serial_sequence('dispatch.jobs', 'id')) AS new_id
            FROM fresh f JOIN free fr ON fr.model = f.model
            WHERE f.nth <= fr.free
            ORDER BY f.idx
        ),
        ins AS (
            INSERT INTO dispatch.jobs (id, model, endpoint, payload, priority, max_attempts, deadline,
                                       reply_channel, idempotency_key, stream_token)
            OVERRIDING SYSTEM VALUE
            SELECT a.new_id, a.model, a.endpoint, a.payload, a.priority, a.max_attempts,
                   now() + make_interval(secs => a.timeout_ms / 1000.0), p_reply_channel, a.idempotency_key,
                   a.stream_token
            FROM admitted a ORDER BY a.idx
            ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING dispatch.jobs.id, dispatch.jobs.model
        ),
        -- One NOTIFY per model wakes the nodes that can take its new jobs soonest:
        -- payload = the ids of as many live serving nodes as there are new jobs,
        -- most free slots first (empty: all of them). A node not named looks a
        -- little later anyway (the daemon's standby wake), so a named node that
        -- dies does not strand the job; and a busy node leases again as its jobs end.
        woken AS MATERIALIZED (
            SELECT count(pg_notify(dispatch.model_channel(m.model), coalesce(t.targets, ''))) AS n
            FROM (SELECT i.model, count(*) AS k FROM ins i GROUP BY i.model) m
            LEFT JOIN LATERAL (
                SELECT string_agg(c.id::text, ',') AS targets
                FROM (SELECT s.id, count(*) OVER () AS serving
                      FROM dispatch.serving_nodes s
                      WHERE m.model = ANY (s.models)
                      ORDER BY (SELECT count(*) FROM dispatch.jobs j
                                WHERE j.state = 'leased' AND j.leased_by = s.id) - s.slots, random()
                      LIMIT m.k) c
                HAVING count(*) < max(c.serving)) t ON true
        )
        SELECT p.idx,
               coalesce(pr.id, i.id),
               CASE WHEN p.problem IS NOT NULL THEN '22023'
                    WHEN pr.mismatch THEN 'PD008'
                    WHEN pr.id IS NOT NULL THEN NULL
                    WHEN NOT r.known THEN 'PD001'
                    WHEN coalesce(r.capacity, 0) = 0 THEN 'PD002'
                    WHEN a.new_id IS NULL THEN 'PD003'
                    WHEN i.id IS NULL THEN 'lost' END,
               CASE WHEN p.problem IS NOT NULL THEN p.problem
                    WHEN pr.mismatch THEN format('idempotency key "%s" was already used for a different request (job %s)',
                                                  p.idempotency_key, pr.id)
                    WHEN pr.id IS NOT NULL THEN NULL
                    WHEN NOT r.known THEN format('model "%s" is not served by any node', p.model)
                    WHEN coalesce(r.capacity, 0) = 0 THEN
                         format('no live healthy node serves model "%s" (capacity 0, tier %s)', p.model, r.tier)
                    WHEN a.new_id IS NULL THEN
                         format('queue for model "%s" is full (limit %s: capacity %s x %s per slot)',
                                p.model, r.queue_limit, r.capacity, st.depth) END,
               p.model, i.id IS NOT NULL, p.idempotency_key
        FROM parsed p
        CROSS JOIN settings st
        CROSS JOIN woken
        LEFT JOIN prior pr ON pr.idx = p.idx
        LEFT JOIN room r ON r.model = p.model AND p.problem IS NULL AND pr.id IS NULL
        LEFT JOIN admitted a ON a.idx = p.idx
        LEFT JOIN ins i ON i.id = a.new_id
        ORDER BY p.idx
    LOOP
        v_out := v_out || v_row;
        v_lost := v_lost OR v_row.sqlstate = 'lost';
    END LOOP;

    -- A keyed element whose insert was skipped lost a race with a concurrent
    -- submit of the same key (which has committed by now), or repeats a key of an
    -- earlier element of this batch: it takes that job if the request is the same,
    -- and is refused with PD008 like any other reuse of the key if it is not.
    IF v_lost THEN
        SELECT array_agg(CASE WHEN o.sqlstate = 'lost'
                              THEN ROW(o.idx, j.id,
                                       CASE WHEN j.id IS NULL THEN 'PD003' WHEN x.mismatch THEN 'PD008' END,
                                       CASE WHEN j.id IS NULL THEN 'idempotent submit raced and lost; retry'
                                            WHEN x.mismatch THEN
                                                format('idempotency key "%s" was already used for a different request (job %s)',
                                                       o.idempotency_key, j.id) END,
                                       o.model, false, o.idempotency_key)::dispatch.submit_outcome
                              ELSE o END ORDER BY o.idx)
        INTO v_out
        FROM unnest(v_out) o
        LEFT JOIN dispatch.jobs j ON o.sqlstate = 'lost' AND j.idempotency_key = o.idempotency_key
        LEFT JOIN LATERAL (SELECT j.model <> o.model
                                  OR j.endpoint <> coalesce(p_requests->(o.idx - 1)->>'endpoint', '/v1/chat/completions')
                                  OR j.payload::text <> (p_requests->(o.idx - 1)->'payload')::text AS mismatch) x
               ON j.id IS NOT NULL;
    END IF;

    FOREACH v_row IN ARRAY v_out LOOP
        idx := v_row.idx;
        id := v_row.id;
        sqlstate := v_row.sqlstate;
        message := v_row.message;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The general path read each element with _request_problem; nothing calls it now.
DROP FUNCTION dispatch._request_problem(json);

CREATE OR REPLACE FUNCTION dispatch.exchange(p_outcomes json, p_max_jobs integer)
RETURNS SETOF dispatch.exchange_row
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off AS $$
DECLARE
    x record;
    v_outcomes json := p_outcomes;     -- settled in the first pass only
    v_want integer := p_max_jobs;      -- what is still to lease in this pass
    v_leased integer := 0;
    v_again integer;                   -- jobs that left a slot free in this pass
    v_registered boolean;
    v_probe boolean := true;           -- look for expired leases (first pass only)
    v_expired_leases boolean;
    v_models text[];
    v_durable boolean;                 -- outcomes, expired or requeued jobs: keep the durable commit
    v_channel text;                    -- the reply NOTIFY being built
    v_ids text;
    v_in_payload integer := 0;
    v_notify_channels text[];          -- the reply NOTIFYs built so far
    v_notify_payloads text[];
    v_requeued text[];
    v_back_models text[];
    v_back_channels text[];
    v_back_ids bigint[];
    v_ignored text;
BEGIN
    IF p_max_jobs IS NULL OR p_max_jobs < 0 OR p_max_jobs > 10000 THEN
        RAISE EXCEPTION 'max_jobs must be between 0 and 10000, got %', p_max_jobs USING ERRCODE = '22023';
    END IF;
    IF p_outcomes IS NOT NULL AND json_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = '22023';
    END IF;
    -- Outcomes keep the durable commit. NULL and [] settle nothing; json_array_length
    -- would parse the whole document to say so (an empty array written with spaces
    -- only costs a flush).
    v_durable := p_outcomes IS NOT NULL AND p_outcomes::text <> '[]';

    LOOP
        v_again := 0;
        v_registered := false;
        v_expired_leases := false;
        -- Rows: '_meta' first (what this function must still check), then 'stale' and
        -- 'job' rows for the caller, then the jobs that expired in the queue, the
        -- finished jobs someone waits on ('done') and the retried ('requeued'), ordered
        -- by reply channel, then the 'wake' row.
        FOR x IN
            WITH me AS MATERIALIZED (
                SELECT nd.id, nd.models, nd.last_poll_completed_at,
                       v_want > 0 AND nd.admin_state = 'active' AND nd.health = 'healthy' AS may_lease,
                       coalesce(nd.max_concurrency, st.default_slots)
                       + CASE WHEN nd.lease_ahead < 0 THEN coalesce(nd.max_concurrency, st.default_slots)
                              ELSE nd.lease_ahead END AS may_hold,
                       st.lease
                FROM dispatch.nodes nd,
                     LATERAL (SELECT make_interval(secs => max(s.value) FILTER (WHERE s.key = 'lease_seconds')) AS lease,
                                     max(s.value) FILTER (WHERE s.key = 'default_slots_per_node')::integer AS default_slots
                              FROM dispatch.settings s WHERE s.key IN ('lease_seconds', 'default_slots_per_node')) st
                WHERE nd.role_name = session_user AND nd.backend_pid = pg_backend_pid()
            ),
            -- Settle outcomes; (id, attempt) is the fencing token. id, attempt and
            -- retryable are read as text and converted only when well formed, so a
            -- malformed outcome is refused with 22023, never a cast error.
            o AS MATERIALIZED (
                SELECT CASE WHEN ltrim(r.id, '0123456789') <> '' OR length(r.id) NOT BETWEEN 1 AND 19 THEN NULL
                            WHEN length(r.id) = 19 AND r.id::numeric > 9223372036854775807 THEN NULL
                            ELSE r.id::bigint END AS id,
                       CASE WHEN ltrim(r.attempt, '0123456789') = '' AND length(r.attempt) BETWEEN 1 AND 9
                            THEN r.attempt::integer END AS attempt,
                       r.result, r.error,
                       CASE WHEN r.retryable IS NULL OR r.retryable = 'false' THEN false
                            WHEN r.retryable = 'true' THEN true END AS retryable
                FROM json_to_recordset(v_outcomes) AS r(id text, attempt text, result json, error jsonb,
                                                        retryable text)
            ),
            settled AS (
                UPDATE dispatch.jobs j SET
                    state = CASE WHEN o.error IS NULL THEN 'succeeded'
                                 WHEN j.deadline <= now() THEN 'expired'
                                 WHEN o.retryable AND j.attempt < j.max_attempts THEN 'queued'
                                 ELSE 'failed' END,
                    result = CASE WHEN o.error IS NULL THEN o.result END,
                    error = o.error,
                    run_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                                  THEN now() + dispatch._backoff(j.attempt) ELSE j.run_at END,
                    finished_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                                        AND (j.deadline IS NULL OR j.deadline > now())
                                       THEN NULL ELSE clock_timestamp() END,
                    lease_expires_at = NULL
                FROM o
                -- The ids and the node's id as values known before the scan: whatever
                -- the statistics said when the plan was made, a whole read of an index
                -- costs more than a read of the same index narrowed by them, so the
                -- scan reads the outcomes' rows or this node's leases, never every
                -- lease (see the head of 019).
                WHERE j.id = ANY (ARRAY(SELECT o2.id FROM o o2)) AND j.leased_by = (SELECT m.id FROM me m)
                  AND j.id = o.id AND j.attempt = o.attempt AND j.state = 'leased'
                RETURNING j.id, j.attempt, j.state, j.reply_channel, j.model, j.run_at
            ),
            -- Expired leases on this node's models go back before it leases more (their
            -- holders are gone or stuck); this function does that when the probe, one
            -- index range read that is empty almost always, finds any.
            blocked AS MATERIALIZED (
                SELECT EXISTS (SELECT 1 FROM dispatch.jobs j, me
                               WHERE v_probe AND me.may_lease AND j.state = 'leased' AND j.lease_expires_at < now()
                                 AND j.model = ANY (me.models)
                                 AND NOT EXISTS (SELECT 1 FROM o WHERE o.id = j.id)) AS expired_leases
            ),
            -- Lease up to what the node may hold (its slots and its lease-ahead
            -- allowance): its leases before this statement, less those it settled.
            want AS MATERIALIZED (
                SELECT CASE WHEN b.expired_leases THEN 0
                            ELSE greatest(least(v_want,
                                     me.may_hold - (SELECT count(*) FROM dispatch.jobs j
                                                    WHERE j.state = 'leased' AND j.leased_by = me.id)
                                                 + (SELECT count(*) FROM settled)), 0) END AS n
                FROM me, blocked b WHERE me.may_lease
            ),
            picked AS MATERIALIZED (
                SELECT ARRAY(
                    SELECT c.id FROM me, unnest(me.models) AS m(model)
                    CROSS JOIN LATERAL (
                        SELECT j.id, j.priority, j.run_at FROM dispatch.jobs j
                        WHERE j.state = 'queued' AND j.model = m.model AND j.run_at <= now()
                        ORDER BY j.priority DESC, j.run_at, j.id
                        LIMIT coalesce((SELECT w.n FROM want w), 0)
                        FOR UPDATE SKIP LOCKED) c
                    ORDER BY c.priority DESC, c.run_at, c.id
                    LIMIT coalesce((SELECT w.n FROM want w), 0)) AS ids
            ),
            -- Jobs whose deadline passed while queued are expired as they are met and
            -- use no slot (this function then looks again for the slots they left).
            taken AS (
                UPDATE dispatch.jobs j SET
                    state = CASE WHEN j.deadline <= now() THEN 'expired' ELSE 'leased' END,
                    attempt = CASE WHEN j.deadline <= now() THEN j.attempt ELSE j.attempt + 1 END,
                    leased_by = CASE WHEN j.deadline <= now() THEN j.leased_by ELSE me.id END,
                    lease_expires_at = CASE WHEN j.deadline <= now() THEN NULL ELSE now() + me.lease END,
                    started_at = CASE WHEN j.deadline <= now() THEN j.started_at ELSE now() END,
                    finished_at = CASE WHEN j.deadline <= now() THEN clock_timestamp() END,
                    error = CASE WHEN j.deadline <= now()
                                 THEN jsonb_build_object('code', 'deadline_exceeded',
                                                         'message', 'deadline passed while the job was queued')
                                 ELSE j.error END
                FROM picked p, me
                WHERE j.id = ANY (p.ids)
                RETURNING j.id, j.attempt, j.model, j.endpoint, j.payload, j.deadline, j.lease_expires_at,
                          j.state, j.priority, j.run_at, j.reply_channel
            )
            SELECT u.* FROM (
                SELECT 0 AS part, 0 AS priority, NULL::timestamptz AS run_at, NULL::text AS channel,
                       '_meta' AS kind, me.id::bigint AS id, NULL::integer AS attempt, NULL::text AS model,
                       NULL::text AS endpoint, NULL::json AS payload, NULL::timestamptz AS deadline,
                       NULL::timestamptz AS lease_expires_at, me.models, b.expired_leases,
                       (SELECT count(*) FROM o WHERE o.id IS NULL OR o.attempt IS NULL
                                                  OR (o.result IS NULL) = (o.error IS NULL)
                                                  OR jsonb_typeof(o.error) <> 'object' OR o.retryable IS NULL) AS malformed,
                       -- Poll stamps (for health() and nodes()) are renewed at most once a
                       -- second: a write per call would cost a row version per round trip.
                       me.may_lease AND (me.last_poll_completed_at IS NULL
                                         OR me.last_poll_completed_at < now() - interval '1 second') AS stamp
                FROM me, blocked b
                UNION ALL
                SELECT 1, 0, NULL, NULL, 'stale', o.id, o.attempt, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
                FROM o LEFT JOIN settled s ON s.id = o.id AND s.attempt = o.attempt WHERE s.id IS NULL
                UNION ALL
                SELECT 2, t.priority, t.run_at, NULL, 'job', t.id, t.attempt, t.model, t.endpoint, t.payload,
                       t.deadline, t.lease_expires_at, NULL, NULL, NULL, NULL
                FROM taken t WHERE t.state = 'leased'
                UNION ALL
                SELECT 3, 0, NULL, t.reply_channel, 'expired', t.id, t.attempt, t.model, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL
                FROM taken t WHERE t.state = 'expired'
                UNION ALL
                -- A settled job matters to this function only when someone waits on it or
                -- it goes back to the queue (the commit is durable anyway: there were outcomes).
                SELECT 3, 0, NULL, s.reply_channel, CASE WHEN s.state = 'queued' THEN 'requeued' ELSE 'done' END,
                       s.id, s.attempt, s.model, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
                FROM settled s WHERE s.reply_channel IS NOT NULL OR s.state = 'queued'
                UNION ALL
                -- When fewer than asked were leased: when to look again (NULL: on a
                -- notification). The rule of _next_wake, written out here because this
                -- statement sees the jobs as they were before it: the leases it settled
                -- are left out, the retries it queued and the leases it took added.
                SELECT 4, 0, NULL, NULL, 'wake', NULL, NULL, NULL, NULL, NULL, NULL,
                       CASE WHEN me.may_lease THEN least(
                           (SELECT min(r.run_at) FROM unnest(me.models) m(model),
                                LATERAL (SELECT j.run_at FROM dispatch.jobs j
                                         -- run_at > now() >= created_at: only jobs_delayed rows qualify.
                                         WHERE j.state = 'queued' AND j.model = m.model AND j.run_at > now()
                                           AND j.run_at > j.created_at
                                         ORDER BY j.run_at LIMIT 1) r),
                           (SELECT min(j.lease_expires_at) FROM dispatch.jobs j
                            WHERE j.state = 'leased' AND j.lease_expires_at IS NOT NULL AND j.model = ANY (me.models)
                              AND NOT EXISTS (SELECT 1 FROM settled s WHERE s.id = j.id)),
                           (SELECT min(s.run_at) FROM settled s WHERE s.state = 'queued'),
                           (SELECT min(t.lease_expires_at) FROM taken t WHERE t.state = 'leased')) END,
                       NULL, NULL, NULL, NULL
                FROM me
                WHERE v_want > 0 AND (SELECT count(*) FROM taken t WHERE t.state = 'leased') < v_want
            ) u
            ORDER BY u.part, u.priority DESC, u.run_at, u.channel, u.id
        LOOP
            CASE x.kind
            WHEN '_meta' THEN
                v_registered := true;
                v_models := x.models;
                v_expired_leases := x.expired_leases;
                IF x.malformed > 0 THEN
                    RAISE EXCEPTION 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}'
                        USING ERRCODE = '22023';
                END IF;
                IF x.stamp THEN
                    UPDATE dispatch.nodes SET last_poll_started_at = now(), last_poll_completed_at = clock_timestamp()
                    WHERE id = x.id;
                END IF;
            WHEN 'stale', 'job' THEN
                IF x.kind = 'job' THEN
                    v_leased := v_leased + 1;
                END IF;
                RETURN NEXT (x.kind, x.id, x.attempt, x.model, x.endpoint, x.payload, x.deadline,
                             x.lease_expires_at)::dispatch.exchange_row;
            WHEN 'done', 'expired' THEN
                v_durable := true;
                IF x.kind = 'expired' THEN
                    v_again := v_again + 1;
                END IF;
                -- As _notify_replies does: one NOTIFY per reply channel, ids
                -- comma-separated, at most 350 to a payload.
                IF x.channel IS NOT NULL THEN
                    IF x.channel IS DISTINCT FROM v_channel OR v_in_payload = 350 THEN
                        IF v_in_payload > 0 THEN
                            v_notify_channels := v_notify_channels || v_channel;
                            v_notify_payloads := v_notify_payloads || v_ids;
                        END IF;
                        v_channel := x.channel;
                        v_ids := x.id::text;
                        v_in_payload := 1;
                    ELSE
                        v_ids := v_ids || ',' || x.id;
                        v_in_payload := v_in_payload + 1;
                    END IF;
                END IF;
            WHEN 'requeued' THEN
                v_durable := true;
                v_requeued := v_requeued || x.model;
            WHEN 'wake' THEN
                IF v_again = 0 AND NOT v_expired_leases THEN
                    RETURN NEXT ('wake', NULL, NULL, NULL, NULL, NULL, NULL, x.lease_expires_at)::dispatch.exchange_row;
                END IF;
            END CASE;
        END LOOP;

        IF NOT v_registered THEN
            PERFORM dispatch._session_node(true);  -- raises the error that says what to do
        END IF;
        IF v_in_payload > 0 THEN
            v_notify_channels := v_notify_channels || v_channel;
            v_notify_payloads := v_notify_payloads || v_ids;
            v_channel := NULL;
            v_in_payload := 0;
        END IF;
        IF v_expired_leases THEN
            SELECT array_agg(b.model) FILTER (WHERE b.state = 'queued'),
                   array_agg(b.reply_channel) FILTER (WHERE b.state <> 'queued'),
                   array_agg(b.id) FILTER (WHERE b.state <> 'queued')
            INTO v_back_models, v_back_channels, v_back_ids
            FROM dispatch._take_back_expired(v_models, 1000) b;
            v_requeued := v_requeued || v_back_models;
            v_ignored := dispatch._notify_replies(v_back_channels, v_back_ids);
            v_durable := v_durable OR v_back_models IS NOT NULL OR v_back_ids IS NOT NULL;
            -- This pass leased nothing: lease in a second one, which does not probe
            -- again (leases another node is taking back right now stay locked to us).
            v_probe := false;
            v_again := 1;
        END IF;
        EXIT WHEN v_again = 0 OR v_leased >= p_max_jobs;
        v_outcomes := NULL;
        v_want := p_max_jobs - v_leased;
    END LOOP;

    IF v_notify_channels IS NOT NULL THEN
        PERFORM pg_notify(n.channel, n.payload) FROM unnest(v_notify_channels, v_notify_payloads) AS n(channel, payload);
    END IF;
    IF v_requeued IS NOT NULL THEN
        v_ignored := dispatch._notify_models(v_requeued);
    END IF;
    -- A round trip that settled nothing need not wait for the disk: if a crash loses
    -- it, its jobs are simply still queued (or still leased until expiry), and
    -- fencing refuses the lost attempt's results. This takes the flush off the path
    -- from submit to provider. Outcomes keep the durable commit.
    IF NOT v_durable THEN
        v_ignored := set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION dispatch.settle(p_outcomes json, p_wake boolean DEFAULT false)
RETURNS SETOF dispatch.exchange_row
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET jit = off
SET enable_seqscan = off AS $$
DECLARE
    x record;
    v_node integer;
    v_channel text;                    -- the reply NOTIFY being built
    v_ids text;
    v_in_payload integer := 0;
    v_notify_channels text[];          -- the reply NOTIFYs built so far
    v_notify_payloads text[];
    v_requeued text[];
    v_ignored text;
    v_wake timestamptz;
BEGIN
    IF p_outcomes IS NOT NULL AND json_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = '22023';
    END IF;

    -- Rows: '_meta' first (the caller's node, and whether an outcome is malformed),
    -- then 'stale' for the caller, then the settled jobs someone waits on ('done') or
    -- that go back to the queue ('requeued'), ordered by reply channel.
    FOR x IN
        WITH me AS MATERIALIZED (
            SELECT nd.id FROM dispatch.nodes nd
            WHERE nd.role_name = session_user AND nd.backend_pid = pg_backend_pid()
        ),
        o AS MATERIALIZED (
            SELECT CASE WHEN ltrim(r.id, '0123456789') <> '' OR length(r.id) NOT BETWEEN 1 AND 19 THEN NULL
                        WHEN length(r.id) = 19 AND r.id::numeric > 9223372036854775807 THEN NULL
                        ELSE r.id::bigint END AS id,
                   CASE WHEN ltrim(r.attempt, '0123456789') = '' AND length(r.attempt) BETWEEN 1 AND 9
                        THEN r.attempt::integer END AS attempt,
                   r.result, r.error,
                   CASE WHEN r.retryable IS NULL OR r.retryable = 'false' THEN false
                        WHEN r.retryable = 'true' THEN true END AS retryable
            FROM json_to_recordset(p_outcomes) AS r(id text, attempt text, result json, error jsonb, retryable text)
        ),
        settled AS (
            UPDATE dispatch.jobs j SET
                state = CASE WHEN o.error IS NULL THEN 'succeeded'
                             WHEN j.deadline <= now() THEN 'expired'
                             WHEN o.retryable AND j.attempt < j.max_attempts THEN 'queued'
                             ELSE 'failed' END,
                result = CASE WHEN o.error IS NULL THEN o.result END,
                error = o.error,
                run_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                              THEN now() + dispatch._backoff(j.attempt) ELSE j.run_at END,
                finished_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                                    AND (j.deadline IS NULL OR j.deadline > now())
                                   THEN NULL ELSE clock_timestamp() END,
                lease_expires_at = NULL
            FROM o
            -- As in exchange (see the head of 019): the ids and the node as values known
            -- before the scan, so that no plan reads a whole index.
            WHERE j.id = ANY (ARRAY(SELECT o2.id FROM o o2)) AND j.leased_by = (SELECT m.id FROM me m)
              AND j.id = o.id AND j.attempt = o.attempt AND j.state = 'leased'
            RETURNING j.id, j.attempt, j.state, j.reply_channel, j.model
        )
        SELECT u.* FROM (
            SELECT 0 AS part, NULL::text AS channel, '_meta' AS kind, me.id::bigint AS id, NULL::integer AS attempt,
                   NULL::text AS model,
                   (SELECT count(*) FROM o WHERE o.id IS NULL OR o.attempt IS NULL
                                              OR (o.result IS NULL) = (o.error IS NULL)
                                              OR jsonb_typeof(o.error) <> 'object' OR o.retryable IS NULL) AS malformed
            FROM me
            UNION ALL
            SELECT 1, NULL, 'stale', o.id, o.attempt, NULL, NULL
            FROM o LEFT JOIN settled s ON s.id = o.id AND s.attempt = o.attempt WHERE s.id IS NULL
            UNION ALL
            SELECT 2, s.reply_channel, CASE WHEN s.state = 'queued' THEN 'requeued' ELSE 'done' END,
                   s.id, s.attempt, s.model, NULL
            FROM settled s WHERE s.reply_channel IS NOT NULL OR s.state = 'queued'
        ) u
        ORDER BY u.part, u.channel, u.id
    LOOP
        CASE x.kind
        WHEN '_meta' THEN
            v_node := x.id;
            IF x.malformed > 0 THEN
                RAISE EXCEPTION 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}'
                    USING ERRCODE = '22023';
            END IF;
        WHEN 'stale' THEN
            RETURN NEXT ('stale', x.id, x.attempt, NULL, NULL, NULL, NULL, NULL)::dispatch.exchange_row;
        WHEN 'done' THEN
            IF x.channel IS DISTINCT FROM v_channel OR v_in_payload = 350 THEN
                IF v_in_payload > 0 THEN
                    v_notify_channels := v_notify_channels || v_channel;
                    v_notify_payloads := v_notify_payloads || v_ids;
                END IF;
                v_channel := x.channel;
                v_ids := x.id::text;
                v_in_payload := 1;
            ELSE
                v_ids := v_ids || ',' || x.id;
                v_in_payload := v_in_payload + 1;
            END IF;
        WHEN 'requeued' THEN
            v_requeued := v_requeued || x.model;
        END CASE;
    END LOOP;

    IF v_node IS NULL THEN
        PERFORM dispatch._session_node(true);  -- raises the error that says what to do
    END IF;
    IF v_in_payload > 0 THEN
        v_notify_channels := v_notify_channels || v_channel;
        v_notify_payloads := v_notify_payloads || v_ids;
    END IF;
    -- One statement after the settlement (whose leases it no longer counts) sends the
    -- replies and reads the wake time; the rule of _next_wake is written out here.
    IF p_wake OR v_notify_channels IS NOT NULL THEN
        SELECT (SELECT count(pg_notify(n.channel, n.payload))
                FROM unnest(v_notify_channels, v_notify_payloads) AS n(channel, payload)),
               CASE WHEN p_wake THEN (
                   SELECT CASE WHEN nd.admin_state = 'active' AND nd.health = 'healthy' THEN least(
                       (SELECT min(r.run_at) FROM unnest(nd.models) m(model),
                            LATERAL (SELECT j.run_at FROM dispatch.jobs j
                                     WHERE j.state = 'queued' AND j.model = m.model AND j.run_at > now()
                                       AND j.run_at > j.created_at
                                     ORDER BY j.run_at LIMIT 1) r),
                       (SELECT min(j.lease_expires_at) FROM dispatch.jobs j
                        WHERE j.state = 'leased' AND j.lease_expires_at IS NOT NULL
                          AND j.model = ANY (nd.models))) END
                   FROM dispatch.nodes nd WHERE nd.id = v_node) END
        INTO v_ignored, v_wake;
        IF p_wake THEN
            RETURN NEXT ('wake', NULL, NULL, NULL, NULL, NULL, NULL, v_wake)::dispatch.exchange_row;
        END IF;
    END IF;
    IF v_requeued IS NOT NULL THEN
        v_ignored := dispatch._notify_models(v_requeued);
    END IF;
    -- Nothing settled, nothing to keep: as exchange, such a call does not wait for the disk.
    IF p_outcomes IS NULL OR p_outcomes::text = '[]' THEN  -- (as in exchange)
        v_ignored := set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;
