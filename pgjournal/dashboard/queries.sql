-- The statements of the dashboard, by name, in the format of queries.sql:
-- {schema} is replaced by the quoted schema identifier; every value is a bind
-- parameter. Reads go to the reader pool (--reader-dsn); the actions call the
-- schema's own functions (retry_run, cancel_run, send_signal), exactly as
-- App.retry/cancel/signal do, and note who acted in run_events in the same
-- transaction.
--
-- Every read of a run's history (steps, stream_chunks, run_events) names the
-- partition key, run_created_at = runs.created_at of the run (from the runs
-- row the statement reads anyway, or one primary-key probe of runs): the
-- executor then scans that run's partition only, however many weeks of
-- history partitions there are (tests/test_partitions.py checks each read).

-- name: runs_page
-- One page of the runs list, newest first, keyset-paginated by (created_at, id).
SELECT id, workflow, queue, status, attempt, max_attempts, recoveries, error,
       concurrency_key, created_at, updated_at, started_at, finished_at, parent_run_id,
       (SELECT s.position FROM {schema}.steps s
        WHERE s.run_created_at = r.created_at AND s.run_id = r.id
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
-- step of the steps primary key in the run's own partition), so a run page
-- also sees new steps.
SELECT r.id, r.status, r.attempt, r.lease_epoch, r.updated_at, r.finished_at,
       (SELECT s.position FROM {schema}.steps s
        WHERE s.run_created_at = r.created_at AND s.run_id = r.id
        ORDER BY s.position DESC LIMIT 1) AS last_position
FROM {schema}.runs r WHERE r.id = ANY (%(ids)s::uuid[]);

-- name: newest
SELECT max(created_at) AS newest FROM {schema}.runs;

-- name: run
-- The run, and the last position of its journal (as watch reads it, so the
-- page's fingerprint matches the live poll's).
SELECT r.*,
       (SELECT s.position FROM {schema}.steps s
        WHERE s.run_created_at = r.created_at AND s.run_id = r.id
        ORDER BY s.position DESC LIMIT 1) AS last_position
FROM {schema}.runs r WHERE r.id = %(run)s;

-- name: steps_page
-- One page of a run's timeline, keyset-paginated by position: the rows after
-- %(after)s, without the values (their first 200 characters and size only;
-- the page loads a value when it is opened: step_value). A long agent loop's
-- page so weighs the same at 50 steps as at 20,000.
SELECT s.position, s.name, s.kind, s.status, s.attempt, s.tries, s.started_at,
       s.finished_at,
       left(s.output::text, 200) AS output_head,
       octet_length(s.output::text) AS output_bytes,
       s.error ->> 'type' AS error_type, left(s.error ->> 'message', 200) AS error_message,
       CASE WHEN s.kind = 'stream' THEN
           (SELECT count(*) FROM {schema}.stream_chunks k
            WHERE k.run_created_at = s.run_created_at AND k.run_id = s.run_id
              AND k.position = s.position) END AS chunks
FROM {schema}.steps s
WHERE s.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s)
  AND s.run_id = %(run)s AND s.position > %(after)s
ORDER BY s.position
LIMIT %(limit)s;

-- name: step_value
-- The whole value of one step (its output, or its error), on demand.
SELECT s.position, s.status, s.output, s.error FROM {schema}.steps s
WHERE s.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s)
  AND s.run_id = %(run)s AND s.position = %(position)s;

-- name: signals
-- The latest %(limit)s signals (newest first; the page shows them in order).
SELECT * FROM {schema}.signals WHERE run_id = %(run)s ORDER BY id DESC LIMIT %(limit)s;

-- name: events
-- The latest %(limit)s events (newest first; the page shows them in order),
-- with the worker that held the run (host and pid) where it is known.
SELECT e.*, w.host AS worker_host, w.pid AS worker_pid
FROM {schema}.run_events e
LEFT JOIN {schema}.workers w ON w.id = e.worker_id
WHERE e.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s) AND e.run_id = %(run)s
ORDER BY e.id DESC
LIMIT %(limit)s;

-- name: children
SELECT id, workflow, status, created_at, started_at, finished_at, error, parent_position,
       updated_at,
       (SELECT s.position FROM {schema}.steps s
        WHERE s.run_created_at = r.created_at AND s.run_id = r.id
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
-- run_created_at: the partition key of the history (migration 0011).
INSERT INTO {schema}.run_events (run_created_at, run_id, from_status, to_status, attempt,
                                 lease_epoch, worker_id, detail)
SELECT r.created_at, r.id, r.status, r.status, r.attempt, r.lease_epoch, NULL,
       %(detail)s::jsonb
FROM {schema}.runs r WHERE r.id = %(run)s;
