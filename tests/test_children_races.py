"""The lost wake-up, forced: a child ends while its parent registers its wait.

Both interleavings are forced with open transactions (not timing): the
child's end holding its locks while the parent's wait comes in, and the
parent's wait holding its lock while the child's end comes in. Either way the
parent must end up woken (queued) or its wait answered ('ready'), never
suspended with nothing left to wake it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

import pgjournal


def _setup(dsn: str, schema: str) -> dict[str, Any]:
    """A running parent with two running children, claimed by a fake worker."""
    worker = uuid.uuid4()
    parent = uuid.uuid4()
    kids = [uuid.uuid4(), uuid.uuid4()]
    queue = f"q{parent.hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        s = f'"{schema}"'
        conn.execute(f"SELECT * FROM {s}.start_run(%s, 'p', %s, '{{}}'::json)",
                     (parent, queue))
        (epoch,) = conn.execute(
            f"SELECT lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], 1, 60)",
            (worker, queue)).fetchone() or (None,)
        lost = conn.execute(
            f"SELECT {s}.spawn_runs(%s, %s, 0, 'c', 0, 1, 0, 0, NULL, %s, 'c', %s, "
            "ARRAY['{}', '{}']::json[], 3, 5, NULL)", (parent, epoch, kids, queue + "k")).fetchone()
        assert lost == (None,)
        claimed = conn.execute(
            f"SELECT id, lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], 2, 60)",
            (worker, queue + "k")).fetchall()
    return {"parent": parent, "epoch": epoch, "kids": dict(claimed)}


def _blocked_on_lock(dsn: str, needle: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s", (f"%{needle}%",)).fetchone()
            if row and row[0]:
                return True
            time.sleep(0.02)
    return False


def _wait_sql(schema: str) -> str:
    return (f'SELECT outcome FROM "{schema}".wait_children(%s, %s, 1, \'wait_all\', 0, 1, 1, '
            "1, %s, 'all')")


def _complete_sql(schema: str) -> str:
    return f'SELECT "{schema}".complete_runs(%s, %s, %s::json[])'


def _status(dsn: str, schema: str, run: uuid.UUID) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT status FROM "{schema}".runs WHERE id = %s',
                           (run,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("rounds", [5])
def test_last_child_ends_while_the_parent_registers_its_wait(
        pgjournal_dsn: str, pgjournal_schema: str, rounds: int) -> None:
    """The child's end is in flight (uncommitted, locks held) when the parent
    asks to wait: the parent's wait must not count the child as running."""
    for _ in range(rounds):
        _child_end_first(pgjournal_dsn, pgjournal_schema)


def _child_end_first(dsn: str, schema: str) -> None:
    t = _setup(dsn, schema)
    (k1, e1), (k2, e2) = t["kids"].items()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(_complete_sql(schema), ([k1], [e1], ["1"]))
    outcome: list[str] = []
    with psycopg.connect(dsn) as ender:
        ender.execute(_complete_sql(schema), ([k2], [e2], ["2"]))  # not committed yet

        def wait() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                row = c.execute(_wait_sql(schema),
                                (t["parent"], t["epoch"], [k1, k2])).fetchone()
                outcome.append(str(row[0]) if row else "none")

        waiter = threading.Thread(target=wait)
        waiter.start()
        # The parent's wait queues behind the child's end (same parent row),
        # or, if it does not, it has already decided.
        _blocked_on_lock(dsn, "wait_children", timeout=2)
        ender.commit()
        waiter.join(30)
    assert outcome, "the wait never returned"
    status = _status(dsn, schema, t["parent"])
    assert outcome == ["ready"] or status == "queued", (outcome, status)


@pytest.mark.parametrize("rounds", [5])
def test_parent_registers_its_wait_while_the_last_child_ends(
        pgjournal_dsn: str, pgjournal_schema: str, rounds: int) -> None:
    """The parent's wait is in flight (uncommitted, suspended) when the last
    child ends: the child's end must see the wait and wake the parent."""
    for _ in range(rounds):
        _parent_wait_first(pgjournal_dsn, pgjournal_schema)


def _parent_wait_first(dsn: str, schema: str) -> None:
    t = _setup(dsn, schema)
    (k1, e1), (k2, e2) = t["kids"].items()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(_complete_sql(schema), ([k1], [e1], ["1"]))
    with psycopg.connect(dsn) as waiter:
        row = waiter.execute(_wait_sql(schema),
                             (t["parent"], t["epoch"], [k1, k2])).fetchone()
        assert row == ("suspended",)

        def end() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(_complete_sql(schema), ([k2], [e2], ["2"]))

        ender = threading.Thread(target=end)
        ender.start()
        assert _blocked_on_lock(dsn, "complete_runs"), \
            "the child's end did not wait for the parent's row"
        waiter.commit()
        ender.join(30)
    assert _status(dsn, schema, t["parent"]) == "queued"


def test_wake_up_counts_each_awaited_child_once(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """A parent waiting for all of two children is not woken by the first."""
    dsn, schema = pgjournal_dsn, pgjournal_schema
    t = _setup(dsn, schema)
    (k1, e1), (k2, e2) = t["kids"].items()
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(_wait_sql(schema), (t["parent"], t["epoch"], [k1, k2, k1])).fetchone()
        assert row == ("suspended",)
        c.execute(_complete_sql(schema), ([k1], [e1], ["1"]))
        assert _status(dsn, schema, t["parent"]) == "suspended"
        c.execute(_complete_sql(schema), ([k2], [e2], ["2"]))
        assert _status(dsn, schema, t["parent"]) == "queued"
    assert pgjournal.ChildFailed.__mro__[1] is pgjournal.RunFailed
