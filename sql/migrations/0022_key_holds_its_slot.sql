-- 0022: a run holds its concurrency key's slot until it ends or is taken
-- over, whether or not its lease is live (issue 20, item 6).
--
-- Until now only running runs with a live lease counted toward a key's limit.
-- A worker cut off, paused or starved past its lease is often still inside a
-- step of its run; a claim elsewhere then started a second run of the key
-- beside it, and when the first worker's heartbeat got through again both
-- held live leases (the chaos run sampled 2 running runs of a key limited to
-- 1). Now:
--
-- * every running run of a key counts, expired lease or not;
-- * the takeover of an expired run is not held back by its key being full: it
--   replaces the run's own slot (its row is one of the claimed, so the room
--   left for the others is computed without it);
-- * within a key, the claim's order gives the room to resumptions (the
--   takeover among them) before new runs, as in 0020.
--
-- A dead worker's run still holds its key until a claim looks for expired
-- leases (once per poll interval) and takes it over. Queue concurrency limits
-- keep counting live leases (unchanged).
--
-- claim_from of 0020 otherwise unchanged (arguments, result, order, sweep).

CREATE OR REPLACE FUNCTION claim_from(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL, p_expired boolean DEFAULT true)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET enable_bitmapscan = off SET enable_seqscan = off SET enable_sort = off SET jit = off
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ids uuid[];
    v_restart timestamptz := pg_postmaster_start_time();
    v_keyed boolean := EXISTS (SELECT 1 FROM concurrency_limits);
    v_full text[];
    v_keys text[];
    v_limits integer[];
    v_drop uuid[];
    v_parents uuid[];
BEGIN
    IF v_keyed THEN
        SELECT array_agg(x.k) INTO v_full FROM (
            SELECT r.concurrency_key AS k, count(*) AS n FROM runs r
            WHERE r.status = 'running' AND r.concurrency_key IS NOT NULL
            GROUP BY r.concurrency_key) AS x
        WHERE x.n >= key_limit(x.k);
    END IF;
    -- Per queue: its priorities present, highest first (pri: one descent of
    -- each claim index per step), and per priority its due resumptions then
    -- its due new runs, oldest due first; pulled lazily up to p_limit rows.
    -- Beside it, when p_expired, the runs whose lease expired (through
    -- runs_running). Merged by (priority, new, due). A run past its deadline
    -- is never taken: the sweep of claim_runs fails it (now, or in a later
    -- claim if its row or its parent's was locked elsewhere). A row of one part that
    -- the merge does not take stays locked until this transaction ends: other
    -- claims skip it meanwhile, the next claim takes it.
    SELECT array_agg(x.id) INTO v_ids FROM (
        SELECT y.id FROM (
            SELECT c.id, c.priority, c.fresh, c.due
            FROM (SELECT DISTINCT qn FROM unnest(p_queues) AS qn) AS q
            CROSS JOIN LATERAL (
                WITH RECURSIVE pri(p) AS (
                    SELECT greatest(
                        (SELECT r.priority FROM runs r
                         WHERE r.queue = q.qn AND r.due_at IS NOT NULL
                           AND r.started_at IS NOT NULL
                         ORDER BY r.priority DESC LIMIT 1),
                        (SELECT r.priority FROM runs r
                         WHERE r.queue = q.qn AND r.due_at IS NOT NULL
                           AND r.started_at IS NULL
                         ORDER BY r.priority DESC LIMIT 1))
                    UNION ALL
                    SELECT greatest(
                        (SELECT r.priority FROM runs r
                         WHERE r.queue = q.qn AND r.due_at IS NOT NULL
                           AND r.started_at IS NOT NULL AND r.priority < pri.p
                         ORDER BY r.priority DESC LIMIT 1),
                        (SELECT r.priority FROM runs r
                         WHERE r.queue = q.qn AND r.due_at IS NOT NULL
                           AND r.started_at IS NULL AND r.priority < pri.p
                         ORDER BY r.priority DESC LIMIT 1))
                    FROM pri WHERE pri.p IS NOT NULL
                )
                SELECT z.id, z.priority, z.fresh, z.due
                FROM pri
                CROSS JOIN LATERAL (
                    SELECT * FROM (
                        SELECT r.id, r.priority, false AS fresh, r.due_at AS due FROM runs r
                        WHERE r.queue = q.qn AND r.priority = pri.p
                          AND r.due_at IS NOT NULL AND r.started_at IS NOT NULL
                          AND r.due_at <= now()
                          AND (r.deadline_at IS NULL OR r.deadline_at > now())
                          AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                          AND (v_full IS NULL OR r.concurrency_key IS NULL
                               OR r.concurrency_key <> ALL (v_full))
                        ORDER BY r.due_at
                        LIMIT p_limit
                        FOR UPDATE SKIP LOCKED) AS resumed
                    UNION ALL
                    SELECT * FROM (
                        SELECT r.id, r.priority, true AS fresh, r.due_at AS due FROM runs r
                        WHERE r.queue = q.qn AND r.priority = pri.p
                          AND r.due_at IS NOT NULL AND r.started_at IS NULL
                          AND r.due_at <= now()
                          AND (r.deadline_at IS NULL OR r.deadline_at > now())
                          AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                          AND (v_full IS NULL OR r.concurrency_key IS NULL
                               OR r.concurrency_key <> ALL (v_full))
                        ORDER BY r.due_at
                        LIMIT p_limit
                        FOR UPDATE SKIP LOCKED) AS fresh
                ) AS z
                WHERE pri.p IS NOT NULL
                LIMIT p_limit
            ) AS c
            UNION ALL
            SELECT e.id, e.priority, false, e.due
            FROM (SELECT DISTINCT qn FROM unnest(p_queues) AS qn) AS q
            CROSS JOIN LATERAL (
                SELECT r.id, r.priority, r.lease_until AS due FROM runs r
                WHERE p_expired AND r.queue = q.qn AND r.status = 'running'
                  AND r.lease_until <= now()
                  AND (r.deadline_at IS NULL OR r.deadline_at > now())
                  AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                ORDER BY r.priority DESC, r.lease_until
                LIMIT p_limit
                FOR UPDATE SKIP LOCKED) AS e
        ) AS y
        ORDER BY y.priority DESC, y.fresh, y.due
        LIMIT p_limit) AS x;
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
            -- A key's room goes in the claim's order too: resumptions first.
            SELECT array_agg(c.id) INTO v_drop FROM (
                SELECT r.id, row_number() OVER (
                           PARTITION BY r.concurrency_key
                           ORDER BY r.priority DESC,
                                    r.started_at IS NULL,
                                    CASE WHEN r.status = 'running'
                                         THEN coalesce(r.lease_until, r.due_at)
                                         ELSE r.due_at END) AS n,
                       room.room
                FROM runs r
                JOIN (SELECT u.k, u.l - (SELECT count(*) FROM runs x
                                         WHERE x.concurrency_key = u.k
                                           AND x.status = 'running'
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
    -- A run parked as dead (poison, below) ends, and wake_parent locks its
    -- parent: after the run's row, against the project's order. So the
    -- parents of the poison runs among the picked ones are locked here, in id
    -- order, without waiting (SKIP LOCKED); a poison run whose parent is
    -- locked elsewhere is left for a later claim. Then the trigger finds the
    -- parent already locked and no claim waits for a parent while holding
    -- its child. Only expired leases can be poison (looked for when
    -- p_expired, or running rows that keep their expiry in due_at).
    IF EXISTS (SELECT 1 FROM runs r
               WHERE r.id = ANY (v_ids) AND r.status = 'running'
                 AND r.parent_run_id IS NOT NULL AND r.recoveries >= r.max_recoveries) THEN
        SELECT array_agg(x.id) INTO v_parents FROM (
            SELECT p.id FROM runs p
            WHERE p.id IN (SELECT r.parent_run_id FROM runs r
                           WHERE r.id = ANY (v_ids) AND r.status = 'running'
                             AND r.parent_run_id IS NOT NULL
                             AND r.recoveries >= r.max_recoveries)
            ORDER BY p.id
            FOR UPDATE SKIP LOCKED) AS x;
        v_ids := ARRAY(
            SELECT r.id FROM runs r
            WHERE r.id = ANY (v_ids)
              AND NOT (r.status = 'running' AND r.parent_run_id IS NOT NULL
                       AND r.recoveries >= r.max_recoveries
                       AND (r.leased_at IS NULL OR r.leased_at >= v_restart)
                       AND r.parent_run_id <> ALL (coalesce(v_parents, '{}'::uuid[]))));
        IF cardinality(v_ids) = 0 THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT r.id, r.status AS from_status,
               (r.status = 'running' AND r.recoveries >= r.max_recoveries
                AND (r.leased_at IS NULL OR r.leased_at >= v_restart)) AS poison
        FROM runs r WHERE r.id = ANY (v_ids)
    ), changed AS (
        UPDATE runs r SET
            status = CASE WHEN p.poison THEN 'dead' ELSE 'running' END,
            lease_epoch = r.lease_epoch + 1,
            worker_id = CASE WHEN p.poison THEN NULL ELSE p_worker END,
            due_at = NULL,
            lease_until = CASE WHEN p.poison THEN r.lease_until
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
        FROM picked p WHERE r.id = p.id AND r.id = ANY (v_ids)
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
