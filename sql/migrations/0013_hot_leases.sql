-- pgjournal schema, part 12: lease renewals that are HOT updates.
--
-- Until now a running run kept its lease expiry in `runs.due_at`, a column of
-- the claim index `runs_claimable`, so every heartbeat (and every claim) was
-- an update that had to insert new index entries (not HOT): 1-2 of 32-43
-- updates measured were HOT, and the table and its indexes grew with every
-- beat until vacuum came by.
--
-- * A running run keeps its lease expiry in `lease_until`, which no index
--   holds; `due_at` is NULL while it runs, so running runs leave
--   `runs_claimable`. A heartbeat changes only `lease_until` and `leased_at`
--   (neither indexed nor in an index predicate): a HOT update when the page
--   has room, hence fillfactor 70 on runs.
-- * The claim finds expired leases through the small partial index
--   `runs_running (queue) WHERE status = 'running'` (running runs are bounded
--   by the slots of all workers), filtered by `lease_until`, next to its
--   index scan of `runs_claimable` for queued and timer-due runs, merged in
--   the same (priority, due time) order as before.
-- * `lease_until` means something only while a run is running; a run leaving
--   'running' keeps the stale value (nothing reads it then).
-- * Adapter runs (never leased: 'running' with due_at = 9999-01-01, in a
--   queue no worker claims) and running rows written by hand the old way keep
--   their expiry in `due_at` and stay claimable through `runs_claimable` once
--   it passes, as before: "the lease expiry of a running run" is
--   coalesce(lease_until, due_at) in every reader (views, key limits).
-- Fencing is unchanged: every claim increments lease_epoch, a heartbeat
-- renews only (run, epoch) pairs that still match, and every write of a
-- worker carries its epoch.

ALTER TABLE runs ADD COLUMN lease_until timestamptz;
COMMENT ON COLUMN runs.lease_until IS
    'While running: when the lease expires unless renewed (not indexed: a heartbeat '
    'is a HOT update). Meaningless in other statuses.';
-- Room on each page for the new row versions of heartbeats (HOT needs the
-- new version on the same page). Applies to pages filled from now on.
ALTER TABLE runs SET (fillfactor = 70);

UPDATE runs SET lease_until = due_at, due_at = NULL
WHERE status = 'running' AND source = 'native';

ALTER TABLE runs DROP CONSTRAINT runs_due_matches_status;
ALTER TABLE runs ADD CONSTRAINT runs_due_matches_status CHECK (
    (status IN ('completed', 'failed', 'cancelled', 'dead') AND due_at IS NULL)
    OR (status = 'queued' AND due_at IS NOT NULL)
    OR (status = 'running' AND (lease_until IS NOT NULL OR due_at IS NOT NULL))
    OR status = 'suspended'
);
COMMENT ON COLUMN runs.due_at IS
    'When the run is next claimable: queued = start time, suspended = timer '
    '(NULL = signal only), ended = NULL; running = NULL (the lease is in lease_until; '
    'adapter runs keep 9999-01-01 here).';

-- -- the claim ----------------------------------------------------------------------------

-- The claim of 0012, with expired leases found through runs_running.
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
            WHERE r.status = 'running' AND r.concurrency_key IS NOT NULL
              AND coalesce(r.lease_until, r.due_at) > now()
            GROUP BY r.concurrency_key) AS x
        WHERE x.n >= key_limit(x.k);
    END IF;
    -- Per queue: the claimable runs in index order (runs_claimable), and the
    -- runs whose lease expired (usually none; read through runs_running),
    -- merged by (priority, due time). A row of one part that the merge does
    -- not take stays locked until this transaction ends: other claims skip
    -- it meanwhile, the next claim takes it.
    IF cardinality(p_queues) = 1 THEN
        SELECT array_agg(x.id) INTO v_ids FROM (
            SELECT y.id, y.priority, y.due FROM (
                SELECT * FROM (
                    SELECT r.id, r.priority, r.due_at AS due FROM runs r
                    WHERE r.queue = p_queues[1] AND r.due_at IS NOT NULL AND r.due_at <= now()
                      AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                      AND (v_full IS NULL OR r.concurrency_key IS NULL
                           OR r.concurrency_key <> ALL (v_full))
                    ORDER BY r.priority DESC, r.due_at
                    LIMIT p_limit
                    FOR UPDATE SKIP LOCKED) AS due
                UNION ALL
                SELECT * FROM (
                    SELECT r.id, r.priority, r.lease_until AS due FROM runs r
                    WHERE r.queue = p_queues[1] AND r.status = 'running' AND r.lease_until <= now()
                      AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                      AND (v_full IS NULL OR r.concurrency_key IS NULL
                           OR r.concurrency_key <> ALL (v_full))
                    ORDER BY r.priority DESC, r.lease_until
                    LIMIT p_limit
                    FOR UPDATE SKIP LOCKED) AS expired
            ) AS y
            ORDER BY y.priority DESC, y.due
            LIMIT p_limit) AS x;
    ELSE
        SELECT array_agg(x.id) INTO v_ids FROM (
            SELECT r.id FROM (SELECT DISTINCT qn FROM unnest(p_queues) AS qn) AS q
            CROSS JOIN LATERAL (
                SELECT y.id, y.priority, y.due FROM (
                    SELECT * FROM (
                        SELECT r.id, r.priority, r.due_at AS due FROM runs r
                        WHERE r.queue = q.qn AND r.due_at IS NOT NULL AND r.due_at <= now()
                          AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                          AND (v_full IS NULL OR r.concurrency_key IS NULL
                               OR r.concurrency_key <> ALL (v_full))
                        ORDER BY r.priority DESC, r.due_at
                        LIMIT p_limit
                        FOR UPDATE SKIP LOCKED) AS due
                    UNION ALL
                    SELECT * FROM (
                        SELECT r.id, r.priority, r.lease_until AS due FROM runs r
                        WHERE r.queue = q.qn AND r.status = 'running' AND r.lease_until <= now()
                          AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
                          AND (v_full IS NULL OR r.concurrency_key IS NULL
                               OR r.concurrency_key <> ALL (v_full))
                        ORDER BY r.priority DESC, r.lease_until
                        LIMIT p_limit
                        FOR UPDATE SKIP LOCKED) AS expired
                ) AS y
                ORDER BY y.priority DESC, y.due
                LIMIT p_limit
            ) AS r
            ORDER BY r.priority DESC, r.due
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
                SELECT r.id, row_number() OVER (
                           PARTITION BY r.concurrency_key
                           ORDER BY r.priority DESC,
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

-- claim_runs of 0012; a limited queue counts the running runs whose lease holds.
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
            WHERE r.queue = v_q.name AND r.status = 'running'
              AND coalesce(r.lease_until, r.due_at) > now();
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

-- -- heartbeats ---------------------------------------------------------------------------

-- The heartbeat of 0005: renews lease_until (and leased_at), neither of which
-- any index holds, so the update is HOT when the page has room. due_at is
-- set to NULL, which changes nothing for a run claimed since 0013 (NULL
-- already: not a change of an indexed value) and takes a running row written
-- the old way out of the claim index.
CREATE OR REPLACE FUNCTION heartbeat(
    p_worker uuid, p_ids uuid[], p_epochs bigint[], p_lease_seconds double precision)
RETURNS TABLE (lost_run_id uuid, status text, lease_epoch bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_renewed uuid[];
BEGIN
    PERFORM set_config('lock_timeout',
                       greatest(50, (p_lease_seconds * 1000 / 6)::integer)::text, true);
    WITH mine AS (
        SELECT r.id FROM runs r
        JOIN unnest(p_ids, p_epochs) AS v(id, epoch) ON r.id = v.id
        WHERE r.lease_epoch = v.epoch AND r.status = 'running'
        ORDER BY r.id
        FOR UPDATE OF r SKIP LOCKED
    ), renewed AS (
        UPDATE runs r SET lease_until = now() + make_interval(secs => p_lease_seconds),
                          leased_at = now(), due_at = NULL
        FROM mine WHERE r.id = mine.id
        RETURNING r.id
    )
    SELECT array_agg(renewed.id) INTO v_renewed FROM renewed;
    PERFORM 1 FROM workers w WHERE w.id = p_worker FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        UPDATE workers w SET heartbeat_at = now() WHERE w.id = p_worker;
    END IF;
    RETURN QUERY
    SELECT v.id,
           CASE WHEN r.id IS NULL THEN 'deleted'
                WHEN r.lease_epoch <> v.epoch OR r.status <> 'running' THEN r.status
                ELSE 'busy' END,
           coalesce(r.lease_epoch, v.epoch)
    FROM unnest(p_ids, p_epochs) AS v(id, epoch)
    LEFT JOIN runs r ON r.id = v.id
    WHERE v.id <> ALL (coalesce(v_renewed, '{}'::uuid[]));
END $$;

-- -- views: the lease expiry of a running run is coalesce(lease_until, due_at) ---------

CREATE OR REPLACE VIEW run_overview AS
SELECT
    r.id,
    r.workflow,
    r.queue,
    r.status,
    r.priority,
    r.attempt,
    r.max_attempts,
    r.recoveries,
    r.created_at,
    r.started_at,
    r.finished_at,
    r.started_at - r.created_at AS queue_wait,
    coalesce(r.finished_at, now()) - r.started_at AS run_time,
    CASE WHEN r.status = 'running' THEN
        CASE WHEN coalesce(r.lease_until, r.due_at) > now() THEN 'held' ELSE 'expired' END
    END AS lease_state,
    CASE WHEN r.status = 'running' THEN coalesce(r.lease_until, r.due_at) END AS lease_expires_at,
    r.lease_epoch,
    r.worker_id,
    w.host AS worker_host,
    w.pid AS worker_pid,
    CASE WHEN r.status = 'suspended' THEN r.wait_signal END AS waiting_for_signal,
    CASE WHEN r.status IN ('queued', 'suspended') THEN r.due_at END AS next_due_at,
    coalesce(s.completed, 0) AS steps_completed,
    coalesce(s.failed, 0) AS steps_failed,
    coalesce(g.pending, 0) AS signals_pending,
    r.error ->> 'type' AS error_type,
    r.error ->> 'message' AS error_message,
    r.source,
    r.parent_run_id,
    CASE WHEN r.status = 'suspended' THEN r.wait_pending END AS waiting_for_children,
    r.deadline_at
FROM runs r
LEFT JOIN workers w ON w.id = r.worker_id
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE st.status = 'completed') AS completed,
           count(*) FILTER (WHERE st.status = 'failed') AS failed
    FROM steps st WHERE st.run_id = r.id AND st.run_created_at = r.created_at
) s ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS pending
    FROM signals sg WHERE sg.run_id = r.id AND sg.consumed_at IS NULL
) g ON true;

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
            AS oldest_due_at
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
    coalesce(q.paused, false) AS paused
FROM names n
LEFT JOIN live l ON l.queue = n.name
LEFT JOIN queues q ON q.name = n.name;

CREATE OR REPLACE VIEW stuck_runs AS
WITH medians AS (
    SELECT wf.workflow, m.median_seconds, m.sample_size
    FROM (SELECT DISTINCT r.workflow FROM runs r WHERE r.status = 'running') wf
    CROSS JOIN LATERAL (
        SELECT percentile_cont(0.5) WITHIN GROUP (
                   ORDER BY extract(epoch FROM c.finished_at - c.started_at)) AS median_seconds,
               count(*) AS sample_size
        FROM (SELECT x.started_at, x.finished_at FROM runs x
              WHERE x.workflow = wf.workflow AND x.status = 'completed'
                AND x.started_at IS NOT NULL AND x.created_at > now() - interval '7 days'
              ORDER BY x.created_at DESC
              LIMIT 1000) c
    ) m
    WHERE m.sample_size > 0
)
SELECT
    r.id,
    r.workflow,
    r.queue,
    CASE WHEN coalesce(r.lease_until, r.due_at) <= now() THEN 'lease expired'
         ELSE 'running over 3x the median' END AS reason,
    r.attempt,
    r.recoveries,
    r.lease_epoch,
    r.worker_id,
    w.host AS worker_host,
    w.pid AS worker_pid,
    w.heartbeat_at AS worker_heartbeat_at,
    r.started_at,
    e.claimed_at,
    now() - r.started_at AS running_for,
    coalesce(r.lease_until, r.due_at) AS lease_expires_at,
    CASE WHEN coalesce(r.lease_until, r.due_at) <= now() THEN now() - coalesce(r.lease_until, r.due_at) END AS lease_expired_for,
    make_interval(secs => m.median_seconds) AS workflow_median,
    m.sample_size AS median_sample_size
FROM runs r
LEFT JOIN medians m ON m.workflow = r.workflow
LEFT JOIN workers w ON w.id = r.worker_id
LEFT JOIN LATERAL (
    SELECT max(ev.at) AS claimed_at FROM run_events ev
    WHERE ev.run_id = r.id AND ev.to_status = 'running'
) e ON true
WHERE r.status = 'running'
  AND (coalesce(r.lease_until, r.due_at) <= now()
       OR (now() - r.started_at > make_interval(secs => 3 * m.median_seconds)
           AND now() - r.started_at > interval '1 minute'));

CREATE OR REPLACE VIEW worker_health AS
WITH held AS (
    SELECT r.worker_id,
           count(*) AS runs_held,
           count(*) FILTER (WHERE coalesce(r.lease_until, r.due_at) <= now()) AS expired_leases
    FROM runs r
    WHERE r.status = 'running' AND r.worker_id IS NOT NULL
    GROUP BY r.worker_id
), w AS (
    SELECT w.*,
           now() - w.heartbeat_at > coalesce(
               make_interval(secs => w.lease_seconds),
               nullif(current_setting('pgjournal.worker_stale_after', true), '')::interval,
               interval '1 minute') AS silent
    FROM workers w
)
SELECT
    w.id,
    w.host,
    w.pid,
    w.queues,
    w.concurrency,
    w.started_at,
    w.heartbeat_at,
    now() - w.heartbeat_at AS heartbeat_age,
    w.stopped_at,
    coalesce(h.runs_held, 0) AS runs_held,
    coalesce(h.expired_leases, 0) AS expired_leases,
    w.hungry AND w.stopped_at IS NULL AND NOT w.silent AS hungry,
    CASE
        WHEN w.stopped_at IS NOT NULL THEN 'stopped'
        WHEN NOT w.silent THEN 'alive'
        WHEN w.lease_seconds IS NOT NULL THEN 'gone'
        ELSE 'stale'
    END AS state,
    w.workflows,
    w.lease_seconds,
    w.workflow_queues
FROM w
LEFT JOIN held h ON h.worker_id = w.id;

CREATE OR REPLACE VIEW concurrency_keys AS
SELECT
    k.key,
    key_limit(k.key) AS max_running,
    coalesce(c.running, 0) AS running,
    coalesce(c.queued, 0) AS queued,
    coalesce(c.suspended, 0) AS suspended,
    coalesce(c.running, 0) >= coalesce(key_limit(k.key), 2147483647) AS at_limit
FROM (
    SELECT DISTINCT r.concurrency_key AS key FROM runs r
    WHERE r.concurrency_key IS NOT NULL AND r.status IN ('queued', 'running', 'suspended')
) AS k
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE r.status = 'running' AND coalesce(r.lease_until, r.due_at) > now()) AS running,
           count(*) FILTER (WHERE r.status = 'queued') AS queued,
           count(*) FILTER (WHERE r.status = 'suspended') AS suspended
    FROM runs r WHERE r.concurrency_key = k.key
      AND r.status IN ('queued', 'running', 'suspended')
) AS c ON true;
