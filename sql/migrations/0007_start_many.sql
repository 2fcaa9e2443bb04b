-- pgjournal schema, part 7: batch start (App.start_many).
--
-- * `start_runs` enqueues many runs of one workflow on one queue in one
--   set-based INSERT, and calls `notify_wake` once for the whole batch (when
--   it created something due now) instead of once per run.
-- * The event log row of a new run is written by a statement-level trigger
--   reading the inserted rows from a transition table: one INSERT into
--   run_events per statement instead of one trigger call and one INSERT per
--   row. The rows it writes are the ones the row-level trigger wrote. Status
--   changes keep their row-level trigger (`runs_log_status`).

-- -- the event log of inserted runs -------------------------------------------

CREATE FUNCTION log_run_inserts() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO run_events (run_id, from_status, to_status, attempt, lease_epoch,
                            worker_id, detail)
    SELECT n.id, NULL, n.status, n.attempt, n.lease_epoch, n.worker_id,
           CASE WHEN n.status IN ('failed', 'dead') THEN n.error END
    FROM new_runs n;
    RETURN NULL;
END $$;

DROP TRIGGER runs_log_insert ON runs;
CREATE TRIGGER runs_log_insert AFTER INSERT ON runs
    REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION log_run_inserts();

-- run_events rows are written only by pgjournal's own triggers and functions,
-- from a run that exists in that same statement, so the foreign key checked
-- nothing an insert could get wrong, at about 30% of a batch start's server
-- time (one index probe of runs per event). What it did on delete, a
-- statement-level trigger does: deleting runs deletes their events.
ALTER TABLE run_events DROP CONSTRAINT run_events_run_id_fkey;

CREATE FUNCTION forget_run_events() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM run_events e USING gone_runs g WHERE e.run_id = g.id;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_forget_events AFTER DELETE ON runs
    REFERENCING OLD TABLE AS gone_runs
    FOR EACH STATEMENT EXECUTE FUNCTION forget_run_events();
COMMENT ON TABLE run_events IS
    'Append-only log of every status transition of every run (written by triggers); '
    'deleting a run deletes its events (trigger runs_forget_events).';

-- -- batch start ----------------------------------------------------------------

-- Enqueue one run per element of p_ids / p_inputs (same length), all of
-- p_workflow on p_queue with the same settings. Returns one row per element,
-- in input order: the run's id and whether this call created it.
-- p_idempotency_keys: NULL (no keys), or one key or NULL per element.
-- p_concurrency_keys: NULL, or one concurrency key (or NULL) per element. A key
-- that already names a run returns that run (created = false); a key repeated
-- inside the batch creates one run, returned for every element that carries it.
CREATE FUNCTION start_runs(
    p_ids uuid[], p_workflow text, p_queue text, p_inputs json[],
    p_priority integer DEFAULT 0, p_delay_seconds double precision DEFAULT 0,
    p_idempotency_keys text[] DEFAULT NULL, p_max_attempts integer DEFAULT 3,
    p_max_recoveries integer DEFAULT 5, p_source text DEFAULT 'native',
    p_meta jsonb DEFAULT '{}'::jsonb, p_concurrency_keys text[] DEFAULT NULL)
RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_due timestamptz := now() + make_interval(secs => greatest(p_delay_seconds, 0));
    v_created uuid[];
BEGIN
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_inputs)
       OR (p_idempotency_keys IS NOT NULL
           AND cardinality(p_idempotency_keys) IS DISTINCT FROM cardinality(p_ids)) THEN
        RAISE EXCEPTION 'start_runs: p_ids (%), p_inputs (%) and p_idempotency_keys (%) '
                        'must have the same length',
                        cardinality(p_ids), cardinality(p_inputs),
                        cardinality(p_idempotency_keys)
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;

    IF p_idempotency_keys IS NULL THEN
        -- No keys: every element is a new run (a duplicate id is an error).
        INSERT INTO runs (id, workflow, queue, input, priority, due_at,
                          max_attempts, max_recoveries, source, meta, concurrency_key)
        SELECT u.id, p_workflow, p_queue, u.input, p_priority, v_due,
               p_max_attempts, p_max_recoveries, p_source, p_meta, p_concurrency_keys[u.ord]
        FROM unnest(p_ids, p_inputs) WITH ORDINALITY AS u(id, input, ord);
        IF p_delay_seconds <= 0 THEN
            PERFORM notify_wake(p_queue);
        END IF;
        RETURN QUERY SELECT u.id, true FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)
                     ORDER BY u.ord;
        RETURN;
    END IF;

    -- With keys: the first element of each key is inserted (later ones of the
    -- same key in the batch only get its run), and a key that names an
    -- existing run inserts nothing (ON CONFLICT, as in start_run).
    WITH ins AS (
        INSERT INTO runs (id, workflow, queue, input, priority, due_at, idempotency_key,
                          max_attempts, max_recoveries, source, meta, concurrency_key)
        SELECT u.id, p_workflow, p_queue, u.input, p_priority, v_due, u.key,
               p_max_attempts, p_max_recoveries, p_source, p_meta, p_concurrency_keys[u.ord]
        FROM (SELECT v.*, row_number() OVER (PARTITION BY v.key ORDER BY v.ord) AS nth
              FROM unnest(p_ids, p_inputs, p_idempotency_keys) WITH ORDINALITY
                   AS v(id, input, key, ord)) AS u
        WHERE u.key IS NULL OR u.nth = 1
        ORDER BY u.ord
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id
    )
    SELECT array_agg(ins.id) INTO v_created FROM ins;

    IF v_created IS NOT NULL AND p_delay_seconds <= 0 THEN
        PERFORM notify_wake(p_queue);
    END IF;
    RETURN QUERY
        SELECT CASE WHEN c.id IS NOT NULL THEN c.id
                    ELSE (SELECT r.id FROM runs r WHERE r.idempotency_key = u.key) END,
               c.id IS NOT NULL
        FROM unnest(p_ids, p_idempotency_keys) WITH ORDINALITY AS u(id, key, ord)
        LEFT JOIN unnest(v_created) AS c(id) ON c.id = u.id
        ORDER BY u.ord;
END $$;
