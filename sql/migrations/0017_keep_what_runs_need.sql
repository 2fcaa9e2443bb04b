-- pgjournal schema, part 17: deadlines meet retries, forks meet keys, prune meets
-- children (issue 20, rows 3-5 and item 6).
--
-- * `runs.deadline_seconds`: the time a run was given to end, in seconds from
--   its creation (a child's `timeout=`, or what was left of the parent's
--   deadline it inherited). Filled at insert by trigger `runs_deadline_rule`
--   from `deadline_at`, so the functions that start runs are unchanged. A
--   retry (`retry_run`) counts it again from the retry: a child failed by its
--   deadline was failed again by the next claim, before its body started,
--   because the retry kept the past `deadline_at`. A retried child's new
--   deadline is still capped by its parent's, when the parent has not ended.
-- * `fork_run` keeps the run's concurrency key (a fork of a run holding a key
--   limited to 1 ran beside it) and its deadline rule (counted from the
--   fork's creation). It holds the source's row (FOR SHARE) while it copies,
--   so a concurrent prune passes the source and its children by.
-- * Retention never deletes a run another run still needs (`run_pinned`):
--   - any ancestor not prunable itself (not ended, or ended after the cutoff,
--     or with a status not pruned): it may wait for this run's subtree, or be
--     retried and wait again;
--   - any fork (or fork of a fork) of the run or of an ancestor that is not
--     prunable: a fork shares the children spawned before its fork point and
--     waits for them.
--   An ancestor or fork that looks prunable is locked (NO KEY UPDATE, SKIP
--   LOCKED) and checked again: one held elsewhere (a retry or a fork in
--   progress) pins the run too. `prunable_partitions` skips a range holding a
--   pinned run, `prune_history_batch` and the CLI's `prune_batch` skip such
--   runs. So a subtree goes only once its whole ancestry is prunable.
-- * `drop_history_range`, when it keeps a range (a run of it is left), now
--   deletes the journal, chunks and events of the runs `prune_history_batch`
--   deleted: they stayed behind in the kept partitions, readable by run id,
--   until some later prune dropped the range.
--
-- The file can run twice (IF NOT EXISTS, OR REPLACE).

ALTER TABLE runs ADD COLUMN IF NOT EXISTS deadline_seconds double precision;
COMMENT ON COLUMN runs.deadline_seconds IS
    'The time the run was given to end, in seconds from its creation (set from deadline_at '
    'at insert): a retry or a fork counts it again from its own start.';
UPDATE runs SET deadline_seconds = greatest(extract(epoch FROM deadline_at - created_at), 0)
WHERE deadline_at IS NOT NULL AND deadline_seconds IS NULL;

CREATE OR REPLACE FUNCTION remember_deadline_rule() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- The functions that insert runs compute deadline_at from now() (the
    -- transaction's start), so this is the timeout they were given.
    NEW.deadline_seconds := greatest(extract(epoch FROM NEW.deadline_at - now()), 0);
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS runs_deadline_rule ON runs;
CREATE TRIGGER runs_deadline_rule BEFORE INSERT ON runs
    FOR EACH ROW WHEN (NEW.deadline_at IS NOT NULL AND NEW.deadline_seconds IS NULL)
    EXECUTE FUNCTION remember_deadline_rule();

-- Finding a run's forks (prune asks for every ancestor of a candidate).
CREATE INDEX IF NOT EXISTS runs_forked_from ON runs (forked_from) WHERE forked_from IS NOT NULL;

-- Put an ended run (failed, dead or cancelled) back in its queue with a fresh
-- budget of attempts. The journal is kept: completed steps are not redone. A
-- run with a deadline gets its timeout again, from now (capped by the
-- deadline of its parent, if the parent has not ended).
CREATE OR REPLACE FUNCTION retry_run(p_run uuid)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_queue text;
BEGIN
    UPDATE runs r SET status = 'queued', due_at = now(), attempt = r.attempt + 1,
        max_attempts = r.attempt + r.max_attempts, recoveries = 0, error = NULL,
        output = NULL, finished_at = NULL, worker_id = NULL, updated_at = now(),
        deadline_at = CASE
            WHEN r.deadline_seconds IS NULL THEN r.deadline_at
            ELSE least(now() + make_interval(secs => r.deadline_seconds),
                       (SELECT p.deadline_at FROM runs p
                        WHERE p.id = r.parent_run_id
                          AND p.status IN ('queued', 'running', 'suspended')))
        END
    WHERE r.id = p_run AND r.status IN ('failed', 'dead', 'cancelled')
    RETURNING r.status, r.queue INTO v_status, v_queue;
    IF v_status IS NULL THEN
        SELECT r.status INTO v_status FROM runs r WHERE r.id = p_run;
        IF v_status IS NULL THEN
            RAISE EXCEPTION 'run % does not exist', p_run USING ERRCODE = 'PJ404';
        END IF;
        RAISE EXCEPTION 'run % is %; only failed, dead or cancelled runs can be retried',
            p_run, v_status USING ERRCODE = 'PJ409';
    END IF;
    PERFORM notify_wake(v_queue);
    RETURN v_status;
END $$;

-- fork_run: as in 0011, plus the concurrency key and the deadline rule, and
-- the source held (FOR SHARE) until the fork commits.
CREATE OR REPLACE FUNCTION fork_run(p_run uuid, p_from integer, p_new uuid)
 RETURNS uuid
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
DECLARE
    v_old runs%ROWTYPE;
    v_last integer;
    v_cols text;
    v_chunk_cols text;
    v_entries bigint;
    v_chunks bigint;
BEGIN
    -- FOR SHARE: a prune that looks at the source now passes it (and the
    -- children the fork will share) by; a retry of the source waits.
    SELECT * INTO v_old FROM runs r WHERE r.id = p_run FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', p_run USING ERRCODE = 'PJ404';
    END IF;
    IF v_old.source <> 'native' THEN
        RAISE EXCEPTION 'run % was made by the % adapter; only runs of workflows can be forked',
            p_run, v_old.source USING ERRCODE = 'PJ409';
    END IF;
    SELECT max(s.position) INTO v_last FROM steps s
    WHERE s.run_created_at = v_old.created_at AND s.run_id = p_run;
    IF p_from IS NULL OR p_from < 0 OR p_from > coalesce(v_last, -1) + 1 THEN
        RAISE EXCEPTION 'cannot fork run % from step %: its journal holds positions %',
            p_run, coalesce(p_from::text, 'NULL'),
            CASE WHEN v_last IS NULL THEN 'none (only step 0 is possible)'
                 ELSE format('0 to %s (the step must be 0 to %s)', v_last, v_last + 1) END
            USING ERRCODE = '22023';
    END IF;

    INSERT INTO runs (id, workflow, queue, input, priority, due_at, max_attempts,
                      max_recoveries, source, meta, forked_from, concurrency_key,
                      deadline_seconds, deadline_at)
    VALUES (p_new, v_old.workflow, v_old.queue, v_old.input, v_old.priority, now(),
            v_old.max_attempts, v_old.max_recoveries, 'native', v_old.meta, p_run,
            v_old.concurrency_key, v_old.deadline_seconds,
            now() + make_interval(secs => v_old.deadline_seconds));

    -- Every column but the ones set here, so columns added later are copied too.
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'steps'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attname NOT IN ('run_id', 'attempt', 'lease_epoch', 'run_created_at');
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_chunk_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'stream_chunks'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attname NOT IN ('run_id', 'run_created_at');
    -- One statement, so entries and chunks come from one snapshot of a live run.
    EXECUTE format($f$
        WITH src AS (
            SELECT * FROM steps s WHERE s.run_created_at = $4 AND s.run_id = $1
              AND s.position < $2
        ), copied AS (
            INSERT INTO steps (run_created_at, run_id, attempt, lease_epoch, %1$s)
            SELECT run_bucket($3), $3, 0, 0, %1$s FROM src
            RETURNING 1
        ), chunks AS (
            INSERT INTO stream_chunks (run_created_at, run_id, %2$s)
            SELECT run_bucket($3), $3, %2$s FROM stream_chunks k
            WHERE k.run_created_at = $4 AND k.run_id = $1 AND k.position < $2
              AND k.position IN (SELECT src.position FROM src)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM copied), (SELECT count(*) FROM chunks)$f$,
        v_cols, v_chunk_cols)
    INTO v_entries, v_chunks
    USING p_run, p_from, p_new, v_old.created_at;

    -- The creation event (written by the trigger in this transaction) says
    -- where the run came from.
    UPDATE run_events e SET detail = jsonb_build_object(
        'event', 'forked', 'forked_from', p_run, 'from_step', p_from,
        'entries', v_entries, 'chunks', v_chunks)
    WHERE e.run_id = p_new AND e.from_status IS NULL;
    PERFORM notify_wake(v_old.queue);
    RETURN p_new;
END $function$;

-- -- retention: what an unended run still needs ------------------------------

-- Whether prune must keep ended run p_run because another run may still read
-- it: an ancestor, or a fork (of a fork ...) of the run or of an ancestor,
-- that is not prunable itself (ended before p_cutoff with one of p_statuses).
-- With p_lock, the ones that look prunable are locked (NO KEY UPDATE, SKIP
-- LOCKED) and checked again under the lock: one held elsewhere (a retry or a
-- fork under way) or changed meanwhile pins the run as well. The caller has
-- locked p_run itself.
CREATE OR REPLACE FUNCTION run_pinned(p_run uuid, p_cutoff timestamptz, p_statuses text[],
                                      p_lock boolean)
RETURNS boolean
LANGUAGE plpgsql COST 1000 SET search_path FROM CURRENT AS $$
DECLARE
    v_id uuid := p_run;
    v_parent uuid;
    v_level integer := 0;
    v_forks uuid[];
    v_check uuid[] := ARRAY[]::uuid[];   -- the ancestors and forks that look prunable
    v_locked integer;
BEGIN
    -- Up the tree, one primary-key lookup per level (and one probe of
    -- runs_forked_from), returning as soon as one is not prunable.
    LOOP
        IF EXISTS (SELECT 1 FROM runs f WHERE f.forked_from = v_id) THEN
            WITH RECURSIVE forks (id, level) AS (
                SELECT f.id, 0 FROM runs f WHERE f.forked_from = v_id
                UNION ALL
                SELECT f.id, forks.level + 1 FROM forks JOIN runs f ON f.forked_from = forks.id
                WHERE forks.level < 1000
            )
            SELECT array_agg(id) INTO v_forks FROM forks;
            IF EXISTS (SELECT 1 FROM runs r WHERE r.id = ANY (v_forks)
                       AND NOT (r.status IN ('completed', 'failed', 'cancelled', 'dead')
                                AND r.status = ANY (p_statuses)
                                AND r.finished_at < p_cutoff)) THEN
                RETURN true;
            END IF;
            v_check := v_check || v_forks;
        END IF;
        SELECT r.parent_run_id INTO v_parent FROM runs r WHERE r.id = v_id;
        EXIT WHEN v_parent IS NULL OR v_level >= 1000;
        IF EXISTS (SELECT 1 FROM runs r WHERE r.id = v_parent
                   AND NOT (r.status IN ('completed', 'failed', 'cancelled', 'dead')
                            AND r.status = ANY (p_statuses)
                            AND r.finished_at < p_cutoff)) THEN
            RETURN true;
        END IF;
        v_check := v_check || v_parent;   -- (one deleted earlier decides nothing: see below)
        v_id := v_parent;
        v_level := v_level + 1;
    END LOOP;
    IF NOT p_lock OR cardinality(v_check) = 0 THEN
        RETURN false;
    END IF;
    -- Under the lock, with the newest committed row versions: a retry or fork
    -- of one of them under way holds its row (skipped: pinned), one done
    -- meanwhile made it unprunable (not returned: pinned).
    SELECT count(*) INTO v_locked FROM (
        SELECT 1 FROM runs r
        WHERE r.id = ANY (v_check)
          AND r.status IN ('completed', 'failed', 'cancelled', 'dead')
          AND r.status = ANY (p_statuses) AND r.finished_at < p_cutoff
        ORDER BY r.id
        FOR NO KEY UPDATE SKIP LOCKED) l;
    RETURN v_locked < (SELECT count(DISTINCT c.id) FROM unnest(v_check) AS c(id)
                       JOIN runs r ON r.id = c.id);
END $$;
COMMENT ON FUNCTION run_pinned(uuid, timestamptz, text[], boolean) IS
    'Whether prune must keep this ended run: an ancestor, or a fork of it or of an '
    'ancestor, is not prunable (it may wait for the run, or be retried and wait again).';

-- Ranges whose partitions prune can drop, oldest first, with their runs and
-- size: as in 0011, and no run of the range is pinned (run_pinned).
CREATE OR REPLACE FUNCTION prunable_partitions(p_cutoff timestamptz, p_statuses text[])
RETURNS TABLE (lower_bound timestamptz, upper_bound timestamptz, partitions text[],
               runs bigint, bytes bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    WITH ranges AS (
        SELECT h.lower_bound AS lo, h.upper_bound AS hi,
               array_agg(h.partition_name ORDER BY h.partition_name) AS names
        FROM (SELECT * FROM history_partitions('steps')
              UNION ALL SELECT * FROM history_partitions('stream_chunks')
              UNION ALL SELECT * FROM history_partitions('run_events')) h
        WHERE NOT h.is_default AND h.upper_bound <= p_cutoff
        GROUP BY h.lower_bound, h.upper_bound
        HAVING count(*) = 3
    )
    SELECT g.lo, g.hi, g.names,
           (SELECT count(*) FROM runs r WHERE r.created_at >= g.lo AND r.created_at < g.hi),
           (SELECT sum(pg_total_relation_size(to_regclass(n)))::bigint FROM unnest(g.names) n)
    FROM ranges g
    WHERE NOT EXISTS (
        SELECT 1 FROM runs r
        WHERE r.created_at >= g.lo AND r.created_at < g.hi
          AND NOT (r.status IN ('completed', 'failed', 'cancelled', 'dead')
                   AND r.status = ANY (p_statuses)
                   AND r.finished_at < p_cutoff))
      AND NOT EXISTS (
        SELECT 1 FROM runs r
        WHERE r.created_at >= g.lo AND r.created_at < g.hi
          AND (NOT coalesce((SELECT p.status IN ('completed', 'failed', 'cancelled', 'dead')
                                    AND p.status = ANY (p_statuses) AND p.finished_at < p_cutoff
                             FROM runs p WHERE p.id = r.parent_run_id), true)
               OR (coalesce(r.parent_run_id IS NOT NULL
                            OR (SELECT true FROM runs f WHERE f.forked_from = r.id LIMIT 1),
                            false)
                   AND run_pinned(r.id, p_cutoff, p_statuses, false))))
    ORDER BY g.lo
$$;

-- One batch of the runs of a prunable range: the runs (and their signals) are
-- deleted, their journal, chunks and events are left to the partition drop.
-- Same rules as prune_batch: only ended runs nothing needs (run_pinned), rows
-- another transaction holds are skipped, the status is checked again under
-- the row lock.
CREATE OR REPLACE FUNCTION prune_history_batch(p_lo timestamptz, p_hi timestamptz,
                                               p_cutoff timestamptz, p_statuses text[],
                                               p_batch integer)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM set_config('pgjournal.keep_history', 'on', true);
    WITH doomed AS (
        SELECT r.id FROM runs r
        WHERE r.created_at >= p_lo AND r.created_at < p_hi
          AND r.status IN ('completed', 'failed', 'cancelled', 'dead')
          AND r.status = ANY (p_statuses)
          AND r.finished_at < p_cutoff
          -- The common case first, one lookup: a parent not prunable itself.
          AND coalesce((SELECT p.status IN ('completed', 'failed', 'cancelled', 'dead')
                               AND p.status = ANY (p_statuses) AND p.finished_at < p_cutoff
                        FROM runs p WHERE p.id = r.parent_run_id), true)
          -- Then the runs in a tree or with forks (a scalar subquery: one probe
          -- of runs_forked_from per run, never a scan of runs hashed).
          AND NOT (coalesce(r.parent_run_id IS NOT NULL
                            OR (SELECT true FROM runs f WHERE f.forked_from = r.id LIMIT 1),
                            false)
                   AND run_pinned(r.id, p_cutoff, p_statuses, true))
        ORDER BY r.created_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM runs r USING doomed
    WHERE r.id = doomed.id AND r.status IN ('completed', 'failed', 'cancelled', 'dead');
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM set_config('pgjournal.keep_history', '', true);
    RETURN v_n;
END $$;

-- Detach and drop the partitions of [p_lo, p_hi) in every history table, if
-- no run created in that range is left. Else nothing is dropped, NULL is
-- returned, and the history rows of the range whose run is gone (deleted by
-- prune_history_batch, which leaves them to the drop) are deleted, so a kept
-- range holds only rows of runs that exist. DETACH without CONCURRENTLY:
-- CONCURRENTLY cannot run in a transaction and PostgreSQL refuses it while a
-- DEFAULT partition exists. It takes an ACCESS EXCLUSIVE lock on the three
-- parents for the few milliseconds of catalog work; p_lock_timeout_ms bounds
-- the wait for it (an error then: nothing changed, try again).
CREATE OR REPLACE FUNCTION drop_history_range(p_lo timestamptz, p_hi timestamptz,
                                              p_lock_timeout_ms integer DEFAULT 5000)
RETURNS text[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_names text[] := ARRAY[]::text[];
    v record;
    v_left boolean;
BEGIN
    -- A range that keeps a run is known before any lock: tidy it without one.
    v_left := EXISTS (SELECT 1 FROM runs r WHERE r.created_at >= p_lo AND r.created_at < p_hi);
    IF NOT v_left THEN
        PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
        -- The parents first, in the order writers take them, so a run created in
        -- the range from now on sends its rows to the DEFAULT partitions.
        LOCK TABLE steps, stream_chunks, run_events IN ACCESS EXCLUSIVE MODE;
        v_left := EXISTS (SELECT 1 FROM runs r
                          WHERE r.created_at >= p_lo AND r.created_at < p_hi);
    END IF;
    IF v_left THEN
        -- Rows of the range whose run no longer exists (a run's rows carry its
        -- created_at, and are written in the transaction that creates it or later).
        DELETE FROM steps s WHERE s.run_created_at >= p_lo AND s.run_created_at < p_hi
          AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = s.run_id);
        DELETE FROM stream_chunks k WHERE k.run_created_at >= p_lo AND k.run_created_at < p_hi
          AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = k.run_id);
        DELETE FROM run_events e WHERE e.run_created_at >= p_lo AND e.run_created_at < p_hi
          AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = e.run_id);
        RETURN NULL;
    END IF;
    FOR v IN
        SELECT t.name AS tbl, h.partition_name
        FROM (VALUES ('steps'), ('stream_chunks'), ('run_events')) AS t(name),
             LATERAL history_partitions(t.name) h
        WHERE NOT h.is_default AND h.lower_bound = p_lo AND h.upper_bound = p_hi
    LOOP
        EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', v.tbl, v.partition_name);
        EXECUTE format('DROP TABLE %I', v.partition_name);
        v_names := v_names || v.partition_name;
    END LOOP;
    RETURN v_names;
END $$;
