-- 022: prune reads the jobs old enough to delete, not the whole table.
--
-- prune deleted "finished before the cutoff, lowest ids first, up to a batch" by
-- reading the primary key from its start until the batch was full. A call that finds
-- fewer than a batch to delete, which is every call once the backlog is gone (the
-- README asks to call it until it returns 0), read the whole table to the end:
-- 300,000 recent jobs, 7,506 pages and ~40 ms per call here; a table that keeps a day
-- of a busy queue holds tens of millions. A job finishes after it was created, so no
-- job created at or after the cutoff is old enough: the read now also stops at the
-- first such job (by id). A call reads the jobs created before the cutoff up to a
-- full batch, and one more. Ids follow creation closely but not exactly (a submit's
-- transaction can start before another's and insert after it), so a job past that
-- first one but created before the cutoff is left to a later call: kept a little
-- longer than retention_seconds, never deleted sooner. The read is a loop over the
-- primary key because SQL has no "read while": a bound found by a query of its own
-- would read the whole backlog on every call while one is being deleted. Sequential
-- scans are off so that the loop's plan keeps reading the primary key in order.

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION dispatch.prune(p_max_rows integer DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off AS $$
DECLARE
    v_limit integer := coalesce(p_max_rows, dispatch._setting('prune_batch')::integer);
    v_cutoff timestamptz := now() - make_interval(secs => dispatch._setting('retention_seconds'));
    v_job record;
    v_old bigint[];
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

    v_old := '{}';
    FOR v_job IN SELECT x.id, x.created_at, x.finished_at, x.state FROM dispatch.jobs x ORDER BY x.id LOOP
        EXIT WHEN v_job.created_at >= v_cutoff;
        IF v_job.finished_at < v_cutoff AND v_job.state IN ('succeeded', 'failed', 'cancelled', 'expired') THEN
            v_old := array_append(v_old, v_job.id);
            EXIT WHEN cardinality(v_old) >= v_limit;
        END IF;
    END LOOP;
    -- Checked again: an operator may have requeued one meanwhile.
    WITH gone AS (
        DELETE FROM dispatch.jobs j
        WHERE j.id = ANY (v_old) AND j.finished_at < v_cutoff AND j.state IN ('succeeded', 'failed', 'cancelled', 'expired')
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
older than retention_seconds, oldest first, reading only the jobs created before
that cutoff. Returns rows deleted; call it until it returns 0 (for example from
cron). Example: SELECT dispatch.prune();';
