"""Replay fidelity through a real worker and database (issue 9, items 1, 4, 5).

What a step, a stream chunk, a signal payload, ``now()``, ``uuid()``, the
workflow input and its output give the workflow on its first execution is
exactly what every replay gives: equal, same types, same dict key order,
same floats. Journaled exceptions replay as themselves. Values Postgres
cannot hold fail their own run terminally, never the runs they share a
statement with.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgjournal

from . import conftest
from .conftest import wait_for
from .test_exceptions import RateLimited
from .test_serializer import Reply, clean_text, same

serving = functools.partial(conftest.serving, concurrency=8, lease=10)


async def status_is(handle: pgjournal.RunHandle, status: str) -> None:
    async def check() -> bool:
        return await handle.status() == status
    await wait_for(check, 20, what=f"run {handle.run_id} to be {status}")


def same_fact(a: Any, b: Any) -> bool:
    """``same`` for journaled facts: datetimes also by offset and tzinfo type."""
    if isinstance(a, datetime):
        return (type(a) is type(b) and a == b and a.utcoffset() == b.utcoffset()
                and a.isoformat() == b.isoformat())
    if isinstance(a, uuid.UUID):
        return type(b) is uuid.UUID and a == b
    return same(a, b)


leaves = (st.none() | st.booleans() | st.integers(-(2**100), 2**100)
          | st.floats(allow_nan=False, allow_infinity=False)
          | st.sampled_from([1e20, 1e308, -0.0, 5e-324, 0.1, 2**64 + 1]) | clean_text
          | st.builds(Reply, text=clean_text, score=st.sampled_from([1e20, -0.0, 0.5]),
                      tags=st.lists(clean_text, max_size=2)))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(clean_text | st.just("$pgjournal"), inner, max_size=4),
    max_leaves=12,
)
#: The shapes of the issue's report, always exercised.
KNOWN = [{"z": 1, "a": 2, "m": {"y": 1e20, "b": -0.0}}, [{}, [], "", 2**70, 1e308],
         {"tool_calls": [{"name": "search", "args": {"q": "é ☃ 𝄞", "k": 10}}]}]

ORIGINALS: dict[str, Any] = {}
SEEN: dict[str, list[dict[str, Any]]] = {}


def _register_fidelity(app: pgjournal.App) -> None:
    async def chunks(key: str) -> AsyncIterator[Any]:
        yield ORIGINALS[key]
        yield {"again": ORIGINALS[key]}

    @app.workflow("fidelity", max_attempts=1)
    async def fidelity(run: pgjournal.Run, key: str, value: Any) -> Any:
        seen: dict[str, Any] = {"input": value}
        SEEN.setdefault(key, []).append(seen)
        seen["step"] = await run.step("produce", lambda: ORIGINALS[key])
        seen["chunks"] = [c async for c in run.stream_step("chunks", chunks, key)]
        seen["payload"] = await run.wait_signal("payload")  # suspends: a replay follows
        seen["now"] = await run.now()
        seen["uuid"] = await run.uuid()
        await run.wait_signal("again")  # suspends again: now()/uuid()/payload replay
        return {"step": seen["step"], "payload": seen["payload"]}


async def _drive(app: pgjournal.App, value: Any) -> None:
    key = uuid.uuid4().hex
    ORIGINALS[key] = value
    handle = await app.start("fidelity", key, value)
    await status_is(handle, "suspended")
    await app.signal(handle.run_id, "payload", value)
    await status_is(handle, "suspended")
    await app.signal(handle.run_id, "again")
    output = await handle.result(timeout=20)
    runs = SEEN.pop(key)
    assert len(runs) == 3, "first execution, replay after the payload, replay after 'again'"
    first = {"input": value, "step": value, "chunks": [value, {"again": value}],
             "payload": value}
    for k, expected in first.items():
        for n, seen in enumerate(runs):
            if k in seen:
                assert same(seen[k], expected), f"{k} differs in execution {n + 1}"
    for k in ("now", "uuid"):
        assert same_fact(runs[1][k], runs[2][k]), f"{k}() differs on replay"
    assert same(output, {"step": value, "payload": value})


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(st.lists(values, min_size=1, max_size=4))
async def test_replay_sees_exactly_what_the_first_execution_saw(
        pgjournal_app: pgjournal.App, batch: list[Any]) -> None:
    app = pgjournal_app
    _register_fidelity(app)
    async with serving(app):
        await asyncio.gather(*(_drive(app, v) for v in [*batch, *KNOWN]))


# -- exceptions replay as themselves ------------------------------------------------------

async def test_caught_exception_is_caught_again_on_replay(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls: list[str] = []
    seen: list[tuple[str, Any, Any]] = []

    def limited() -> None:
        calls.append("limited")
        raise RateLimited("slow down", retry_after=7)

    def scraped() -> None:
        calls.append("scraped")
        raise ValueError("bad\x00page")

    @app.workflow(max_attempts=1)
    async def careful(run: pgjournal.Run) -> str:
        try:
            await run.step("call", limited)
        except RateLimited as exc:
            seen.append((type(exc).__name__, exc.retry_after, exc.args))
        try:
            await run.step("scrape", scraped)
        except ValueError as exc:
            seen.append((type(exc).__name__, None, exc.args))
        await run.wait_signal("go")  # suspend: the next claim replays both failures
        return "ok"

    async with serving(app):
        handle = await app.start(careful)
        await status_is(handle, "suspended")
        await app.signal(handle.run_id, "go")
        assert await handle.result(timeout=20) == "ok"
    assert calls == ["limited", "scraped"], "journaled failures replayed, not re-executed"
    assert seen == [("RateLimited", 7, ("slow down",)), ("ValueError", None, ("bad\x00page",)),
                    ("RateLimited", 7, ("slow down",)), ("ValueError", None, ("bad\ufffdpage",))]
    steps = await (await app.store()).get_steps(handle.run_id)
    assert steps[1]["error"]["message"] == "bad\ufffdpage"  # journaled, lossy


# -- poison values fail their own run, terminally and alone -------------------------------

async def test_poison_step_result_fails_the_run_once_with_its_path(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    calls: list[int] = []

    def scrape() -> dict[str, Any]:
        calls.append(1)
        return {"items": [{"text": "ok"}] * 3 + [{"text": "scraped\x00page"}]}

    @app.workflow(max_attempts=3, retry_backoff=0.01)
    async def scraper(run: pgjournal.Run) -> None:
        await run.step("scrape", scrape)

    async with serving(app):
        handle = await app.start(scraper)
        with pytest.raises(pgjournal.RunFailed) as info:
            await handle.result(timeout=20)
    msg = info.value.error["message"]
    assert "step 'scrape'" in msg and str(handle.run_id) in msg and "$.items[3].text" in msg
    assert info.value.error["type"] == "SerializationError"
    assert calls == [1] and (await handle.info())["attempt"] == 1


@pytest.mark.parametrize("poison", ["nul", "surrogate"])
async def test_poison_output_fails_alone_and_the_batch_completes(
        pgjournal_app: pgjournal.App, poison: str) -> None:
    app = pgjournal_app
    release = asyncio.Event()
    text = "a\x00b" if poison == "nul" else "a\udc80b"

    @app.workflow(max_attempts=3)
    async def gated(run: pgjournal.Run, i: int) -> Any:
        await release.wait()  # all runs complete at once: one completion batch
        return {"page": {"text": text}} if i == 0 else {"i": i}

    async with serving(app):
        handles = [await app.start(gated, i) for i in range(7)]
        await wait_for(lambda: _all_running(app, handles), 20, what="7 runs running")
        release.set()
        with pytest.raises(pgjournal.RunFailed, match=r"\$\.page\.text") as info:
            await handles[0].result(timeout=20)
        assert str(handles[0].run_id) in info.value.error["message"]
        assert [await h.result(timeout=20) for h in handles[1:]] == [
            {"i": i} for i in range(1, 7)]
    assert (await handles[0].info())["attempt"] == 1


async def _all_running(app: pgjournal.App, handles: list[pgjournal.RunHandle]) -> bool:
    return all([await h.status() == "running" for h in handles])


class DbRefusesSerializer(pgjournal.Serializer):
    """Lets one output through that the database itself refuses (invalid JSON text),
    standing for any value Python's checks miss."""

    def dumps(self, value: Any, *, what: str = "value") -> str:
        if isinstance(value, dict) and value.get("refused_by_db"):
            return '{"cut": '
        return super().dumps(value, what=what)


async def test_batch_refused_by_the_database_is_retried_one_by_one(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, poll_interval=0.2)
    app.serializer = DbRefusesSerializer()
    release = asyncio.Event()

    @app.workflow(max_attempts=3)
    async def gated(run: pgjournal.Run, i: int) -> Any:
        await release.wait()
        return {"refused_by_db": True} if i == 3 else {"i": i}

    try:
        async with serving(app):
            handles = [await app.start(gated, i) for i in range(7)]
            await wait_for(lambda: _all_running(app, handles), 20, what="7 runs running")
            release.set()
            with pytest.raises(pgjournal.RunFailed, match="json"):
                await handles[3].result(timeout=20)
            others = [h for i, h in enumerate(handles) if i != 3]
            assert [await h.result(timeout=20) for h in others] == [
                {"i": i} for i in range(7) if i != 3]
        assert (await handles[3].info())["attempt"] == 1, "failed terminally, not retried"
    finally:
        await app.close()


async def test_poison_inputs_payloads_and_chunks_are_refused_with_their_path(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    async def tokens() -> AsyncIterator[str]:
        yield "fine"
        yield "half an emoji \ud83d"

    @app.workflow(max_attempts=3, retry_backoff=0.01)
    async def streamer(run: pgjournal.Run, topic: str) -> str:
        return "".join([t async for t in run.stream_step("draft", tokens)])

    with pytest.raises(pgjournal.SerializationError,
                       match=r"input of workflow 'streamer': \$\.args\[0\] contains a NUL"):
        await app.start(streamer, "a\x00b")
    async with serving(app):
        handle = await app.start(streamer, "ok")
        with pytest.raises(pgjournal.RunFailed) as info:
            await handle.result(timeout=20)
        with pytest.raises(pgjournal.SerializationError) as refused:
            await app.signal(handle.run_id, "review", {"notes": ["x", "\x00"]})
    msg = info.value.error["message"]
    assert "chunk of stream 'draft'" in msg and "$ contains a lone surrogate" in msg
    assert (await handle.info())["attempt"] == 1
    assert "$.notes[1] contains a NUL" in str(refused.value)
    assert str(handle.run_id) in str(refused.value)
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [(s["name"], s["status"]) for s in steps] == [("draft", "failed")]


async def test_now_replays_with_the_same_tzinfo(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    seen: list[datetime] = []

    @app.workflow(max_attempts=1)
    async def clock(run: pgjournal.Run) -> None:
        seen.append(await run.now())
        await run.wait_signal("go")

    async with serving(app):
        handle = await app.start(clock)
        await status_is(handle, "suspended")
        await app.signal(handle.run_id, "go")
        await handle.result(timeout=20)
    first, replayed = seen
    assert first == replayed
    assert type(first.tzinfo) is type(replayed.tzinfo), (first.tzinfo, replayed.tzinfo)
