-- 002: streaming. A daemon relays a provider's Server-Sent Events to the waiting
-- gateway as notifications on the job's reply channel, in transactions that do not
-- wait for a disk flush: a chunk lost in a crash belongs to a stream the crash
-- broke anyway. The job still ends with a durable dispatch.exchange whose result is
-- the assembled response.
--
-- Notification payload on the reply channel (ids-only payloads stay as they were):
--   S<job id>:<seq>:<m|e>:<stream token>:<data>
-- seq counts from 0 per attempt with no gaps; 'e' ends an SSE event, 'm' means the
-- event continues in the next piece (events longer than a payload are split);
-- <stream token> is the secret the submitter gave (empty if none): any role may
-- NOTIFY any channel, so a gateway accepts only pieces that carry its token;
-- <data> is the event's data field as the provider sent it (without "data: ").

CREATE FUNCTION dispatch.stream(p_chunks json)
RETURNS TABLE (id bigint, attempt integer, ok boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    n dispatch.nodes := dispatch._session_node(true);
    c record;
    v_live boolean;
    v_channel text;
    v_token text;
    v_last_id bigint;
    v_last_attempt integer;
BEGIN
    IF p_chunks IS NULL OR json_typeof(p_chunks) <> 'array' THEN
        RAISE EXCEPTION 'chunks must be a JSON array' USING ERRCODE = '22023';
    END IF;
    -- Losing these on a crash is acceptable (see above); waiting for fsync is not.
    PERFORM set_config('synchronous_commit', 'off', true);

    FOR c IN SELECT r.* FROM ROWS FROM (json_to_recordset(p_chunks)
                 AS (id bigint, attempt integer, seq integer, more boolean, data text)) WITH ORDINALITY
                 AS r(id, attempt, seq, more, data, ord)
             ORDER BY r.id, r.attempt, r.ord
    LOOP
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
            SELECT true, j.reply_channel, coalesce(j.stream_token, '') INTO v_live, v_channel, v_token
            FROM dispatch.jobs j
            WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'leased' AND j.leased_by = n.id;
            v_live := coalesce(v_live, false);
            v_last_id := c.id;
            v_last_attempt := c.attempt;
        END IF;
        IF v_live AND v_channel IS NOT NULL THEN
            PERFORM pg_notify(v_channel, format('S%s:%s:%s:%s:%s', c.id, c.seq,
                                                CASE WHEN c.more THEN 'm' ELSE 'e' END, v_token, c.data));
        END IF;
    END LOOP;
    IF v_last_id IS NOT NULL THEN
        id := v_last_id; attempt := v_last_attempt; ok := v_live;
        RETURN NEXT;
    END IF;
END
$$;
COMMENT ON FUNCTION dispatch.stream(json) IS
'Relays streamed pieces of the calling node''s jobs to their waiting gateways. p_chunks
is a JSON array of {"id", "attempt", "seq", "more", "data"} in order: seq counts from
0 per attempt without gaps; "data" is one SSE event''s data field (at most 7000 bytes;
longer events are split into pieces with "more": true on all but the last). Each
piece becomes a NOTIFY on the job''s reply channel with payload
S<id>:<seq>:<m|e>:<stream token>:<data>. The transaction commits without waiting for a disk flush.
One row per (id, attempt): ok = false when that attempt no longer holds its lease
(cancelled or taken back): stop streaming it. Example:
SELECT * FROM dispatch.stream(''[{"id":7,"attempt":1,"seq":0,"more":false,"data":"{\"choices\":[]}"}]'');';

REVOKE EXECUTE ON FUNCTION dispatch.stream(json) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.stream(json) TO dispatch_daemon;
