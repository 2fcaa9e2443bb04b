"""Conformance of the sequence-numbered journal (issue 5, interface 5), in memory and on
Postgres; two processes appending to one agent get gap-free, distinct sequences."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from pgjournal.adapters import (
    DuplicateEntry,
    DurableJournal,
    InMemoryJournalStorage,
    JournalStorage,
    PostgresJournalStorage,
    SeqEntry,
    run_uuid,
)

from .conftest import DBA


class ToolCall(BaseModel):
    tool: str
    args: dict[str, Any]


@pytest.fixture(params=["memory", "postgres"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        s: Any = InMemoryJournalStorage()
    else:
        s = await PostgresJournalStorage.connect(
            request.getfixturevalue("pgjournal_dsn"), max_size=4,
            schema=request.getfixturevalue("pgjournal_schema"))
    yield s
    await s.aclose()


def entry(agent: str, seq: int, iteration: int = 0, event: Any = None) -> SeqEntry:
    return SeqEntry(sequence=seq, agent_id=agent, iteration=iteration,
                    timestamp=datetime(2026, 1, 1, 0, 0, seq % 60, tzinfo=UTC),
                    event=event if event is not None else {"type": "note", "n": seq})


async def test_is_a_storage(storage: Any) -> None:
    assert isinstance(storage, JournalStorage)


async def test_empty_journal(storage: Any) -> None:
    assert await storage.latest_sequence("a") == 0
    assert await storage.read_entries("a") == []
    assert await storage.read_from("a", 1) == []
    assert await storage.compact("a") == 0


async def test_store_and_read(storage: Any) -> None:
    stored = [entry("a", s, iteration=s // 2) for s in (1, 2, 3)]
    for e in stored:
        assert (await storage.store(e)).sequence == e.sequence
    await storage.store(entry("b", 1))
    assert await storage.read_entries("a") == stored
    assert await storage.read_from("a", 2) == stored[1:]
    assert await storage.read_from("a", 4) == []
    assert await storage.latest_sequence("a") == 3
    assert await storage.latest_sequence("b") == 1


async def test_store_assigns_a_sequence_to_zero(storage: Any) -> None:
    await storage.store(entry("a", 1))
    got = await storage.store(entry("a", 0))
    assert got.sequence == 2
    assert [e.sequence for e in await storage.read_entries("a")] == [1, 2]


async def test_a_sequence_is_never_written_twice(storage: Any) -> None:
    await storage.store(entry("a", 1, event={"type": "first"}))
    with pytest.raises(DuplicateEntry):
        await storage.store(entry("a", 1, event={"type": "second"}))
    assert [e.event for e in await storage.read_entries("a")] == [{"type": "first"}]


async def test_compact_removes_and_restarts(storage: Any) -> None:
    for s in (1, 2, 3):
        await storage.store(entry("a", s))
    await storage.store(entry("b", 1))
    assert await storage.compact("a") == 3
    assert await storage.read_entries("a") == []
    assert await storage.latest_sequence("a") == 0
    assert len(await storage.read_entries("b")) == 1


async def test_durable_journal(storage: Any) -> None:
    journal = DurableJournal(storage, "agent-1")
    await journal.initialize()
    assert journal.next_sequence() == 1
    assert await journal.last_completed_iteration() == 0
    a = await journal.append(SeqEntry(iteration=1, event={"type": "plan"}))
    b = await journal.append(SeqEntry(iteration=2, event={"type": "act"}))
    c = await journal.append({"type": "act"}, iteration=2)
    assert (a.sequence, b.sequence, c.sequence) == (1, 2, 3)
    assert {a.agent_id, b.agent_id, c.agent_id} == {"agent-1"}
    assert journal.next_sequence() == 4
    assert [e.event for e in await journal.replay()] == [
        {"type": "plan"}, {"type": "act"}, {"type": "act"}]
    assert [e.sequence for e in await journal.replay_from(2)] == [2, 3]
    assert await journal.last_completed_iteration() == 2
    assert await journal.compact() == 3
    assert journal.next_sequence() == 1
    assert (await journal.append({"type": "again"})).sequence == 1


async def test_resume_never_rewrites_the_latest_sequence(storage: Any) -> None:
    """The seed resumed at the latest sequence and wrote it again."""
    first = DurableJournal(storage, "agent-r")
    await first.initialize()
    for i in range(3):
        await first.append({"type": "t", "i": i})
    resumed = DurableJournal(storage, "agent-r")
    await resumed.initialize()
    assert resumed.next_sequence() == 4
    assert (await resumed.append({"type": "t", "i": 3})).sequence == 4
    # A stale journal that never re-initialised still gets a fresh sequence.
    assert (await first.append({"type": "t", "i": 4})).sequence == 5
    assert [e.sequence for e in await storage.read_entries("agent-r")] == [1, 2, 3, 4, 5]


async def test_agents_are_isolated(storage: Any) -> None:
    one, two = DurableJournal(storage, "one"), DurableJournal(storage, "two")
    await one.append({"type": "x"})
    await one.append({"type": "x"})
    assert (await two.append({"type": "y"})).sequence == 1
    assert [e.event for e in await two.replay()] == [{"type": "y"}]


async def test_pydantic_events_round_trip(storage: Any) -> None:
    journal = DurableJournal(storage, "agent-p")
    await journal.append(ToolCall(tool="search", args={"q": "pg"}), iteration=1)
    (got,) = await journal.replay()
    assert got.event == ToolCall(tool="search", args={"q": "pg"})
    assert got.iteration == 1


# -- Postgres: visibility and two processes ---------------------------------------------


async def test_entries_visible_to_a_dba(pgjournal_dsn: str, pgjournal_schema: str,
                                        dba: DBA) -> None:
    storage = await PostgresJournalStorage.connect(pgjournal_dsn, schema=pgjournal_schema)
    journal = DurableJournal(storage, "agent-v")
    await journal.append({"type": "plan"}, iteration=1)
    await journal.append(ToolCall(tool="t", args={}), iteration=1)
    await journal.append({"type": "plan"}, iteration=2)
    await storage.aclose()
    run_id = run_uuid("agent", "agent-v")
    run = dba.rows("SELECT source, meta FROM runs WHERE id = %s", run_id)[0]
    assert (run["source"], run["meta"]["original_id"]) == ("seq_journal", "agent-v")
    rows = dba.rows("SELECT position, name, occurrence, kind, meta->>'iteration' AS it "
                    "FROM steps WHERE run_id = %s ORDER BY position", run_id)
    assert [(r["position"], r["name"], r["occurrence"], r["kind"], r["it"]) for r in rows] == [
        (1, "plan", 0, "entry", "1"), (2, "ToolCall", 0, "entry", "1"),
        (3, "plan", 1, "entry", "2")]


async def test_two_processes_appending_to_one_agent(
        spawn: Any, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    n = 150
    procs = [spawn("append", pgjournal_dsn, pgjournal_schema, "shared", str(n))
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == b"ready"
    storage = await PostgresJournalStorage.connect(pgjournal_dsn, schema=pgjournal_schema)
    try:
        # Both journals initialised at 0; this entry makes their local view stale,
        # so only sequences allocated by the database can come out right.
        await storage.store(SeqEntry(agent_id="shared", event={"type": "seed"}))
        outs = await asyncio.gather(*(asyncio.to_thread(p.communicate, b"go\n", 120)
                                      for p in procs))
        got = []
        for (out, _err), p in zip(outs, procs, strict=True):
            assert p.returncode == 0, out
            got.append([int(x) for x in out.split()])
        entries = await storage.read_entries("shared")
    finally:
        await storage.aclose()
    assert [e.sequence for e in entries] == list(range(1, 2 * n + 2))
    assert sorted(got[0] + got[1]) == list(range(2, 2 * n + 2))
    for mine in got:
        assert len(mine) == n and mine == sorted(mine)
    assert sorted(e.event["i"] for e in entries[1:]) == sorted(list(range(n)) * 2)
