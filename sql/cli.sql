-- The statements the `pgjournal` CLI and `pgjournal demo` run, by name, in the
-- format of queries.sql: {schema} is replaced by the quoted schema identifier;
-- every value is a bind parameter. State changes still go through the
-- schema's functions (via the store); these are reads, retention and the
-- demo's own bookkeeping.

-- name: queues
-- The queue_depth view (docs/dba.md), one row per queue with settings or
-- unfinished runs.
SELECT * FROM {schema}.queue_depth ORDER BY queue;

-- name: queue_settings
SELECT name, concurrency_limit, paused FROM {schema}.queues WHERE name = %(name)s;

-- name: workers
-- The worker_health view (docs/dba.md). Without `all`: live ones, i.e. not
-- stopped and heard from in the last hour.
SELECT * FROM {schema}.worker_health
WHERE %(all)s OR (stopped_at IS NULL AND heartbeat_at > now() - interval '1 hour')
ORDER BY started_at DESC, id;

-- name: prune_count
-- The runs a prune would delete: ended, old enough, and needed by no run
-- (run_pinned, 0017: no ancestor, and no fork of the run or of an ancestor,
-- that is not prunable itself). Only runs in a tree or with forks are asked.
SELECT count(*) AS n FROM {schema}.runs r
WHERE r.status = ANY (%(statuses)s::text[])
  AND r.status IN ('completed', 'failed', 'cancelled', 'dead')
  AND r.created_at < now() - make_interval(secs => %(age)s)
  AND r.finished_at < now() - make_interval(secs => %(age)s)
  AND coalesce((SELECT p.status IN ('completed', 'failed', 'cancelled', 'dead')
                       AND p.status = ANY (%(statuses)s::text[])
                       AND p.finished_at < now() - make_interval(secs => %(age)s)
                FROM {schema}.runs p WHERE p.id = r.parent_run_id), true)
  AND NOT (coalesce(r.parent_run_id IS NOT NULL
                    OR (SELECT true FROM {schema}.runs f WHERE f.forked_from = r.id LIMIT 1),
                    false)
           AND {schema}.run_pinned(r.id, now() - make_interval(secs => %(age)s),
                                   %(statuses)s::text[], false));

-- name: prune_cutoff
-- The one cutoff a whole prune uses: runs must have ended before it.
SELECT now() - make_interval(secs => %(age)s) AS cutoff;

-- name: prune_partitions
-- History partitions prune can drop whole (migration 0011): every run created
-- in their range ended before the cutoff with one of the pruned statuses.
SELECT lower_bound, upper_bound, partitions, runs, bytes
FROM {schema}.prunable_partitions(%(cutoff)s, %(statuses)s::text[]);

-- name: prune_partition_batch
-- One batch of the runs of a droppable range; their journal, chunks and
-- events stay for the partition drop (prune_history_batch, 0011).
SELECT {schema}.prune_history_batch(%(lo)s, %(hi)s, %(cutoff)s, %(statuses)s::text[],
                                    %(batch)s) AS n;

-- name: prune_drop_partitions
-- Detach and drop the range's partitions once no run of it is left (NULL:
-- some run is left, e.g. it was retried meanwhile; nothing was dropped).
SELECT {schema}.drop_history_range(%(lo)s, %(hi)s, %(lock_timeout_ms)s) AS dropped;

-- name: maintain
-- Create-ahead of the history partitions (migration 0011).
SELECT table_name, partition_name, lower_bound, upper_bound
FROM {schema}.maintain(%(ahead)s, %(moves)s);

-- name: prune_batch
-- One batch of retention. Only ended runs (never queued, running or
-- suspended); rows a concurrent transaction holds (e.g. a retry) are skipped
-- and the status is re-checked under the row lock. created_at <= finished_at,
-- so the created_at bound lets the runs_created index find the old rows.
-- A run another run still needs is kept: run_pinned (0017) locks the
-- ancestors and forks that look prunable, so a retry or fork of one of them
-- under way keeps the run too. Steps, chunks and signals go with their run,
-- events by the trigger runs_forget_events (0007, 0011).
WITH doomed AS (
    SELECT r.id FROM {schema}.runs r
    WHERE r.status = ANY (%(statuses)s::text[])
      AND r.status IN ('completed', 'failed', 'cancelled', 'dead')
      AND r.created_at < now() - make_interval(secs => %(age)s)
      AND r.finished_at < now() - make_interval(secs => %(age)s)
      -- (a parent not prunable: one lookup; a scalar subquery for the forks,
      -- so runs_forked_from is probed per run, never all of runs hashed)
      AND coalesce((SELECT p.status IN ('completed', 'failed', 'cancelled', 'dead')
                           AND p.status = ANY (%(statuses)s::text[])
                           AND p.finished_at < now() - make_interval(secs => %(age)s)
                    FROM {schema}.runs p WHERE p.id = r.parent_run_id), true)
      AND NOT (coalesce(r.parent_run_id IS NOT NULL
                        OR (SELECT true FROM {schema}.runs f WHERE f.forked_from = r.id
                            LIMIT 1),
                        false)
               AND {schema}.run_pinned(r.id, now() - make_interval(secs => %(age)s),
                                       %(statuses)s::text[], true))
    ORDER BY r.created_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.runs r USING doomed
WHERE r.id = doomed.id AND r.status IN ('completed', 'failed', 'cancelled', 'dead')
RETURNING r.id;

-- name: demo_schema_state
-- Whether the demo may reset this schema: it must be absent, empty, or a
-- schema an earlier demo made (it has the demo_effects table).
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s) AS present,
       EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %(schema)s AND c.relname = 'demo_effects') AS is_demo,
       (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm')) AS relations;

-- name: demo_drop_schema
DROP SCHEMA IF EXISTS {schema} CASCADE;

-- name: demo_setup
-- The demo's own side-effect log: one row each time a step function of the
-- demo really ran to the end (written by the step, not by pgjournal).
CREATE TABLE IF NOT EXISTS {schema}.demo_effects (
    id     bigserial PRIMARY KEY,
    run_id uuid NOT NULL,
    step   text NOT NULL,
    pid    integer NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);

-- name: demo_effect
INSERT INTO {schema}.demo_effects (run_id, step, pid) VALUES (%(run)s, %(step)s, %(pid)s);

-- name: demo_progress
SELECT status, wait_signal, count(*) AS n, sum(recoveries)::int AS recoveries,
       count(*) FILTER (WHERE recoveries > 0) AS recovered
FROM {schema}.runs WHERE id = ANY (%(runs)s::uuid[])
GROUP BY status, wait_signal;

-- name: demo_awaiting_approval
SELECT id FROM {schema}.runs
WHERE id = ANY (%(runs)s::uuid[]) AND status = 'suspended' AND wait_signal = 'approval';

-- name: demo_worker_state
-- What a worker process holds right now: its running runs, and whether any
-- of its step functions finished its side effect without the journal entry
-- having been committed yet (the instant in which no journal can help).
SELECT w.id AS worker_id,
       (SELECT count(*) FROM {schema}.runs r
        WHERE r.worker_id = w.id AND r.status = 'running') AS held,
       (SELECT count(*) FROM {schema}.runs r
        WHERE r.worker_id = w.id AND r.status = 'running'
          AND EXISTS (SELECT 1 FROM {schema}.steps s WHERE s.run_id = r.id)) AS held_with_journal,
       (SELECT count(*) FROM {schema}.demo_effects e
        JOIN {schema}.runs r ON r.id = e.run_id AND r.worker_id = w.id
        WHERE e.pid = w.pid
          AND NOT EXISTS (SELECT 1 FROM {schema}.steps s
                          WHERE s.run_id = e.run_id AND s.name = e.step
                            AND s.status = 'completed')) AS unjournaled_effects
FROM {schema}.workers w
WHERE w.pid = %(pid)s AND w.stopped_at IS NULL
ORDER BY w.started_at DESC
LIMIT 1;

-- name: demo_check
-- No step executed twice: every completed step or stream step in the journal
-- of these runs, against the side effects the step functions recorded.
WITH journal AS (
    SELECT run_id, name FROM {schema}.steps
    WHERE run_id = ANY (%(runs)s::uuid[]) AND kind IN ('step', 'stream')
      AND status = 'completed'
), executions AS (
    SELECT run_id, step AS name, count(*) AS n FROM {schema}.demo_effects
    WHERE run_id = ANY (%(runs)s::uuid[])
    GROUP BY run_id, step
)
SELECT (SELECT count(*) FROM journal) AS steps,
       (SELECT coalesce(sum(n), 0) FROM executions)::bigint AS executions,
       (SELECT count(*) FROM executions WHERE n > 1) AS repeated,
       (SELECT count(*) FROM journal j
        LEFT JOIN executions e USING (run_id, name) WHERE e.n IS NULL) AS unexecuted;

-- name: demo_repeated
-- Steps whose side effect was recorded more than once, and by which processes.
SELECT run_id, step, count(*) AS n, array_agg(pid ORDER BY id) AS pids
FROM {schema}.demo_effects
WHERE run_id = ANY (%(runs)s::uuid[])
GROUP BY run_id, step
HAVING count(*) > 1
ORDER BY run_id, step;

-- name: demo_summary
SELECT count(*) AS runs,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE recoveries > 0) AS recovered,
       extract(epoch FROM percentile_cont(0.5) WITHIN GROUP
               (ORDER BY finished_at - created_at))::float8 AS median_seconds
FROM {schema}.runs WHERE id = ANY (%(runs)s::uuid[]);

-- name: demo_journal_kinds
SELECT kind, count(*) AS n FROM {schema}.steps
WHERE run_id = ANY (%(runs)s::uuid[]) GROUP BY kind;

-- name: demo_steps_by_worker
-- Which worker process journaled each step: the step's lease epoch names the
-- claim it was written under, and the claim's event names the worker.
SELECT w.pid, w.host, count(*) AS steps,
       count(DISTINCT s.run_id) AS runs
FROM {schema}.steps s
JOIN {schema}.run_events e
  ON e.run_id = s.run_id AND e.lease_epoch = s.lease_epoch AND e.to_status = 'running'
JOIN {schema}.workers w ON w.id = e.worker_id
WHERE s.run_id = ANY (%(runs)s::uuid[])
GROUP BY w.pid, w.host
ORDER BY w.pid;

-- name: demo_registered
SELECT DISTINCT pid FROM {schema}.workers
WHERE pid = ANY (%(pids)s::int[]) AND stopped_at IS NULL;

-- The SQL `pgjournal demo` prints for a DBA ({run}: a run the kill recovered).

-- name: dba_runs
SELECT id, workflow, status, attempt, recoveries, worker_pid, steps_completed, run_time
FROM {schema}.run_overview
ORDER BY created_at DESC;

-- name: dba_timeline
SELECT position, name, kind, status, tries, duration
FROM {schema}.step_timings
WHERE run_id = {run}
ORDER BY position;

-- name: dba_events
SELECT e.at, e.from_status, e.to_status, e.lease_epoch, w.pid AS worker_pid
FROM {schema}.run_events e
LEFT JOIN {schema}.workers w ON w.id = e.worker_id
WHERE e.run_id = {run}
ORDER BY e.id;

-- name: dba_no_step_twice
SELECT s.run_id, s.name, count(x.id) AS executions
FROM {schema}.steps s
LEFT JOIN {schema}.demo_effects x ON x.run_id = s.run_id AND x.step = s.name
WHERE s.kind IN ('step', 'stream') AND s.status = 'completed'
GROUP BY s.run_id, s.name
HAVING count(x.id) <> 1;

-- name: result_timeout_state
-- Why a result() wait timed out: the run's status and queue, and how many live
-- workers (state 'alive' in worker_health) serve that queue and whether it is paused.
SELECT r.status, r.workflow, r.queue,
       (SELECT count(*) FROM {schema}.worker_health w
        WHERE w.state = 'alive' AND r.queue = ANY (w.queues)) AS live_workers,
       coalesce((SELECT q.paused FROM {schema}.queues q WHERE q.name = r.queue), false)
           AS paused
FROM {schema}.runs r WHERE r.id = %(run)s;

-- name: run_by_original_id
-- Adapter runs keep the adapter's own id in meta.original_id (pgjournal show order-42).
SELECT id, source FROM {schema}.runs
WHERE meta->>'original_id' = %(original)s
ORDER BY created_at DESC LIMIT 5;

-- name: runs_by_prefix
-- Runs whose id starts with a prefix (the dashboard shows 8 characters): a
-- range on the primary key, [prefix000..., prefixfff...].
SELECT id FROM {schema}.runs
WHERE id BETWEEN %(lo)s::uuid AND %(hi)s::uuid
ORDER BY id LIMIT 6;

-- name: demo_lock
-- One demo per schema at a time: a session advisory lock held while the demo runs.
SELECT pg_try_advisory_lock(hashtext('pgjournal demo ' || %(schema)s)) AS got;

-- name: queue_known
-- Has this schema ever seen the queue: settings, runs, or a live worker serving
-- it? `pgjournal queues pause typo` must not create a queue (only with --create).
SELECT EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(name)s)
    OR EXISTS (SELECT 1 FROM {schema}.runs WHERE queue = %(name)s)
    OR EXISTS (SELECT 1 FROM {schema}.workers
               WHERE %(name)s = ANY (queues) AND stopped_at IS NULL) AS known;

-- name: live_workflows
-- Every workflow some live worker serves (for "did you mean").
SELECT DISTINCT jsonb_object_keys(w.workflow_queues) AS workflow
FROM {schema}.worker_health w
WHERE w.state = 'alive' AND w.workflow_queues IS NOT NULL;

-- name: unserved
-- Queued runs that no live worker can take (unknown workflow, or no worker on
-- the queue): the unserved_runs view (docs/dba.md).
SELECT * FROM {schema}.unserved_runs ORDER BY queue, workflow;

-- name: children_of
-- The first children of a run, in spawn order, and how many there are by status.
SELECT id, workflow, status, created_at, started_at, finished_at, error, parent_position
FROM {schema}.runs WHERE parent_run_id = %(run)s
ORDER BY parent_position, created_at, id
LIMIT %(limit)s;

-- name: children_counts
SELECT status, count(*) AS n FROM {schema}.runs WHERE parent_run_id = %(run)s
GROUP BY status ORDER BY status;

-- name: schema_grantees
-- Roles other than the schema's owner with USAGE on it: those the roles script
-- (sql/roles.sql) set up, or a DBA's own. A migration that replaces functions
-- drops their SECURITY DEFINER and EXECUTE grants, so `pgjournal migrate`
-- names these roles and asks for the script to be run again.
SELECT r.rolname AS role
FROM pg_namespace n
CROSS JOIN LATERAL aclexplode(n.nspacl) AS a
JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = %(schema)s AND a.privilege_type = 'USAGE' AND a.grantee <> n.nspowner
ORDER BY r.rolname;
