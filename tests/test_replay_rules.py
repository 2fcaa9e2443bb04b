"""Replay rules a workflow author relies on: streams cut short, a retried signal
timeout, journal entries the code no longer asks for, large journals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pgjournal

from .test_parallel import Calls, serving, until_status


@pytest.mark.parametrize("how", ["break", "consumer-raises", "aclose"])
async def test_stream_cut_short_replays_exactly_what_was_consumed(
        pgjournal_app: pgjournal.App, how: str) -> None:
    app = pgjournal_app
    calls = Calls()

    async def tokens(prompt: str) -> AsyncIterator[str]:
        calls.log.append("model")
        for i in range(100):
            yield f"{prompt}-{i}"
            await asyncio.sleep(0)

    @app.workflow()
    async def writer(run: pgjournal.Run) -> Any:
        got: list[str] = []
        stream = run.stream_step("draft", tokens, "t")
        if how == "break":
            async for tok in stream:
                got.append(tok)
                if len(got) == 3:
                    break
        elif how == "consumer-raises":
            with contextlib.suppress(ValueError):
                async for tok in stream:
                    got.append(tok)
                    if len(got) == 3:
                        raise ValueError("enough")
        else:
            it = aiter(stream)
            for _ in range(3):
                got.append(await anext(it))
            await it.aclose()  # type: ignore[attr-defined]
        after = await run.step("after", lambda: calls.log.append("after") or "x")
        await run.wait_signal("go")
        return {"got": got, "after": after}

    async with serving(app):
        handle = await app.start(writer)
        await until_status(handle, "suspended")
        await app.signal(handle.run_id, "go")
        result = await handle.result(timeout=30)
    assert result == {"got": ["t-0", "t-1", "t-2"], "after": "x"}
    assert calls.count("model") == 1 and calls.count("after") == 1, calls.log
    store = await app.store()
    steps = await store.get_steps(handle.run_id)
    assert [(s["position"], s["name"]) for s in steps] == [(0, "draft"), (1, "after"),
                                                           (2, "go")]
    assert steps[0]["output"] == {"chunks": 3, "cut": True}
    chunks = await store.get_chunks(handle.run_id)
    assert [c["chunk"] for c in chunks] == ["t-0", "t-1", "t-2"]


async def test_retry_after_a_signal_timeout_waits_again_with_a_fresh_deadline(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls = Calls()

    @app.workflow(max_attempts=1)
    async def review(run: pgjournal.Run) -> Any:
        await run.step("draft", lambda: calls.log.append("draft") or "d")
        verdict = await run.wait_signal("review", timeout=0.3)
        return {"verdict": verdict}

    async with serving(app, poll_interval=0.1):
        handle = await app.start(review)
        with pytest.raises(pgjournal.RunFailed, match="TimeoutError"):
            await handle.result(timeout=30)
        assert await app.retry(handle.run_id) == "queued"
        await until_status(handle, "suspended")   # waiting again, not timed out at once
        await app.signal(handle.run_id, "review", {"ok": True})
        assert await handle.result(timeout=30) == {"verdict": {"ok": True}}
    assert calls.count("draft") == 1
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [(s["name"], s["status"], s["attempt"]) for s in steps] == [
        ("draft", "completed", 1), ("review", "completed", 2)]


async def test_entries_the_replay_never_asked_for_are_flagged(
        pgjournal_app: pgjournal.App, caplog: pytest.LogCaptureFixture) -> None:
    app = pgjournal_app
    version = {"n": 1}

    @app.workflow()
    async def evolving(run: pgjournal.Run) -> str:
        await run.step("s1", lambda: "a")
        await run.step("s2", lambda: "b")
        if version["n"] == 1:
            await run.step("s3", lambda: "c")
            await run.wait_signal("go")
        return "done"

    async with serving(app):
        handle = await app.start(evolving)
        await until_status(handle, "suspended")
        version["n"] = 2      # a deploy removed s3 and the wait
        await app.signal(handle.run_id, "go")
        assert await handle.result(timeout=30) == "done"
    events = await (await app.store()).get_events(handle.run_id)
    flagged = [e for e in events if (e["detail"] or {}).get("event") == "unreplayed_entries"]
    assert len(flagged) == 1
    assert flagged[0]["detail"]["entries"] == [{"position": 2, "name": "s3", "kind": "step"}]
    assert "never asked for" in caplog.text and "'s3'" in caplog.text


async def test_a_large_journal_replays_in_pages_and_a_budget_fails_only_its_run(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls = Calls()

    @app.workflow()
    async def many(run: pgjournal.Run, n: int) -> int:
        total = 0
        for i in range(n):
            total += await run.step("tick", lambda i=i: calls.log.append("tick") or i)
        await run.wait_signal("go")
        return total

    @app.workflow(max_attempts=3)
    async def hoarder(run: pgjournal.Run) -> None:
        for i in range(20):
            await run.step(f"blob{i}", lambda: "x" * 100_000)

    n = 1_200   # more than two pages of 500 entries
    async with serving(app):
        big = await app.start(many, n)
        hog = await app.start(hoarder)
        await until_status(big, "suspended")
        await app.signal(big.run_id, "go")
        assert await big.result(timeout=60) == sum(range(n))
        assert calls.count("tick") == n
    # A budget below what the hoarder journals fails that run alone, at once.
    small = pgjournal.App(app.dsn, schema=app.schema, max_journal_bytes=1_000_000)
    small.workflows = app.workflows
    async with small, serving(small):
        hog = await small.start(hoarder)
        other = await small.start(many, 3)
        with pytest.raises(pgjournal.RunFailed, match="JournalTooLarge"):
            await hog.result(timeout=30)
        assert (await hog.info())["attempt"] == 1     # terminal: not retried
        await until_status(other, "suspended")
        await small.signal(other.run_id, "go")
        assert await other.result(timeout=30) == 3
