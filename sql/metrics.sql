-- The statements behind the database-wide gauges of `pgjournal metrics` and
-- `pgjournal.metrics.collect(app)`, by name, in the format of cli.sql:
-- {schema} is replaced by the quoted schema identifier; values are bind
-- parameters. One statement per name, each read through partial or small
-- indexes so a scrape costs the same however long the history grows (no
-- count over finished runs). bench/metrics_cost.py measures each one on a
-- schema holding 1,000,000 finished runs; docs/observability.md has the numbers.

-- name: queues
-- Per queue, the queue_depth view (docs/dba.md): unfinished runs only, through
-- runs_unfinished_status; the oldest claimable run's age is the queue's lag.
SELECT queue, queued_due, delayed, running, expired_leases, suspended, claimable,
       coalesce(extract(epoch FROM oldest_due_age), 0)::float8 AS oldest_due_seconds,
       concurrency_limit, paused
FROM {schema}.queue_depth
ORDER BY queue;

-- name: recent
-- Status transitions in the last %(window)s seconds, per queue, from the
-- event log through its index on `at` (run_events_at): runs that ended, by
-- their final status, and lease takeovers (a running run claimed again with a
-- new epoch: a crash recovery, or an interruption after a server restart).
-- Reads only the window's events, and each one's run by primary key (a
-- correlated lookup, so the plan never turns into a scan of runs).
SELECT e.queue, e.kind, count(*) AS n
FROM (
    SELECT (SELECT r.queue FROM {schema}.runs r WHERE r.id = ev.run_id) AS queue,
           CASE WHEN ev.to_status = 'running' THEN 'takeover' ELSE ev.to_status END AS kind
    FROM {schema}.run_events ev
    WHERE ev.at > now() - make_interval(secs => %(window)s)
      AND (ev.to_status IN ('completed', 'failed', 'cancelled', 'dead')
           AND ev.from_status IS DISTINCT FROM ev.to_status
           OR ev.from_status = 'running' AND ev.to_status = 'running'
              AND ev.detail IS NULL)
) AS e
WHERE e.queue IS NOT NULL
GROUP BY e.queue, e.kind
ORDER BY e.queue, e.kind;

-- name: workers
-- Registered workers by state, their slots (concurrency) and the runs they
-- hold: the worker_health view (the workers table, and running runs through
-- runs_running / runs_unfinished_status). Stopped workers are forgotten after a day.
SELECT state, count(*) AS workers,
       coalesce(sum(concurrency), 0)::bigint AS slots,
       coalesce(sum(runs_held), 0)::bigint AS busy
FROM {schema}.worker_health
GROUP BY state
ORDER BY state;

-- name: concurrency_keys
-- Concurrency keys with unfinished runs, how many of them are at their limit,
-- and the queued runs that carry a key: what the concurrency_keys view says,
-- counted, not listed (keys are often tenants, too many for labels). One pass
-- over the unfinished runs (runs_unfinished_status) and one limit lookup per
-- key, where the view counts each key's runs apart. The lookup is the rule of
-- key_limit() (exact key, else the longest prefix pattern), written out as the
-- view writes it: the reader role that scrapes may call no function.
WITH k AS (
    SELECT r.concurrency_key AS key,
           count(*) FILTER (WHERE r.status = 'running'
                                   AND coalesce(r.lease_until, r.due_at) > now()) AS running,
           count(*) FILTER (WHERE r.status = 'queued') AS queued
    FROM {schema}.runs r
    WHERE r.concurrency_key IS NOT NULL AND r.status IN ('queued', 'running', 'suspended')
    GROUP BY r.concurrency_key
)
SELECT count(*) AS keys,
       count(*) FILTER (WHERE k.running >= l.max_running) AS at_limit,
       coalesce(sum(k.queued), 0)::bigint AS queued_behind
FROM k
LEFT JOIN LATERAL (
    SELECT cl.max_running FROM {schema}.concurrency_limits cl
    WHERE cl.pattern = k.key
       OR (right(cl.pattern, 1) = '*' AND starts_with(k.key, left(cl.pattern, -1)))
    ORDER BY (cl.pattern = k.key) DESC, length(cl.pattern) DESC
    LIMIT 1
) AS l ON true;

-- name: rate_buckets
-- Every rate bucket (a small table): capacity and units available now.
SELECT name, capacity, available
FROM {schema}.rate_limits
ORDER BY name;

-- name: queue_lag
-- Per queue, the lag of resumptions apart from the lag of new runs (the
-- queue_depth view, migration 0020): how many claimable runs of each kind, and
-- how long the oldest of each has been due. A claim takes resumptions first
-- at equal priority, so under overload new runs absorb the wait.
SELECT queue, resumptions_due, new_due,
       coalesce(extract(epoch FROM oldest_resumption_age), 0)::float8 AS resumption_seconds,
       coalesce(extract(epoch FROM oldest_new_age), 0)::float8 AS new_seconds
FROM {schema}.queue_depth
ORDER BY queue;
