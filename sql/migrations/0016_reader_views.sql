-- pgjournal schema, part 16: what the optional roles (sql/roles.sql) can read.
--
-- The roles script revokes EXECUTE on every function of the schema from
-- PUBLIC and gives the reader role none back. A view reads its tables with
-- its owner's rights, but the functions it calls are checked against the
-- caller, at the start of execution, whether or not a row reaches them: the
-- reader's `SELECT * FROM concurrency_keys` (the dashboard's Limits page, the
-- CLI's `limits`) failed with "permission denied for function key_limit", even
-- on an empty schema. The view now looks the limit up itself, by the rule of
-- key_limit() (the exact key, else the longest prefix pattern ending in *;
-- none: unlimited): no view calls a function of the schema, so the reader
-- keeps no EXECUTE at all. tests/test_roles.py reads every view of the schema,
-- from the catalog, as the reader role, and checks the view's limits against
-- key_limit(). The counts are now taken in one grouped pass over the unfinished
-- runs, as sql/metrics.sql takes them (0013's view counted each key's runs
-- apart, reading every unfinished run once per key: with 50 keys, 1,000
-- unfinished and 100,000 ended runs, 47 ms and 50,400 buffers; now 0.6 ms and
-- 1,037 buffers, the same rows).
--
-- trace_contexts(): a worker with tracing on reads the trace context stored
-- with each run it claimed (its own, else its parent's, else its root's). It
-- read `runs`, which the worker role may not: under the roles script the
-- spans of every attempt silently left the caller's trace. The function is on
-- the worker list of sql/roles.sql (SECURITY DEFINER there).
--
-- OR REPLACE throughout: the file can run twice (tests/test_roles.py replays
-- the newest migration).

CREATE OR REPLACE VIEW concurrency_keys AS
SELECT
    k.key,
    l.max_running,
    k.running,
    k.queued,
    k.suspended,
    k.running >= coalesce(l.max_running, 2147483647) AS at_limit
FROM (
    -- One pass over the unfinished runs (runs_unfinished_status), grouped by key;
    -- 0013 counted each key's runs apart, reading every unfinished run once per key.
    SELECT r.concurrency_key AS key,
           count(*) FILTER (WHERE r.status = 'running'
                                   AND coalesce(r.lease_until, r.due_at) > now()) AS running,
           count(*) FILTER (WHERE r.status = 'queued') AS queued,
           count(*) FILTER (WHERE r.status = 'suspended') AS suspended
    FROM runs r
    WHERE r.concurrency_key IS NOT NULL AND r.status IN ('queued', 'running', 'suspended')
    GROUP BY r.concurrency_key
) AS k
LEFT JOIN LATERAL (
    -- key_limit(k.key), inlined: the reader role may not call functions.
    SELECT cl.max_running FROM concurrency_limits cl
    WHERE cl.pattern = k.key
       OR (right(cl.pattern, 1) = '*' AND starts_with(k.key, left(cl.pattern, -1)))
    ORDER BY (cl.pattern = k.key) DESC, length(cl.pattern) DESC
    LIMIT 1
) AS l ON true;
COMMENT ON VIEW concurrency_keys IS
    'Concurrency keys with unfinished runs: limit, running, queued, suspended, at_limit.';

-- The stored W3C trace context of each run (runs.meta->'trace'), else its
-- parent's, else its root's: child runs carry the context of the run that
-- spawned them. Runs without one are left out. Primary-key lookups only.
CREATE OR REPLACE FUNCTION trace_contexts(p_ids uuid[])
RETURNS TABLE (run_id uuid, trace jsonb)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT r.id, coalesce(r.meta->'trace', p.meta->'trace', t.meta->'trace')
    FROM runs r
    LEFT JOIN runs p ON p.id = r.parent_run_id
    LEFT JOIN runs t ON t.id = r.root_run_id
    WHERE r.id = ANY (p_ids)
      AND coalesce(r.meta->'trace', p.meta->'trace', t.meta->'trace') IS NOT NULL;
$$;
