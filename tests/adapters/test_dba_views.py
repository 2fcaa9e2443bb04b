"""All five adapters' runs, steps and events show up in the DBA views like native runs."""

from __future__ import annotations

from typing import Any

from pgjournal.adapters import (
    DurableJournal,
    PostgresCheckpointer,
    PostgresJournalStorage,
    PostgresJournalStore,
    PostgresRunStore,
    PostgresRuntime,
    RunRecord,
    StepRecord,
)

from .conftest import DBA
from .test_checkpointer import Event, State


async def test_every_adapter_is_visible_in_the_views(
        apool: Any, spool: Any, pgjournal_schema: str, dba: DBA) -> None:
    schema = pgjournal_schema
    store = PostgresJournalStore(apool, schema=schema)
    await store.put_step("js-1", "plan", 1)

    runtime = PostgresRuntime(apool, schema=schema)
    async with runtime.session("rt-1"):
        await runtime.step("plan", lambda: 2)

    run_store = PostgresRunStore(spool, schema=schema)
    run_store.save_run(RunRecord(run_id="rs-1", blueprint_name="bp"))
    run_store.save_step(StepRecord(run_id="rs-1", step_index=0, component="fetch"))

    cp = PostgresCheckpointer(spool, Event, State, schema=schema)
    cp.save_event(Event(run_id="cp-1", seq=1, ts=1.0, kind="start"))
    cp.save_snapshot("cp-1", State("cp-1", 1))

    storage = PostgresJournalStorage(apool, schema=schema)
    await DurableJournal(storage, "sj-1").append({"type": "tick"})

    overview = dba.rows("SELECT source, status, steps_completed FROM run_overview "
                        "ORDER BY source")
    assert [(r["source"], r["status"], r["steps_completed"]) for r in overview] == [
        ("checkpointer", "running", 1), ("journal_store", "running", 1),
        ("run_store", "running", 1), ("runtime", "completed", 1),
        ("seq_journal", "running", 1)]
    timings = dba.rows("SELECT r.source, t.name FROM step_timings t JOIN runs r "
                       "ON r.id = t.run_id ORDER BY r.source")
    assert [(t["source"], t["name"]) for t in timings] == [
        ("checkpointer", "start"), ("journal_store", "plan"), ("run_store", "fetch"),
        ("runtime", "plan"), ("seq_journal", "tick")]
    events = dba.rows("SELECT r.source, count(*) AS n FROM run_events e JOIN runs r "
                      "ON r.id = e.run_id GROUP BY r.source ORDER BY r.source")
    assert [(e["source"], e["n"]) for e in events] == [
        ("checkpointer", 1), ("journal_store", 1), ("run_store", 1), ("runtime", 2),
        ("seq_journal", 1)]
    # Open adapter runs hold no lease that could expire, and no queue a worker serves.
    assert dba.rows("SELECT * FROM stuck_runs") == []
    depth = dba.rows("SELECT queue, running, expired_leases FROM queue_depth")
    assert [(d["queue"], d["running"], d["expired_leases"]) for d in depth] == [
        ("pgjournal.adapters", 4, 0)]
    run_store.close()
    cp.close()
