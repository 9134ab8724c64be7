-- 003: the hot paths made cheap (same contracts as 001): the daemon's round trip,
-- the submit, and no JIT anywhere.
--
-- Measured with pg_stat_statements (track = all, track_planning), auto_explain and
-- perf (bench/CHANGES.md has the numbers):
--   * 001's exchange was re-planned on every call: its lease statement (an UPDATE
--     joined to a CTE under a LIMIT taken from a variable) has a generic plan of a
--     hash join over a sequential scan of jobs, so the plan cache kept making custom
--     plans. Ids are now picked into an array and updated by primary key, and the
--     function runs with plan_cache_mode = force_generic_plan.
--   * Every statement is an executor start and a count in pg_stat_statements:
--     exchange is now one statement (001: about eleven, counting the helpers it
--     called), submit_many one (001: about twelve). Capacity and serving nodes are
--     views, planned into the statement that reads them.
--   * The node's poll stamps are written at most once a second, not per call.
--   * A submit wakes only as many nodes as it brought jobs (see submit_many).
--   * No function compiles its statements with LLVM: submit_many's estimated cost
--     passes jit_above_cost once the jobs table is large, and each submit then spent
--     ~100 ms in the JIT compiler for a statement that runs in well under 1 ms.
--     (A later CREATE OR REPLACE must repeat SET jit = off; catalog.sql checks it.)

CREATE OR REPLACE FUNCTION dispatch.exchange(p_outcomes json, p_max_jobs integer)
RETURNS SETOF dispatch.exchange_row
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET jit = off AS $$
DECLARE
    v_row dispatch.exchange_row;
    v_registered boolean := false;
    v_leased integer := 0;
    v_again bigint := 0;
    v_malformed bigint := 0;
BEGIN
    IF p_max_jobs IS NULL OR p_max_jobs < 0 OR p_max_jobs > 10000 THEN
        RAISE EXCEPTION 'max_jobs must be between 0 and 10000, got %', p_max_jobs USING ERRCODE = '22023';
    END IF;
    IF p_outcomes IS NOT NULL AND json_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = '22023';
    END IF;

    -- One statement does the whole round trip; the rows it returns are the caller's,
    -- except one '_meta' row that reports what this function must still check.
    FOR v_row IN
        WITH me AS MATERIALIZED (
            SELECT nd AS node, nd.id, nd.models, nd.last_poll_completed_at,
                   p_max_jobs > 0 AND nd.admin_state = 'active' AND nd.health = 'healthy' AS may_lease,
                   coalesce(nd.max_concurrency, st.default_slots) AS slots, st.lease
            FROM dispatch.nodes nd,
                 LATERAL (SELECT make_interval(secs => max(s.value) FILTER (WHERE s.key = 'lease_seconds')) AS lease,
                                 max(s.value) FILTER (WHERE s.key = 'default_slots_per_node')::integer AS default_slots
                          FROM dispatch.settings s WHERE s.key IN ('lease_seconds', 'default_slots_per_node')) st
            WHERE nd.role_name = session_user AND nd.backend_pid = pg_backend_pid()
        ),
        -- 1. Settle outcomes; (id, attempt) is the fencing token. id, attempt and
        -- retryable are read as text and converted only when well formed, so a
        -- malformed outcome is refused with 22023, never a cast error.
        o AS MATERIALIZED (
            SELECT CASE WHEN r.id !~ '^\d{1,19}$' THEN NULL
                        WHEN r.id::numeric > 9223372036854775807 THEN NULL ELSE r.id::bigint END AS id,
                   CASE WHEN r.attempt ~ '^\d{1,9}$' THEN r.attempt::integer END AS attempt,
                   r.result, r.error,
                   CASE WHEN r.retryable IS NULL OR r.retryable = 'false' THEN false
                        WHEN r.retryable = 'true' THEN true END AS retryable
            FROM json_to_recordset(p_outcomes) AS r(id text, attempt text, result json, error jsonb,
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
            FROM o, me
            WHERE j.id = o.id AND j.attempt = o.attempt AND j.state = 'leased' AND j.leased_by = me.id
            RETURNING j.id, j.attempt, j.state, j.reply_channel, j.model, j.run_at
        ),
        -- 2. Expired leases on this node's models go back first (their holders are
        -- gone or stuck). The probe is one index range read that is empty almost
        -- always; an attempt settled in this same call is the caller's, not expired.
        expiring AS MATERIALIZED (
            SELECT ARRAY(SELECT j.id FROM dispatch.jobs j, me
                         WHERE me.may_lease AND j.state = 'leased' AND j.lease_expires_at < now()
                           AND j.model = ANY (me.models)
                           AND NOT EXISTS (SELECT 1 FROM o WHERE o.id = j.id)
                         ORDER BY j.lease_expires_at LIMIT 1000
                         FOR UPDATE OF j SKIP LOCKED) AS ids
        ),
        taken_back AS MATERIALIZED (
            SELECT b.* FROM expiring e, LATERAL dispatch._take_back(e.ids, 'expired') b
            WHERE cardinality(e.ids) > 0
        ),
        -- 3. Lease up to the free slots: the node's leases before this call, less
        -- those settled or being taken back in it.
        want AS MATERIALIZED (
            SELECT greatest(least(p_max_jobs,
                       me.slots - (SELECT count(*) FROM dispatch.jobs j, expiring e
                                   WHERE j.state = 'leased' AND j.leased_by = me.id AND j.id <> ALL (e.ids))
                                + (SELECT count(*) FROM settled)), 0) AS n
            FROM me WHERE me.may_lease
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
        -- use no slot (the function then looks again for the slots they left, as it
        -- does for leases it took back: those are queued once this statement ends).
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
        ),
        -- Poll stamps (for health() and nodes()) to the second: a write per call
        -- would cost a row version per round trip.
        stamped AS (
            UPDATE dispatch.nodes nd SET last_poll_started_at = now(), last_poll_completed_at = clock_timestamp()
            FROM me
            WHERE nd.id = me.id AND me.may_lease
              AND (me.last_poll_completed_at IS NULL OR me.last_poll_completed_at < now() - interval '1 second')
        ),
        -- 4. Wake whom it concerns: gateways waiting on finished jobs, daemons for
        -- jobs that went back to the queue.
        finished AS MATERIALIZED (
            SELECT s.id, s.reply_channel FROM settled s WHERE s.state <> 'queued'
            UNION ALL SELECT b.id, b.reply_channel FROM taken_back b WHERE b.state <> 'queued'
            UNION ALL SELECT t.id, t.reply_channel FROM taken t WHERE t.state = 'expired'
        ),
        requeued AS MATERIALIZED (
            SELECT s.model FROM settled s WHERE s.state = 'queued'
            UNION ALL SELECT b.model FROM taken_back b WHERE b.state = 'queued'
        ),
        -- As _notify_replies does: one NOTIFY per reply channel, ids comma-separated,
        -- at most 350 to a payload (written out: a function call is one more statement).
        told AS MATERIALIZED (
            SELECT pg_notify(x.channel, x.ids) FROM (
                SELECT f.channel, string_agg(f.id::text, ',' ORDER BY f.id) AS ids
                FROM (SELECT d.reply_channel AS channel, d.id,
                             (row_number() OVER (PARTITION BY d.reply_channel ORDER BY d.id) - 1) / 350 AS chunk
                      FROM finished d WHERE d.reply_channel IS NOT NULL) f
                GROUP BY f.channel, f.chunk) x
            UNION ALL
            SELECT dispatch._notify_models(array_agg(q.model)) FROM requeued q HAVING count(*) > 0
            -- A round trip that settled nothing need not wait for the disk: if a
            -- crash loses it, its jobs are simply still queued (or still leased until
            -- expiry), and fencing refuses the lost attempt's results. This takes the
            -- flush off the path from submit to provider. Outcomes keep the durable commit.
            UNION ALL
            SELECT NULL FROM (SELECT set_config('synchronous_commit', 'off', true)) x
            WHERE NOT EXISTS (SELECT 1 FROM o) AND NOT EXISTS (SELECT 1 FROM finished)
              AND NOT EXISTS (SELECT 1 FROM requeued)
        ),
        counts AS MATERIALIZED (
            SELECT (SELECT count(*) FROM taken t WHERE t.state = 'leased') AS leased,
                   -- Jobs met expired in the queue, or taken back to it: look again.
                   (SELECT count(*) FROM taken t WHERE t.state = 'expired')
                   + (SELECT count(*) FROM taken_back b WHERE b.state = 'queued') AS again,
                   (SELECT count(*) FROM o WHERE o.id IS NULL OR o.attempt IS NULL
                                              OR (o.result IS NULL) = (o.error IS NULL)
                                              OR jsonb_typeof(o.error) <> 'object' OR o.retryable IS NULL) AS malformed,
                   (SELECT count(*) FROM told) AS told
        )
        SELECT u.kind, u.id, u.attempt, u.model, u.endpoint, u.payload, u.deadline, u.lease_expires_at FROM (
            SELECT 1 AS part, 0 AS priority, NULL::timestamptz AS run_at, 'stale' AS kind, o.id, o.attempt,
                   NULL::text AS model, NULL::text AS endpoint, NULL::json AS payload, NULL::timestamptz AS deadline,
                   NULL::timestamptz AS lease_expires_at
            FROM o LEFT JOIN settled s ON s.id = o.id AND s.attempt = o.attempt WHERE s.id IS NULL
            UNION ALL
            SELECT 2, t.priority, t.run_at, 'job', t.id, t.attempt, t.model, t.endpoint, t.payload, t.deadline,
                   t.lease_expires_at
            FROM taken t WHERE t.state = 'leased'
            UNION ALL
            -- When fewer than p_max_jobs were leased: when to look again (NULL: on a
            -- notification). If jobs were met expired or taken back, the function
            -- looks again itself.
            -- The rule of _next_wake, written out here because this statement sees
            -- the jobs as they were before it: the leases it settled or took back
            -- are left out, the retries it queued and the leases it took added.
            SELECT 3, 0, NULL, 'wake', NULL, NULL, NULL, NULL, NULL, NULL,
                   CASE WHEN me.may_lease THEN least(
                       (SELECT min(r.run_at) FROM unnest(me.models) m(model),
                            LATERAL (SELECT j.run_at FROM dispatch.jobs j
                                     -- run_at > now() >= created_at: only jobs_delayed rows qualify.
                                     WHERE j.state = 'queued' AND j.model = m.model AND j.run_at > now()
                                       AND j.run_at > j.created_at
                                     ORDER BY j.run_at LIMIT 1) r),
                       (SELECT min(j.lease_expires_at) FROM dispatch.jobs j
                        WHERE j.state = 'leased' AND j.model = ANY (me.models)
                          AND NOT EXISTS (SELECT 1 FROM settled s WHERE s.id = j.id)
                          AND NOT EXISTS (SELECT 1 FROM taken_back b WHERE b.id = j.id)),
                       (SELECT min(s.run_at) FROM settled s WHERE s.state = 'queued'),
                       (SELECT min(t.lease_expires_at) FROM taken t WHERE t.state = 'leased')) END
            FROM me, counts c
            WHERE p_max_jobs > 0 AND c.leased < p_max_jobs AND c.again = 0
            UNION ALL
            SELECT 4, 0, NULL, '_meta', c.again, c.malformed::integer, NULL, NULL, NULL, NULL, NULL
            FROM me, counts c
        ) u
        ORDER BY u.part, u.priority DESC, u.run_at, u.id
    LOOP
        IF v_row.kind = '_meta' THEN
            v_registered := true;
            v_again := v_row.id;
            v_malformed := v_row.attempt;
        ELSE
            IF v_row.kind = 'job' THEN
                v_leased := v_leased + 1;
            END IF;
            RETURN NEXT v_row;
        END IF;
    END LOOP;

    IF NOT v_registered THEN
        PERFORM dispatch._session_node(true);  -- raises the error that says what to do
    END IF;
    IF v_malformed > 0 THEN
        RAISE EXCEPTION 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}'
            USING ERRCODE = '22023';
    END IF;
    IF v_again > 0 AND v_leased < p_max_jobs THEN
        RETURN QUERY SELECT * FROM dispatch.exchange(NULL, p_max_jobs - v_leased);
    END IF;
END
$$;
COMMENT ON FUNCTION dispatch.exchange(json, integer) IS
'The daemon''s round trip, one transaction. p_outcomes is a JSON array of finished
attempts: {"id", "attempt", "result": <provider JSON>} or {"id", "attempt",
"error": {"code", "message", "status", ...}, "retryable": bool}. A retryable error
goes back to the queue with exponential backoff while attempts remain; others end
as failed (expired when the deadline passed). Then, while the node is active and
healthy, expired leases on its models are taken back and up to p_max_jobs jobs
(never more than its free slots) are leased, highest priority first; the node''s
poll stamps are renewed when older than a second.
Rows: kind ''job'' for each leased job (id, attempt, model, endpoint, payload,
deadline, lease_expires_at); kind ''stale'' for an outcome refused because its
attempt no longer holds the lease (fencing); and, when fewer than p_max_jobs were
leased, one kind ''wake'' row whose lease_expires_at is the next moment to look
(NULL: wait for a notification). Waiting gateways are NOTIFYed with finished ids.
Example: SELECT * FROM dispatch.exchange(''[{"id":7,"attempt":1,"result":{"ok":true}}]'', 10);';

-- submit_many checks each element here. A bare CASE is a plpgsql simple expression,
-- evaluated without the executor; 001's RETURN (SELECT CASE ...) ran a statement
-- per element (~0.09 ms each, and counted by pg_stat_statements).
CREATE OR REPLACE FUNCTION dispatch._request_problem(r json) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    RETURN CASE
        WHEN json_typeof(r) IS DISTINCT FROM 'object' THEN 'each request must be a JSON object'
        WHEN json_typeof(r->'model') IS DISTINCT FROM 'string' OR length(r->>'model') NOT BETWEEN 1 AND 256
            THEN 'model must be a string of 1 to 256 characters'
        WHEN r->'endpoint' IS NOT NULL AND json_typeof(r->'endpoint') <> 'null'
             AND (json_typeof(r->'endpoint') <> 'string'
             OR (r->>'endpoint') !~ '^/[A-Za-z0-9/_.-]{0,255}$')
            THEN 'endpoint must be a path such as /v1/chat/completions'
        WHEN r->'payload' IS NULL OR json_typeof(r->'payload') = 'null' THEN 'payload is required'
        WHEN r->'priority' IS NOT NULL AND json_typeof(r->'priority') <> 'null'
             AND NOT (json_typeof(r->'priority') = 'number' AND (r->>'priority') ~ '^-?\d{1,9}$')
            THEN 'priority must be an integer'
        WHEN r->'timeout_ms' IS NOT NULL AND json_typeof(r->'timeout_ms') <> 'null'
             AND NOT (json_typeof(r->'timeout_ms') = 'number' AND (r->>'timeout_ms') ~ '^\d{1,12}$'
                      AND (r->>'timeout_ms')::bigint > 0)
            THEN 'timeout_ms must be a positive integer'
        WHEN r->'max_attempts' IS NOT NULL AND json_typeof(r->'max_attempts') <> 'null'
             AND NOT (json_typeof(r->'max_attempts') = 'number' AND (r->>'max_attempts') ~ '^\d{1,3}$'
                      AND (r->>'max_attempts')::integer BETWEEN 1 AND 100)
            THEN 'max_attempts must be an integer from 1 to 100'
        WHEN r->'idempotency_key' IS NOT NULL AND json_typeof(r->'idempotency_key') <> 'null'
             AND (json_typeof(r->'idempotency_key') <> 'string' OR length(r->>'idempotency_key') NOT BETWEEN 1 AND 255)
            THEN 'idempotency_key must be a string of 1 to 255 characters'
        WHEN r->'stream_token' IS NOT NULL AND json_typeof(r->'stream_token') <> 'null'
             AND (json_typeof(r->'stream_token') <> 'string' OR (r->>'stream_token') !~ '^[A-Za-z0-9]{8,64}$')
            THEN 'stream_token must be 8 to 64 letters and digits'
    END;
END
$$;


-- The submit path in fewer statements (each one an executor start, and a count in
-- pg_stat_statements): settings are joined, not fetched one call at a time, and
-- submit_many is one statement that also wakes the daemons.
-- Serving nodes and capacity as views: a view is planned into the statement that
-- reads it, where each function call is a statement of its own (an executor start
-- and a count in pg_stat_statements). The functions stay for their other callers.
CREATE VIEW dispatch.serving_nodes AS
SELECT n.id, n.models,
       coalesce(n.max_concurrency,
                (SELECT s.value FROM dispatch.settings s WHERE s.key = 'default_slots_per_node')::integer) AS slots,
       n.max_concurrency IS NOT NULL AS reported
FROM dispatch.nodes n
WHERE n.admin_state = 'active' AND n.health = 'healthy' AND n.backend_pid IS NOT NULL
  AND dispatch._node_live(n.id, n.backend_pid);
COMMENT ON VIEW dispatch.serving_nodes IS
'Internal: nodes that can take work now (live, active, healthy) with their slot counts.';

CREATE VIEW dispatch.model_capacity AS
SELECT p.model,
       CASE WHEN o.capacity IS NOT NULL THEN o.capacity
            WHEN p.live_nodes = 0
            THEN (SELECT s.value FROM dispatch.settings s WHERE s.key = 'fallback_capacity')::integer
            ELSE p.slots END AS capacity,
       CASE WHEN o.capacity IS NOT NULL THEN 'override'
            WHEN p.live_nodes = 0 THEN 'fallback'
            WHEN p.unreported = 0 THEN 'reported'
            ELSE 'mixed' END AS tier,
       p.live_nodes
FROM (SELECT k.model,
             count(sn.id)::integer AS live_nodes,
             count(sn.id) FILTER (WHERE NOT sn.reported)::integer AS unreported,
             coalesce(sum(sn.slots), 0)::integer AS slots
      FROM (SELECT unnest(n.models) AS model FROM dispatch.nodes n
            UNION SELECT c.model FROM dispatch.capacity_overrides c) k
      LEFT JOIN dispatch.serving_nodes sn ON k.model = ANY (sn.models)
      GROUP BY k.model) p
LEFT JOIN dispatch.capacity_overrides o ON o.model = p.model;
COMMENT ON VIEW dispatch.model_capacity IS
'Internal: capacity and its tier for every known model: override, reported, mixed, fallback.';

CREATE OR REPLACE FUNCTION dispatch._serving_nodes()
RETURNS TABLE (id integer, models text[], slots integer, reported boolean)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT s.id, s.models, s.slots, s.reported FROM dispatch.serving_nodes s;
END
$$;

CREATE OR REPLACE FUNCTION dispatch._capacity(p_only_model text)
RETURNS TABLE (model text, capacity integer, tier text, live_nodes integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET jit = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.model, c.capacity, c.tier, c.live_nodes FROM dispatch.model_capacity c
    WHERE p_only_model IS NULL OR c.model = p_only_model;
END
$$;

CREATE OR REPLACE FUNCTION dispatch.submit_many(p_requests json, p_reply_channel text DEFAULT NULL)
RETURNS TABLE (idx integer, id bigint, sqlstate text, message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
        parsed AS MATERIALIZED (
            SELECT e.ord::integer AS idx, dispatch._request_problem(e.r) AS problem,
                   e.r->>'model' AS model, coalesce(e.r->>'endpoint', '/v1/chat/completions') AS endpoint,
                   e.r->'payload' AS payload, e.r->>'idempotency_key' AS idempotency_key, e.r
            FROM json_array_elements(p_requests) WITH ORDINALITY AS e(r, ord)
        ),
        good AS MATERIALIZED (
            SELECT p.idx, p.model, p.endpoint, p.payload, p.idempotency_key, p.r->>'stream_token' AS stream_token,
                   coalesce((p.r->>'priority')::integer, 0) AS priority,
                   (p.r->>'timeout_ms')::bigint AS timeout_ms,
                   coalesce((p.r->>'max_attempts')::integer, st.default_attempts) AS max_attempts
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

DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'dispatch'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
    END LOOP;
END
$$;
