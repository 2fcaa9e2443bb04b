-- pgjournal schema, part 3: read-only views for operators and DBAs.
--
-- Every view is plain SQL over the tables of part 1, so a DBA can read them
-- with SELECT and nothing else (docs/dba.md documents each column). Times are
-- the database clock (now() = start of the reading transaction).

-- One row per run: where it stands, how long it took, who holds it, what it
-- waits for.
CREATE VIEW run_overview AS
SELECT
    r.id,
    r.workflow,
    r.queue,
    r.status,
    r.priority,
    r.attempt,
    r.max_attempts,
    r.recoveries,
    r.created_at,
    r.started_at,
    r.finished_at,
    r.started_at - r.created_at AS queue_wait,
    coalesce(r.finished_at, now()) - r.started_at AS run_time,
    CASE WHEN r.status = 'running' THEN
        CASE WHEN r.due_at > now() THEN 'held' ELSE 'expired' END
    END AS lease_state,
    CASE WHEN r.status = 'running' THEN r.due_at END AS lease_expires_at,
    r.lease_epoch,
    r.worker_id,
    w.host AS worker_host,
    w.pid AS worker_pid,
    CASE WHEN r.status = 'suspended' THEN r.wait_signal END AS waiting_for_signal,
    CASE WHEN r.status IN ('queued', 'suspended') THEN r.due_at END AS next_due_at,
    coalesce(s.completed, 0) AS steps_completed,
    coalesce(s.failed, 0) AS steps_failed,
    coalesce(g.pending, 0) AS signals_pending,
    r.error ->> 'type' AS error_type,
    r.error ->> 'message' AS error_message,
    r.source
FROM runs r
LEFT JOIN workers w ON w.id = r.worker_id
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE st.status = 'completed') AS completed,
           count(*) FILTER (WHERE st.status = 'failed') AS failed
    FROM steps st WHERE st.run_id = r.id
) s ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS pending
    FROM signals sg WHERE sg.run_id = r.id AND sg.consumed_at IS NULL
) g ON true;
COMMENT ON VIEW run_overview IS
    'One row per run: status, attempts, recoveries, durations, lease state, awaited signal.';

-- One row per journal entry, with its duration.
CREATE VIEW step_timings AS
SELECT
    s.run_id,
    r.workflow,
    r.queue,
    s.position,
    s.name,
    s.occurrence,
    s.kind,
    s.status,
    s.attempt,
    s.tries,
    s.started_at,
    s.finished_at,
    s.finished_at - s.started_at AS duration,
    (extract(epoch FROM s.finished_at - s.started_at) * 1000)::double precision AS duration_ms,
    s.error ->> 'type' AS error_type,
    s.error ->> 'message' AS error_message
FROM steps s
JOIN runs r ON r.id = s.run_id;
COMMENT ON VIEW step_timings IS
    'One row per journal entry (step call) with its duration, tries and error.';

-- One row per queue that has settings or unfinished runs.
CREATE VIEW queue_depth AS
WITH live AS (
    SELECT
        r.queue,
        count(*) FILTER (WHERE r.status = 'queued' AND r.due_at <= now()) AS queued_due,
        count(*) FILTER (WHERE r.status = 'queued' AND r.due_at > now()) AS delayed,
        count(*) FILTER (WHERE r.status = 'running') AS running,
        count(*) FILTER (WHERE r.status = 'running' AND r.due_at <= now()) AS expired_leases,
        count(*) FILTER (WHERE r.status = 'suspended') AS suspended,
        count(*) FILTER (WHERE r.due_at <= now()) AS claimable,
        min(r.due_at) FILTER (WHERE r.due_at <= now()) AS oldest_due_at
    FROM runs r
    WHERE r.status IN ('queued', 'running', 'suspended')
    GROUP BY r.queue
), names AS (
    SELECT q.name FROM queues q
    UNION
    SELECT l.queue FROM live l
)
SELECT
    n.name AS queue,
    coalesce(l.queued_due, 0) AS queued_due,
    coalesce(l.delayed, 0) AS delayed,
    coalesce(l.running, 0) AS running,
    coalesce(l.expired_leases, 0) AS expired_leases,
    coalesce(l.suspended, 0) AS suspended,
    coalesce(l.claimable, 0) AS claimable,
    now() - l.oldest_due_at AS oldest_due_age,
    q.concurrency_limit,
    coalesce(q.paused, false) AS paused
FROM names n
LEFT JOIN live l ON l.queue = n.name
LEFT JOIN queues q ON q.name = n.name;
COMMENT ON VIEW queue_depth IS
    'Per queue: runs waiting (due now, delayed), running, suspended, lag, limit, paused.';

-- Running runs that need a look: their lease expired (the worker is gone or
-- frozen and no live worker has reclaimed them yet), or they have been running
-- over three times their workflow's median duration (and over a minute). The
-- median is over the workflow's latest 1000 completed runs of the last 7 days,
-- so reading this view costs the same however long the history grows.
CREATE VIEW stuck_runs AS
WITH medians AS (
    SELECT wf.workflow, m.median_seconds, m.sample_size
    FROM (SELECT DISTINCT r.workflow FROM runs r WHERE r.status = 'running') wf
    CROSS JOIN LATERAL (
        SELECT percentile_cont(0.5) WITHIN GROUP (
                   ORDER BY extract(epoch FROM c.finished_at - c.started_at)) AS median_seconds,
               count(*) AS sample_size
        FROM (SELECT x.started_at, x.finished_at FROM runs x
              WHERE x.workflow = wf.workflow AND x.status = 'completed'
                AND x.started_at IS NOT NULL AND x.created_at > now() - interval '7 days'
              ORDER BY x.created_at DESC
              LIMIT 1000) c
    ) m
    WHERE m.sample_size > 0
)
SELECT
    r.id,
    r.workflow,
    r.queue,
    CASE WHEN r.due_at <= now() THEN 'lease expired'
         ELSE 'running over 3x the median' END AS reason,
    r.attempt,
    r.recoveries,
    r.lease_epoch,
    r.worker_id,
    w.host AS worker_host,
    w.pid AS worker_pid,
    w.heartbeat_at AS worker_heartbeat_at,
    r.started_at,
    e.claimed_at,
    now() - r.started_at AS running_for,
    r.due_at AS lease_expires_at,
    CASE WHEN r.due_at <= now() THEN now() - r.due_at END AS lease_expired_for,
    make_interval(secs => m.median_seconds) AS workflow_median,
    m.sample_size AS median_sample_size
FROM runs r
LEFT JOIN medians m ON m.workflow = r.workflow
LEFT JOIN workers w ON w.id = r.worker_id
LEFT JOIN LATERAL (
    SELECT max(ev.at) AS claimed_at FROM run_events ev
    WHERE ev.run_id = r.id AND ev.to_status = 'running'
) e ON true
WHERE r.status = 'running'
  AND (r.due_at <= now()
       OR (now() - r.started_at > make_interval(secs => 3 * m.median_seconds)
           AND now() - r.started_at > interval '1 minute'));
COMMENT ON VIEW stuck_runs IS
    'Running runs whose lease expired, or running over 3x their workflow''s median (and 1 min).';

-- One row per failure: a run that ended failed or dead, an attempt that
-- failed and was retried, or a journaled step failure.
CREATE VIEW failures AS
SELECT
    r.finished_at AS failed_at,
    r.workflow,
    r.queue,
    r.id AS run_id,
    'run'::text AS source,
    NULL::text AS step,
    r.attempt,
    r.error ->> 'type' AS error_type,
    r.error ->> 'message' AS error_message,
    r.status AS run_status
FROM runs r
WHERE r.status IN ('failed', 'dead')
UNION ALL
SELECT
    e.at,
    r.workflow,
    r.queue,
    r.id,
    'retry',
    NULL,
    e.attempt - 1,
    e.detail ->> 'type',
    e.detail ->> 'message',
    r.status
FROM run_events e
JOIN runs r ON r.id = e.run_id
WHERE e.from_status = 'running' AND e.to_status = 'queued' AND e.detail IS NOT NULL
UNION ALL
SELECT
    s.finished_at,
    r.workflow,
    r.queue,
    r.id,
    'step',
    s.name,
    s.attempt,
    s.error ->> 'type',
    s.error ->> 'message',
    r.status
FROM steps s
JOIN runs r ON r.id = s.run_id
WHERE s.status = 'failed';
COMMENT ON VIEW failures IS
    'One row per failure: failed/dead runs, retried attempts, failed journal entries.';

CREATE VIEW failures_by_type AS
SELECT
    f.failed_at::date AS day,
    f.workflow,
    f.source,
    f.step,
    f.error_type,
    count(*) AS failures,
    count(DISTINCT f.run_id) AS runs,
    min(f.failed_at) AS first_at,
    max(f.failed_at) AS last_at,
    (array_agg(f.error_message ORDER BY f.failed_at DESC))[1] AS last_message,
    (array_agg(f.run_id ORDER BY f.failed_at DESC))[1] AS last_run_id
FROM failures f
GROUP BY 1, f.workflow, f.source, f.step, f.error_type;
COMMENT ON VIEW failures_by_type IS
    'Failures per day (session time zone), workflow, source, step and error type.';

-- One row per worker process that ever registered.
CREATE VIEW worker_health AS
WITH held AS (
    SELECT r.worker_id,
           count(*) AS runs_held,
           count(*) FILTER (WHERE r.due_at <= now()) AS expired_leases
    FROM runs r
    WHERE r.status = 'running' AND r.worker_id IS NOT NULL
    GROUP BY r.worker_id
)
SELECT
    w.id,
    w.host,
    w.pid,
    w.queues,
    w.concurrency,
    w.started_at,
    w.heartbeat_at,
    now() - w.heartbeat_at AS heartbeat_age,
    w.stopped_at,
    coalesce(h.runs_held, 0) AS runs_held,
    coalesce(h.expired_leases, 0) AS expired_leases,
    w.hungry AND w.stopped_at IS NULL AS hungry,
    CASE
        WHEN w.stopped_at IS NOT NULL THEN 'stopped'
        WHEN now() - w.heartbeat_at <= coalesce(
            nullif(current_setting('pgjournal.worker_stale_after', true), '')::interval,
            interval '1 minute') THEN 'alive'
        ELSE 'stale'
    END AS state
FROM workers w
LEFT JOIN held h ON h.worker_id = w.id;
COMMENT ON VIEW worker_health IS
    'Per worker: host, pid, heartbeat age, runs held, alive/stale/stopped.';
