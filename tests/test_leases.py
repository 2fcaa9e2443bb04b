"""Issue 9, worker side: leases under pauses, row locks, schema trouble and pool
pressure; unknown workflows. Real processes and a real PostgreSQL throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, lease_expired, wait_for


async def _steps(app: pgjournal.App, run_id: Any) -> list[str]:
    return [s["name"] for s in await (await app.store()).get_steps(run_id)]


def _lost_lines(output: str, run_id: Any) -> list[str]:
    return [line for line in output.splitlines()
            if "lost the lease" in line and str(run_id) in line]


@contextlib.asynccontextmanager
async def serving(worker: pgjournal.Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        yield task
    finally:
        worker.stop()
        await task


async def _worker_beat(dsn: str, schema: str, worker: uuid.UUID) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT heartbeat_at FROM "{schema}".workers WHERE id = %s',
                           (worker,)).fetchone()
        return row[0] if row else None


async def _db_now(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        return row[0]


# -- row 16: a worker paused past its lease between two steps ------------------

async def test_worker_paused_between_steps_does_not_execute_the_next_step(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    """SIGSTOP after step 'hold' is journaled (the workflow then idles 3 s before
    step 'release'); another worker takes the run over and finishes it; SIGCONT:
    the stale worker is past its local lease deadline, so it must confirm the
    lease before executing 'release', and it finds the run gone."""
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("limited", 3.0)
    stale = spawn_worker(lease=1)

    async def hold_journaled() -> bool:
        return "hold" in await _steps(app, handle.run_id)

    await wait_for(hold_journaled, 30, what="step 'hold' to be journaled")
    os.kill(stale.pid, signal.SIGSTOP)
    try:
        await wait_for(lambda: lease_expired(store, handle.run_id), 30, what="lease expiry")
        fresh = spawn_worker(lease=5)
        assert await handle.result(timeout=60) == "ok"
    finally:
        os.kill(stale.pid, signal.SIGCONT)

    async def noticed() -> bool:
        return bool(_lost_lines(stale.output(), handle.run_id))

    await wait_for(noticed, 30, what="the stale worker to log that it lost the lease")
    assert effects.count(handle.run_id, "hold") == 1
    assert [p for _r, s, p in effects.rows(handle.run_id) if s == "release"] == [fresh.pid], \
        "the paused worker executed the next step after its lease had run out"
    # The stale worker stays up and says so once for the run.
    stale.kill(signal.SIGTERM)
    stale.wait(30)
    assert len(_lost_lines(stale.output(), handle.run_id)) == 1, stale.output()


# -- row 6: the heartbeat loop survives any error ------------------------------

async def test_heartbeat_loop_survives_a_non_connection_error(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A deploy renames the heartbeat function for a moment (an error that is not
    a lost connection): heartbeats fail, are logged, and resume afterwards."""
    app = pgjournal_app
    caplog.set_level(logging.WARNING, logger="pgjournal.worker")

    @app.workflow()
    async def nothing(run: pgjournal.Run) -> None:
        return None

    worker = pgjournal.Worker(app, concurrency=2, lease=1.5)
    async with serving(worker):
        await wait_for(lambda: _worker_beat(pgjournal_dsn, pgjournal_schema, worker.id), 20,
                       what="the worker to register")
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            (fn,) = conn.execute(
                "SELECT p.oid::regprocedure::text FROM pg_proc p "
                "WHERE p.proname = 'heartbeat' AND p.pronamespace = %s::regnamespace",
                (pgjournal_schema,)).fetchone() or (None,)
            assert fn is not None
            conn.execute(f"ALTER FUNCTION {fn} RENAME TO heartbeat_away")
            moved = fn.replace("heartbeat(", "heartbeat_away(", 1)
            try:
                async def failed() -> bool:
                    return any("heartbeat failed" in r.getMessage() for r in caplog.records)

                await wait_for(failed, 20, what="a heartbeat to fail")
            finally:
                conn.execute(f"ALTER FUNCTION {moved} RENAME TO heartbeat")
        restored = await _db_now(pgjournal_dsn)

        async def beating_again() -> bool:
            beat = await _worker_beat(pgjournal_dsn, pgjournal_schema, worker.id)
            return beat is not None and beat > restored

        await wait_for(beating_again, 20, what="heartbeats to resume after the error")


# -- row 13: pool sizing follows the worker; heartbeats never wait for the pool --

async def test_pool_grows_for_a_worker_on_an_open_app_and_heartbeat_has_its_own_connection(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = pgjournal_app

    @app.workflow()
    async def one(run: pgjournal.Run) -> int:
        return 1

    async with app:
        store = await app.store()
        assert store.pool.max_size == 10  # opened at the app's size, before any worker
        worker = pgjournal.Worker(app, concurrency=20, lease=1.5)
        async with serving(worker):
            assert await (await app.start(one)).result(timeout=20) == 1
            assert store.pool.max_size >= 24, "the open pool was not resized for the worker"
            # Journal writes (here: the test) hold every pooled connection.
            held = [await store.pool.getconn() for _ in range(store.pool.max_size)]
            try:
                since = await _db_now(pgjournal_dsn)

                async def beat_landed() -> bool:
                    beat = await _worker_beat(pgjournal_dsn, pgjournal_schema, worker.id)
                    return beat is not None and beat > since

                await wait_for(beat_landed, 10, what="a heartbeat while the pool is exhausted")
            finally:
                for conn in held:
                    await store.pool.putconn(conn)
        assert store.pool.max_size == 10, "the pool did not shrink back when the worker stopped"


# -- row 8: App.start of an unknown name --------------------------------------

async def test_start_of_unknown_workflow_names_the_closest(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow()
    async def agent(run: pgjournal.Run) -> None:
        return None

    @app.workflow()
    async def report(run: pgjournal.Run) -> None:
        return None

    with pytest.raises(pgjournal.UnknownWorkflow, match="did you mean 'agent'") as info:
        await app.start("agnet")
    assert isinstance(info.value, LookupError)
    assert await (await app.store()).list_runs() == [], "nothing was enqueued"
    async with pgjournal.App(app.dsn, schema=app.schema) as client:  # client-only App
        handle = await client.start("agnet")
        assert await handle.status() == "queued"
