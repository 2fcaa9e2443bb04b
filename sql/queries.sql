-- The statements pgjournal's Python code runs, by name. {schema} is replaced
-- by the quoted schema identifier; every value is a bind parameter.
-- State changes are calls of the schema's functions (see migrations/0002).

-- name: schema_version
SELECT max(version) AS version FROM {schema}.migrations;

-- name: start_run
SELECT run_id, created FROM {schema}.start_run(
    %(id)s, %(workflow)s, %(queue)s, %(input)s::json, %(priority)s, %(delay)s,
    %(idempotency_key)s, %(max_attempts)s, %(max_recoveries)s, %(source)s, %(meta)s::jsonb,
    %(concurrency_key)s);

-- name: claim_runs
SELECT * FROM {schema}.claim_runs(%(worker)s, %(queues)s, %(limit)s, %(lease)s,
    %(workflows)s, %(expired)s);

-- name: go_hungry
SELECT * FROM {schema}.go_hungry(%(worker)s, %(queues)s, %(limit)s, %(lease)s,
    %(workflows)s, %(expired)s);

-- name: journal_step
SELECT {schema}.journal_step(
    %(run)s, %(epoch)s, %(position)s, %(name)s, %(occurrence)s, %(kind)s, %(status)s,
    %(output)s::json, %(error)s::jsonb, %(attempt)s, %(tries)s, %(started_at)s,
    %(chunks)s::json, %(chunk_start)s, %(turn)s, %(fingerprint)s, %(chunk_turns)s,
    %(calls_before)s, %(chunk_calls)s) AS lost;

-- name: append_chunks
SELECT {schema}.append_chunks(
    %(run)s, %(epoch)s, %(position)s, %(chunk_start)s, %(chunks)s::json,
    %(chunk_turns)s, %(chunk_calls)s) AS lost;

-- name: wait_signal
SELECT outcome, payload FROM {schema}.wait_signal(
    %(run)s, %(epoch)s, %(position)s, %(name)s, %(occurrence)s, %(timeout)s, %(attempt)s,
    %(turn)s, %(calls_before)s);

-- name: sleep_until
SELECT outcome, wake_at FROM {schema}.sleep_until(
    %(run)s, %(epoch)s, %(position)s, %(name)s, %(occurrence)s, %(seconds)s,
    %(wake_at)s, %(attempt)s, %(turn)s, %(calls_before)s);

-- name: complete_runs
SELECT run_id FROM {schema}.complete_runs(%(ids)s, %(epochs)s, %(outputs)s::json[]);

-- name: fail_run
SELECT {schema}.fail_run(%(run)s, %(epoch)s, %(error)s::jsonb, %(delay)s, %(terminal)s)
    AS status;

-- name: release_runs
SELECT {schema}.release_runs(%(ids)s, %(epochs)s) AS released;

-- name: heartbeat
SELECT lost_run_id, status, lease_epoch FROM {schema}.heartbeat(%(worker)s, %(ids)s, %(epochs)s, %(lease)s);

-- name: register_worker
SELECT {schema}.register_worker(%(id)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s,
    %(lease)s, %(workflows)s, %(workflow_queues)s::jsonb);

-- name: stop_worker
SELECT {schema}.stop_worker(%(id)s);

-- name: send_signal
SELECT {schema}.send_signal(%(run)s, %(name)s, %(payload)s::json, %(idempotency_key)s)
    AS signal_id;

-- name: cancel_run
SELECT {schema}.cancel_run(%(run)s, %(children)s) AS status;

-- name: retry_run
SELECT {schema}.retry_run(%(run)s) AS status;

-- name: fork_run
SELECT {schema}.fork_run(%(run)s, %(from_step)s, %(new)s) AS run_id;

-- name: request_result
SELECT status, output, error FROM {schema}.request_result(%(run)s);

-- name: set_queue
SELECT {schema}.set_queue(%(name)s, %(limit)s, %(paused)s);

-- name: get_run
SELECT * FROM {schema}.runs WHERE id = %(run)s;

-- Reads of one run's history name the partition key (runs.created_at, read
-- by primary key in the same statement): the executor then scans the run's
-- partition only, not one index per partition (migration 0011).

-- name: get_steps
SELECT * FROM {schema}.steps
WHERE run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s) AND run_id = %(run)s
ORDER BY position;

-- name: get_chunks
SELECT position, seq, chunk FROM {schema}.stream_chunks
WHERE run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s) AND run_id = %(run)s
ORDER BY position, seq;

-- name: get_signals
SELECT * FROM {schema}.signals WHERE run_id = %(run)s ORDER BY id;

-- name: get_events
SELECT * FROM {schema}.run_events
WHERE run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s) AND run_id = %(run)s
ORDER BY id;

-- name: list_runs
SELECT id, workflow, queue, status, priority, attempt, recoveries, error,
       created_at, updated_at, started_at, finished_at, parent_run_id
FROM {schema}.runs
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(parent)s::uuid IS NULL OR parent_run_id = %(parent)s)
ORDER BY created_at DESC
LIMIT %(limit)s;

-- name: journal_outline
SELECT turns, last_position, entries, bytes, patch_positions, patch_names
FROM {schema}.journal_outline(%(run)s);

-- name: journal_page
SELECT * FROM {schema}.journal_page(%(run)s, %(after)s, %(limit)s, %(max_bytes)s);

-- name: chunk_page
SELECT * FROM {schema}.chunk_page(%(run)s, %(position)s, %(after)s, %(limit)s, %(max_bytes)s);

-- name: note_run_event
SELECT {schema}.note_run_event(%(run)s, %(epoch)s, %(detail)s::jsonb);

-- name: spawn_runs
SELECT {schema}.spawn_runs(
    %(run)s, %(epoch)s, %(position)s, %(name)s, %(occurrence)s, %(attempt)s, %(turn)s,
    %(calls_before)s, %(fingerprint)s, %(ids)s, %(workflow)s, %(queue)s, %(inputs)s::json[],
    %(max_attempts)s, %(max_recoveries)s, %(timeout)s, %(concurrency_key)s) AS lost;

-- name: wait_children
SELECT outcome, results FROM {schema}.wait_children(
    %(run)s, %(epoch)s, %(position)s, %(name)s, %(occurrence)s, %(attempt)s, %(turn)s,
    %(calls_before)s, %(children)s, %(mode)s, %(cancel_rest)s, %(raise_failures)s);

-- name: set_concurrency_limit
SELECT {schema}.set_concurrency_limit(%(pattern)s, %(max_running)s);

-- name: set_rate_limit
SELECT {schema}.set_rate_limit(%(name)s, %(capacity)s, %(refill)s);

-- name: take_units
SELECT outcome, ready_at FROM {schema}.take_units(
    %(run)s, %(epoch)s, %(position)s, %(name)s, %(occurrence)s, %(bucket)s, %(units)s,
    %(attempt)s, %(turn)s, %(calls_before)s, %(again)s);

-- name: concurrency_keys
SELECT * FROM {schema}.concurrency_keys ORDER BY at_limit DESC, running DESC, key;

-- name: concurrency_limits
SELECT pattern, max_running, updated_at FROM {schema}.concurrency_limits ORDER BY pattern;

-- name: rate_limits
SELECT * FROM {schema}.rate_limits ORDER BY name;

-- name: start_runs
-- The ids arrive as one bytea (16 bytes each) and the inputs and keys as one
-- JSON array each (json_array_elements keeps each element's text exactly);
-- only the elements that did not create their own run are returned (item is
-- the 0-based index), so a batch without idempotency keys returns no rows.
SELECT s.ord - 1 AS item, s.run_id
FROM {schema}.start_runs(
    ARRAY(SELECT encode(substring(b.ids FROM i * 16 + 1 FOR 16), 'hex')::uuid
          FROM (SELECT %(ids)s::bytea AS ids) AS b,
               generate_series(0, length(b.ids) / 16 - 1) AS i
          ORDER BY i),
    %(workflow)s, %(queue)s,
    ARRAY(SELECT j.v FROM json_array_elements(%(inputs)s::json) WITH ORDINALITY AS j(v, n)
          ORDER BY j.n),
    %(priority)s, %(delay)s,
    CASE WHEN %(idempotency_keys)s::json IS NOT NULL THEN
        ARRAY(SELECT k.v FROM json_array_elements_text(%(idempotency_keys)s::json)
                              WITH ORDINALITY AS k(v, n)
              ORDER BY k.n) END,
    %(max_attempts)s, %(max_recoveries)s, %(source)s, %(meta)s::jsonb,
    CASE WHEN %(concurrency_keys)s::json IS NOT NULL THEN
        ARRAY(SELECT k.v FROM json_array_elements_text(%(concurrency_keys)s::json)
                              WITH ORDINALITY AS k(v, n)
              ORDER BY k.n) END
) WITH ORDINALITY AS s(run_id, created, ord)
WHERE NOT s.created;

-- -- schedules (migration 0010) ----------------------------------------------------

-- name: declare_schedules
SELECT {schema}.declare_schedules(%(defs)s::json);

-- name: claim_schedules
SELECT * FROM {schema}.claim_schedules(%(workflows)s, %(declared)s, %(limit)s);

-- name: fire_schedules
SELECT {schema}.fire_schedules(%(items)s::json) AS started;

-- name: schedules_next_due
SELECT next_due, db_now FROM {schema}.schedules_next_due(%(workflows)s, %(declared)s);

-- name: set_schedule
SELECT {schema}.set_schedule(
    %(name)s, %(cron)s, %(workflow)s, %(args)s::json, %(kwargs)s::json, %(timezone)s,
    %(queue)s, %(catchup)s, make_interval(secs => %(catchup_window)s), %(paused)s,
    %(max_attempts)s, %(max_recoveries)s) AS created;

-- name: pause_schedule
SELECT {schema}.pause_schedule(%(name)s);

-- name: resume_schedule
SELECT {schema}.resume_schedule(%(name)s);

-- name: delete_schedule
SELECT {schema}.delete_schedule(%(name)s);

-- name: trigger_schedule
SELECT {schema}.trigger_schedule(%(name)s, %(idempotency_key)s) AS run_id;

-- name: backfill_schedule
SELECT {schema}.backfill_schedule(%(name)s, %(start)s, %(end)s, %(slots)s::timestamptz[])
    AS started;

-- name: get_schedule
SELECT * FROM {schema}.schedule_status WHERE name = %(name)s;

-- name: list_schedules
SELECT * FROM {schema}.schedule_status ORDER BY name;

-- name: served_queues
-- Where live workers take runs of a workflow: the queue each live worker
-- registered it on (App.start of a client-only app, `pgjournal start`,
-- without a queue).
SELECT DISTINCT w.workflow_queues ->> %(workflow)s AS queue
FROM {schema}.worker_health w
WHERE w.state = 'alive' AND w.workflow_queues ? %(workflow)s;

-- name: trace_contexts
-- The stored trace context of claimed runs (their own, a parent's or the
-- root's), for tracing only: through a function, so the worker role, which
-- may not read runs, gets them too (migration 0016).
SELECT run_id, trace FROM {schema}.trace_contexts(%(ids)s::uuid[]);
