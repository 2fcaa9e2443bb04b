-- The statements of pgjournal.adapters, by name. {schema} is replaced by the
-- quoted schema identifier; every value is a bind parameter. Writes are calls
-- of the adapter functions of migrations/0004_adapters.sql.

-- name: write
SELECT {schema}.adapter_write(
    %(run)s, %(source)s, %(workflow)s, %(run_meta)s::jsonb, %(position)s, %(first)s,
    %(replace)s, %(name)s, %(kind)s, %(status)s, %(output)s::json, %(error)s::jsonb,
    %(meta)s::jsonb, %(started_at)s, %(finished_at)s, %(chunks)s::json) AS position;

-- name: put_named
SELECT {schema}.adapter_put_named(
    %(run)s, %(source)s, %(workflow)s, %(run_meta)s::jsonb, %(name)s, %(kind)s,
    %(output)s::json, %(chunks)s::json) AS position;

-- name: set_status
SELECT {schema}.adapter_set_status(
    %(run)s, %(source)s, %(workflow)s, %(run_meta)s::jsonb, %(status)s, %(error)s::jsonb);

-- name: save_run
SELECT {schema}.adapter_save_run(
    %(run)s, %(source)s, %(workflow)s, %(status)s, %(input)s::json, %(output)s::json,
    %(error)s::jsonb, %(meta)s::jsonb, %(created_at)s, %(updated_at)s);

-- name: set_output
SELECT {schema}.adapter_set_output(
    %(run)s, %(source)s, %(workflow)s, %(run_meta)s::jsonb, %(output)s::json,
    %(meta_patch)s::jsonb);

-- name: send_signal
SELECT {schema}.adapter_send_signal(
    %(run)s, %(source)s, %(workflow)s, %(run_meta)s::jsonb, %(name)s, %(payload)s::json)
    AS signal_id;

-- name: take_signal
SELECT found, payload FROM {schema}.adapter_take_signal(
    %(run)s, %(source)s, %(workflow)s, %(run_meta)s::jsonb, %(name)s, %(index)s);

-- name: compact
SELECT {schema}.adapter_compact(%(run)s, %(source)s) AS removed;

-- name: delete_run
DELETE FROM {schema}.runs WHERE id = %(run)s AND source = ANY(%(sources)s::text[]);

-- Reads of one run's rows name the partition key (runs.created_at) too: the
-- executor then scans that run's partition only (migration 0011).

-- name: get_named
SELECT s.output, s.created_at, s.updated_at, s.position FROM {schema}.steps s
WHERE s.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s)
  AND s.run_id = %(run)s AND s.name = %(name)s AND s.kind = %(kind)s
  AND s.status = 'completed'
ORDER BY s.position LIMIT 1;

-- name: get_chunks
SELECT k.chunk FROM {schema}.stream_chunks k
WHERE k.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s)
  AND k.run_id = %(run)s AND k.position = %(position)s ORDER BY k.seq;

-- name: get_run
SELECT r.id, r.workflow, r.status, r.input, r.output, r.error, r.source, r.meta,
       r.created_at, r.updated_at
FROM {schema}.runs r WHERE r.id = %(run)s AND r.source = ANY(%(sources)s::text[]);

-- name: list_runs
SELECT r.id, r.workflow, r.status, r.input, r.output, r.error, r.source, r.meta,
       r.created_at, r.updated_at
FROM {schema}.runs r
WHERE r.source = ANY(%(sources)s::text[])
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
  AND (%(workflow)s::text IS NULL OR r.workflow = %(workflow)s)
  AND (NOT %(with_output)s OR r.output IS NOT NULL)
ORDER BY CASE WHEN %(by_updated)s THEN r.updated_at ELSE r.created_at END DESC, r.id
LIMIT %(limit)s;

-- name: entries
SELECT s.position, s.name, s.status, s.output, s.error, s.meta, s.started_at
FROM {schema}.steps s
WHERE s.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s)
  AND s.run_id = %(run)s AND s.position >= %(from_position)s
ORDER BY s.position;

-- name: last_position
SELECT max(s.position) AS last FROM {schema}.steps s
WHERE s.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s) AND s.run_id = %(run)s;

-- name: max_iteration
SELECT max((s.meta ->> 'iteration')::bigint) AS iteration FROM {schema}.steps s
WHERE s.run_created_at = (SELECT r.created_at FROM {schema}.runs r WHERE r.id = %(run)s) AND s.run_id = %(run)s;
