-- pgjournal schema, part 5: replay fidelity, bounded journal loading, leases
-- that survive a slow or locked database, and a worker registry that stays small.
--
-- * Values a workflow sees (run input and output, step outputs, stream chunks,
--   signal payloads) are stored as `json`, not `jsonb`: `json` keeps the text
--   the program produced (dict key order, float spelling such as 1e+20), so a
--   replay parses exactly what the first execution saw, and a DBA still reads
--   it with -> and ->>. Errors stay `jsonb` (the views group by error->>'type');
--   the exact user values inside an error travel as a JSON text field.
-- * Journal entries record their delivery `turn`: the order in which their
--   results were handed to the workflow. With parallel steps (asyncio.gather)
--   a replay hands results back in that same order, so branches interleave as
--   they did the first time. `fingerprint` identifies the call (function and
--   arguments) so a replay that would hand one branch's result to another
--   fails loudly instead.
-- * The claim no longer aggregates the whole journal into one value (a run
--   with a large journal stalled every claim): the run loads it in pages.
-- * The heartbeat never waits on a row lock; claim and heartbeat lock runs
--   before the worker row.
-- * Claims of runs whose lease ran out while the server itself restarted are
--   counted as `interruptions`, not as crash `recoveries`.

-- -- value columns: json ----------------------------------------------------

ALTER TABLE runs ALTER COLUMN input DROP DEFAULT;
ALTER TABLE runs ALTER COLUMN input TYPE json USING input::json;
ALTER TABLE runs ALTER COLUMN input SET DEFAULT '{}'::json;
ALTER TABLE runs ALTER COLUMN output TYPE json USING output::json;
ALTER TABLE steps ALTER COLUMN output TYPE json USING output::json;
ALTER TABLE stream_chunks ALTER COLUMN chunk TYPE json USING chunk::json;
ALTER TABLE signals ALTER COLUMN payload TYPE json USING payload::json;

-- -- new columns --------------------------------------------------------------

ALTER TABLE steps ADD COLUMN turn integer;
ALTER TABLE steps ADD COLUMN fingerprint text;
ALTER TABLE steps ADD COLUMN calls_before integer;
COMMENT ON COLUMN steps.calls_before IS
    'How many calls the workflow had made when this result was handed to it (replay '
    'hands it back no earlier).';
COMMENT ON COLUMN steps.turn IS
    'Delivery order: the n-th result handed to the workflow (parallel steps replay in this order).';
COMMENT ON COLUMN steps.fingerprint IS
    'Hash of the step function and arguments, checked on replay.';
ALTER TABLE stream_chunks ADD COLUMN turn integer;
ALTER TABLE stream_chunks ADD COLUMN calls_before integer;
COMMENT ON COLUMN stream_chunks.turn IS 'Delivery order of the chunk among all deliveries of the run.';

ALTER TABLE runs ADD COLUMN interruptions integer NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN leased_at timestamptz;
COMMENT ON COLUMN runs.interruptions IS
    'Claims of the run after its lease ran out while the database server restarted '
    '(not the worker''s fault; not counted in recoveries).';
COMMENT ON COLUMN runs.leased_at IS 'When the current lease was granted or last renewed.';

ALTER TABLE workers ADD COLUMN lease_seconds double precision;
ALTER TABLE workers ADD COLUMN workflows text[];
COMMENT ON COLUMN workers.workflows IS
    'The workflows the worker has registered (NULL: any); it claims only those.';
ALTER TABLE workers ADD COLUMN workflow_queues jsonb;
COMMENT ON COLUMN workers.workflow_queues IS
    'The queue of each workflow the worker has registered ({"name": "queue"}).';
CREATE INDEX workers_hungry_live ON workers (heartbeat_at) WHERE hungry AND stopped_at IS NULL;

ALTER TABLE signals ADD COLUMN idempotency_key text;
CREATE UNIQUE INDEX signals_idempotency ON signals (run_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- -- wake-ups -------------------------------------------------------------------

-- Only hungry live workers are looked at, through a partial index: the cost of
-- an enqueue does not depend on how many workers ever existed.
CREATE OR REPLACE FUNCTION notify_wake(p_queue text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(queue_lock_key(current_schema() || '.' || p_queue));
    IF EXISTS (SELECT 1 FROM workers w
               WHERE w.hungry AND w.stopped_at IS NULL
                 AND w.heartbeat_at > now() - interval '5 minutes'
                 AND p_queue = ANY (w.queues)) THEN
        PERFORM pg_notify('pgjournal_wake', current_schema() || ':' || p_queue);
    END IF;
END $$;

-- -- functions whose value parameters become json ------------------------------

DROP FUNCTION start_run(uuid, text, text, jsonb, integer, double precision, text, integer,
                        integer, text, jsonb);
CREATE FUNCTION start_run(
    p_id uuid, p_workflow text, p_queue text, p_input json,
    p_priority integer DEFAULT 0, p_delay_seconds double precision DEFAULT 0,
    p_idempotency_key text DEFAULT NULL, p_max_attempts integer DEFAULT 3,
    p_max_recoveries integer DEFAULT 5, p_source text DEFAULT 'native',
    p_meta jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO runs (id, workflow, queue, input, priority, due_at, idempotency_key,
                      max_attempts, max_recoveries, source, meta)
    VALUES (p_id, p_workflow, p_queue, p_input, p_priority,
            now() + make_interval(secs => greatest(p_delay_seconds, 0)),
            p_idempotency_key, p_max_attempts, p_max_recoveries, p_source, p_meta)
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

-- -- the claim ------------------------------------------------------------------

DROP TYPE claimed_run CASCADE;  -- with claim_from, claim_runs and go_hungry

-- What a claim hands a worker: the run, the epoch it now owns it with, the
-- database clock, and whether the run has a journal to replay (loaded in pages
-- with journal_page, so a large journal costs nothing to other claims).
CREATE TYPE claimed_run AS (
    id uuid, workflow text, queue text, input json, attempt integer,
    max_attempts integer, lease_epoch bigint, recoveries integer,
    db_now timestamptz, has_journal boolean, interruptions integer
);

-- The workflow filter lowers the planner's row estimate of the claimable scan,
-- and with it the generic plan switched to a bitmap scan of every due run of
-- the queue plus a sort (claim 1.1 -> 1.6 ms per 10 at a shallow queue, and
-- growing with its depth). Bitmap scans and sorts are priced out here so the
-- pick stays one index scan in claim order, stopped by the LIMIT.
CREATE FUNCTION claim_from(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT
SET enable_bitmapscan = off SET enable_sort = off AS $$
DECLARE
    v_ids uuid[];
    v_restart timestamptz := pg_postmaster_start_time();
BEGIN
    -- Pick in index order, stopped by the LIMIT (see 0002). Runs of workflows
    -- the worker does not know are skipped, and stay queued for one that does.
    IF cardinality(p_queues) = 1 THEN
        SELECT array_agg(x.id) INTO v_ids FROM (
            SELECT r.id FROM runs r
            WHERE r.queue = p_queues[1] AND r.due_at IS NOT NULL AND r.due_at <= now()
              AND (p_workflows IS NULL OR r.workflow = ANY (p_workflows))
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
    RETURN QUERY
    WITH picked AS (
        SELECT unnest(v_ids) AS id
    ), claimed AS (
        UPDATE runs r SET
            status = 'running',
            lease_epoch = r.lease_epoch + 1,
            worker_id = p_worker,
            due_at = now() + make_interval(secs => p_lease_seconds),
            -- An expired lease is a crash recovery, unless the lease was last
            -- renewed before the server (re)started: then nobody could renew it.
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

-- Claim runs for a worker (see 0002): queued runs that are due, suspended runs
-- whose timer is due, running runs whose lease expired. A run past
-- max_recoveries is parked as 'dead' and its epoch moves on, so a stalled
-- holder that wakes up is fenced off. Locks runs, then the worker row.
CREATE FUNCTION claim_runs(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_free text[];
    v_q record;
    v_n integer;
    v_left integer := p_limit;
BEGIN
    UPDATE runs r SET
        status = 'dead', due_at = NULL, worker_id = NULL, finished_at = now(),
        updated_at = now(), lease_epoch = r.lease_epoch + 1,
        error = jsonb_build_object(
            'type', 'PoisonRun',
            'message', format('the worker running it vanished %s times; parked as dead',
                              r.recoveries + 1))
    WHERE r.queue = ANY (p_queues) AND r.status = 'running' AND r.due_at <= now()
      AND r.recoveries >= r.max_recoveries
      AND (r.leased_at IS NULL OR r.leased_at >= pg_postmaster_start_time());

    SELECT array_agg(qn) INTO v_free FROM unnest(p_queues) AS qn
    WHERE NOT EXISTS (SELECT 1 FROM queues s
                      WHERE s.name = qn AND (s.paused OR s.concurrency_limit IS NOT NULL));
    IF v_free IS NOT NULL AND v_left > 0 THEN
        RETURN QUERY SELECT * FROM claim_from(p_worker, v_free, v_left, p_lease_seconds,
                                              p_workflows);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_left := v_left - v_n;
    END IF;

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

    IF v_left = 0 THEN
        -- A full batch: this worker is busy, enqueues need not wake it.
        UPDATE workers w SET hungry = false WHERE w.id = p_worker AND w.hungry;
    END IF;
END $$;

-- A worker whose claim came back short is about to sleep on LISTEN: claim once
-- more under exclusive queue locks (held to commit, so an enqueue racing with
-- this waits), then flag the worker hungry if that claim came back short too.
-- Runs are locked before the worker row, as in claim_runs and heartbeat.
-- Lock order everywhere: queue advisory locks, queue rows, runs, worker row.
CREATE FUNCTION go_hungry(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_q text;
    v_n integer;
BEGIN
    FOR v_q IN SELECT DISTINCT qn FROM unnest(p_queues) AS qn ORDER BY qn LOOP
        PERFORM pg_advisory_xact_lock(queue_lock_key(current_schema() || '.' || v_q));
    END LOOP;
    RETURN QUERY SELECT * FROM claim_runs(p_worker, p_queues, p_limit, p_lease_seconds,
                                          p_workflows);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n < p_limit THEN
        UPDATE workers w SET hungry = true WHERE w.id = p_worker;
    END IF;
END $$;

-- -- loading a journal in pages -------------------------------------------------

-- Entries after p_after (a position), in position order: at most p_limit rows
-- and, past the first row, no more than about p_max_bytes of output.
CREATE FUNCTION journal_page(
    p_run uuid, p_after integer, p_limit integer, p_max_bytes bigint)
RETURNS TABLE (
    "position" integer, name text, kind text, status text, output json, error jsonb,
    attempt integer, turn integer, calls_before integer, fingerprint text, bytes bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT x.position, x.name, x.kind, x.status, x.output, x.error, x.attempt, x.turn,
           x.calls_before, x.fingerprint, x.bytes
    FROM (
        SELECT s.position, s.name, s.kind, s.status, s.output, s.error, s.attempt, s.turn,
               s.calls_before, s.fingerprint, b.bytes,
               sum(b.bytes) OVER (ORDER BY s.position) - b.bytes AS before
        FROM steps s
        CROSS JOIN LATERAL (SELECT coalesce(octet_length(s.output::text), 0)
                                   + coalesce(octet_length(s.error::text), 0)::bigint
                            AS bytes) b
        WHERE s.run_id = p_run AND s.position > p_after
        ORDER BY s.position
        LIMIT p_limit
    ) x
    WHERE x.before = 0 OR x.before < p_max_bytes
    ORDER BY x.position;
$$;

-- Chunks of one stream entry after p_after (a chunk seq), bounded like journal_page.
CREATE FUNCTION chunk_page(
    p_run uuid, p_position integer, p_after integer, p_limit integer, p_max_bytes bigint)
RETURNS TABLE (seq integer, chunk json, turn integer, calls_before integer, bytes bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT x.seq, x.chunk, x.turn, x.calls_before, x.bytes
    FROM (
        SELECT k.seq, k.chunk, k.turn, k.calls_before, octet_length(k.chunk::text)::bigint AS bytes,
               sum(octet_length(k.chunk::text)) OVER (ORDER BY k.seq)
                   - octet_length(k.chunk::text) AS before
        FROM stream_chunks k
        WHERE k.run_id = p_run AND k.position = p_position AND k.seq > p_after
        ORDER BY k.seq
        LIMIT p_limit
    ) x
    WHERE x.before = 0 OR x.before < p_max_bytes
    ORDER BY x.seq;
$$;

-- The outline of a run's journal, read once before a replay: the delivery
-- turns of all entries and chunks in order (small: integers), the last
-- position, and the journal's size in bytes.
CREATE FUNCTION journal_outline(p_run uuid)
RETURNS TABLE (turns integer[], last_position integer, entries bigint, bytes bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT
        (SELECT coalesce(array_agg(t.turn ORDER BY t.turn), '{}'::integer[]) FROM (
             SELECT s.turn FROM steps s WHERE s.run_id = p_run AND s.turn IS NOT NULL
             UNION ALL
             SELECT k.turn FROM stream_chunks k WHERE k.run_id = p_run AND k.turn IS NOT NULL
         ) t),
        (SELECT max(s.position) FROM steps s WHERE s.run_id = p_run),
        (SELECT count(*) FROM steps s WHERE s.run_id = p_run),
        (SELECT coalesce(sum(coalesce(octet_length(s.output::text), 0)
                             + coalesce(octet_length(s.error::text), 0)), 0)::bigint
         FROM steps s WHERE s.run_id = p_run)
          + (SELECT coalesce(sum(octet_length(k.chunk::text)), 0)::bigint
             FROM stream_chunks k WHERE k.run_id = p_run);
$$;

-- -- journal writers --------------------------------------------------------------

DROP FUNCTION journal_step(uuid, bigint, integer, text, integer, text, text, jsonb, jsonb,
                           integer, integer, timestamptz, jsonb, integer);
-- Journal one entry. Returns NULL on success, else the run's status (the caller
-- lost its lease, or the run was cancelled): nothing was written. A failed
-- entry may be overwritten (a retry re-executes it); a completed one never is,
-- except a stream journaled as cut short by the same owner (same epoch), which
-- that owner goes on reading (a signal wait that did not suspend the run).
-- p_chunk_turns gives the delivery turn of each chunk in p_chunks.
CREATE FUNCTION journal_step(
    p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_kind text, p_status text, p_output json, p_error jsonb, p_attempt integer,
    p_tries integer DEFAULT 1, p_started_at timestamptz DEFAULT NULL,
    p_chunks json DEFAULT NULL, p_chunk_start integer DEFAULT 0,
    p_turn integer DEFAULT NULL, p_fingerprint text DEFAULT NULL,
    p_chunk_turns integer[] DEFAULT NULL, p_calls_before integer DEFAULT NULL,
    p_chunk_calls integer[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_n integer;
BEGIN
    v_lost := check_lease(p_run, p_epoch);
    IF v_lost IS NOT NULL THEN
        RETURN v_lost;
    END IF;
    INSERT INTO steps AS s (run_id, position, name, occurrence, kind, status, output, error,
                       attempt, tries, lease_epoch, started_at, turn, fingerprint,
                       calls_before)
    VALUES (p_run, p_position, p_name, p_occurrence, p_kind, p_status, p_output, p_error,
            p_attempt, p_tries, p_epoch, coalesce(p_started_at, now()), p_turn,
            p_fingerprint, p_calls_before)
    ON CONFLICT (run_id, position) DO UPDATE SET
        name = EXCLUDED.name, occurrence = EXCLUDED.occurrence, kind = EXCLUDED.kind,
        status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
        attempt = EXCLUDED.attempt, tries = s.tries + EXCLUDED.tries,
        lease_epoch = EXCLUDED.lease_epoch, started_at = EXCLUDED.started_at,
        turn = EXCLUDED.turn, fingerprint = EXCLUDED.fingerprint,
        calls_before = EXCLUDED.calls_before, finished_at = now(), updated_at = now()
    WHERE s.status = 'failed'
       OR (s.kind = 'stream' AND s.lease_epoch = EXCLUDED.lease_epoch
           AND (s.output ->> 'cut') = 'true');
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n = 0 THEN
        RAISE EXCEPTION 'step % of run % is already journaled as completed', p_position, p_run
            USING ERRCODE = 'PJ002';
    END IF;
    IF p_chunks IS NOT NULL THEN
        DELETE FROM stream_chunks k
        WHERE k.run_id = p_run AND k.position = p_position AND k.seq >= p_chunk_start;
        INSERT INTO stream_chunks (run_id, position, seq, chunk, turn, calls_before)
        SELECT p_run, p_position, p_chunk_start + e.ord::integer - 1, e.value,
               p_chunk_turns[e.ord], p_chunk_calls[e.ord]
        FROM json_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    END IF;
    RETURN NULL;
END $$;

DROP FUNCTION append_chunks(uuid, bigint, integer, integer, jsonb);
-- Write chunks of a stream step that is still running (watchers see them; a
-- stream cut short journals what was consumed and replays exactly that).
CREATE FUNCTION append_chunks(
    p_run uuid, p_epoch bigint, p_position integer, p_chunk_start integer, p_chunks json,
    p_chunk_turns integer[] DEFAULT NULL, p_chunk_calls integer[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
BEGIN
    v_lost := check_lease(p_run, p_epoch);
    IF v_lost IS NOT NULL THEN
        RETURN v_lost;
    END IF;
    DELETE FROM stream_chunks k
    WHERE k.run_id = p_run AND k.position = p_position AND k.seq >= p_chunk_start;
    INSERT INTO stream_chunks (run_id, position, seq, chunk, turn, calls_before)
    SELECT p_run, p_position, p_chunk_start + e.ord::integer - 1, e.value,
           p_chunk_turns[e.ord], p_chunk_calls[e.ord]
    FROM json_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    RETURN NULL;
END $$;

DROP FUNCTION wait_signal(uuid, bigint, integer, text, integer, double precision, integer);
-- Wait for signal p_name (see 0002). A timed-out wait journaled by an earlier
-- attempt is overwritten when a retry waits again, with a fresh deadline.
CREATE FUNCTION wait_signal(
    p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_timeout_seconds double precision, p_attempt integer, p_turn integer DEFAULT NULL,
    p_calls_before integer DEFAULT NULL)
RETURNS TABLE (outcome text, payload json)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_run runs%ROWTYPE;
    v_deadline timestamptz;
    v_sig signals%ROWTYPE;
BEGIN
    v_lost := check_lease(p_run, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN QUERY SELECT 'lost'::text, to_json(v_lost);
        RETURN;
    END IF;
    SELECT * INTO v_run FROM runs WHERE id = p_run;
    IF v_run.wait_position IS NOT DISTINCT FROM p_position THEN
        v_deadline := v_run.wait_until;
    ELSIF p_timeout_seconds IS NOT NULL THEN
        v_deadline := now() + make_interval(secs => p_timeout_seconds);
    END IF;

    SELECT * INTO v_sig FROM signals g
    WHERE g.run_id = p_run AND g.name = p_name AND g.consumed_at IS NULL
    ORDER BY g.id LIMIT 1 FOR UPDATE;
    IF FOUND THEN
        UPDATE signals SET consumed_at = now(), consumed_position = p_position
        WHERE id = v_sig.id;
        INSERT INTO steps AS s (run_id, position, name, occurrence, kind, status, output,
                                attempt, lease_epoch, turn, calls_before)
        VALUES (p_run, p_position, p_name, p_occurrence, 'signal', 'completed',
                v_sig.payload, p_attempt, p_epoch, p_turn, p_calls_before)
        ON CONFLICT (run_id, position) DO UPDATE SET
            status = 'completed', output = EXCLUDED.output, error = NULL,
            attempt = EXCLUDED.attempt, lease_epoch = EXCLUDED.lease_epoch,
            turn = EXCLUDED.turn, calls_before = EXCLUDED.calls_before,
            tries = s.tries + 1, started_at = now(),
            finished_at = now(), updated_at = now()
        WHERE s.status = 'failed';
        UPDATE runs SET wait_signal = NULL, wait_position = NULL, wait_until = NULL
        WHERE id = p_run AND wait_position IS NOT NULL;
        RETURN QUERY SELECT 'received'::text, v_sig.payload;
    ELSIF v_deadline IS NOT NULL AND v_deadline <= now() THEN
        INSERT INTO steps AS s (run_id, position, name, occurrence, kind, status, error,
                                attempt, lease_epoch, turn, calls_before)
        VALUES (p_run, p_position, p_name, p_occurrence, 'signal', 'failed',
                jsonb_build_object('type', 'TimeoutError', 'module', 'builtins',
                                   'message', format('no signal %L arrived in time', p_name)),
                p_attempt, p_epoch, p_turn, p_calls_before)
        ON CONFLICT (run_id, position) DO UPDATE SET
            error = EXCLUDED.error, attempt = EXCLUDED.attempt,
            lease_epoch = EXCLUDED.lease_epoch, turn = EXCLUDED.turn,
            calls_before = EXCLUDED.calls_before, tries = s.tries + 1,
            started_at = now(), finished_at = now(), updated_at = now()
        WHERE s.status = 'failed';
        UPDATE runs SET wait_signal = NULL, wait_position = NULL, wait_until = NULL
        WHERE id = p_run;
        RETURN QUERY SELECT 'timeout'::text, NULL::json;
    ELSE
        UPDATE runs SET status = 'suspended', due_at = v_deadline, worker_id = NULL,
                        wait_signal = p_name, wait_position = p_position,
                        wait_until = v_deadline, updated_at = now()
        WHERE id = p_run;
        RETURN QUERY SELECT 'suspended'::text, NULL::json;
    END IF;
END $$;

DROP FUNCTION sleep_until(uuid, bigint, integer, text, integer, double precision,
                          timestamptz, integer);
-- Durable sleep (see 0002); the first call journals the wake-up time.
CREATE FUNCTION sleep_until(
    p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_seconds double precision, p_wake_at timestamptz, p_attempt integer,
    p_turn integer DEFAULT NULL, p_calls_before integer DEFAULT NULL)
RETURNS TABLE (outcome text, wake_at timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_wake timestamptz := p_wake_at;
BEGIN
    v_lost := check_lease(p_run, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN QUERY SELECT 'lost'::text, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_wake IS NULL THEN
        v_wake := now() + make_interval(secs => greatest(p_seconds, 0));
        INSERT INTO steps (run_id, position, name, occurrence, kind, status, output,
                           attempt, lease_epoch, turn, calls_before)
        VALUES (p_run, p_position, p_name, p_occurrence, 'sleep', 'completed',
                to_json(v_wake), p_attempt, p_epoch, p_turn, p_calls_before);
    END IF;
    IF v_wake > now() THEN
        UPDATE runs SET status = 'suspended', due_at = v_wake, worker_id = NULL,
                        updated_at = now()
        WHERE id = p_run;
        RETURN QUERY SELECT 'suspended'::text, v_wake;
    ELSE
        RETURN QUERY SELECT 'due'::text, v_wake;
    END IF;
END $$;

DROP FUNCTION complete_runs(uuid[], bigint[], jsonb[]);
CREATE FUNCTION complete_runs(p_ids uuid[], p_epochs bigint[], p_outputs json[])
RETURNS TABLE (run_id uuid)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_ids uuid[];
    v_waited uuid[];
BEGIN
    -- Lock in id order so two batches can never deadlock.
    PERFORM 1 FROM runs r WHERE r.id = ANY (p_ids) ORDER BY r.id FOR UPDATE;
    WITH done AS (
        UPDATE runs r SET status = 'completed', output = v.output, due_at = NULL,
                          worker_id = NULL, finished_at = now(), updated_at = now()
        FROM unnest(p_ids, p_epochs, p_outputs) AS v(id, epoch, output)
        WHERE r.id = v.id AND r.lease_epoch = v.epoch AND r.status = 'running'
        RETURNING r.id, r.notify_done
    )
    SELECT array_agg(d.id), array_agg(d.id) FILTER (WHERE d.notify_done)
    INTO v_ids, v_waited FROM done d;
    PERFORM notify_done(w) FROM unnest(v_waited) AS w;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'::uuid[]));
END $$;

-- Record a fact about a run in its event log without a status change (e.g. a
-- run completed while its journal held entries the replay never asked for).
CREATE FUNCTION note_run_event(p_run uuid, p_epoch bigint, p_detail jsonb)
RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO run_events (run_id, from_status, to_status, attempt, lease_epoch,
                            worker_id, detail)
    SELECT r.id, r.status, r.status, r.attempt, r.lease_epoch, r.worker_id, p_detail
    FROM runs r WHERE r.id = p_run AND r.lease_epoch = p_epoch;
$$;

-- -- leases -------------------------------------------------------------------------

DROP FUNCTION heartbeat(uuid, uuid[], bigint[], double precision);
-- Extend the leases of the runs a worker holds. Never waits on a lock: a run
-- row locked by somebody else (a DBA's transaction) is skipped and reported
-- 'busy' (not renewed this time; the worker knows its lease deadline and stops
-- starting steps of it). Returns the runs NOT renewed, with their status and
-- epoch now: a changed epoch means taken over or cancelled; the same epoch with
-- another status means the worker's own last write beat the heartbeat.
-- Locks runs, then the worker row (the order of claim_runs).
CREATE FUNCTION heartbeat(
    p_worker uuid, p_ids uuid[], p_epochs bigint[], p_lease_seconds double precision)
RETURNS TABLE (lost_run_id uuid, status text, lease_epoch bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
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
        UPDATE runs r SET due_at = now() + make_interval(secs => p_lease_seconds),
                          leased_at = now()
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

DROP FUNCTION register_worker(uuid, text, integer, text[], integer);
-- Register a worker. Also forgets workers stopped more than a day ago and
-- workers silent for a week (they crashed): the registry stays small.
CREATE FUNCTION register_worker(
    p_id uuid, p_host text, p_pid integer, p_queues text[], p_concurrency integer,
    p_lease_seconds double precision DEFAULT NULL, p_workflows text[] DEFAULT NULL,
    p_workflow_queues jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM workers w
    WHERE w.id <> p_id
      AND ((w.stopped_at IS NOT NULL AND w.stopped_at < now() - interval '1 day')
           OR w.heartbeat_at < now() - interval '7 days');
    INSERT INTO workers (id, host, pid, queues, concurrency, lease_seconds, workflows,
                         workflow_queues)
    VALUES (p_id, p_host, p_pid, p_queues, p_concurrency, p_lease_seconds, p_workflows,
            p_workflow_queues)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL,
        lease_seconds = EXCLUDED.lease_seconds, workflows = EXCLUDED.workflows,
        workflow_queues = EXCLUDED.workflow_queues;
END $$;

-- -- signals ----------------------------------------------------------------------------

DROP FUNCTION send_signal(uuid, text, jsonb);
-- Send a signal to a run (see 0002). With p_idempotency_key, sending the same
-- key to the same run again returns the first signal's id and delivers nothing
-- more (a client retrying after a lost connection), even if the run has ended.
CREATE FUNCTION send_signal(p_run uuid, p_name text, p_payload json,
                            p_idempotency_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_run runs%ROWTYPE;
    v_id bigint;
BEGIN
    SELECT * INTO v_run FROM runs WHERE id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', p_run USING ERRCODE = 'PJ404';
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        SELECT g.id INTO v_id FROM signals g
        WHERE g.run_id = p_run AND g.idempotency_key = p_idempotency_key;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;
    IF v_run.status IN ('completed', 'failed', 'cancelled', 'dead') THEN
        RAISE EXCEPTION 'run % has already ended (%); signal % not sent',
            p_run, v_run.status, p_name USING ERRCODE = 'PJ409';
    END IF;
    INSERT INTO signals (run_id, name, payload, idempotency_key)
    VALUES (p_run, p_name, p_payload, p_idempotency_key)
    RETURNING id INTO v_id;
    IF v_run.status = 'suspended' AND v_run.wait_signal = p_name THEN
        UPDATE runs SET status = 'queued', due_at = now(), updated_at = now()
        WHERE id = p_run;
        PERFORM notify_wake(v_run.queue);
    END IF;
    RETURN v_id;
END $$;

DROP FUNCTION request_result(uuid);
CREATE FUNCTION request_result(p_run uuid)
RETURNS TABLE (status text, output json, error jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE runs r SET notify_done = true
    WHERE r.id = p_run AND NOT r.notify_done
      AND r.status IN ('queued', 'running', 'suspended');
    RETURN QUERY SELECT r.status, r.output, r.error FROM runs r WHERE r.id = p_run;
END $$;

-- -- queues: one lock order (advisory lock, then the queue row) ---------------------

CREATE OR REPLACE FUNCTION set_queue(p_name text, p_concurrency_limit integer,
                                     p_paused boolean)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- go_hungry holds the queue's advisory lock and then locks the queue row in
    -- claim_runs: take them in that order here too.
    PERFORM pg_advisory_xact_lock_shared(queue_lock_key(current_schema() || '.' || p_name));
    INSERT INTO queues (name, concurrency_limit, paused)
    VALUES (p_name, p_concurrency_limit, coalesce(p_paused, false))
    ON CONFLICT (name) DO UPDATE SET
        concurrency_limit = EXCLUDED.concurrency_limit,
        paused = coalesce(p_paused, queues.paused),
        updated_at = now();
    IF NOT coalesce(p_paused, false) THEN
        PERFORM notify_wake(p_name);
    END IF;
END $$;

-- -- views ------------------------------------------------------------------------------

-- A worker is 'gone' once its heartbeat is older than its lease (it was
-- killed): its runs are claimable by others and enqueues do not wake it.
CREATE OR REPLACE VIEW worker_health AS
WITH held AS (
    SELECT r.worker_id,
           count(*) AS runs_held,
           count(*) FILTER (WHERE r.due_at <= now()) AS expired_leases
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
COMMENT ON VIEW worker_health IS
    'Per worker: host, pid, heartbeat age, runs held, alive/gone/stale/stopped, '
    'the workflows it serves.';

-- Runs waiting for a worker that does not exist: queued runs whose queue and
-- workflow no live worker serves (a typo, or a rolling deploy not finished).
CREATE VIEW unserved_runs AS
SELECT r.queue, r.workflow, count(*) AS runs, min(r.created_at) AS oldest
FROM runs r
WHERE r.status = 'queued' AND r.source = 'native'
  AND NOT EXISTS (
      SELECT 1 FROM workers w
      WHERE w.stopped_at IS NULL
        AND now() - w.heartbeat_at <= coalesce(make_interval(secs => w.lease_seconds),
                                               interval '1 minute')
        AND r.queue = ANY (w.queues)
        AND (w.workflows IS NULL OR r.workflow = ANY (w.workflows)))
GROUP BY r.queue, r.workflow;
COMMENT ON VIEW unserved_runs IS
    'Queued runs of a queue and workflow that no live worker serves, by queue and workflow.';

-- -- adapters: value parameters become json ----------------------------------------

DROP FUNCTION adapter_put_named(uuid, text, text, jsonb, text, text, jsonb, jsonb);
DROP FUNCTION adapter_take_signal(uuid, text, text, jsonb, text, integer);
DROP FUNCTION adapter_write(uuid, text, text, jsonb, integer, integer, boolean, text, text,
                            text, jsonb, jsonb, jsonb, timestamptz, timestamptz, jsonb);

CREATE FUNCTION adapter_write(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_position integer, p_first integer, p_replace boolean,
    p_name text, p_kind text, p_status text, p_output json, p_error jsonb,
    p_meta jsonb, p_started_at timestamptz, p_finished_at timestamptz,
    p_chunks json DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_epoch bigint;
    v_pos integer := p_position;
    v_old text;
    v_occ integer;
    v_last integer;
BEGIN
    v_epoch := adapter_run(p_run, p_source, p_workflow, p_run_meta);
    IF v_pos IS NULL THEN
        SELECT greatest(coalesce(max(s.position) + 1, p_first), p_first) INTO v_pos
        FROM steps s WHERE s.run_id = p_run;
    END IF;
    SELECT s.name INTO v_old FROM steps s WHERE s.run_id = p_run AND s.position = v_pos;
    IF FOUND AND NOT p_replace THEN
        RAISE EXCEPTION 'entry % of run % already exists; entries are never overwritten',
            v_pos, p_run USING ERRCODE = 'PJ412';
    END IF;
    SELECT s.occurrence + 1, s.position INTO v_occ, v_last
    FROM steps s WHERE s.run_id = p_run AND s.name = p_name
    ORDER BY s.occurrence DESC LIMIT 1;
    v_occ := coalesce(v_occ, 0);
    IF v_old IS NULL THEN
        INSERT INTO steps (run_id, position, name, occurrence, kind, status, output, error,
                           meta, lease_epoch, started_at, finished_at)
        VALUES (p_run, v_pos, p_name, v_occ, p_kind, p_status, p_output, p_error,
                coalesce(p_meta, '{}'::jsonb), v_epoch, coalesce(p_started_at, now()),
                coalesce(p_finished_at, p_started_at, now()));
        IF v_last > v_pos THEN
            PERFORM adapter_renumber(p_run, p_name);
        END IF;
    ELSE
        UPDATE steps s SET
            name = p_name,
            occurrence = CASE WHEN v_old = p_name THEN s.occurrence ELSE v_occ END,
            kind = p_kind, status = p_status, output = p_output, error = p_error,
            meta = coalesce(p_meta, '{}'::jsonb), lease_epoch = v_epoch,
            started_at = coalesce(p_started_at, now()),
            finished_at = coalesce(p_finished_at, p_started_at, now()),
            tries = s.tries + 1, updated_at = now()
        WHERE s.run_id = p_run AND s.position = v_pos;
        IF v_old <> p_name THEN
            PERFORM adapter_renumber(p_run, v_old);
            PERFORM adapter_renumber(p_run, p_name);
        END IF;
        DELETE FROM stream_chunks k WHERE k.run_id = p_run AND k.position = v_pos;
    END IF;
    IF p_chunks IS NOT NULL THEN
        INSERT INTO stream_chunks (run_id, position, seq, chunk)
        SELECT p_run, v_pos, e.ord::integer - 1, e.value
        FROM json_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    END IF;
    RETURN v_pos;
END $$;

CREATE FUNCTION adapter_put_named(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_name text, p_kind text, p_output json, p_chunks json DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_pos integer;
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_run_meta);
    SELECT s.position INTO v_pos FROM steps s
    WHERE s.run_id = p_run AND s.name = p_name AND s.kind = p_kind
    ORDER BY s.position LIMIT 1;
    RETURN adapter_write(p_run, p_source, p_workflow, p_run_meta, v_pos, 0, true,
                         p_name, p_kind, 'completed', p_output, NULL, NULL, NULL, NULL,
                         p_chunks);
END $$;

DROP FUNCTION adapter_save_run(uuid, text, text, text, jsonb, jsonb, jsonb, jsonb,
                               timestamptz, timestamptz);
CREATE FUNCTION adapter_save_run(
    p_run uuid, p_source text, p_workflow text, p_status text, p_input json,
    p_output json, p_error jsonb, p_meta jsonb, p_created_at timestamptz,
    p_updated_at timestamptz)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_meta, p_status);
    UPDATE runs r SET
        workflow = p_workflow, status = p_status, input = p_input, output = p_output,
        error = p_error, meta = p_meta, created_at = p_created_at,
        updated_at = p_updated_at,
        due_at = CASE WHEN p_status IN ('queued', 'running') THEN adapter_open_until() END,
        started_at = p_created_at,
        finished_at = CASE WHEN p_status IN ('completed', 'failed', 'cancelled', 'dead')
                           THEN p_updated_at END
    WHERE r.id = p_run;
END $$;

DROP FUNCTION adapter_set_output(uuid, text, text, jsonb, jsonb, jsonb);
CREATE FUNCTION adapter_set_output(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_output json, p_meta_patch jsonb)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_run_meta);
    UPDATE runs r SET output = p_output, meta = r.meta || coalesce(p_meta_patch, '{}'::jsonb),
                      updated_at = now()
    WHERE r.id = p_run;
END $$;

DROP FUNCTION adapter_send_signal(uuid, text, text, jsonb, text, jsonb);
CREATE FUNCTION adapter_send_signal(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_name text, p_payload json)
RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_id bigint;
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_run_meta, 'suspended');
    INSERT INTO signals (run_id, name, payload) VALUES (p_run, p_name, p_payload)
    RETURNING id INTO v_id;
    PERFORM pg_notify('pgjournal_adapter_signal', current_schema() || ':' || p_run::text);
    RETURN v_id;
END $$;

CREATE FUNCTION adapter_take_signal(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_name text, p_index integer)
RETURNS TABLE (found boolean, payload json)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_out json;
    v_sig signals%ROWTYPE;
    v_pos integer;
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_run_meta);
    SELECT s.output INTO v_out FROM steps s
    WHERE s.run_id = p_run AND s.name = p_name AND s.kind = 'signal'
    ORDER BY s.position OFFSET p_index LIMIT 1;
    IF FOUND THEN
        RETURN QUERY SELECT true, v_out;
        RETURN;
    END IF;
    SELECT * INTO v_sig FROM signals g
    WHERE g.run_id = p_run AND g.name = p_name AND g.consumed_at IS NULL
    ORDER BY g.id LIMIT 1 FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::json;
        RETURN;
    END IF;
    v_pos := adapter_write(p_run, p_source, p_workflow, p_run_meta, NULL, 0, false,
                           p_name, 'signal', 'completed', v_sig.payload, NULL,
                           jsonb_build_object('signal_id', v_sig.id), NULL, NULL);
    UPDATE signals SET consumed_at = now(), consumed_position = v_pos WHERE id = v_sig.id;
    RETURN QUERY SELECT true, v_sig.payload;
END $$;
