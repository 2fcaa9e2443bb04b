-- pgjournal schema, part 13: partitioned history and retention by partition.
--
-- * The journal (`steps`), the stream chunks (`stream_chunks`) and the event
--   log (`run_events`) are partitioned by RANGE on a new column
--   `run_created_at`: a copy of `runs.created_at` of the run the row belongs
--   to. Every row of a run carries the same value, so the run's rows live in
--   one partition, the primary keys (which must contain the partition key)
--   still make (run_id, position), (run_id, name, occurrence) and
--   (run_id, position, seq) unique, and a partition holds the history of the
--   runs created in its time slot. `runs` itself is not partitioned: its
--   primary key and the global unique idempotency key could not stay global,
--   the claim index is partial (history never enters it), and one row per run
--   is a small part of the history (see bench/README.md).
-- * The functions that write these tables copy the key: `run_bucket(run)`
--   reads it from `runs` (and refuses a run that does not exist, as the
--   foreign key did), the event triggers take NEW.created_at. If a run's
--   created_at changes (adapters import runs with their original time, a DBA
--   backdates), trigger `runs_move_history` moves its rows to the right
--   partition in the same transaction.
-- * The foreign keys steps -> runs and stream_chunks -> runs are dropped, like
--   run_events' in 0007: dropping or detaching a partition that references
--   `runs` would take a lock on `runs` (the queue), and a cascading delete probes
--   every partition. Deleting runs deletes their history through the
--   statement-level trigger `runs_forget_events`, which now matches on the
--   partition key too (one partition probed per run).
-- * Partitions are `width_days` wide (table `partition_settings`, default 7),
--   aligned on UTC days since 1970-01-01, named <table>_p<YYYYMMDD of the lower
--   bound>. A DEFAULT partition catches any row no partition covers, so no
--   insert ever fails for lack of a partition; `maintain()` creates the
--   partitions ahead of time and moves rows out of the DEFAULT partition into
--   partitions of their own.
-- * Existing rows move over here, inside the migration's transaction: one
--   partition per slot that has runs, then one INSERT ... SELECT per table.

-- -- settings ---------------------------------------------------------------

CREATE TABLE partition_settings (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    width_days  integer NOT NULL DEFAULT 7 CHECK (width_days BETWEEN 1 AND 366),
    ahead_days  integer NOT NULL DEFAULT 28 CHECK (ahead_days BETWEEN 0 AND 3660),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE partition_settings IS
    'One row: the width of the history partitions (days) and how far ahead '
    'maintain() creates them. A new width applies to partitions created later.';
INSERT INTO partition_settings DEFAULT VALUES;

-- The lower bound of the partition slot holding time p_at.
CREATE FUNCTION partition_slot(p_at timestamptz, p_width_days integer)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT timestamptz '1970-01-01 00:00:00+00'
           + make_interval(days => (floor(extract(epoch FROM p_at) / 86400.0
                                          / p_width_days) * p_width_days)::integer)
$$;

-- The partition key of a run's rows: its created_at. A run that does not
-- exist is an error (foreign_key_violation), as the foreign key was.
CREATE FUNCTION run_bucket(p_run uuid) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
    v timestamptz;
BEGIN
    SELECT r.created_at INTO v FROM runs r WHERE r.id = p_run;
    IF v IS NULL THEN
        RAISE EXCEPTION 'run % does not exist', p_run USING ERRCODE = '23503';
    END IF;
    RETURN v;
END $$;

-- -- partition management --------------------------------------------------

-- The partitions of one history table, with their bounds (the DEFAULT
-- partition has NULL bounds).
CREATE FUNCTION history_partitions(p_table text)
RETURNS TABLE (partition_name text, lower_bound timestamptz, upper_bound timestamptz,
               is_default boolean)
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
    r record;
    m text[];
BEGIN
    IF p_table NOT IN ('steps', 'stream_chunks', 'run_events') THEN
        RAISE EXCEPTION 'history_partitions: % is not a history table', p_table
            USING ERRCODE = '22023';
    END IF;
    FOR r IN
        SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = to_regclass(p_table)
        ORDER BY c.relname
    LOOP
        IF r.bound = 'DEFAULT' THEN
            partition_name := r.name; lower_bound := NULL; upper_bound := NULL;
            is_default := true;
        ELSE
            m := regexp_match(r.bound, $re$FROM \('([^']*)'\) TO \('([^']*)'\)$re$);
            partition_name := r.name; lower_bound := m[1]::timestamptz;
            upper_bound := m[2]::timestamptz; is_default := false;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- Create the partition [p_lo, p_hi) of p_table unless a partition overlaps
-- it. Rows of that range waiting in the DEFAULT partition move into it, in
-- this transaction. Returns the new partition's name, or NULL.
CREATE FUNCTION create_history_partition(p_table text, p_lo timestamptz, p_hi timestamptz)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_name text := p_table || '_p' || to_char(p_lo AT TIME ZONE 'UTC', 'YYYYMMDD');
    v_default text := p_table || '_default';
    v_waiting boolean;
BEGIN
    IF p_table NOT IN ('steps', 'stream_chunks', 'run_events') THEN
        RAISE EXCEPTION 'create_history_partition: % is not a history table', p_table
            USING ERRCODE = '22023';
    END IF;
    IF p_hi <= p_lo THEN
        RAISE EXCEPTION 'create_history_partition: empty range % to %', p_lo, p_hi
            USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM history_partitions(p_table) h
               WHERE NOT h.is_default AND h.lower_bound < p_hi AND h.upper_bound > p_lo)
       OR to_regclass(v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE run_created_at >= $1 '
                   'AND run_created_at < $2)', v_default)
        INTO v_waiting USING p_lo, p_hi;
    IF NOT v_waiting THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                       v_name, p_table, p_lo, p_hi);
    ELSE
        -- Attaching a range the DEFAULT partition holds rows of would fail:
        -- move them to a table of their own first, then attach it.
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       v_name, p_table);
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE run_created_at >= $1 '
                       'AND run_created_at < $2 RETURNING *) '
                       'INSERT INTO %I SELECT * FROM moved', v_default, v_name)
            USING p_lo, p_hi;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       p_table, v_name, p_lo, p_hi);
    END IF;
    RETURN v_name;
END $$;

-- Create-ahead and tidy-up, safe to call as often as you like (pg_cron, or
-- `pgjournal maintain`): every history table gets the partitions of the slots
-- from the current one (or the one of p_since, to prepare a backfill) to
-- now() + p_ahead_days (default: the settings'), and
-- rows that landed in a DEFAULT partition (runs created before the oldest or
-- after the newest partition) move into partitions of their own, at most
-- p_max_moves slots per call. Returns one row per partition created.
CREATE FUNCTION maintain(p_ahead_days integer DEFAULT NULL, p_max_moves integer DEFAULT 10,
                         p_since timestamptz DEFAULT NULL)
RETURNS TABLE (table_name text, partition_name text, lower_bound timestamptz,
               upper_bound timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_set partition_settings;
    v_table text;
    v_slot timestamptz;
    v_lo timestamptz;
    v_hi timestamptz;
    v_end timestamptz;
    v_name text;
    v_moves integer := 0;
BEGIN
    -- One maintainer at a time per schema (a second call waits, then finds
    -- the work done).
    PERFORM pg_advisory_xact_lock(hashtextextended('pgjournal.maintain:' || current_schema(), 0));
    SELECT * INTO v_set FROM partition_settings;
    FOREACH v_table IN ARRAY ARRAY['steps', 'stream_chunks', 'run_events'] LOOP
        v_slot := partition_slot(least(coalesce(p_since, now()), now()), v_set.width_days);
        v_end := now() + make_interval(days => coalesce(p_ahead_days, v_set.ahead_days));
        WHILE v_slot <= v_end LOOP
            v_hi := v_slot + make_interval(days => v_set.width_days);
            v_name := create_history_partition(v_table, v_slot, v_hi);
            IF v_name IS NOT NULL THEN
                table_name := v_table; partition_name := v_name;
                lower_bound := v_slot; upper_bound := v_hi;
                RETURN NEXT;
            END IF;
            v_slot := v_hi;
        END LOOP;
        -- Rows in the DEFAULT partition lie in gaps between partitions. A
        -- slot that overlaps a partition (after a change of width) is
        -- clipped to the gap at its start.
        FOR v_slot IN EXECUTE format(
                'SELECT DISTINCT partition_slot(run_created_at, $1) FROM %I ORDER BY 1',
                v_table || '_default') USING v_set.width_days
        LOOP
            EXIT WHEN v_moves >= p_max_moves;
            v_hi := v_slot + make_interval(days => v_set.width_days);
            SELECT greatest(v_slot, max(h.upper_bound)) INTO v_lo
            FROM history_partitions(v_table) h
            WHERE NOT h.is_default AND h.lower_bound <= v_slot AND h.upper_bound > v_slot;
            SELECT least(v_hi, min(h.lower_bound)) INTO v_hi
            FROM history_partitions(v_table) h
            WHERE NOT h.is_default AND h.lower_bound > v_lo AND h.lower_bound < v_hi;
            CONTINUE WHEN v_hi <= v_lo;
            v_name := create_history_partition(v_table, v_lo, v_hi);
            IF v_name IS NOT NULL THEN
                table_name := v_table; partition_name := v_name;
                lower_bound := v_lo; upper_bound := v_hi;
                v_moves := v_moves + 1;
                RETURN NEXT;
            END IF;
        END LOOP;
    END LOOP;
END $$;
COMMENT ON FUNCTION maintain(integer, integer, timestamptz) IS
    'Creates history partitions ahead and moves rows out of the DEFAULT partitions; '
    'call it daily (pg_cron) or with `pgjournal maintain`.';

-- -- convert the three tables ----------------------------------------------
--
-- Views read these tables by OID, so the views that depend on them (directly
-- or through other views) are saved, dropped and recreated from their own
-- definitions, with their comments and grants, around the swap.

CREATE TEMP TABLE pgjournal_0011_views ON COMMIT DROP AS
WITH RECURSIVE deps (oid) AS (
    SELECT rw.ev_class
    FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid
    WHERE d.refclassid = 'pg_class'::regclass AND d.classid = 'pg_rewrite'::regclass
      AND d.refobjid IN ('steps'::regclass, 'stream_chunks'::regclass,
                         'run_events'::regclass)
      AND rw.ev_class <> d.refobjid
    UNION
    SELECT rw.ev_class
    FROM deps JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass
                                AND d.refobjid = deps.oid
                                AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite rw ON rw.oid = d.objid
    WHERE rw.ev_class <> d.refobjid
)
SELECT c.oid, c.relname::text AS name, pg_get_viewdef(c.oid) AS def,
       obj_description(c.oid, 'pg_class') AS note, c.relacl, c.reloptions,
       false AS done
FROM (SELECT DISTINCT oid FROM deps) d JOIN pg_class c ON c.oid = d.oid
WHERE c.relkind = 'v';

DO $do$
DECLARE
    v record;
BEGIN
    FOR v IN SELECT name FROM pgjournal_0011_views ORDER BY oid DESC LOOP
        EXECUTE format('DROP VIEW IF EXISTS %I CASCADE', v.name);
    END LOOP;
END $do$;

ALTER TABLE steps DROP CONSTRAINT steps_run_id_fkey;
ALTER TABLE stream_chunks DROP CONSTRAINT stream_chunks_run_id_fkey;
ALTER TABLE steps RENAME TO steps_0010;
ALTER TABLE steps_0010 RENAME CONSTRAINT steps_pkey TO steps_0010_pkey;
ALTER TABLE steps_0010 RENAME CONSTRAINT steps_one_per_occurrence TO steps_0010_one;
ALTER TABLE stream_chunks RENAME TO stream_chunks_0010;
ALTER TABLE stream_chunks_0010 RENAME CONSTRAINT stream_chunks_pkey TO stream_chunks_0010_pkey;
ALTER TABLE run_events RENAME TO run_events_0010;
ALTER TABLE run_events_0010 RENAME CONSTRAINT run_events_pkey TO run_events_0010_pkey;
ALTER INDEX run_events_run RENAME TO run_events_0010_run;
ALTER INDEX run_events_at RENAME TO run_events_0010_at;

CREATE TABLE steps (
    LIKE steps_0010 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    run_created_at timestamptz NOT NULL,
    CONSTRAINT steps_pkey PRIMARY KEY (run_id, position, run_created_at),
    CONSTRAINT steps_one_per_occurrence UNIQUE (run_id, name, occurrence, run_created_at)
) PARTITION BY RANGE (run_created_at);
COMMENT ON TABLE steps IS
    'The journal: one row per step call of a run, in call order (position). '
    'The n-th call of a step name is occurrence n-1. Partitioned by '
    'run_created_at (= runs.created_at of the run).';

CREATE TABLE stream_chunks (
    LIKE stream_chunks_0010 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    run_created_at timestamptz NOT NULL,
    CONSTRAINT stream_chunks_pkey PRIMARY KEY (run_id, position, seq, run_created_at)
) PARTITION BY RANGE (run_created_at);
COMMENT ON TABLE stream_chunks IS
    'Chunks of stream steps, in order (seq). Partitioned by run_created_at.';

CREATE TABLE run_events (
    LIKE run_events_0010 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS,
    run_created_at timestamptz NOT NULL,
    CONSTRAINT run_events_pkey PRIMARY KEY (id, run_created_at)
) PARTITION BY RANGE (run_created_at);
ALTER SEQUENCE run_events_id_seq OWNED BY run_events.id;
CREATE INDEX run_events_run ON run_events (run_id, id);
CREATE INDEX run_events_at ON run_events (at);
COMMENT ON TABLE run_events IS
    'Append-only log of every status transition of every run (written by triggers); '
    'deleting a run deletes its events (trigger runs_forget_events). Partitioned by '
    'run_created_at.';
COMMENT ON COLUMN steps.run_created_at IS
    'Partition key: runs.created_at of the run (the same for all rows of a run).';
COMMENT ON COLUMN stream_chunks.run_created_at IS
    'Partition key: runs.created_at of the run (the same for all rows of a run).';
COMMENT ON COLUMN run_events.run_created_at IS
    'Partition key: runs.created_at of the run (the same for all rows of a run).';

CREATE TABLE steps_default PARTITION OF steps DEFAULT;
CREATE TABLE stream_chunks_default PARTITION OF stream_chunks DEFAULT;
CREATE TABLE run_events_default PARTITION OF run_events DEFAULT;

-- One partition per slot the existing runs were created in, then the rows.
SELECT create_history_partition(t.name, s.slot,
                                s.slot + make_interval(days => p.width_days))
FROM partition_settings p
CROSS JOIN LATERAL (SELECT DISTINCT partition_slot(r.created_at, p.width_days) AS slot
                    FROM runs r) s
CROSS JOIN (VALUES ('steps'), ('stream_chunks'), ('run_events')) AS t(name)
ORDER BY t.name, s.slot;

INSERT INTO steps SELECT o.*, r.created_at FROM steps_0010 o JOIN runs r ON r.id = o.run_id;
INSERT INTO stream_chunks
SELECT o.*, r.created_at FROM stream_chunks_0010 o JOIN runs r ON r.id = o.run_id;
-- Events of runs deleted with the triggers off have no run: they keep their time.
INSERT INTO run_events
SELECT o.*, coalesce(r.created_at, o.at) FROM run_events_0010 o LEFT JOIN runs r ON r.id = o.run_id;

DROP TABLE steps_0010, stream_chunks_0010, run_events_0010;

DO $do$
DECLARE
    v record;
    g record;
    v_left integer;
    v_last integer := -1;
BEGIN
    -- In dependency order: a view whose base view is not back yet waits for
    -- the next round.
    LOOP
        SELECT count(*) INTO v_left FROM pgjournal_0011_views WHERE NOT done;
        EXIT WHEN v_left = 0;
        IF v_left = v_last THEN
            RAISE EXCEPTION 'migration 0011: could not recreate views %',
                (SELECT string_agg(name, ', ') FROM pgjournal_0011_views WHERE NOT done);
        END IF;
        v_last := v_left;
        FOR v IN SELECT * FROM pgjournal_0011_views WHERE NOT done ORDER BY oid LOOP
            BEGIN
                EXECUTE format('CREATE VIEW %I %s AS %s', v.name,
                               CASE WHEN v.reloptions IS NULL THEN ''
                                    ELSE 'WITH (' || array_to_string(v.reloptions, ', ') || ')'
                               END, v.def);
            EXCEPTION WHEN undefined_table THEN
                CONTINUE;
            END;
            IF v.note IS NOT NULL THEN
                EXECUTE format('COMMENT ON VIEW %I IS %L', v.name, v.note);
            END IF;
            FOR g IN SELECT a.privilege_type, a.grantee FROM aclexplode(v.relacl) a
                     WHERE a.grantee <> a.grantor LOOP
                EXECUTE format('GRANT %s ON %I TO %s', g.privilege_type, v.name,
                               CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                                    ELSE quote_ident(g.grantee::regrole::text) END);
            END LOOP;
            UPDATE pgjournal_0011_views SET done = true WHERE oid = v.oid;
        END LOOP;
    END LOOP;
END $do$;

-- -- deleting runs, and moving a run's rows when its created_at changes ------

CREATE OR REPLACE FUNCTION forget_run_events() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- prune_history_batch deletes runs whose history goes with its partition
    -- (dropped whole afterwards): nothing to delete row by row here.
    IF current_setting('pgjournal.keep_history', true) = 'on' THEN
        RETURN NULL;
    END IF;
    -- On the partition key too: one partition probed per run, not all of them.
    DELETE FROM run_events e USING gone_runs g
    WHERE e.run_id = g.id AND e.run_created_at = g.created_at;
    DELETE FROM steps s USING gone_runs g
    WHERE s.run_id = g.id AND s.run_created_at = g.created_at;
    DELETE FROM stream_chunks k USING gone_runs g
    WHERE k.run_id = g.id AND k.run_created_at = g.created_at;
    RETURN NULL;
END $$;
COMMENT ON TABLE runs IS
    'One row per run of a workflow: its input, status, lease and result. Deleting a '
    'run deletes its journal, chunks and events (trigger runs_forget_events) and '
    'signals (foreign key).';

CREATE FUNCTION move_run_history() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE steps SET run_created_at = NEW.created_at
    WHERE run_id = NEW.id AND run_created_at = OLD.created_at;
    UPDATE stream_chunks SET run_created_at = NEW.created_at
    WHERE run_id = NEW.id AND run_created_at = OLD.created_at;
    UPDATE run_events SET run_created_at = NEW.created_at
    WHERE run_id = NEW.id AND run_created_at = OLD.created_at;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_move_history AFTER UPDATE OF created_at ON runs
    FOR EACH ROW WHEN (OLD.created_at IS DISTINCT FROM NEW.created_at)
    EXECUTE FUNCTION move_run_history();

-- -- the functions that write history, now with the partition key -------------
-- (each is its latest definition from 0002-0010, with run_created_at added to
-- its INSERTs and ON CONFLICT targets)

-- log_run_event
CREATE OR REPLACE FUNCTION log_run_event()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
BEGIN
    INSERT INTO run_events (run_created_at, run_id, from_status, to_status, attempt, lease_epoch,
                            worker_id, detail)
    VALUES (NEW.created_at, NEW.id,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            NEW.status, NEW.attempt, NEW.lease_epoch, NEW.worker_id,
            CASE WHEN NEW.status IN ('failed', 'dead') OR
                      (TG_OP = 'UPDATE' AND OLD.status = 'running' AND NEW.status = 'queued'
                       AND NEW.attempt <> OLD.attempt)
                 THEN NEW.error END);
    RETURN NULL;
END $function$;

-- log_run_inserts
CREATE OR REPLACE FUNCTION log_run_inserts()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
BEGIN
    INSERT INTO run_events (run_created_at, run_id, from_status, to_status, attempt, lease_epoch,
                            worker_id, detail)
    SELECT n.created_at, n.id, NULL, n.status, n.attempt, n.lease_epoch, n.worker_id,
           CASE WHEN n.status IN ('failed', 'dead') THEN n.error END
    FROM new_runs n;
    RETURN NULL;
END $function$;

-- note_run_event
CREATE OR REPLACE FUNCTION note_run_event(p_run uuid, p_epoch bigint, p_detail jsonb)
 RETURNS void
 LANGUAGE sql
 SET search_path FROM CURRENT
AS $function$
    INSERT INTO run_events (run_created_at, run_id, from_status, to_status, attempt, lease_epoch,
                            worker_id, detail)
    SELECT r.created_at, r.id, r.status, r.status, r.attempt, r.lease_epoch, r.worker_id, p_detail
    FROM runs r WHERE r.id = p_run AND r.lease_epoch = p_epoch;
$function$;

-- journal_step
CREATE OR REPLACE FUNCTION journal_step(p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer, p_kind text, p_status text, p_output json, p_error jsonb, p_attempt integer, p_tries integer DEFAULT 1, p_started_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_chunks json DEFAULT NULL::json, p_chunk_start integer DEFAULT 0, p_turn integer DEFAULT NULL::integer, p_fingerprint text DEFAULT NULL::text, p_chunk_turns integer[] DEFAULT NULL::integer[], p_calls_before integer DEFAULT NULL::integer, p_chunk_calls integer[] DEFAULT NULL::integer[])
 RETURNS text
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
DECLARE
    v_lost text;
    v_n integer;
BEGIN
    v_lost := check_lease(p_run, p_epoch);
    IF v_lost IS NOT NULL THEN
        RETURN v_lost;
    END IF;
    INSERT INTO steps AS s (run_created_at, run_id, position, name, occurrence, kind, status, output, error,
                       attempt, tries, lease_epoch, started_at, turn, fingerprint,
                       calls_before)
    VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, p_kind, p_status, p_output, p_error,
            p_attempt, p_tries, p_epoch, coalesce(p_started_at, now()), p_turn,
            p_fingerprint, p_calls_before)
    ON CONFLICT (run_id, position, run_created_at) DO UPDATE SET
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
        WHERE k.run_created_at = run_bucket(p_run)
      AND k.run_id = p_run AND k.position = p_position AND k.seq >= p_chunk_start;
        INSERT INTO stream_chunks (run_created_at, run_id, position, seq, chunk, turn, calls_before)
        SELECT run_bucket(p_run), p_run, p_position, p_chunk_start + e.ord::integer - 1, e.value,
               p_chunk_turns[e.ord], p_chunk_calls[e.ord]
        FROM json_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    END IF;
    RETURN NULL;
END $function$;

-- append_chunks
CREATE OR REPLACE FUNCTION append_chunks(p_run uuid, p_epoch bigint, p_position integer, p_chunk_start integer, p_chunks json, p_chunk_turns integer[] DEFAULT NULL::integer[], p_chunk_calls integer[] DEFAULT NULL::integer[])
 RETURNS text
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
DECLARE
    v_lost text;
BEGIN
    v_lost := check_lease(p_run, p_epoch);
    IF v_lost IS NOT NULL THEN
        RETURN v_lost;
    END IF;
    DELETE FROM stream_chunks k
    WHERE k.run_created_at = run_bucket(p_run)
      AND k.run_id = p_run AND k.position = p_position AND k.seq >= p_chunk_start;
    INSERT INTO stream_chunks (run_created_at, run_id, position, seq, chunk, turn, calls_before)
    SELECT run_bucket(p_run), p_run, p_position, p_chunk_start + e.ord::integer - 1, e.value,
           p_chunk_turns[e.ord], p_chunk_calls[e.ord]
    FROM json_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    RETURN NULL;
END $function$;

-- wait_signal
CREATE OR REPLACE FUNCTION wait_signal(p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer, p_timeout_seconds double precision, p_attempt integer, p_turn integer DEFAULT NULL::integer, p_calls_before integer DEFAULT NULL::integer)
 RETURNS TABLE(outcome text, payload json)
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
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
        INSERT INTO steps AS s (run_created_at, run_id, position, name, occurrence, kind, status, output,
                                attempt, lease_epoch, turn, calls_before)
        VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, 'signal', 'completed',
                v_sig.payload, p_attempt, p_epoch, p_turn, p_calls_before)
        ON CONFLICT (run_id, position, run_created_at) DO UPDATE SET
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
        INSERT INTO steps AS s (run_created_at, run_id, position, name, occurrence, kind, status, error,
                                attempt, lease_epoch, turn, calls_before)
        VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, 'signal', 'failed',
                jsonb_build_object('type', 'TimeoutError', 'module', 'builtins',
                                   'message', format('no signal %L arrived in time', p_name)),
                p_attempt, p_epoch, p_turn, p_calls_before)
        ON CONFLICT (run_id, position, run_created_at) DO UPDATE SET
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
END $function$;

-- sleep_until
CREATE OR REPLACE FUNCTION sleep_until(p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer, p_seconds double precision, p_wake_at timestamp with time zone, p_attempt integer, p_turn integer DEFAULT NULL::integer, p_calls_before integer DEFAULT NULL::integer)
 RETURNS TABLE(outcome text, wake_at timestamp with time zone)
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
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
        INSERT INTO steps (run_created_at, run_id, position, name, occurrence, kind, status, output,
                           attempt, lease_epoch, turn, calls_before)
        VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, 'sleep', 'completed',
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
END $function$;

-- spawn_runs
CREATE OR REPLACE FUNCTION spawn_runs(p_parent uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer, p_attempt integer, p_turn integer, p_calls_before integer, p_fingerprint text, p_ids uuid[], p_workflow text, p_queue text, p_inputs json[], p_max_attempts integer, p_max_recoveries integer, p_timeout_seconds double precision, p_concurrency_key text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
DECLARE
    v_lost text;
    v_parent runs%ROWTYPE;
    v_deadline timestamptz;
BEGIN
    v_lost := check_lease(p_parent, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN v_lost;
    END IF;
    SELECT * INTO v_parent FROM runs WHERE id = p_parent;
    IF v_parent.root_run_id IS NULL THEN
        UPDATE runs SET root_run_id = p_parent, depth = 0 WHERE id = p_parent;
        v_parent.root_run_id := p_parent;
        v_parent.depth := 0;
    END IF;
    v_deadline := v_parent.deadline_at;
    IF p_timeout_seconds IS NOT NULL THEN
        v_deadline := least(v_deadline, now() + make_interval(secs => p_timeout_seconds));
    END IF;
    INSERT INTO runs (id, workflow, queue, input, due_at, max_attempts, max_recoveries,
                      parent_run_id, parent_position, root_run_id, depth, deadline_at,
                      concurrency_key)
    SELECT c.id, p_workflow, p_queue, c.input, now(), p_max_attempts, p_max_recoveries,
           p_parent, p_position, v_parent.root_run_id, v_parent.depth + 1, v_deadline,
           p_concurrency_key
    FROM unnest(p_ids, p_inputs) AS c(id, input)
    ON CONFLICT (id) DO NOTHING;
    INSERT INTO steps (run_created_at, run_id, position, name, occurrence, kind, status, output, attempt,
                       lease_epoch, turn, calls_before, fingerprint)
    VALUES (run_bucket(p_parent), p_parent, p_position, p_name, p_occurrence, 'spawn', 'completed',
            to_json(p_ids), p_attempt, p_epoch, p_turn, p_calls_before, p_fingerprint);
    PERFORM notify_wake(p_queue);
    RETURN NULL;
END $function$;

-- take_units
CREATE OR REPLACE FUNCTION take_units(p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer, p_bucket text, p_units double precision, p_attempt integer, p_turn integer DEFAULT NULL::integer, p_calls_before integer DEFAULT NULL::integer)
 RETURNS TABLE(outcome text, ready_at timestamp with time zone)
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
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
    INSERT INTO steps (run_created_at, run_id, position, name, occurrence, kind, status, output, attempt,
                       lease_epoch, turn, calls_before)
    VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, 'rate', 'completed',
            json_build_object('bucket', p_bucket, 'units', p_units, 'ready_at', v_ready),
            p_attempt, p_epoch, p_turn, p_calls_before);
    RETURN QUERY SELECT 'taken'::text, v_ready;
END $function$;

-- wait_children
CREATE OR REPLACE FUNCTION wait_children(p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer, p_attempt integer, p_turn integer, p_calls_before integer, p_children uuid[], p_mode text, p_cancel_rest boolean DEFAULT false, p_raise boolean DEFAULT false)
 RETURNS TABLE(outcome text, results json)
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
DECLARE
    v_lost text;
    v_unended integer;
    v_ended integer;
    v_foreign uuid;
    v_locked boolean := false;
    v_results json;
    v_first uuid;
    v_error jsonb;
BEGIN
    IF p_mode NOT IN ('all', 'first') THEN
        RAISE EXCEPTION 'wait mode must be all or first, not %', p_mode USING ERRCODE = '22023';
    END IF;
    IF p_cancel_rest THEN
        -- Children first (see above): lock the ones a ready wait would cancel.
        SELECT count(*) FILTER (WHERE c.status IN ('completed', 'failed', 'cancelled', 'dead'))
        INTO v_ended FROM runs c WHERE c.id = ANY (p_children);
        IF v_ended > 0 THEN
            PERFORM lock_tree(array_agg(c.id)) FROM runs c
            WHERE c.id = ANY (p_children)
              AND c.status NOT IN ('completed', 'failed', 'cancelled', 'dead');
            v_locked := true;
        END IF;
    END IF;
    v_lost := check_lease(p_run, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN QUERY SELECT 'lost'::text, to_json(v_lost);
        RETURN;
    END IF;
    -- Counted under the parent's lock: a child ending now either committed
    -- before this statement (counted as ended) or waits for the parent's row
    -- and then sees the wait registered below.
    SELECT count(DISTINCT c.id) FILTER (
               WHERE c.status NOT IN ('completed', 'failed', 'cancelled', 'dead')),
           count(DISTINCT c.id) FILTER (
               WHERE c.status IN ('completed', 'failed', 'cancelled', 'dead')),
           min(c.id::text) FILTER (WHERE c.parent_run_id IS DISTINCT FROM p_run
                                    AND c.status NOT IN ('completed', 'failed', 'cancelled',
                                                         'dead'))::uuid
    INTO v_unended, v_ended, v_foreign
    FROM runs c WHERE c.id = ANY (p_children);
    IF v_unended + v_ended < (SELECT count(DISTINCT x) FROM unnest(p_children) AS x) THEN
        RAISE EXCEPTION 'run % waits for children that do not exist (deleted?)', p_run
            USING ERRCODE = 'PJ404';
    END IF;
    IF (p_mode = 'all' AND v_unended = 0) OR (p_mode = 'first' AND v_ended > 0) THEN
        IF p_cancel_rest AND NOT v_locked AND v_unended > 0 THEN
            RETURN QUERY SELECT 'again'::text, NULL::json;
            RETURN;
        END IF;
        IF p_mode = 'all' THEN
            SELECT json_agg(child_outcome(c) ORDER BY x.ord) INTO v_results
            FROM unnest(p_children) WITH ORDINALITY AS x(id, ord)
            JOIN runs c ON c.id = x.id;
        ELSE
            SELECT json_build_object('index', x.ord - 1, 'outcome', child_outcome(c)), c.id
            INTO v_results, v_first
            FROM unnest(p_children) WITH ORDINALITY AS x(id, ord)
            JOIN runs c ON c.id = x.id
            WHERE c.status IN ('completed', 'failed', 'cancelled', 'dead')
            ORDER BY c.finished_at, x.ord LIMIT 1;
            IF p_cancel_rest THEN
                PERFORM cancel_tree(array_agg(c.id))
                FROM runs c WHERE c.id = ANY (p_children) AND c.id <> v_first
                  AND c.status NOT IN ('completed', 'failed', 'cancelled', 'dead');
            END IF;
        END IF;
        -- With p_raise the parent raises ChildFailed if a child did not complete:
        -- the entry is then a failure, which a retry of the parent waits for
        -- again (the failed child may have been retried meanwhile).
        IF p_raise AND p_mode = 'all' THEN
            SELECT jsonb_build_object(
                       'type', 'ChildFailed', 'module', 'pgjournal.errors',
                       'message', format('child run %s (%s) %s', c.id, c.workflow, c.status))
            INTO v_error
            FROM unnest(p_children) WITH ORDINALITY AS x(id, ord)
            JOIN runs c ON c.id = x.id
            WHERE c.status <> 'completed'
            ORDER BY x.ord LIMIT 1;
        END IF;
        INSERT INTO steps AS s (run_created_at, run_id, position, name, occurrence, kind, status, output,
                                error, attempt, lease_epoch, turn, calls_before)
        VALUES (run_bucket(p_run), p_run, p_position, p_name, p_occurrence, 'children',
                CASE WHEN v_error IS NULL THEN 'completed' ELSE 'failed' END, v_results,
                v_error, p_attempt, p_epoch, p_turn, p_calls_before)
        ON CONFLICT (run_id, position, run_created_at) DO UPDATE SET
            status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
            attempt = EXCLUDED.attempt, lease_epoch = EXCLUDED.lease_epoch,
            turn = EXCLUDED.turn, calls_before = EXCLUDED.calls_before,
            tries = s.tries + 1, started_at = now(), finished_at = now(), updated_at = now()
        WHERE s.status = 'failed';
        UPDATE runs SET wait_children = NULL, wait_pending = NULL, wait_position = NULL
        WHERE id = p_run AND wait_children IS NOT NULL;
        RETURN QUERY SELECT 'ready'::text, v_results;
        RETURN;
    END IF;
    IF v_foreign IS NOT NULL THEN
        RAISE EXCEPTION 'run % waits for run %, which is not its child (a forked run shares '
            'the children spawned before its fork point: fork from before the spawn to get '
            'its own)', p_run, v_foreign USING ERRCODE = 'PJ409';
    END IF;
    UPDATE runs SET status = 'suspended', due_at = NULL, worker_id = NULL,
                    wait_signal = NULL, wait_until = NULL, wait_position = p_position,
                    wait_children = p_children,
                    wait_pending = CASE WHEN p_mode = 'all' THEN v_unended ELSE 1 END,
                    updated_at = now()
    WHERE id = p_run;
    RETURN QUERY SELECT 'suspended'::text, NULL::json;
END $function$;

-- adapter_write
CREATE OR REPLACE FUNCTION adapter_write(p_run uuid, p_source text, p_workflow text, p_run_meta jsonb, p_position integer, p_first integer, p_replace boolean, p_name text, p_kind text, p_status text, p_output json, p_error jsonb, p_meta jsonb, p_started_at timestamp with time zone, p_finished_at timestamp with time zone, p_chunks json DEFAULT NULL::json)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path FROM CURRENT
AS $function$
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
        INSERT INTO steps (run_created_at, run_id, position, name, occurrence, kind, status, output, error,
                           meta, lease_epoch, started_at, finished_at)
        VALUES (run_bucket(p_run), p_run, v_pos, p_name, v_occ, p_kind, p_status, p_output, p_error,
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
        INSERT INTO stream_chunks (run_created_at, run_id, position, seq, chunk)
        SELECT run_bucket(p_run), p_run, v_pos, e.ord::integer - 1, e.value
        FROM json_array_elements(p_chunks) WITH ORDINALITY AS e(value, ord);
    END IF;
    RETURN v_pos;
END $function$;

-- fork_run
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
      AND a.attgenerated = '' AND a.attname NOT IN ('run_id', 'attempt', 'lease_epoch', 'run_created_at');
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO v_chunk_cols
    FROM pg_attribute a
    WHERE a.attrelid = 'stream_chunks'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attname NOT IN ('run_id', 'run_created_at');
    -- One statement, so entries and chunks come from one snapshot of a live run.
    EXECUTE format($f$
        WITH src AS (
            SELECT * FROM steps s WHERE s.run_id = $1 AND s.position < $2
        ), copied AS (
            INSERT INTO steps (run_created_at, run_id, attempt, lease_epoch, %1$s)
            SELECT run_bucket($3), $3, 0, 0, %1$s FROM src
            RETURNING 1
        ), chunks AS (
            INSERT INTO stream_chunks (run_created_at, run_id, %2$s)
            SELECT run_bucket($3), $3, %2$s FROM stream_chunks k
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
END $function$;

-- -- the functions that read a run's journal: on the partition key too, so a
-- replay reads one partition (run-time pruning on the run's created_at), not
-- one index per partition

-- journal_page
CREATE OR REPLACE FUNCTION journal_page(p_run uuid, p_after integer, p_limit integer, p_max_bytes bigint)
 RETURNS TABLE("position" integer, name text, kind text, status text, output json, error jsonb, attempt integer, turn integer, calls_before integer, fingerprint text, bytes bigint)
 LANGUAGE sql
 STABLE
 SET search_path FROM CURRENT
AS $function$
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
        WHERE s.run_created_at = (SELECT r.created_at FROM runs r WHERE r.id = p_run)
          AND s.run_id = p_run AND s.position > p_after
        ORDER BY s.position
        LIMIT p_limit
    ) x
    WHERE x.before = 0 OR x.before < p_max_bytes
    ORDER BY x.position;
$function$;

-- chunk_page
CREATE OR REPLACE FUNCTION chunk_page(p_run uuid, p_position integer, p_after integer, p_limit integer, p_max_bytes bigint)
 RETURNS TABLE(seq integer, chunk json, turn integer, calls_before integer, bytes bigint)
 LANGUAGE sql
 STABLE
 SET search_path FROM CURRENT
AS $function$
    SELECT x.seq, x.chunk, x.turn, x.calls_before, x.bytes
    FROM (
        SELECT k.seq, k.chunk, k.turn, k.calls_before, octet_length(k.chunk::text)::bigint AS bytes,
               sum(octet_length(k.chunk::text)) OVER (ORDER BY k.seq)
                   - octet_length(k.chunk::text) AS before
        FROM stream_chunks k
        WHERE k.run_created_at = (SELECT r.created_at FROM runs r WHERE r.id = p_run)
          AND k.run_id = p_run AND k.position = p_position AND k.seq > p_after
        ORDER BY k.seq
        LIMIT p_limit
    ) x
    WHERE x.before = 0 OR x.before < p_max_bytes
    ORDER BY x.seq;
$function$;

-- journal_outline
CREATE OR REPLACE FUNCTION journal_outline(p_run uuid)
 RETURNS TABLE(turns integer[], last_position integer, entries bigint, bytes bigint, patch_positions integer[], patch_names text[])
 LANGUAGE sql
 STABLE
 SET search_path FROM CURRENT
AS $function$
    SELECT
        (SELECT coalesce(array_agg(t.turn ORDER BY t.turn), '{}'::integer[]) FROM (
             SELECT s.turn FROM steps s WHERE s.run_created_at = (SELECT r.created_at FROM runs r WHERE r.id = p_run)
          AND s.run_id = p_run AND s.turn IS NOT NULL
             UNION ALL
             SELECT k.turn FROM stream_chunks k WHERE k.run_created_at = (SELECT r.created_at FROM runs r WHERE r.id = p_run)
          AND k.run_id = p_run AND k.turn IS NOT NULL
         ) t),
        j.last_position, j.entries,
        j.bytes + (SELECT coalesce(sum(octet_length(k.chunk::text)), 0)::bigint
                   FROM stream_chunks k WHERE k.run_created_at = (SELECT r.created_at FROM runs r WHERE r.id = p_run)
          AND k.run_id = p_run),
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
        FROM steps s WHERE s.run_created_at = (SELECT r.created_at FROM runs r WHERE r.id = p_run)
          AND s.run_id = p_run
    ) j;
$function$;

-- -- retention by partition ----------------------------------------------------
--
-- `pgjournal prune` first drops whole partitions, then deletes what is left
-- in batches (sql/cli.sql: prune_batch). A partition range [lo, hi) can go
-- when it ends before the cutoff and every run created in it has ended (with
-- one of the statuses pruned) before the cutoff: prune_history_batch deletes
-- those runs (their rows in runs and signals; the journal, chunks and events
-- stay for the partition drop), then drop_history_range detaches and drops
-- the three partitions once no run of the range is left.

-- Ranges whose partitions prune can drop, oldest first, with their runs and size.
CREATE FUNCTION prunable_partitions(p_cutoff timestamptz, p_statuses text[])
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
    ORDER BY g.lo
$$;

-- One batch of the runs of a prunable range: the runs (and their signals) are
-- deleted, their journal, chunks and events are left to the partition drop.
-- Same rules as prune_batch: only ended runs, rows another transaction holds
-- are skipped, the status is checked again under the row lock.
CREATE FUNCTION prune_history_batch(p_lo timestamptz, p_hi timestamptz,
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
-- no run created in that range is left (else nothing happens and NULL is
-- returned). DETACH without CONCURRENTLY: CONCURRENTLY cannot run in a
-- transaction and PostgreSQL refuses it while a DEFAULT partition exists. It
-- takes an ACCESS EXCLUSIVE lock on the three parents for the few
-- milliseconds of catalog work; p_lock_timeout_ms bounds the wait for it
-- (an error then: nothing changed, try again).
CREATE FUNCTION drop_history_range(p_lo timestamptz, p_hi timestamptz,
                                   p_lock_timeout_ms integer DEFAULT 5000)
RETURNS text[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_names text[] := ARRAY[]::text[];
    v record;
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    -- The parents first, in the order writers take them, so a run created in
    -- the range from now on sends its rows to the DEFAULT partitions.
    LOCK TABLE steps, stream_chunks, run_events IN ACCESS EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM runs r WHERE r.created_at >= p_lo AND r.created_at < p_hi) THEN
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

-- This week's and next week's partitions now (a fresh schema stays quick to
-- create); `maintain()` creates the rest of ahead_days on its first call.
SELECT * FROM maintain(p_ahead_days => 7);
