-- pgjournal schema, part 13: the expired-lease scan on demand.
--
-- Since 0013 a running run's lease expiry (`lease_until`) is in no index, so
-- heartbeats are HOT updates; the price is that finding expired leases reads
-- every running run of the queue (through `runs_running`). Every claim did
-- that: with 2,000 running runs a claim took 1.6x as long, with 10,000 3.9x
-- (bench/claim_cost.py). Expired leases are rare (a worker died or was cut
-- off) and nobody waits on a NOTIFY for them, so the claim functions take
-- `p_expired`: false skips that scan (a one-time filter of the generic plan;
-- the index is not touched). Workers ask for it at most once per poll
-- interval (pgjournal/worker.py), so a dead worker's runs are still taken
-- within lease + poll interval. The default (true) keeps the old behaviour for
-- callers that do not pass it (older workers during a rolling deploy, a DBA).
--
-- The functions gain a parameter, so the old ones are dropped (a second
-- overload with a defaulted parameter would make 5-argument calls
-- ambiguous); IF EXISTS and OR REPLACE let the file run twice (a test
-- replays it to check what `pgjournal migrate` says about roles). Everything else in them is as in 0013, but for one setting:
--
-- claim_from and heartbeat run with enable_seqscan = off (heartbeat also
-- without bitmap scans), and their statements name the ids they touch
-- (`r.id = ANY (...)`, besides the join). Both touch at most a batch of runs
-- by id, yet the generic plans read far more: the claim's UPDATE, below a few
-- thousand rows in `runs`, a sequential scan hashed for the join with
-- `picked` (a claim took 1.0 ms instead of 0.7 ms with ~1,000 ended runs); the
-- heartbeat, every running run of every worker (through runs_running). The
-- settings only steer the choice; a table without an index path (the small
-- settings tables) is still scanned.

DROP FUNCTION IF EXISTS go_hungry(uuid, text[], integer, double precision, text[]);
DROP FUNCTION IF EXISTS claim_runs(uuid, text[], integer, double precision, text[]);
DROP FUNCTION IF EXISTS claim_from(uuid, text[], integer, double precision, text[]);

-- claim_from of 0013, the expired part behind p_expired.
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
BEGIN
    IF v_keyed THEN
        SELECT array_agg(x.k) INTO v_full FROM (
            SELECT r.concurrency_key AS k, count(*) AS n FROM runs r
            WHERE r.status = 'running' AND r.concurrency_key IS NOT NULL
              AND coalesce(r.lease_until, r.due_at) > now()
            GROUP BY r.concurrency_key) AS x
        WHERE x.n >= key_limit(x.k);
    END IF;
    -- Per queue: the claimable runs in index order (runs_claimable), and, when
    -- p_expired, the runs whose lease expired (usually none; read through
    -- runs_running),
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
                    WHERE p_expired AND r.queue = p_queues[1] AND r.status = 'running'
                      AND r.lease_until <= now()
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
                        WHERE p_expired AND r.queue = q.qn AND r.status = 'running'
                          AND r.lease_until <= now()
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

-- claim_runs of 0013, passing p_expired on.
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

-- go_hungry of 0005: a worker whose claim came back short claims once more
-- under exclusive queue locks (they pair with notify_wake's), then flags itself
-- hungry if that claim came back short too.
CREATE OR REPLACE FUNCTION go_hungry(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL, p_expired boolean DEFAULT true)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_q text;
    v_n integer;
BEGIN
    FOR v_q IN SELECT DISTINCT qn FROM unnest(p_queues) AS qn ORDER BY qn LOOP
        PERFORM pg_advisory_xact_lock(queue_lock_key(current_schema() || '.' || v_q));
    END LOOP;
    RETURN QUERY SELECT * FROM claim_runs(p_worker, p_queues, p_limit, p_lease_seconds,
                                          p_workflows, p_expired);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n < p_limit THEN
        UPDATE workers w SET hungry = true WHERE w.id = p_worker;
    END IF;
END $$;

-- heartbeat of 0013, reading only the runs it renews (by id): it read every
-- running run of every worker (a bitmap scan of runs_running, hashed for the
-- join), so each beat cost more as the fleet grew.
CREATE OR REPLACE FUNCTION heartbeat(
    p_worker uuid, p_ids uuid[], p_epochs bigint[], p_lease_seconds double precision)
RETURNS TABLE (lost_run_id uuid, status text, lease_epoch bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT
SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_renewed uuid[];
BEGIN
    PERFORM set_config('lock_timeout',
                       greatest(50, (p_lease_seconds * 1000 / 6)::integer)::text, true);
    WITH mine AS (
        SELECT r.id FROM runs r
        JOIN unnest(p_ids, p_epochs) AS v(id, epoch) ON r.id = v.id
        WHERE r.id = ANY (p_ids) AND r.lease_epoch = v.epoch AND r.status = 'running'
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
