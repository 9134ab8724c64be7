-- 003: the hot paths re-planned for speed: the daemon's round trip (same contract
-- as 001), the checks of every submitted element, and no JIT anywhere.
--
-- Measured (pg_stat_statements with track_planning, auto_explain): 001's exchange
-- spent about a third of its time planning. Its lease statement joined an UPDATE to
-- a CTE under a LIMIT taken from a variable; the generic plan of that shape is a
-- hash join over a sequential scan of jobs (hundreds of ms), so the plan cache kept
-- re-planning it on every call, as it did the take-back of expired leases. Here:
--   * every statement has a generic plan that is as good as a custom one (ids are
--     picked into an array, then updated by primary key), and the function runs
--     with plan_cache_mode = force_generic_plan, so nothing is planned per call;
--   * the hot path calls no helper function (each call of a function with a SET
--     clause saves and restores settings): the node row, both settings and the
--     expired-lease probe are plain statements; helpers run only when there is
--     something for them to do (expired leases, finished jobs, retries);
--   * the node's poll stamps are written at most once a second, not per call.
-- And no function compiles its statements with LLVM: submit_many's estimated cost
-- passes jit_above_cost once the jobs table is large, and each submit then spent
-- ~100 ms in the JIT compiler for a statement that runs in well under 1 ms.
-- (A later CREATE OR REPLACE must repeat SET jit = off; catalog.sql checks it.)

CREATE OR REPLACE FUNCTION dispatch.exchange(p_outcomes json, p_max_jobs integer)
RETURNS SETOF dispatch.exchange_row
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET jit = off AS $$
DECLARE
    n dispatch.nodes;
    v_now timestamptz := now();
    v_lease interval;
    v_slots integer;
    v_out dispatch.exchange_row[] := '{}';
    v_batch dispatch.exchange_row[];
    v_ids bigint[];
    v_done_ids bigint[];
    v_done_channels text[];
    v_wake_models text[];
    v_more_ids bigint[];
    v_more_channels text[];
    v_more_models text[];
    v_free integer;
    v_leased integer := 0;
    v_want integer;
    v_malformed bigint;
    v_settled boolean := false;
BEGIN
    IF p_max_jobs IS NULL OR p_max_jobs < 0 OR p_max_jobs > 10000 THEN
        RAISE EXCEPTION 'max_jobs must be between 0 and 10000, got %', p_max_jobs USING ERRCODE = '22023';
    END IF;
    IF p_outcomes IS NOT NULL AND json_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = '22023';
    END IF;

    SELECT * INTO n FROM dispatch.nodes WHERE role_name = session_user;
    IF NOT FOUND OR n.backend_pid IS DISTINCT FROM pg_backend_pid() THEN
        n := dispatch._session_node(true);  -- raises the error that says what to do
    END IF;

    -- 1. Settle outcomes; (id, attempt) is the fencing token. id, attempt and
    -- retryable are read as text and converted only when well formed, so a
    -- malformed outcome is refused with 22023, never a cast error.
    IF p_outcomes IS NOT NULL THEN
        WITH o AS MATERIALIZED (
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
                             WHEN j.deadline <= v_now THEN 'expired'
                             WHEN o.retryable AND j.attempt < j.max_attempts THEN 'queued'
                             ELSE 'failed' END,
                result = CASE WHEN o.error IS NULL THEN o.result END,
                error = o.error,
                run_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                              THEN v_now + dispatch._backoff(j.attempt) ELSE j.run_at END,
                finished_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                                    AND (j.deadline IS NULL OR j.deadline > v_now)
                                   THEN NULL ELSE clock_timestamp() END,
                lease_expires_at = NULL
            FROM o
            WHERE j.id = o.id AND j.attempt = o.attempt AND j.state = 'leased' AND j.leased_by = n.id
            RETURNING j.id, j.attempt, j.state, j.reply_channel, j.model
        )
        SELECT array_agg(s.id) FILTER (WHERE s.state <> 'queued'),
               array_agg(s.reply_channel) FILTER (WHERE s.state <> 'queued'),
               array_agg(s.model) FILTER (WHERE s.state = 'queued'),
               array_cat(v_out, array_agg(ROW('stale', o.id, o.attempt, NULL, NULL, NULL, NULL, NULL)::dispatch.exchange_row)
                                FILTER (WHERE s.id IS NULL)),
               count(*) FILTER (WHERE o.id IS NULL OR o.attempt IS NULL OR (o.result IS NULL) = (o.error IS NULL)
                                      OR jsonb_typeof(o.error) <> 'object' OR o.retryable IS NULL)
        INTO v_done_ids, v_done_channels, v_wake_models, v_out, v_malformed
        FROM o LEFT JOIN settled s ON s.id = o.id AND s.attempt = o.attempt;
        v_settled := v_done_ids IS NOT NULL OR v_wake_models IS NOT NULL OR cardinality(v_out) > 0;
        IF v_malformed > 0 THEN
            RAISE EXCEPTION 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}'
                USING ERRCODE = '22023';
        END IF;
    END IF;

    -- 2. Lease, if this node may take work.
    IF p_max_jobs > 0 AND n.admin_state = 'active' AND n.health = 'healthy' THEN
        -- Expired leases on this node's models go back first (their holders are gone
        -- or stuck). The probe is one index range read that is empty almost always.
        v_ids := ARRAY(SELECT j.id FROM dispatch.jobs j
                       WHERE j.state = 'leased' AND j.lease_expires_at < v_now AND j.model = ANY (n.models)
                       ORDER BY j.lease_expires_at LIMIT 1000
                       FOR UPDATE SKIP LOCKED);
        IF cardinality(v_ids) > 0 THEN
            SELECT array_agg(b.id) FILTER (WHERE b.state <> 'queued'),
                   array_agg(b.reply_channel) FILTER (WHERE b.state <> 'queued'),
                   array_agg(b.model) FILTER (WHERE b.state = 'queued')
            INTO v_more_ids, v_more_channels, v_more_models
            FROM dispatch._take_back(v_ids, 'expired') b;
            v_done_ids := v_done_ids || v_more_ids;
            v_done_channels := v_done_channels || v_more_channels;
            v_wake_models := v_wake_models || v_more_models;
        END IF;

        SELECT make_interval(secs => max(s.value) FILTER (WHERE s.key = 'lease_seconds')),
               coalesce(n.max_concurrency, max(s.value) FILTER (WHERE s.key = 'default_slots_per_node')::integer)
        INTO v_lease, v_slots
        FROM dispatch.settings s WHERE s.key IN ('lease_seconds', 'default_slots_per_node');
        v_free := v_slots - (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'leased' AND j.leased_by = n.id);

        -- Jobs whose deadline passed while queued are expired as they are met, and
        -- do not use a slot; look again until the slots are used or the queue is dry.
        LOOP
            v_want := least(p_max_jobs, v_free) - v_leased;
            EXIT WHEN v_want <= 0;
            v_ids := ARRAY(
                SELECT c.id FROM unnest(n.models) AS m(model)
                CROSS JOIN LATERAL (
                    SELECT j.id, j.priority, j.run_at FROM dispatch.jobs j
                    WHERE j.state = 'queued' AND j.model = m.model AND j.run_at <= v_now
                    ORDER BY j.priority DESC, j.run_at, j.id
                    LIMIT v_want
                    FOR UPDATE SKIP LOCKED) c
                ORDER BY c.priority DESC, c.run_at, c.id
                LIMIT v_want);
            EXIT WHEN cardinality(v_ids) = 0;
            WITH taken AS (
                UPDATE dispatch.jobs j SET
                    state = CASE WHEN j.deadline <= v_now THEN 'expired' ELSE 'leased' END,
                    attempt = CASE WHEN j.deadline <= v_now THEN j.attempt ELSE j.attempt + 1 END,
                    leased_by = CASE WHEN j.deadline <= v_now THEN j.leased_by ELSE n.id END,
                    lease_expires_at = CASE WHEN j.deadline <= v_now THEN NULL ELSE v_now + v_lease END,
                    started_at = CASE WHEN j.deadline <= v_now THEN j.started_at ELSE v_now END,
                    finished_at = CASE WHEN j.deadline <= v_now THEN clock_timestamp() END,
                    error = CASE WHEN j.deadline <= v_now
                                 THEN jsonb_build_object('code', 'deadline_exceeded',
                                                         'message', 'deadline passed while the job was queued')
                                 ELSE j.error END
                WHERE j.id = ANY (v_ids)
                RETURNING j.id, j.attempt, j.model, j.endpoint, j.payload, j.deadline, j.lease_expires_at,
                          j.state, j.priority, j.run_at, j.reply_channel
            )
            SELECT array_agg(ROW('job', t.id, t.attempt, t.model, t.endpoint, t.payload, t.deadline,
                                 t.lease_expires_at)::dispatch.exchange_row
                             ORDER BY t.priority DESC, t.run_at, t.id) FILTER (WHERE t.state = 'leased'),
                   array_agg(t.id) FILTER (WHERE t.state = 'expired'),
                   array_agg(t.reply_channel) FILTER (WHERE t.state = 'expired')
            INTO v_batch, v_more_ids, v_more_channels
            FROM taken t;
            v_out := v_out || coalesce(v_batch, '{}');
            v_leased := v_leased + coalesce(cardinality(v_batch), 0);
            v_done_ids := v_done_ids || v_more_ids;
            v_done_channels := v_done_channels || v_more_channels;
            EXIT WHEN v_more_ids IS NULL;
        END LOOP;

        -- Poll stamps (for health() and nodes()) to the second: a write per call
        -- would cost a row version per round trip.
        IF n.last_poll_completed_at IS NULL OR n.last_poll_completed_at < v_now - interval '1 second' THEN
            UPDATE dispatch.nodes SET last_poll_started_at = v_now, last_poll_completed_at = clock_timestamp()
            WHERE id = n.id;
        END IF;
    END IF;

    -- A round trip that settled nothing need not wait for the disk: if a crash
    -- loses it, its jobs are simply still queued (or still leased until expiry),
    -- and fencing refuses the lost attempt's results. This takes the flush off the
    -- path from submit to provider. Settled outcomes keep the durable commit.
    IF v_done_ids IS NULL AND v_wake_models IS NULL AND NOT v_settled THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF v_done_ids IS NOT NULL THEN
        PERFORM dispatch._notify_replies(v_done_channels, v_done_ids);
    END IF;
    IF v_wake_models IS NOT NULL THEN
        PERFORM dispatch._notify_models(v_wake_models);
    END IF;

    RETURN QUERY SELECT * FROM unnest(v_out);
    IF p_max_jobs > 0 AND v_leased < p_max_jobs THEN
        RETURN NEXT ROW('wake', NULL, NULL, NULL, NULL, NULL, NULL,
                        CASE WHEN n.admin_state = 'active' AND n.health = 'healthy'
                             THEN dispatch._next_wake(n) END)::dispatch.exchange_row;
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

-- Each submit asks for its models' capacity; the statement's generic plan is as good
-- as a custom one, but the plan cache kept re-planning it (~0.2 ms per submit).
ALTER FUNCTION dispatch._capacity(text) SET plan_cache_mode = force_generic_plan;

DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'dispatch'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET jit = off', f);
    END LOOP;
END
$$;
