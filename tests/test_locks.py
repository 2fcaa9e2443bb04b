"""Lock order: queue settings changed while workers go idle and busy never
deadlock; a run parked as dead fences its stalled holder off."""

from __future__ import annotations

import asyncio
import logging
import uuid

import psycopg
import pytest

import pgjournal

from .conftest import serving


async def test_queue_settings_change_while_workers_go_idle_and_busy(
        pgjournal_app: pgjournal.App, caplog: pytest.LogCaptureFixture) -> None:
    app = pgjournal_app
    caplog.set_level(logging.WARNING, logger="pgjournal.worker")

    @app.workflow(queue="busy")
    async def blip(run: pgjournal.Run, i: int) -> int:
        return i

    errors: list[BaseException] = []
    done = asyncio.Event()

    async def operator() -> None:
        # The queue row and its advisory lock, taken in the order go_hungry takes them.
        for i in range(300):
            try:
                await app.set_queue("busy", concurrency_limit=None if i % 2 else 2)
            except Exception as exc:  # a deadlock surfaces here or in the worker's claim
                errors.append(exc)
        done.set()

    async def producer() -> None:
        handles = []
        while not done.is_set():
            handles += [await app.start(blip, i) for i in range(3)]  # busy, then idle again
            await asyncio.sleep(0.01)
        for h in handles:
            await h.result(timeout=60)

    async with serving(app, concurrency=2, poll_interval=0.01), \
            serving(app, concurrency=1, poll_interval=0.01):
        await asyncio.gather(operator(), producer())
    assert not errors, errors
    assert "deadlock" not in caplog.text.lower(), caplog.text
    assert "claim failed" not in caplog.text, caplog.text


async def test_a_run_parked_dead_moves_its_epoch_on(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("anything", idempotency_key=None)
    async with store.pool.connection() as conn:
        await conn.execute(
            psycopg.sql.SQL("UPDATE {}.runs SET max_recoveries = 0 WHERE id = %s").format(
                psycopg.sql.Identifier(app.schema)), (handle.run_id,))
    stalled, other = uuid.uuid4(), uuid.uuid4()
    (claim,) = await store.claim(stalled, ["default"], 1, 0.05)
    await asyncio.sleep(0.1)   # the lease (50 ms) runs out: the holder is stalled
    assert await store.claim(other, ["default"], 1, 30) == []
    info = await handle.info()
    assert info["status"] == "dead" and info["lease_epoch"] == claim.epoch + 1
    # The stalled holder wakes up: its write is refused and changes nothing.
    lost = await store.journal_step(run=claim.run_id, epoch=claim.epoch, position=0,
                                    name="late", occurrence=0, kind="step",
                                    status="completed", output='"x"', error=None, attempt=1)
    assert lost == "dead"
    assert await store.get_steps(handle.run_id) == []
