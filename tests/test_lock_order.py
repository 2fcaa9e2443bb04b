"""One lock order (docs/dba.md "Lock order"): queue advisory locks, then runs
-- parents before children, rows in id order, idempotency keys in key order.

Every interleaving here is forced with open transactions, not timing: a
blocker connection holds a lock, a statement is started and seen waiting for
it (pg_stat_activity), the next statement is started and seen waiting or
done, then the blocker lets go. On the code before the lock order each of the
first tests ended in 40P01 (deadlock detected); the guard tests pass on that
code and fail when one function of the order is put back the old way.

The last tests are about what a deadlock or a serialization failure that does
happen (a DBA's transaction taking rows the other way round, a database
whose default isolation is serializable) does to a caller: it is retried
with jitter and never reported as "database unavailable", and the worker does
not drop the completion (no lease wait, no recovery counted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgjournal
from pgjournal.errors import DatabaseUnavailable, TransactionConflict
from pgjournal.pytest_plugin import TestPostgres

from .conftest import serving, wait_for

# -- plumbing -------------------------------------------------------------------------


def _ids(n: int) -> list[uuid.UUID]:
    """``n`` fresh run ids in ascending order (the order rows are locked in)."""
    return sorted((uuid.uuid4() for _ in range(n)), key=str)


def _waiting(dsn: str, tag: str, schema: str) -> bool:
    """Whether the statement tagged ``/* tag */`` on this test's schema waits for a lock."""
    return _waits(dsn, f"/* {tag} */", schema)


def _waits(dsn: str, *needles: str) -> bool:
    """Whether a statement whose text holds every needle waits for a lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE ALL (%s)",
            ([f"%{n}%" for n in needles],)).fetchone()
    return bool(row and row[0])


def _await(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _Call(threading.Thread):
    """One autocommit statement on its own connection, in a thread; keeps what it
    returned or raised."""

    def __init__(self, dsn: str, sql: str, params: tuple[Any, ...]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql, self.params = dsn, sql, params
        self.rows: list[tuple[Any, ...]] | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self.rows = conn.execute(self.sql, self.params).fetchall()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def result(self, timeout: float = 60) -> list[tuple[Any, ...]]:
        self.join(timeout)
        assert not self.is_alive(), f"still running: {self.sql}"
        if self.error is not None:
            raise self.error
        assert self.rows is not None
        return self.rows


def _q(schema: str) -> str:
    return f'"{schema}"'


def _family(dsn: str, schema: str, parents: int, children: int,
            mode: str = "all", kid_ids: list[uuid.UUID] | None = None) -> dict[str, Any]:
    """``parents`` parents (each on its own queue), each suspended waiting for its
    ``children`` running children (claimed by a fake worker). Child ids:
    ``kid_ids`` (parent 0's children first), else ascending in that order."""
    s = _q(schema)
    tag = uuid.uuid4().hex[:10]
    worker = uuid.uuid4()
    kids_queue = f"k{tag}"
    out: dict[str, Any] = {"parents": [], "kids": [], "epochs": {}, "queues": []}
    kid_ids = kid_ids or _ids(parents * children)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(parents):
            parent, queue = uuid.uuid4(), f"p{i}{tag}"
            conn.execute(f"SELECT * FROM {s}.start_run(%s, 'parent', %s, '{{}}'::json)",
                         (parent, queue))
            row = conn.execute(f"SELECT lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], 1, 60)",
                               (worker, queue)).fetchone()
            assert row is not None
            epoch = row[0]
            kids = kid_ids[i * children:(i + 1) * children]
            lost = conn.execute(
                f"SELECT {s}.spawn_runs(%s, %s, 0, 'c', 0, 1, 0, 0, NULL, %s, 'child', %s, "
                "%s::json[], 3, 5, NULL)",
                (parent, epoch, kids, kids_queue, ["{}"] * children)).fetchone()
            assert lost == (None,)
            row = conn.execute(
                f"SELECT outcome FROM {s}.wait_children(%s, %s, 1, 'wait', 0, 1, 1, 1, %s, %s)",
                (parent, epoch, kids, mode)).fetchone()
            assert row == ("suspended",)
            out["parents"].append(parent)
            out["queues"].append(queue)
            out["kids"].append(kids)
        claimed = conn.execute(f"SELECT id, lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], %s, 60)",
                               (worker, kids_queue, parents * children)).fetchall()
        out["epochs"] = dict(claimed)
    assert len(out["epochs"]) == parents * children
    return out


def _status(dsn: str, schema: str, run: uuid.UUID) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT status FROM {_q(schema)}.runs WHERE id = %s",
                           (run,)).fetchone()
    assert row is not None
    return str(row[0])


def _complete_sql(schema: str, tag: str) -> str:
    return f"SELECT /* {tag} */ * FROM {_q(schema)}.complete_runs(%s, %s, %s::json[])"


def _complete(dsn: str, schema: str, tag: str, kids: list[uuid.UUID],
              epochs: dict[uuid.UUID, int]) -> _Call:
    return _Call(dsn, _complete_sql(schema, tag),
                 (kids, [epochs[k] for k in kids], ['"done"'] * len(kids)))


class _Blocker:
    """A transaction holding row locks until ``release()``."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)

    def lock(self, schema: str, *runs: uuid.UUID) -> _Blocker:
        self.conn.execute(f"SELECT 1 FROM {_q(schema)}.runs WHERE id = ANY (%s) "
                          "ORDER BY id FOR UPDATE", (list(runs),))
        return self

    def release(self) -> None:
        self.conn.commit()
        self.conn.close()


# -- completion: parents before children ----------------------------------------------


def test_batches_ending_children_of_two_parents_in_opposite_orders(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Row 7 of issue 20: batch A ends children of P then Q, batch B of Q then P.
    B is held at Q's row (another transaction has it); A comes in; then Q is let
    go. Before the lock order, A held P (its first child's trigger) and waited
    for Q, B got Q and waited for P: 40P01. Now both lock P and Q first, in id
    order, before any child: one waits for the other."""
    dsn, schema = pgjournal_dsn, pgjournal_schema
    # Ids p1 < q1 and q2 < p2: a batch updates (and so fires the wake_parent
    # trigger for) its rows in id order, so A reached P first and B reached Q first.
    a, b, c, d = _ids(4)
    t = _family(dsn, schema, parents=2, children=2, kid_ids=[a, d, c, b])
    (p1, p2), (q1, q2) = t["kids"]
    _p, parent_q = t["parents"]
    blocker = _Blocker(dsn).lock(schema, parent_q)
    b = _complete(dsn, schema, "B", [q2, p2], t["epochs"])
    _await(lambda: _waiting(dsn, "B", schema), "batch B to wait for Q's row")
    a = _complete(dsn, schema, "A", [p1, q1], t["epochs"])
    _await(lambda: _waiting(dsn, "A", schema), "batch A to wait")
    blocker.release()
    ended = {row[0] for row in a.result()} | {row[0] for row in b.result()}
    assert ended == {p1, p2, q1, q2}
    assert [_status(dsn, schema, p) for p in t["parents"]] == ["queued", "queued"]


def test_a_child_failing_while_its_parent_is_cancelled(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Guard: fail_run takes the parent before the child, as the cancel cascade
    does. The child's row is held elsewhere; its failure and then the parent's
    cancel come in. A fail_run that locked the child first would hold it and
    wait for the parent, which the cancel holds while it waits for the child."""
    dsn, schema = pgjournal_dsn, pgjournal_schema
    t = _family(dsn, schema, parents=1, children=2)
    ((k1, _k2),) = t["kids"]
    (parent,) = t["parents"]
    blocker = _Blocker(dsn).lock(schema, k1)
    fail = _Call(dsn, f"SELECT /* F */ {_q(schema)}.fail_run(%s, %s, '{{}}'::jsonb, 0, true)",
                 (k1, t["epochs"][k1]))
    _await(lambda: _waiting(dsn, "F", schema), "the child's failure to wait")
    cancel = _Call(dsn, f"SELECT /* C */ {_q(schema)}.cancel_run(%s)", (parent,))
    _await(lambda: _waiting(dsn, "C", schema), "the cancel to wait")
    blocker.release()
    assert fail.result() == [("failed",)]
    assert cancel.result() == [("cancelled",)]
    assert [_status(dsn, schema, k) for k in t["kids"][0]] == ["failed", "cancelled"]


def test_a_cancel_cascade_while_a_child_completes(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Guard: the cancel cascade (lock_tree) takes the parent before its
    children, as complete_runs does. The cascade is held at the second child;
    the first child's completion comes in. A cascade that locked children
    first would hold the first child and then wait for the parent, which the
    completion holds while it waits for that child."""
    dsn, schema = pgjournal_dsn, pgjournal_schema
    t = _family(dsn, schema, parents=1, children=2)
    ((k1, k2),) = t["kids"]
    (parent,) = t["parents"]
    blocker = _Blocker(dsn).lock(schema, k2)
    cancel = _Call(dsn, f"SELECT /* C */ {_q(schema)}.cancel_run(%s)", (parent,))
    _await(lambda: _waiting(dsn, "C", schema), "the cancel to wait for the second child")
    done = _complete(dsn, schema, "D", [k1], t["epochs"])
    _await(lambda: _waiting(dsn, "D", schema), "the completion to wait")
    blocker.release()
    assert cancel.result() == [("cancelled",)]
    assert done.result() == []  # cancelled first: the completion found it ended
    assert [_status(dsn, schema, k) for k in (k1, k2)] == ["cancelled", "cancelled"]


def test_wait_first_cancelling_the_rest_while_another_child_completes(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Guard: a parent's wait_first(cancel_rest) locks itself, then the children
    it cancels (through lock_tree). It is held at the third child; the second
    child's completion comes in and must wait for the parent, not hold the
    second child against the wait."""
    dsn, schema = pgjournal_dsn, pgjournal_schema
    s = _q(schema)
    t = _family(dsn, schema, parents=1, children=3, mode="first")
    ((k1, k2, k3),) = t["kids"]
    (parent,) = t["parents"]
    # The first child ends: the parent is woken and claimed again.
    _complete(dsn, schema, "E", [k1], t["epochs"]).result()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], 1, 60)",
                           (uuid.uuid4(), t["queues"][0])).fetchone()
    assert row is not None
    epoch = row[0]
    blocker = _Blocker(dsn).lock(schema, k3)
    wait = _Call(dsn, f"SELECT /* W */ outcome FROM {s}.wait_children(%s, %s, 1, 'wait', 0, "
                 "1, 1, 1, %s, 'first', true)", (parent, epoch, [k1, k2, k3]))
    _await(lambda: _waiting(dsn, "W", schema), "the wait to hold at the third child")
    done = _complete(dsn, schema, "D", [k2], t["epochs"])
    _await(lambda: _waiting(dsn, "D", schema), "the completion to wait")
    blocker.release()
    assert wait.result() == [("ready",)]
    assert done.result() == []
    assert [_status(dsn, schema, k) for k in (k2, k3)] == ["cancelled", "cancelled"]


# -- start_many: keys in key order ----------------------------------------------------


def test_two_batch_starts_with_the_same_keys_in_opposite_orders(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Row 9 of issue 20: start_runs inserts keys in key order. Batch B (keys
    k2, k0, k1) is held at k0 (another transaction inserted it, uncommitted);
    batch A (k1, k2) comes in. Inserting in the caller's order, B held k2 and
    waited for k0, A held k1 and waited for k2, then B waited for k1: 40P01."""
    dsn, schema = pgjournal_dsn, pgjournal_schema
    s = _q(schema)
    tag = uuid.uuid4().hex[:8]
    k0, k1, k2 = (f"{tag}-k{i}" for i in range(3))
    queue = f"q{tag}"
    holder = psycopg.connect(dsn)
    holder.execute(f"SELECT * FROM {s}.start_run(%s, 'w', %s, '{{}}'::json, 0, 0, %s)",
                   (uuid.uuid4(), queue, k0))
    sql = (f"SELECT /* %s */ * FROM {s}.start_runs(%%s, 'w', %%s, %%s::json[], 0, 0, %%s)")
    b = _Call(dsn, sql % "B", (_ids(3), queue, ["{}"] * 3, [k2, k0, k1]))
    _await(lambda: _waiting(dsn, "B", schema), "batch B to wait for k0")
    a = _Call(dsn, sql % "A", (_ids(2), queue, ["{}"] * 2, [k1, k2]))
    _await(lambda: _waiting(dsn, "A", schema) or not a.is_alive(), "batch A to wait or end")
    holder.commit()
    holder.close()
    got_a, got_b = a.result(), b.result()
    with psycopg.connect(dsn, autocommit=True) as conn:
        by_key = dict(conn.execute(f"SELECT idempotency_key, id FROM {s}.runs WHERE queue = %s",
                                   (queue,)).fetchall())
    assert len(by_key) == 3
    assert [r[0] for r in got_a] == [by_key[k1], by_key[k2]]
    assert [r[0] for r in got_b] == [by_key[k2], by_key[k0], by_key[k1]]


# -- what a conflict that does happen looks like to a caller ----------------------------


def _plain_runs(dsn: str, schema: str, n: int) -> dict[uuid.UUID, int]:
    """``n`` running runs without parents (ids ascending), claimed by a fake worker."""
    s = _q(schema)
    queue = f"q{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for rid in _ids(n):
            conn.execute(f"SELECT * FROM {s}.start_run(%s, 'w', %s, '{{}}'::json)", (rid, queue))
        rows = conn.execute(f"SELECT id, lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], %s, 60)",
                            (uuid.uuid4(), queue, n)).fetchall()
    return dict(sorted(rows, key=lambda r: str(r[0])))


def _wrong_way_round(dsn: str, schema: str, first: uuid.UUID,
                     second: uuid.UUID) -> tuple[_Blocker, psycopg.Connection[Any]]:
    """Set up a deadlock the store's statement must lose, whatever the lock
    order: ``first`` is held by one transaction (the store's statement will
    wait for it), ``second`` by another, a DBA's, with deadlock_timeout 10 min
    (so only the store's backend ever runs the deadlock check). Returns the
    first holder and the DBA's connection."""
    holder = _Blocker(dsn).lock(schema, first)
    dba = psycopg.connect(dsn)
    dba.execute("SET LOCAL deadlock_timeout = '10min'")
    dba.execute(f"SELECT 1 FROM {_q(schema)}.runs WHERE id = %s FOR UPDATE", (second,))
    return holder, dba


@pytest.mark.parametrize("tries", [None, 1])
async def test_a_deadlock_in_a_store_call_is_retried_not_an_outage(
        pgjournal_app: pgjournal.App, caplog: pytest.LogCaptureFixture,
        tries: int | None) -> None:
    """A batch completion loses a deadlock against a transaction that takes
    its two rows the other way round. The store retries it (with jitter) and
    it completes; with no retries left it is a ``TransactionConflict`` -- never
    ``DatabaseUnavailable`` ("database connection failed"), which made the
    worker drop the batch and every run in it wait out its lease.

    Forced: the first row is held elsewhere, so the completion waits for it;
    the other transaction holds the second row and asks for the first (it
    queues behind the completion); the first row is let go: the completion
    takes it, asks for the second, and closes the cycle."""
    app = pgjournal_app
    dsn, schema = app.dsn, app.schema
    caplog.set_level(logging.INFO, logger="pgjournal.store")
    store = await app.store()
    if tries is not None:
        store.conflict_tries = tries
    runs = _plain_runs(dsn, schema, 2)
    first, second = runs
    holder, dba = _wrong_way_round(dsn, schema, first, second)
    call = asyncio.create_task(store.complete_runs(
        [(rid, epoch, '"x"') for rid, epoch in runs.items()]))
    await wait_for(lambda: asyncio.to_thread(_waits, dsn, f'"{schema}".complete_runs'),
                   what="the completion to wait for the first row")
    took_first = threading.Thread(target=lambda: dba.execute(
        f"SELECT /* DBA */ 1 FROM {_q(schema)}.runs WHERE id = %s FOR UPDATE", (first,)))
    took_first.start()
    await wait_for(lambda: asyncio.to_thread(_waiting, dsn, "DBA", schema),
                   what="the DBA's transaction to queue for the first row")
    holder.release()
    # The completion closes the cycle and is chosen as the victim; its locks go,
    # so the DBA's transaction gets the first row.
    await asyncio.to_thread(took_first.join, 30)
    assert not took_first.is_alive()
    dba.commit()
    dba.close()
    if tries == 1:
        with pytest.raises(TransactionConflict) as caught:
            await call
        assert not isinstance(caught.value, DatabaseUnavailable)
        assert "database connection failed" not in str(caught.value)
        assert "deadlock" in str(caught.value)
        return
    assert await call == set(runs)
    assert "deadlock detected" in caplog.text and "retry" in caplog.text, caplog.text


def _isolated_dsn(pg: TestPostgres, level: str) -> str:
    """The server's DSN (direct: PgBouncer refuses startup options) with a
    default isolation level, as a DBA might set for the database."""
    return make_conninfo(pg.dsn, options=f"-c default_transaction_isolation={level}")


async def test_a_serialization_failure_in_a_store_call_is_retried(
        pgjournal_postgres: TestPostgres, pgjournal_schema: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """On a database whose default isolation is repeatable read (or
    serializable), a completion that waited for a row another transaction
    then changed fails with 40001; taken again it succeeds."""
    caplog.set_level(logging.INFO, logger="pgjournal.store")
    dsn = _isolated_dsn(pgjournal_postgres, "repeatable\\ read")
    app = pgjournal.App(dsn, schema=pgjournal_schema)
    try:
        store = await app.store()
        runs = _plain_runs(pgjournal_postgres.dsn, pgjournal_schema, 1)
        (rid, epoch), = runs.items()
        other = psycopg.connect(pgjournal_postgres.dsn)
        other.execute(f"UPDATE {_q(pgjournal_schema)}.runs SET updated_at = now() "
                      "WHERE id = %s", (rid,))
        call = asyncio.create_task(store.complete_runs([(rid, epoch, '"x"')]))
        await wait_for(lambda: asyncio.to_thread(
            _waits, pgjournal_postgres.dsn, f'"{pgjournal_schema}".complete_runs'),
            what="the completion to wait for the row")
        other.commit()
        other.close()
        assert await call == {rid}
        assert "could not serialize" in caplog.text, caplog.text
    finally:
        await app.close()


@pytest.mark.parametrize("tries", [None, 1])
async def test_a_completion_that_hits_a_conflict_is_not_dropped(
        pgjournal_postgres: TestPostgres, pgjournal_schema: str,
        caplog: pytest.LogCaptureFixture, tries: int | None) -> None:
    """A worker's completion fails with 40001 (the run's row changed by another
    transaction while the completion waited for it; repeatable read by
    default). It is taken again: the run completes at once, its lease is not
    waited out, no recovery is counted and nothing says "database
    unavailable". ``tries=1``: the store gives up at once and the worker's
    completer sends the batch again."""
    caplog.set_level(logging.INFO)
    dsn = _isolated_dsn(pgjournal_postgres, "repeatable\\ read")
    app = pgjournal.App(dsn, schema=pgjournal_schema, poll_interval=0.1)
    # The caller's side (start, result) on its own app: ``tries`` is the worker's.
    client = pgjournal.App(pgjournal_postgres.dsn, schema=pgjournal_schema)
    entered, finish = asyncio.Event(), asyncio.Event()

    @app.workflow()
    async def body(run: pgjournal.Run) -> str:
        entered.set()
        await finish.wait()
        return "ok"

    try:
        store = await app.store()
        if tries is not None:
            store.conflict_tries = tries
        async with serving(app, concurrency=1, lease=3, poll_interval=0.1):
            handle = await client.start("body")
            await asyncio.wait_for(entered.wait(), 30)
            other = psycopg.connect(pgjournal_postgres.dsn)
            other.execute(f"UPDATE {_q(pgjournal_schema)}.runs SET updated_at = now() "
                          "WHERE id = %s", (handle.run_id,))
            finish.set()
            await wait_for(lambda: asyncio.to_thread(
                _waits, pgjournal_postgres.dsn, f'"{pgjournal_schema}".complete_runs'),
                what="the completion to wait for the row")
            other.commit()
            other.close()
            assert await handle.result(timeout=60) == "ok"
            info = await handle.info()
        assert info["recoveries"] == 0 and info["interruptions"] == 0, info
        assert "could not serialize" in caplog.text, caplog.text
        # Who took it again: the store, or (it gave up at once) the completer.
        retried = "sending it again" if tries == 1 else "complete_runs lost a conflict"
        assert retried in caplog.text, caplog.text
        assert "unavailable" not in caplog.text, caplog.text
    finally:
        await client.close()
        await app.close()
