-- The statements of the dashboard, by name, in the format of queries.sql:
-- {schema} is replaced by the quoted schema identifier; every value is a bind
-- parameter. Reads go to the reader pool (--reader-dsn); the actions call the
-- schema's own functions (retry_run, cancel_run, send_signal), exactly as
-- App.retry/cancel/signal do, and note who acted in run_events in the same
-- transaction.

-- name: runs_page
-- One page of the runs list, newest first, keyset-paginated by (created_at, id).
SELECT id, workflow, queue, status, attempt, max_attempts, recoveries, error,
       concurrency_key, created_at, updated_at, started_at, finished_at, parent_run_id,
       (SELECT s.position FROM {schema}.steps s WHERE s.run_id = r.id
        ORDER BY s.position DESC LIMIT 1) AS last_position
FROM {schema}.runs r
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(key)s::text IS NULL OR concurrency_key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
  AND (%(cursor_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: newer_exists
-- Has a run matching the filters been created after the newest one shown?
SELECT EXISTS (
    SELECT 1 FROM {schema}.runs
    WHERE created_at > %(top)s
      AND (%(status)s::text IS NULL OR status = %(status)s)
      AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
      AND (%(key)s::text IS NULL OR concurrency_key = %(key)s)
) AS newer;

-- name: bulk_ids
-- The runs a bulk action applies to: the filters, in the statuses the action
-- can change, oldest first, at most %(limit)s.
SELECT id FROM {schema}.runs
WHERE status = ANY (%(statuses)s::text[])
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(key)s::text IS NULL OR concurrency_key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
ORDER BY created_at, id
LIMIT %(limit)s;

-- name: filter_choices
-- Values offered in the filter form's lists (from unfinished runs, settings
-- and live workers, so it stays cheap however long the history is).
SELECT 'queue' AS kind, queue AS value FROM {schema}.queue_depth
UNION
SELECT 'workflow', jsonb_object_keys(w.workflow_queues) FROM {schema}.worker_health w
WHERE w.state = 'alive' AND w.workflow_queues IS NOT NULL
ORDER BY 1, 2;

-- name: watch
-- The live poll: what changed about the runs some open page shows.
-- Primary-key lookups, plus the last journal position of each (one backward
-- step of the steps primary key), so a run page also sees new steps.
SELECT r.id, r.status, r.attempt, r.lease_epoch, r.updated_at, r.finished_at,
       (SELECT s.position FROM {schema}.steps s WHERE s.run_id = r.id
        ORDER BY s.position DESC LIMIT 1) AS last_position
FROM {schema}.runs r WHERE r.id = ANY (%(ids)s::uuid[]);

-- name: newest
SELECT max(created_at) AS newest FROM {schema}.runs;

-- name: run
SELECT * FROM {schema}.runs WHERE id = %(run)s;

-- name: steps
SELECT * FROM {schema}.steps WHERE run_id = %(run)s ORDER BY position;

-- name: chunk_counts
SELECT position, count(*) AS n FROM {schema}.stream_chunks
WHERE run_id = %(run)s GROUP BY position;

-- name: signals
SELECT * FROM {schema}.signals WHERE run_id = %(run)s ORDER BY id;

-- name: events
-- Events with the worker that held the run (host and pid) where it is known.
SELECT e.*, w.host AS worker_host, w.pid AS worker_pid
FROM {schema}.run_events e
LEFT JOIN {schema}.workers w ON w.id = e.worker_id
WHERE e.run_id = %(run)s ORDER BY e.id;

-- name: children
SELECT id, workflow, status, created_at, started_at, finished_at, error, parent_position,
       updated_at,
       (SELECT s.position FROM {schema}.steps s WHERE s.run_id = r.id
        ORDER BY s.position DESC LIMIT 1) AS last_position
FROM {schema}.runs r WHERE parent_run_id = %(run)s
ORDER BY parent_position, created_at, id
LIMIT %(limit)s;

-- name: children_counts
SELECT status, count(*) AS n FROM {schema}.runs WHERE parent_run_id = %(run)s
GROUP BY status ORDER BY status;

-- name: queues
SELECT * FROM {schema}.queue_depth ORDER BY queue;

-- name: workers
-- Live workers, and the ones that stopped or went silent in the last day.
SELECT * FROM {schema}.worker_health
WHERE stopped_at IS NULL OR heartbeat_at > now() - interval '1 day'
ORDER BY (state = 'alive') DESC, started_at DESC, id
LIMIT 500;

-- name: concurrency_keys
SELECT * FROM {schema}.concurrency_keys ORDER BY key;

-- name: rate_limits
SELECT * FROM {schema}.rate_limits ORDER BY name;

-- name: schedules
SELECT * FROM {schema}.schedule_status ORDER BY name;

-- name: retry
SELECT {schema}.retry_run(%(run)s) AS status;

-- name: cancel
SELECT {schema}.cancel_run(%(run)s, %(children)s) AS status;

-- name: signal
SELECT {schema}.send_signal(%(run)s, %(name)s, %(payload)s::json, NULL) AS signal_id;

-- name: note_action
-- Who did what from the dashboard: an event without a status change (from =
-- to = the status after the action), like note_run_event, written in the
-- action's own transaction.
-- run_created_at: the partition key of the history (migration 0013).
INSERT INTO {schema}.run_events (run_created_at, run_id, from_status, to_status, attempt,
                                 lease_epoch, worker_id, detail)
SELECT r.created_at, r.id, r.status, r.status, r.attempt, r.lease_epoch, NULL,
       %(detail)s::jsonb
FROM {schema}.runs r WHERE r.id = %(run)s;
