"""Signals and durable sleep: suspended runs hold no worker and resume anywhere."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, wait_for


async def _status_is(app: pgjournal.App, run_id: Any, status: str) -> bool:
    row = await (await app.store()).get_run(run_id)
    return bool(row and row["status"] == status)


async def test_signal_sent_before_the_wait(pgjournal_app: pgjournal.App, effects: Effects,
                                           spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("waiter", ["approve"])
    await app.signal(handle.run_id, "approve", {"ok": True})
    spawn_worker()
    assert await handle.result(timeout=30) == [{"ok": True}]


async def test_signal_after_the_wait_resumes_on_another_worker(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("waiter", ["go"])
    first = spawn_worker()
    await wait_for(lambda: _status_is(app, handle.run_id, "suspended"), 30,
                   what="the run to suspend")
    row = await (await app.store()).get_run(handle.run_id)
    assert row is not None and row["worker_id"] is None and row["wait_signal"] == "go"
    first.kill(signal.SIGKILL)
    first.wait()
    second = spawn_worker()
    await app.signal(handle.run_id, "go", 7)
    assert await handle.result(timeout=30) == [7]
    assert {p for _r, s, p in effects.rows(handle.run_id)} == {second.pid}


async def test_wait_timeout_raises_in_the_workflow(pgjournal_app: pgjournal.App,
                                                   effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("waiter", ["never"], timeout=1.0)
    spawn_worker()
    assert await handle.result(timeout=30) == ["timeout"]
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [(s["kind"], s["status"], s["error"]["type"] if s["error"] else None)
            for s in steps] == [("signal", "failed", "TimeoutError"), ("step", "completed", None)]


async def test_two_signals_of_one_name_consumed_in_order_once_each(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("waiter", ["x", "x"])
    await app.signal(handle.run_id, "x", "first")
    spawn_worker()
    await wait_for(lambda: _status_is(app, handle.run_id, "suspended"), 30,
                   what="the run to wait for the second x")
    # One transaction: sent one by one, the run could consume "second" and end
    # before "spare" is sent (which is then refused: the run has ended).
    with psycopg.connect(pgjournal_dsn) as conn:
        for payload in ("second", "spare"):
            conn.execute(f'SELECT "{pgjournal_schema}".send_signal(%s, %s, %s)',
                         (handle.run_id, "x", f'"{payload}"'))
    assert await handle.result(timeout=30) == ["first", "second"]
    with psycopg.connect(pgjournal_dsn) as conn:
        rows = conn.execute(
            f'SELECT payload, consumed_position FROM "{pgjournal_schema}".signals '
            "WHERE run_id = %s ORDER BY id", (handle.run_id,)).fetchall()
    assert rows == [("first", 0), ("second", 2), ("spare", None)]


async def test_signal_to_ended_run_is_refused(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    handle = await app.start("anything")
    await app.cancel(handle.run_id)
    with pytest.raises(pgjournal.InvalidState, match="already ended"):
        await app.signal(handle.run_id, "late", 1)


async def test_durable_sleep_survives_worker_restart_and_holds_no_worker(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("sleeper", 2.0)
    first = spawn_worker()
    await wait_for(lambda: _status_is(app, handle.run_id, "suspended"), 30,
                   what="the run to start sleeping")
    row = await (await app.store()).get_run(handle.run_id)
    assert row is not None and row["worker_id"] is None and row["due_at"] is not None
    first.kill(signal.SIGKILL)
    first.wait()
    second = spawn_worker()
    assert await handle.result(timeout=30) == "rested"
    assert effects.count(handle.run_id, "before") == 1
    assert effects.count(handle.run_id, "after") == 1
    assert {p for _r, s, p in effects.rows(handle.run_id) if s == "after"} == {second.pid}
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [s["kind"] for s in steps] == ["step", "sleep", "step"]
    woke = await (await app.store()).get_events(handle.run_id)
    assert ("running", "suspended") in [(e["from_status"], e["to_status"]) for e in woke]
    assert (steps[2]["started_at"] - steps[0]["finished_at"]).total_seconds() >= 2.0


async def test_stream_step_replays_journaled_chunks(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    produced: list[str] = []

    async def tokens(n: int) -> Any:
        for i in range(n):
            produced.append(f"t{i}")
            yield f"t{i}"

    @app.workflow()
    async def streamer(run: pgjournal.Run) -> list[str]:
        got = [c async for c in run.stream_step("llm", tokens, 5)]
        await run.sleep("pause", 0.05)  # suspend: the next claim replays the stream
        return got

    worker = pgjournal.Worker(app, concurrency=1, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        handle = await app.start(streamer)
        assert await handle.result(timeout=20) == ["t0", "t1", "t2", "t3", "t4"]
    finally:
        worker.stop()
        await task
    assert produced == ["t0", "t1", "t2", "t3", "t4"], "the stream ran once"
    chunks = await (await app.store()).get_chunks(handle.run_id)
    assert [c["chunk"] for c in chunks] == ["t0", "t1", "t2", "t3", "t4"]
