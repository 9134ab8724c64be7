-- 010: a short path for the submits a gateway makes one request at a time.
--
-- submit_many (003) is one statement of about a hundred plan nodes: idempotent
-- replays, key reuse and races, several models per batch and per-element
-- refusals all live in it, and every call starts and ends all of it. A submit of
-- a few valid requests for one model without idempotency keys (a gateway under
-- light load sends one request per call) needs none of that. It now runs two
-- small statements: one reads the settings, the model's capacity and how much of
-- its queue is free; one inserts the jobs and wakes the model's daemons with the
-- same NOTIFY as before. In B4 at 200 req/s the gateway's submit call took
-- 0.81-0.93 ms of server time against 1.32-1.35 ms in the run before
-- (bench/CHANGES.md has the measurements by hand).
--
-- Every other batch, and a short-path batch whose model is unknown or has no
-- capacity (so that each refusal keeps its one wording), goes to 003's function,
-- renamed dispatch._submit_many_general. Its behaviour does not change.
-- tests/sql/submit_paths.sql checks that both paths store and answer the same.

ALTER FUNCTION dispatch.submit_many(json, text) RENAME TO _submit_many_general;
REVOKE EXECUTE ON FUNCTION dispatch._submit_many_general(json, text) FROM dispatch_gateway, dispatch_admin;
COMMENT ON FUNCTION dispatch._submit_many_general(json, text) IS
'Internal: dispatch.submit_many for any batch (several models, idempotency keys,
malformed elements, refusals). submit_many calls it for every batch its short path
does not take; same arguments and rows.';

CREATE FUNCTION dispatch.submit_many(p_requests json, p_reply_channel text DEFAULT NULL)
RETURNS TABLE (idx integer, id bigint, sqlstate text, message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    -- Larger batches go to the general path: checking element i of a json value
    -- parses the text up to it, so the checks here cost the square of the batch,
    -- and a large batch shares the general statement's fixed cost among its jobs.
    short_path_max_elements CONSTANT integer := 16;
    short_path_max_bytes CONSTANT integer := 65536;
    v_count integer;
    v_model text;
    v_element json;
    v_attempts integer;
    v_depth numeric;
    v_capacity integer;
    v_limit bigint;
    v_free bigint;
    v_ids bigint[];
BEGIN
    IF p_reply_channel IS NOT NULL AND p_reply_channel !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'reply channel "%" is not a valid channel name (lower-case letters, digits, _; at most 63)',
            p_reply_channel USING ERRCODE = '22023';
    END IF;
    IF p_requests IS NULL OR json_typeof(p_requests) <> 'array' THEN
        RAISE EXCEPTION 'requests must be a JSON array' USING ERRCODE = '22023';
    END IF;

    -- PL/pgSQL expressions, no statement: does the batch qualify for the short path?
    v_count := json_array_length(p_requests);
    IF v_count = 0 THEN
        RETURN;
    END IF;
    v_model := p_requests->0->>'model';
    IF v_count > short_path_max_elements OR octet_length(p_requests::text) > short_path_max_bytes THEN
        v_model := NULL;
    END IF;
    FOR i IN 0 .. v_count - 1 LOOP
        EXIT WHEN v_model IS NULL;
        v_element := p_requests->i;
        IF dispatch._request_problem(v_element) IS NOT NULL OR v_element->>'model' <> v_model
           OR v_element->>'idempotency_key' IS NOT NULL THEN
            v_model := NULL;
        END IF;
    END LOOP;

    IF v_model IS NOT NULL THEN
        SELECT st.default_attempts, st.depth, c.capacity, lim.queue_limit,
               lim.queue_limit - (SELECT count(*) FROM (SELECT 1 FROM dispatch.jobs j
                                                         WHERE j.state = 'queued' AND j.model = v_model
                                                         LIMIT lim.queue_limit) q)
        INTO v_attempts, v_depth, v_capacity, v_limit, v_free
        FROM (SELECT max(s.value) FILTER (WHERE s.key = 'default_max_attempts')::integer AS default_attempts,
                     max(s.value) FILTER (WHERE s.key = 'queue_depth_per_slot') AS depth
              FROM dispatch.settings s WHERE s.key IN ('default_max_attempts', 'queue_depth_per_slot')) st
        LEFT JOIN dispatch.model_capacity c ON c.model = v_model
        CROSS JOIN LATERAL (SELECT floor(coalesce(c.capacity, 0) * st.depth)::bigint AS queue_limit) lim;
    END IF;

    IF v_model IS NULL OR coalesce(v_capacity, 0) <= 0 THEN
        RETURN QUERY SELECT * FROM dispatch._submit_many_general(p_requests, p_reply_channel);
        RETURN;
    END IF;

    -- The first v_free elements, in order; the NOTIFY is the general path's, for one model.
    WITH ins AS (
        INSERT INTO dispatch.jobs (model, endpoint, payload, priority, max_attempts, deadline,
                                   reply_channel, stream_token)
        SELECT v_model, coalesce(e.r->>'endpoint', '/v1/chat/completions'), e.r->'payload',
               coalesce((e.r->>'priority')::integer, 0), coalesce((e.r->>'max_attempts')::integer, v_attempts),
               now() + make_interval(secs => (e.r->>'timeout_ms')::bigint / 1000.0), p_reply_channel,
               e.r->>'stream_token'
        FROM json_array_elements(p_requests) WITH ORDINALITY AS e(r, ord)
        WHERE e.ord <= v_free
        ORDER BY e.ord
        RETURNING dispatch.jobs.id
    ),
    woken AS MATERIALIZED (
        SELECT count(pg_notify(dispatch.model_channel(v_model), coalesce(t.targets, ''))) AS n
        FROM (SELECT count(*) AS k FROM ins) m
        LEFT JOIN LATERAL (
            SELECT string_agg(c.id::text, ',') AS targets
            FROM (SELECT s.id, count(*) OVER () AS serving
                  FROM dispatch.serving_nodes s
                  WHERE v_model = ANY (s.models)
                  ORDER BY (SELECT count(*) FROM dispatch.jobs j
                            WHERE j.state = 'leased' AND j.leased_by = s.id) - s.slots, random()
                  LIMIT m.k) c
            HAVING count(*) < max(c.serving)) t ON true
        WHERE m.k > 0
    )
    SELECT array_agg(i.id ORDER BY i.id) INTO v_ids FROM ins i CROSS JOIN woken;

    -- Identity values are drawn in the order rows are inserted: the ids ascend with idx.
    FOR i IN 1 .. v_count LOOP
        idx := i;
        id := v_ids[i];
        sqlstate := NULL;
        message := NULL;
        IF i > coalesce(cardinality(v_ids), 0) THEN
            sqlstate := 'PD003';
            message := format('queue for model "%s" is full (limit %s: capacity %s x %s per slot)',
                              v_model, v_limit, v_capacity, v_depth);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION dispatch.submit_many(json, text) IS
'Submits a batch of jobs in one transaction. p_requests is a JSON array of objects
{"model", "endpoint" (default /v1/chat/completions), "payload" (stored as sent),
"priority" (higher first, default 0), "timeout_ms" (deadline), "max_attempts",
"idempotency_key", "stream_token" (a secret of the caller''s, 8-64 letters and digits,
echoed in every streamed piece of the job so forged notifications can be told apart)}.
Returns one row per element: its job id, or the SQLSTATE and
message that refused it (22023 malformed element, PD001 unknown model, PD002 no live
node, PD003 queue full, PD008 idempotency key reused for a different request).
Refusals do not disturb the other elements. A replayed idempotency key returns the
existing job. Finished jobs are NOTIFYed on p_reply_channel; one NOTIFY per
distinct model wakes the daemons. Up to 16 valid requests for one served model
without idempotency keys take a short path of two small statements; every other
batch runs dispatch._submit_many_general.
Example: SELECT * FROM dispatch.submit_many(''[{"model":"m","payload":{"x":1}}]'');';
REVOKE EXECUTE ON FUNCTION dispatch.submit_many(json, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.submit_many(json, text) TO dispatch_gateway, dispatch_admin;
