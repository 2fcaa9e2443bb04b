"""Issue 9, worker side of migration 0005: a DBA's row lock during heartbeats
(row 6), workers claiming only the workflows they know (row 8), idempotent
signals (row 14). Real worker processes where the behaviour is a process's."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, wait_for


def _rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


async def test_dba_row_lock_on_one_run_does_not_cost_the_other_leases(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """A DBA holds one of a worker's three run rows FOR UPDATE for 3x the lease
    while a second worker serves the queue: the other two runs are never taken
    over, and no step's side effect happens twice (the locked run may move)."""
    app, dsn, schema = pgjournal_app, pgjournal_dsn, pgjournal_schema
    lease = 2.0
    handles = [await app.start("paced", 40, 0.25) for _ in range(3)]
    first = spawn_worker(lease=lease, concurrency=3)

    async def all_three_on_first() -> bool:
        rows = await asyncio.to_thread(
            _rows, dsn, f'SELECT count(DISTINCT worker_id), count(*) FROM "{schema}".runs '
            "WHERE status = 'running'")
        return rows[0] == (1, 3)

    await wait_for(all_three_on_first, 30, what="the first worker to hold all three runs")
    second = spawn_worker(lease=lease, concurrency=3)

    async def second_registered() -> bool:
        rows = await asyncio.to_thread(
            _rows, dsn, f'SELECT count(*) FROM "{schema}".workers WHERE pid = %s', second.pid)
        return rows[0][0] == 1

    await wait_for(second_registered, 30, what="the second worker to register")
    # The lowest id: a heartbeat locking its runs in id order meets it first.
    locked = min(h.run_id for h in handles)
    with psycopg.connect(dsn) as dba:
        dba.execute(f'SELECT 1 FROM "{schema}".runs WHERE id = %s FOR UPDATE', (locked,))
        await asyncio.sleep(3 * lease)  # the DBA's transaction lasts this long
        dba.commit()
    results = [await h.result(timeout=120) for h in handles]
    assert results == [40, 40, 40]
    store = await app.store()
    for h in handles:
        row = await store.get_run(h.run_id)
        assert row is not None
        if h.run_id != locked:
            assert row["recoveries"] == 0, f"run {h.run_id} was taken over: {row}"
        counts = Counter(s for _r, s, _p in effects.rows(h.run_id))
        assert counts == Counter({f"p{i}": 1 for i in range(40)}), (
            f"run {h.run_id}: steps executed twice: "
            f"{[s for s, n in counts.items() if n > 1]}\n{first.output()[-3000:]}")


async def test_worker_claims_only_workflows_it_registered(
        pgjournal_app: pgjournal.App) -> None:
    """Rolling deploy: a run of a workflow this worker does not know stays queued
    (a newer worker will take it) instead of failing with UnknownWorkflow."""
    app = pgjournal_app

    @app.workflow()
    async def known(run: pgjournal.Run) -> str:
        return "known"

    async with pgjournal.App(app.dsn, schema=app.schema) as client:  # client-only
        newer = await client.start("added_in_the_next_release")
    worker = pgjournal.Worker(app, concurrency=2, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        first = await app.start(known)
        assert await first.result(timeout=20) == "known"
        second = await app.start(known)
        assert await second.result(timeout=20) == "known"
        row = await (await app.store()).get_run(newer.run_id)
        assert row is not None and row["status"] == "queued", row
        assert row["attempt"] == 1 and row["error"] is None
    finally:
        worker.stop()
        await task

    # A worker of the next release knows it and runs it.
    newer_app = pgjournal.App(app.dsn, schema=app.schema, poll_interval=0.2)

    @newer_app.workflow()
    async def added_in_the_next_release(run: pgjournal.Run) -> str:
        return "new"

    worker = pgjournal.Worker(newer_app, concurrency=2, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        assert await newer.result(timeout=20) == "new"
    finally:
        worker.stop()
        await task
        await newer_app.close()


async def test_signal_with_idempotency_key_is_delivered_once(
        pgjournal_app: pgjournal.App) -> None:
    """A client retries app.signal after a connection drop (commit outcome
    unknown): with the same idempotency key the run gets the signal once."""
    app = pgjournal_app
    got: list[Any] = []

    @app.workflow()
    async def two_waits(run: pgjournal.Run) -> list[Any]:
        for _ in range(2):
            try:
                got.append(await run.wait_signal("review", timeout=1.5))
            except TimeoutError:
                got.append("timeout")
        return got

    handle = await app.start(two_waits)
    for _ in range(3):  # the first send, and two retries of it
        await app.signal(handle.run_id, "review", {"ok": True}, idempotency_key="rev-1")
    await handle.signal("review", {"ok": False}, idempotency_key="rev-2")
    await app.signal(handle.run_id, "review", {"ok": False}, idempotency_key="rev-2")
    store = await app.store()
    signals = await store.get_signals(handle.run_id)
    assert [s["payload"] for s in signals] == [{"ok": True}, {"ok": False}]
    ids = {await store.send_signal(handle.run_id, "review", {"ok": True},
                                   idempotency_key="rev-1") for _ in range(2)}
    assert ids == {signals[0]["id"]}
    worker = pgjournal.Worker(app, concurrency=1, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        assert await handle.result(timeout=30) == [{"ok": True}, {"ok": False}]
    finally:
        worker.stop()
        await task
    with pytest.raises(pgjournal.InvalidState):  # ended: a new key is refused as before
        await app.signal(handle.run_id, "review", 1, idempotency_key=str(uuid.uuid4()))
