-- pgjournal schema, part 6: run trees (child runs and waits on them), batch
-- start, deadlines, and changing code under running runs (patch markers, forks).
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

CREATE INDEX runs_parent ON runs (parent_run_id, created_at) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_deadline ON runs (deadline_at)
    WHERE deadline_at IS NOT NULL AND finished_at IS NULL;

ALTER TABLE steps DROP CONSTRAINT steps_kind_check;
ALTER TABLE steps ADD CONSTRAINT steps_kind_check CHECK (kind IN (
    'step', 'stream', 'signal', 'sleep', 'now', 'uuid', 'entry',
    'spawn', 'children', 'patch'));
COMMENT ON COLUMN steps.kind IS
    'step, stream, signal, sleep, now, uuid, entry (adapters), spawn (child runs '
    'created), children (a wait on child runs), patch (a code-change marker).';
