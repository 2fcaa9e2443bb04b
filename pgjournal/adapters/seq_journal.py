"""Sequence-numbered journal (async): an agent's entries numbered 1, 2, 3 ...,
replayable from any sequence, compactable.

``PostgresJournalStorage`` keeps an agent as a run (``source = 'seq_journal'``)
and entry ``n`` as the ``steps`` row at position ``n`` (kind ``entry``,
``name`` = the event's type, ``output`` = the event, ``meta`` = iteration and
timestamp). Sequences are allocated in the database under a lock on the
agent's run row, so any number of processes appending to one agent get
gap-free, distinct sequences; the primary key (run, position) is the backstop.

Sequences start at 1, and ``latest_sequence`` of an empty (or compacted)
journal is 0: "no entry" is never confused with "one entry". The seed resumed
at the latest sequence and wrote it again; here the next entry is always
``latest + 1`` and is decided by the storage, not by the process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from ..serializer import Serializer
from ._core import Adapter, AsyncDB, AsyncPool, DuplicateEntry, schema_script


class SeqEntry(BaseModel):
    """One journal entry. ``sequence`` 0 means "not assigned yet"."""

    sequence: int = 0
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
    agent_id: str = ""
    iteration: int = 0
    event: Any = None


def _event_name(event: Any) -> str:
    if isinstance(event, BaseModel):
        return type(event).__name__
    if isinstance(event, dict):
        for key in ("type", "kind", "event"):
            if isinstance(event.get(key), str) and event[key]:
                return str(event[key])
    return "entry"


@runtime_checkable
class JournalStorage(Protocol):
    """Where a ``DurableJournal`` keeps entries; agents are isolated from each other."""

    async def store(self, entry: SeqEntry) -> SeqEntry: ...

    async def read_entries(self, agent_id: str) -> list[SeqEntry]: ...

    async def read_from(self, agent_id: str, from_sequence: int) -> list[SeqEntry]: ...

    async def latest_sequence(self, agent_id: str) -> int: ...

    async def compact(self, agent_id: str) -> int: ...


class InMemoryJournalStorage:
    """``JournalStorage`` in memory, for unit tests."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[int, SeqEntry]] = {}
        self._lock = asyncio.Lock()

    async def store(self, entry: SeqEntry) -> SeqEntry:
        """Store ``entry``; sequence 0 is assigned the next one. Returns what was stored."""
        async with self._lock:
            entries = self._entries.setdefault(entry.agent_id, {})
            seq = entry.sequence if entry.sequence > 0 else max(entries, default=0) + 1
            if seq in entries:
                raise DuplicateEntry(f"entry {seq} of agent {entry.agent_id!r} already exists; "
                                     "entries are never overwritten")
            stored = entry.model_copy(update={"sequence": seq}, deep=True)
            entries[seq] = stored
            return stored.model_copy(deep=True)

    async def read_entries(self, agent_id: str) -> list[SeqEntry]:
        return await self.read_from(agent_id, 0)

    async def read_from(self, agent_id: str, from_sequence: int) -> list[SeqEntry]:
        entries = self._entries.get(agent_id, {})
        return [entries[s].model_copy(deep=True) for s in sorted(entries) if s >= from_sequence]

    async def latest_sequence(self, agent_id: str) -> int:
        """The highest sequence stored for the agent; 0 if none."""
        return max(self._entries.get(agent_id, {}), default=0)

    async def max_iteration(self, agent_id: str) -> int:
        return max((e.iteration for e in self._entries.get(agent_id, {}).values()), default=0)

    async def compact(self, agent_id: str) -> int:
        """Remove all of the agent's entries; returns how many."""
        async with self._lock:
            return len(self._entries.pop(agent_id, {}))

    async def aclose(self) -> None:
        return None


class PostgresJournalStorage:
    """``JournalStorage`` on pgjournal's tables, through an async psycopg pool."""

    def __init__(self, pool: AsyncPool, *, schema: str = "pgjournal",
                 serializer: Serializer | None = None, _owned: bool = False) -> None:
        self.adapter = Adapter(schema=schema, source="seq_journal", family="agent",
                               workflow="seq_journal", serializer=serializer)
        self.db = AsyncDB(self.adapter, pool, owned=_owned)

    @classmethod
    async def connect(cls, dsn: str | None = None, *, min_size: int = 1, max_size: int = 10,
                      schema: str = "pgjournal", serializer: Serializer | None = None
                      ) -> PostgresJournalStorage:
        pool = await AsyncDB.open_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool, schema=schema, serializer=serializer, _owned=True)

    @staticmethod
    def schema_sql(schema: str = "pgjournal") -> list[str]:
        """The idempotent DDL of the whole pgjournal schema, for a DBA to review."""
        return [schema_script(schema)]

    async def init_schema(self) -> None:
        await self.db.migrate()

    async def store(self, entry: SeqEntry) -> SeqEntry:
        """Store ``entry``; sequence 0 is assigned the next one in the database.
        An explicit sequence that exists already raises ``DuplicateEntry``."""
        if not entry.agent_id:
            raise ValueError("an entry needs an agent_id")
        what = f"event of agent {entry.agent_id!r}"
        ts = entry.timestamp if entry.timestamp.tzinfo else entry.timestamp.replace(tzinfo=UTC)
        row = await self.db.fetchone(
            "write", **self.adapter.run(entry.agent_id),
            position=entry.sequence if entry.sequence > 0 else None, first=1, replace=False,
            name=_event_name(entry.event), kind="entry", status="completed",
            output=self.adapter.dumps(entry.event, what), error=None,
            meta=json.dumps({"iteration": entry.iteration, "timestamp": ts.isoformat()}),
            started_at=ts, finished_at=ts, chunks=None)
        assert row is not None
        return entry.model_copy(update={"sequence": row["position"]})

    def _entries(self, agent_id: str, rows: Sequence[dict[str, Any]]) -> list[SeqEntry]:
        return [SeqEntry(sequence=r["position"],
                         timestamp=datetime.fromisoformat(r["meta"]["timestamp"])
                         if "timestamp" in (r["meta"] or {}) else r["started_at"],
                         agent_id=agent_id, iteration=int((r["meta"] or {}).get("iteration", 0)),
                         event=self.adapter.loads(r["output"]))
                for r in rows]

    async def read_entries(self, agent_id: str) -> list[SeqEntry]:
        return await self.read_from(agent_id, 0)

    async def read_from(self, agent_id: str, from_sequence: int) -> list[SeqEntry]:
        """The agent's entries with sequence >= ``from_sequence``, in order."""
        rows = await self.db.fetch("entries", run=self.adapter.run(agent_id)["run"],
                                   from_position=max(from_sequence, 0))
        return self._entries(agent_id, rows)

    async def latest_sequence(self, agent_id: str) -> int:
        """The highest sequence stored for the agent; 0 if none (sequences start at 1)."""
        row = await self.db.fetchone("last_position", run=self.adapter.run(agent_id)["run"])
        return int(row["last"]) if row and row["last"] is not None else 0

    async def max_iteration(self, agent_id: str) -> int:
        row = await self.db.fetchone("max_iteration", run=self.adapter.run(agent_id)["run"])
        return int(row["iteration"]) if row and row["iteration"] is not None else 0

    async def compact(self, agent_id: str) -> int:
        """Remove all of the agent's entries; returns how many. Sequences restart at 1."""
        row = await self.db.fetchone("compact", run=self.adapter.run(agent_id)["run"],
                                     source=self.adapter.source)
        return int(row["removed"]) if row else 0

    async def aclose(self) -> None:
        await self.db.close()


class DurableJournal:
    """One agent's journal on a ``JournalStorage``.

    The storage assigns sequences, so two journals (or processes) appending to
    one agent never write one sequence twice; ``next_sequence`` is what this
    journal expects next, a hint when others append too.
    """

    def __init__(self, storage: JournalStorage, agent_id: str) -> None:
        if not agent_id:
            raise ValueError("DurableJournal needs an agent_id")
        self.storage = storage
        self.agent_id = agent_id
        self._sequence = 0

    async def initialize(self) -> None:
        """Resume from the storage: the next append follows its latest sequence."""
        self._sequence = await self.storage.latest_sequence(self.agent_id)

    def next_sequence(self) -> int:
        return self._sequence + 1

    async def append(self, entry: SeqEntry | Any, *, iteration: int | None = None) -> SeqEntry:
        """Journal ``entry`` (a ``SeqEntry``, or an event to wrap in one) for this agent;
        returns it with its sequence and agent id."""
        if not isinstance(entry, SeqEntry):
            entry = SeqEntry(event=entry, iteration=iteration or 0)
        elif iteration is not None:
            entry = entry.model_copy(update={"iteration": iteration})
        stored = await self.storage.store(
            entry.model_copy(update={"sequence": 0, "agent_id": self.agent_id}))
        self._sequence = max(self._sequence, stored.sequence)
        return stored

    async def replay(self) -> list[SeqEntry]:
        return await self.storage.read_entries(self.agent_id)

    async def replay_from(self, sequence: int) -> list[SeqEntry]:
        """Entries with sequence >= ``sequence``."""
        return await self.storage.read_from(self.agent_id, sequence)

    async def compact(self) -> int:
        """Remove the agent's entries (returns how many); the sequence restarts at 1."""
        removed = await self.storage.compact(self.agent_id)
        self._sequence = 0
        return removed

    async def last_completed_iteration(self) -> int:
        """The highest iteration journaled; 0 if none."""
        fast = getattr(self.storage, "max_iteration", None)
        if fast is not None:
            return int(await fast(self.agent_id))
        return max((e.iteration for e in await self.replay()), default=0)
