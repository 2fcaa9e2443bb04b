-- pgjournal schema, part 11: a shorter path from enqueue to the first step
-- (the S3 wake-up bench; bench/README.md "Findings" 2).
--
-- * The claim writes the event-log row of each run it claims itself, in the
--   statement that claims it (one INSERT ... SELECT for the batch), instead of
--   the row trigger `runs_log_status` calling a PL/pgSQL function per row. The
--   trigger now leaves claims alone: a claim is the only update that moves a
--   run to 'running' with a new `leased_at` (a heartbeat renews `leased_at`
--   but touches neither status nor epoch, so the trigger never fires for it).
-- * The poison check is part of the claim: a picked run whose lease expired
--   once too often (recoveries >= max_recoveries) is parked as 'dead' by the
--   same UPDATE that claims the others, instead of a separate sweep statement
--   before every claim. It is still never handed out again.
-- * With no rows in `queues` (no paused queue, no queue limit: the usual case)
--   the claim skips the per-queue settings lookups.
-- * The claim functions run with plan_cache_mode = force_generic_plan: their
--   statements are planned once per session, not again for every call with
--   new parameter values (the plans do not depend on the values: one index
--   scan per queue).
-- * `request_result` on a queued run that is due wakes hungry workers again
--   (`notify_wake`): its UPDATE of `notify_done` locks the row for a moment,
--   and a claim woken by the enqueue's NOTIFY at that moment skips the row
--   (SKIP LOCKED) and finds nothing; without a second NOTIFY, after the
--   UPDATE commits, the run waited for the poll.
-- Fencing is unchanged: every claim still increments lease_epoch and commits
-- before the worker runs anything.

-- -- the event log: claims write their own rows --------------------------------------

DROP TRIGGER runs_log_status ON runs;
CREATE TRIGGER runs_log_status AFTER UPDATE OF status, lease_epoch ON runs
    FOR EACH ROW WHEN ((OLD.status IS DISTINCT FROM NEW.status
                        OR (NEW.status = 'running' AND OLD.lease_epoch <> NEW.lease_epoch))
                       -- a claim (see claim_from) writes its own event row
                       AND NOT (NEW.status = 'running'
                                AND NEW.leased_at IS DISTINCT FROM OLD.leased_at))
    EXECUTE FUNCTION log_run_event();

-- -- the claim ----------------------------------------------------------------------------

-- The claim of 0009 (concurrency keys), with the poison check and the event
-- rows folded in. A picked run that is 'running' (its lease expired) and has
-- used up its recoveries becomes 'dead' instead of being claimed (not after a
-- server restart: an interruption is not the run's fault, as before).
CREATE OR REPLACE FUNCTION claim_from(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET enable_bitmapscan = off SET enable_sort = off SET jit = off
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids uuid[];
    v_restart timestamptz := pg_postmaster_start_time();
    v_keyed boolean := EXISTS (SELECT 1 FROM concurrency_limits);
    v_full text[];
    v_keys text[];
    v_limits integer[];
    v_drop uuid[];
BEGIN
    IF v_keyed THEN
        SELECT array_agg(x.k) INTO v_full FROM (
            SELECT r.concurrency_key AS k, count(*) AS n FROM runs r
            WHERE r.status = 'running' AND r.concurrency_key IS NOT NULL AND r.due_at > now()
            GROUP BY r.concurrency_key) AS x
        WHERE x.n >= key_limit(x.k);
    END IF;
    IF cardinality(p_queues) = 1 THEN
        SELECT array_agg(x.id) INTO v_ids FROM (
            SELECT r.id FROM runs r
            WHERE r.queue = p_queues[1] AND r.due_at IS NOT NULL AND r.due_at <= now()
              AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
              AND (v_full IS NULL OR r.concurrency_key IS NULL
                   OR r.concurrency_key <> ALL (v_full))
            ORDER BY r.priority DESC, r.due_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED) AS x;
    ELSE
        SELECT array_agg(x.id) INTO v_ids FROM (
            SELECT r.id FROM (SELECT DISTINCT qn FROM unnest(p_queues) AS qn) AS q
            CROSS JOIN LATERAL (
                SELECT r.id, r.priority, r.due_at FROM runs r
                WHERE r.queue = q.qn AND r.due_at IS NOT NULL AND r.due_at <= now()
                  AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                  AND (v_full IS NULL OR r.concurrency_key IS NULL
                       OR r.concurrency_key <> ALL (v_full))
                ORDER BY r.priority DESC, r.due_at
                LIMIT p_limit
                FOR UPDATE SKIP LOCKED
            ) AS r
            ORDER BY r.priority DESC, r.due_at
            LIMIT p_limit) AS x;
    END IF;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    IF v_keyed THEN
        SELECT array_agg(x.k ORDER BY x.k), array_agg(x.l ORDER BY x.k)
        INTO v_keys, v_limits
        FROM (SELECT k.k, key_limit(k.k) AS l FROM (
                  SELECT DISTINCT r.concurrency_key AS k FROM runs r
                  WHERE r.id = ANY (v_ids) AND r.concurrency_key IS NOT NULL) AS k) AS x
        WHERE x.l IS NOT NULL;
        IF v_keys IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock(
                hashtextextended('pgjournal.key:' || current_schema() || ':' || k.k, 0))
            FROM unnest(v_keys) WITH ORDINALITY AS k(k, ord) ORDER BY k.ord;
            SELECT array_agg(c.id) INTO v_drop FROM (
                SELECT r.id, row_number() OVER (PARTITION BY r.concurrency_key
                                                ORDER BY r.priority DESC, r.due_at) AS n,
                       room.room
                FROM runs r
                JOIN (SELECT u.k, u.l - (SELECT count(*) FROM runs x
                                         WHERE x.concurrency_key = u.k
                                           AND x.status = 'running' AND x.due_at > now()
                                           AND x.id <> ALL (v_ids)) AS room
                      FROM unnest(v_keys, v_limits) AS u(k, l)) AS room
                  ON room.k = r.concurrency_key
                WHERE r.id = ANY (v_ids)) AS c
            WHERE c.n > greatest(c.room, 0);
            IF v_drop IS NOT NULL THEN
                v_ids := ARRAY(SELECT x FROM unnest(v_ids) AS x WHERE x <> ALL (v_drop));
                IF cardinality(v_ids) = 0 THEN
                    RETURN;
                END IF;
            END IF;
        END IF;
    END IF;
    RETURN QUERY
    WITH picked AS (
        -- The picked rows as they are now (locked by this transaction), with
        -- what the claim does to each: claim it, or park it as poison.
        SELECT r.id, r.status AS from_status,
               (r.status = 'running' AND r.recoveries >= r.max_recoveries
                AND (r.leased_at IS NULL OR r.leased_at >= v_restart)) AS poison
        FROM runs r WHERE r.id = ANY (v_ids)
    ), changed AS (
        UPDATE runs r SET
            status = CASE WHEN p.poison THEN 'dead' ELSE 'running' END,
            lease_epoch = r.lease_epoch + 1,
            worker_id = CASE WHEN p.poison THEN NULL ELSE p_worker END,
            due_at = CASE WHEN p.poison THEN NULL
                          ELSE now() + make_interval(secs => p_lease_seconds) END,
            recoveries = r.recoveries + CASE
                WHEN p.poison THEN 0
                WHEN r.status = 'running' AND (r.leased_at IS NULL OR r.leased_at >= v_restart)
                THEN 1 ELSE 0 END,
            interruptions = r.interruptions + CASE
                WHEN NOT p.poison AND r.status = 'running' AND r.leased_at < v_restart
                THEN 1 ELSE 0 END,
            -- poison: leased_at unchanged, so the row trigger logs the move to dead
            leased_at = CASE WHEN p.poison THEN r.leased_at ELSE now() END,
            started_at = coalesce(r.started_at, now()),
            finished_at = CASE WHEN p.poison THEN now() ELSE r.finished_at END,
            error = CASE WHEN p.poison THEN jsonb_build_object(
                        'type', 'PoisonRun',
                        'message', format('the worker running it vanished %s times; parked '
                                          'as dead', r.recoveries + 1))
                    ELSE r.error END,
            updated_at = now()
        FROM picked p WHERE r.id = p.id
        RETURNING r.id, r.workflow, r.queue, r.input, r.attempt, r.max_attempts,
                  r.lease_epoch, r.recoveries, r.interruptions, p.from_status, p.poison,
                  r.created_at
    ), logged AS (
        INSERT INTO run_events (run_id, from_status, to_status, attempt, lease_epoch,
                                worker_id, run_created_at)
        SELECT c.id, c.from_status, 'running', c.attempt, c.lease_epoch, p_worker,
               c.created_at
        FROM changed c WHERE NOT c.poison
    )
    SELECT c.id, c.workflow, c.queue, c.input, c.attempt, c.max_attempts,
           c.lease_epoch, c.recoveries, now(),
           EXISTS (SELECT 1 FROM steps s
                   WHERE s.run_id = c.id AND s.run_created_at = c.created_at),
           c.interruptions
    FROM changed c WHERE NOT c.poison;
END $$;

-- Claim runs: fail the runs of these queues past their deadline, then claim
-- (see claim_from; the poison check is in there now). The per-queue settings
-- are read only when `queues` has rows.
CREATE OR REPLACE FUNCTION claim_runs(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_free text[];
    v_q record;
    v_n integer;
    v_left integer := p_limit;
    v_late uuid[];
    v_settings boolean := EXISTS (SELECT 1 FROM queues);
BEGIN
    -- Runs past their deadline fail, whatever their state (a child inherits its
    -- parent's deadline). Rows locked elsewhere are left for the next claim.
    WITH late AS (
        SELECT r.id FROM runs r
        WHERE r.deadline_at <= now() AND r.finished_at IS NULL
          AND r.deadline_at IS NOT NULL AND r.queue = ANY (p_queues)
          AND r.status IN ('queued', 'running', 'suspended')
        ORDER BY r.id
        FOR UPDATE SKIP LOCKED
    ), failed AS (
        UPDATE runs r SET
            status = 'failed', due_at = NULL, worker_id = NULL, finished_at = now(),
            updated_at = now(), lease_epoch = r.lease_epoch + 1,
            error = jsonb_build_object(
                'type', 'TimeoutError', 'module', 'builtins',
                'message', format('the run did not end by its deadline (%s)', r.deadline_at))
        FROM late WHERE r.id = late.id
        RETURNING r.id, r.notify_done
    )
    SELECT array_agg(f.id) FILTER (WHERE f.notify_done) INTO v_late FROM failed f;
    IF v_late IS NOT NULL THEN
        PERFORM notify_done(x) FROM unnest(v_late) AS x;
    END IF;

    IF v_settings THEN
        SELECT array_agg(qn) INTO v_free FROM unnest(p_queues) AS qn
        WHERE NOT EXISTS (SELECT 1 FROM queues s
                          WHERE s.name = qn AND (s.paused OR s.concurrency_limit IS NOT NULL));
    ELSE
        v_free := p_queues;
    END IF;
    IF v_free IS NOT NULL AND v_left > 0 THEN
        RETURN QUERY SELECT * FROM claim_from(p_worker, v_free, v_left, p_lease_seconds,
                                              p_workflows);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_left := v_left - v_n;
    END IF;

    IF v_settings THEN
        FOR v_q IN SELECT s.name, s.concurrency_limit FROM queues s
                   WHERE s.name = ANY (p_queues) AND NOT s.paused
                     AND s.concurrency_limit IS NOT NULL
                   ORDER BY s.name
        LOOP
            EXIT WHEN v_left <= 0;
            PERFORM 1 FROM queues s WHERE s.name = v_q.name FOR UPDATE;
            SELECT v_q.concurrency_limit - count(*) INTO v_n FROM runs r
            WHERE r.queue = v_q.name AND r.status = 'running' AND r.due_at > now();
            IF v_n > 0 THEN
                RETURN QUERY SELECT * FROM claim_from(p_worker, ARRAY[v_q.name],
                                                      least(v_n, v_left), p_lease_seconds,
                                                      p_workflows);
                GET DIAGNOSTICS v_n = ROW_COUNT;
                v_left := v_left - v_n;
            END IF;
        END LOOP;
    END IF;

    IF v_left = 0 THEN
        -- A full batch: this worker is busy, enqueues need not wake it.
        UPDATE workers w SET hungry = false WHERE w.id = p_worker AND w.hungry;
    END IF;
END $$;

ALTER FUNCTION go_hungry(uuid, text[], integer, double precision, text[])
    SET plan_cache_mode = force_generic_plan;

-- -- waiting for a result -----------------------------------------------------------------

CREATE OR REPLACE FUNCTION request_result(p_run uuid)
RETURNS TABLE (status text, output json, error jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_queue text;
BEGIN
    UPDATE runs r SET notify_done = true
    WHERE r.id = p_run AND NOT r.notify_done
      AND r.status IN ('queued', 'running', 'suspended')
    RETURNING CASE WHEN r.status = 'queued' AND r.due_at <= now() THEN r.queue END
    INTO v_queue;
    IF v_queue IS NOT NULL THEN
        -- a claim may have skipped the row while this UPDATE held it
        PERFORM notify_wake(v_queue);
    END IF;
    RETURN QUERY SELECT r.status, r.output, r.error FROM runs r WHERE r.id = p_run;
END $$;
