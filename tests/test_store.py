"""Store round trips: values land as jsonb a DBA can query, and come back as they went in."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
from pydantic import BaseModel

import pgjournal


class Plan(BaseModel):
    title: str
    steps: list[str]


async def test_values_are_queryable_jsonb_and_round_trip(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = pgjournal_app
    seen: list[object] = []

    @app.workflow()
    async def agent(run: pgjournal.Run, topic: str, *, depth: int) -> dict[str, object]:
        plan = await run.step("plan", lambda: Plan(title=topic, steps=["a", "b"]))
        facts = await run.step("facts", lambda: {"topic": topic, "depth": depth, "n": 1.5})
        seen.extend([plan, facts])
        return {"title": plan.title, "facts": facts}

    worker = pgjournal.Worker(app, concurrency=1, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        handle = await app.start(agent, "durability", depth=3)
        out = await handle.result(timeout=20)
    finally:
        worker.stop()
        await task
    assert out == {"title": "durability", "facts": {"topic": "durability", "depth": 3, "n": 1.5}}
    assert seen[0] == Plan(title="durability", steps=["a", "b"])

    with psycopg.connect(pgjournal_dsn) as conn:
        s = pgjournal_schema
        row = conn.execute(
            f'SELECT input->\'args\'->>0, input->\'kwargs\'->>\'depth\', output->>\'title\' '
            f'FROM "{s}".runs WHERE id = %s', (handle.run_id,)).fetchone()
        assert row == ("durability", "3", "durability")
        steps = conn.execute(
            f'SELECT name, output->\'data\'->>\'title\', output->>\'topic\', kind, status, '
            f'occurrence FROM "{s}".steps WHERE run_id = %s ORDER BY position',
            (handle.run_id,)).fetchall()
        assert steps == [("plan", "durability", None, "step", "completed", 0),
                         ("facts", None, "durability", "step", "completed", 0)]
        events = conn.execute(
            f'SELECT from_status, to_status FROM "{s}".run_events WHERE run_id = %s ORDER BY id',
            (handle.run_id,)).fetchall()
        assert events == [(None, "queued"), ("queued", "running"), ("running", "completed")]


async def test_idempotency_key_under_20_concurrent_starts(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    key = f"k-{uuid.uuid4()}"
    handles = await asyncio.gather(*[app.start("anything", i, idempotency_key=key)
                                     for i in range(20)])
    assert len({h.run_id for h in handles}) == 1
    runs = await (await app.store()).list_runs(limit=100)
    assert len(runs) == 1


async def test_signal_payload_stored_as_jsonb(pgjournal_app: pgjournal.App, pgjournal_dsn: str,
                                              pgjournal_schema: str) -> None:
    app = pgjournal_app
    handle = await app.start("someone_elses_workflow")
    await app.signal(handle.run_id, "review", {"ok": True, "by": "ana"})
    with psycopg.connect(pgjournal_dsn) as conn:
        row = conn.execute(
            f'SELECT payload->>\'by\', consumed_at FROM "{pgjournal_schema}".signals '
            "WHERE run_id = %s", (handle.run_id,)).fetchone()
    assert row == ("ana", None)
