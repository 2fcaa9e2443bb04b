"""Conformance of the run history store (issue 5, interface 3), in memory and on Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgjournal
from pgjournal.adapters import (
    InMemoryRunStore,
    PostgresRunStore,
    RunRecord,
    RunStatus,
    RunStore,
    StepRecord,
    StepStatus,
    run_uuid,
)

from .conftest import DBA


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[RunStore]:
    if request.param == "memory":
        s: RunStore = InMemoryRunStore()
    else:
        s = PostgresRunStore(request.getfixturevalue("spool"),
                             schema=request.getfixturevalue("pgjournal_schema"))
    yield s
    s.close()


def full_run(run_id: str = "run-1", **over: Any) -> RunRecord:
    fields: dict[str, Any] = dict(
        run_id=run_id, blueprint_name="triage", blueprint_version="2.1",
        blueprint_path="bp/triage.yaml", blueprint_snapshot={"nodes": ["a", "b"]},
        flow_type="graph", status=RunStatus.suspended, initial_data={"ticket": 7},
        final_context=None, error=None, suspended_at_node="b",
        suspension_reason="needs approval", checkpoint_id="cp-3",
        created_at="2026-01-02T03:04:05.123456+00:00",
        updated_at="2026-01-02T03:05:00+00:00", duration_ms=55.5)
    fields.update(over)
    return RunRecord(**fields)


def test_defaults() -> None:
    run = RunRecord(run_id="r", blueprint_name="b")
    assert (run.blueprint_version, run.blueprint_path, run.flow_type, run.status) == (
        "1.0", None, "sequential", RunStatus.running)
    assert run.created_at.endswith("+00:00") and run.updated_at.endswith("+00:00")
    step = StepRecord(run_id="r", step_index=0, component="c")
    assert step.status == StepStatus.completed and step.output_keys == []
    assert [s.value for s in RunStatus] == ["running", "completed", "failed", "suspended",
                                            "cancelled"]
    assert [s.value for s in StepStatus] == ["completed", "failed", "skipped"]
    assert RunStatus.failed == "failed"


def test_run_round_trip(store: RunStore) -> None:
    run = full_run()
    assert store.save_run(run) == "run-1"
    assert store.load_run("run-1") == run
    assert store.load_run("missing") is None


def test_save_run_upserts(store: RunStore) -> None:
    store.save_run(full_run())
    done = full_run(status=RunStatus.completed, final_context={"answer": 42},
                    suspended_at_node=None, suspension_reason=None,
                    updated_at="2026-01-02T03:09:00+00:00")
    store.save_run(done)
    assert store.load_run("run-1") == done
    failed = full_run(status=RunStatus.failed, error="ValueError: nope")
    store.save_run(failed)
    assert store.load_run("run-1") == failed
    assert len(store.list_runs()) == 1


def test_steps_upsert_and_order(store: RunStore) -> None:
    store.save_run(full_run())
    s2 = StepRecord(run_id="run-1", step_index=2, component="write", skill_type="llm",
                    started_at="2026-01-02T03:04:07+00:00", duration_ms=12.5,
                    output_keys=["draft"], context_snapshot={"draft": "hi"})
    s0 = StepRecord(run_id="run-1", step_index=0, component="fetch",
                    started_at="2026-01-02T03:04:06+00:00")
    s1 = StepRecord(run_id="run-1", step_index=1, component="check",
                    status=StepStatus.skipped)
    for step in (s2, s0, s1):
        store.save_step(step)
    assert store.load_steps("run-1") == [s0, s1, s2]
    s1_failed = s1.model_copy(update={"status": StepStatus.failed, "error": "boom"})
    store.save_step(s1_failed)
    assert store.load_steps("run-1") == [s0, s1_failed, s2]
    assert store.load_steps("other") == []


def test_list_runs_filters_newest_first_and_limit(store: RunStore) -> None:
    for i in range(5):
        store.save_run(full_run(
            f"r{i}", blueprint_name="even" if i % 2 == 0 else "odd",
            status=RunStatus.completed if i < 3 else RunStatus.running,
            created_at=f"2026-01-0{i + 1}T00:00:00+00:00"))
    assert [r.run_id for r in store.list_runs()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.run_id for r in store.list_runs(limit=2)] == ["r4", "r3"]
    assert [r.run_id for r in store.list_runs(status=RunStatus.completed)] == ["r2", "r1", "r0"]
    assert [r.run_id for r in store.list_runs(status="running")] == ["r4", "r3"]
    assert [r.run_id for r in store.list_runs(blueprint="even")] == ["r4", "r2", "r0"]
    assert [r.run_id for r in store.list_runs(blueprint="even", status="running")] == ["r4"]


def test_delete_run_deletes_its_steps(store: RunStore) -> None:
    store.save_run(full_run())
    store.save_run(full_run("run-2"))
    store.save_step(StepRecord(run_id="run-1", step_index=0, component="a"))
    store.save_step(StepRecord(run_id="run-2", step_index=0, component="a"))
    store.delete_run("run-1")
    assert store.load_run("run-1") is None
    assert store.load_steps("run-1") == []
    assert len(store.load_steps("run-2")) == 1
    store.delete_run("run-1")  # deleting twice is fine


# -- Postgres specifics ------------------------------------------------------------


@pytest.fixture
def pg(spool: Any, pgjournal_schema: str) -> Iterator[PostgresRunStore]:
    s = PostgresRunStore(spool, schema=pgjournal_schema)
    yield s
    s.close()


def test_runs_and_steps_are_visible_to_a_dba(pg: PostgresRunStore, dba: DBA) -> None:
    pg.save_run(full_run(status=RunStatus.running))
    pg.save_step(StepRecord(run_id="run-1", step_index=0, component="fetch"))
    pg.save_step(StepRecord(run_id="run-1", step_index=1, component="llm", error="x",
                            status=StepStatus.failed))
    pg.save_run(full_run(status=RunStatus.completed, final_context={"a": 1}))
    run_id = run_uuid("run", "run-1")
    run = dba.rows("SELECT * FROM runs WHERE id = %s", run_id)[0]
    assert (run["source"], run["workflow"], run["status"], run["input"], run["output"]) == (
        "run_store", "triage", "completed", {"ticket": 7}, {"a": 1})
    assert run["meta"]["original_id"] == "run-1"
    assert run["created_at"].isoformat() == "2026-01-02T03:04:05.123456+00:00"
    assert run["due_at"] is None and run["finished_at"] is not None
    steps = dba.rows("SELECT position, name, status, error FROM steps WHERE run_id = %s "
                     "ORDER BY position", run_id)
    assert [(s["position"], s["name"], s["status"]) for s in steps] == [
        (0, "fetch", "completed"), (1, "llm", "failed")]
    events = dba.rows("SELECT to_status FROM run_events WHERE run_id = %s ORDER BY id", run_id)
    assert [e["to_status"] for e in events] == ["running", "completed"]
    failures = dba.rows("SELECT * FROM failures WHERE run_id = %s", run_id)
    assert len(failures) == 1


def test_repeated_components_keep_occurrence_order(pg: PostgresRunStore, dba: DBA) -> None:
    pg.save_run(full_run())
    for index in (4, 0, 2):
        pg.save_step(StepRecord(run_id="run-1", step_index=index, component="llm"))
    pg.save_step(StepRecord(run_id="run-1", step_index=1, component="tool"))
    pg.save_step(StepRecord(run_id="run-1", step_index=3, component="llm"))
    pg.save_step(StepRecord(run_id="run-1", step_index=0, component="tool"))
    rows = dba.rows("SELECT position, name, occurrence FROM steps WHERE run_id = %s "
                    "ORDER BY position", run_uuid("run", "run-1"))
    assert [(r["position"], r["name"], r["occurrence"]) for r in rows] == [
        (0, "tool", 0), (1, "tool", 1), (2, "llm", 0), (3, "llm", 1), (4, "llm", 2)]


def test_dsn_constructor_init_schema_and_clear_errors(pgjournal_dsn: str) -> None:
    schema = f"t_rs_{uuid.uuid4().hex[:10]}"
    store = PostgresRunStore(pgjournal_dsn, schema=schema)
    try:
        with pytest.raises(pgjournal.SchemaNotReady, match=schema):
            store.load_run("x")
        store.init_schema()
        store.init_schema()
        store.save_run(full_run())
        assert store.load_run("run-1") == full_run()
    finally:
        store.close()
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    with pytest.raises(pgjournal.DatabaseUnavailable) as info:
        PostgresRunStore("postgresql://nobody@127.0.0.1:1/none")
    assert "\n" not in str(info.value)
    (script,) = PostgresRunStore.schema_sql("x")
    assert 'CREATE SCHEMA IF NOT EXISTS "x"' in script
