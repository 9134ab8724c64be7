-- 019: each index over leased jobs serves the statements that name its column.
--
-- jobs_leased_by (leased_by) and jobs_lease_expiry (lease_expires_at) indexed the same
-- rows, WHERE state = 'leased', so any statement that says state = 'leased' could read
-- either one whole. A daemon's session plans exchange once, at its first call, when
-- the statistics say almost no job is leased; a whole read of an index the statistics
-- call empty then costs the planner less than a descent of the primary key, and the
-- generic plan kept: the settlement joined its outcomes with every lease of every
-- node (a hash join over a whole read of jobs_leased_by) instead of looking each up by
-- id, the expired-lease probe read jobs_leased_by whole and filtered on
-- lease_expires_at, and the count of the node's own leases read jobs_lease_expiry
-- whole and filtered on leased_by. Each read grew with the number of daemons and with
-- the index entries of settled leases not yet cleaned up: with 8 daemons (bench B8)
-- 68 + 25 index entries and 26 + 14 heap rows per job.
--
-- Each index now also requires its own column to be set (a leased job always has both:
-- the two statements that lease, exchange's and a push's, set them), so the planner
-- can use it only for a statement that constrains that column: the probe reads the
-- expired range of jobs_lease_expiry, the count the node's range of jobs_leased_by.
-- The statements that read every lease of a model with no condition on either column
-- now say lease_expires_at IS NOT NULL or leased_by IS NOT NULL (the wake time in
-- exchange and _next_wake, capacity(), queues()). CREATE INDEX locks out writes to
-- dispatch.jobs while it reads the table.
--
-- The settlement joined its outcomes with a whole read of jobs_leased_by; it now also
-- names the outcomes' ids and the node's id as values (ARRAY(...), a scalar subquery),
-- so that every index it could use has a narrowed read that costs less than a whole
-- one. Hiding its state test from the partial indexes instead (IS TRUE) made it read the
-- primary key whole: on a table of a few rows a whole read of any index looks as cheap
-- as a lookup (tests/sql/plans.sql plans on three jobs).

SET LOCAL search_path = pg_catalog, pg_temp;

DROP INDEX dispatch.jobs_leased_by;
CREATE INDEX jobs_leased_by ON dispatch.jobs (leased_by) WHERE state = 'leased' AND leased_by IS NOT NULL;
DROP INDEX dispatch.jobs_lease_expiry;
CREATE INDEX jobs_lease_expiry ON dispatch.jobs (lease_expires_at)
    WHERE state = 'leased' AND lease_expires_at IS NOT NULL;

CREATE OR REPLACE FUNCTION dispatch._next_wake(n dispatch.nodes) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    RETURN (SELECT least(
        (SELECT min(r.run_at) FROM unnest(n.models) m(model),
             LATERAL (SELECT j.run_at FROM dispatch.jobs j
                      -- run_at > now() >= created_at: only jobs_delayed rows qualify.
                      WHERE j.state = 'queued' AND j.model = m.model AND j.run_at > now()
                        AND j.run_at > j.created_at
                      ORDER BY j.run_at LIMIT 1) r),
        (SELECT min(j.lease_expires_at) FROM dispatch.jobs j
         WHERE j.state = 'leased' AND j.lease_expires_at IS NOT NULL AND j.model = ANY (n.models))));
END
$$;

CREATE OR REPLACE FUNCTION dispatch.capacity()
RETURNS TABLE (model text, capacity integer, tier text, live_nodes integer,
               in_flight integer, queued bigint, queue_limit bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.model, c.capacity, c.tier, c.live_nodes,
           (SELECT count(*) FROM dispatch.jobs j
            WHERE j.state = 'leased' AND j.leased_by IS NOT NULL AND j.model = c.model)::integer,
           (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'queued' AND j.model = c.model),
           (c.capacity * dispatch._setting('queue_depth_per_slot'))::bigint
    FROM dispatch._capacity(NULL) c
    ORDER BY c.model;
END
$$;

CREATE OR REPLACE FUNCTION dispatch.queues()
RETURNS TABLE (model text, queued bigint, ready bigint, leased bigint, oldest_ready_at timestamptz,
               capacity integer, tier text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT q.model, q.queued, q.ready, q.leased, q.oldest_ready_at, c.capacity, c.tier
    FROM (SELECT j.model,
                 count(*) FILTER (WHERE j.state = 'queued') AS queued,
                 count(*) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS ready,
                 count(*) FILTER (WHERE j.state = 'leased') AS leased,
                 min(j.run_at) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS oldest_ready_at
          FROM dispatch.jobs j
          WHERE j.state = 'queued' OR (j.state = 'leased' AND j.leased_by IS NOT NULL)
          GROUP BY j.model) q
    LEFT JOIN dispatch._capacity(NULL) c ON c.model = q.model
    ORDER BY q.model;
END
$$;

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
    v_durable := coalesce(json_array_length(p_outcomes), 0) > 0;

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
