-- pgjournal schema, part 20: work in progress first.
--
-- Until now a claim took runs by (priority, due time), and a run's due time
-- is when it became claimable: a resumption (its timer came due, its signal
-- arrived, its children ended, its lease expired) became due *after* every
-- new run enqueued before that moment, so under load a backlog of new runs
-- was served first. In an overloaded fault-injection run a crashed run's
-- takeover took 20 s and timers fired 19 s late (85 s at worst).
--
-- From here on a claim takes, per queue,
--     priority (highest first),
--     then runs that already started (claimed before: `started_at` is set)
--          ahead of runs that never started,
--     then due time (longest due first).
-- "Already started" covers a due timer, an arrived signal, ended children, an
-- expired lease, a retry after a failed attempt, and a user's retry of a run
-- that had started. New runs absorb the wait under overload.
--
-- The claim index `runs_claimable (queue, priority DESC, due_at)` becomes two
-- partial indexes of the same shape, one per kind of run:
--     runs_resumable  WHERE due_at IS NOT NULL AND started_at IS NOT NULL
--     runs_fresh      WHERE due_at IS NOT NULL AND started_at IS NULL
-- (a run moves from the second to the first with its first claim, which sets
-- due_at NULL anyway). History still never enters them.
--
-- One scan of (queue, priority, due) cannot yield that order without reading
-- the entries in between: every sleeping run (a timer in the future) of a
-- priority sits between that priority's due resumptions and its due new
-- runs, and PostgreSQL before 18 cannot skip over them (`due_at <= now()`
-- does not bound a scan whose preceding column, priority, is unconstrained).
-- Such a claim would read every sleeping run on every claim; the claim of 0014
-- already did so whenever it came back short. So per queue the claim walks
-- the priorities present, highest first (one index descent each, a "loose
-- index scan"), and per priority reads the due resumptions, then the due new
-- runs, each a range bounded by `due_at <= now()`: it stops at the first entry
-- not yet due. Everything is pulled lazily under one LIMIT, so it locks and
-- reads only the runs it returns plus a few index pages per priority present;
-- the cost grows neither with finished runs nor with runs not yet due nor
-- with the backlog. The expired-lease part (p_expired, through runs_running)
-- is unchanged; expired leases count as resumptions.
--
-- The deadline sweep of claim_runs takes the project's lock order: the
-- parents of the late runs first, in id order, then the late runs, in id
-- order (the wake_parent trigger then finds each parent already locked).
-- Before, it locked the late runs and the trigger locked each parent in
-- update order: against a transaction that holds a parent and waits for one
-- of its children (the order complete_runs and cancel take), a deadlock. A
-- parent locked elsewhere is skipped with its late children, as a late run
-- locked elsewhere always was: the next claim fails them. Such a late run is
-- not locked by anyone meanwhile, so claim_from now filters out runs past
-- their deadline (a heap filter): no claim starts one. Likewise a claim that
-- parks a poison run as dead (which wakes its parent too) locks that parent
-- first, without waiting, or leaves the run for a later claim.
--
-- The queue_depth view gains the lag of each kind apart: resumptions due and
-- how long the oldest has waited, new runs due and how long the oldest has
-- waited (columns appended; the old ones keep their meaning).
--
-- Creating the indexes locks runs against writes for as long as they take to
-- build: each holds only unfinished, claimable runs.

CREATE INDEX IF NOT EXISTS runs_resumable ON runs (queue, priority DESC, due_at)
    WHERE due_at IS NOT NULL AND started_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_fresh ON runs (queue, priority DESC, due_at)
    WHERE due_at IS NOT NULL AND started_at IS NULL;
DROP INDEX IF EXISTS runs_claimable;

-- claim_from of 0014, in the order above. Arguments, result and the rest of
-- the body (key limits, the update, poison runs) as in 0014.
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
              AND coalesce(r.lease_until, r.due_at) > now()
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
                  AND (v_full IS NULL OR r.concurrency_key IS NULL
                       OR r.concurrency_key <> ALL (v_full))
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
                                           AND coalesce(x.lease_until, x.due_at) > now()
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

-- claim_runs of 0014 with the deadline sweep in the project's lock order.
CREATE OR REPLACE FUNCTION claim_runs(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL, p_expired boolean DEFAULT true)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_free text[];
    v_q record;
    v_n integer;
    v_left integer := p_limit;
    v_late uuid[];
    v_parents uuid[];
    v_settings boolean := EXISTS (SELECT 1 FROM queues);
BEGIN
    -- Runs past their deadline fail, whatever their state (a child inherits its
    -- parent's deadline). Failing a child wakes its parent (wake_parent locks
    -- the parent's row), so the parents of the late runs are locked first, in
    -- id order, then the late runs, in id order: parents before children, as
    -- everywhere. A row locked elsewhere (a parent, or a late run) is skipped,
    -- with a skipped parent's late children: the next claim fails them.
    SELECT array_agg(p.id) INTO v_parents FROM (
        SELECT r.id FROM runs r
        WHERE r.id IN (SELECT l.parent_run_id FROM runs l
                       WHERE l.deadline_at <= now() AND l.finished_at IS NULL
                         AND l.deadline_at IS NOT NULL AND l.queue = ANY (p_queues)
                         AND l.status IN ('queued', 'running', 'suspended')
                         AND l.parent_run_id IS NOT NULL)
        ORDER BY r.id
        FOR UPDATE SKIP LOCKED) AS p;
    WITH late AS (
        SELECT r.id FROM runs r
        WHERE r.deadline_at <= now() AND r.finished_at IS NULL
          AND r.deadline_at IS NOT NULL AND r.queue = ANY (p_queues)
          AND r.status IN ('queued', 'running', 'suspended')
          AND (r.parent_run_id IS NULL OR r.parent_run_id = ANY (v_parents))
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
                                              p_workflows, p_expired);
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
            WHERE r.queue = v_q.name AND r.status = 'running'
              AND coalesce(r.lease_until, r.due_at) > now();
            IF v_n > 0 THEN
                RETURN QUERY SELECT * FROM claim_from(p_worker, ARRAY[v_q.name],
                                                      least(v_n, v_left), p_lease_seconds,
                                                      p_workflows, p_expired);
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

-- queue_depth of 0013 with the lag of each kind apart (columns appended).
-- A resumption is a claimable run that started before: a due timer, a
-- queued run that ran before (signal, children, retry), an expired lease; a
-- new run is a due queued run that never started. Their ages are how long
-- the oldest of each kind has been due. Under overload the new runs' age
-- grows and the resumptions' stays near the claim interval.
CREATE OR REPLACE VIEW queue_depth AS
WITH live AS (
    SELECT
        r.queue,
        count(*) FILTER (WHERE r.status = 'queued' AND r.due_at <= now()) AS queued_due,
        count(*) FILTER (WHERE r.status = 'queued' AND r.due_at > now()) AS delayed,
        count(*) FILTER (WHERE r.status = 'running') AS running,
        count(*) FILTER (WHERE r.status = 'running' AND coalesce(r.lease_until, r.due_at) <= now()) AS expired_leases,
        count(*) FILTER (WHERE r.status = 'suspended') AS suspended,
        count(*) FILTER (WHERE CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) ELSE r.due_at END <= now()) AS claimable,
        min(CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) ELSE r.due_at END) FILTER (WHERE CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) ELSE r.due_at END <= now())
            AS oldest_due_at,
        count(*) FILTER (WHERE (r.status = 'running' OR r.started_at IS NOT NULL)
                           AND CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) ELSE r.due_at END <= now())
            AS resumptions_due,
        min(CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) ELSE r.due_at END)
            FILTER (WHERE (r.status = 'running' OR r.started_at IS NOT NULL)
                      AND CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) ELSE r.due_at END <= now())
            AS oldest_resumption_at,
        count(*) FILTER (WHERE r.status <> 'running' AND r.started_at IS NULL AND r.due_at <= now())
            AS new_due,
        min(r.due_at) FILTER (WHERE r.status <> 'running' AND r.started_at IS NULL AND r.due_at <= now())
            AS oldest_new_at
    FROM runs r
    WHERE r.status IN ('queued', 'running', 'suspended')
    GROUP BY r.queue
), names AS (
    SELECT q.name FROM queues q
    UNION
    SELECT l.queue FROM live l
)
SELECT
    n.name AS queue,
    coalesce(l.queued_due, 0) AS queued_due,
    coalesce(l.delayed, 0) AS delayed,
    coalesce(l.running, 0) AS running,
    coalesce(l.expired_leases, 0) AS expired_leases,
    coalesce(l.suspended, 0) AS suspended,
    coalesce(l.claimable, 0) AS claimable,
    now() - l.oldest_due_at AS oldest_due_age,
    q.concurrency_limit,
    coalesce(q.paused, false) AS paused,
    coalesce(l.resumptions_due, 0) AS resumptions_due,
    now() - l.oldest_resumption_at AS oldest_resumption_age,
    coalesce(l.new_due, 0) AS new_due,
    now() - l.oldest_new_at AS oldest_new_age
FROM names n
LEFT JOIN live l ON l.queue = n.name
LEFT JOIN queues q ON q.name = n.name;
