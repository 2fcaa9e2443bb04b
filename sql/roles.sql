-- pgjournal: optional least-privilege roles for one schema.
--
-- Not a migration: run it once after `pgjournal migrate`, and again after
-- every later migrate (it is idempotent), as the schema's owner or a
-- superuser, e.g. `pgjournal roles --schema S | psql "$DSN"`.
--! Template notes (lines starting "--!" are left out of what roles_sql prints):
--! print this file ready to run with `pgjournal roles --schema S`, or from
--! Python with pgjournal.roles.roles_sql("S"). The names in braces are
--! placeholders that roles_sql() fills in from validated names: schema, worker
--! and reader as quoted identifiers, schema_name, worker_name and reader_name
--! as string literals; the raw file is not valid SQL.
--
-- What it sets up:
--
-- * The functions of migration 0002 that callers use become SECURITY DEFINER,
--   so they run with the owner's rights and callers need no privilege on the
--   tables at all: a worker can change state only through the fenced
--   functions, never with a stray UPDATE. Their search_path is pinned with
--   pg_temp last, so nobody can shadow a table with a temporary one.
-- * EXECUTE is revoked from PUBLIC on every function of the schema (Postgres
--   grants it to PUBLIC by default), then granted back only where needed.
-- * {worker} (NOLOGIN group role): USAGE on the schema, SELECT on the
--   migrations table (the schema version check) and EXECUTE on the functions a
--   pgjournal.Worker calls. No DML, no DDL, no client functions (start, signal,
--   cancel, retry, fork, set_queue): grant those separately if workflow code starts
--   or signals other runs. It reads no other table and no view: dashboards,
--   scrapes and listings are for the reader role.
-- * {reader} (NOLOGIN group role): USAGE on the schema and SELECT on every
--   table and view in it, now and (when created by the role running this
--   script) in the future. No EXECUTE on any function; no view calls one
--   (a function a view calls is checked against the caller), so SELECT is
--   enough for every view, the dashboard and the metrics.
--
-- Give people and services login roles that are members, e.g.
--   CREATE ROLE worker_host1 LOGIN PASSWORD '...' IN ROLE pgjournal_worker;

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {worker_name}) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', {worker_name});
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {reader_name}) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', {reader_name});
    END IF;
END $$;

-- Only the owner creates objects in the schema (this also keeps the pinned
-- search_path of the SECURITY DEFINER functions safe).
REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;

DO $$
DECLARE
    f regprocedure;
    -- What a pgjournal.Worker calls.
    v_worker text[] := ARRAY[
        'claim_runs', 'go_hungry', 'journal_step', 'append_chunks', 'wait_signal',
        'sleep_until', 'complete_runs', 'fail_run', 'release_runs', 'heartbeat',
        'register_worker', 'stop_worker', 'journal_page', 'chunk_page', 'journal_outline',
        'note_run_event', 'spawn_runs', 'wait_children', 'take_units',
        'declare_schedules', 'claim_schedules', 'fire_schedules', 'schedules_next_due',
        'trace_contexts'];
    -- What clients call (the App API, the CLI, a DBA in psql).
    v_client text[] := ARRAY[
        'start_run', 'start_runs', 'send_signal', 'cancel_run', 'retry_run',
        'request_result', 'set_queue', 'set_concurrency_limit', 'set_rate_limit', 'fork_run',
        'set_schedule', 'pause_schedule', 'resume_schedule', 'delete_schedule',
        'trigger_schedule', 'backfill_schedule'];
    v_api text[] := v_worker || v_client;
    v_ns oid := (SELECT n.oid FROM pg_namespace n WHERE n.nspname = {schema_name});
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = v_ns AND p.proname = ANY (v_api)
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER '
                       'SET search_path = %I, pg_catalog, pg_temp', f, {schema_name});
    END LOOP;
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = v_ns AND p.proname = ANY (v_worker)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, {worker_name});
    END LOOP;
END $$;

GRANT USAGE ON SCHEMA {schema} TO {worker};
GRANT SELECT ON {schema}.migrations TO {worker};

GRANT USAGE ON SCHEMA {schema} TO {reader};
GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {reader};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT ON TABLES TO {reader};

COMMIT;
