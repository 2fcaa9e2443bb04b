"""Crash tests with real processes: kill -9 of a worker, a worker paused past its
lease (SIGSTOP), and kill -9 of the PostgreSQL server under load."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import psycopg

import pgjournal
from pgjournal.embedded import EmbeddedServer

from .conftest import Effects, lease_expired, wait_for


async def _run_row(app: pgjournal.App, run_id: Any) -> dict[str, Any]:
    row = await (await app.store()).get_run(run_id)
    assert row is not None
    return row


async def test_kill9_in_step_3_of_5_resumes_on_another_worker(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("five_steps", 5)
    first = spawn_worker(env={"PGJ_BLOCK": "s3"}, lease=2)
    await effects.wait(handle.run_id, "s3")
    first.kill(signal.SIGKILL)
    first.wait()
    second = spawn_worker(lease=2)
    assert await handle.result(timeout=60) == "s1,s2,s3,s4,s5"

    assert effects.count(handle.run_id, "s1") == 1
    assert effects.count(handle.run_id, "s2") == 1
    assert effects.count(handle.run_id, "s3") == 2  # interrupted once, never journaled
    assert effects.count(handle.run_id, "s4") == 1
    assert effects.count(handle.run_id, "s5") == 1
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [(s["position"], s["name"]) for s in steps] == [
        (0, "s1"), (1, "s2"), (2, "s3"), (3, "s4"), (4, "s5")]
    row = await _run_row(app, handle.run_id)
    assert row["recoveries"] == 1 and row["attempt"] == 1
    assert {p for _r, s, p in effects.rows(handle.run_id) if s in ("s4", "s5")} == {second.pid}


async def test_worker_paused_past_its_lease_writes_nothing(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("five_steps", 3)
    stale = spawn_worker(env={"PGJ_SLOW": "s2:2"}, lease=1)
    await effects.wait(handle.run_id, "s2")
    os.kill(stale.pid, signal.SIGSTOP)
    try:
        await wait_for(lambda: lease_expired(store, handle.run_id), 30, what="lease expiry")
        fresh = spawn_worker(lease=5)
        assert await handle.result(timeout=60) == "s1,s2,s3"
        journal_before = await store.get_steps(handle.run_id)
        run_before = await _run_row(app, handle.run_id)
    finally:
        os.kill(stale.pid, signal.SIGCONT)

    async def noticed() -> bool:
        return "lost the lease" in stale.output()

    await wait_for(noticed, 30, what="the stale worker to log that it lost the lease")
    assert await store.get_steps(handle.run_id) == journal_before
    assert await _run_row(app, handle.run_id) == run_before
    epochs = {s["name"]: s["lease_epoch"] for s in journal_before}
    assert epochs == {"s1": 1, "s2": 2, "s3": 2}
    assert {p for _r, s, p in effects.rows(handle.run_id) if s == "s3"} == {fresh.pid}


async def test_postgres_killed_under_load_loses_nothing(
        pgjournal_server_factory: Any, spawn_worker: Any) -> None:
    server: EmbeddedServer = pgjournal_server_factory(settings={})  # durable: it will crash
    schema = "crashy"
    pgjournal.migrate(server.dsn, schema=schema)
    effects = Effects(server.dsn, schema)
    app = pgjournal.App(server.dsn, schema=schema, poll_interval=0.2)
    try:
        handles = [await app.start("chain", 6) for _ in range(30)]
        workers = [spawn_worker(dsn=server.dsn, schema=schema, lease=2, concurrency=4,
                                env={"PGJ_SLOW": "tick2:0.2"}) for _ in range(2)]

        async def some_progress() -> bool:
            return len(await asyncio.to_thread(effects.rows)) >= 20

        await wait_for(some_progress, 60, what="some steps to run")
        server.kill()
        server.start()
        results = [await h.result(timeout=120) for h in handles]
        assert results == [6] * 30
        assert all(w.proc.poll() is None for w in workers), "workers survived the outage"
        with psycopg.connect(server.dsn) as conn:
            late = conn.execute(
                f'SELECT e.run_id, e.step FROM "{schema}".test_effects e '
                f'JOIN "{schema}".steps s ON s.run_id::text = e.run_id '
                "AND s.output::jsonb = to_jsonb(e.step) WHERE e.at > s.finished_at").fetchall()
            assert late == [], "a step ran again after its result was journaled"
            counts = conn.execute(
                f'SELECT count(*), count(DISTINCT (run_id, position)) FROM "{schema}".steps'
            ).fetchone()
            assert counts == (180, 180)
            statuses = conn.execute(
                f'SELECT status, count(*) FROM "{schema}".runs GROUP BY 1').fetchall()
            assert statuses == [("completed", 30)]
    finally:
        await app.close()
