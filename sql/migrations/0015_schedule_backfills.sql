-- pgjournal schema, part 15: schedule backfills that cannot stop a schedule
-- and never start a slot before its time.
--
-- A queued backfill request ({"from", "to"} in schedules.backfills) is planned
-- by a worker round, at most 1,000 slots a round. Since this version:
--
-- * a request the worker cannot plan is kept in `backfills`, marked with an
--   "error" key, and is no longer pending: claim_schedules and
--   schedules_next_due count only unmarked requests, so a failed one neither
--   stops the schedule (last_error stays for the rule's own errors) nor keeps
--   it due forever. set_schedule drops failed requests (pending ones stay);
--   an operator may also drop every request with
--   `UPDATE schedules SET backfills = '[]' WHERE name = ...`;
-- * a backfill reaches no further than now(): later slots are the schedule's
--   own and fire on time (or not at all while it is paused). A backfill that
--   started them would start them early and take their idempotency keys
--   (`schedule:NAME:SLOT`), so their real firing would find a run already
--   there. backfill_schedule queues a request ending at now() at the latest
--   and, given the slots, starts none after now(); the worker's planning
--   clamps too (requests queued before this version);
-- * backfill_schedule refuses infinite bounds.
--
-- The signatures are unchanged; CREATE OR REPLACE keeps the grants and the
-- SECURITY DEFINER setting of sql/roles.sql, and lets the file run twice.
-- Everything not mentioned is as in 0010.

CREATE OR REPLACE FUNCTION set_schedule(
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
        -- Setting a schedule again clears its errors: its own and its failed backfills.
        backfills = (SELECT coalesce(jsonb_agg(b ORDER BY i), '[]'::jsonb)
                     FROM jsonb_array_elements(backfills) WITH ORDINALITY AS e(b, i)
                     WHERE NOT (b ? 'error')),
        fire_after = CASE WHEN v_old.cron IS DISTINCT FROM btrim(p_cron)
                            OR v_old.timezone IS DISTINCT FROM p_timezone
                            OR (v_old.paused AND NOT coalesce(p_paused, false))
                          THEN now() ELSE fire_after END,
        next_fire_at = NULL
    WHERE name = p_name;
    PERFORM schedules_changed();
    RETURN false;
END $$;

-- Backfill the slots in [p_from, p_to] that are not after now(). With p_slots
-- (computed by a client with the cron library, as `pgjournal schedules
-- backfill` does) their runs start now and the number started is returned;
-- slots after now() are not started. Without (from psql) the request is
-- queued on the row, ending at now() at the latest, and the next worker round
-- that serves the workflow computes and starts them; NULL is returned (0 if
-- the whole range lies in the future: nothing to backfill). Slots that
-- already have a run are not started again. Paused or not, the cursor does
-- not move.
CREATE OR REPLACE FUNCTION backfill_schedule(p_name text, p_from timestamptz,
                                             p_to timestamptz,
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
    IF NOT (isfinite(p_from) AND isfinite(p_to)) THEN
        RAISE EXCEPTION 'invalid backfill range % to %: both ends must be finite times',
            p_from, p_to USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_s FROM schedules WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM schedule_not_found(p_name);
    END IF;
    IF p_slots IS NULL THEN
        IF p_from > now() THEN
            RETURN 0;  -- every slot in the range is still to come: the schedule fires them
        END IF;
        UPDATE schedules
        SET backfills = backfills || jsonb_build_array(
                jsonb_build_object('from', p_from, 'to', least(p_to, now()))),
            updated_at = now()
        WHERE name = p_name;
        PERFORM schedules_changed();
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_slots) AS s WHERE s < p_from OR s > p_to) THEN
        RAISE EXCEPTION 'backfill slots must lie in % to %', p_from, p_to
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN schedule_start_slots(
        v_s, ARRAY(SELECT s FROM unnest(p_slots) AS s WHERE s <= now()), true, NULL, NULL);
END $$;

-- The schedules a worker's round may work on, locked FOR UPDATE SKIP LOCKED
-- (another worker's round skips them): of a workflow the worker registered,
-- declared by its code if they come from code, without an error, and due
-- (next_fire_at passed or not computed yet) or with a backfill pending (a
-- request not marked failed).
CREATE OR REPLACE FUNCTION claim_schedules(p_workflows text[], p_declared text[],
                                           p_limit integer)
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
           OR jsonb_path_exists(s.backfills, '$[*] ? (!(exists(@.error)))'))
    ORDER BY s.next_fire_at NULLS FIRST, s.name
    LIMIT p_limit
    FOR UPDATE OF s SKIP LOCKED
$$;

-- When a worker's scheduler should look again: the earliest due time of the
-- schedules it may fire (now, if one needs computing or has a backfill
-- pending; a failed request is not pending).
CREATE OR REPLACE FUNCTION schedules_next_due(p_workflows text[], p_declared text[])
RETURNS TABLE (next_due timestamptz, db_now timestamptz)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT min(CASE WHEN s.next_fire_at IS NULL
                      OR jsonb_path_exists(s.backfills, '$[*] ? (!(exists(@.error)))')
                    THEN now()
                    ELSE s.next_fire_at END), now()
    FROM schedules s
    WHERE s.workflow = ANY (p_workflows)
      AND (s.origin = 'api' OR s.name = ANY (p_declared))
      AND s.last_error IS NULL
      AND (NOT s.paused OR jsonb_path_exists(s.backfills, '$[*] ? (!(exists(@.error)))'))
$$;

-- Schedules that the planning bug stopped (a second queued backfill hit an
-- empty list: "cannot compute its slots: IndexError: ...", or a request that
-- could not be parsed stopped the whole schedule) fire again: the next round
-- plans them anew. A rule that still cannot be computed records its error
-- again in that round.
UPDATE schedules SET last_error = NULL, next_fire_at = NULL, updated_at = now()
WHERE last_error LIKE 'cannot compute its slots: %';
