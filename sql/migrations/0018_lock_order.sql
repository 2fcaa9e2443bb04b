-- pgjournal schema, part 18: one lock order (docs/dba.md "Lock order").
--
-- Every function that changes several runs, or a run and its parent, takes
-- its locks in this order:
--
--   1. queue advisory locks, in queue-name order (go_hungry takes them
--      exclusively; notify_wake shared), then the queue row (`queues`);
--   2. runs: parents before children (a parent's `depth` is smaller), rows
--      of one depth in id order; idempotency keys of new runs in key order;
--   3. the worker row.
--
-- Before this part, ending a child locked the child, then (in the
-- `wake_parent` trigger) its parent: two batches of completions holding
-- children of parents P and Q in opposite orders deadlocked (issue 20,
-- row 7: one took P and waited for Q, the other took Q and waited for P).
-- Now `lock_runs` locks the parents of a batch with the batch, parents
-- first, before anything changes; the trigger finds each parent locked
-- already. The cancel cascade (`lock_tree`) and `fail_run` take the same
-- order, and `start_runs` inserts new keys in key order, so two batch starts
-- with the same keys in different orders no longer deadlock (row 9).
--
-- A caller that does not follow the order (a DBA's transaction) can still
-- deadlock with these functions: the Python store retries 40P01 and 40001,
-- with jitter, and never reports them as an outage.

-- -- the helper -------------------------------------------------------------------

-- Lock what a statement changing the runs p_ids needs, in the lock order:
-- first the shared queue advisory locks notify_wake will take (with
-- p_own_queues the runs' own queues, with p_parents their parents' queues),
-- in queue-name order as go_hungry takes them exclusively; then the rows of
-- p_ids and, with p_parents, of their parents, shallowest first, then by id.
-- Call it first thing: a lock taken before it would break the order.
CREATE OR REPLACE FUNCTION lock_runs(p_ids uuid[], p_parents boolean, p_own_queues boolean)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_parents uuid[];
    v_queues text[];
    v_q text;
BEGIN
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN;
    END IF;
    IF p_parents THEN
        SELECT array_agg(DISTINCT r.parent_run_id) INTO v_parents
        FROM runs r WHERE r.id = ANY (p_ids) AND r.parent_run_id IS NOT NULL;
    END IF;
    IF p_own_queues OR v_parents IS NOT NULL THEN
        SELECT array_agg(x.q ORDER BY x.q) INTO v_queues FROM (
            SELECT r.queue AS q FROM runs r WHERE p_own_queues AND r.id = ANY (p_ids)
            UNION
            SELECT r.queue FROM runs r WHERE r.id = ANY (v_parents)) AS x;
        FOREACH v_q IN ARRAY coalesce(v_queues, '{}'::text[]) LOOP
            PERFORM pg_advisory_xact_lock_shared(queue_lock_key(current_schema() || '.' || v_q));
        END LOOP;
    END IF;
    PERFORM 1 FROM runs r
    WHERE r.id = ANY (p_ids || coalesce(v_parents, '{}'::uuid[]))
    ORDER BY coalesce(r.depth, 0), r.id
    FOR UPDATE;
END $$;
COMMENT ON FUNCTION lock_runs(uuid[], boolean, boolean) IS
    'Take the locks for changing these runs in the one lock order (docs/dba.md "Lock order").';

-- -- ending runs ------------------------------------------------------------------

-- complete_runs of 0005. Lock order: the parents' queue locks, then the
-- parents and the batch, parents first, then by id (lock_runs); the
-- wake_parent trigger of each ending child finds its parent locked already.
CREATE OR REPLACE FUNCTION complete_runs(p_ids uuid[], p_epochs bigint[], p_outputs json[])
RETURNS TABLE (run_id uuid)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_ids uuid[];
    v_waited uuid[];
BEGIN
    PERFORM lock_runs(p_ids, true, false);
    WITH done AS (
        UPDATE runs r SET status = 'completed', output = v.output, due_at = NULL,
                          worker_id = NULL, finished_at = now(), updated_at = now()
        FROM unnest(p_ids, p_epochs, p_outputs) AS v(id, epoch, output)
        WHERE r.id = v.id AND r.lease_epoch = v.epoch AND r.status = 'running'
        RETURNING r.id, r.notify_done
    )
    SELECT array_agg(d.id), array_agg(d.id) FILTER (WHERE d.notify_done)
    INTO v_ids, v_waited FROM done d;
    PERFORM notify_done(w) FROM unnest(v_waited) AS w;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'::uuid[]));
END $$;

-- fail_run of 0002. Lock order: the run's and its parent's queue locks (a
-- retry notifies the run's queue, a failure wakes the parent), then the
-- parent, then the run (lock_runs).
CREATE OR REPLACE FUNCTION fail_run(
    p_run uuid, p_epoch bigint, p_error jsonb, p_retry_delay_seconds double precision,
    p_terminal boolean)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_notify boolean;
    v_queue text;
BEGIN
    PERFORM lock_runs(ARRAY[p_run], true, true);
    UPDATE runs r SET
        status = CASE WHEN NOT p_terminal AND r.attempt < r.max_attempts
                      THEN 'queued' ELSE 'failed' END,
        attempt = CASE WHEN NOT p_terminal AND r.attempt < r.max_attempts
                       THEN r.attempt + 1 ELSE r.attempt END,
        due_at = CASE WHEN NOT p_terminal AND r.attempt < r.max_attempts
                      THEN now() + make_interval(secs => greatest(p_retry_delay_seconds, 0))
                 END,
        finished_at = CASE WHEN p_terminal OR r.attempt >= r.max_attempts THEN now() END,
        error = p_error, worker_id = NULL, updated_at = now()
    WHERE r.id = p_run AND r.lease_epoch = p_epoch AND r.status = 'running'
    RETURNING r.status, r.notify_done, r.queue INTO v_status, v_notify, v_queue;
    IF v_status IS NULL THEN
        SELECT 'lost:' || r.status INTO v_status FROM runs r WHERE r.id = p_run;
        RETURN coalesce(v_status, 'lost:deleted');
    END IF;
    IF v_status = 'failed' AND v_notify THEN
        PERFORM notify_done(p_run);
    ELSIF v_status = 'queued' AND p_retry_delay_seconds <= 0 THEN
        PERFORM notify_wake(v_queue);
    END IF;
    RETURN v_status;
END $$;

-- release_runs of 0002. Lock order: the runs' queue locks (it notifies
-- them), then the runs in id order (lock_runs; nothing ends, so no parents).
CREATE OR REPLACE FUNCTION release_runs(p_ids uuid[], p_epochs bigint[])
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_n integer;
    v_queue text;
BEGIN
    PERFORM lock_runs(p_ids, false, true);
    UPDATE runs r SET status = 'queued', due_at = now(), worker_id = NULL, updated_at = now()
    FROM unnest(p_ids, p_epochs) AS v(id, epoch)
    WHERE r.id = v.id AND r.lease_epoch = v.epoch AND r.status = 'running';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    FOR v_queue IN SELECT DISTINCT r.queue FROM runs r WHERE r.id = ANY (p_ids) LOOP
        PERFORM notify_wake(v_queue);
    END LOOP;
    RETURN v_n;
END $$;

-- wake_parent of 0006 (the trigger runs_wake_parent is unchanged). Lock
-- order: the statement that ended the child should have locked the parent
-- before the child (lock_runs: complete_runs, fail_run, cancel_run,
-- cancel_tree); then the FOR UPDATE below finds the lock held and the
-- parent's queue lock taken. An UPDATE that did not (a DBA's, the claim's
-- deadline sweep and poison parking) locks the parent here, after the child:
-- against the order, so it may deadlock (and be retried by the store).
-- The count stays under the parent's lock: a parent registering its wait
-- right now is either seen here or sees the child ended (wait_children
-- counts under that same lock).
CREATE OR REPLACE FUNCTION wake_parent() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_parent runs%ROWTYPE;
BEGIN
    -- Usually locked already by lock_runs (parents before children).
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

-- -- the cancel cascade -----------------------------------------------------------

-- lock_tree of 0006, in the lock order: it locked the tree deepest first
-- (children before parents), which was the order of the old completion path.
-- Now: the unended runs among p_roots and all their descendants, and the
-- parent of each (whose wake_parent trigger fires when it is cancelled: the
-- roots' parents, and ended runs inside the tree), through lock_runs:
-- their queue locks, then parents before children, then by id. Returns the
-- unended runs locked, shallowest first, then by id. Used by cancel_tree and
-- by wait_children (cancel_rest), which then locks its own run, a parent of
-- those children, already locked here.
CREATE OR REPLACE FUNCTION lock_tree(p_roots uuid[])
RETURNS uuid[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_ids uuid[];
    v_more uuid[];
BEGIN
    IF p_roots IS NULL OR cardinality(p_roots) = 0 THEN
        RETURN '{}'::uuid[];
    END IF;
    -- Read unlocked, locked in order, then read again: a child spawned in
    -- between (its parent was not locked yet) is locked and included too.
    FOR i IN 1 .. 2 LOOP
        WITH RECURSIVE tree(id) AS (
            SELECT r.id FROM runs r WHERE r.id = ANY (p_roots)
            UNION
            SELECT c.id FROM runs c JOIN tree t ON c.parent_run_id = t.id
        )
        SELECT array_agg(r.id) INTO v_more FROM runs r JOIN tree t ON t.id = r.id
        WHERE r.status IN ('queued', 'running', 'suspended')
          AND r.id <> ALL (coalesce(v_ids, '{}'::uuid[]));
        EXIT WHEN v_more IS NULL;
        PERFORM lock_runs(v_more, true, false);
        v_ids := coalesce(v_ids, '{}'::uuid[]) || v_more;
    END LOOP;
    SELECT array_agg(r.id ORDER BY coalesce(r.depth, 0), r.id) INTO v_ids
    FROM runs r WHERE r.id = ANY (v_ids) AND r.status IN ('queued', 'running', 'suspended');
    RETURN coalesce(v_ids, '{}'::uuid[]);
END $$;

-- cancel_run of 0006. Lock order: with p_children, cancel_tree (lock_tree);
-- without, the run's parent's queue lock, the parent, then the run
-- (lock_runs) before the UPDATE that fires wake_parent.
CREATE OR REPLACE FUNCTION cancel_run(p_run uuid, p_children boolean DEFAULT true)
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
        PERFORM lock_runs(ARRAY[p_run], true, false);
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

-- -- batch start: keys in key order --------------------------------------------------

-- start_runs of 0007. Lock order: new runs with idempotency keys are inserted
-- in key order (byte order, COLLATE "C"), not in the caller's order: an
-- insert that meets a key another transaction inserted and has not committed
-- waits for it, so two batches with the same keys in different orders each
-- held a key the other waited for (issue 20, row 9). Returned rows keep the
-- input order. (start_run inserts one key: it waits for at most one other
-- transaction and holds nothing that one could wait for.)
CREATE OR REPLACE FUNCTION start_runs(
    p_ids uuid[], p_workflow text, p_queue text, p_inputs json[],
    p_priority integer DEFAULT 0, p_delay_seconds double precision DEFAULT 0,
    p_idempotency_keys text[] DEFAULT NULL, p_max_attempts integer DEFAULT 3,
    p_max_recoveries integer DEFAULT 5, p_source text DEFAULT 'native',
    p_meta jsonb DEFAULT '{}'::jsonb, p_concurrency_keys text[] DEFAULT NULL)
RETURNS TABLE (run_id uuid, created boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_due timestamptz := now() + make_interval(secs => greatest(p_delay_seconds, 0));
    v_created uuid[];
BEGIN
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_inputs)
       OR (p_idempotency_keys IS NOT NULL
           AND cardinality(p_idempotency_keys) IS DISTINCT FROM cardinality(p_ids)) THEN
        RAISE EXCEPTION 'start_runs: p_ids (%), p_inputs (%) and p_idempotency_keys (%) '
                        'must have the same length',
                        cardinality(p_ids), cardinality(p_inputs),
                        cardinality(p_idempotency_keys)
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;

    IF p_idempotency_keys IS NULL THEN
        -- No keys: every element is a new run (a duplicate id is an error).
        INSERT INTO runs (id, workflow, queue, input, priority, due_at,
                          max_attempts, max_recoveries, source, meta, concurrency_key)
        SELECT u.id, p_workflow, p_queue, u.input, p_priority, v_due,
               p_max_attempts, p_max_recoveries, p_source, p_meta, p_concurrency_keys[u.ord]
        FROM unnest(p_ids, p_inputs) WITH ORDINALITY AS u(id, input, ord);
        IF p_delay_seconds <= 0 THEN
            PERFORM notify_wake(p_queue);
        END IF;
        RETURN QUERY SELECT u.id, true FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)
                     ORDER BY u.ord;
        RETURN;
    END IF;

    -- With keys: the first element of each key is inserted (later ones of the
    -- same key in the batch only get its run), and a key that names an
    -- existing run inserts nothing (ON CONFLICT, as in start_run). Inserted
    -- in key order (the lock order), elements without a key last.
    WITH ins AS (
        INSERT INTO runs (id, workflow, queue, input, priority, due_at, idempotency_key,
                          max_attempts, max_recoveries, source, meta, concurrency_key)
        SELECT u.id, p_workflow, p_queue, u.input, p_priority, v_due, u.key,
               p_max_attempts, p_max_recoveries, p_source, p_meta, p_concurrency_keys[u.ord]
        FROM (SELECT v.*, row_number() OVER (PARTITION BY v.key ORDER BY v.ord) AS nth
              FROM unnest(p_ids, p_inputs, p_idempotency_keys) WITH ORDINALITY
                   AS v(id, input, key, ord)) AS u
        WHERE u.key IS NULL OR u.nth = 1
        ORDER BY u.key COLLATE "C" NULLS LAST, u.ord
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id
    )
    SELECT array_agg(ins.id) INTO v_created FROM ins;

    IF v_created IS NOT NULL AND p_delay_seconds <= 0 THEN
        PERFORM notify_wake(p_queue);
    END IF;
    RETURN QUERY
        SELECT CASE WHEN c.id IS NOT NULL THEN c.id
                    ELSE (SELECT r.id FROM runs r WHERE r.idempotency_key = u.key) END,
               c.id IS NOT NULL
        FROM unnest(p_ids, p_idempotency_keys) WITH ORDINALITY AS u(id, key, ord)
        LEFT JOIN unnest(v_created) AS c(id) ON c.id = u.id
        ORDER BY u.ord;
END $$;
