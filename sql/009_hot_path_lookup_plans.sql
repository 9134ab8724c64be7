-- 009: every function on a request's path finds its jobs through the primary key (or
-- another index bounded by what it asks for), however the table has grown since the
-- session planned it. 008 began this and was not enough.
--
-- A session keeps a statement's plan until the jobs table's statistics change. Planned
-- while they said the table held a few rows (a new installation that autovacuum
-- analysed early), the plans went on reading the whole table once it had grown, until
-- the next analyze: with 22,000 jobs added (tests/sql/plans.sql), one submit
-- read 42,343 rows, one exchange 110,065, one stream call and one cancel up to the
-- whole table. Sequential scans off (as 008 did for results and extend) is enough for
-- submit_many, exchange and cancel, whose lookups are by an array of ids or by one id:
-- the plans the planner has left use those as index conditions. It is not enough for a
-- join of the ids asked for to the table: on a table believed tiny, a hash or merge
-- join over a whole scan of the primary key is cheapest. extend kept such a plan (one
-- call read about 20,000 index entries; tests/sql/plans.sql, which now counts index entries
-- too), and so did stream (22,041). stream now looks up each piece's job in a LATERAL
-- subquery with LIMIT 1, which the planner cannot turn into such a join; extend runs
-- one UPDATE per id, in id order (it renews a few long jobs' leases every few seconds).
--
-- On a 200,000-job table analysed as such, the plans of submit_many and exchange with
-- sequential scans off differ only in the small tables (an index scan of nodes instead
-- of a sequential one; merge instead of hash joins to capacity_overrides); their server
-- time per call moved within the noise (bench/CHANGES.md).

ALTER FUNCTION dispatch.submit_many(json, text) SET enable_seqscan = off;
ALTER FUNCTION dispatch.exchange(json, integer) SET enable_seqscan = off;
ALTER FUNCTION dispatch.cancel(bigint, text) SET enable_seqscan = off;

CREATE OR REPLACE FUNCTION dispatch.extend(p_ids bigint[], p_attempts integer[])
RETURNS TABLE (id bigint, attempt integer, ok boolean, lease_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    n dispatch.nodes := dispatch._session_node(true);
    v_until timestamptz := now() + make_interval(secs => dispatch._setting('lease_seconds'));
    w record;
BEGIN
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_attempts) THEN
        RAISE EXCEPTION 'ids and attempts must have the same length' USING ERRCODE = '22023';
    END IF;
    -- In id order: the one lock order of every function that locks several jobs.
    FOR w IN SELECT u.id, u.attempt FROM unnest(p_ids, p_attempts) AS u(id, attempt) ORDER BY u.id LOOP
        UPDATE dispatch.jobs j SET lease_expires_at = v_until
        WHERE j.id = w.id AND j.attempt = w.attempt AND j.state = 'leased' AND j.leased_by = n.id;
        id := w.id; attempt := w.attempt; ok := FOUND;
        lease_expires_at := CASE WHEN FOUND THEN v_until END;
        RETURN NEXT;
    END LOOP;
END
$$;

COMMENT ON FUNCTION dispatch.extend(bigint[], integer[]) IS
'Renews the leases of the calling node''s long-running jobs by lease_seconds. One row
per id asked for, in id order; ok = false means that attempt no longer holds its lease
(cancelled, taken back, not this node''s): abort it.
Example: SELECT * FROM dispatch.extend(ARRAY[7], ARRAY[1]);';

CREATE OR REPLACE FUNCTION dispatch.stream(p_chunks json)
RETURNS TABLE (id bigint, attempt integer, ok boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    c record;
    v_checked boolean := false;
    v_last_id bigint;
    v_last_attempt integer;
    v_live boolean;
    v_channels text[];                 -- the NOTIFYs to send, in order
    v_payloads text[];
    v_ignored text;
BEGIN
    IF p_chunks IS NULL OR json_typeof(p_chunks) <> 'array' THEN
        RAISE EXCEPTION 'chunks must be a JSON array' USING ERRCODE = '22023';
    END IF;
    -- Losing these on a crash is acceptable (see 002); waiting for fsync is not.
    v_ignored := set_config('synchronous_commit', 'off', true);

    FOR c IN
        SELECT r.id, r.attempt, r.seq, r.more, r.data, me.node_id IS NOT NULL AS registered,
               j.held IS NOT NULL AS live, j.reply_channel,
               coalesce(j.stream_token, '') AS token
        FROM ROWS FROM (json_to_recordset(p_chunks)
                 AS (id bigint, attempt integer, seq integer, more boolean, data text)) WITH ORDINALITY
                 AS r(id, attempt, seq, more, data, ord)
        CROSS JOIN (SELECT (SELECT nd.id FROM dispatch.nodes nd
                            WHERE nd.role_name = session_user AND nd.backend_pid = pg_backend_pid()) AS node_id) me
        LEFT JOIN LATERAL (SELECT true AS held, jb.reply_channel, jb.stream_token FROM dispatch.jobs jb
                           WHERE jb.id = r.id AND jb.attempt = r.attempt AND jb.state = 'leased'
                             AND jb.leased_by = me.node_id
                           LIMIT 1) j ON true
        ORDER BY r.id, r.attempt, r.ord
    LOOP
        IF NOT v_checked THEN
            IF NOT c.registered THEN
                PERFORM dispatch._session_node(true);  -- raises the error that says what to do
            END IF;
            v_checked := true;
        END IF;
        IF c.id IS NULL OR c.attempt IS NULL OR c.seq IS NULL OR c.seq < 0 OR c.data IS NULL
           OR octet_length(c.data) > 7000 THEN
            RAISE EXCEPTION 'each chunk must be {"id", "attempt", "seq" >= 0, "more": bool, "data": text of at most 7000 bytes}'
                USING ERRCODE = '22023';
        END IF;
        IF c.id IS DISTINCT FROM v_last_id OR c.attempt IS DISTINCT FROM v_last_attempt THEN
            IF v_last_id IS NOT NULL THEN
                id := v_last_id; attempt := v_last_attempt; ok := v_live;
                RETURN NEXT;
            END IF;
            v_live := c.live;
            v_last_id := c.id;
            v_last_attempt := c.attempt;
        END IF;
        IF c.live AND c.reply_channel IS NOT NULL THEN
            v_channels := v_channels || c.reply_channel;
            v_payloads := v_payloads || format('S%s:%s:%s:%s:%s', c.id, c.seq,
                                               CASE WHEN c.more THEN 'm' ELSE 'e' END, c.token, c.data);
        END IF;
    END LOOP;
    IF NOT v_checked THEN
        PERFORM dispatch._session_node(true);  -- an empty batch: only check the caller
    END IF;
    IF v_channels IS NOT NULL THEN
        PERFORM pg_notify(n.channel, n.payload) FROM unnest(v_channels, v_payloads) AS n(channel, payload);
    END IF;
    IF v_last_id IS NOT NULL THEN
        id := v_last_id; attempt := v_last_attempt; ok := v_live;
        RETURN NEXT;
    END IF;
END
$$;
