"""The claim takes the project's lock order: parents first.

Failing a late child wakes its parent: the ``wake_parent`` trigger locks the
parent's row. The sweep of migrations 0006-0014 locked the late children
first and the trigger then waited for each parent, while completion and
cancel (and everything else, DESIGN.md) lock a parent before its children:
a transaction holding a parent and then asking for one of its children, and
a claim whose sweep held that child and asked for the parent, deadlocked
(40P01, which the worker reports as the database being unavailable).

The same holds for a claim that parks a poison run (an expired lease past
``max_recoveries``) as dead: that ends the run and wakes its parent too.

Forced with open transactions, not timing: the other side holds the parent,
the claim runs, then the other side asks for the child.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

Row = dict[str, Any]


@pytest.fixture
def conn(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[psycopg.Connection[Row]]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as c:
        c.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pgjournal_schema)))
        yield c


def _connect(dsn: str, schema: str, *, autocommit: bool) -> psycopg.Connection[Row]:
    c = psycopg.connect(dsn, autocommit=autocommit, row_factory=dict_row)
    c.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    if not autocommit:
        c.commit()
    return c


def _blocked(conn: psycopg.Connection[Row], pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type = 'Lock' AS waiting FROM pg_stat_activity "
                       "WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row["waiting"])


def _interleave(dsn: str, schema: str, worker: uuid.UUID, parent: uuid.UUID,
                kid: uuid.UUID) -> list[Row]:
    """The other side holds ``parent``; a claim of queue 'kids' runs; then the
    other side asks for ``kid``. Neither may fail (a deadlock) and the claim
    must return; what it claimed is returned."""
    other = _connect(dsn, schema, autocommit=False)
    claimer = _connect(dsn, schema, autocommit=True)
    watcher = _connect(dsn, schema, autocommit=True)
    try:
        # The other side (a completion or a cancel, parents first) holds the parent.
        other.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (parent,))
        outcome: list[Any] = []

        def claim() -> None:
            try:
                outcome.append(claimer.execute(
                    "SELECT id FROM claim_runs(%s, ARRAY['kids'], 5, 60)", (worker,)).fetchall())
            except psycopg.Error as exc:
                outcome.append(exc)

        pid = claimer.info.backend_pid
        thread = threading.Thread(target=claim)
        thread.start()
        deadline = time.monotonic() + 10
        while thread.is_alive() and not _blocked(watcher, pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Now it asks for the child (with a bound, so a wrong order fails the
        # test rather than hanging it).
        other.execute("SET LOCAL lock_timeout = '10s'")
        try:
            other.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (kid,))
            other_error: psycopg.Error | None = None
        except psycopg.Error as exc:
            other_error = exc
        other.rollback()
        thread.join(30)
        assert not thread.is_alive(), "the claim never returned"
        assert other_error is None and not isinstance(outcome[0], psycopg.Error), (
            f"the holder of the parent got {other_error!r}, the claim got {outcome[0]!r}")
        assert isinstance(outcome[0], list)
        return outcome[0]
    finally:
        other.close()
        claimer.close()
        watcher.close()


def test_deadline_sweep_locks_the_parent_before_the_late_child(
        conn: psycopg.Connection[Row], pgjournal_dsn: str, pgjournal_schema: str) -> None:
    worker = uuid.uuid4()
    conn.execute("SELECT register_worker(%s, 'test', 1, ARRAY['default', 'kids'], 10)",
                 (worker,))
    parent, kid = uuid.uuid4(), uuid.uuid4()
    conn.execute("SELECT start_run(%s, 'p', 'default', '{}'::json)", (parent,))
    (claimed,) = conn.execute("SELECT lease_epoch FROM claim_runs(%s, ARRAY['default'], 1, 60)",
                              (worker,)).fetchall()
    epoch = claimed["lease_epoch"]
    conn.execute("SELECT spawn_runs(%s, %s, 0, 'c', 0, 1, 0, 0, NULL, %s, 'c', 'kids', "
                 "ARRAY['{}']::json[], 3, 5, NULL)", (parent, epoch, [kid]))
    (row,) = conn.execute(
        "SELECT outcome FROM wait_children(%s, %s, 1, 'wait_all', 0, 1, 1, 1, %s, 'all')",
        (parent, epoch, [kid])).fetchall()
    assert row["outcome"] == "suspended"
    conn.execute("UPDATE runs SET deadline_at = now() - interval '1 second' WHERE id = %s",
                 (kid,))

    claimed = _interleave(pgjournal_dsn, pgjournal_schema, worker, parent, kid)
    assert claimed == [], "a run past its deadline was claimed"

    # With the parent free, the next claim fails the child and wakes the parent.
    assert conn.execute("SELECT id FROM claim_runs(%s, ARRAY['kids'], 5, 60)",
                        (worker,)).fetchall() == []
    states = {r["id"]: (r["status"], r["error"]) for r in conn.execute(
        "SELECT id, status, error FROM runs WHERE id = ANY (%s)", ([parent, kid],))}
    assert states[kid][0] == "failed" and states[kid][1]["type"] == "TimeoutError"
    assert states[parent][0] == "queued", json.dumps(str(states))


async def test_parking_a_poison_child_locks_its_parent_first(
        conn: psycopg.Connection[Row], pgjournal_dsn: str, pgjournal_schema: str) -> None:
    from tests.conftest import wait_for

    worker, ghost = uuid.uuid4(), uuid.uuid4()
    for w in (worker, ghost):
        conn.execute("SELECT register_worker(%s, 'test', 1, ARRAY['default', 'kids'], 10)",
                     (w,))
    parent, kid = uuid.uuid4(), uuid.uuid4()
    conn.execute("SELECT start_run(%s, 'p', 'default', '{}'::json)", (parent,))
    (claimed,) = conn.execute("SELECT lease_epoch FROM claim_runs(%s, ARRAY['default'], 1, 60)",
                              (worker,)).fetchall()
    epoch = claimed["lease_epoch"]
    conn.execute("SELECT spawn_runs(%s, %s, 0, 'c', 0, 1, 0, 0, NULL, %s, 'c', 'kids', "
                 "ARRAY['{}']::json[], 3, 5, NULL)", (parent, epoch, [kid]))
    (row,) = conn.execute(
        "SELECT outcome FROM wait_children(%s, %s, 1, 'wait_all', 0, 1, 1, 1, %s, 'all')",
        (parent, epoch, [kid])).fetchall()
    assert row["outcome"] == "suspended"
    # The child's worker vanishes for the last time it may: its next takeover parks it.
    (k,) = conn.execute("SELECT id FROM claim_runs(%s, ARRAY['kids'], 1, 0.2)",
                        (ghost,)).fetchall()
    assert k["id"] == kid
    conn.execute("UPDATE runs SET recoveries = max_recoveries WHERE id = %s", (kid,))

    async def lapsed() -> bool:
        r = conn.execute("SELECT lease_until <= now() AS ok FROM runs WHERE id = %s",
                         (kid,)).fetchone()
        return bool(r and r["ok"])
    await wait_for(lapsed, 30, what="the child's lease to expire")

    assert _interleave(pgjournal_dsn, pgjournal_schema, worker, parent, kid) == []
    # With the parent free, the next claim parks the child and wakes the parent.
    assert conn.execute("SELECT id FROM claim_runs(%s, ARRAY['kids'], 5, 60)",
                        (worker,)).fetchall() == []
    states = {r["id"]: r["status"] for r in conn.execute(
        "SELECT id, status FROM runs WHERE id = ANY (%s)", ([parent, kid],))}
    assert states == {kid: "dead", parent: "queued"}
