-- pgjournal schema, part 1: tables and indexes.
--
-- The migration runner sets search_path to the target schema before running
-- this file, so every name below lands in that schema.

CREATE TABLE queues (
    name              text PRIMARY KEY,
    concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0),
    paused            boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE queues IS
    'Per-queue settings. A queue without a row here is unlimited and not paused.';

CREATE TABLE workers (
    id           uuid PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    queues       text[] NOT NULL,
    concurrency  integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    -- The worker has free slots and sleeps on LISTEN: enqueues must NOTIFY.
    hungry       boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE workers IS 'Registry of worker processes and their last heartbeat.';

CREATE TABLE runs (
    id               uuid PRIMARY KEY,
    workflow         text NOT NULL,
    queue            text NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'suspended',
                          'completed', 'failed', 'cancelled', 'dead')),
    priority         integer NOT NULL DEFAULT 0,
    input            jsonb NOT NULL DEFAULT '{}'::jsonb,
    output           jsonb,
    error            jsonb,
    idempotency_key  text,
    attempt          integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    recoveries       integer NOT NULL DEFAULT 0,
    max_recoveries   integer NOT NULL DEFAULT 5 CHECK (max_recoveries >= 0),
    -- Fencing token: grows with every claim; every write of a worker carries it.
    lease_epoch      bigint NOT NULL DEFAULT 0,
    worker_id        uuid,
    -- When the run is next claimable: queued -> start time; suspended -> timer
    -- (NULL: wait for a signal only); running -> lease expiry; ended -> NULL.
    due_at           timestamptz,
    wait_signal      text,
    wait_position    integer,
    wait_until       timestamptz,
    -- Set by a caller waiting for the result, so completion only NOTIFYs when
    -- somebody listens.
    notify_done      boolean NOT NULL DEFAULT false,
    source           text NOT NULL DEFAULT 'native',
    meta             jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT runs_due_matches_status CHECK (
        (status IN ('completed', 'failed', 'cancelled', 'dead') AND due_at IS NULL)
        OR (status IN ('queued', 'running') AND due_at IS NOT NULL)
        OR status = 'suspended'
    )
);
COMMENT ON TABLE runs IS 'One row per run of a workflow: its input, status, lease and result.';
COMMENT ON COLUMN runs.due_at IS
    'When the run is next claimable: queued = start time, suspended = timer '
    '(NULL = signal only), running = lease expiry, ended = NULL.';
COMMENT ON COLUMN runs.lease_epoch IS 'Fencing token, bumped by every claim and by cancel.';
COMMENT ON COLUMN runs.recoveries IS
    'Times the run was reclaimed after its worker vanished (not retries).';
COMMENT ON COLUMN runs.source IS
    'Which interface created the run: native, or the name of an adapter.';

CREATE UNIQUE INDEX runs_idempotency_key ON runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim index holds only claimable-or-soon rows: ended runs have due_at
-- NULL and drop out, so claim cost does not grow with history.
CREATE INDEX runs_claimable ON runs (queue, priority DESC, due_at)
    WHERE due_at IS NOT NULL;
CREATE INDEX runs_running ON runs (queue) WHERE status = 'running';
CREATE INDEX runs_created ON runs (created_at DESC);
CREATE INDEX runs_workflow_created ON runs (workflow, created_at DESC);
CREATE INDEX runs_unfinished_status ON runs (status)
    WHERE status NOT IN ('completed', 'cancelled');

CREATE TABLE steps (
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position    integer NOT NULL CHECK (position >= 0),
    name        text NOT NULL,
    occurrence  integer NOT NULL CHECK (occurrence >= 0),
    kind        text NOT NULL DEFAULT 'step'
        CHECK (kind IN ('step', 'stream', 'signal', 'sleep', 'now', 'uuid', 'entry')),
    status      text NOT NULL CHECK (status IN ('completed', 'failed')),
    output      jsonb,
    error       jsonb,
    attempt     integer NOT NULL DEFAULT 1,
    tries       integer NOT NULL DEFAULT 1,
    lease_epoch bigint NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz NOT NULL DEFAULT now(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, position),
    CONSTRAINT steps_one_per_occurrence UNIQUE (run_id, name, occurrence)
);
COMMENT ON TABLE steps IS
    'The journal: one row per step call of a run, in call order (position). '
    'The n-th call of a step name is occurrence n-1.';

CREATE TABLE stream_chunks (
    run_id     uuid NOT NULL,
    position   integer NOT NULL,
    seq        integer NOT NULL,
    chunk      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, position, seq),
    FOREIGN KEY (run_id) REFERENCES runs (id) ON DELETE CASCADE
);
COMMENT ON TABLE stream_chunks IS 'Chunks of stream steps, in order (seq).';

CREATE TABLE signals (
    id                bigserial PRIMARY KEY,
    run_id            uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name              text NOT NULL,
    payload           jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    consumed_at       timestamptz,
    consumed_position integer
);
COMMENT ON TABLE signals IS
    'Durable messages to runs; consumed exactly once, in the transaction that journals them.';
CREATE INDEX signals_pending ON signals (run_id, name, id) WHERE consumed_at IS NULL;
CREATE INDEX signals_run ON signals (run_id);

CREATE TABLE run_events (
    id          bigserial PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    from_status text,
    to_status   text NOT NULL,
    attempt     integer NOT NULL,
    lease_epoch bigint NOT NULL,
    worker_id   uuid,
    detail      jsonb
);
COMMENT ON TABLE run_events IS
    'Append-only log of every status transition of every run (written by a trigger).';
CREATE INDEX run_events_run ON run_events (run_id, id);
CREATE INDEX run_events_at ON run_events (at);

CREATE FUNCTION log_run_event() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO run_events (run_id, from_status, to_status, attempt, lease_epoch,
                            worker_id, detail)
    VALUES (NEW.id,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            NEW.status, NEW.attempt, NEW.lease_epoch, NEW.worker_id,
            CASE WHEN NEW.status IN ('failed', 'dead') OR
                      (TG_OP = 'UPDATE' AND OLD.status = 'running' AND NEW.status = 'queued'
                       AND NEW.attempt <> OLD.attempt)
                 THEN NEW.error END);
    RETURN NULL;
END $$;

CREATE TRIGGER runs_log_insert AFTER INSERT ON runs
    FOR EACH ROW EXECUTE FUNCTION log_run_event();
CREATE TRIGGER runs_log_status AFTER UPDATE OF status, lease_epoch ON runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR (NEW.status = 'running' AND OLD.lease_epoch <> NEW.lease_epoch))
    EXECUTE FUNCTION log_run_event();
