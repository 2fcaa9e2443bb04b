"""Parallel steps inside a run (asyncio.gather, TaskGroup, create_task) replay as
they ran: after a suspend, after a retry, and after kill -9 of the worker."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

import pgjournal

from .conftest import Effects, serving, wait_for


async def until_status(handle: pgjournal.RunHandle, status: str) -> None:
    """Await a status the database reports (polled with a deadline)."""
    async def check() -> bool:
        return await handle.status() == status
    await wait_for(check, 30, what=f"run {handle.run_id} to be {status}")


class Calls:
    """Counts real executions of step functions (a replay must not add any)."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def count(self, name: str) -> int:
        return self.log.count(name)


async def test_gather_of_branches_calling_the_same_step_name_replays_after_a_suspend(
        pgjournal_app: pgjournal.App) -> None:
    """The hard case: two branches each call step "summarize" after awaiting a
    step of their own whose duration decides which branch calls first."""
    app = pgjournal_app
    calls = Calls()
    delays = {"a": 0.15, "b": 0.01}   # b's fetch finishes first on the first execution

    async def fetch(who: str) -> str:
        calls.log.append(f"fetch-{who}")
        await asyncio.sleep(delays[who])
        return f"page of {who}"

    def summarize(text: str) -> dict[str, Any]:
        calls.log.append(f"summarize:{text}")
        return {"summary": text.upper(), "len": len(text)}

    async def branch(run: pgjournal.Run, who: str) -> dict[str, Any]:
        page = await run.step(f"fetch-{who}", fetch, who)
        out: dict[str, Any] = await run.step("summarize", summarize, page)
        return out

    @app.workflow()
    async def research(run: pgjournal.Run) -> Any:
        a, b = await asyncio.gather(branch(run, "a"), branch(run, "b"))
        approved = await run.wait_signal("approve")
        return {"a": a, "b": b, "approved": approved}

    async with serving(app):
        handle = await app.start(research)
        store = await app.store()
        await until_status(handle, "suspended")
        # On replay, a's fetch would now be the faster one: only the journaled
        # delivery order can keep the branches apart.
        delays.update(a=0.0, b=0.2)
        await app.signal(handle.run_id, "approve", True)
        result = await handle.result(timeout=30)
    assert result == {
        "a": {"summary": "PAGE OF A", "len": 9},
        "b": {"summary": "PAGE OF B", "len": 9},
        "approved": True,
    }
    for name in ("fetch-a", "fetch-b", "summarize:page of a", "summarize:page of b"):
        assert calls.count(name) == 1, calls.log
    steps = await store.get_steps(handle.run_id)
    summaries = [s for s in steps if s["name"] == "summarize"]
    # b's summary was asked for first, so it holds occurrence 0.
    assert [s["output"]["summary"] for s in sorted(summaries, key=lambda s: s["occurrence"])] \
        == ["PAGE OF B", "PAGE OF A"]


async def test_one_step_name_over_a_list_and_taskgroup_replay_on_retry(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls = Calls()

    async def search(q: str, delay: float) -> list[str]:
        calls.log.append(f"search:{q}")
        await asyncio.sleep(delay)
        return [f"{q}-1", f"{q}-2"]

    def finish(attempt: int) -> str:
        calls.log.append(f"finish@{attempt}")
        if attempt == 1:
            raise ConnectionError("writer down")
        return "written"

    @app.workflow(max_attempts=2, retry_backoff=0.01)
    async def agent(run: pgjournal.Run, queries: list[str]) -> Any:
        # Later queries finish first on the first execution.
        hits = await asyncio.gather(*[
            run.step("search", search, q, 0.02 * (len(queries) - i))
            for i, q in enumerate(queries)])
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(run.step("rank", lambda: calls.log.append("rank") or 1))
            t2 = tg.create_task(run.uuid())
        extra = asyncio.create_task(run.step("note", lambda: calls.log.append("note") or "n"))
        note = await extra
        done = await run.step("finish", finish, run.attempt)
        return {"hits": hits, "rank": t1.result(), "uuid": str(t2.result()), "note": note,
                "done": done}

    queries = ["q0", "q1", "q2", "q3"]
    async with serving(app):
        handle = await app.start(agent, queries)
        result = await handle.result(timeout=30)
    assert result["hits"] == [[f"{q}-1", f"{q}-2"] for q in queries]
    assert result["done"] == "written" and result["rank"] == 1 and result["note"] == "n"
    for q in queries:
        assert calls.count(f"search:{q}") == 1, calls.log
    assert calls.count("rank") == 1 and calls.count("note") == 1
    assert calls.log.count("finish@1") == 1 and calls.log.count("finish@2") == 1
    info = await handle.info()
    assert info["attempt"] == 2


async def test_a_pattern_that_cannot_replay_fails_instead_of_swapping_results(
        pgjournal_app: pgjournal.App) -> None:
    """Branches that reach the same step name after a non-journaled wait whose
    duration changes between executions: the replay must refuse, never hand
    branch a's result to branch b."""
    app = pgjournal_app
    order = {"a": 0.0, "b": 0.1}

    async def branch(run: pgjournal.Run, who: str) -> str:
        await asyncio.sleep(order[who])       # not journaled: forbidden in branches
        out: str = await run.step("ask", lambda w: f"answer for {w}", who)
        return out

    @app.workflow(max_attempts=1)
    async def racy(run: pgjournal.Run) -> Any:
        got = await asyncio.gather(branch(run, "a"), branch(run, "b"))
        await run.wait_signal("go")
        return got

    async with serving(app):
        handle = await app.start(racy)
        await until_status(handle, "suspended")
        order.update(a=0.1, b=0.0)
        await app.signal(handle.run_id, "go")
        with pytest.raises(pgjournal.RunFailed, match="NonDeterminismError"):
            await handle.result(timeout=30)


async def test_parallel_branches_survive_kill_9(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    app = pgjournal_app
    handle = await app.start("parallel", 3)
    first = spawn_worker(env={"PGJ_BLOCK": "b1-late"}, lease=2)
    await effects.wait(handle.run_id, "b1-late")
    first.kill(signal.SIGKILL)
    first.wait()
    spawn_worker(lease=2)
    result = await handle.result(timeout=60)
    assert result == [[f"b{i}-early", f"b{i}-shared", f"b{i}-late"] for i in range(3)]
    rows = effects.rows(handle.run_id)
    counts: dict[str, int] = {}
    for _r, step, _p in rows:
        counts[step] = counts.get(step, 0) + 1
    assert counts.pop("b1-late") == 2     # cut by the kill, never journaled
    assert set(counts.values()) == {1}, counts
