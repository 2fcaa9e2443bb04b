-- pgjournal schema, part 4: what the seed-interface adapters (pgjournal.adapters)
-- need to keep their data in the same tables as native runs.
--
-- Adapter runs live in runs/steps/stream_chunks/signals like native runs, with
-- runs.source = the adapter's name and queue = 'pgjournal.adapters'. That queue
-- name is not a valid identifier, so no worker can ever be configured to
-- claim it, and an open adapter run is 'running' with due_at = 9999-01-01 (not
-- 'infinity', which Python's datetime cannot load), so it never looks like an
-- expired lease either.
-- All writes go through the functions below: each locks the run row first,
-- so positions and occurrences are allocated in the database and two
-- processes writing to one run never collide.

ALTER TABLE steps ADD COLUMN meta jsonb NOT NULL DEFAULT '{}'::jsonb;
COMMENT ON COLUMN steps.meta IS
    'Extra fields of entries written through an adapter (sequence, iteration, '
    'lane, the seed record''s own timestamps ...); empty for native steps.';

CREATE INDEX runs_source_created ON runs (source, created_at DESC)
    WHERE source <> 'native';

-- The due_at of an open adapter run: never due, still a datetime Python loads.
CREATE FUNCTION adapter_open_until() RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$ SELECT '9999-01-01 00:00:00+00'::timestamptz $$;

-- Make sure adapter run p_run exists (created with p_status) and lock its row.
-- Refuses native runs: adapters never write into a workflow's journal.
CREATE FUNCTION adapter_run(
    p_run uuid, p_source text, p_workflow text, p_meta jsonb,
    p_status text DEFAULT 'running')
RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_source text;
    v_epoch bigint;
BEGIN
    INSERT INTO runs (id, workflow, queue, status, due_at, source, meta, started_at)
    VALUES (p_run, p_workflow, 'pgjournal.adapters', p_status,
            CASE WHEN p_status IN ('queued', 'running') THEN adapter_open_until() END,
            p_source, coalesce(p_meta, '{}'::jsonb),
            CASE WHEN p_status = 'running' THEN now() END)
    ON CONFLICT (id) DO NOTHING;
    SELECT r.source, r.lease_epoch INTO v_source, v_epoch FROM runs r
    WHERE r.id = p_run FOR UPDATE;
    IF v_source = 'native' THEN
        RAISE EXCEPTION 'run % is a native pgjournal run; the % adapter does not write into it',
            p_run, p_source USING ERRCODE = 'PJ409';
    END IF;
    RETURN v_epoch;
END $$;

-- Give the occurrences of step name p_name in run p_run their meaning again
-- (the n-th entry of that name by position is occurrence n-1) after an entry
-- was written out of order. Rows that move are parked above 10^9 first, since
-- the unique (run_id, name, occurrence) key is checked row by row.
CREATE FUNCTION adapter_renumber(p_run uuid, p_name text)
RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    WITH want AS (
        SELECT s.position, (row_number() OVER (ORDER BY s.position) - 1)::integer AS occ
        FROM steps s WHERE s.run_id = p_run AND s.name = p_name
    )
    UPDATE steps s SET occurrence = want.occ + 1000000000
    FROM want
    WHERE s.run_id = p_run AND s.position = want.position AND s.occurrence <> want.occ;
    UPDATE steps s SET occurrence = s.occurrence - 1000000000
    WHERE s.run_id = p_run AND s.name = p_name AND s.occurrence >= 1000000000;
$$;

-- Write one journal entry of an adapter run.
-- p_position NULL: append (position = last + 1, at least p_first).
-- p_replace: overwrite an entry already at p_position, else raise PJ412.
-- p_chunks (a jsonb array) replaces the entry's stream chunks when not NULL.
-- Returns the entry's position.
CREATE FUNCTION adapter_write(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_position integer, p_first integer, p_replace boolean,
    p_name text, p_kind text, p_status text, p_output jsonb, p_error jsonb,
    p_meta jsonb, p_started_at timestamptz, p_finished_at timestamptz,
    p_chunks jsonb DEFAULT NULL)
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
    -- Occurrences follow positions, so the last occurrence (an index lookup on
    -- the unique key) is also the last position of this name.
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
        FROM jsonb_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    END IF;
    RETURN v_pos;
END $$;

-- Insert or replace the entry of a by-name journal (one entry per name and
-- kind, occurrence 0 unless the name is also used by another kind).
CREATE FUNCTION adapter_put_named(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_name text, p_kind text, p_output jsonb, p_chunks jsonb DEFAULT NULL)
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

-- Set an adapter run's status (a runtime session opening or ending), creating
-- the run if needed. Ended statuses take the run off the claimable index.
CREATE FUNCTION adapter_set_status(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_status text, p_error jsonb)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_run_meta, p_status);
    UPDATE runs r SET
        status = p_status, error = p_error,
        due_at = CASE WHEN p_status IN ('queued', 'running') THEN adapter_open_until() END,
        started_at = coalesce(r.started_at, now()),
        finished_at = CASE WHEN p_status IN ('completed', 'failed', 'cancelled', 'dead')
                           THEN now() END,
        updated_at = now()
    WHERE r.id = p_run
      AND (r.status IS DISTINCT FROM p_status OR r.error IS DISTINCT FROM p_error);
END $$;

-- Upsert a whole adapter run row (the run-history store's save_run).
CREATE FUNCTION adapter_save_run(
    p_run uuid, p_source text, p_workflow text, p_status text, p_input jsonb,
    p_output jsonb, p_error jsonb, p_meta jsonb, p_created_at timestamptz,
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

-- Overwrite an adapter run's output (the checkpointer's latest snapshot) and
-- merge p_meta_patch into its meta.
CREATE FUNCTION adapter_set_output(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_output jsonb, p_meta_patch jsonb)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM adapter_run(p_run, p_source, p_workflow, p_run_meta);
    UPDATE runs r SET output = p_output, meta = r.meta || coalesce(p_meta_patch, '{}'::jsonb),
                      updated_at = now()
    WHERE r.id = p_run;
END $$;

-- A signal to an adapter run (a runtime session). Durable whether or not the
-- session is open; a session never opened is created as 'suspended'. Wakes
-- sessions waiting in other processes through NOTIFY.
CREATE FUNCTION adapter_send_signal(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_name text, p_payload jsonb)
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

-- The p_index-th (from 0) signal named p_name that a session receives. A replay
-- gets the journaled one; otherwise the oldest pending signal is consumed and
-- journaled in this one transaction (exactly once), or found = false.
CREATE FUNCTION adapter_take_signal(
    p_run uuid, p_source text, p_workflow text, p_run_meta jsonb,
    p_name text, p_index integer)
RETURNS TABLE (found boolean, payload jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_out jsonb;
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
        RETURN QUERY SELECT false, NULL::jsonb;
        RETURN;
    END IF;
    v_pos := adapter_write(p_run, p_source, p_workflow, p_run_meta, NULL, 0, false,
                           p_name, 'signal', 'completed', v_sig.payload, NULL,
                           jsonb_build_object('signal_id', v_sig.id), NULL, NULL);
    UPDATE signals SET consumed_at = now(), consumed_position = v_pos WHERE id = v_sig.id;
    RETURN QUERY SELECT true, v_sig.payload;
END $$;

-- Remove the entries of an adapter run (sequence-journal compaction); returns
-- how many. Locked like an append, so it never interleaves with one.
CREATE FUNCTION adapter_compact(p_run uuid, p_source text)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM 1 FROM runs r WHERE r.id = p_run AND r.source = p_source FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    DELETE FROM steps s WHERE s.run_id = p_run;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END $$;
