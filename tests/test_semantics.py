"""Runtime semantics: retries, cancel, priorities, delays, limits, replay checks."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, serving, wait_for


async def test_retries_with_backoff_keep_the_journal(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls: list[str] = []

    def flaky(attempt: int) -> str:
        calls.append(f"flaky@{attempt}")
        if attempt < 3:
            raise ConnectionError(f"model API down (attempt {attempt})")
        return "ok"

    @app.workflow(max_attempts=3, retry_backoff=0.05)
    async def wf(run: pgjournal.Run) -> str:
        await run.step("expensive", lambda: calls.append("expensive") or "done")
        return await run.step("flaky", flaky, run.attempt)

    async with serving(app):
        handle = await app.start(wf)
        assert await handle.result(timeout=20) == "ok"
    assert calls == ["expensive", "flaky@1", "flaky@2", "flaky@3"]
    info = await handle.info()
    assert info["attempt"] == 3
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [(s["name"], s["status"], s["tries"]) for s in steps] == [
        ("expensive", "completed", 1), ("flaky", "completed", 3)]
    events = await (await app.store()).get_events(handle.run_id)
    retried = [e for e in events if (e["from_status"], e["to_status"]) == ("running", "queued")]
    assert [e["detail"]["type"] for e in retried] == ["ConnectionError", "ConnectionError"]


async def test_attempts_exhausted_fail_with_error_and_traceback(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow(max_attempts=2, retry_backoff=0.01)
    async def doomed(run: pgjournal.Run) -> None:
        raise ValueError("bad plan")

    async with serving(app):
        handle = await app.start(doomed)
        with pytest.raises(pgjournal.RunFailed, match="ValueError: bad plan") as info:
            await handle.result(timeout=20)
    assert "Traceback" in info.value.error["traceback"]
    assert (await handle.info())["attempt"] == 2


async def test_step_error_replays_as_same_exception_and_terminal_error_skips_retries(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    runs_of_bad: list[int] = []

    def bad() -> None:
        runs_of_bad.append(1)
        raise KeyError("missing")

    @app.workflow(max_attempts=3, retry_backoff=0.01)
    async def caught(run: pgjournal.Run) -> str:
        try:
            await run.step("bad", bad)
        except KeyError as exc:
            seen = repr(exc)
        await run.sleep("pause", 0.05)  # suspend, so the next claim replays "bad"
        return seen

    @app.workflow(max_attempts=5)
    async def terminal(run: pgjournal.Run) -> None:
        raise pgjournal.TerminalError("no point retrying")

    async with serving(app):
        assert await (await app.start(caught)).result(timeout=20) == "KeyError('missing')"
        handle = await app.start(terminal)
        with pytest.raises(pgjournal.RunFailed, match="no point retrying"):
            await handle.result(timeout=20)
    assert runs_of_bad == [1], "the journaled failure was replayed, not re-executed"
    assert (await handle.info())["attempt"] == 1


async def test_cancel_queued_suspended_and_running(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    ticks: list[int] = []

    @app.workflow()
    async def waits(run: pgjournal.Run) -> None:
        await run.wait_signal("never")

    @app.workflow()
    async def busy(run: pgjournal.Run) -> None:
        for i in range(1000):
            await run.step("tick", asyncio.sleep, 0.02)
            ticks.append(i)

    async with pgjournal.App(app.dsn, schema=app.schema) as client:  # client-only: any name
        queued = await client.start("nobody_serves_this", queue="idle")
    assert await app.cancel(queued.run_id) == "cancelled"
    with pytest.raises(pgjournal.Cancelled):
        await queued.result(timeout=5)

    async with serving(app):
        suspended = await app.start(waits)
        await wait_for(lambda: _status(app, suspended, "suspended"), 20)
        running = await app.start(busy)
        await wait_for(lambda: _async(len(ticks) >= 3), 20, what="busy to tick")
        assert await app.cancel(suspended.run_id) == "cancelled"
        assert await app.cancel(running.run_id) == "cancelled"
        with pytest.raises(pgjournal.Cancelled):
            await running.result(timeout=5)
        at_cancel = len(ticks)
        steps_at_cancel = len(await (await app.store()).get_steps(running.run_id))
        await wait_for(lambda: _async(not any(t.get_name() == f"run:{running.run_id}"
                                               for t in asyncio.all_tasks())), 10)
    assert len(ticks) <= at_cancel + 1, "stopped at the next step boundary"
    assert len(await (await app.store()).get_steps(running.run_id)) == steps_at_cancel
    assert await app.cancel(running.run_id) == "cancelled"  # idempotent


async def test_retry_requeues_a_failed_run_keeping_completed_steps(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls: list[str] = []
    broken = [True]

    def second() -> str:
        calls.append("second")
        if broken[0]:
            raise RuntimeError("downstream broken")
        return "fixed"

    @app.workflow(max_attempts=1)
    async def wf(run: pgjournal.Run) -> str:
        await run.step("first", lambda: calls.append("first") or 1)
        return await run.step("second", second)

    async with serving(app):
        handle = await app.start(wf)
        with pytest.raises(pgjournal.RunFailed):
            await handle.result(timeout=20)
        broken[0] = False
        assert await app.retry(handle.run_id) == "queued"
        assert await handle.result(timeout=20) == "fixed"
    assert calls == ["first", "second", "second"]
    with pytest.raises(pgjournal.InvalidState):
        await app.retry(handle.run_id)


async def test_priority_order_and_delayed_start(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    order: list[str] = []

    @app.workflow()
    async def job(run: pgjournal.Run, label: str) -> None:
        order.append(label)

    for label, prio in [("low", 0), ("high", 10), ("mid", 5), ("low2", 0), ("top", 20)]:
        await app.start(job, label, priority=prio)
    delayed = await app.start(job, "delayed", delay=1.0, priority=100)
    async with serving(app, concurrency=1):
        await delayed.result(timeout=20)
    assert order == ["top", "high", "mid", "low", "low2", "delayed"]
    info = await delayed.info()
    assert (info["started_at"] - info["created_at"]).total_seconds() >= 1.0


async def test_queue_concurrency_limit_holds_across_three_worker_processes(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    await app.set_queue("limited", concurrency_limit=2)
    for _ in range(3):
        spawn_worker(concurrency=4)

    async def three_workers_listening() -> bool:
        async with (await app.store()).pool.connection() as conn:
            cur = await conn.execute(
                f'SELECT count(*) AS n FROM "{pgjournal_schema}".workers')
            row = await cur.fetchone()
        return bool(row and row["n"] == 3)

    # All three compete for the queue from the moment the runs arrive.
    await wait_for(three_workers_listening, 30, what="three workers to register")
    handles = [await app.start("limited", 0.3, queue="limited") for _ in range(8)]
    for h in handles:
        assert await h.result(timeout=60) == "ok"
    with psycopg.connect(pgjournal_dsn) as conn:
        intervals = conn.execute(
            f'SELECT min(at) FILTER (WHERE step = \'hold\'), '
            f'max(at) FILTER (WHERE step = \'release\'), min(pid) '
            f'FROM "{pgjournal_schema}".test_effects GROUP BY run_id').fetchall()
    events = sorted([(start, 1) for start, _end, _p in intervals]
                    + [(end, -1) for _start, end, _p in intervals])
    running = peak = 0
    for _at, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2, f"at most 2 at once across all workers, saw {peak}"


async def test_non_determinism_is_detected_and_named(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow(max_attempts=2, retry_backoff=0.01)
    async def fickle(run: pgjournal.Run) -> None:
        if run.attempt == 1:
            await run.step("fetch", lambda: 1)
            raise RuntimeError("try again")
        await run.step("summarise", lambda: 2)

    async with serving(app):
        handle = await app.start(fickle)
        with pytest.raises(pgjournal.RunFailed) as info:
            await handle.result(timeout=20)
    err = info.value.error
    assert err["type"] == "NonDeterminismError"
    assert "'summarise'" in err["message"] and "'fetch'" in err["message"]
    assert (await handle.info())["attempt"] == 2


async def test_a_step_called_ten_times_journals_and_replays_ten_entries(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    executed: list[int] = []

    def llm(i: int) -> str:
        executed.append(i)
        return f"answer {i}"

    @app.workflow()
    async def loop(run: pgjournal.Run) -> list[str]:
        answers = [await run.step("llm", llm, i) for i in range(10)]
        await run.sleep("pause", 0.05)  # suspend: the resumed run replays all ten
        answers.append(await run.step("llm", llm, 10))
        return answers

    async with serving(app):
        out = await (handle := await app.start(loop)).result(timeout=20)
    assert out == [f"answer {i}" for i in range(11)]
    assert executed == list(range(11)), "each call ran exactly once"
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [(s["name"], s["occurrence"]) for s in steps if s["kind"] == "step"] == [
        ("llm", i) for i in range(11)]


async def test_now_and_uuid_are_journaled(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    seen: list[tuple[Any, Any]] = []

    @app.workflow()
    async def stamp(run: pgjournal.Run) -> str:
        pair = (await run.now(), await run.uuid())
        seen.append(pair)
        await run.sleep("pause", 0.05)
        return str(pair[1])

    async with serving(app):
        out = await (await app.start(stamp)).result(timeout=20)
    assert len(seen) == 2 and seen[0] == seen[1] and out == str(seen[0][1])


async def test_wake_up_does_not_depend_on_polling(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow()
    async def quick(run: pgjournal.Run) -> str:
        return "awake"

    async with serving(app, poll_interval=120) as worker:
        async def hungry() -> bool:  # idle on LISTEN, and enqueues know to NOTIFY it
            async with (await app.store()).pool.connection() as conn:
                cur = await conn.execute(
                    f'SELECT hungry FROM "{app.schema}".worker_health WHERE id = %s',
                    (worker.id,))
                row = await cur.fetchone()
            return bool(row and row["hungry"])

        await wait_for(hungry, 20, what="the worker to go hungry")
        handle = await app.start(quick)
        # With a 120 s poll, only NOTIFY can get this done inside the timeout.
        assert await handle.result(timeout=15) == "awake"


async def test_poison_run_is_parked_dead(pgjournal_app: pgjournal.App, effects: Effects,
                                         spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("five_steps", 5)
    async with (await app.store()).pool.connection() as conn:
        await conn.execute(
            f'UPDATE "{app.schema}".runs SET max_recoveries = 1 WHERE id = %s',
            (handle.run_id,))
    for crash in range(2):
        w = spawn_worker(env={"PGJ_BLOCK": "s1"}, lease=1)
        await effects.wait(handle.run_id, "s1", n=crash + 1)
        w.kill(signal.SIGKILL)
        w.wait()
    spawn_worker(lease=1)
    with pytest.raises(pgjournal.RunFailed, match=r"dead.*PoisonRun") as info:
        await handle.result(timeout=30)
    assert info.value.status == "dead"
    assert effects.count(handle.run_id, "s1") == 2


async def test_graceful_stop_releases_leases_after_grace(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    started = asyncio.Event()

    @app.workflow()
    async def slow(run: pgjournal.Run) -> str:
        started.set()
        await run.step("long", asyncio.sleep, 30)
        return "finished"

    worker = pgjournal.Worker(app, concurrency=1, lease=30, grace_period=0.2)
    task = asyncio.create_task(worker.run(handle_signals=False))
    handle = await app.start(slow)
    await asyncio.wait_for(started.wait(), 20)
    worker.stop()
    await task
    info = await handle.info()
    assert info["status"] == "queued" and info["worker_id"] is None
    assert info["recoveries"] == 0, "a release is not a crash recovery"


async def _status(app: pgjournal.App, handle: pgjournal.RunHandle, status: str) -> bool:
    return await handle.status() == status


async def _async(value: bool) -> bool:
    return value
