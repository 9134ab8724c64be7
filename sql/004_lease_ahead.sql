-- 004: lease-ahead. A node may hold more leases than it has slots, so that its
-- daemon can start the next job the moment a running one ends instead of after the
-- round trip that settles it and leases the next (with an instant provider, a slot
-- sat idle for that whole round trip: bench/CHANGES.md). The daemon asks for it only
-- while its provider answers faster than two round trips; a job then waits in the
-- daemon about as long as that round trip would have made it wait anyway.
--
-- The allowance is the node's own setting (0 until set, so lease() and every other
-- caller keep to the free slots): nodes.lease_ahead, set by dispatch.set_lease_ahead
-- from the node's session. Capacity, queue limits and wake targeting still count
-- slots: a node holding more than its slots has no free slot and is woken last.

ALTER TABLE dispatch.nodes
    ADD COLUMN lease_ahead integer NOT NULL DEFAULT 0 CHECK (lease_ahead BETWEEN -1 AND 100000);

CREATE FUNCTION dispatch.set_lease_ahead(p_jobs integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE n dispatch.nodes := dispatch._session_node(true);
BEGIN
    IF p_jobs IS NULL OR p_jobs NOT BETWEEN -1 AND 100000 THEN
        RAISE EXCEPTION 'lease-ahead must be -1 (as many as the slots) or 0 to 100000 jobs, got %',
            coalesce(p_jobs::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    UPDATE dispatch.nodes SET lease_ahead = p_jobs, updated_at = now()
    WHERE id = n.id AND lease_ahead IS DISTINCT FROM p_jobs;
    RETURN p_jobs;
END
$$;
COMMENT ON FUNCTION dispatch.set_lease_ahead(integer) IS
'From a registered node''s session: how many leases beyond its slots the node may
hold (-1: as many as its slots; 0, the default: none). dispatch.exchange then leases
up to slots + this; the daemon asks for the extra only while its provider answers
faster than two database round trips, and starts those jobs as running ones end.
Kept until changed. Returns p_jobs. Example: SELECT dispatch.set_lease_ahead(-1);';
REVOKE EXECUTE ON FUNCTION dispatch.set_lease_ahead(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.set_lease_ahead(integer) TO dispatch_daemon;

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
        -- 3. Lease up to what the node may hold (its slots and its lease-ahead
        -- allowance): its leases before this call, less those settled or being
        -- taken back in it.
        want AS MATERIALIZED (
            SELECT greatest(least(p_max_jobs,
                       me.may_hold - (SELECT count(*) FROM dispatch.jobs j, expiring e
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
are leased, highest priority first, never more than the node may hold: its slots
plus its lease-ahead allowance (dispatch.set_lease_ahead; 0 unless set); the node''s
poll stamps are renewed when older than a second.
Rows: kind ''job'' for each leased job (id, attempt, model, endpoint, payload,
deadline, lease_expires_at); kind ''stale'' for an outcome refused because its
attempt no longer holds the lease (fencing); and, when fewer than p_max_jobs were
leased, one kind ''wake'' row whose lease_expires_at is the next moment to look
(NULL: wait for a notification). Waiting gateways are NOTIFYed with finished ids.
Example: SELECT * FROM dispatch.exchange(''[{"id":7,"attempt":1,"result":{"ok":true}}]'', 10);';

COMMENT ON FUNCTION dispatch.lease(integer) IS
'Leases up to p_max_jobs jobs for the calling node (never more than its free slots
plus its lease-ahead allowance, see dispatch.set_lease_ahead), for models it serves,
highest priority first, using FOR UPDATE SKIP LOCKED; takes back expired leases first.
Same as dispatch.exchange(NULL, p_max_jobs) without the wake row.
Example: SELECT * FROM dispatch.lease(4);';
