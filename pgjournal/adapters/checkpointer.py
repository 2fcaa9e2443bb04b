"""Event + snapshot checkpointer (synchronous): an append-only event log per run
plus the run's latest state snapshot.

``PostgresCheckpointer`` keeps a run as a ``runs`` row (``source =
'checkpointer'``) whose ``output`` is the latest snapshot; each event is the
``steps`` row at position ``seq`` (``name`` = the event's kind, kind ``entry``,
``output`` = ``event.to_dict()``, ``meta`` = seq, ts and lane). Events and
states are rebuilt with the classes given to the constructor; a row that does
not rebuild raises ``CorruptEntry`` naming its run and seq, it is never skipped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from ..serializer import Serializer
from ._core import (
    Adapter,
    CorruptEntry,
    DuplicateEntry,
    SyncDB,
    SyncPool,
    codec,
    original_id,
    schema_script,
)

E = TypeVar("E")
S = TypeVar("S")


@runtime_checkable
class Checkpointer(Protocol[E, S]):
    """Saves a run's events (append) and its latest state snapshot (overwrite)."""

    def save_event(self, event: E) -> None: ...

    def save_snapshot(self, run_id: str, state: S) -> None: ...

    def load_latest(self, run_id: str) -> S | None: ...

    def list_events(self, run_id: str, since_seq: int = 0) -> list[E]: ...

    def delete_run(self, run_id: str) -> None: ...

    def list_runs(self) -> list[str]: ...


class _Codecs(Generic[E, S]):
    """The event and state classes, and rebuilding them with a clear error."""

    def __init__(self, event_cls: type[E], state_cls: type[S],
                 loads: Callable[[Any], Any] = lambda data: data) -> None:
        self.event_to, self.event_from = codec(event_cls)
        self.state_to, self.state_from = codec(state_cls)
        self.loads = loads

    def event(self, data: Any, run_id: str, seq: int) -> E:
        try:
            return self.event_from(self.loads(data))  # type: ignore[no-any-return]
        except Exception as exc:
            raise CorruptEntry(
                f"corrupt checkpoint event: run {run_id!r} seq {seq} does not load "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc

    def state(self, data: Any, run_id: str, seq: Any) -> S:
        try:
            return self.state_from(self.loads(data))  # type: ignore[no-any-return]
        except Exception as exc:
            raise CorruptEntry(
                f"corrupt checkpoint snapshot: run {run_id!r} (snapshot after seq {seq}) "
                f"does not load ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc


def _event_fields(event: Any) -> tuple[str, int, Any, str, str]:
    run_id, seq = event.run_id, event.seq
    if not isinstance(seq, int) or seq < 0:
        raise ValueError(f"an event's seq must be an integer >= 0, not {seq!r}")
    return (str(run_id), seq, getattr(event, "ts", None), str(getattr(event, "kind", "event")),
            str(getattr(event, "lane_id", "main")))


class InMemoryCheckpointer(Generic[E, S]):
    """A ``Checkpointer`` in memory (for unit tests). Stores ``to_dict()`` forms, so
    rebuilding goes through ``from_dict`` exactly as with Postgres."""

    def __init__(self, event_cls: type[E], state_cls: type[S]) -> None:
        self._codecs = _Codecs(event_cls, state_cls)
        self._events: dict[str, dict[int, dict[str, Any]]] = {}
        self._snapshots: dict[str, tuple[int, dict[str, Any]]] = {}
        self._clock = 0
        self._lock = threading.Lock()

    def save_event(self, event: E) -> None:
        run_id, seq, *_ = _event_fields(event)
        with self._lock:
            events = self._events.setdefault(run_id, {})
            if seq in events:
                raise DuplicateEntry(f"entry {seq} of run {run_id} already exists; "
                                     "entries are never overwritten")
            events[seq] = json.loads(json.dumps(self._codecs.event_to(event)))

    def save_snapshot(self, run_id: str, state: S) -> None:
        with self._lock:
            self._clock += 1
            self._snapshots[run_id] = (self._clock,
                                       json.loads(json.dumps(self._codecs.state_to(state))))

    def load_latest(self, run_id: str) -> S | None:
        snap = self._snapshots.get(run_id)
        if snap is None:
            return None
        last = max(self._events.get(run_id, {}), default=None)
        return self._codecs.state(snap[1], run_id, last)

    def list_events(self, run_id: str, since_seq: int = 0) -> list[E]:
        events = self._events.get(run_id, {})
        return [self._codecs.event(events[s], run_id, s) for s in sorted(events) if s > since_seq]

    def delete_run(self, run_id: str) -> None:
        with self._lock:
            self._events.pop(run_id, None)
            self._snapshots.pop(run_id, None)

    def list_runs(self) -> list[str]:
        return [r for r, _ in sorted(self._snapshots.items(), key=lambda kv: -kv[1][0])]

    def close(self) -> None:
        return None


class PostgresCheckpointer(Generic[E, S]):
    """A ``Checkpointer`` on pgjournal's tables, synchronous, through a psycopg
    ``ConnectionPool`` (pass one, or a DSN and it opens and closes its own)."""

    def __init__(self, dsn_or_pool: str | SyncPool | None, event_cls: type[E],
                 state_cls: type[S], *, schema: str = "pgjournal", min_size: int = 1,
                 max_size: int = 10, serializer: Serializer | None = None) -> None:
        self.adapter = Adapter(schema=schema, source="checkpointer", family="checkpoint",
                               workflow="checkpointer", serializer=serializer)
        self._codecs = _Codecs(event_cls, state_cls, self.adapter.loads)
        self.db = SyncDB(self.adapter, dsn_or_pool, min_size=min_size, max_size=max_size)

    @staticmethod
    def schema_sql(schema: str = "pgjournal") -> list[str]:
        """The idempotent DDL of the whole pgjournal schema, for a DBA to review."""
        return [schema_script(schema)]

    def init_schema(self) -> None:
        """Create or upgrade the schema (``pgjournal.migrate``); safe to repeat."""
        self.db.migrate()

    def save_event(self, event: E) -> None:
        run_id, seq, ts, kind, lane = _event_fields(event)
        what = f"event seq {seq} of run {run_id!r}"
        self.db.fetch(
            "write", **self.adapter.run(run_id), position=seq, first=0, replace=False,
            name=kind, kind="entry", status="completed",
            output=self.adapter.dumps(self._codecs.event_to(event), what), error=None,
            meta=self.adapter.dumps({"seq": seq, "ts": ts, "lane_id": lane}, what),
            started_at=None, finished_at=None, chunks=None)

    def save_snapshot(self, run_id: str, state: S) -> None:
        what = f"snapshot of run {run_id!r}"
        row = self.db.fetchone("last_position", run=self.adapter.run(run_id)["run"])
        self.db.fetch("set_output", **self.adapter.run(run_id),
                      output=self.adapter.dumps(self._codecs.state_to(state), what),
                      meta_patch=json.dumps({"snapshot_after_seq": row and row["last"]}))

    def load_latest(self, run_id: str) -> S | None:
        row = self.db.fetchone("get_run", run=self.adapter.run(run_id)["run"],
                               sources=self.adapter.read_sources)
        if row is None or row["output"] is None:
            return None
        seq = (row["meta"] or {}).get("snapshot_after_seq")
        return self._codecs.state(row["output"], run_id, seq)

    def list_events(self, run_id: str, since_seq: int = 0) -> list[E]:
        rows = self.db.fetch("entries", run=self.adapter.run(run_id)["run"],
                             from_position=max(since_seq + 1, 0))
        return [self._codecs.event(r["output"], run_id, r["position"])
                for r in rows]

    def delete_run(self, run_id: str) -> None:
        self.db.fetch("delete_run", run=self.adapter.run(run_id)["run"],
                      sources=self.adapter.read_sources)

    def list_runs(self) -> list[str]:
        rows = self.db.fetch("list_runs", sources=self.adapter.read_sources, status=None,
                             workflow=None, with_output=True, by_updated=True,
                             limit=2**31 - 1)
        return [original_id(r) for r in rows]

    def close(self) -> None:
        self.db.close()
