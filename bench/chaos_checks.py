"""What the chaos run checks afterwards, from the database (see bench/chaos.py).

``prune`` runs during the chaos run with a short ``--older-than``, so most
ended runs and their history are gone by the time the checks run. Before each
row of ``runs``, ``steps``, ``run_events`` and ``signals`` is deleted, a
``BEFORE DELETE`` trigger of the harness copies it (with the commit time of
the row version, which the checks compare) into schema ``chaos_audit``; the
views ``a_runs``, ``a_steps``, ``a_events`` and ``a_signals`` are the live rows
plus those copies, so every check sees all the history there ever was. The
same trigger on ``runs`` records, in the deleting transaction, whether an
unended run still needed the deleted one: an unended run itself; a child of
an unended parent that has no completed wait after the spawn yet (the
parent will wait for it); a child shared with an unended fork of its parent.
A trigger on ``runs`` also records every wake-up of a parent that waited for
children (the wait's children and position, in the waking transaction), for
the "woken exactly when" check.

The harness only observes: its triggers write to its own schema and lock
nothing the product locks (the row lookups read rows the deleting statement
already holds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

AUDIT = "chaos_audit"
ENDED = ("completed", "failed", "cancelled", "dead")
_ENDED_SQL = "('completed', 'failed', 'cancelled', 'dead')"


def audit_sql(schema: str) -> str:
    """The harness's archive of deleted rows, the wake log and the views over both."""
    s, a = f'"{schema}"', AUDIT
    return f"""
CREATE SCHEMA {a};
CREATE TABLE {a}.gone_runs (LIKE {s}.runs, committed timestamptz);
CREATE TABLE {a}.gone_steps (LIKE {s}.steps, committed timestamptz, xact text);
CREATE TABLE {a}.gone_events (LIKE {s}.run_events, committed timestamptz, xact text);
CREATE TABLE {a}.gone_signals (LIKE {s}.signals, committed timestamptz);
-- Runs deleted while an unended run still needed them.
CREATE TABLE {a}.pruned_needed (run_id uuid, status text, needed_by uuid, why text,
                                at timestamptz DEFAULT clock_timestamp());
-- Every wake-up of a parent suspended on children (xmin = the waking transaction).
CREATE TABLE {a}.wakes (parent uuid, children uuid[], wait_position int, pending int);

CREATE FUNCTION {a}.keep_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {a}.gone_runs SELECT r.*, pg_xact_commit_timestamp(r.xmin)
    FROM {s}.runs r WHERE r.id = OLD.id;
    IF OLD.status NOT IN {_ENDED_SQL} THEN
        INSERT INTO {a}.pruned_needed (run_id, status, needed_by, why)
        VALUES (OLD.id, OLD.status, OLD.id, 'deleted before it ended');
    END IF;
    INSERT INTO {a}.pruned_needed (run_id, status, needed_by, why)
    SELECT OLD.id, OLD.status, p.id, 'child of an unended parent (' || p.status || ')'
    FROM {s}.runs p WHERE p.id = OLD.parent_run_id AND p.status NOT IN {_ENDED_SQL}
      -- not yet behind a completed wait of the parent after the spawn
      AND NOT EXISTS (SELECT 1 FROM {s}.steps w WHERE w.run_id = p.id
                      AND w.kind = 'children' AND w.status = 'completed'
                      AND w.position > OLD.parent_position);
    INSERT INTO {a}.pruned_needed (run_id, status, needed_by, why)
    SELECT OLD.id, OLD.status, f.id, 'child shared with an unended fork of its parent'
    FROM {s}.runs f WHERE OLD.parent_run_id IS NOT NULL
      AND f.forked_from = OLD.parent_run_id AND f.status NOT IN {_ENDED_SQL}
      AND EXISTS (SELECT 1 FROM {s}.steps x WHERE x.run_id = f.id AND x.kind = 'spawn'
                  AND x.output::jsonb ? OLD.id::text);
    RETURN OLD;
END $$;
CREATE TRIGGER chaos_keep BEFORE DELETE ON {s}.runs
    FOR EACH ROW EXECUTE FUNCTION {a}.keep_run();

CREATE FUNCTION {a}.keep_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {a}.gone_steps SELECT x.*, pg_xact_commit_timestamp(x.xmin), x.xmin::text
    FROM {s}.steps x WHERE x.run_id = OLD.run_id AND x.position = OLD.position
      AND x.run_created_at = OLD.run_created_at;
    RETURN OLD;
END $$;
CREATE TRIGGER chaos_keep BEFORE DELETE ON {s}.steps
    FOR EACH ROW EXECUTE FUNCTION {a}.keep_step();

CREATE FUNCTION {a}.keep_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {a}.gone_events SELECT x.*, pg_xact_commit_timestamp(x.xmin), x.xmin::text
    FROM {s}.run_events x WHERE x.id = OLD.id AND x.run_created_at = OLD.run_created_at;
    RETURN OLD;
END $$;
CREATE TRIGGER chaos_keep BEFORE DELETE ON {s}.run_events
    FOR EACH ROW EXECUTE FUNCTION {a}.keep_event();

CREATE FUNCTION {a}.keep_signal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {a}.gone_signals SELECT x.*, pg_xact_commit_timestamp(x.xmin)
    FROM {s}.signals x WHERE x.id = OLD.id;
    RETURN OLD;
END $$;
CREATE TRIGGER chaos_keep BEFORE DELETE ON {s}.signals
    FOR EACH ROW EXECUTE FUNCTION {a}.keep_signal();

CREATE FUNCTION {a}.log_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {a}.wakes VALUES (NEW.id, OLD.wait_children, OLD.wait_position,
                                  OLD.wait_pending);
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_wake AFTER UPDATE OF status ON {s}.runs FOR EACH ROW
    WHEN (OLD.status = 'suspended' AND NEW.status = 'queued'
          AND OLD.wait_children IS NOT NULL)
    EXECUTE FUNCTION {a}.log_wake();

CREATE VIEW {a}.a_runs AS
    SELECT r.*, pg_xact_commit_timestamp(r.xmin) AS committed FROM {s}.runs r
    UNION ALL SELECT * FROM {a}.gone_runs;
CREATE VIEW {a}.a_steps AS
    SELECT x.*, pg_xact_commit_timestamp(x.xmin) AS committed, x.xmin::text AS xact
    FROM {s}.steps x UNION ALL SELECT * FROM {a}.gone_steps;
CREATE VIEW {a}.a_events AS
    SELECT x.*, pg_xact_commit_timestamp(x.xmin) AS committed, x.xmin::text AS xact
    FROM {s}.run_events x UNION ALL SELECT * FROM {a}.gone_events;
CREATE VIEW {a}.a_signals AS
    SELECT x.*, pg_xact_commit_timestamp(x.xmin) AS committed FROM {s}.signals x
    UNION ALL SELECT * FROM {a}.gone_signals;
"""


class Query(Protocol):
    def __call__(self, query: str, *params: Any) -> list[tuple[Any, ...]]: ...


# -- invariants 1-3 and 16 (over the archive-extended views) ------------------------
#
# Entries a fork copied from its source carry attempt 0 and epoch 0 (no claim
# of the fork wrote them): 2a/2b are about entries a worker wrote.

CORE: list[tuple[str, str, str, str]] = [
    # (label, what is checked, query counting the items checked, query listing violations)
    ("1", "no step ran again after its journal entry committed",
     "SELECT count(*) FROM effects",
     """SELECT e.run_id, e.step, e.occurrence, e.pid, e.epoch, e.started
        FROM effects e JOIN a_steps s ON s.run_id = e.run_id AND s.name = e.step
             AND s.occurrence = e.occurrence AND s.status = 'completed'
        WHERE e.started > s.committed"""),
    ("2a", "every journal entry's epoch is a claim epoch of its run",
     "SELECT count(*) FROM a_steps",
     """SELECT s.run_id, s.position, s.name, s.lease_epoch FROM a_steps s
        WHERE s.lease_epoch > 0 AND NOT EXISTS (
            SELECT 1 FROM a_events v WHERE v.run_id = s.run_id
            AND v.to_status = 'running' AND v.lease_epoch = s.lease_epoch)"""),
    ("2b", "no entry committed after a later claim of its run had committed",
     "SELECT count(*) FROM a_steps",
     """SELECT s.run_id, s.position, s.name, s.lease_epoch, v.lease_epoch AS later
        FROM a_steps s JOIN a_events v ON v.run_id = s.run_id
             AND v.lease_epoch > s.lease_epoch
        WHERE s.lease_epoch > 0 AND v.committed < s.committed"""),
    ("2c", "one entry per (run, name, occurrence) and per position",
     "SELECT count(DISTINCT run_id) FROM a_steps",
     """SELECT run_id, name, occurrence, count(*) FROM a_steps
        GROUP BY 1, 2, 3 HAVING count(*) > 1
        UNION ALL
        SELECT run_id, position::text, NULL, count(*) FROM a_steps
        GROUP BY 1, 2 HAVING count(*) > 1"""),
    ("3b", "every signal consumed exactly once, by the wait journaled at its position",
     "SELECT count(*) FROM a_signals",
     """SELECT g.run_id, g.id, g.consumed_position, s.name, s.kind FROM a_signals g
        LEFT JOIN a_steps s ON s.run_id = g.run_id AND s.position = g.consumed_position
        WHERE g.consumed_at IS NULL OR s.kind IS DISTINCT FROM 'signal'
           OR s.output::jsonb IS DISTINCT FROM g.payload::jsonb
        UNION ALL
        SELECT s.run_id, NULL, s.position, s.name, 'entry without its signal' FROM a_steps s
        WHERE s.kind = 'signal' AND s.status = 'completed' AND s.lease_epoch > 0
          AND (SELECT count(*) FROM a_signals g WHERE g.run_id = s.run_id
               AND g.consumed_position = s.position) <> 1"""),
    # A claim, not a cancel: a cancel bumps the epoch too (so the old owner's
    # writes are refused), but reaches a live worker only at its next
    # heartbeat; a step it starts meanwhile can journal nothing (2b).
    ("16", "no step started under an epoch a later claim had superseded",
     "SELECT count(*) FROM effects",
     """SELECT e.run_id, e.step, e.occurrence, e.pid, e.epoch, min(v.lease_epoch),
               e.started
        FROM effects e JOIN a_events v ON v.run_id = e.run_id
             AND v.lease_epoch > e.epoch AND v.to_status = 'running'
        WHERE v.committed < e.started
        GROUP BY e.id, e.run_id, e.step, e.occurrence, e.pid, e.epoch, e.started"""),
]

# -- child runs -----------------------------------------------------------------------

WAKES_CHECKED = "SELECT count(*) FROM wakes"
WAKES_BAD = f"""
    -- woken in a transaction that ended none of the children it waited for
    SELECT w.parent, w.wait_position, 'woken by no child''s end' FROM wakes w
    -- (by commit time: a subtransaction's xid differs, its commit time does not)
    WHERE NOT EXISTS (SELECT 1 FROM a_events e WHERE e.run_id = ANY (w.children)
                      AND e.to_status IN {_ENDED_SQL}
                      AND e.committed = pg_xact_commit_timestamp(w.xmin))
    UNION ALL
    -- a wait for all of them woken while one had not ended
    SELECT w.parent, w.wait_position, 'woken before child ' || c || ' ended' FROM wakes w
    JOIN a_steps s ON s.run_id = w.parent AND s.position = w.wait_position
         AND s.name IN ('wait_all', 'result')
    CROSS JOIN unnest(w.children) c
    WHERE NOT EXISTS (SELECT 1 FROM a_events e WHERE e.run_id = c
                      AND e.to_status IN {_ENDED_SQL}
                      AND e.committed <= pg_xact_commit_timestamp(w.xmin))
    UNION ALL
    -- a lost wake-up: still suspended on children that have all ended
    SELECT r.id, r.wait_position, 'never woken' FROM runs r
    WHERE r.status = 'suspended' AND r.wait_children IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM unnest(r.wait_children) c JOIN runs k ON k.id = c
                      WHERE k.status NOT IN {_ENDED_SQL})"""

CHILDREN_CHECKED = """SELECT count(DISTINCT c.id) FROM a_steps s,
    json_array_elements_text(s.output) c(id) WHERE s.kind = 'spawn' AND s.status = 'completed'"""
CHILDREN_BAD = f"""
    SELECT DISTINCT s.run_id, c.id, 'spawned, never created' FROM a_steps s,
        json_array_elements_text(s.output) c(id)
    WHERE s.kind = 'spawn' AND s.status = 'completed'
      AND NOT EXISTS (SELECT 1 FROM a_runs r WHERE r.id = c.id::uuid)
    UNION ALL
    SELECT DISTINCT s.run_id, c.id, 'created, never ended' FROM a_steps s,
        json_array_elements_text(s.output) c(id)
    WHERE s.kind = 'spawn' AND s.status = 'completed'
      AND NOT EXISTS (SELECT 1 FROM a_runs r WHERE r.id = c.id::uuid
                      AND r.status IN {_ENDED_SQL})"""

CASCADE_CHECKED = "SELECT count(*) FROM a_events WHERE to_status = 'cancelled'"
CASCADE_BAD = f"""
    SELECT c.id, c.parent_run_id, min(ce.committed) - min(pe.committed)
    FROM a_runs c
    JOIN a_events pe ON pe.run_id = c.parent_run_id AND pe.to_status = 'cancelled'
    JOIN a_events ce ON ce.run_id = c.id AND ce.to_status IN {_ENDED_SQL}
    GROUP BY c.id, c.parent_run_id
    HAVING min(ce.committed) > min(pe.committed)"""

PRUNED_CHECKED = "SELECT count(*) FROM gone_runs"
PRUNED_BAD = "SELECT run_id, status, needed_by, why FROM pruned_needed"

FORK_CHECKED = "SELECT count(*) FROM a_runs WHERE forked_from IS NOT NULL"
FORK_BAD = """
    SELECT f.id, s.concurrency_key, f.concurrency_key, s.deadline_at, f.deadline_at
    FROM a_runs f JOIN a_runs s ON s.id = f.forked_from
    WHERE f.concurrency_key IS DISTINCT FROM s.concurrency_key
       OR (f.deadline_at IS NULL) <> (s.deadline_at IS NULL)"""


@dataclass
class Row:
    """One row of the checks table: what, how many items were checked, the
    violations (their count must be 0) and a few examples."""

    label: str
    what: str
    checked: int
    bad: list[tuple[Any, ...]] = field(default_factory=list)
    count: int | None = None   # when the violations are counted, not listed

    @property
    def violations(self) -> int:
        return self.count if self.count is not None else len(self.bad)


def sql_row(q: Query, label: str, what: str, checked: str, bad: str) -> Row:
    return Row(label, what, int(q(checked)[0][0]), q(bad))


def runs_as_expected(q: Query, cancelled: set[str], retried: Iterable[str] = ()) -> Row:
    """Every run ended, each as its workflow and the harness's own actions say:
    completed, or cancelled when the harness cancelled it or its parent, or
    when it was a racer its parent's ``wait_first(cancel_rest=True)`` cancelled.

    A deadline repair (``retried``: the children the harness retried) may
    fail again: the retried ``slowkid`` gets a fresh deadline (D checks it) of
    a few seconds, and a worker killed or paused after claiming it can make it
    miss that one too, a promise kept. Such a child (attempt > 1, failed by
    ``TimeoutError``) and its ``deadliner`` (failed by ``ChildFailed``) are
    expected, and counted in the row's text."""
    rows = q("SELECT id::text, workflow, status, parent_run_id::text, error->>'type', "
             "left(error->>'message', 160), input, attempt FROM a_runs")
    by_id = {r[0]: r for r in rows}
    retried = set(retried)
    again = {r[0] for r in rows if r[1] == "slowkid" and r[2] == "failed"
             and r[4] == "TimeoutError" and r[0] in retried and r[7] > 1}
    again_parents = {by_id[r][3] for r in again if by_id[r][3] is not None}
    bad = []
    for rid, wf, status, parent, etype, emsg, inp, _attempt in rows:
        if status == "completed":
            continue
        if status == "failed" and (rid in again or (
                wf == "deadliner" and rid in again_parents and etype == "ChildFailed")):
            continue
        if status == "cancelled":
            if rid in cancelled or parent in cancelled:
                continue
            if wf == "leaf" and parent in by_id:
                p_kwargs = (by_id[parent][6] or {}).get("kwargs") or {}
                args = (inp or {}).get("args") or [0]
                if int(args[0]) >= 100 and p_kwargs.get("cancel_rest"):
                    continue
        bad.append((rid, wf, status, etype, emsg))
    return Row("3a", "every run ended as expected (completed, or cancelled by the harness "
               f"or a cascade; {len(again)} repaired children missed their fresh deadline "
               "again under faults)", len(rows), bad)


def rate_windows(q: Query, bucket: str, capacity: float, refill: float,
                 slack: float = 0.05) -> Row:
    """No window [t_i, t_j] of the journaled takes (each at its ``ready_at``, as
    the bucket reckoned it) holds more than capacity + refill x (t_j - t_i). A
    retried call takes again into the same entry, keeping its earlier takes in
    ``output.earlier``: they count too."""
    name = f"rate:{bucket}"
    takes = sorted((t, float(u)) for t, u in q(
        "SELECT (output->>'ready_at')::timestamptz, (output->>'units')::float FROM a_steps "
        "WHERE kind = 'rate' AND name = %s AND lease_epoch > 0 "
        "UNION ALL "
        "SELECT (e->>'ready_at')::timestamptz, (e->>'units')::float FROM a_steps s "
        "CROSS JOIN LATERAL json_array_elements(coalesce(s.output->'earlier', '[]')) AS e "
        "WHERE s.kind = 'rate' AND s.name = %s AND s.lease_epoch > 0", name, name))
    bad = []
    for i, (ti, _) in enumerate(takes):
        total = 0.0
        for tj, units in takes[i:]:
            total += units
            allowed = capacity + refill * ((tj - ti).total_seconds() + slack)
            if total > allowed + 1e-6:
                bad.append((ti.isoformat(), tj.isoformat(), total, round(allowed, 2)))
                break
    return Row("R", f"every window of bucket {bucket!r} within capacity + refill x W "
               "(journaled takes)", len(takes), bad)


def schedule_slots(q: Query, name: str, lo: float, hi: float,
                   ranges: list[tuple[float, float]], error: str | None) -> Row:
    """Each slot of the per-second schedule exactly one run: every second in
    (lo, hi] (from its creation to when it was paused) and in each backfilled
    range [from, to]. Runs pruned meanwhile count (from the archive)."""
    runs = Counter(math.floor(datetime.fromisoformat(s).timestamp()) for (s,) in q(
        "SELECT meta->>'slot' FROM a_runs WHERE meta->>'schedule' = %s "
        "AND meta ? 'slot'", name))
    want: set[int] = set(range(math.floor(lo) + 1, math.floor(hi) + 1))
    for a, b in ranges:
        want |= set(range(math.ceil(a), math.floor(b) + 1))
    bad: list[tuple[Any, ...]] = []
    missing = sorted(t for t in want if runs.get(t, 0) == 0)
    if missing:
        bad.append(("missing", len(missing), datetime.fromtimestamp(missing[0]).isoformat(),
                    datetime.fromtimestamp(missing[-1]).isoformat(), error or ""))
    extra = sorted(t for t, n in runs.items() if n > 1)
    if extra:
        bad.append(("more than one run", len(extra), extra[:3]))
    count = len(missing) + sum(runs[t] - 1 for t in extra)
    return Row("S", f"each slot of schedule {name!r} exactly one run (regular and "
               "backfilled)", len(want), bad, count=count)


def core_rows(q: Query, tally: Any, sampler: Any,
              sched: tuple[float, float, list[tuple[float, float]], str | None]) -> list[Row]:
    """Every check but X (which reads the logs): invariants 1-3 and 16, then the
    features' promises, in the order of the printed table."""
    from .chaos_workload import BUCKET, CAPACITY, REFILL, SCHEDULE

    core = {label: sql_row(q, label, what, n, bad) for label, what, n, bad in CORE}
    rows = [core["1"], core["2a"], core["2b"], core["2c"],
            runs_as_expected(q, tally.cancelled, tally.retried), core["3b"], core["16"]]
    rows.append(sql_row(q, "P1", "every parent woken exactly when its last awaited child "
                        "ended (in that child's transaction; none left waiting)",
                        WAKES_CHECKED, WAKES_BAD))
    rows.append(sql_row(q, "P2", "no child lost: every spawned child created and ended",
                        CHILDREN_CHECKED, CHILDREN_BAD))
    rows.append(sql_row(q, "C", "cancel cascades: no child ended after its parent's cancel",
                        CASCADE_CHECKED, CASCADE_BAD))
    rows.append(Row("K", "a key's running runs (live lease, sampled) never above its limit "
                    "(examples: key, running, limit, of them keyless, forks)",
                    sampler.samples, [tuple(o) for o in sampler.over]))
    rows.append(sql_row(q, "F", "every fork kept its source's concurrency key and deadline "
                        "rule", FORK_CHECKED, FORK_BAD))
    rows.append(rate_windows(q, BUCKET, CAPACITY, REFILL))
    lo, hi, ranges, error = sched
    rows.append(schedule_slots(q, SCHEDULE, lo, hi, ranges, error))
    keys = sorted(tally.sm_keys)
    per_key = dict(q("SELECT idempotency_key, count(*) FROM a_runs "
                     "WHERE idempotency_key = ANY(%s) GROUP BY 1", keys)) if keys else {}
    sm_bad: list[tuple[Any, ...]] = list(tally.start_many_mismatch)
    sm_bad += [(k, per_key.get(k, 0), "runs") for k in keys if per_key.get(k, 0) != 1]
    rows.append(Row("SM", "start_many with overlapping keys: one run per key, the same for "
                    "every caller", len(keys), sm_bad))
    retried = sorted(tally.retried)
    deadline = dict(q("SELECT id::text, deadline_at FROM a_runs WHERE id = ANY(%s::uuid[])",
                      retried)) if retried else {}
    rows.append(Row("D", "a run retried after ending by its deadline got a fresh deadline "
                    "(not one already past at the retry)", len(retried),
                    [(r, str(deadline.get(r)), str(tally.retried[r])) for r in retried
                     if deadline.get(r) is not None and deadline[r] <= tally.retried[r]]))
    rows.append(sql_row(q, "N", "nothing an unended run needs was pruned (children of "
                        "unended parents or of their forks, unended runs)",
                        PRUNED_CHECKED, PRUNED_BAD))
    return rows
