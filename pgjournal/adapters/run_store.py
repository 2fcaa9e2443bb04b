"""Run history store (synchronous): ``RunRecord`` and ``StepRecord`` of blueprint runs.

``PostgresRunStore`` keeps a run as a ``runs`` row (``source = 'run_store'``,
``workflow`` = blueprint name, ``input`` = initial data, ``output`` = final
context, the other fields in ``meta``) and a step as the ``steps`` row at
position ``step_index`` (``name`` = component, ``output`` = its output keys and
context snapshot, the other fields in ``meta``). A ``skipped`` step is stored as
``completed`` with ``meta.status = 'skipped'``, since the journal knows only
completed and failed entries.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field

from ..serializer import Serializer
from ._core import Adapter, SyncDB, SyncPool, original_id, parse_time, schema_script, utc_now_iso


class RunStatus(str, Enum):  # noqa: UP042 - the seed's str enum, kept as is
    running = "running"
    completed = "completed"
    failed = "failed"
    suspended = "suspended"
    cancelled = "cancelled"


class StepStatus(str, Enum):  # noqa: UP042
    completed = "completed"
    failed = "failed"
    skipped = "skipped"


class RunRecord(BaseModel):
    """One run of a blueprint."""

    run_id: str
    blueprint_name: str
    blueprint_version: str = "1.0"
    blueprint_path: str | None = None
    blueprint_snapshot: dict[str, Any] = Field(default_factory=dict)
    flow_type: str = "sequential"
    status: RunStatus = RunStatus.running
    initial_data: dict[str, Any] = Field(default_factory=dict)
    final_context: dict[str, Any] | None = None
    error: str | None = None
    suspended_at_node: str | None = None
    suspension_reason: str | None = None
    checkpoint_id: str | None = None
    created_at: str = Field(default_factory=utc_now_iso)
    updated_at: str = Field(default_factory=utc_now_iso)
    duration_ms: float | None = None


class StepRecord(BaseModel):
    """One step of a run, at ``step_index``."""

    run_id: str
    step_index: int
    component: str
    skill_type: str | None = None
    status: StepStatus = StepStatus.completed
    started_at: str = Field(default_factory=utc_now_iso)
    duration_ms: float | None = None
    error: str | None = None
    output_keys: list[str] = Field(default_factory=list)
    context_snapshot: dict[str, Any] | None = None


class RunStore(ABC):
    """Where run and step history is kept."""

    @abstractmethod
    def save_run(self, run: RunRecord) -> str:
        """Insert or update the run (by ``run_id``); returns the run id."""

    @abstractmethod
    def save_step(self, step: StepRecord) -> None:
        """Insert or update the step (by ``run_id`` and ``step_index``)."""

    @abstractmethod
    def load_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def load_steps(self, run_id: str) -> list[StepRecord]:
        """The run's steps, ordered by ``step_index``."""

    @abstractmethod
    def list_runs(self, *, status: RunStatus | str | None = None,
                  blueprint: str | None = None, limit: int = 50) -> list[RunRecord]:
        """Runs, newest (``created_at``) first."""

    @abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Delete the run and its steps."""

    @abstractmethod
    def close(self) -> None: ...


def _newest_first(run: RunRecord) -> datetime:
    return parse_time(run.created_at) or datetime.min.replace(tzinfo=UTC)


class InMemoryRunStore(RunStore):
    """A dict-backed ``RunStore`` for unit tests (records are copied in and out)."""

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._steps: dict[str, dict[int, StepRecord]] = {}
        self._lock = threading.Lock()

    def save_run(self, run: RunRecord) -> str:
        with self._lock:
            self._runs[run.run_id] = run.model_copy(deep=True)
        return run.run_id

    def save_step(self, step: StepRecord) -> None:
        with self._lock:
            self._steps.setdefault(step.run_id, {})[step.step_index] = step.model_copy(deep=True)

    def load_run(self, run_id: str) -> RunRecord | None:
        run = self._runs.get(run_id)
        return None if run is None else run.model_copy(deep=True)

    def load_steps(self, run_id: str) -> list[StepRecord]:
        steps = self._steps.get(run_id, {})
        return [steps[i].model_copy(deep=True) for i in sorted(steps)]

    def list_runs(self, *, status: RunStatus | str | None = None,
                  blueprint: str | None = None, limit: int = 50) -> list[RunRecord]:
        wanted = None if status is None else RunStatus(status)
        runs = [r for r in self._runs.values()
                if (wanted is None or r.status == wanted)
                and (blueprint is None or r.blueprint_name == blueprint)]
        runs.sort(key=_newest_first, reverse=True)
        return [r.model_copy(deep=True) for r in runs[:limit]]

    def delete_run(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            self._steps.pop(run_id, None)

    def close(self) -> None:
        return None


_RUN_COLUMNS = {"run_id", "blueprint_name", "status", "initial_data", "final_context", "error"}
_STATUS_FROM_DB = {"queued": RunStatus.running, "dead": RunStatus.failed}


class PostgresRunStore(RunStore):
    """A ``RunStore`` on pgjournal's tables, synchronous, through a psycopg
    ``ConnectionPool`` (pass one, or a DSN and the store opens and closes its own)."""

    def __init__(self, dsn_or_pool: str | SyncPool | None = None, *,
                 schema: str = "pgjournal", min_size: int = 1, max_size: int = 10,
                 serializer: Serializer | None = None) -> None:
        self.adapter = Adapter(schema=schema, source="run_store", family="run",
                               workflow="run_store", serializer=serializer)
        self.db = SyncDB(self.adapter, dsn_or_pool, min_size=min_size, max_size=max_size)

    @staticmethod
    def schema_sql(schema: str = "pgjournal") -> list[str]:
        """The idempotent DDL of the whole pgjournal schema, for a DBA to review."""
        return [schema_script(schema)]

    def init_schema(self) -> None:
        """Create or upgrade the schema (``pgjournal.migrate``); safe to repeat."""
        self.db.migrate()

    def _json(self, value: Any, what: str) -> str | None:
        return None if value is None else self.adapter.dumps(value, what)

    def save_run(self, run: RunRecord) -> str:
        ids = self.adapter.run(run.run_id)
        meta = run.model_dump(mode="json", exclude=_RUN_COLUMNS)
        meta.update(original_id=run.run_id, adapter=self.adapter.source)
        created = parse_time(run.created_at) or datetime.now(UTC)
        updated = parse_time(run.updated_at) or created
        self.db.fetch(
            "save_run", run=ids["run"], source=ids["source"], workflow=run.blueprint_name,
            status=RunStatus(run.status).value,
            input=self.adapter.dumps(run.initial_data, f"initial_data of run {run.run_id!r}"),
            output=self._json(run.final_context, f"final_context of run {run.run_id!r}"),
            error=None if run.error is None else json.dumps({"type": "Error",
                                                            "message": run.error}),
            meta=self.adapter.dumps(meta, f"run {run.run_id!r}"),
            created_at=created, updated_at=updated)
        return run.run_id

    def save_step(self, step: StepRecord) -> None:
        ids = self.adapter.run(step.run_id)
        if step.step_index < 0:
            raise ValueError(f"step_index must be >= 0, not {step.step_index}")
        started = parse_time(step.started_at)
        finished = (started + timedelta(milliseconds=step.duration_ms)
                    if started is not None and step.duration_ms is not None else None)
        what = f"step {step.step_index} of run {step.run_id!r}"
        output = {"output_keys": step.output_keys, "context_snapshot": step.context_snapshot}
        meta = {"status": StepStatus(step.status).value, "skill_type": step.skill_type,
                "started_at": step.started_at, "duration_ms": step.duration_ms}
        failed = step.status == StepStatus.failed
        self.db.fetch(
            "write", **ids, position=step.step_index, first=0, replace=True,
            name=step.component, kind="step", status="failed" if failed else "completed",
            output=self.adapter.dumps(output, what),
            error=None if step.error is None else json.dumps({"type": "Error",
                                                             "message": step.error}),
            meta=self.adapter.dumps(meta, what), started_at=started or datetime.now(UTC),
            finished_at=finished, chunks=None)

    def _record(self, row: dict[str, Any]) -> RunRecord:
        meta = dict(row["meta"] or {})
        meta.pop("adapter", None)
        meta.pop("original_id", None)
        status = _STATUS_FROM_DB.get(row["status"]) or RunStatus(row["status"])
        return RunRecord(
            run_id=original_id(row), blueprint_name=row["workflow"], status=status,
            initial_data=self.adapter.loads(row["input"]) or {},
            final_context=self.adapter.loads(row["output"]),
            error=None if row["error"] is None else str(row["error"].get("message")),
            **self.adapter.loads(meta))

    def load_run(self, run_id: str) -> RunRecord | None:
        row = self.db.fetchone("get_run", run=self.adapter.run(run_id)["run"],
                               sources=self.adapter.read_sources)
        return None if row is None else self._record(row)

    def load_steps(self, run_id: str) -> list[StepRecord]:
        rows = self.db.fetch("entries", run=self.adapter.run(run_id)["run"], from_position=0)
        steps = []
        for row in rows:
            meta, output = row["meta"] or {}, self.adapter.loads(row["output"]) or {}
            steps.append(StepRecord(
                run_id=run_id, step_index=row["position"], component=row["name"],
                skill_type=meta.get("skill_type"),
                status=StepStatus(meta.get("status", row["status"])),
                started_at=meta.get("started_at") or row["started_at"].isoformat(),
                duration_ms=meta.get("duration_ms"),
                error=None if row["error"] is None else str(row["error"].get("message")),
                output_keys=output.get("output_keys") or [],
                context_snapshot=output.get("context_snapshot")))
        return steps

    def list_runs(self, *, status: RunStatus | str | None = None,
                  blueprint: str | None = None, limit: int = 50) -> list[RunRecord]:
        rows = self.db.fetch(
            "list_runs", sources=self.adapter.read_sources,
            status=None if status is None else RunStatus(status).value, workflow=blueprint,
            with_output=False, by_updated=False, limit=limit)
        return [self._record(r) for r in rows]

    def delete_run(self, run_id: str) -> None:
        self.db.fetch("delete_run", run=self.adapter.run(run_id)["run"],
                      sources=self.adapter.read_sources)

    def close(self) -> None:
        self.db.close()
