"""Conformance of the journaled runtime (issue 5, interface 2): in memory, over a
PostgresJournalStore, and as PostgresRuntime; plus a session replayed in another
process after the first one was killed."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pgjournal.adapters import (
    InMemoryJournalStore,
    InProcRuntime,
    JournaledRuntime,
    PostgresJournalStore,
    PostgresRuntime,
    run_uuid,
)

from .conftest import DBA


@pytest.fixture(params=["memory", "store", "postgres"])
async def runtime(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        rt: Any = JournaledRuntime()
    else:
        dsn = request.getfixturevalue("pgjournal_dsn")
        schema = request.getfixturevalue("pgjournal_schema")
        if request.param == "store":
            rt = JournaledRuntime(await PostgresJournalStore.connect(dsn, schema=schema))
        else:
            rt = await PostgresRuntime.connect(dsn, schema=schema, max_size=4)
    yield rt
    await rt.aclose()


class Calls:
    """A step function that counts its executions."""

    def __init__(self) -> None:
        self.n = 0

    async def __call__(self, value: Any) -> Any:
        self.n += 1
        return {"value": value, "call": self.n}


async def test_names(runtime: Any) -> None:
    assert JournaledRuntime.name == "journaled"
    assert InProcRuntime.name == "inproc"
    assert PostgresRuntime.name == "postgres"
    assert runtime.store is not None


async def test_a_step_runs_once_and_replays(runtime: Any) -> None:
    calls = Calls()
    async with runtime.session("s-1") as s:
        assert s.id == "s-1"
        first = await runtime.step("plan", calls, "a")
    async with runtime.session("s-1"):
        again = await runtime.step("plan", calls, "b")
    assert first == again == {"value": "a", "call": 1}
    assert calls.n == 1


async def test_sessions_have_their_own_journal(runtime: Any) -> None:
    calls = Calls()
    async with runtime.session("s-a"):
        a = await runtime.step("plan", calls, "a")
    async with runtime.session("s-b"):
        b = await runtime.step("plan", calls, "b")
    assert (a["value"], b["value"], calls.n) == ("a", "b", 2)


async def test_sync_step_functions_work(runtime: Any) -> None:
    async with runtime.session("s-sync"):
        assert await runtime.step("add", lambda x, y: x + y, 2, y=3) == 5
        assert await runtime.step("add", lambda x, y: x * y, 2, y=3) == 5


async def test_idempotency_key_is_the_journal_key(runtime: Any) -> None:
    calls = Calls()
    async with runtime.session("s-key"):
        one = await runtime.step("llm", calls, 1, idempotency_key="turn-1")
        two = await runtime.step("llm", calls, 2, idempotency_key="turn-2")
        one_again = await runtime.step("other-name", calls, 3, idempotency_key="turn-1")
    assert (one["value"], two["value"], one_again) == (1, 2, one)
    assert calls.n == 2


async def test_by_name_pitfall_is_kept_for_compatibility(runtime: Any) -> None:
    """Documented: the seed keyed steps by name, so a loop gets the first answer."""
    calls = Calls()
    async with runtime.session("s-loop"):
        answers = [await runtime.step("llm", calls, i) for i in range(3)]
    assert [a["value"] for a in answers] == [0, 0, 0]
    assert calls.n == 1


async def test_step_outside_a_session_is_a_clear_error(runtime: Any) -> None:
    with pytest.raises(RuntimeError, match="needs an open session"):
        await runtime.step("plan", Calls(), 1)


async def test_concurrent_sessions_do_not_mix(runtime: Any) -> None:
    gate = asyncio.Event()

    async def one(sid: str) -> Any:
        async with runtime.session(sid):
            await gate.wait()
            return await runtime.step("who", lambda: sid)

    tasks = [asyncio.create_task(one(f"c-{i}")) for i in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [f"c-{i}" for i in range(5)]
    for i in range(5):
        async with runtime.session(f"c-{i}"):
            assert await runtime.step("who", lambda: "not replayed") == f"c-{i}"


async def tokens(words: list[str], fail_after: int | None = None) -> AsyncIterator[str]:
    for i, w in enumerate(words):
        if fail_after is not None and i == fail_after:
            raise ConnectionError("stream cut")
        yield w


async def test_stream_step_journals_and_replays(runtime: Any) -> None:
    async with runtime.session("s-stream"):
        got = [c async for c in runtime.stream_step("draft", tokens, ["a", "b", "c"])]
    async with runtime.session("s-stream"):
        again = [c async for c in runtime.stream_step("draft", tokens, ["x"])]
    assert got == again == ["a", "b", "c"]


async def test_a_cut_stream_is_not_journaled(runtime: Any) -> None:
    async with runtime.session("s-cut"):
        seen: list[str] = []
        with pytest.raises(ConnectionError):
            async for c in runtime.stream_step("draft", tokens, ["a", "b", "c"], fail_after=2):
                seen.append(c)
        assert seen == ["a", "b"]
        full = [c async for c in runtime.stream_step("draft", tokens, ["a", "b", "c"])]
    assert full == ["a", "b", "c"]


async def test_signal_sent_before_the_wait(runtime: Any) -> None:
    await runtime.signal("s-sig", "review", {"ok": True})
    async with runtime.session("s-sig") as s:
        assert await s.wait("review", timeout=10) == {"ok": True}


async def test_signal_wakes_a_waiting_session(runtime: Any) -> None:
    async with runtime.session("s-wake") as s:
        waiter = asyncio.create_task(s.wait("review", timeout=20))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await runtime.signal("s-wake", "review", "go")
        assert await asyncio.wait_for(waiter, 20) == "go"


async def test_deliver_and_order(runtime: Any) -> None:
    async with runtime.session("s-order") as s:
        for i in range(3):
            await s.deliver("msg", i)
        assert [await s.wait("msg", timeout=5) for _ in range(3)] == [0, 1, 2]


async def test_wait_times_out(runtime: Any) -> None:
    async with runtime.session("s-timeout") as s:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="review"):
            await s.wait("review", timeout=0.3)
        assert time.monotonic() - started >= 0.3


async def test_received_signals_replay_in_a_reopened_session(runtime: Any) -> None:
    await runtime.signal("s-replay", "answer", "first")
    await runtime.signal("s-replay", "answer", "second")
    async with runtime.session("s-replay") as s:
        assert await s.wait("answer", timeout=5) == "first"
    async with runtime.session("s-replay") as s:
        assert await s.wait("answer", timeout=5) == "first"
        assert await s.wait("answer", timeout=5) == "second"
    async with runtime.session("s-replay") as s:
        assert [await s.wait("answer", timeout=5) for _ in range(2)] == ["first", "second"]
        with pytest.raises(TimeoutError):
            await s.wait("answer", timeout=0.2)


async def test_inproc_runtime_runs_every_step() -> None:
    rt = InProcRuntime()
    calls = Calls()
    async with rt.session("s") as s:
        await rt.step("plan", calls, 1)
        await rt.step("plan", calls, 2)
        assert [c async for c in rt.stream_step("d", tokens, ["a"])] == ["a"]
        await rt.signal("s", "go", 1)
        assert await s.wait("go", timeout=5) == 1
    assert await rt.step("outside", calls, 3) == {"value": 3, "call": 3}
    await rt.aclose()


async def test_in_memory_runtime_uses_the_store_it_is_given() -> None:
    store = InMemoryJournalStore()
    rt = JournaledRuntime(store)
    assert rt.store is store
    async with rt.session("s"):
        await rt.step("plan", lambda: 1)
    assert store.step_keys() == [("s", "plan")]


# -- Postgres: durability, status, cross-process --------------------------------------


async def test_session_status_is_visible_to_a_dba(
        pgjournal_dsn: str, pgjournal_schema: str, dba: DBA) -> None:
    rt = await PostgresRuntime.connect(pgjournal_dsn, schema=pgjournal_schema)
    run_id = run_uuid("session", "st-1")
    async with rt.session("st-1"):
        await rt.step("plan", lambda: 1)
        assert dba.rows("SELECT status FROM runs WHERE id = %s", run_id)[0]["status"] == "running"
    with pytest.raises(ValueError, match="boom"):
        async with rt.session("st-1"):
            raise ValueError("boom")
    await rt.aclose()
    run = dba.rows("SELECT status, source, error FROM runs WHERE id = %s", run_id)[0]
    assert (run["status"], run["source"], run["error"]["type"]) == ("failed", "runtime",
                                                                    "ValueError")
    events = dba.rows("SELECT from_status, to_status FROM run_events WHERE run_id = %s "
                      "ORDER BY id", run_id)
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        (None, "running"), ("running", "completed"), ("completed", "running"),
        ("running", "failed")]
    signals = dba.rows("SELECT count(*) AS n FROM signals WHERE run_id = %s", run_id)
    assert signals[0]["n"] == 0


async def test_signal_from_another_runtime_wakes_by_notify(
        pgjournal_dsn: str, pgjournal_schema: str, dba: DBA) -> None:
    # A long poll interval: only the NOTIFY can deliver within the test's timeout.
    waiting = await PostgresRuntime.connect(pgjournal_dsn, schema=pgjournal_schema,
                                            poll_interval=600)
    sender = await PostgresRuntime.connect(pgjournal_dsn, schema=pgjournal_schema)
    try:
        async with waiting.session("x-1") as s:
            waiter = asyncio.create_task(s.wait("approve", timeout=60))
            run_id = run_uuid("session", "x-1")

            async def listening() -> bool:
                return waiting._listener is not None and waiting._listener.ready.is_set()

            deadline = time.monotonic() + 20
            while not await listening():
                assert time.monotonic() < deadline, "listener never started"
                await asyncio.sleep(0.02)
            await sender.signal("x-1", "approve", {"by": "ops"})
            assert await asyncio.wait_for(waiter, 20) == {"by": "ops"}
        row = dba.rows("SELECT consumed_at, consumed_position FROM signals WHERE run_id = %s",
                       run_id)[0]
        assert row["consumed_at"] is not None
        step = dba.rows("SELECT kind, name, output FROM steps WHERE run_id = %s AND "
                        "position = %s", run_id, row["consumed_position"])[0]
        assert (step["kind"], step["name"], step["output"]) == ("signal", "approve",
                                                               {"by": "ops"})
    finally:
        await waiting.aclose()
        await sender.aclose()


async def test_a_session_journaled_in_one_process_replays_in_another(
        spawn: Any, pgjournal_dsn: str, pgjournal_schema: str, dba: DBA) -> None:
    proc = spawn("session", pgjournal_dsn, pgjournal_schema, "cross-1", "3", "2")
    assert proc.stdout is not None
    lines = [proc.stdout.readline().decode().split() for _ in range(2)]
    first = dict(lines)
    assert set(first) == {"s1", "s2"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    run_id = run_uuid("session", "cross-1")
    assert dba.rows("SELECT status FROM runs WHERE id = %s", run_id)[0]["status"] == "running"

    def must_not_run() -> str:
        raise AssertionError("a journaled step ran again")

    rt = await PostgresRuntime.connect(pgjournal_dsn, schema=pgjournal_schema)
    try:
        async with rt.session("cross-1"):
            s1 = await rt.step("s1", must_not_run)
            s2 = await rt.step("s2", must_not_run)
            s3 = await rt.step("s3", lambda: "fresh")
    finally:
        await rt.aclose()
    assert (s1, s2, s3) == (first["s1"], first["s2"], "fresh")
    assert dba.rows("SELECT status FROM runs WHERE id = %s", run_id)[0]["status"] == "completed"


async def test_postgres_first_run_returns_what_a_replay_returns(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    import pgjournal

    rt = await PostgresRuntime.connect(pgjournal_dsn, schema=pgjournal_schema)
    try:
        async with rt.session("s-json"):
            first = await rt.step("pair", lambda: (1, 2))
            chunks = [c async for c in rt.stream_step("toks", tokens, ["a"])]
            with pytest.raises(pgjournal.SerializationError, match="step 'bad'"):
                await rt.step("bad", lambda: object())
        async with rt.session("s-json"):
            again = await rt.step("pair", lambda: (3, 4))
            assert await rt.step("bad", lambda: "now fine") == "now fine"
    finally:
        await rt.aclose()
    assert first == again == [1, 2]
    assert chunks == ["a"]


async def test_concurrent_waits_on_different_names(runtime: Any) -> None:
    async with runtime.session("s-two") as s:
        xs = [asyncio.create_task(s.wait("x", timeout=20)) for _ in range(2)]
        y = asyncio.create_task(s.wait("y", timeout=20))
        await asyncio.sleep(0.05)
        await runtime.signal("s-two", "x", 1)
        await runtime.signal("s-two", "y", 2)
        await runtime.signal("s-two", "x", 3)
        assert await asyncio.wait_for(y, 20) == 2
        assert sorted(await asyncio.wait_for(asyncio.gather(*xs), 20)) == [1, 3]
