-- pgjournal schema, part 6: run trees (child runs and waits on them) and
-- deadlines; the columns and journal kinds later parts use (forks, patch
-- markers, rate takes).
--
-- * A child run records its parent (`parent_run_id`, indexed) and the
--   parent's journal entry that spawned it (`parent_position`). Its id is
--   derived from the parent's id and that entry, so a replayed spawn finds the
--   child it created instead of creating another.
-- * A parent waiting for children is `suspended` with the children it waits
--   for (`wait_children`) and how many of them must still end before it may go
--   on (`wait_pending`: all of them, or 1 for "the first"). The transaction
--   that ends a child locks the child's row, then its parent's row, and wakes
--   the parent (queued + NOTIFY) when the count reaches zero; the wait itself
--   counts the children under the parent's row lock, so one of the two always
--   sees the other: the wake-up cannot be lost.
-- * `deadline_at`: a run that has not ended by then fails with a TimeoutError
--   (enforced by the claim, whatever the run's state). A child's deadline
--   defaults to its parent's.
-- * `forked_from`: the run this one was forked from (`fork_run`).

-- -- columns --------------------------------------------------------------------

ALTER TABLE runs ADD COLUMN parent_run_id uuid;
ALTER TABLE runs ADD COLUMN parent_position integer;
ALTER TABLE runs ADD COLUMN wait_children uuid[];
ALTER TABLE runs ADD COLUMN wait_pending integer;
ALTER TABLE runs ADD COLUMN deadline_at timestamptz;
ALTER TABLE runs ADD COLUMN forked_from uuid;
ALTER TABLE runs ADD COLUMN root_run_id uuid;
-- Flow control (0009) keys children too.
ALTER TABLE runs ADD COLUMN concurrency_key text;
ALTER TABLE runs ADD COLUMN depth integer;
COMMENT ON COLUMN runs.parent_run_id IS
    'The run that spawned this one (run.spawn), or NULL for a run started by a client.';
COMMENT ON COLUMN runs.parent_position IS
    'The position of the spawn entry in the parent''s journal.';
COMMENT ON COLUMN runs.wait_children IS
    'While suspended on children: the children the run waits for.';
COMMENT ON COLUMN runs.wait_pending IS
    'While suspended on children: how many of them must still end before it is woken.';
COMMENT ON COLUMN runs.deadline_at IS
    'When the run fails with a TimeoutError if it has not ended (children inherit it).';
COMMENT ON COLUMN runs.forked_from IS 'The run whose journal this run''s journal was copied from.';
COMMENT ON COLUMN runs.root_run_id IS
    'The root of the run''s tree (the root itself once it has spawned), else NULL.';
COMMENT ON COLUMN runs.depth IS 'Depth in its tree: 0 for a root that spawned, 1 for its children ...';

CREATE INDEX runs_parent ON runs (parent_run_id, created_at) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_root ON runs (root_run_id, depth) WHERE root_run_id IS NOT NULL;
CREATE INDEX runs_deadline ON runs (deadline_at)
    WHERE deadline_at IS NOT NULL AND finished_at IS NULL;

ALTER TABLE steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE steps ADD CONSTRAINT steps_kind_check CHECK (kind IN (
    'step', 'stream', 'signal', 'sleep', 'now', 'uuid', 'entry',
    'spawn', 'children', 'patch', 'rate'));
COMMENT ON COLUMN steps.kind IS
    'step, stream, signal, sleep, now, uuid, entry (adapters), spawn (child runs '
    'created), children (a wait on child runs), patch (a code-change marker), rate (units '
    'taken from a rate bucket, or a usage correction).';

-- -- spawning children ------------------------------------------------------------

-- Create child runs of p_parent and journal the spawn (the children's ids, as
-- a JSON array) at p_position, in one transaction fenced by the parent's
-- epoch. The ids are derived by the caller from the parent's id and the
-- entry, so a spawn executed again (after a crash before this commit) creates
-- the same children, never more. Returns NULL, or the parent's status when
-- its caller lost the run (nothing written).
CREATE FUNCTION spawn_runs(
    p_parent uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_attempt integer, p_turn integer, p_calls_before integer, p_fingerprint text,
    p_ids uuid[], p_workflow text, p_queue text, p_inputs json[],
    p_max_attempts integer, p_max_recoveries integer, p_timeout_seconds double precision,
    p_concurrency_key text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_parent runs%ROWTYPE;
    v_deadline timestamptz;
BEGIN
    v_lost := check_lease(p_parent, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN v_lost;
    END IF;
    SELECT * INTO v_parent FROM runs WHERE id = p_parent;
    IF v_parent.root_run_id IS NULL THEN
        UPDATE runs SET root_run_id = p_parent, depth = 0 WHERE id = p_parent;
        v_parent.root_run_id := p_parent;
        v_parent.depth := 0;
    END IF;
    v_deadline := v_parent.deadline_at;
    IF p_timeout_seconds IS NOT NULL THEN
        v_deadline := least(v_deadline, now() + make_interval(secs => p_timeout_seconds));
    END IF;
    INSERT INTO runs (id, workflow, queue, input, due_at, max_attempts, max_recoveries,
                      parent_run_id, parent_position, root_run_id, depth, deadline_at,
                      concurrency_key)
    SELECT c.id, p_workflow, p_queue, c.input, now(), p_max_attempts, p_max_recoveries,
           p_parent, p_position, v_parent.root_run_id, v_parent.depth + 1, v_deadline,
           p_concurrency_key
    FROM unnest(p_ids, p_inputs) AS c(id, input)
    ON CONFLICT (id) DO NOTHING;
    INSERT INTO steps (run_id, position, name, occurrence, kind, status, output, attempt,
                       lease_epoch, turn, calls_before, fingerprint)
    VALUES (p_parent, p_position, p_name, p_occurrence, 'spawn', 'completed',
            to_json(p_ids), p_attempt, p_epoch, p_turn, p_calls_before, p_fingerprint);
    PERFORM notify_wake(p_queue);
    RETURN NULL;
END $$;

-- -- waiting for children -------------------------------------------------------------

-- The outcome of each child, as the parent's journal keeps it.
CREATE FUNCTION child_outcome(c runs) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object('id', c.id, 'status', c.status, 'output', c.output,
                             'error', CASE WHEN c.status = 'cancelled'
                                           THEN coalesce(c.error, jsonb_build_object(
                                               'type', 'Cancelled',
                                               'module', 'pgjournal.errors',
                                               'message', 'the child run was cancelled'))
                                           ELSE c.error END);
$$;

-- A parent waits for all (p_mode 'all') or the first (p_mode 'first') of
-- p_children to end. If they have, their outcomes are journaled at p_position
-- and returned ('ready'): for 'all', a JSON array in the order given; for
-- 'first', the outcome of the child that ended first, with its index. If not,
-- the parent is suspended (no worker holds it) until the transaction that
-- ends the last awaited child wakes it (see wake_parent). With p_cancel_rest
-- ('first' only) the other children are cancelled with the journal write.
--
-- Lock order: children, then the parent (as when a child ends). The children
-- to cancel are locked before the parent; if the wait becomes ready only
-- once the parent is locked, 'again' asks the caller to call once more.
CREATE FUNCTION wait_children(
    p_run uuid, p_epoch bigint, p_position integer, p_name text, p_occurrence integer,
    p_attempt integer, p_turn integer, p_calls_before integer, p_children uuid[],
    p_mode text, p_cancel_rest boolean DEFAULT false, p_raise boolean DEFAULT false)
RETURNS TABLE (outcome text, results json)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_lost text;
    v_unended integer;
    v_ended integer;
    v_foreign uuid;
    v_locked boolean := false;
    v_results json;
    v_first uuid;
    v_error jsonb;
BEGIN
    IF p_mode NOT IN ('all', 'first') THEN
        RAISE EXCEPTION 'wait mode must be all or first, not %', p_mode USING ERRCODE = '22023';
    END IF;
    IF p_cancel_rest THEN
        -- Children first (see above): lock the ones a ready wait would cancel.
        SELECT count(*) FILTER (WHERE c.status IN ('completed', 'failed', 'cancelled', 'dead'))
        INTO v_ended FROM runs c WHERE c.id = ANY (p_children);
        IF v_ended > 0 THEN
            PERFORM lock_tree(array_agg(c.id)) FROM runs c
            WHERE c.id = ANY (p_children)
              AND c.status NOT IN ('completed', 'failed', 'cancelled', 'dead');
            v_locked := true;
        END IF;
    END IF;
    v_lost := check_lease(p_run, p_epoch, 'update');
    IF v_lost IS NOT NULL THEN
        RETURN QUERY SELECT 'lost'::text, to_json(v_lost);
        RETURN;
    END IF;
    -- Counted under the parent's lock: a child ending now either committed
    -- before this statement (counted as ended) or waits for the parent's row
    -- and then sees the wait registered below.
    SELECT count(DISTINCT c.id) FILTER (
               WHERE c.status NOT IN ('completed', 'failed', 'cancelled', 'dead')),
           count(DISTINCT c.id) FILTER (
               WHERE c.status IN ('completed', 'failed', 'cancelled', 'dead')),
           min(c.id::text) FILTER (WHERE c.parent_run_id IS DISTINCT FROM p_run
                                    AND c.status NOT IN ('completed', 'failed', 'cancelled',
                                                         'dead'))::uuid
    INTO v_unended, v_ended, v_foreign
    FROM runs c WHERE c.id = ANY (p_children);
    IF v_unended + v_ended < (SELECT count(DISTINCT x) FROM unnest(p_children) AS x) THEN
        RAISE EXCEPTION 'run % waits for children that do not exist (deleted?)', p_run
            USING ERRCODE = 'PJ404';
    END IF;
    IF (p_mode = 'all' AND v_unended = 0) OR (p_mode = 'first' AND v_ended > 0) THEN
        IF p_cancel_rest AND NOT v_locked AND v_unended > 0 THEN
            RETURN QUERY SELECT 'again'::text, NULL::json;
            RETURN;
        END IF;
        IF p_mode = 'all' THEN
            SELECT json_agg(child_outcome(c) ORDER BY x.ord) INTO v_results
            FROM unnest(p_children) WITH ORDINALITY AS x(id, ord)
            JOIN runs c ON c.id = x.id;
        ELSE
            SELECT json_build_object('index', x.ord - 1, 'outcome', child_outcome(c)), c.id
            INTO v_results, v_first
            FROM unnest(p_children) WITH ORDINALITY AS x(id, ord)
            JOIN runs c ON c.id = x.id
            WHERE c.status IN ('completed', 'failed', 'cancelled', 'dead')
            ORDER BY c.finished_at, x.ord LIMIT 1;
            IF p_cancel_rest THEN
                PERFORM cancel_tree(array_agg(c.id))
                FROM runs c WHERE c.id = ANY (p_children) AND c.id <> v_first
                  AND c.status NOT IN ('completed', 'failed', 'cancelled', 'dead');
            END IF;
        END IF;
        -- With p_raise the parent raises ChildFailed if a child did not complete:
        -- the entry is then a failure, which a retry of the parent waits for
        -- again (the failed child may have been retried meanwhile).
        IF p_raise AND p_mode = 'all' THEN
            SELECT jsonb_build_object(
                       'type', 'ChildFailed', 'module', 'pgjournal.errors',
                       'message', format('child run %s (%s) %s', c.id, c.workflow, c.status))
            INTO v_error
            FROM unnest(p_children) WITH ORDINALITY AS x(id, ord)
            JOIN runs c ON c.id = x.id
            WHERE c.status <> 'completed'
            ORDER BY x.ord LIMIT 1;
        END IF;
        INSERT INTO steps AS s (run_id, position, name, occurrence, kind, status, output,
                                error, attempt, lease_epoch, turn, calls_before)
        VALUES (p_run, p_position, p_name, p_occurrence, 'children',
                CASE WHEN v_error IS NULL THEN 'completed' ELSE 'failed' END, v_results,
                v_error, p_attempt, p_epoch, p_turn, p_calls_before)
        ON CONFLICT (run_id, position) DO UPDATE SET
            status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
            attempt = EXCLUDED.attempt, lease_epoch = EXCLUDED.lease_epoch,
            turn = EXCLUDED.turn, calls_before = EXCLUDED.calls_before,
            tries = s.tries + 1, started_at = now(), finished_at = now(), updated_at = now()
        WHERE s.status = 'failed';
        UPDATE runs SET wait_children = NULL, wait_pending = NULL, wait_position = NULL
        WHERE id = p_run AND wait_children IS NOT NULL;
        RETURN QUERY SELECT 'ready'::text, v_results;
        RETURN;
    END IF;
    IF v_foreign IS NOT NULL THEN
        RAISE EXCEPTION 'run % waits for run %, which is not its child (a forked run shares '
            'the children spawned before its fork point: fork from before the spawn to get '
            'its own)', p_run, v_foreign USING ERRCODE = 'PJ409';
    END IF;
    UPDATE runs SET status = 'suspended', due_at = NULL, worker_id = NULL,
                    wait_signal = NULL, wait_until = NULL, wait_position = p_position,
                    wait_children = p_children,
                    wait_pending = CASE WHEN p_mode = 'all' THEN v_unended ELSE 1 END,
                    updated_at = now()
    WHERE id = p_run;
    RETURN QUERY SELECT 'suspended'::text, NULL::json;
END $$;

-- A child ended (completed, failed, cancelled, dead): if its parent waits for
-- it, count it, and wake the parent (queued + NOTIFY) when nothing it waits
-- for is left. The parent's row is locked before it is read, after the
-- child's row (locked by the update that fired this): one lock order, and a
-- parent registering its wait right now is either seen here or sees the child
-- ended (wait_children counts under that same lock).
CREATE FUNCTION wake_parent() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_parent runs%ROWTYPE;
BEGIN
    SELECT * INTO v_parent FROM runs WHERE id = NEW.parent_run_id FOR UPDATE;
    IF NOT FOUND OR v_parent.status <> 'suspended' OR v_parent.wait_children IS NULL
       OR NOT (NEW.id = ANY (v_parent.wait_children)) THEN
        RETURN NULL;
    END IF;
    IF v_parent.wait_pending <= 1 THEN
        UPDATE runs SET status = 'queued', due_at = now(), wait_pending = 0,
                        updated_at = now()
        WHERE id = v_parent.id;
        PERFORM notify_wake(v_parent.queue);
    ELSE
        UPDATE runs SET wait_pending = wait_pending - 1 WHERE id = v_parent.id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_wake_parent AFTER UPDATE OF status ON runs
    FOR EACH ROW WHEN (NEW.parent_run_id IS NOT NULL
                       AND NEW.status IN ('completed', 'failed', 'cancelled', 'dead')
                       AND OLD.status NOT IN ('completed', 'failed', 'cancelled', 'dead'))
    EXECUTE FUNCTION wake_parent();

-- -- cancelling trees ------------------------------------------------------------------

-- Lock the unended runs among p_roots and all their descendants, deepest
-- first (children before parents: the order in which a child ending locks
-- its parent), then by id. Returns their ids in that order.
CREATE FUNCTION lock_tree(p_roots uuid[])
RETURNS uuid[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_ids uuid[];
BEGIN
    IF p_roots IS NULL OR cardinality(p_roots) = 0 THEN
        RETURN '{}'::uuid[];
    END IF;
    WITH RECURSIVE tree(id, level) AS (
        SELECT r.id, 0 FROM runs r WHERE r.id = ANY (p_roots)
        UNION
        SELECT c.id, t.level + 1 FROM runs c JOIN tree t ON c.parent_run_id = t.id
        WHERE t.level < 1000
    ), deepest AS (
        SELECT t.id, max(t.level) AS level FROM tree t GROUP BY t.id
    ), locked AS (
        SELECT r.id, d.level FROM runs r JOIN deepest d ON d.id = r.id
        WHERE r.status IN ('queued', 'running', 'suspended')
        ORDER BY d.level DESC, r.id
        FOR UPDATE OF r
    )
    SELECT array_agg(l.id ORDER BY l.level DESC, l.id) INTO v_ids FROM locked l;
    RETURN coalesce(v_ids, '{}'::uuid[]);
END $$;

-- Cancel the unended runs among p_roots and all their descendants (locked by
-- lock_tree). Their epochs move on, so workers running them stop at their
-- next step. Returns the number of runs cancelled.
CREATE FUNCTION cancel_tree(p_roots uuid[])
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_ids uuid[] := lock_tree(p_roots);
    v_done uuid[];
    v_waited uuid[];
BEGIN
    IF cardinality(v_ids) = 0 THEN
        RETURN 0;
    END IF;
    WITH cancelled AS (
        UPDATE runs r SET status = 'cancelled', due_at = NULL, worker_id = NULL,
            lease_epoch = r.lease_epoch + 1, finished_at = now(), updated_at = now()
        WHERE r.id = ANY (v_ids) AND r.status IN ('queued', 'running', 'suspended')
        RETURNING r.id, r.notify_done
    )
    SELECT array_agg(c.id), array_agg(c.id) FILTER (WHERE c.notify_done)
    INTO v_done, v_waited FROM cancelled c;
    PERFORM notify_done(w) FROM unnest(v_waited) AS w;
    RETURN coalesce(cardinality(v_done), 0);
END $$;

DROP FUNCTION cancel_run(uuid);
-- Cancel a run (see 0002) and, with p_children (the default), every unended
-- run in its subtree. Returns the run's status after the call; PJ404 for an
-- unknown run.
CREATE FUNCTION cancel_run(p_run uuid, p_children boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_notify boolean;
BEGIN
    IF p_children THEN
        PERFORM cancel_tree(ARRAY[p_run]);
        SELECT r.status INTO v_status FROM runs r WHERE r.id = p_run;
    ELSE
        UPDATE runs r SET status = 'cancelled', due_at = NULL, worker_id = NULL,
            lease_epoch = r.lease_epoch + 1, finished_at = now(), updated_at = now()
        WHERE r.id = p_run AND r.status IN ('queued', 'running', 'suspended')
        RETURNING r.status, r.notify_done INTO v_status, v_notify;
        IF v_notify THEN
            PERFORM notify_done(p_run);
        END IF;
        IF v_status IS NULL THEN
            SELECT r.status INTO v_status FROM runs r WHERE r.id = p_run;
        END IF;
    END IF;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'run % does not exist', p_run USING ERRCODE = 'PJ404';
    END IF;
    RETURN v_status;
END $$;

-- -- the claim: no JIT ---------------------------------------------------------------

-- claim_from prices sorts out (enable_sort = off, see 0005). A claim over
-- several queues still needs its final sort, and the penalty that makes it
-- "expensive" (1e10) crossed jit_above_cost: on a server with JIT every such
-- claim compiled its plan, about 220 ms instead of 0.3 ms. The claim never
-- gains from JIT.
ALTER FUNCTION claim_from(uuid, text[], integer, double precision, text[]) SET jit = off;

-- -- the claim: deadlines ----------------------------------------------------------------

-- Claim runs (see 0005), after failing the runs of these queues that are past
-- their deadline (an index range that is empty unless some are).
CREATE OR REPLACE FUNCTION claim_runs(
    p_worker uuid, p_queues text[], p_limit integer, p_lease_seconds double precision,
    p_workflows text[] DEFAULT NULL)
RETURNS SETOF claimed_run
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_free text[];
    v_q record;
    v_n integer;
    v_left integer := p_limit;
    v_late uuid[];
BEGIN
    UPDATE runs r SET
        status = 'dead', due_at = NULL, worker_id = NULL, finished_at = now(),
        updated_at = now(), lease_epoch = r.lease_epoch + 1,
        error = jsonb_build_object(
            'type', 'PoisonRun',
            'message', format('the worker running it vanished %s times; parked as dead',
                              r.recoveries + 1))
    WHERE r.queue = ANY (p_queues) AND r.status = 'running' AND r.due_at <= now()
      AND r.recoveries >= r.max_recoveries
      AND (r.leased_at IS NULL OR r.leased_at >= pg_postmaster_start_time());

    -- Runs past their deadline fail, whatever their state (a child inherits its
    -- parent's deadline). Rows locked elsewhere are left for the next claim.
    WITH late AS (
        SELECT r.id FROM runs r
        WHERE r.deadline_at <= now() AND r.finished_at IS NULL
          AND r.deadline_at IS NOT NULL AND r.queue = ANY (p_queues)
          AND r.status IN ('queued', 'running', 'suspended')
        ORDER BY r.id
        FOR UPDATE SKIP LOCKED
    ), failed AS (
        UPDATE runs r SET
            status = 'failed', due_at = NULL, worker_id = NULL, finished_at = now(),
            updated_at = now(), lease_epoch = r.lease_epoch + 1,
            error = jsonb_build_object(
                'type', 'TimeoutError', 'module', 'builtins',
                'message', format('the run did not end by its deadline (%s)', r.deadline_at))
        FROM late WHERE r.id = late.id
        RETURNING r.id, r.notify_done
    )
    SELECT array_agg(f.id) FILTER (WHERE f.notify_done) INTO v_late FROM failed f;
    PERFORM notify_done(x) FROM unnest(v_late) AS x;

    SELECT array_agg(qn) INTO v_free FROM unnest(p_queues) AS qn
    WHERE NOT EXISTS (SELECT 1 FROM queues s
                      WHERE s.name = qn AND (s.paused OR s.concurrency_limit IS NOT NULL));
    IF v_free IS NOT NULL AND v_left > 0 THEN
        RETURN QUERY SELECT * FROM claim_from(p_worker, v_free, v_left, p_lease_seconds,
                                              p_workflows);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_left := v_left - v_n;
    END IF;

    FOR v_q IN SELECT s.name, s.concurrency_limit FROM queues s
               WHERE s.name = ANY (p_queues) AND NOT s.paused
                 AND s.concurrency_limit IS NOT NULL
               ORDER BY s.name
    LOOP
        EXIT WHEN v_left <= 0;
        PERFORM 1 FROM queues s WHERE s.name = v_q.name FOR UPDATE;
        SELECT v_q.concurrency_limit - count(*) INTO v_n FROM runs r
        WHERE r.queue = v_q.name AND r.status = 'running' AND r.due_at > now();
        IF v_n > 0 THEN
            RETURN QUERY SELECT * FROM claim_from(p_worker, ARRAY[v_q.name],
                                                  least(v_n, v_left), p_lease_seconds,
                                                  p_workflows);
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_left := v_left - v_n;
        END IF;
    END LOOP;

    IF v_left = 0 THEN
        -- A full batch: this worker is busy, enqueues need not wake it.
        UPDATE workers w SET hungry = false WHERE w.id = p_worker AND w.hungry;
    END IF;
END $$;


-- -- views ----------------------------------------------------------------------------------

-- run_overview (see 0003) with the run's parent and what it waits for.
CREATE OR REPLACE VIEW run_overview AS
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
    r.source,
    r.parent_run_id,
    CASE WHEN r.status = 'suspended' THEN r.wait_pending END AS waiting_for_children,
    r.deadline_at
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
    'One row per run: status, attempts, recoveries, durations, lease state, awaited '
    'signal or children, parent.';

-- One row per run in a tree (a root that spawned, and every descendant), for
-- walking trees in SQL: WHERE root_run_id = $1 ORDER BY depth, created_at
-- reads one tree through an index.
CREATE VIEW run_tree AS
SELECT
    r.root_run_id,
    r.depth,
    r.parent_run_id,
    r.parent_position,
    r.id,
    r.workflow,
    r.queue,
    r.status,
    r.attempt,
    r.created_at,
    r.started_at,
    r.finished_at,
    coalesce(r.finished_at, now()) - r.started_at AS run_time,
    CASE WHEN r.status = 'suspended' THEN r.wait_pending END AS waiting_for_children,
    c.children,
    c.children_unended,
    r.error ->> 'type' AS error_type,
    r.error ->> 'message' AS error_message
FROM runs r
LEFT JOIN LATERAL (
    SELECT count(*) AS children,
           count(*) FILTER (WHERE k.status IN ('queued', 'running', 'suspended'))
               AS children_unended
    FROM runs k WHERE k.parent_run_id = r.id
) c ON true
WHERE r.root_run_id IS NOT NULL;
COMMENT ON VIEW run_tree IS
    'Runs in trees (spawned children and the roots that spawned them): root, depth, '
    'parent, status, children counts.';
