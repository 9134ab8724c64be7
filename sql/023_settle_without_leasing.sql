-- 023: a daemon that knows its queue is empty settles without leasing.
--
-- Under light load a daemon's job usually comes as a push (015) or through an exchange
-- that found fewer jobs than it asked for; when the job ended, the daemon reported it
-- with dispatch.exchange, which also looked for work: it probed for expired leases,
-- counted the node's leases, read the queue of each of its models and worked out the
-- next wake time. On an empty queue all of that finds nothing, and the executor still
-- set up every part of exchange's one statement. Counted with callgrind
-- (bench/sqlcost.py, a job leased and then settled under light load): 3.13 million
-- instructions with exchange settling it, 2.32 million with dispatch.settle, which
-- settles outcomes and nothing else: 0.81 million fewer on the path of every request
-- whose result a client waits for.
--
-- The daemon calls settle only while it knows there is nothing to lease: its last
-- exchange found fewer jobs than it asked for and no notification or timer has told
-- it otherwise since (daemon/loop.c, queue_seen_empty). Every way a job becomes
-- leasable wakes it: a submit's, retry's, take-back's or re-enable's NOTIFY on the
-- model's channel, and the wake time of exchange's last answer (delayed jobs, leases
-- running out). That wake time counted the node's own leases, which a settle may end:
-- a daemon with a wake pending asks settle for a fresh one (p_wake), so that it does
-- not look at the queue a lease period after its last job for nothing (an idle
-- daemon runs no statement).
--
-- The settlement is exchange's (019): the same fence by (id, attempt) and by the
-- caller's node, the same outcome rules, the same reply NOTIFYs (one per channel,
-- at most 350 ids to a payload) and the same wake of the model's nodes for a retry;
-- exchange(outcomes, 0) keeps its meaning.

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE FUNCTION dispatch.settle(p_outcomes json, p_wake boolean DEFAULT false)
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
    -- A statement of its own, after the settlement, so that it sees the jobs as this
    -- call leaves them (the leases it settled no longer count).
    IF p_wake THEN
        RETURN NEXT ('wake', NULL, NULL, NULL, NULL, NULL, NULL,
                     (SELECT CASE WHEN nd.admin_state = 'active' AND nd.health = 'healthy' THEN dispatch._next_wake(nd) END
                      FROM dispatch.nodes nd WHERE nd.id = v_node))::dispatch.exchange_row;
    END IF;
    IF v_in_payload > 0 THEN
        v_notify_channels := v_notify_channels || v_channel;
        v_notify_payloads := v_notify_payloads || v_ids;
    END IF;
    IF v_notify_channels IS NOT NULL THEN
        PERFORM pg_notify(n.channel, n.payload) FROM unnest(v_notify_channels, v_notify_payloads) AS n(channel, payload);
    END IF;
    IF v_requeued IS NOT NULL THEN
        v_ignored := dispatch._notify_models(v_requeued);
    END IF;
    -- Nothing settled, nothing to keep: as exchange, such a call does not wait for the disk.
    IF coalesce(json_array_length(p_outcomes), 0) = 0 THEN
        v_ignored := set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;
COMMENT ON FUNCTION dispatch.settle(json, boolean) IS
'The daemon''s round trip when it has nothing to lease: settles finished attempts as
dispatch.exchange does (same outcome format, fencing by (id, attempt) and node, retries
with backoff, reply NOTIFYs to waiting gateways) and leases nothing. Rows: kind ''stale''
for each outcome refused because its attempt no longer holds the lease; with p_wake,
then one kind ''wake'' row whose lease_expires_at is the next moment to look, as
exchange''s (NULL: wait for a notification; always NULL while the node is drained,
disabled or degraded).
Example: SELECT * FROM dispatch.settle(''[{"id":7,"attempt":1,"result":{"ok":true}}]'', true);';
REVOKE EXECUTE ON FUNCTION dispatch.settle(json, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.settle(json, boolean) TO dispatch_daemon;
