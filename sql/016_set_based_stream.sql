-- 016: dispatch.stream checks and relays a call's pieces in one statement.
--
-- Under many concurrent streams, relaying pieces is most of what PostgreSQL does
-- (bench B9, one run through 200 streams: 29,012 stream calls of about 7 pieces took
-- 8.2 s of server time, against 3.4 s for the submits and 2.0 s for the exchanges).
-- 009's version ran five statements and a PL/pgSQL loop over the pieces (per piece a
-- fetch from the loop's cursor, checks and assignments in the interpreter, a format()
-- and two array appends that copy the arrays so far), and sorted the pieces by job.
-- Now one statement finds the caller's node, reads the pieces, looks up each one's
-- lease, sends its NOTIFY and collects the answer; a second returns one row per
-- (id, attempt). bench/sqlcost.py stream_8 (8 pieces of 8 jobs): 790,413 -> 712,742
-- instructions per call.
--
-- Same arguments, answers and errors as 009 (the caller is refused before a malformed
-- piece, and an empty batch checks the caller too); whatever was queued before a
-- refusal goes with the rolled-back transaction. The NOTIFYs go in the order the pieces
-- were sent, so each job's in the order of its pieces, as before; 009 also grouped
-- them by job, which no listener needs. The order holds because nothing in the
-- statement sorts or groups its rows: a plain aggregate over nested loops driven by the
-- function scan of the array (tests/integration/test_sql_concurrency.py checks it).

CREATE OR REPLACE FUNCTION dispatch.stream(p_chunks json)
RETURNS TABLE (id bigint, attempt integer, ok boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_node integer;
    v_bad boolean;
    v_ids bigint[];                    -- per piece, in the order sent
    v_attempts integer[];
    v_live boolean[];
BEGIN
    IF p_chunks IS NULL OR json_typeof(p_chunks) <> 'array' THEN
        RAISE EXCEPTION 'chunks must be a JSON array' USING ERRCODE = '22023';
    END IF;
    -- One statement: who calls, each piece's lease, the NOTIFYs (in the order sent, so
    -- each job's pieces in seq order) and whether any piece is malformed. What it
    -- queued is discarded with the transaction if the caller or a piece is refused.
    SELECT min(me.node_id),
           bool_or(p.id IS NULL OR p.attempt IS NULL OR p.seq IS NULL OR p.seq < 0 OR p.data IS NULL
                   OR octet_length(p.data) > 7000) FILTER (WHERE p.ord IS NOT NULL),
           array_agg(p.id) FILTER (WHERE p.ord IS NOT NULL),
           array_agg(p.attempt) FILTER (WHERE p.ord IS NOT NULL),
           array_agg(j.held IS NOT NULL) FILTER (WHERE p.ord IS NOT NULL),
           count(pg_notify(j.reply_channel,
                           'S' || p.id || ':' || p.seq || ':' || CASE WHEN p.more THEN 'm' ELSE 'e' END || ':'
                           || coalesce(j.stream_token, '') || ':' || p.data))
               FILTER (WHERE j.held AND j.reply_channel IS NOT NULL)
    INTO v_node, v_bad, v_ids, v_attempts, v_live
    FROM (SELECT (SELECT nd.id FROM dispatch.nodes nd
                  WHERE nd.role_name = session_user AND nd.backend_pid = pg_backend_pid()) AS node_id,
                 -- Losing these on a crash is acceptable (see 002); waiting for fsync is not.
                 set_config('synchronous_commit', 'off', true)) me
    LEFT JOIN ROWS FROM (json_to_recordset(p_chunks)
                  AS (id bigint, attempt integer, seq integer, more boolean, data text)) WITH ORDINALITY
                  AS p(id, attempt, seq, more, data, ord) ON true  -- no pieces: one row, ord null
    LEFT JOIN LATERAL (SELECT true AS held, jb.reply_channel, jb.stream_token FROM dispatch.jobs jb
                       WHERE jb.id = p.id AND jb.attempt = p.attempt AND jb.state = 'leased'
                         AND jb.leased_by = me.node_id
                       LIMIT 1) j ON true;

    IF v_node IS NULL THEN
        PERFORM dispatch._session_node(true);  -- raises the error that says what to do
    END IF;
    IF v_bad THEN
        RAISE EXCEPTION 'each chunk must be {"id", "attempt", "seq" >= 0, "more": bool, "data": text of at most 7000 bytes}'
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
        SELECT DISTINCT ON (u.id, u.attempt) u.id, u.attempt, u.live
        FROM unnest(v_ids, v_attempts, v_live) AS u(id, attempt, live)
        ORDER BY u.id, u.attempt;
END
$$;
