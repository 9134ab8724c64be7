-- 006: dispatch.stream in two statements per call. It ran one statement per piece
-- (PERFORM pg_notify) and one per job (the lease check) besides finding the node,
-- each an executor start: at 200 concurrent streams the relay is ~9,000 pieces a
-- second through this function. Now one statement reads the pieces joined to the
-- jobs they belong to, and one sends all of the call's NOTIFYs, in the pieces' order.

CREATE OR REPLACE FUNCTION dispatch.stream(p_chunks json)
RETURNS TABLE (id bigint, attempt integer, ok boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
               j.id IS NOT NULL AS live, j.reply_channel, coalesce(j.stream_token, '') AS token
        FROM ROWS FROM (json_to_recordset(p_chunks)
                 AS (id bigint, attempt integer, seq integer, more boolean, data text)) WITH ORDINALITY
                 AS r(id, attempt, seq, more, data, ord)
        CROSS JOIN (SELECT (SELECT nd.id FROM dispatch.nodes nd
                            WHERE nd.role_name = session_user AND nd.backend_pid = pg_backend_pid()) AS node_id) me
        LEFT JOIN dispatch.jobs j
               ON j.id = r.id AND j.attempt = r.attempt AND j.state = 'leased' AND j.leased_by = me.node_id
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
