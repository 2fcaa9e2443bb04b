-- pgjournal schema, part 8: changing code under running runs.
--
-- * Patch markers. `run.patched("name")` journals an entry of kind 'patch'
--   (name = the patch name, output true, no delivery turn) the first time a
--   run's execution reaches it. The decision is synchronous in Python, so the
--   run must know its markers before the workflow starts: `journal_outline`
--   now also returns the positions and names of the run's patch markers
--   (a few integers and names, read in the same call as before).
-- * Forks. `fork_run` makes a new run of the same workflow, input, queue and
--   priority whose journal is a copy of the entries of an existing run at
--   positions below a given one (with their stream chunks, delivery turns and
--   fingerprints), so a worker replays that prefix and executes the rest
--   ("re-run from the model call, with the fixed prompt"). The old run is not
--   changed. The new run records `forked_from`, and its creation event in
--   run_events says where it came from.

-- -- the outline with patch markers -----------------------------------------------

DROP FUNCTION journal_outline(uuid);
-- The outline of a run's journal, read once before a replay: the delivery
-- turns of all entries and chunks in order (small: integers), the last
-- position, the number of entries, the journal's size in bytes, and the
-- positions and names of its patch markers (in position order).
CREATE FUNCTION journal_outline(p_run uuid)
RETURNS TABLE (turns integer[], last_position integer, entries bigint, bytes bigint,
               patch_positions integer[], patch_names text[])
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT
        (SELECT coalesce(array_agg(t.turn ORDER BY t.turn), '{}'::integer[]) FROM (
             SELECT s.turn FROM steps s WHERE s.run_id = p_run AND s.turn IS NOT NULL
             UNION ALL
             SELECT k.turn FROM stream_chunks k WHERE k.run_id = p_run AND k.turn IS NOT NULL
         ) t),
        j.last_position, j.entries,
        j.bytes + (SELECT coalesce(sum(octet_length(k.chunk::text)), 0)::bigint
                   FROM stream_chunks k WHERE k.run_id = p_run),
        j.patch_positions, j.patch_names
    FROM (
        SELECT max(s.position) AS last_position, count(*) AS entries,
               coalesce(sum(coalesce(octet_length(s.output::text), 0)
                            + coalesce(octet_length(s.error::text), 0)), 0)::bigint AS bytes,
               coalesce(array_agg(s.position ORDER BY s.position)
                            FILTER (WHERE s.kind = 'patch'), '{}'::integer[])
                   AS patch_positions,
               coalesce(array_agg(s.name ORDER BY s.position)
                            FILTER (WHERE s.kind = 'patch'), '{}'::text[]) AS patch_names
        FROM steps s WHERE s.run_id = p_run
    ) j;
$$;

-- -- forks -------------------------------------------------------------------------

-- Copy the journal of p_run at positions < p_from into a new queued run p_new
-- of the same workflow and input; returns p_new. 0 <= p_from <= last position
-- + 1 (0: nothing copied, a fresh run of the same input). Any run may be
-- forked, also one still running or suspended: what it has committed is
-- copied, read in one snapshot (entries and chunks together). Columns of the
-- journal are copied as they are (turn, calls_before, fingerprint, times,
-- meta, and columns later migrations add), except:
--   * attempt = 0: the copied entries come before the new run's first
--     attempt, so a failure that ended the old run (a failed entry at the end
--     of the copy) is executed again, as a retry would, while a failure the
--     workflow caught and went past replays as itself;
--   * lease_epoch = 0: no owner of the new run wrote them (so a stream that
--     was cut short stays cut: nobody extends it).
-- Only stream chunks of copied entries are copied (a stream still running in
-- the old run is executed from its start by the new run).
CREATE FUNCTION fork_run(p_run uuid, p_from integer, p_new uuid)
RETURNS uuid
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_old runs%ROWTYPE;
    v_last integer;
    v_cols text;
    v_chunk_cols text;
    v_entries bigint;
    v_chunks bigint;
BEGIN
    SELECT * INTO v_old FROM runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', p_run USING ERRCODE = 'PJ404';
    END IF;
    IF v_old.source <> 'native' THEN
        RAISE EXCEPTION 'run % was made by the % adapter; only runs of workflows can be forked',
            p_run, v_old.source USING ERRCODE = 'PJ409';
    END IF;
    SELECT max(s.position) INTO v_last FROM steps s WHERE s.run_id = p_run;
    IF p_from IS NULL OR p_from < 0 OR p_from > coalesce(v_last, -1) + 1 THEN
        RAISE EXCEPTION 'cannot fork run % from step %: its journal holds positions %',
            p_run, coalesce(p_from::text, 'NULL'),
            CASE WHEN v_last IS NULL THEN 'none (only step 0 is possible)'
                 ELSE format('0 to %s (the step must be 0 to %s)', v_last, v_last + 1) END
            USING ERRCODE = '22023';
    END IF;

    INSERT INTO runs (id, workflow, queue, input, priority, due_at, max_attempts,
                      max_recoveries, source, meta, forked_from)
    VALUES (p_new, v_old.workflow, v_old.queue, v_old.input, v_old.priority, now(),
            v_old.max_attempts, v_old.max_recoveries, 'native', v_old.meta, p_run);

    -- Every column but the ones set here, so columns added later are copied too.
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'steps'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attname NOT IN ('run_id', 'attempt', 'lease_epoch');
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_chunk_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'stream_chunks'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attname <> 'run_id';
    -- One statement, so entries and chunks come from one snapshot of a live run.
    EXECUTE format($f$
        WITH src AS (
            SELECT * FROM steps s WHERE s.run_id = $1 AND s.position < $2
        ), copied AS (
            INSERT INTO steps (run_id, attempt, lease_epoch, %1$s)
            SELECT $3, 0, 0, %1$s FROM src
            RETURNING 1
        ), chunks AS (
            INSERT INTO stream_chunks (run_id, %2$s)
            SELECT $3, %2$s FROM stream_chunks k
            WHERE k.run_id = $1 AND k.position < $2
              AND k.position IN (SELECT src.position FROM src)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM copied), (SELECT count(*) FROM chunks)$f$,
        v_cols, v_chunk_cols)
    INTO v_entries, v_chunks
    USING p_run, p_from, p_new;

    -- The creation event (written by the trigger in this transaction) says
    -- where the run came from.
    UPDATE run_events e SET detail = jsonb_build_object(
        'event', 'forked', 'forked_from', p_run, 'from_step', p_from,
        'entries', v_entries, 'chunks', v_chunks)
    WHERE e.run_id = p_new AND e.from_status IS NULL;
    PERFORM notify_wake(v_old.queue);
    RETURN p_new;
END $$;
