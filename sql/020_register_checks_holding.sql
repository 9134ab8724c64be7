-- 020: a daemon that registers again learns which of the jobs it still runs are no
-- longer its leases, and drops them before it takes new work.
--
-- A waiting request's submit commits without waiting for the disk (the gateway), and a
-- submit to an idle node pushes its job at once (015), so a daemon can be running a job
-- whose submit a PostgreSQL crash then loses. The crash loses the identity sequence's
-- advance with it, so the next submit can get the same id, and on a one-node model it is
-- pushed (or leased) to the same daemon as attempt 1 again: the (id, attempt) fence took
-- the lost job's answer for the new job, and a client got another client's answer.
-- tests/integration/test_faults.py reproduces it (a checkpoint, the WAL writer stopped,
-- a pushed request, the WAL writer killed, a second request). The gateway's side of the
-- same hazard (a cancel of the lost job reaching the new one) is in its cancel statement.
--
-- register already took back the node's leases its daemon does not hold. It now also
-- answers the other half, in what it returns: stale_holding lists the held
-- (id, attempt) pairs that are not leases of this node (lost in a crash, or taken back
-- while the daemon was away), and the daemon stops them and drops their results before
-- it sends anything else. Nothing can lease to the node in between, so a lost job's id
-- that comes round later finds the daemon no longer running it: its exchanges come
-- after register on the same connection, and no submit pushes to it, because register
-- takes the node's push lock exclusively before the liveness lock (a submit takes it
-- shared before asking whether the node is live: during register's transaction the
-- node looked live with the old session's push_pid) and clears push_pid, which only
-- the new session's accept_pushes sets again (in the transaction of its LISTEN).

SET LOCAL search_path = pg_catalog, pg_temp;

-- register returns a type of its own now (report keeps node_session): the same fields
-- and stale_holding. A new return type means a new function: dropped and created, with
-- its grant.
CREATE TYPE dispatch.node_registration AS (node_id integer, node_name text, node_channel text,
                                           model_channels text[], stale_holding json);
COMMENT ON TYPE dispatch.node_registration IS
'What register returns: the node id, name and channels to LISTEN on (as node_session), and
stale_holding, the held {"id", "attempt"} pairs that are not this node''s leases.';

DROP FUNCTION dispatch.register(text, text[], integer, text, jsonb, json);

CREATE FUNCTION dispatch.register(
    p_provider_family text, p_models text[], p_max_concurrency integer DEFAULT NULL,
    p_region text DEFAULT NULL, p_labels jsonb DEFAULT '{}', p_holding json DEFAULT NULL)
RETURNS dispatch.node_registration
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    n dispatch.nodes := dispatch._session_node(false);
    v_holder record;
    v_lock_timeout text;
    v_done_ids bigint[];
    v_done_channels text[];
    v_wake_models text[];
    v_stale json;
    v_session dispatch.node_session;
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
    IF p_holding IS NOT NULL AND json_typeof(p_holding) <> 'array' THEN
        RAISE EXCEPTION 'holding must be a JSON array of {"id", "attempt"}' USING ERRCODE = '22023';
    END IF;

    -- No submit pushes to this node until the transaction ends (see the head of 020).
    PERFORM pg_advisory_xact_lock(dispatch._push_lock_class(), n.id);

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
    -- taken back now instead of when they expire; held pairs that are not this
    -- node's leases go back to the daemon to drop.
    IF p_holding IS NOT NULL THEN
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

        SELECT coalesce(json_agg(json_build_object('id', h.id, 'attempt', h.attempt) ORDER BY h.id, h.attempt), '[]')
        INTO v_stale
        FROM json_to_recordset(p_holding) AS h(id bigint, attempt integer)
        WHERE NOT EXISTS (SELECT 1 FROM dispatch.jobs j
                          WHERE j.id = h.id AND j.attempt = h.attempt AND j.state = 'leased' AND j.leased_by = n.id);
    END IF;

    UPDATE dispatch.nodes SET
        provider_family = p_provider_family, models = p_models, max_concurrency = p_max_concurrency,
        region = p_region, labels = p_labels, backend_pid = pg_backend_pid(),
        push_pid = CASE WHEN push_pid = pg_backend_pid() THEN push_pid END,
        health = 'healthy', health_reason = NULL, health_changed_at = now(),
        registered_at = now(), updated_at = now()
    WHERE id = n.id
    RETURNING * INTO n;
    v_session := dispatch._node_session(n);
    RETURN ROW(v_session.node_id, v_session.node_name, v_session.node_channel, v_session.model_channels,
               v_stale)::dispatch.node_registration;
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
at once, counting as an attempt (code lease_abandoned), and stale_holding lists the
held pairs that are not leases of this node (the job was lost in a database crash, or
its lease was taken back): stop them and drop their results, since after a crash the
id can come round again as another job. A fresh daemon passes []. Pushes stop until
this session calls accept_pushes.
Example: SELECT * FROM dispatch.register(''llamacpp'', ARRAY[''llama3''], 8, p_holding => ''[]'');';
REVOKE EXECUTE ON FUNCTION dispatch.register(text, text[], integer, text, jsonb, json) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.register(text, text[], integer, text, jsonb, json) TO dispatch_daemon;
