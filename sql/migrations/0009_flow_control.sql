-- pgjournal schema, part 9: flow control across hosts. Concurrency keys (at
-- most N runs of one key running at once, over every worker) and rate
-- buckets (units per second shared by every host, taken before a step).
--
-- * A run may carry a `concurrency_key` ("tenant-42"). `concurrency_limits`
--   holds limits by exact key or by prefix pattern ("tenant-*"; the exact key
--   wins, else the longest matching prefix). Keys without a limit are
--   unlimited. Only `running` runs count: a run suspended on a signal, timer,
--   children or rate bucket holds no slot of its key.
-- * The claim skips runs whose key is at its limit (no head-of-line blocking:
--   other keys' runs behind them are claimed), and before claiming runs of a
--   limited key it takes that key's advisory lock and counts its running
--   runs again, so two workers on two hosts can never both take the last slot.
--   With no limits defined at all the claim is the claim of 0005.
-- * `rate_buckets` are token buckets (capacity, refill per second). A step
--   declared with rate=(bucket, units) first takes its units: the bucket may go
--   into debt, and the taker is ready when the debt is paid back by the refill
--   (first come, first served; no polling). The take is journaled with the time
--   it is ready, so a replay neither takes again nor waits again.

-- -- concurrency keys -----------------------------------------------------------

-- (the column itself came with 0006: child runs carry keys too)
COMMENT ON COLUMN runs.concurrency_key IS
    'Flow-control key (a tenant, an API key ...): at most its limit of runs with this key run at once.';
CREATE INDEX runs_key_running ON runs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;
CREATE INDEX runs_key_waiting ON runs (concurrency_key, status)
    WHERE concurrency_key IS NOT NULL AND status IN ('queued', 'suspended');

CREATE TABLE concurrency_limits (
    pattern     text PRIMARY KEY
        CHECK (pattern <> '' AND pattern <> '*'
               AND strpos(left(pattern, -1), '*') = 0),
    max_running integer NOT NULL CHECK (max_running > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE concurrency_limits IS
    'Limits of running runs per concurrency key: an exact key, or a prefix ending in *.';

-- The limit of one key: its exact row, else the longest prefix pattern that
-- matches it; NULL = unlimited. (PL/pgSQL: its plan is cached per session; a
-- SQL function with a pinned search_path is planned again on every call.)
CREATE FUNCTION key_limit(p_key text) RETURNS integer
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
BEGIN
    RETURN (SELECT l.max_running FROM concurrency_limits l
            WHERE l.pattern = p_key
               OR (right(l.pattern, 1) = '*' AND starts_with(p_key, left(l.pattern, -1)))
            ORDER BY (l.pattern = p_key) DESC, length(l.pattern) DESC
            LIMIT 1);
END $$;

-- Set (p_max_running > 0) or remove (NULL) the limit of a key or pattern, and
-- wake idle workers of the queues holding queued runs with keys (a raised
-- limit may free some).
CREATE FUNCTION set_concurrency_limit(p_pattern text, p_max_running integer)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_queue text;
BEGIN
    IF p_max_running IS NULL THEN
        DELETE FROM concurrency_limits WHERE pattern = p_pattern;
    ELSE
        INSERT INTO concurrency_limits (pattern, max_running)
        VALUES (p_pattern, p_max_running)
        ON CONFLICT (pattern) DO UPDATE SET max_running = EXCLUDED.max_running,
                                            updated_at = now();
    END IF;
    FOR v_queue IN SELECT DISTINCT r.queue FROM runs r
                   WHERE r.concurrency_key IS NOT NULL AND r.status = 'queued' LOOP
        PERFORM notify_wake(v_queue);
    END LOOP;
END $$;

-- The claim of 0005, with concurrency keys: runs of keys at their limit are
-- passed over (their rows are not even locked), and the runs picked of a
-- limited key are cut to what the key has room for, counted under the key's
-- advisory lock (taken in key order, so two claims never deadlock).
CREATE OR REPLACE FUNCTION claim_from(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET enable_bitmapscan = off SET enable_sort = off SET jit = off AS $$
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
        -- Keys at their limit now (running runs are few: bounded by the slots
        -- of all workers; read through runs_key_running).
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
        -- The limited keys among the picked runs, in key order.
        SELECT array_agg(x.k ORDER BY x.k), array_agg(x.l ORDER BY x.k)
        INTO v_keys, v_limits
        FROM (SELECT k.k, key_limit(k.k) AS l FROM (
                  SELECT DISTINCT r.concurrency_key AS k FROM runs r
                  WHERE r.id = ANY (v_ids) AND r.concurrency_key IS NOT NULL) AS k) AS x
        WHERE x.l IS NOT NULL;
        IF v_keys IS NOT NULL THEN
            -- Their advisory locks, in key order (two claims never deadlock) ...
            PERFORM pg_advisory_xact_lock(
                hashtextextended('pgjournal.key:' || current_schema() || ':' || k.k, 0))
            FROM unnest(v_keys) WITH ORDINALITY AS k(k, ord) ORDER BY k.ord;
            -- ... then, in a new statement (a new snapshot: claims of these keys
            -- committed before the locks were granted are seen), what each key
            -- has room for; the picked runs beyond that stay queued.
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
        SELECT unnest(v_ids) AS id
    ), claimed AS (
        UPDATE runs r SET
            status = 'running',
            lease_epoch = r.lease_epoch + 1,
            worker_id = p_worker,
            due_at = now() + make_interval(secs => p_lease_seconds),
            recoveries = r.recoveries + CASE
                WHEN r.status = 'running' AND (r.leased_at IS NULL OR r.leased_at >= v_restart)
                THEN 1 ELSE 0 END,
            interruptions = r.interruptions + CASE
                WHEN r.status = 'running' AND r.leased_at < v_restart THEN 1 ELSE 0 END,
            leased_at = now(),
            started_at = coalesce(r.started_at, now()),
            updated_at = now()
        FROM picked WHERE r.id = picked.id
        RETURNING r.id, r.workflow, r.queue, r.input, r.attempt, r.max_attempts,
                  r.lease_epoch, r.recoveries, r.interruptions
    )
    SELECT c.id, c.workflow, c.queue, c.input, c.attempt, c.max_attempts,
           c.lease_epoch, c.recoveries, now(),
           EXISTS (SELECT 1 FROM steps s WHERE s.run_id = c.id),
           c.interruptions
    FROM claimed c;
END $$;

-- -- rate buckets ------------------------------------------------------------------

CREATE TABLE rate_buckets (
    name              text PRIMARY KEY,
    capacity          double precision NOT NULL CHECK (capacity > 0),
    refill_per_second double precision NOT NULL CHECK (refill_per_second > 0),
    -- Units available at updated_at; negative while takers wait for the refill.
    tokens            double precision NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE rate_buckets IS
    'Token buckets shared by every host: capacity units, refilled at refill_per_second.';

-- Create or change a bucket (a new one starts full); NULL capacity removes it.
CREATE FUNCTION set_rate_limit(p_name text, p_capacity double precision,
                               p_refill_per_second double precision)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF p_capacity IS NULL THEN
        DELETE FROM rate_buckets WHERE name = p_name;
        RETURN;
    END IF;
    INSERT INTO rate_buckets (name, capacity, refill_per_second, tokens)
    VALUES (p_name, p_capacity, p_refill_per_second, p_capacity)
    ON CONFLICT (name) DO UPDATE SET
        tokens = least(EXCLUDED.capacity, rate_buckets.tokens + greatest(0, extract(
            epoch FROM now() - rate_buckets.updated_at)) * rate_buckets.refill_per_second),
        capacity = EXCLUDED.capacity, refill_per_second = EXCLUDED.refill_per_second,
        updated_at = greatest(now(), rate_buckets.updated_at);
END $$;

-- Take p_units from bucket p_bucket for the run's entry at p_position (fenced),
-- journaling {"bucket", "units", "ready_at"}: ready_at is now when the bucket
-- held the units, else when the refill will have paid back the debt (the
-- caller waits until then: in the worker if it is soon, else suspended with
-- sleep_until). A negative p_units gives units back (a usage correction).
-- Returns 'taken' or 'lost:<status>'. Locks the run, then the bucket.
CREATE FUNCTION take_units(
    p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_bucket text, p_units double precision, p_attempt integer,
    p_turn integer DEFAULT NULL, p_calls_before integer DEFAULT NULL)
RETURNS TABLE (outcome text, ready_at timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_b rate_buckets%ROWTYPE;
    v_now_tokens double precision;
    v_ready timestamptz;
    v_t timestamptz;
BEGIN
    v_lost := check_lease(p_run, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN QUERY SELECT 'lost:' || v_lost, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT * INTO v_b FROM rate_buckets WHERE name = p_bucket FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no rate bucket named %: create it with set_rate_limit(%, capacity, '
            'refill_per_second) or `pgjournal limits rate`', p_bucket, quote_literal(p_bucket)
            USING ERRCODE = 'PJ404';
    END IF;
    -- The bucket's clock never goes back: now() is when this transaction
    -- started, and a take that started earlier may have locked the bucket
    -- first and moved it on. Reckoning from the later of the two keeps every
    -- ready_at where the refill really pays the debt back.
    v_t := greatest(now(), v_b.updated_at);
    v_now_tokens := least(v_b.capacity, v_b.tokens + extract(
        epoch FROM v_t - v_b.updated_at) * v_b.refill_per_second);
    v_now_tokens := least(v_b.capacity, v_now_tokens - p_units);
    v_ready := v_t + make_interval(secs => greatest(0, -v_now_tokens) / v_b.refill_per_second);
    IF p_units < 0 THEN
        v_ready := now();
    END IF;
    UPDATE rate_buckets SET tokens = v_now_tokens, updated_at = v_t WHERE name = p_bucket;
    INSERT INTO steps (run_id, position, name, occurrence, kind, status, output, attempt,
                       lease_epoch, turn, calls_before)
    VALUES (p_run, p_position, p_name, p_occurrence, 'rate', 'completed',
            json_build_object('bucket', p_bucket, 'units', p_units, 'ready_at', v_ready),
            p_attempt, p_epoch, p_turn, p_calls_before);
    RETURN QUERY SELECT 'taken'::text, v_ready;
END $$;

-- -- what is limited now ------------------------------------------------------------

-- One row per concurrency key with unfinished runs or a limit: its limit, and
-- how many of its runs are running, queued (claimable or not yet due) and
-- suspended. Reads unfinished runs only (partial indexes).
CREATE VIEW concurrency_keys AS
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
    SELECT count(*) FILTER (WHERE r.status = 'running' AND r.due_at > now()) AS running,
           count(*) FILTER (WHERE r.status = 'queued') AS queued,
           count(*) FILTER (WHERE r.status = 'suspended') AS suspended
    FROM runs r WHERE r.concurrency_key = k.key
      AND r.status IN ('queued', 'running', 'suspended')
) AS c ON true;
COMMENT ON VIEW concurrency_keys IS
    'Concurrency keys with unfinished runs: limit, running, queued, suspended, at_limit.';

-- One row per rate bucket: its settings and the units available now (negative:
-- takers are waiting for the refill), and how long until it is full.
CREATE VIEW rate_limits AS
SELECT
    b.name,
    b.capacity,
    b.refill_per_second,
    t.available,
    CASE WHEN t.available < 0 THEN make_interval(secs => -t.available / b.refill_per_second)
    END AS debt_paid_in,
    make_interval(secs => greatest(0, b.capacity - t.available) / b.refill_per_second)
        AS full_in,
    b.updated_at AS last_taken_at
FROM rate_buckets b
CROSS JOIN LATERAL (
    SELECT least(b.capacity, b.tokens + greatest(0, extract(epoch FROM now() - b.updated_at))
                 * b.refill_per_second) AS available
) AS t;
COMMENT ON VIEW rate_limits IS
    'Rate buckets: capacity, refill, units available now (negative = waiting takers).';

-- -- starting runs with a key --------------------------------------------------------

DROP FUNCTION start_run(uuid, text, text, json, integer, double precision, text, integer,
                        integer, text, jsonb);
CREATE FUNCTION start_run(
    p_id uuid, p_workflow text, p_queue text, p_input json,
    p_priority integer DEFAULT 0, p_delay_seconds double precision DEFAULT 0,
    p_idempotency_key text DEFAULT NULL, p_max_attempts integer DEFAULT 3,
    p_max_recoveries integer DEFAULT 5, p_source text DEFAULT 'native',
    p_meta jsonb DEFAULT '{}'::jsonb, p_concurrency_key text DEFAULT NULL)
RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO runs (id, workflow, queue, input, priority, due_at, idempotency_key,
                      max_attempts, max_recoveries, source, meta, concurrency_key)
    VALUES (p_id, p_workflow, p_queue, p_input, p_priority,
            now() + make_interval(secs => greatest(p_delay_seconds, 0)),
            p_idempotency_key, p_max_attempts, p_max_recoveries, p_source, p_meta,
            p_concurrency_key)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT r.id INTO v_id FROM runs r WHERE r.idempotency_key = p_idempotency_key;
        RETURN QUERY SELECT v_id, false;
        RETURN;
    END IF;
    IF p_delay_seconds <= 0 THEN
        PERFORM notify_wake(p_queue);
    END IF;
    RETURN QUERY SELECT v_id, true;
END $$;
