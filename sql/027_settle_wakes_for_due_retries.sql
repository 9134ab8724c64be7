-- 027: settle's wake row counts the retries that are already due.
--
-- A daemon that knows its queue is empty settles with dispatch.settle, and asks for a
-- wake row when it has a wake pending (023): the row replaces that wake. settle took
-- exchange's rule for it, the earliest retry still to come (run_at > now()) or lease
-- to run out; but exchange leases what is due before it reads the rule, and settle
-- leases nothing. So a retry that came due between the daemon's last exchange and the
-- settle was in neither: the row said there was nothing to wait for, the daemon
-- dropped the wake it held for that very retry, and the job stayed queued until its
-- deadline with a live node idle beside it (tests/integration/test_faults.py, the
-- provider dying mid-response for four jobs: two of them expired after 20 s). Now the
-- rule takes the earliest retry whether due or not; one that is due gives a time in
-- the past, and the daemon exchanges at once. The retries are read from jobs_delayed,
-- which holds only those (run_at > created_at), as before.

SET LOCAL search_path = pg_catalog, pg_temp;

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
                            -- Due ones too (the reason for 027): this call leases nothing.
                            LATERAL (SELECT j.run_at FROM dispatch.jobs j
                                     WHERE j.state = 'queued' AND j.model = m.model
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

COMMENT ON FUNCTION dispatch.settle(json, boolean) IS
'The daemon''s round trip when it has nothing to lease: settles finished attempts as
dispatch.exchange does (same outcome format, fencing by (id, attempt) and node, retries
with backoff, reply NOTIFYs to waiting gateways) and leases nothing. Rows: kind ''stale''
for each outcome refused because its attempt no longer holds the lease; with p_wake,
then one kind ''wake'' row whose lease_expires_at is the next moment to look: the
earliest retry on the node''s models (in the past when one is already due: look now) or
lease on them to run out (NULL: wait for a notification; always NULL while the node is
drained, disabled or degraded).
Example: SELECT * FROM dispatch.settle(''[{"id":7,"attempt":1,"result":{"ok":true}}]'', true);';
