-- 013: a submitted request is parsed once, not once per field.
--
-- A request element is json (text), and every -> or ->> on it parses the element from
-- its first byte, payload included. Counted with callgrind (bench/sqlcost.py; the
-- figures are in bench/CHANGES.md), json_lex was a third of the instructions of a
-- 16-request submit: _request_problem read each field with ->, about ten parses per
-- element; the short path's check took element i with p_requests->i, which parses the
-- whole array each time (so the square of the batch); its INSERT read six more fields.
--
-- Now json_populate_record reads every field of an element in one parse, into
-- dispatch.request_fields. The fields stay json, so their types are checked as before;
-- JSON null reads as SQL NULL, as "absent or null" did; an object or array field keeps
-- its text as written (a payload is still stored as sent). A string payload comes back
-- as the same JSON string, escaped afresh (a payload is normally an object). The short
-- path checks its batch inside its first statement, in one pass, and inserts from
-- json_populate_recordset. What is accepted, refused and stored does not change:
-- tests/sql/submit.sql passes unchanged, and tests/sql/submit_paths.sql gained the
-- cases the two ways of reading could tell apart (a repeated key, escapes, nulls, an
-- element that is not an object), stored alike by both paths.
--
-- The short path also loses its limits (16 elements, 64 kB): they were there because
-- its check cost the square of the batch. Reading each element once it costs about
-- 0.15 million instructions per job at any length, where the general path cost 0.31
-- million per job at 64 elements and 0.42 at 256; bulk submits of one model now take it.

CREATE TYPE dispatch.request_fields AS (
    model           json,
    endpoint        json,
    payload         json,
    priority        json,
    timeout_ms      json,
    max_attempts    json,
    idempotency_key json,
    stream_token    json
);
COMMENT ON TYPE dispatch.request_fields IS
'Internal: the fields of one submit element, each as the JSON it was given (NULL when
absent or null), read in one parse by json_populate_record.';

-- A bare CASE is a plpgsql simple expression, evaluated without the executor (003).
CREATE OR REPLACE FUNCTION dispatch._request_problem(r json) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    f dispatch.request_fields;
BEGIN
    IF json_typeof(r) IS DISTINCT FROM 'object' THEN
        RETURN 'each request must be a JSON object';
    END IF;
    f := json_populate_record(NULL::dispatch.request_fields, r);
    RETURN CASE
        WHEN json_typeof(f.model) IS DISTINCT FROM 'string' OR length(f.model #>> '{}') NOT BETWEEN 1 AND 256
            THEN 'model must be a string of 1 to 256 characters'
        WHEN f.endpoint IS NOT NULL
             AND (json_typeof(f.endpoint) <> 'string' OR (f.endpoint #>> '{}') !~ '^/[A-Za-z0-9/_.-]{0,255}$')
            THEN 'endpoint must be a path such as /v1/chat/completions'
        WHEN f.payload IS NULL THEN 'payload is required'
        WHEN f.priority IS NOT NULL
             AND NOT (json_typeof(f.priority) = 'number' AND f.priority::text ~ '^-?\d{1,9}$')
            THEN 'priority must be an integer'
        WHEN f.timeout_ms IS NOT NULL
             AND NOT (json_typeof(f.timeout_ms) = 'number' AND f.timeout_ms::text ~ '^\d{1,12}$'
                      AND f.timeout_ms::text::bigint > 0)
            THEN 'timeout_ms must be a positive integer'
        WHEN f.max_attempts IS NOT NULL
             AND NOT (json_typeof(f.max_attempts) = 'number' AND f.max_attempts::text ~ '^\d{1,3}$'
                      AND f.max_attempts::text::integer BETWEEN 1 AND 100)
            THEN 'max_attempts must be an integer from 1 to 100'
        WHEN f.idempotency_key IS NOT NULL
             AND (json_typeof(f.idempotency_key) <> 'string' OR length(f.idempotency_key #>> '{}') NOT BETWEEN 1 AND 255)
            THEN 'idempotency_key must be a string of 1 to 255 characters'
        WHEN f.stream_token IS NOT NULL
             AND (json_typeof(f.stream_token) <> 'string' OR (f.stream_token #>> '{}') !~ '^[A-Za-z0-9]{8,64}$')
            THEN 'stream_token must be 8 to 64 letters and digits'
    END;
END
$$;
COMMENT ON FUNCTION dispatch._request_problem(json) IS
'Internal: the reason a submit element is malformed, or NULL. Reads the element in one parse.';

-- 010's submit_many, its check and its INSERT reading each element once, with no
-- limit on the batch; the settings of 010 and 012 are restated (CREATE OR REPLACE
-- drops them).
CREATE OR REPLACE FUNCTION dispatch.submit_many(p_requests json, p_reply_channel text DEFAULT NULL)
RETURNS TABLE (idx integer, id bigint, sqlstate text, message text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_count integer;
    v_model text;
    v_short boolean;
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

    v_count := json_array_length(p_requests);
    IF v_count = 0 THEN
        RETURN;
    END IF;
    v_model := p_requests->0->>'model';

    -- The short path takes a batch of well-formed requests for one model without
    -- idempotency keys, for a model with capacity. One statement checks the elements
    -- (one parse each) and reads the settings, the capacity and the free queue.
    IF v_model IS NOT NULL THEN
        SELECT chk.ok, st.default_attempts, st.depth, c.capacity, lim.queue_limit,
               lim.queue_limit - (SELECT count(*) FROM (SELECT 1 FROM dispatch.jobs j
                                                         WHERE chk.ok AND j.state = 'queued' AND j.model = v_model
                                                         LIMIT lim.queue_limit) q)
        INTO v_short, v_attempts, v_depth, v_capacity, v_limit, v_free
        FROM (SELECT bool_and(dispatch._request_problem(e.r) IS NULL AND e.r->>'model' = v_model
                              AND e.r->>'idempotency_key' IS NULL) AS ok
              FROM json_array_elements(p_requests) AS e(r)) chk
        CROSS JOIN (SELECT max(s.value) FILTER (WHERE s.key = 'default_max_attempts')::integer AS default_attempts,
                           max(s.value) FILTER (WHERE s.key = 'queue_depth_per_slot') AS depth
                    FROM dispatch.settings s WHERE s.key IN ('default_max_attempts', 'queue_depth_per_slot')) st
        LEFT JOIN dispatch.model_capacity c ON c.model = v_model
        CROSS JOIN LATERAL (SELECT floor(coalesce(c.capacity, 0) * st.depth)::bigint AS queue_limit) lim;
    END IF;

    IF NOT coalesce(v_short, false) OR coalesce(v_capacity, 0) <= 0 THEN
        RETURN QUERY SELECT * FROM dispatch._submit_many_general(p_requests, p_reply_channel);
        RETURN;
    END IF;

    -- The first v_free elements, in order; the NOTIFY is the general path's, for one model.
    WITH ins AS (
        INSERT INTO dispatch.jobs (model, endpoint, payload, priority, max_attempts, deadline,
                                   reply_channel, stream_token)
        SELECT v_model, coalesce(e.endpoint #>> '{}', '/v1/chat/completions'), e.payload,
               coalesce(e.priority::text::integer, 0), coalesce(e.max_attempts::text::integer, v_attempts),
               now() + make_interval(secs => e.timeout_ms::text::bigint / 1000.0), p_reply_channel,
               e.stream_token #>> '{}'
        FROM json_populate_recordset(NULL::dispatch.request_fields, p_requests) WITH ORDINALITY AS e
        WHERE e.ordinality <= v_free
        ORDER BY e.ordinality
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
distinct model wakes the daemons. A batch of well-formed requests for one served
model without idempotency keys, of any length, takes a short path of two small
statements that read each element once; every other batch runs
dispatch._submit_many_general.
Example: SELECT * FROM dispatch.submit_many(''[{"model":"m","payload":{"x":1}}]'');';
