"""Conformance of the step journal store (issue 5, interface 1), in memory and on Postgres."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

import pgjournal
from pgjournal.adapters import (
    InMemoryJournalStore,
    JournalEntry,
    JournalStore,
    PostgresJournalStore,
    run_uuid,
)

from .conftest import DBA


class Plan(BaseModel):
    steps: list[str]


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        s: Any = InMemoryJournalStore()
    else:
        s = await PostgresJournalStore.connect(
            request.getfixturevalue("pgjournal_dsn"), max_size=4,
            schema=request.getfixturevalue("pgjournal_schema"))
    yield s
    await s.aclose()


async def test_is_a_journal_store(store: Any) -> None:
    assert isinstance(store, JournalStore)


async def test_missing_step_and_stream_are_none(store: Any) -> None:
    assert await store.get_step("sess-1", "plan") is None
    assert await store.get_stream("sess-1", "draft") is None


async def test_put_then_get_step(store: Any) -> None:
    await store.put_step("sess-1", "plan", {"steps": ["a", "b"], "n": 2})
    entry = await store.get_step("sess-1", "plan")
    assert isinstance(entry, JournalEntry)
    assert entry.value == {"steps": ["a", "b"], "n": 2}
    assert isinstance(entry.created_at, float)
    with pytest.raises(AttributeError):
        entry.value = 1  # type: ignore[misc]


async def test_put_step_replaces(store: Any) -> None:
    await store.put_step("sess-1", "plan", "first")
    await store.put_step("sess-1", "plan", "second")
    entry = await store.get_step("sess-1", "plan")
    assert entry is not None and entry.value == "second"


async def test_sessions_and_names_are_isolated(store: Any) -> None:
    await store.put_step("sess-1", "plan", 1)
    await store.put_step("sess-2", "plan", 2)
    await store.put_step("sess-1", "act", 3)
    assert (await store.get_step("sess-1", "plan")).value == 1
    assert (await store.get_step("sess-2", "plan")).value == 2
    assert (await store.get_step("sess-1", "act")).value == 3
    assert await store.get_step("sess-2", "act") is None


async def test_streams_round_trip_and_replace(store: Any) -> None:
    await store.put_stream("sess-1", "draft", ["Hel", "lo", {"tok": 3}])
    assert await store.get_stream("sess-1", "draft") == ["Hel", "lo", {"tok": 3}]
    await store.put_stream("sess-1", "draft", ["x"])
    assert await store.get_stream("sess-1", "draft") == ["x"]
    await store.put_stream("sess-1", "empty", [])
    assert await store.get_stream("sess-1", "empty") == []


async def test_step_and_stream_of_one_name_coexist(store: Any) -> None:
    await store.put_step("sess-1", "llm", "whole answer")
    await store.put_stream("sess-1", "llm", ["whole ", "answer"])
    assert (await store.get_step("sess-1", "llm")).value == "whole answer"
    assert await store.get_stream("sess-1", "llm") == ["whole ", "answer"]


async def test_in_memory_keys() -> None:
    store = InMemoryJournalStore()
    await store.put_step("s", "a", 1)
    await store.put_stream("s", "b", [1])
    assert store.step_keys() == [("s", "a")]
    assert store.stream_keys() == [("s", "b")]


# -- Postgres specifics ------------------------------------------------------------


@pytest.fixture
async def pg(apool: Any, pgjournal_schema: str) -> PostgresJournalStore:
    return PostgresJournalStore(apool, schema=pgjournal_schema)


async def test_pydantic_values_round_trip(pg: PostgresJournalStore) -> None:
    await pg.put_step("sess-p", "plan", Plan(steps=["a"]))
    entry = await pg.get_step("sess-p", "plan")
    assert entry is not None and entry.value == Plan(steps=["a"])


async def test_unstorable_value_is_a_clear_error(pg: PostgresJournalStore) -> None:
    with pytest.raises(pgjournal.SerializationError, match="step 'plan' of session 'sess-x'"):
        await pg.put_step("sess-x", "plan", object())


async def test_sessions_are_runs_visible_to_a_dba(pg: PostgresJournalStore, dba: DBA) -> None:
    await pg.put_step("chat-42", "plan", {"a": 1})
    await pg.put_step("chat-42", "plan", {"a": 2})
    await pg.put_stream("chat-42", "draft", ["x", "y"])
    run_id = run_uuid("session", "chat-42")
    run = dba.rows("SELECT * FROM runs WHERE id = %s", run_id)[0]
    assert run["source"] == "journal_store"
    assert run["meta"]["original_id"] == "chat-42"
    assert run["queue"] == "pgjournal.adapters"
    steps = dba.rows("SELECT position, name, occurrence, kind, output FROM steps "
                     "WHERE run_id = %s ORDER BY position", run_id)
    assert [(s["position"], s["name"], s["occurrence"], s["kind"]) for s in steps] == [
        (0, "plan", 0, "step"), (1, "draft", 0, "stream")]
    assert steps[0]["output"] == {"a": 2}
    chunks = dba.rows("SELECT chunk FROM stream_chunks WHERE run_id = %s ORDER BY seq", run_id)
    assert [c["chunk"] for c in chunks] == ["x", "y"]
    events = dba.rows("SELECT to_status FROM run_events WHERE run_id = %s", run_id)
    assert [e["to_status"] for e in events] == ["running"]
    overview = dba.rows("SELECT * FROM run_overview WHERE id = %s", run_id)
    assert overview and overview[0]["source"] == "journal_store"


async def test_uuid_session_id_is_the_run_id(pg: PostgresJournalStore, dba: DBA) -> None:
    sid = str(uuid.uuid4())
    await pg.put_step(sid, "plan", 1)
    assert dba.rows("SELECT id FROM runs WHERE id = %s", uuid.UUID(sid))


async def test_adapter_never_writes_into_a_native_run(
        pg: PostgresJournalStore, pgjournal_app: pgjournal.App) -> None:
    handle = await pgjournal_app.start("some_workflow")
    with pytest.raises(pgjournal.InvalidState, match="native pgjournal run"):
        await pg.put_step(str(handle.run_id), "plan", 1)


async def test_concurrent_writers_to_one_session_never_collide(
        pg: PostgresJournalStore, dba: DBA) -> None:
    await asyncio.gather(*(pg.put_step("busy", f"step-{i}", i) for i in range(30)))
    for i in range(30):
        assert (await pg.get_step("busy", f"step-{i}")).value == i  # type: ignore[union-attr]
    positions = dba.rows("SELECT position FROM steps WHERE run_id = %s ORDER BY position",
                         run_uuid("session", "busy"))
    assert [p["position"] for p in positions] == list(range(30))


async def test_schema_sql_is_idempotent_and_init_schema_works(
        pgjournal_dsn: str, apool: Any) -> None:
    schema = f"t_ddl_{uuid.uuid4().hex[:10]}"
    (script,) = PostgresJournalStore.schema_sql(schema)
    try:
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            conn.execute(script.encode())
            conn.execute(script.encode())
            versions = conn.execute(f'SELECT version FROM "{schema}".migrations').fetchall()
        assert [v[0] for v in versions] == [m.version for m in pgjournal.migrations.available()]
        store = PostgresJournalStore(apool, schema=schema)
        await store.init_schema()  # already there: a no-op
        await store.put_step("s", "a", 1)
        assert (await store.get_step("s", "a")).value == 1  # type: ignore[union-attr]
    finally:
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_connect_and_init_schema_on_a_fresh_schema(pgjournal_dsn: str) -> None:
    schema = f"t_fresh_{uuid.uuid4().hex[:10]}"
    store = await PostgresJournalStore.connect(pgjournal_dsn, schema=schema, max_size=2)
    try:
        with pytest.raises(pgjournal.SchemaNotReady, match=schema):
            await store.get_step("s", "a")
        await store.init_schema()
        await store.put_step("s", "a", [1])
        assert (await store.get_step("s", "a")).value == [1]  # type: ignore[union-attr]
    finally:
        await store.aclose()
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_bad_dsn_and_bad_schema_are_one_line_errors() -> None:
    with pytest.raises(pgjournal.DatabaseUnavailable) as info:
        await PostgresJournalStore.connect("postgresql://nobody@127.0.0.1:1/none")
    assert "\n" not in str(info.value)
    with pytest.raises(pgjournal.ConfigurationError):
        PostgresJournalStore(None, schema="bad; drop")  # type: ignore[arg-type]
