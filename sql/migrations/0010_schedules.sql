-- pgjournal schema, part 10: schedules.
--
-- A schedule is a row: a cron rule in an IANA time zone, the workflow it
-- starts (with fixed args/kwargs) on a queue, and a catch-up policy. Workers
-- compute the cron slots in Python (croniter + zoneinfo: cron parsing and
-- daylight saving time are not done in SQL) and every slot becomes one run
-- whose idempotency key is `schedule:NAME:SLOT` (SLOT in UTC, ISO 8601), so
-- any number of workers on any number of hosts start it exactly once.
--
-- The row's cursor `fire_after` says which slots are still unfired: those
-- strictly after it. `next_fire_at` caches the first of them (NULL: to be
-- computed by the next worker round, e.g. right after set/resume from psql).
-- A worker round claims due rows FOR UPDATE SKIP LOCKED, starts the runs of
-- the slots its policy fires and advances the cursor, in one transaction.
-- See docs/flow-control.md, "Schedules".

CREATE TABLE schedules (
    name           text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,100}$'),
    workflow       text NOT NULL,
    queue          text NOT NULL CHECK (queue ~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$'),
    cron           text NOT NULL,
    timezone       text NOT NULL DEFAULT 'UTC',
    args           json NOT NULL DEFAULT '[]'::json,
    kwargs         json NOT NULL DEFAULT '{}'::json,
    catchup        text NOT NULL DEFAULT 'latest' CHECK (catchup IN ('skip', 'latest', 'all')),
    catchup_window interval NOT NULL DEFAULT interval '1 day'
        CHECK (catchup_window > interval '0'),
    paused         boolean NOT NULL DEFAULT false,
    -- 'code': declared with @app.schedule, upserted by workers at start and
    -- fired only by workers whose code declares it; 'api': set with
    -- App.set_schedule or set_schedule() in SQL, fired by any worker that
    -- registered the workflow.
    origin         text NOT NULL DEFAULT 'api' CHECK (origin IN ('code', 'api')),
    max_attempts   integer CHECK (max_attempts IS NULL OR max_attempts >= 1),
    max_recoveries integer CHECK (max_recoveries IS NULL OR max_recoveries >= 0),
    fire_after     timestamptz NOT NULL DEFAULT now(),
    next_fire_at   timestamptz,
    last_slot      timestamptz,
    last_fired_at  timestamptz,
    last_error     text,
    -- Pending backfill requests from SQL ([{"from": ts, "to": ts}]), done by a worker.
    backfills      jsonb NOT NULL DEFAULT '[]'::jsonb,
    declared_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE schedules IS
    'Cron schedules: each slot becomes one run with idempotency key schedule:NAME:SLOT.';
COMMENT ON COLUMN schedules.fire_after IS
    'Cursor: the slots strictly after it have not been considered yet.';
COMMENT ON COLUMN schedules.next_fire_at IS
    'The first slot after fire_after (NULL: computed by the next worker round).';
COMMENT ON COLUMN schedules.last_slot IS 'The latest slot that got a run.';
COMMENT ON COLUMN schedules.last_error IS
    'Why workers cannot fire it (e.g. a cron expression set from SQL that does not parse).';
COMMENT ON COLUMN schedules.declared_at IS
    'When a starting worker last upserted it from @app.schedule (origin code).';

-- The runs a schedule started (slots, backfills, triggers): their meta names
-- the schedule. Partial, so runs without a schedule never enter it.
CREATE INDEX runs_schedule ON runs ((meta ->> 'schedule'), created_at)
    WHERE meta ? 'schedule';

-- -- helpers --------------------------------------------------------------------

CREATE FUNCTION schedule_key(p_name text, p_slot timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'schedule:' || p_name || ':'
        || to_char(p_slot AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00'
$$;
COMMENT ON FUNCTION schedule_key(text, timestamptz) IS
    'The idempotency key of the run of one slot: schedule:NAME:2026-12-02T10:05:00+00:00.';

CREATE FUNCTION schedules_changed() RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('pgjournal_wake', current_schema() || ':*schedules')
$$;

CREATE FUNCTION schedule_not_found(p_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'schedule % does not exist', quote_literal(p_name)
        USING ERRCODE = 'PJS04', HINT = 'SELECT name FROM schedules lists them';
END $$;

-- Checks what SQL can check (a worker checks the cron rule fully, and records
-- last_error if it does not parse). Raises invalid_parameter_value naming the field.
CREATE FUNCTION schedule_check(p_name text, p_cron text, p_timezone text, p_queue text,
                               p_catchup text, p_catchup_window interval)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_fields integer;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9_.-]{1,100}$' THEN
        RAISE EXCEPTION 'invalid schedule name %: use 1-100 letters, digits, _ . or -',
            quote_nullable(p_name) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_fields := cardinality(regexp_split_to_array(btrim(coalesce(p_cron, '')), '\s+'));
    IF coalesce(p_cron, '') !~* '^\s*@(yearly|annually|monthly|weekly|daily|midnight|hourly)\s*$'
       AND (btrim(coalesce(p_cron, '')) = '' OR v_fields NOT IN (5, 6)
            OR p_cron !~ '^[\s0-9A-Za-z*/,?#-]+$') THEN
        RAISE EXCEPTION 'invalid cron %: expected 5 fields (minute hour day month weekday) '
            'or 6 (second first)', quote_nullable(p_cron)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        PERFORM now() AT TIME ZONE p_timezone;
    EXCEPTION WHEN invalid_parameter_value OR null_value_not_allowed THEN
        RAISE EXCEPTION 'invalid timezone %: not an IANA time zone name', quote_nullable(p_timezone)
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF p_timezone IS NULL THEN
        RAISE EXCEPTION 'invalid timezone NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_queue IS NULL OR p_queue !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'invalid queue name %', quote_nullable(p_queue)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_catchup IS NULL OR p_catchup NOT IN ('skip', 'latest', 'all') THEN
        RAISE EXCEPTION 'invalid catchup %: expected skip, latest or all', quote_nullable(p_catchup)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_catchup_window IS NULL OR p_catchup_window <= interval '0' THEN
        RAISE EXCEPTION 'invalid catchup_window %: must be positive', quote_nullable(p_catchup_window)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- -- client API (App, CLI, psql) ------------------------------------------------

-- Create or replace a schedule (origin 'api'). A new rule (cron or timezone
-- changed) or a schedule that stops being paused applies from now on: slots
-- before this call are not caught up. Returns true if it was created.
CREATE FUNCTION set_schedule(
    p_name text, p_cron text, p_workflow text,
    p_args json DEFAULT '[]'::json, p_kwargs json DEFAULT '{}'::json,
    p_timezone text DEFAULT 'UTC', p_queue text DEFAULT 'default',
    p_catchup text DEFAULT 'latest', p_catchup_window interval DEFAULT interval '1 day',
    p_paused boolean DEFAULT false, p_max_attempts integer DEFAULT NULL,
    p_max_recoveries integer DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_old schedules;
BEGIN
    PERFORM schedule_check(p_name, p_cron, p_timezone, p_queue, p_catchup, p_catchup_window);
    IF p_workflow IS NULL OR p_workflow = '' THEN
        RAISE EXCEPTION 'a schedule needs a workflow' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_old FROM schedules WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO schedules (name, workflow, queue, cron, timezone, args, kwargs, catchup,
                               catchup_window, paused, origin, max_attempts, max_recoveries)
        VALUES (p_name, p_workflow, p_queue, btrim(p_cron), p_timezone,
                coalesce(p_args, '[]'::json), coalesce(p_kwargs, '{}'::json), p_catchup,
                p_catchup_window, coalesce(p_paused, false), 'api', p_max_attempts,
                p_max_recoveries)
        ON CONFLICT (name) DO NOTHING;
        IF FOUND THEN
            PERFORM schedules_changed();
            RETURN true;
        END IF;
        -- Created concurrently: update it below.
        SELECT * INTO v_old FROM schedules WHERE name = p_name FOR UPDATE;
    END IF;
    UPDATE schedules SET
        workflow = p_workflow, queue = p_queue, cron = btrim(p_cron), timezone = p_timezone,
        args = coalesce(p_args, '[]'::json), kwargs = coalesce(p_kwargs, '{}'::json),
        catchup = p_catchup, catchup_window = p_catchup_window,
        paused = coalesce(p_paused, false), origin = 'api',
        max_attempts = p_max_attempts, max_recoveries = p_max_recoveries,
        last_error = NULL, updated_at = now(),
        fire_after = CASE WHEN v_old.cron IS DISTINCT FROM btrim(p_cron)
                            OR v_old.timezone IS DISTINCT FROM p_timezone
                            OR (v_old.paused AND NOT coalesce(p_paused, false))
                          THEN now() ELSE fire_after END,
        next_fire_at = NULL
    WHERE name = p_name;
    PERFORM schedules_changed();
    RETURN false;
END $$;

CREATE FUNCTION pause_schedule(p_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE schedules SET paused = true, next_fire_at = NULL, updated_at = now()
    WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM schedule_not_found(p_name);
    END IF;
    PERFORM schedules_changed();
END $$;
COMMENT ON FUNCTION pause_schedule(text) IS
    'Stop firing the schedule; its slots while paused are never caught up (backfill them).';

CREATE FUNCTION resume_schedule(p_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- Only a paused schedule moves its cursor: resuming a running one changes nothing.
    UPDATE schedules SET paused = false, fire_after = CASE WHEN paused THEN now()
                                                         ELSE fire_after END,
           next_fire_at = CASE WHEN paused THEN NULL ELSE next_fire_at END,
           updated_at = now()
    WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM schedule_not_found(p_name);
    END IF;
    PERFORM schedules_changed();
END $$;
COMMENT ON FUNCTION resume_schedule(text) IS
    'Fire the schedule again from the next slot after now.';

CREATE FUNCTION delete_schedule(p_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM schedules WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM schedule_not_found(p_name);
    END IF;
    PERFORM schedules_changed();
END $$;

-- Start the runs of some slots of a schedule (those without a run yet: the
-- slot's idempotency key). Internal: rounds, backfills. Returns how many started.
CREATE FUNCTION schedule_start_slots(p_s schedules, p_slots timestamptz[], p_backfill boolean,
                                     p_max_attempts integer, p_max_recoveries integer)
RETURNS integer
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT count(*) FILTER (WHERE r.created)::integer
    FROM (SELECT DISTINCT slot FROM unnest(p_slots) AS slot) AS u
    CROSS JOIN LATERAL start_run(
        gen_random_uuid(), p_s.workflow, p_s.queue,
        json_build_object('args', p_s.args, 'kwargs', p_s.kwargs), 0, 0,
        schedule_key(p_s.name, u.slot),
        coalesce(p_max_attempts, p_s.max_attempts, 3),
        coalesce(p_max_recoveries, p_s.max_recoveries, 5), 'native',
        jsonb_build_object('schedule', p_s.name,
                           'slot', to_char(u.slot AT TIME ZONE 'UTC',
                                           'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00')
        || CASE WHEN p_backfill THEN '{"backfill": true}'::jsonb ELSE '{}'::jsonb END) AS r
$$;

-- Start one run of the schedule's workflow now, outside its slots. It does not
-- move the schedule's cursor. meta: {"schedule": NAME, "trigger": true}.
CREATE FUNCTION trigger_schedule(p_name text, p_idempotency_key text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_s schedules;
    v_id uuid;
BEGIN
    SELECT * INTO v_s FROM schedules WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM schedule_not_found(p_name);
    END IF;
    SELECT r.run_id INTO v_id FROM start_run(
        gen_random_uuid(), v_s.workflow, v_s.queue,
        json_build_object('args', v_s.args, 'kwargs', v_s.kwargs), 0, 0, p_idempotency_key,
        coalesce(v_s.max_attempts, 3), coalesce(v_s.max_recoveries, 5), 'native',
        jsonb_build_object('schedule', v_s.name, 'trigger', true)) AS r;
    RETURN v_id;
END $$;

-- Backfill the slots in [p_from, p_to]. With p_slots (computed by a client
-- with the cron library, as `pgjournal schedules backfill` does) their runs
-- start now and the number started is returned. Without (from psql) the
-- request is queued on the row and the next worker round that serves the
-- workflow computes and starts them; NULL is returned. Slots that already
-- have a run are not started again. Paused or not, the cursor does not move.
CREATE FUNCTION backfill_schedule(p_name text, p_from timestamptz, p_to timestamptz,
                                  p_slots timestamptz[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_s schedules;
BEGIN
    IF p_from IS NULL OR p_to IS NULL OR p_to < p_from THEN
        RAISE EXCEPTION 'invalid backfill range % to %', p_from, p_to
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_s FROM schedules WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM schedule_not_found(p_name);
    END IF;
    IF p_slots IS NULL THEN
        UPDATE schedules
        SET backfills = backfills || jsonb_build_array(
                jsonb_build_object('from', p_from, 'to', p_to)),
            updated_at = now()
        WHERE name = p_name;
        PERFORM schedules_changed();
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_slots) AS s WHERE s < p_from OR s > p_to) THEN
        RAISE EXCEPTION 'backfill slots must lie in % to %', p_from, p_to
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN schedule_start_slots(v_s, p_slots, true, NULL, NULL);
END $$;

-- -- worker API -------------------------------------------------------------------

-- A starting worker upserts the schedules its code declares (origin 'code'):
-- the definition follows the code, the paused flag stays what operators set.
-- A changed cron or timezone applies from now on; an unchanged definition
-- keeps the cursor, so slots missed while no worker ran are caught up.
CREATE FUNCTION declare_schedules(p_defs json) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    d record;
    v_changed boolean := false;
BEGIN
    FOR d IN
        SELECT * FROM json_to_recordset(p_defs) AS x(
            name text, cron text, timezone text, workflow text, queue text, args json,
            kwargs json, catchup text, catchup_window double precision, max_attempts integer,
            max_recoveries integer)
        ORDER BY name
    LOOP
        PERFORM schedule_check(d.name, d.cron, d.timezone, d.queue, d.catchup,
                               make_interval(secs => d.catchup_window));
        INSERT INTO schedules AS s (name, workflow, queue, cron, timezone, args, kwargs,
                                    catchup, catchup_window, origin, max_attempts,
                                    max_recoveries, declared_at)
        VALUES (d.name, d.workflow, d.queue, d.cron, d.timezone, d.args, d.kwargs, d.catchup,
                make_interval(secs => d.catchup_window), 'code', d.max_attempts,
                d.max_recoveries, now())
        ON CONFLICT (name) DO UPDATE SET
            workflow = excluded.workflow, queue = excluded.queue, cron = excluded.cron,
            timezone = excluded.timezone, args = excluded.args, kwargs = excluded.kwargs,
            catchup = excluded.catchup, catchup_window = excluded.catchup_window,
            origin = 'code', max_attempts = excluded.max_attempts,
            max_recoveries = excluded.max_recoveries, declared_at = now(),
            last_error = NULL,
            updated_at = CASE WHEN (s.workflow, s.queue, s.cron, s.timezone, s.args::text,
                                    s.kwargs::text, s.catchup, s.catchup_window, s.origin)
                                   IS DISTINCT FROM
                                   (excluded.workflow, excluded.queue, excluded.cron,
                                    excluded.timezone, excluded.args::text,
                                    excluded.kwargs::text, excluded.catchup,
                                    excluded.catchup_window, 'code')
                              THEN now() ELSE s.updated_at END,
            fire_after = CASE WHEN (s.cron, s.timezone)
                                   IS DISTINCT FROM (excluded.cron, excluded.timezone)
                              THEN now() ELSE s.fire_after END,
            next_fire_at = CASE WHEN (s.cron, s.timezone)
                                     IS DISTINCT FROM (excluded.cron, excluded.timezone)
                                THEN NULL ELSE s.next_fire_at END;
        v_changed := true;
    END LOOP;
    IF v_changed THEN
        PERFORM schedules_changed();
    END IF;
END $$;

-- The schedules a worker's round may work on, locked FOR UPDATE SKIP LOCKED
-- (another worker's round skips them): of a workflow the worker registered,
-- declared by its code if they come from code, without an error, and due
-- (next_fire_at passed or not computed yet) or with a backfill pending.
CREATE FUNCTION claim_schedules(p_workflows text[], p_declared text[], p_limit integer)
RETURNS TABLE (name text, workflow text, queue text, cron text, timezone text,
               catchup text, catchup_window interval, paused boolean, max_attempts integer,
               max_recoveries integer, fire_after timestamptz, next_fire_at timestamptz,
               backfills jsonb, db_now timestamptz)
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT s.name, s.workflow, s.queue, s.cron, s.timezone, s.catchup, s.catchup_window,
           s.paused, s.max_attempts, s.max_recoveries, s.fire_after, s.next_fire_at,
           s.backfills, now()
    FROM schedules s
    WHERE s.workflow = ANY (p_workflows)
      AND (s.origin = 'api' OR s.name = ANY (p_declared))
      AND s.last_error IS NULL
      AND ((NOT s.paused AND (s.next_fire_at IS NULL OR s.next_fire_at <= now()))
           OR s.backfills <> '[]'::jsonb)
    ORDER BY s.next_fire_at NULLS FIRST, s.name
    LIMIT p_limit
    FOR UPDATE OF s SKIP LOCKED
$$;

-- Apply a round's plan (computed by the worker for rows it holds locked):
-- [{"name", "slots": [ts], "backfill_slots": [ts], "fire_after", "next_fire_at",
--   "backfills": [...], "error", "max_attempts", "max_recoveries"}].
-- Keys left out keep the column. Returns the number of runs started.
CREATE FUNCTION fire_schedules(p_items json) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    it json;
    v_s schedules;
    v_slots timestamptz[];
    v_back timestamptz[];
    v_started integer := 0;
    v_n integer;
BEGIN
    FOR it IN SELECT * FROM json_array_elements(p_items) LOOP
        SELECT * INTO v_s FROM schedules WHERE name = it ->> 'name' FOR UPDATE;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile
        IF it ->> 'error' IS NOT NULL THEN
            UPDATE schedules SET last_error = it ->> 'error', next_fire_at = NULL,
                                 updated_at = now()
            WHERE name = v_s.name;
            CONTINUE;
        END IF;
        v_slots := ARRAY(SELECT x::timestamptz
                         FROM json_array_elements_text(coalesce(it -> 'slots', '[]')) AS x);
        v_back := ARRAY(SELECT x::timestamptz
                        FROM json_array_elements_text(coalesce(it -> 'backfill_slots', '[]'))
                        AS x);
        v_n := 0;
        IF cardinality(v_slots) > 0 THEN
            v_n := schedule_start_slots(v_s, v_slots, false,
                                        (it ->> 'max_attempts')::integer,
                                        (it ->> 'max_recoveries')::integer);
        END IF;
        IF cardinality(v_back) > 0 THEN
            v_n := v_n + schedule_start_slots(v_s, v_back, true,
                                              (it ->> 'max_attempts')::integer,
                                              (it ->> 'max_recoveries')::integer);
        END IF;
        v_started := v_started + v_n;
        UPDATE schedules SET
            fire_after = CASE WHEN it ->> 'fire_after' IS NOT NULL
                              THEN greatest(fire_after, (it ->> 'fire_after')::timestamptz)
                              ELSE fire_after END,
            next_fire_at = CASE WHEN (it::jsonb) ? 'next_fire_at'
                                THEN (it ->> 'next_fire_at')::timestamptz
                                ELSE next_fire_at END,
            last_slot = CASE WHEN cardinality(v_slots) > 0
                             THEN greatest(last_slot, (SELECT max(x) FROM unnest(v_slots) x))
                             ELSE last_slot END,
            last_fired_at = CASE WHEN cardinality(v_slots) > 0 THEN now()
                                 ELSE last_fired_at END,
            backfills = CASE WHEN (it::jsonb) ? 'backfills'
                             THEN (it -> 'backfills')::jsonb ELSE backfills END
        WHERE name = v_s.name;
    END LOOP;
    RETURN v_started;
END $$;

-- When a worker's scheduler should look again: the earliest due time of the
-- schedules it may fire (now, if one needs computing or has a backfill).
CREATE FUNCTION schedules_next_due(p_workflows text[], p_declared text[])
RETURNS TABLE (next_due timestamptz, db_now timestamptz)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT min(CASE WHEN s.backfills <> '[]'::jsonb OR s.next_fire_at IS NULL THEN now()
                    ELSE s.next_fire_at END), now()
    FROM schedules s
    WHERE s.workflow = ANY (p_workflows)
      AND (s.origin = 'api' OR s.name = ANY (p_declared))
      AND s.last_error IS NULL
      AND (NOT s.paused OR s.backfills <> '[]'::jsonb)
$$;

-- -- the DBA's view -------------------------------------------------------------

CREATE VIEW schedule_status AS
SELECT s.name, s.workflow, s.queue, s.cron, s.timezone, s.catchup, s.catchup_window,
       s.paused, s.origin, s.next_fire_at, s.last_slot, s.last_fired_at,
       (SELECT count(*) FROM runs r
        WHERE r.meta ? 'schedule' AND r.meta ->> 'schedule' = s.name
          AND r.created_at > now() - interval '1 day') AS runs_last_day,
       last_run.id AS last_run_id, last_run.status AS last_run_status,
       last_run.created_at AS last_run_at,
       s.last_error, jsonb_array_length(s.backfills) AS pending_backfills,
       s.declared_at, s.created_at, s.updated_at
FROM schedules s
LEFT JOIN LATERAL (
    SELECT r.id, r.status, r.created_at FROM runs r
    WHERE r.meta ? 'schedule' AND r.meta ->> 'schedule' = s.name
    ORDER BY r.created_at DESC
    LIMIT 1) AS last_run ON true;
COMMENT ON VIEW schedule_status IS
    'One row per schedule: its rule, state, next and last slot, runs in the last day, '
    'and the status of its latest run.';
