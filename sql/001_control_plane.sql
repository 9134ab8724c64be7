-- 001: the pgdispatch control plane: schema, roles, tables and the function API.
-- Tables are private; the functions below are the interface for the gateway
-- (dispatch_gateway), the daemons (dispatch_daemon, one login role per node) and
-- operators (dispatch_admin). See README.md "SQL reference".
--
-- Custom SQLSTATEs (class PD) that clients tell apart:
--   PD001 unknown model            (gateway: 404)
--   PD002 no live node for model   (gateway: 503)
--   PD003 queue full               (gateway: 429)
--   PD004 stale attempt (fencing)  (daemon: drop the result)
--   PD005 session is not a node / not registered
--   PD006 node already has a live session
--   PD007 no such node / key
--   PD008 idempotency key reused with a different request (gateway: 409)
-- Bad arguments raise 22023 (invalid_parameter_value).

-- Roles are cluster-wide: create them only where they do not exist yet.
DO $roles$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['dispatch_gateway', 'dispatch_daemon', 'dispatch_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            -- The migration lock is per database: a migrator of another database
            -- of the same cluster may create the role at the same moment.
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;

REVOKE ALL ON SCHEMA dispatch FROM PUBLIC;
GRANT USAGE ON SCHEMA dispatch TO dispatch_gateway, dispatch_daemon, dispatch_admin;

------------------------------------------------------------------------------
-- Tables
------------------------------------------------------------------------------

CREATE TABLE dispatch.settings (
    key         text PRIMARY KEY,
    value       numeric NOT NULL,
    min_value   numeric NOT NULL,
    max_value   numeric NOT NULL,
    description text NOT NULL
);

INSERT INTO dispatch.settings (key, value, min_value, max_value, description) VALUES
  ('lease_seconds',          60,    1, 86400,   'how long a lease lasts before it can be taken back'),
  ('retry_base_ms',          500,   0, 3600000, 'backoff before the first retry'),
  ('retry_factor',           2,     1, 100,     'backoff multiplier per further attempt'),
  ('retry_cap_ms',           60000, 0, 86400000,'longest backoff between attempts'),
  ('default_max_attempts',   3,     1, 100,     'attempts a job gets unless the submit says otherwise'),
  ('default_slots_per_node', 4,     1, 100000,  'slots assumed for a node that did not report its max concurrency'),
  ('fallback_capacity',      0,     0, 1000000, 'capacity of a model no live healthy node serves (0: refuse with 503)'),
  ('queue_depth_per_slot',   32,    0, 1000000, 'queued jobs allowed per unit of capacity'),
  ('stale_seconds',          60,    1, 86400,   'how long work may wait unseen by a live node before it is called stale'),
  ('retention_seconds',      86400, 0, 31536000,'how long finished jobs are kept before prune deletes them'),
  ('prune_batch',            10000, 1, 1000000, 'rows prune deletes per statement');

CREATE TABLE dispatch.capacity_overrides (
    model      text PRIMARY KEY,
    capacity   integer NOT NULL CHECK (capacity BETWEEN 0 AND 1000000),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dispatch.nodes (
    id                     integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                   text NOT NULL UNIQUE,
    role_name              name NOT NULL UNIQUE,
    role_created           boolean NOT NULL,
    provider_family        text,
    models                 text[] NOT NULL DEFAULT '{}',
    max_concurrency        integer CHECK (max_concurrency > 0),
    region                 text,
    labels                 jsonb NOT NULL DEFAULT '{}',
    admin_state            text NOT NULL DEFAULT 'active'
                           CHECK (admin_state IN ('active', 'draining', 'disabled')),
    health                 text NOT NULL DEFAULT 'healthy'
                           CHECK (health IN ('healthy', 'degraded')),
    health_reason          text,
    health_changed_at      timestamptz,
    backend_pid            integer,
    last_poll_started_at   timestamptz,
    last_poll_completed_at timestamptz,
    registered_at          timestamptz,
    enrolled_at            timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dispatch.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model            text NOT NULL,
    endpoint         text NOT NULL,
    payload          json NOT NULL,
    priority         integer NOT NULL DEFAULT 0,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'leased', 'succeeded', 'failed', 'cancelled', 'expired')),
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    run_at           timestamptz NOT NULL DEFAULT now(),
    deadline         timestamptz,
    leased_by        integer,
    lease_expires_at timestamptz,
    reply_channel    text,
    idempotency_key  text,
    stream_token     text,            -- echoed in stream pieces so the gateway can tell forgeries
    result           json,
    error            jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- The hot paths: what lease scans, what reclaim and next_wake scan, what the
-- per-node slot count scans. Finished rows are in none of them.
CREATE INDEX jobs_queued ON dispatch.jobs (model, priority DESC, run_at, id) WHERE state = 'queued';
CREATE INDEX jobs_leased_by ON dispatch.jobs (leased_by) WHERE state = 'leased';
CREATE INDEX jobs_lease_expiry ON dispatch.jobs (lease_expires_at) WHERE state = 'leased';
-- Queued jobs that may be due later than their submit (retries in backoff, hand-backs,
-- requeues): what next_wake looks for. A fresh submit has run_at = created_at and is
-- not in it, so next_wake does not scan a deep queue of ready work.
CREATE INDEX jobs_delayed ON dispatch.jobs (model, run_at) WHERE state = 'queued' AND run_at > created_at;
CREATE UNIQUE INDEX jobs_idempotency_key ON dispatch.jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE dispatch.api_keys (
    name       text PRIMARY KEY,
    key_hash   bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

REVOKE ALL ON ALL TABLES IN SCHEMA dispatch FROM PUBLIC;
GRANT SELECT ON ALL TABLES IN SCHEMA dispatch TO dispatch_admin;

------------------------------------------------------------------------------
-- Internal helpers (prefixed with _; no role may call them directly)
------------------------------------------------------------------------------

CREATE FUNCTION dispatch._setting(p_key text) RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- plpgsql, not sql: a non-inlinable SQL function is planned on every call.
    RETURN (SELECT value FROM dispatch.settings WHERE key = p_key);
END
$$;
COMMENT ON FUNCTION dispatch._setting(text) IS
'Internal: the current value of one setting.';

-- The advisory-lock key space of node liveness: (class, node id).
CREATE FUNCTION dispatch._lock_class() RETURNS integer
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN 1885627504;  -- 'pgdp'
END
$$;
COMMENT ON FUNCTION dispatch._lock_class() IS
'Internal: first key of the session advisory lock that marks a node as connected.';

CREATE FUNCTION dispatch._live_nodes()
RETURNS TABLE (node_id integer, pid integer, mode text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT l.objid::integer, l.pid, l.mode
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid = dispatch._lock_class()::oid
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
END
$$;
COMMENT ON FUNCTION dispatch._live_nodes() IS
'Internal: nodes whose liveness lock is held, with the holding backend. A node is live
when its lock is held by the backend recorded at register.';

-- Is the node's daemon connected? O(1): try to take its liveness lock in shared
-- mode for this transaction; a connected daemon holds it exclusively, so the try
-- fails. (Scanning pg_locks instead reads every backend's lock table.) The session
-- that registered the node holds the lock itself and answers from backend_pid.
CREATE FUNCTION dispatch._node_live(p_node_id integer, p_backend_pid integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_backend_pid IS NULL THEN
        RETURN false;
    END IF;
    IF p_backend_pid = pg_backend_pid() THEN
        RETURN true;
    END IF;
    RETURN NOT pg_try_advisory_xact_lock_shared(dispatch._lock_class(), p_node_id);
END
$$;
COMMENT ON FUNCTION dispatch._node_live(integer, integer) IS
'Internal: whether a node''s daemon session is connected (holds its liveness lock).
A dead node''s lock is then held shared by this transaction until it ends, which a
registering daemon waits out (register waits up to 2 s for the lock, which also covers
the session of a killed daemon that has not quite ended yet).';

-- Nodes that can take work now: live, active, healthy.
CREATE FUNCTION dispatch._serving_nodes()
RETURNS TABLE (id integer, models text[], slots integer, reported boolean)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT n.id, n.models,
           coalesce(n.max_concurrency, dispatch._setting('default_slots_per_node')::integer),
           n.max_concurrency IS NOT NULL
    FROM dispatch.nodes n
    WHERE n.admin_state = 'active' AND n.health = 'healthy' AND n.backend_pid IS NOT NULL
      AND dispatch._node_live(n.id, n.backend_pid);
END
$$;
COMMENT ON FUNCTION dispatch._serving_nodes() IS
'Internal: live, active, healthy nodes with their slot counts.';

CREATE FUNCTION dispatch.model_channel(p_model text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN 'dispatch_m_' || md5(p_model);
END
$$;
COMMENT ON FUNCTION dispatch.model_channel(text) IS
'The LISTEN channel woken when work for a model is submitted. Any model name (long,
with slashes, colons or non-ASCII) maps to a valid 43-character identifier.
Example: SELECT dispatch.model_channel(''meta-llama/Llama-3.1-8B:q4'');';

CREATE FUNCTION dispatch.node_channel(p_node_id integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN 'dispatch_n_' || p_node_id;
END
$$;
COMMENT ON FUNCTION dispatch.node_channel(integer) IS
'The LISTEN channel on which a node is told to abort a job (payload: the job id).';

-- Tells waiting gateways which of their jobs finished: one NOTIFY per reply
-- channel per call, ids comma-separated, split to stay under the 8000-byte limit.
CREATE FUNCTION dispatch._notify_replies(p_channels text[], p_ids bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_notify(channel, ids) FROM (
        SELECT channel, string_agg(id::text, ',' ORDER BY id) AS ids
        FROM (SELECT channel, id, (row_number() OVER (PARTITION BY channel ORDER BY id) - 1) / 350 AS chunk
              FROM unnest(p_channels, p_ids) AS t(channel, id)
              WHERE channel IS NOT NULL) numbered
        GROUP BY channel, chunk) batches;
END
$$;
COMMENT ON FUNCTION dispatch._notify_replies(text[], bigint[]) IS
'Internal: NOTIFY each reply channel with the ids of its jobs that finished, at most 350 ids per payload.';

CREATE FUNCTION dispatch._notify_models(p_models text[]) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_models IS NULL OR cardinality(p_models) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_notify(dispatch.model_channel(m), '')
    FROM (SELECT DISTINCT m FROM unnest(p_models) AS m WHERE m IS NOT NULL) d;
END
$$;
COMMENT ON FUNCTION dispatch._notify_models(text[]) IS
'Internal: wake the daemons serving these models (one NOTIFY per distinct model).';

CREATE FUNCTION dispatch._backoff(p_attempt integer) RETURNS interval
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT make_interval(secs => least(
        dispatch._setting('retry_cap_ms'),
        dispatch._setting('retry_base_ms') * power(dispatch._setting('retry_factor'), greatest(p_attempt - 1, 0))
    ) / 1000.0));
END
$$;
COMMENT ON FUNCTION dispatch._backoff(integer) IS
'Internal: the wait before retrying after attempt N failed: base * factor^(N-1), capped.';

-- The node row of the calling session's login role (never an argument: a node
-- cannot act for another).
CREATE FUNCTION dispatch._session_node(p_require_registered boolean) RETURNS dispatch.nodes
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE n dispatch.nodes;
BEGIN
    SELECT * INTO n FROM dispatch.nodes WHERE role_name = session_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role "%" is not enrolled as a node', session_user
            USING ERRCODE = 'PD005',
                  HINT = 'An operator runs SELECT dispatch.enroll(''<node name>''); and the daemon logs in with the role it creates.';
    END IF;
    IF p_require_registered AND n.backend_pid IS DISTINCT FROM pg_backend_pid() THEN
        RAISE EXCEPTION 'node "%" is not registered in this session', n.name
            USING ERRCODE = 'PD005', HINT = 'Call dispatch.register(...) after connecting.';
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION dispatch._session_node(boolean) IS
'Internal: the node of session_user; optionally requires that this backend registered it.';

CREATE FUNCTION dispatch._check_text(p_what text, p_value text, p_max integer, p_nullable boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_value IS NULL THEN
        IF NOT p_nullable THEN
            RAISE EXCEPTION '% is required', p_what USING ERRCODE = '22023';
        END IF;
    ELSIF length(p_value) = 0 OR length(p_value) > p_max THEN
        RAISE EXCEPTION '% must be 1 to % characters, got %', p_what, p_max, length(p_value)
            USING ERRCODE = '22023';
    END IF;
END
$$;
COMMENT ON FUNCTION dispatch._check_text(text, text, integer, boolean) IS
'Internal: raise 22023 naming the argument when a text is missing, empty or too long.';

CREATE FUNCTION dispatch._check_models(p_models text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE m text;
BEGIN
    IF p_models IS NULL OR cardinality(p_models) = 0 THEN
        RAISE EXCEPTION 'models must list at least one model' USING ERRCODE = '22023';
    END IF;
    IF cardinality(p_models) > 1000 THEN
        RAISE EXCEPTION 'models lists % models; at most 1000', cardinality(p_models) USING ERRCODE = '22023';
    END IF;
    FOREACH m IN ARRAY p_models LOOP
        PERFORM dispatch._check_text('model name', m, 256, false);
    END LOOP;
END
$$;
COMMENT ON FUNCTION dispatch._check_models(text[]) IS
'Internal: a models list is non-empty, at most 1000 names, each 1..256 characters.';

------------------------------------------------------------------------------
-- Capacity
------------------------------------------------------------------------------

CREATE FUNCTION dispatch._capacity(p_only_model text)
RETURNS TABLE (model text, capacity integer, tier text, live_nodes integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH serving AS (SELECT * FROM dispatch._serving_nodes()),
    known AS (
        SELECT unnest(n.models) AS model FROM dispatch.nodes n
        UNION SELECT o.model FROM dispatch.capacity_overrides o
    ),
    per_model AS (
        SELECT k.model,
               count(s.id)::integer AS live_nodes,
               count(s.id) FILTER (WHERE NOT s.reported)::integer AS unreported,
               coalesce(sum(s.slots), 0)::integer AS slots
        FROM known k
        LEFT JOIN serving s ON k.model = ANY (s.models)
        WHERE p_only_model IS NULL OR k.model = p_only_model
        GROUP BY k.model
    )
    SELECT p.model,
           CASE WHEN o.capacity IS NOT NULL THEN o.capacity
                WHEN p.live_nodes = 0 THEN dispatch._setting('fallback_capacity')::integer
                ELSE p.slots END,
           CASE WHEN o.capacity IS NOT NULL THEN 'override'
                WHEN p.live_nodes = 0 THEN 'fallback'
                WHEN p.unreported = 0 THEN 'reported'
                ELSE 'mixed' END,
           p.live_nodes
    FROM per_model p
    LEFT JOIN dispatch.capacity_overrides o ON o.model = p.model;
END
$$;
COMMENT ON FUNCTION dispatch._capacity(text) IS
'Internal: capacity and its tier for every known model (or one): override, reported, mixed, fallback.';

CREATE FUNCTION dispatch.capacity()
RETURNS TABLE (model text, capacity integer, tier text, live_nodes integer,
               in_flight integer, queued bigint, queue_limit bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.model, c.capacity, c.tier, c.live_nodes,
           (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'leased' AND j.model = c.model)::integer,
           (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'queued' AND j.model = c.model),
           (c.capacity * dispatch._setting('queue_depth_per_slot'))::bigint
    FROM dispatch._capacity(NULL) c
    ORDER BY c.model;
END
$$;
COMMENT ON FUNCTION dispatch.capacity() IS
'Capacity per model with the tier it comes from (override | reported | mixed | fallback),
live serving nodes, jobs in flight (live leases), jobs queued and the queue limit
(capacity x queue_depth_per_slot). Example: SELECT * FROM dispatch.capacity();';

CREATE FUNCTION dispatch.set_capacity(p_model text, p_capacity integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch._check_text('model', p_model, 256, false);
    IF p_capacity IS NULL OR p_capacity < 0 OR p_capacity > 1000000 THEN
        RAISE EXCEPTION 'capacity override for "%" must be between 0 and 1000000, got %', p_model, p_capacity
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO dispatch.capacity_overrides (model, capacity) VALUES (p_model, p_capacity)
    ON CONFLICT (model) DO UPDATE SET capacity = excluded.capacity, updated_at = now();
END
$$;
COMMENT ON FUNCTION dispatch.set_capacity(text, integer) IS
'Pins the capacity of a model (0..1000000; 0 refuses new work with 503). Takes precedence
over what nodes report. Example: SELECT dispatch.set_capacity(''llama3'', 16);';

CREATE FUNCTION dispatch.clear_capacity(p_model text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM dispatch.capacity_overrides WHERE model = p_model;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION dispatch.clear_capacity(text) IS
'Removes a capacity override; true if there was one. Example: SELECT dispatch.clear_capacity(''llama3'');';

------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------

CREATE FUNCTION dispatch.settings()
RETURNS TABLE (key text, value numeric, min_value numeric, max_value numeric, description text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT key, value, min_value, max_value, description FROM dispatch.settings ORDER BY key;
END
$$;
COMMENT ON FUNCTION dispatch.settings() IS
'Every setting with its value, allowed range and meaning. Example: SELECT * FROM dispatch.settings();';

CREATE FUNCTION dispatch.set_setting(p_key text, p_value numeric) RETURNS numeric
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE s dispatch.settings;
BEGIN
    SELECT * INTO s FROM dispatch.settings WHERE key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown setting "%"', p_key USING ERRCODE = '22023',
            HINT = 'SELECT key FROM dispatch.settings(); lists them.';
    END IF;
    IF p_value IS NULL OR p_value < s.min_value OR p_value > s.max_value THEN
        RAISE EXCEPTION 'setting % must be between % and %, got %', p_key, s.min_value, s.max_value, p_value
            USING ERRCODE = '22023';
    END IF;
    IF p_value <> trunc(p_value) AND p_key <> 'retry_factor' THEN
        RAISE EXCEPTION 'setting % takes a whole number, got %', p_key, p_value USING ERRCODE = '22023';
    END IF;
    UPDATE dispatch.settings SET value = p_value WHERE key = p_key;
    RETURN p_value;
END
$$;
COMMENT ON FUNCTION dispatch.set_setting(text, numeric) IS
'Changes a setting after checking its range; returns the new value.
Example: SELECT dispatch.set_setting(''lease_seconds'', 120);';

------------------------------------------------------------------------------
-- Submitting work (gateway)
------------------------------------------------------------------------------

-- Why a request element is unacceptable, or NULL when it is fine.
CREATE FUNCTION dispatch._request_problem(r json) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT CASE
        WHEN json_typeof(r) IS DISTINCT FROM 'object' THEN 'each request must be a JSON object'
        WHEN json_typeof(r->'model') IS DISTINCT FROM 'string' OR length(r->>'model') NOT BETWEEN 1 AND 256
            THEN 'model must be a string of 1 to 256 characters'
        WHEN r->'endpoint' IS NOT NULL AND json_typeof(r->'endpoint') <> 'null'
             AND (json_typeof(r->'endpoint') <> 'string'
             OR (r->>'endpoint') !~ '^/[A-Za-z0-9/_.-]{0,255}$')
            THEN 'endpoint must be a path such as /v1/chat/completions'
        WHEN r->'payload' IS NULL OR json_typeof(r->'payload') = 'null' THEN 'payload is required'
        WHEN r->'priority' IS NOT NULL AND json_typeof(r->'priority') <> 'null'
             AND NOT (json_typeof(r->'priority') = 'number' AND (r->>'priority') ~ '^-?\d{1,9}$')
            THEN 'priority must be an integer'
        WHEN r->'timeout_ms' IS NOT NULL AND json_typeof(r->'timeout_ms') <> 'null'
             AND NOT (json_typeof(r->'timeout_ms') = 'number' AND (r->>'timeout_ms') ~ '^\d{1,12}$'
                      AND (r->>'timeout_ms')::bigint > 0)
            THEN 'timeout_ms must be a positive integer'
        WHEN r->'max_attempts' IS NOT NULL AND json_typeof(r->'max_attempts') <> 'null'
             AND NOT (json_typeof(r->'max_attempts') = 'number' AND (r->>'max_attempts') ~ '^\d{1,3}$'
                      AND (r->>'max_attempts')::integer BETWEEN 1 AND 100)
            THEN 'max_attempts must be an integer from 1 to 100'
        WHEN r->'idempotency_key' IS NOT NULL AND json_typeof(r->'idempotency_key') <> 'null'
             AND (json_typeof(r->'idempotency_key') <> 'string' OR length(r->>'idempotency_key') NOT BETWEEN 1 AND 255)
            THEN 'idempotency_key must be a string of 1 to 255 characters'
        WHEN r->'stream_token' IS NOT NULL AND json_typeof(r->'stream_token') <> 'null'
             AND (json_typeof(r->'stream_token') <> 'string' OR (r->>'stream_token') !~ '^[A-Za-z0-9]{8,64}$')
            THEN 'stream_token must be 8 to 64 letters and digits'
    END);
END
$$;
COMMENT ON FUNCTION dispatch._request_problem(json) IS
'Internal: the reason a submit element is malformed, or NULL.';

CREATE TYPE dispatch.submit_outcome AS (idx integer, id bigint, sqlstate text, message text,
                                        model text, inserted boolean, idempotency_key text);

-- One implementation for single and batched submits: one statement parses,
-- replays idempotent requests, admits per model and inserts with ids drawn up
-- front, so no temporary table and no per-row round trips.
CREATE FUNCTION dispatch.submit_many(p_requests json, p_reply_channel text DEFAULT NULL)
RETURNS TABLE (idx integer, id bigint, sqlstate text, message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_default_attempts integer := dispatch._setting('default_max_attempts')::integer;
    v_depth numeric := dispatch._setting('queue_depth_per_slot');
    v_out dispatch.submit_outcome[];
BEGIN
    IF p_reply_channel IS NOT NULL AND p_reply_channel !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'reply channel "%" is not a valid channel name (lower-case letters, digits, _; at most 63)',
            p_reply_channel USING ERRCODE = '22023';
    END IF;
    IF p_requests IS NULL OR json_typeof(p_requests) <> 'array' THEN
        RAISE EXCEPTION 'requests must be a JSON array' USING ERRCODE = '22023';
    END IF;

    WITH parsed AS MATERIALIZED (
        SELECT e.ord::integer AS idx, dispatch._request_problem(e.r) AS problem,
               e.r->>'model' AS model, coalesce(e.r->>'endpoint', '/v1/chat/completions') AS endpoint,
               e.r->'payload' AS payload, e.r->>'idempotency_key' AS idempotency_key, e.r
        FROM json_array_elements(p_requests) WITH ORDINALITY AS e(r, ord)
    ),
    good AS MATERIALIZED (
        SELECT p.idx, p.model, p.endpoint, p.payload, p.idempotency_key, p.r->>'stream_token' AS stream_token,
               coalesce((p.r->>'priority')::integer, 0) AS priority,
               (p.r->>'timeout_ms')::bigint AS timeout_ms,
               coalesce((p.r->>'max_attempts')::integer, v_default_attempts) AS max_attempts
        FROM parsed p WHERE p.problem IS NULL
    ),
    prior AS MATERIALIZED (
        SELECT g.idx, j.id, j.state, g.stream_token,
               (j.model <> g.model OR j.endpoint <> g.endpoint OR j.payload::text <> g.payload::text) AS mismatch
        FROM good g JOIN dispatch.jobs j ON j.idempotency_key = g.idempotency_key
    ),
    redirected AS (
        -- A replay moves the answer of an unfinished job to this caller's channel.
        UPDATE dispatch.jobs j SET reply_channel = p_reply_channel, stream_token = prior.stream_token
        FROM prior
        WHERE prior.id = j.id AND NOT prior.mismatch AND p_reply_channel IS NOT NULL
          AND j.state IN ('queued', 'leased')
          AND (j.reply_channel IS DISTINCT FROM p_reply_channel OR j.stream_token IS DISTINCT FROM prior.stream_token)
        RETURNING j.id
    ),
    fresh AS MATERIALIZED (
        SELECT g.*, row_number() OVER (PARTITION BY g.model ORDER BY g.idx) AS nth
        FROM good g WHERE NOT EXISTS (SELECT 1 FROM prior WHERE prior.idx = g.idx)
    ),
    room AS MATERIALIZED (
        SELECT m.model, c.capacity, c.tier,
               (EXISTS (SELECT 1 FROM dispatch.nodes n WHERE m.model = ANY (n.models))
                OR EXISTS (SELECT 1 FROM dispatch.capacity_overrides o WHERE o.model = m.model)) AS known,
               floor(coalesce(c.capacity, 0) * v_depth)::bigint AS queue_limit
        FROM (SELECT DISTINCT f.model FROM fresh f) m
        LEFT JOIN LATERAL dispatch._capacity(m.model) c ON true
    ),
    free AS MATERIALIZED (
        SELECT r.*, r.queue_limit - (SELECT count(*) FROM (
                        SELECT 1 FROM dispatch.jobs j WHERE j.state = 'queued' AND j.model = r.model
                        LIMIT r.queue_limit) q) AS free
        FROM room r WHERE r.known AND coalesce(r.capacity, 0) > 0
    ),
    admitted AS MATERIALIZED (
        SELECT f.*, nextval(pg_get_serial_sequence('dispatch.jobs', 'id')) AS new_id
        FROM fresh f JOIN free fr ON fr.model = f.model
        WHERE f.nth <= fr.free
        ORDER BY f.idx
    ),
    ins AS (
        INSERT INTO dispatch.jobs (id, model, endpoint, payload, priority, max_attempts, deadline,
                                   reply_channel, idempotency_key, stream_token)
        OVERRIDING SYSTEM VALUE
        SELECT a.new_id, a.model, a.endpoint, a.payload, a.priority, a.max_attempts,
               now() + make_interval(secs => a.timeout_ms / 1000.0), p_reply_channel, a.idempotency_key,
               a.stream_token
        FROM admitted a ORDER BY a.idx
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING dispatch.jobs.id
    )
    SELECT array_agg(ROW(p.idx,
               coalesce(pr.id, i.id),
               CASE WHEN p.problem IS NOT NULL THEN '22023'
                    WHEN pr.mismatch THEN 'PD008'
                    WHEN pr.id IS NOT NULL THEN NULL
                    WHEN NOT r.known THEN 'PD001'
                    WHEN coalesce(r.capacity, 0) = 0 THEN 'PD002'
                    WHEN a.new_id IS NULL THEN 'PD003'
                    WHEN i.id IS NULL THEN 'lost' END,
               CASE WHEN p.problem IS NOT NULL THEN p.problem
                    WHEN pr.mismatch THEN format('idempotency key "%s" was already used for a different request (job %s)',
                                                  p.idempotency_key, pr.id)
                    WHEN pr.id IS NOT NULL THEN NULL
                    WHEN NOT r.known THEN format('model "%s" is not served by any node', p.model)
                    WHEN coalesce(r.capacity, 0) = 0 THEN
                         format('no live healthy node serves model "%s" (capacity 0, tier %s)', p.model, r.tier)
                    WHEN a.new_id IS NULL THEN
                         format('queue for model "%s" is full (limit %s: capacity %s x %s per slot)',
                                p.model, r.queue_limit, r.capacity, v_depth) END,
               p.model, i.id IS NOT NULL, p.idempotency_key)::dispatch.submit_outcome ORDER BY p.idx)
    INTO v_out
    FROM parsed p
    LEFT JOIN prior pr ON pr.idx = p.idx
    LEFT JOIN room r ON r.model = p.model AND p.problem IS NULL AND pr.id IS NULL
    LEFT JOIN admitted a ON a.idx = p.idx
    LEFT JOIN ins i ON i.id = a.new_id;

    -- A keyed element whose insert was skipped lost a race with a concurrent
    -- submit of the same key (which has committed by now), or repeats a key of an
    -- earlier element of this batch: it takes that job if the request is the same,
    -- and is refused with PD008 like any other reuse of the key if it is not.
    IF EXISTS (SELECT 1 FROM unnest(v_out) o WHERE o.sqlstate = 'lost') THEN
        SELECT array_agg(CASE WHEN o.sqlstate = 'lost'
                              THEN ROW(o.idx, j.id,
                                       CASE WHEN j.id IS NULL THEN 'PD003' WHEN x.mismatch THEN 'PD008' END,
                                       CASE WHEN j.id IS NULL THEN 'idempotent submit raced and lost; retry'
                                            WHEN x.mismatch THEN
                                                format('idempotency key "%s" was already used for a different request (job %s)',
                                                       o.idempotency_key, j.id) END,
                                       o.model, false, o.idempotency_key)::dispatch.submit_outcome
                              ELSE o END ORDER BY o.idx)
        INTO v_out
        FROM unnest(v_out) o
        LEFT JOIN dispatch.jobs j ON o.sqlstate = 'lost' AND j.idempotency_key = o.idempotency_key
        LEFT JOIN LATERAL (SELECT j.model <> o.model
                                  OR j.endpoint <> coalesce(p_requests->(o.idx - 1)->>'endpoint', '/v1/chat/completions')
                                  OR j.payload::text <> (p_requests->(o.idx - 1)->'payload')::text AS mismatch) x
               ON j.id IS NOT NULL;
    END IF;

    PERFORM dispatch._notify_models(array_agg(o.model)) FROM unnest(v_out) o WHERE o.inserted;

    RETURN QUERY SELECT o.idx, o.id, o.sqlstate, o.message FROM unnest(v_out) o ORDER BY o.idx;
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
distinct model wakes the daemons.
Example: SELECT * FROM dispatch.submit_many(''[{"model":"m","payload":{"x":1}}]'');';

CREATE FUNCTION dispatch.submit(
    p_model text, p_endpoint text, p_payload json, p_priority integer DEFAULT 0,
    p_timeout interval DEFAULT NULL, p_max_attempts integer DEFAULT NULL,
    p_idempotency_key text DEFAULT NULL, p_reply_channel text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM dispatch.submit_many(
        -- No json_strip_nulls here: it is recursive and would rewrite the payload,
        -- which is stored as sent. Absent optional fields are JSON nulls.
        json_build_array(json_build_object(
            'model', p_model, 'endpoint', p_endpoint, 'payload', p_payload, 'priority', p_priority,
            'timeout_ms', (extract(epoch FROM p_timeout) * 1000)::bigint,
            'max_attempts', p_max_attempts, 'idempotency_key', p_idempotency_key)),
        p_reply_channel);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION '%', r.message USING ERRCODE = r.sqlstate;
    END IF;
    RETURN r.id;
END
$$;
COMMENT ON FUNCTION dispatch.submit(text, text, json, integer, interval, integer, text, text) IS
'Submits one job and returns its id; raises PD001 (unknown model), PD002 (no live node),
PD003 (queue full), PD008 (idempotency key reused) or 22023 (bad argument).
Example: SELECT dispatch.submit(''llama3'', ''/v1/chat/completions'',
''{"model":"llama3","messages":[{"role":"user","content":"hi"}]}'', p_timeout => ''30 s'');';

CREATE FUNCTION dispatch.results(p_ids bigint[])
RETURNS TABLE (id bigint, state text, attempt integer, result json, error jsonb,
               model text, created_at timestamptz, started_at timestamptz, finished_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT j.id, j.state, j.attempt, j.result, j.error, j.model, j.created_at, j.started_at, j.finished_at
    FROM dispatch.jobs j WHERE j.id = ANY (p_ids) ORDER BY j.id;
END
$$;
COMMENT ON FUNCTION dispatch.results(bigint[]) IS
'State, attempt, result and error of the given jobs (unknown ids are absent).
Example: SELECT * FROM dispatch.results(ARRAY[1,2,3]);';

CREATE FUNCTION dispatch.cancel(p_id bigint, p_reason text DEFAULT 'cancelled by client')
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    j dispatch.jobs;
    v_was_leased boolean;
BEGIN
    SELECT * INTO j FROM dispatch.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', p_id USING ERRCODE = 'PD007';
    END IF;
    IF j.state NOT IN ('queued', 'leased') THEN
        RETURN j.state;
    END IF;
    v_was_leased := j.state = 'leased';
    UPDATE dispatch.jobs SET
        state = CASE WHEN deadline <= now() THEN 'expired' ELSE 'cancelled' END,
        error = jsonb_build_object('code', CASE WHEN deadline <= now() THEN 'deadline_exceeded' ELSE 'cancelled' END,
                                   'message', left(coalesce(p_reason, 'cancelled'), 1000)),
        finished_at = now()
    WHERE id = p_id
    RETURNING * INTO j;
    IF v_was_leased THEN
        -- The leasing node aborts its transfer; its late result is refused by fencing.
        PERFORM pg_notify(dispatch.node_channel(j.leased_by), j.id::text);
    END IF;
    PERFORM dispatch._notify_replies(ARRAY[j.reply_channel], ARRAY[j.id]);
    RETURN j.state;
END
$$;
COMMENT ON FUNCTION dispatch.cancel(bigint, text) IS
'Cancels a queued or leased job (expired instead when its deadline has passed); a
leasing node is told on its channel to abort. Returns the job''s state afterwards;
a finished job is left as it is. Raises PD007 for an unknown id.
Example: SELECT dispatch.cancel(42, ''user pressed stop'');';

------------------------------------------------------------------------------
-- Daemon side: identity from the session, never from an argument
------------------------------------------------------------------------------

CREATE TYPE dispatch.node_session AS (node_id integer, node_name text, node_channel text,
                                      model_channels text[]);

CREATE FUNCTION dispatch._node_session(n dispatch.nodes) RETURNS dispatch.node_session
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT ROW(n.id, n.name, dispatch.node_channel(n.id),
               ARRAY(SELECT dispatch.model_channel(m) FROM unnest(n.models) m))::dispatch.node_session);
END
$$;
COMMENT ON FUNCTION dispatch._node_session(dispatch.nodes) IS
'Internal: what a daemon needs after register/report: its id, name and channels to LISTEN on.';

CREATE FUNCTION dispatch.register(
    p_provider_family text, p_models text[], p_max_concurrency integer DEFAULT NULL,
    p_region text DEFAULT NULL, p_labels jsonb DEFAULT '{}', p_holding json DEFAULT NULL)
RETURNS dispatch.node_session
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n dispatch.nodes := dispatch._session_node(false);
    v_holder record;
    v_lock_timeout text;
    v_done_ids bigint[];
    v_done_channels text[];
    v_wake_models text[];
BEGIN
    IF p_provider_family IS NULL OR p_provider_family !~ '^[a-z0-9_.-]{1,32}$' THEN
        RAISE EXCEPTION 'provider family must be 1 to 32 of a-z 0-9 _ . -, got "%"', p_provider_family
            USING ERRCODE = '22023';
    END IF;
    PERFORM dispatch._check_models(p_models);
    IF p_max_concurrency IS NOT NULL AND p_max_concurrency NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'max concurrency must be between 1 and 100000, got %', p_max_concurrency
            USING ERRCODE = '22023';
    END IF;
    PERFORM dispatch._check_text('region', p_region, 64, true);
    IF p_labels IS NULL OR jsonb_typeof(p_labels) <> 'object' OR length(p_labels::text) > 4096 THEN
        RAISE EXCEPTION 'labels must be a JSON object of at most 4096 bytes' USING ERRCODE = '22023';
    END IF;

    -- The liveness lock: held by this backend for as long as its connection lives.
    -- Wait briefly rather than try once: another session probing liveness may hold
    -- it shared for the rest of its transaction (see _node_live).
    IF n.backend_pid IS DISTINCT FROM pg_backend_pid() THEN
        v_lock_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', '2s', true);
        BEGIN
            PERFORM pg_advisory_lock(dispatch._lock_class(), n.id);
        EXCEPTION WHEN lock_not_available THEN
            SELECT a.pid, a.usename, a.client_addr, a.backend_start INTO v_holder
            FROM dispatch._live_nodes() l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.node_id = n.id AND l.mode = 'ExclusiveLock';
            RAISE EXCEPTION 'node "%" already has a live session (backend pid %, role %, from %, since %)',
                n.name, v_holder.pid, v_holder.usename, coalesce(v_holder.client_addr::text, 'local socket'),
                v_holder.backend_start
                USING ERRCODE = 'PD006',
                      HINT = 'Stop the other daemon, or end its session with SELECT dispatch.revoke(...) / pg_terminate_backend.';
        END;
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    END IF;

    -- Leases this node holds but its daemon does not know of (granted in a reply
    -- lost with the connection, or held by a previous incarnation that died) are
    -- taken back now instead of when they expire.
    IF p_holding IS NOT NULL THEN
        IF json_typeof(p_holding) <> 'array' THEN
            RAISE EXCEPTION 'holding must be a JSON array of {"id", "attempt"}' USING ERRCODE = '22023';
        END IF;
        SELECT array_agg(t.id) FILTER (WHERE t.state <> 'queued'), array_agg(t.reply_channel) FILTER (WHERE t.state <> 'queued'),
               array_agg(t.model) FILTER (WHERE t.state = 'queued')
        INTO v_done_ids, v_done_channels, v_wake_models
        FROM dispatch._take_back(ARRAY(
            SELECT j.id FROM dispatch.jobs j
            WHERE j.state = 'leased' AND j.leased_by = n.id
              AND NOT EXISTS (SELECT 1 FROM json_to_recordset(p_holding) AS h(id bigint, attempt integer)
                              WHERE h.id = j.id AND h.attempt = j.attempt)
            FOR UPDATE), 'abandoned') t;
        PERFORM dispatch._notify_replies(v_done_channels, v_done_ids);
        PERFORM dispatch._notify_models(v_wake_models);
    END IF;

    UPDATE dispatch.nodes SET
        provider_family = p_provider_family, models = p_models, max_concurrency = p_max_concurrency,
        region = p_region, labels = p_labels, backend_pid = pg_backend_pid(),
        health = 'healthy', health_reason = NULL, health_changed_at = now(),
        registered_at = now(), updated_at = now()
    WHERE id = n.id
    RETURNING * INTO n;
    RETURN dispatch._node_session(n);
END
$$;
COMMENT ON FUNCTION dispatch.register(text, text[], integer, text, jsonb, json) IS
'Called by a daemon after connecting with its node role: records what it serves
(provider family, models, max concurrency or NULL when the provider does not say,
region, labels), marks it healthy and takes its liveness lock. A second live
session for the same node is refused (PD006). Returns the node id and the channels
to LISTEN on (its own and one per model). p_holding, when given, is a JSON array of
{"id", "attempt"} the daemon is still running: any other lease the node holds (granted
in a reply lost with the connection, or left by a previous incarnation) is taken back
at once, counting as an attempt (code lease_abandoned). A fresh daemon passes [].
Example: SELECT * FROM dispatch.register(''llamacpp'', ARRAY[''llama3''], 8, p_holding => ''[]'');';

CREATE FUNCTION dispatch.report(p_health text, p_reason text DEFAULT NULL,
                                p_max_concurrency integer DEFAULT NULL, p_models text[] DEFAULT NULL)
RETURNS dispatch.node_session
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE n dispatch.nodes := dispatch._session_node(true);
BEGIN
    IF p_health IS NULL OR p_health NOT IN ('healthy', 'degraded') THEN
        RAISE EXCEPTION 'health must be healthy or degraded, got "%"', p_health USING ERRCODE = '22023';
    END IF;
    PERFORM dispatch._check_text('reason', p_reason, 1000, true);
    IF p_max_concurrency IS NOT NULL AND p_max_concurrency NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'max concurrency must be between 1 and 100000, got %', p_max_concurrency
            USING ERRCODE = '22023';
    END IF;
    IF p_models IS NOT NULL THEN
        PERFORM dispatch._check_models(p_models);
    END IF;
    UPDATE dispatch.nodes SET
        health = p_health,
        health_reason = CASE WHEN p_health = 'healthy' THEN NULL ELSE p_reason END,
        health_changed_at = CASE WHEN health <> p_health THEN now() ELSE health_changed_at END,
        max_concurrency = p_max_concurrency,
        models = coalesce(p_models, models),
        updated_at = now()
    WHERE id = n.id
    RETURNING * INTO n;
    RETURN dispatch._node_session(n);
END
$$;
COMMENT ON FUNCTION dispatch.report(text, text, integer, text[]) IS
'A daemon reports a change: health (healthy | degraded, with a reason), its max
concurrency (NULL: unreported) and, when not NULL, the models it serves. A degraded
node takes no work and counts for no capacity. Returns the channels to LISTEN on.
Example: SELECT * FROM dispatch.report(''degraded'', ''provider refused connection'', 8);';

-- Jobs a node holds go back to the queue without counting as a failure.
CREATE FUNCTION dispatch._hand_back(p_node_id integer) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE v_models text[];
BEGIN
    WITH back AS (
        -- The attempt number stays (it is the fencing token of the abandoned lease);
        -- one more allowed attempt keeps the hand-back from counting as a failure.
        UPDATE dispatch.jobs SET state = 'queued', run_at = now(), leased_by = NULL, lease_expires_at = NULL,
            max_attempts = least(100, max_attempts + 1)
        WHERE state = 'leased' AND leased_by = p_node_id
        RETURNING model
    )
    SELECT array_agg(model) INTO v_models FROM back;
    PERFORM dispatch._notify_models(v_models);
    RETURN coalesce(cardinality(v_models), 0);
END
$$;
COMMENT ON FUNCTION dispatch._hand_back(integer) IS
'Internal: requeue every job leased by a node (deregister, revoke) and wake its models.';

CREATE FUNCTION dispatch.deregister() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n dispatch.nodes := dispatch._session_node(true);
    v_back integer;
BEGIN
    v_back := dispatch._hand_back(n.id);
    UPDATE dispatch.nodes SET backend_pid = NULL, updated_at = now() WHERE id = n.id;
    PERFORM pg_advisory_unlock(dispatch._lock_class(), n.id);
    RETURN v_back;
END
$$;
COMMENT ON FUNCTION dispatch.deregister() IS
'Called by a daemon that is shutting down after its in-flight work finished: hands
back any job it still holds (requeued, not counted as a failed attempt), releases
its liveness lock. Returns how many jobs were handed back.
Example: SELECT dispatch.deregister();';

CREATE TYPE dispatch.exchange_row AS (kind text, id bigint, attempt integer, model text, endpoint text,
                                      payload json, deadline timestamptz, lease_expires_at timestamptz);

CREATE FUNCTION dispatch._next_wake(n dispatch.nodes) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT least(
        (SELECT min(r.run_at) FROM unnest(n.models) m(model),
             LATERAL (SELECT j.run_at FROM dispatch.jobs j
                      -- run_at > now() >= created_at: only jobs_delayed rows qualify.
                      WHERE j.state = 'queued' AND j.model = m.model AND j.run_at > now()
                        AND j.run_at > j.created_at
                      ORDER BY j.run_at LIMIT 1) r),
        (SELECT min(j.lease_expires_at) FROM dispatch.jobs j
         WHERE j.state = 'leased' AND j.model = ANY (n.models))));
END
$$;
COMMENT ON FUNCTION dispatch._next_wake(dispatch.nodes) IS
'Internal: earliest future moment a node has reason to look: a delayed retry on its
models becoming due, or a lease on its models running out.';

CREATE FUNCTION dispatch._take_back(p_ids bigint[], p_why text)
RETURNS TABLE (id bigint, state text, reply_channel text, model text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE dispatch.jobs j SET
        state = CASE WHEN j.deadline <= now() THEN 'expired'
                     WHEN j.attempt >= j.max_attempts THEN 'failed' ELSE 'queued' END,
        error = jsonb_build_object('code', CASE WHEN j.deadline <= now() THEN 'deadline_exceeded'
                                                ELSE 'lease_' || p_why END,
                                   'message', format('lease of attempt %s held by node %s %s (it ran until %s)',
                                                     j.attempt, j.leased_by, p_why, j.lease_expires_at)),
        run_at = now(),
        finished_at = CASE WHEN j.deadline <= now() OR j.attempt >= j.max_attempts THEN clock_timestamp() END,
        leased_by = CASE WHEN j.deadline <= now() OR j.attempt >= j.max_attempts THEN j.leased_by END,
        lease_expires_at = NULL
    WHERE j.id = ANY (p_ids) AND j.state = 'leased'
    RETURNING j.id, j.state, j.reply_channel, j.model;
END
$$;
COMMENT ON FUNCTION dispatch._take_back(bigint[], text) IS
'Internal: leased jobs whose holder lost them (p_why: expired | abandoned) go back to
the queue, or end failed (attempts spent) or expired (deadline passed). The attempt
counts: a job that keeps killing its holder runs out of attempts.';

CREATE FUNCTION dispatch._take_back_expired(p_models text[], p_limit integer)
RETURNS TABLE (id bigint, state text, reply_channel text, model text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT * FROM dispatch._take_back(ARRAY(
        SELECT j.id FROM dispatch.jobs j
        WHERE j.state = 'leased' AND j.lease_expires_at < now()
          AND (p_models IS NULL OR j.model = ANY (p_models))
        ORDER BY j.lease_expires_at LIMIT p_limit
        FOR UPDATE SKIP LOCKED), 'expired');
END
$$;
COMMENT ON FUNCTION dispatch._take_back_expired(text[], integer) IS
'Internal: leases that ran out (on these models, or all when NULL) are taken back.';

-- The daemon's one round trip: settle finished jobs, take back expired leases on
-- its models, lease up to its free slots, and say when to look again.
CREATE FUNCTION dispatch.exchange(p_outcomes json, p_max_jobs integer)
RETURNS SETOF dispatch.exchange_row
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n dispatch.nodes := dispatch._session_node(true);
    v_now timestamptz := now();
    v_lease interval := make_interval(secs => dispatch._setting('lease_seconds'));
    v_out dispatch.exchange_row[] := '{}';
    v_batch dispatch.exchange_row[];
    v_done_ids bigint[];
    v_done_channels text[];
    v_wake_models text[];
    v_more_ids bigint[];
    v_more_channels text[];
    v_more_models text[];
    v_slots integer;
    v_free integer;
    v_leased integer := 0;
    v_want integer;
    v_expired integer;
    v_malformed bigint;
    v_settled boolean := false;
BEGIN
    IF p_max_jobs IS NULL OR p_max_jobs < 0 OR p_max_jobs > 10000 THEN
        RAISE EXCEPTION 'max_jobs must be between 0 and 10000, got %', p_max_jobs USING ERRCODE = '22023';
    END IF;

    IF p_outcomes IS NOT NULL AND json_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = '22023';
    END IF;

    -- 1. Settle outcomes; (id, attempt) is the fencing token.
    IF p_outcomes IS NOT NULL THEN
        -- One parse of the whole array; "result" keeps the provider's bytes.
        -- id, attempt and retryable are read as text and converted only when well
        -- formed, so a malformed outcome is refused with 22023, never a cast error.
        WITH o AS MATERIALIZED (
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
                             WHEN j.deadline <= v_now THEN 'expired'
                             WHEN o.retryable AND j.attempt < j.max_attempts THEN 'queued'
                             ELSE 'failed' END,
                result = CASE WHEN o.error IS NULL THEN o.result END,
                error = o.error,
                run_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                              THEN v_now + dispatch._backoff(j.attempt) ELSE j.run_at END,
                finished_at = CASE WHEN o.error IS NOT NULL AND o.retryable AND j.attempt < j.max_attempts
                                    AND (j.deadline IS NULL OR j.deadline > v_now)
                                   THEN NULL ELSE clock_timestamp() END,
                lease_expires_at = NULL
            FROM o
            WHERE j.id = o.id AND j.attempt = o.attempt AND j.state = 'leased' AND j.leased_by = n.id
            RETURNING j.id, j.attempt, j.state, j.reply_channel, j.model
        )
        SELECT array_agg(s.id) FILTER (WHERE s.state <> 'queued'),
               array_agg(s.reply_channel) FILTER (WHERE s.state <> 'queued'),
               array_agg(s.model) FILTER (WHERE s.state = 'queued'),
               array_cat(v_out, array_agg(ROW('stale', o.id, o.attempt, NULL, NULL, NULL, NULL, NULL)::dispatch.exchange_row)
                                FILTER (WHERE s.id IS NULL)),
               count(*) FILTER (WHERE o.id IS NULL OR o.attempt IS NULL OR (o.result IS NULL) = (o.error IS NULL)
                                      OR jsonb_typeof(o.error) <> 'object' OR o.retryable IS NULL)
        INTO v_done_ids, v_done_channels, v_wake_models, v_out, v_malformed
        FROM o LEFT JOIN settled s ON s.id = o.id AND s.attempt = o.attempt;
        v_settled := v_done_ids IS NOT NULL OR v_wake_models IS NOT NULL OR cardinality(v_out) > 0;
        IF v_malformed > 0 THEN
            RAISE EXCEPTION 'each outcome must be {"id", "attempt", and either "result" or "error" (an object)}'
                USING ERRCODE = '22023';
        END IF;
    END IF;

    -- 2. Lease, if this node may take work.
    IF p_max_jobs > 0 AND n.admin_state = 'active' AND n.health = 'healthy' THEN
        -- Take back expired leases on this node's models (their holders are gone or stuck).
        SELECT array_agg(b.id) FILTER (WHERE b.state <> 'queued'),
               array_agg(b.reply_channel) FILTER (WHERE b.state <> 'queued'),
               array_agg(b.model) FILTER (WHERE b.state = 'queued')
        INTO v_more_ids, v_more_channels, v_more_models
        FROM dispatch._take_back_expired(n.models, 1000) b;
        v_done_ids := v_done_ids || v_more_ids;
        v_done_channels := v_done_channels || v_more_channels;
        v_wake_models := v_wake_models || v_more_models;

        v_slots := coalesce(n.max_concurrency, dispatch._setting('default_slots_per_node')::integer);
        v_free := v_slots - (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'leased' AND j.leased_by = n.id);

        -- Jobs whose deadline passed while queued are expired as they are met, and
        -- do not use a slot; look again until the slots are used or the queue is dry.
        LOOP
            v_want := least(p_max_jobs, v_free) - v_leased;
            EXIT WHEN v_want <= 0;
            WITH picked AS (
                SELECT c.id FROM unnest(n.models) AS m(model)
                CROSS JOIN LATERAL (
                    SELECT j.id, j.priority, j.run_at FROM dispatch.jobs j
                    WHERE j.state = 'queued' AND j.model = m.model AND j.run_at <= v_now
                    ORDER BY j.priority DESC, j.run_at, j.id
                    LIMIT v_want
                    FOR UPDATE SKIP LOCKED) c
                ORDER BY c.priority DESC, c.run_at, c.id
                LIMIT v_want
            ),
            taken AS (
                UPDATE dispatch.jobs j SET
                    state = CASE WHEN j.deadline <= v_now THEN 'expired' ELSE 'leased' END,
                    attempt = CASE WHEN j.deadline <= v_now THEN j.attempt ELSE j.attempt + 1 END,
                    leased_by = CASE WHEN j.deadline <= v_now THEN j.leased_by ELSE n.id END,
                    lease_expires_at = CASE WHEN j.deadline <= v_now THEN NULL ELSE v_now + v_lease END,
                    started_at = CASE WHEN j.deadline <= v_now THEN j.started_at ELSE v_now END,
                    finished_at = CASE WHEN j.deadline <= v_now THEN clock_timestamp() END,
                    error = CASE WHEN j.deadline <= v_now
                                 THEN jsonb_build_object('code', 'deadline_exceeded',
                                                         'message', 'deadline passed while the job was queued')
                                 ELSE j.error END
                FROM picked WHERE j.id = picked.id
                RETURNING j.*
            )
            SELECT array_agg(ROW('job', t.id, t.attempt, t.model, t.endpoint, t.payload, t.deadline,
                                 t.lease_expires_at)::dispatch.exchange_row
                             ORDER BY t.priority DESC, t.run_at, t.id) FILTER (WHERE t.state = 'leased'),
                   array_agg(t.id) FILTER (WHERE t.state = 'expired'),
                   array_agg(t.reply_channel) FILTER (WHERE t.state = 'expired')
            INTO v_batch, v_more_ids, v_more_channels
            FROM taken t;
            v_out := v_out || coalesce(v_batch, '{}');
            v_leased := v_leased + coalesce(cardinality(v_batch), 0);
            v_expired := coalesce(cardinality(v_more_ids), 0);
            v_done_ids := v_done_ids || v_more_ids;
            v_done_channels := v_done_channels || v_more_channels;
            EXIT WHEN v_expired = 0;
        END LOOP;

        UPDATE dispatch.nodes SET last_poll_started_at = v_now, last_poll_completed_at = clock_timestamp()
        WHERE id = n.id;
    END IF;

    -- A round trip that settled nothing need not wait for the disk: if a crash
    -- loses it, its jobs are simply still queued (or still leased until expiry),
    -- and fencing refuses the lost attempt's results. This takes the flush off the
    -- path from submit to provider. Settled outcomes keep the durable commit.
    IF v_done_ids IS NULL AND v_wake_models IS NULL AND NOT v_settled THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;

    PERFORM dispatch._notify_replies(v_done_channels, v_done_ids);
    PERFORM dispatch._notify_models(v_wake_models);

    RETURN QUERY SELECT * FROM unnest(v_out);
    IF p_max_jobs > 0 AND v_leased < p_max_jobs THEN
        RETURN NEXT ROW('wake', NULL, NULL, NULL, NULL, NULL, NULL,
                        CASE WHEN n.admin_state = 'active' AND n.health = 'healthy'
                             THEN dispatch._next_wake(n) END)::dispatch.exchange_row;
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
(never more than its free slots) are leased, highest priority first.
Rows: kind ''job'' for each leased job (id, attempt, model, endpoint, payload,
deadline, lease_expires_at); kind ''stale'' for an outcome refused because its
attempt no longer holds the lease (fencing); and, when fewer than p_max_jobs were
leased, one kind ''wake'' row whose lease_expires_at is the next moment to look
(NULL: wait for a notification). Waiting gateways are NOTIFYed with finished ids.
Example: SELECT * FROM dispatch.exchange(''[{"id":7,"attempt":1,"result":{"ok":true}}]'', 10);';

CREATE FUNCTION dispatch.lease(p_max_jobs integer)
RETURNS TABLE (id bigint, attempt integer, model text, endpoint text, payload json,
               deadline timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT e.id, e.attempt, e.model, e.endpoint, e.payload, e.deadline, e.lease_expires_at
    FROM dispatch.exchange(NULL, p_max_jobs) e WHERE e.kind = 'job';
END
$$;
COMMENT ON FUNCTION dispatch.lease(integer) IS
'Leases up to p_max_jobs jobs for the calling node (never more than its free slots),
for models it serves, highest priority first, using FOR UPDATE SKIP LOCKED; takes
back expired leases first. Same as dispatch.exchange(NULL, p_max_jobs) without the
wake row. Example: SELECT * FROM dispatch.lease(4);';

CREATE FUNCTION dispatch.next_wake() RETURNS timestamptz
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT dispatch._next_wake(dispatch._session_node(true)));
END
$$;
COMMENT ON FUNCTION dispatch.next_wake() IS
'The earliest future moment the calling node has reason to look again (a delayed
retry on its models becomes due, a lease on its models runs out), or NULL: sleep on
LISTEN until notified. Example: SELECT dispatch.next_wake();';

CREATE FUNCTION dispatch._settle_one(p_id bigint, p_attempt integer, p_outcome json) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM dispatch.exchange(json_build_array(p_outcome), 0) e WHERE e.kind = 'stale') THEN
        RAISE EXCEPTION 'attempt % of job % no longer holds its lease; result refused', p_attempt, p_id
            USING ERRCODE = 'PD004';
    END IF;
END
$$;
COMMENT ON FUNCTION dispatch._settle_one(bigint, integer, json) IS
'Internal: settle one outcome through exchange, raising PD004 when fencing refuses it.';

CREATE FUNCTION dispatch.complete(p_id bigint, p_attempt integer, p_result json) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch._settle_one(p_id, p_attempt,
        json_build_object('id', p_id, 'attempt', p_attempt, 'result', coalesce(p_result, 'null'::json)));
END
$$;
COMMENT ON FUNCTION dispatch.complete(bigint, integer, json) IS
'Marks attempt p_attempt of job p_id succeeded with p_result. Raises PD004 when that
attempt no longer holds the lease (taken back, cancelled, or another node''s job).
Batched form: dispatch.exchange. Example: SELECT dispatch.complete(7, 1, ''{"choices":[]}'');';

CREATE FUNCTION dispatch.fail(p_id bigint, p_attempt integer, p_error jsonb, p_retryable boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch._settle_one(p_id, p_attempt,
        json_build_object('id', p_id, 'attempt', p_attempt, 'error', coalesce(p_error, '{}'::jsonb),
                          'retryable', coalesce(p_retryable, false)));
END
$$;
COMMENT ON FUNCTION dispatch.fail(bigint, integer, jsonb, boolean) IS
'Records a failed attempt. Retryable: back to the queue after backoff while attempts
remain, else failed. Not retryable: failed now. p_error is {"code","message",
"status"?, "body"?}. Raises PD004 when the attempt no longer holds the lease.
Example: SELECT dispatch.fail(7, 1, ''{"code":"provider_5xx","status":503}'', true);';

CREATE FUNCTION dispatch.extend(p_ids bigint[], p_attempts integer[])
RETURNS TABLE (id bigint, attempt integer, ok boolean, lease_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE n dispatch.nodes := dispatch._session_node(true);
BEGIN
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_attempts) THEN
        RAISE EXCEPTION 'ids and attempts must have the same length' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    WITH want AS (SELECT * FROM unnest(p_ids, p_attempts) AS w(id, attempt)),
    ext AS (
        UPDATE dispatch.jobs j SET lease_expires_at = now() + make_interval(secs => dispatch._setting('lease_seconds'))
        FROM want
        WHERE j.id = want.id AND j.attempt = want.attempt AND j.state = 'leased' AND j.leased_by = n.id
        RETURNING j.id, j.lease_expires_at
    )
    SELECT w.id, w.attempt, e.id IS NOT NULL, e.lease_expires_at
    FROM want w LEFT JOIN ext e ON e.id = w.id;
END
$$;
COMMENT ON FUNCTION dispatch.extend(bigint[], integer[]) IS
'Renews the leases of the calling node''s long-running jobs by lease_seconds. A row
with ok = false means that attempt no longer holds its lease (cancelled, taken back,
not this node''s): abort it. Example: SELECT * FROM dispatch.extend(ARRAY[7], ARRAY[1]);';

------------------------------------------------------------------------------
-- Operator side
------------------------------------------------------------------------------

CREATE FUNCTION dispatch._node_by_name(p_name text) RETURNS dispatch.nodes
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE n dispatch.nodes;
BEGIN
    SELECT * INTO n FROM dispatch.nodes WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no node named "%"', p_name USING ERRCODE = 'PD007',
            HINT = 'SELECT name FROM dispatch.nodes(); lists them.';
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION dispatch._node_by_name(text) IS
'Internal: the node row by name, locked, or PD007.';

CREATE FUNCTION dispatch.enroll(p_name text, p_password text DEFAULT NULL, p_role text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_role text;
    v_created boolean := false;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$' THEN
        RAISE EXCEPTION 'node name must be 1 to 63 of letters, digits, . _ - (starting with a letter or digit), got "%"',
            p_name USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM dispatch.nodes WHERE name = p_name) THEN
        RAISE EXCEPTION 'node "%" is already enrolled', p_name USING ERRCODE = '22023',
            HINT = 'dispatch.revoke it first to enroll it again.';
    END IF;
    v_role := coalesce(p_role, left('dispatch_node_' || lower(regexp_replace(p_name, '[^A-Za-z0-9_]', '_', 'g')), 63));
    IF length(v_role) NOT BETWEEN 1 AND 63 THEN
        RAISE EXCEPTION 'role name must be 1 to 63 characters' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM dispatch.nodes WHERE role_name = v_role) THEN
        RAISE EXCEPTION 'role "%" already belongs to another node', v_role USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
        IF (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = v_role)
           OR v_role IN ('dispatch_gateway', 'dispatch_daemon', 'dispatch_admin')
           OR pg_has_role(v_role, 'dispatch_gateway', 'MEMBER') OR pg_has_role(v_role, 'dispatch_admin', 'MEMBER') THEN
            RAISE EXCEPTION 'role "%" cannot be a node role: it is a superuser, can create roles, or is (in) a gateway or admin group',
                v_role USING ERRCODE = '22023';
        END IF;
        EXECUTE format('GRANT dispatch_daemon TO %I', v_role);
        IF p_password IS NOT NULL THEN
            EXECUTE format('ALTER ROLE %I PASSWORD %L', v_role, p_password);
        END IF;
    ELSE
        IF p_password IS NULL THEN
            EXECUTE format('CREATE ROLE %I LOGIN IN ROLE dispatch_daemon', v_role);
        ELSE
            EXECUTE format('CREATE ROLE %I LOGIN IN ROLE dispatch_daemon PASSWORD %L', v_role, p_password);
        END IF;
        v_created := true;
    END IF;
    INSERT INTO dispatch.nodes (name, role_name, role_created) VALUES (p_name, v_role, v_created);
    RETURN v_role;
END
$$;
COMMENT ON FUNCTION dispatch.enroll(text, text, text) IS
'Enrolls a node: creates its LOGIN role (default dispatch_node_<name>, member of
dispatch_daemon) with an optional password, or adopts an existing non-superuser
role. Returns the role name the node''s daemon logs in with.
Example: SELECT dispatch.enroll(''gpu-a'', ''s3cret'');';

CREATE FUNCTION dispatch._set_admin_state(p_name text, p_state text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE n dispatch.nodes := dispatch._node_by_name(p_name);
BEGIN
    UPDATE dispatch.nodes SET admin_state = p_state, updated_at = now() WHERE id = n.id;
    IF p_state = 'active' THEN
        PERFORM dispatch._notify_models(n.models);  -- a re-enabled node looks for work at once
    END IF;
    RETURN p_state;
END
$$;
COMMENT ON FUNCTION dispatch._set_admin_state(text, text) IS
'Internal: change a node''s admin state.';

CREATE FUNCTION dispatch.drain(p_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT dispatch._set_admin_state(p_name, 'draining'));
END
$$;
COMMENT ON FUNCTION dispatch.drain(text) IS
'Stops a node from taking new work; what it holds finishes. Its capacity leaves the
model totals at once. Example: SELECT dispatch.drain(''gpu-a'');';

CREATE FUNCTION dispatch.disable(p_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT dispatch._set_admin_state(p_name, 'disabled'));
END
$$;
COMMENT ON FUNCTION dispatch.disable(text) IS
'Takes a node out of service (no new work, no capacity) until enabled; unlike
revoke it keeps its role and session. Example: SELECT dispatch.disable(''gpu-a'');';

CREATE FUNCTION dispatch.enable(p_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT dispatch._set_admin_state(p_name, 'active'));
END
$$;
COMMENT ON FUNCTION dispatch.enable(text) IS
'Returns a drained or disabled node to service and wakes it.
Example: SELECT dispatch.enable(''gpu-a'');';

CREATE FUNCTION dispatch.revoke(p_name text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n dispatch.nodes := dispatch._node_by_name(p_name);
    v_back integer;
BEGIN
    PERFORM pg_terminate_backend(l.pid) FROM dispatch._live_nodes() l WHERE l.node_id = n.id AND l.mode = 'ExclusiveLock';
    v_back := dispatch._hand_back(n.id);
    DELETE FROM dispatch.nodes WHERE id = n.id;
    IF n.role_created THEN
        BEGIN
            EXECUTE format('DROP ROLE IF EXISTS %I', n.role_name);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            -- Someone gave the role objects or grants elsewhere: disarm it instead.
            EXECUTE format('REVOKE dispatch_daemon FROM %I', n.role_name);
            EXECUTE format('ALTER ROLE %I NOLOGIN', n.role_name);
            RAISE WARNING 'role "%" owns objects or holds privileges, so it was set NOLOGIN instead of dropped', n.role_name;
        END;
    ELSE
        EXECUTE format('REVOKE dispatch_daemon FROM %I', n.role_name);
    END IF;
    RETURN v_back;
END
$$;
COMMENT ON FUNCTION dispatch.revoke(text) IS
'Removes a node: ends its database session, requeues the jobs it held (their late
results are refused by fencing), deletes it and drops the role enroll created
(or takes dispatch_daemon away from an adopted one). Returns the jobs requeued.
Example: SELECT dispatch.revoke(''gpu-a'');';

CREATE FUNCTION dispatch.nodes()
RETURNS TABLE (name text, role_name name, provider_family text, models text[], max_concurrency integer,
               slots integer, region text, labels jsonb, admin_state text, health text, health_reason text,
               live boolean, backend_pid integer, in_flight bigint, last_poll_started_at timestamptz,
               last_poll_completed_at timestamptz, registered_at timestamptz, enrolled_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT n.name, n.role_name, n.provider_family, n.models, n.max_concurrency,
           coalesce(n.max_concurrency, dispatch._setting('default_slots_per_node')::integer),
           n.region, n.labels, n.admin_state, n.health, n.health_reason,
           l.node_id IS NOT NULL, l.pid,
           (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'leased' AND j.leased_by = n.id),
           n.last_poll_started_at, n.last_poll_completed_at, n.registered_at, n.enrolled_at
    FROM dispatch.nodes n
    LEFT JOIN dispatch._live_nodes() l ON l.node_id = n.id AND l.pid = n.backend_pid
    ORDER BY n.name;
END
$$;
COMMENT ON FUNCTION dispatch.nodes() IS
'Every enrolled node: what it serves, its slots, admin state, health, whether it is
connected (live), jobs in flight and when it last polled.
Example: SELECT name, live, health, in_flight FROM dispatch.nodes();';

CREATE FUNCTION dispatch.queues()
RETURNS TABLE (model text, queued bigint, ready bigint, leased bigint, oldest_ready_at timestamptz,
               capacity integer, tier text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT q.model, q.queued, q.ready, q.leased, q.oldest_ready_at, c.capacity, c.tier
    FROM (SELECT j.model,
                 count(*) FILTER (WHERE j.state = 'queued') AS queued,
                 count(*) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS ready,
                 count(*) FILTER (WHERE j.state = 'leased') AS leased,
                 min(j.run_at) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS oldest_ready_at
          FROM dispatch.jobs j WHERE j.state IN ('queued', 'leased') GROUP BY j.model) q
    LEFT JOIN dispatch._capacity(NULL) c ON c.model = q.model
    ORDER BY q.model;
END
$$;
COMMENT ON FUNCTION dispatch.queues() IS
'Unfinished work per model: queued (ready now or delayed), leased, the oldest ready
job, and the model''s capacity and tier. Example: SELECT * FROM dispatch.queues();';

CREATE FUNCTION dispatch.requeue(p_ids bigint[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_models text[];
    v_leased_ids bigint[];
    v_leased_nodes integer[];
BEGIN
    WITH target AS (
        SELECT j.id, j.state AS old_state, j.leased_by FROM dispatch.jobs j
        WHERE j.id = ANY (p_ids) AND j.state IN ('leased', 'failed', 'expired', 'cancelled')
        FOR UPDATE
    ),
    moved AS (
        UPDATE dispatch.jobs j SET state = 'queued', run_at = now(), finished_at = NULL, result = NULL,
            deadline = NULL, lease_expires_at = NULL, leased_by = NULL,
            max_attempts = least(100, j.attempt + j.max_attempts)
        FROM target t WHERE j.id = t.id
        RETURNING j.id, j.model, t.old_state, t.leased_by
    )
    SELECT array_agg(m.model), array_agg(m.id) FILTER (WHERE m.old_state = 'leased'),
           array_agg(m.leased_by) FILTER (WHERE m.old_state = 'leased')
    INTO v_models, v_leased_ids, v_leased_nodes
    FROM moved m;
    PERFORM pg_notify(dispatch.node_channel(x.node), x.id::text)
    FROM unnest(v_leased_ids, v_leased_nodes) AS x(id, node);
    PERFORM dispatch._notify_models(v_models);
    RETURN coalesce(cardinality(v_models), 0);
END
$$;
COMMENT ON FUNCTION dispatch.requeue(bigint[]) IS
'Puts failed, expired, cancelled or leased jobs back in the queue now, with a fresh
set of attempts and no deadline (a leasing node is told to abort; its late result
is refused). Returns how many moved. Example: SELECT dispatch.requeue(ARRAY[41,42]);';

CREATE FUNCTION dispatch.prune(p_max_rows integer DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := coalesce(p_max_rows, dispatch._setting('prune_batch')::integer);
    v_cutoff timestamptz := now() - make_interval(secs => dispatch._setting('retention_seconds'));
    v_ids bigint[];
    v_channels text[];
    v_models text[];
    v_deleted bigint;
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'max rows must be positive, got %', v_limit USING ERRCODE = '22023';
    END IF;
    -- Queued work nobody wants any more ends as expired, and its waiter is told.
    WITH overdue AS (
        UPDATE dispatch.jobs j SET state = 'expired', finished_at = now(),
            error = jsonb_build_object('code', 'deadline_exceeded', 'message', 'deadline passed while the job was queued')
        WHERE j.id IN (SELECT x.id FROM dispatch.jobs x WHERE x.state = 'queued' AND x.deadline <= now()
                       LIMIT v_limit FOR UPDATE SKIP LOCKED)
        RETURNING j.id, j.reply_channel
    )
    SELECT array_agg(id), array_agg(reply_channel) INTO v_ids, v_channels FROM overdue;
    PERFORM dispatch._notify_replies(v_channels, v_ids);

    -- Expired leases on models no live node serves would otherwise wait for one.
    SELECT array_agg(b.id) FILTER (WHERE b.state <> 'queued'), array_agg(b.reply_channel) FILTER (WHERE b.state <> 'queued'),
           array_agg(b.model) FILTER (WHERE b.state = 'queued')
    INTO v_ids, v_channels, v_models
    FROM dispatch._take_back_expired(NULL, v_limit) b;
    PERFORM dispatch._notify_replies(v_channels, v_ids);
    PERFORM dispatch._notify_models(v_models);

    WITH gone AS (
        DELETE FROM dispatch.jobs j
        WHERE j.id IN (SELECT x.id FROM dispatch.jobs x
                       WHERE x.finished_at < v_cutoff AND x.state IN ('succeeded', 'failed', 'cancelled', 'expired')
                       ORDER BY x.id LIMIT v_limit)
        RETURNING 1
    )
    SELECT count(*) INTO v_deleted FROM gone;
    RETURN v_deleted;
END
$$;
COMMENT ON FUNCTION dispatch.prune(integer) IS
'Maintenance, one batch per call: expires queued jobs past their deadline (telling
their waiters), takes back leases that ran out (also on models no live node serves
any more), then deletes up to p_max_rows (default prune_batch) finished jobs
older than retention_seconds, oldest first. Returns rows deleted; call it until it
returns 0 (for example from cron). Example: SELECT dispatch.prune();';

------------------------------------------------------------------------------
-- What the status and metrics endpoints show
------------------------------------------------------------------------------

CREATE FUNCTION dispatch.models()
RETURNS TABLE (model text, live_nodes integer, capacity integer, tier text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.model, c.live_nodes, c.capacity, c.tier
    FROM dispatch._capacity(NULL) c WHERE c.live_nodes > 0 ORDER BY c.model;
END
$$;
COMMENT ON FUNCTION dispatch.models() IS
'Models that at least one live, active, healthy node serves now, with capacity and
tier: what GET /v1/models lists. Example: SELECT * FROM dispatch.models();';

CREATE FUNCTION dispatch.health()
RETURNS TABLE (kind text, subject text, detail text, since timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH serving AS (SELECT * FROM dispatch._serving_nodes()),
    live AS (SELECT n.*, l.pid FROM dispatch.nodes n
             JOIN dispatch._live_nodes() l ON l.node_id = n.id AND l.pid = n.backend_pid),
    stale_after AS (SELECT make_interval(secs => dispatch._setting('stale_seconds')) AS v),
    waiting AS (
        SELECT j.model, min(j.run_at) AS oldest
        FROM dispatch.jobs j WHERE j.state = 'queued' AND j.run_at <= now()
        GROUP BY j.model
    )
    SELECT 'stuck_queue', w.model,
           format('queued jobs for "%s" and no live healthy node serves it', w.model), w.oldest
    FROM waiting w
    WHERE NOT EXISTS (SELECT 1 FROM serving s WHERE w.model = ANY (s.models))
    UNION ALL
    SELECT 'stale_node', x.name, x.detail, x.since FROM (
        SELECT n.name,
               CASE WHEN a.xact_start < now() - s.v
                    THEN format('transaction open since %s (state %s)', a.xact_start, a.state)
                    ELSE format('has free slots but has not polled since %s while "%s" waits since %s',
                                coalesce(n.last_poll_completed_at::text, 'registering'), w.model, w.oldest) END AS detail,
               coalesce(a.xact_start, w.oldest) AS since
        FROM live n CROSS JOIN stale_after s
        LEFT JOIN pg_stat_activity a ON a.pid = n.pid AND a.xact_start < now() - s.v
        LEFT JOIN LATERAL (SELECT w.* FROM waiting w WHERE w.model = ANY (n.models)
                           AND w.oldest < now() - s.v ORDER BY w.oldest LIMIT 1) w ON true
        WHERE n.admin_state = 'active' AND n.health = 'healthy'
          AND (a.pid IS NOT NULL
               OR (w.model IS NOT NULL
                   AND coalesce(n.last_poll_completed_at, n.registered_at) < w.oldest
                   AND (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'leased' AND j.leased_by = n.id)
                       < coalesce(n.max_concurrency, dispatch._setting('default_slots_per_node')::integer)))
    ) x
    UNION ALL
    SELECT 'degraded_node', n.name, coalesce(n.health_reason, 'degraded'), n.health_changed_at
    FROM live n WHERE n.health = 'degraded'
    UNION ALL
    SELECT 'notification_backlog', 'pg_notify',
           format('notification queue %s%% full: a listener is not reading (see stale nodes; revoke or restart it)',
                  round((pg_notification_queue_usage() * 100)::numeric, 1)), now()
    WHERE pg_notification_queue_usage() >= 0.05;
END
$$;
COMMENT ON FUNCTION dispatch.health() IS
'Problems now, one row each: stuck_queue (ready work for a model no live healthy node
serves), stale_node (a live node with free slots that has not looked at work waiting
past stale_seconds, or whose transaction has been open that long), degraded_node
(its provider is down), notification_backlog (the NOTIFY queue is 5% full or more).
No rows: all is well. Example: SELECT * FROM dispatch.health();';

CREATE FUNCTION dispatch.metrics()
RETURNS TABLE (name text, labels jsonb, value double precision)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH cap AS (SELECT * FROM dispatch.capacity()),
         h AS (SELECT * FROM dispatch.health()),
         nd AS (SELECT * FROM dispatch.nodes())
    SELECT 'pgdispatch_model_capacity', jsonb_build_object('model', c.model, 'tier', c.tier), c.capacity::float8 FROM cap c
    UNION ALL SELECT 'pgdispatch_model_queued', jsonb_build_object('model', c.model), c.queued::float8 FROM cap c
    UNION ALL SELECT 'pgdispatch_model_in_flight', jsonb_build_object('model', c.model), c.in_flight::float8 FROM cap c
    UNION ALL SELECT 'pgdispatch_model_queue_limit', jsonb_build_object('model', c.model), c.queue_limit::float8 FROM cap c
    UNION ALL SELECT 'pgdispatch_model_stuck', jsonb_build_object('model', c.model),
                     (EXISTS (SELECT 1 FROM h WHERE h.kind = 'stuck_queue' AND h.subject = c.model))::int::float8 FROM cap c
    UNION ALL SELECT 'pgdispatch_nodes', jsonb_build_object('state', 'live'), count(*) FILTER (WHERE nd.live)::float8 FROM nd
    UNION ALL SELECT 'pgdispatch_nodes', jsonb_build_object('state', 'disconnected'), count(*) FILTER (WHERE NOT nd.live)::float8 FROM nd
    UNION ALL SELECT 'pgdispatch_nodes', jsonb_build_object('state', 'degraded'),
                     count(*) FILTER (WHERE nd.live AND nd.health = 'degraded')::float8 FROM nd
    UNION ALL SELECT 'pgdispatch_nodes', jsonb_build_object('state', 'stale'),
                     (SELECT count(DISTINCT h.subject) FROM h WHERE h.kind = 'stale_node')::float8
    UNION ALL SELECT 'pgdispatch_notification_queue_usage', '{}'::jsonb, pg_notification_queue_usage();
END
$$;
COMMENT ON FUNCTION dispatch.metrics() IS
'Control-plane gauges for the Prometheus endpoint, one row per sample: capacity (with
tier), queued, in flight, queue limit and stuck flag per model; nodes live,
disconnected, degraded and stale; notification queue usage (0..1).
Example: SELECT * FROM dispatch.metrics();';

CREATE FUNCTION dispatch.schema_version() RETURNS integer
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT max(version) FROM dispatch.migrations);
END
$$;
COMMENT ON FUNCTION dispatch.schema_version() IS
'The newest applied migration: the gateway''s readiness check compares it with the
version it was built for. Example: SELECT dispatch.schema_version();';

------------------------------------------------------------------------------
-- API keys (stored as SHA-256 hashes; the key itself is shown once)
------------------------------------------------------------------------------

CREATE FUNCTION dispatch.create_api_key(p_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE v_key text := 'pgd_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
BEGIN
    PERFORM dispatch._check_text('key name', p_name, 100, false);
    IF EXISTS (SELECT 1 FROM dispatch.api_keys WHERE name = p_name) THEN
        RAISE EXCEPTION 'an API key named "%" exists; revoke it first', p_name USING ERRCODE = '22023';
    END IF;
    INSERT INTO dispatch.api_keys (name, key_hash) VALUES (p_name, sha256(convert_to(v_key, 'UTF8')));
    RETURN v_key;
END
$$;
COMMENT ON FUNCTION dispatch.create_api_key(text) IS
'Creates an API key for the gateway and returns it; only its hash is stored, so this
is the one time it is shown. Example: SELECT dispatch.create_api_key(''team-a'');';

CREATE FUNCTION dispatch.revoke_api_key(p_name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM dispatch.api_keys WHERE name = p_name;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION dispatch.revoke_api_key(text) IS
'Deletes an API key; true if it existed. Gateways stop accepting it when their short
cache entry lapses. Example: SELECT dispatch.revoke_api_key(''team-a'');';

CREATE FUNCTION dispatch.api_keys() RETURNS TABLE (name text, created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT k.name, k.created_at FROM dispatch.api_keys k ORDER BY k.name;
END
$$;
COMMENT ON FUNCTION dispatch.api_keys() IS
'Names and creation times of the API keys (never the keys). Example: SELECT * FROM dispatch.api_keys();';

CREATE FUNCTION dispatch.check_api_key(p_key text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT EXISTS (SELECT 1 FROM dispatch.api_keys
                   WHERE key_hash = sha256(convert_to(coalesce(p_key, ''), 'UTF8'))));
END
$$;
COMMENT ON FUNCTION dispatch.check_api_key(text) IS
'True when p_key is a current API key (compared by hash).
Example: SELECT dispatch.check_api_key(''pgd_...'');';

------------------------------------------------------------------------------
-- Privileges: each role executes its own functions and touches no table
------------------------------------------------------------------------------

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    dispatch.submit(text, text, json, integer, interval, integer, text, text),
    dispatch.submit_many(json, text),
    dispatch.results(bigint[]),
    dispatch.cancel(bigint, text),
    dispatch.models(),
    dispatch.capacity(),
    dispatch.health(),
    dispatch.metrics(),
    dispatch.schema_version(),
    dispatch.check_api_key(text),
    dispatch.model_channel(text),
    dispatch.nodes()
TO dispatch_gateway, dispatch_admin;

GRANT EXECUTE ON FUNCTION
    dispatch.register(text, text[], integer, text, jsonb, json),
    dispatch.report(text, text, integer, text[]),
    dispatch.deregister(),
    dispatch.exchange(json, integer),
    dispatch.lease(integer),
    dispatch.next_wake(),
    dispatch.complete(bigint, integer, json),
    dispatch.fail(bigint, integer, jsonb, boolean),
    dispatch.extend(bigint[], integer[]),
    dispatch.model_channel(text),
    dispatch.node_channel(integer)
TO dispatch_daemon;

GRANT EXECUTE ON FUNCTION
    dispatch.enroll(text, text, text),
    dispatch.drain(text),
    dispatch.disable(text),
    dispatch.enable(text),
    dispatch.revoke(text),
    dispatch.nodes(),
    dispatch.queues(),
    dispatch.requeue(bigint[]),
    dispatch.prune(integer),
    dispatch.set_capacity(text, integer),
    dispatch.clear_capacity(text),
    dispatch.settings(),
    dispatch.set_setting(text, numeric),
    dispatch.create_api_key(text),
    dispatch.revoke_api_key(text),
    dispatch.api_keys(),
    dispatch.node_channel(integer)
TO dispatch_admin;
