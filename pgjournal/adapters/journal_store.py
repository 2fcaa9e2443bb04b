"""Step journal store: ``get_step``/``put_step``/``get_stream``/``put_stream`` by
session and step name, the storage under the journaled runtime.

``PostgresJournalStore`` keeps a session as a run (``runs.source =
'journal_store'``), a step as a ``steps`` row (kind ``step``, value in
``output``) and a stream as a ``steps`` row of kind ``stream`` with its chunks
in ``stream_chunks``. The seed keyed entries by name alone: ``put_step``
replaces the one entry of that name, it does not add another occurrence.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..serializer import Serializer
from ._core import Adapter, AsyncDB, AsyncPool, schema_script


@dataclass(frozen=True)
class JournalEntry:
    """A journaled step value and when it was written (seconds since the epoch)."""

    value: Any
    created_at: float


@runtime_checkable
class JournalStore(Protocol):
    """Where a journaled runtime keeps step results and stream chunks."""

    async def get_step(self, session_id: str, step_name: str) -> JournalEntry | None: ...

    async def put_step(self, session_id: str, step_name: str, value: Any) -> None: ...

    async def get_stream(self, session_id: str, step_name: str) -> list[Any] | None: ...

    async def put_stream(self, session_id: str, step_name: str, chunks: list[Any]) -> None: ...

    async def aclose(self) -> None: ...


class InMemoryJournalStore:
    """A dict-backed ``JournalStore`` for unit tests; gone with the process."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, str], JournalEntry] = {}
        self._streams: dict[tuple[str, str], list[Any]] = {}

    async def get_step(self, session_id: str, step_name: str) -> JournalEntry | None:
        return self._steps.get((session_id, step_name))

    async def put_step(self, session_id: str, step_name: str, value: Any) -> None:
        self._steps[(session_id, step_name)] = JournalEntry(value, time.time())

    async def get_stream(self, session_id: str, step_name: str) -> list[Any] | None:
        chunks = self._streams.get((session_id, step_name))
        return None if chunks is None else list(chunks)

    async def put_stream(self, session_id: str, step_name: str, chunks: list[Any]) -> None:
        self._streams[(session_id, step_name)] = list(chunks)

    def step_keys(self) -> list[tuple[str, str]]:
        """The ``(session_id, step_name)`` pairs that have a journaled step."""
        return list(self._steps)

    def stream_keys(self) -> list[tuple[str, str]]:
        """The ``(session_id, step_name)`` pairs that have a journaled stream."""
        return list(self._streams)

    async def aclose(self) -> None:
        return None


class PostgresJournalStore:
    """A ``JournalStore`` on pgjournal's tables, through an async psycopg pool.

    ``schema`` is the pgjournal schema (created by ``init_schema``); ``source``
    is what ``runs.source`` says for the sessions it creates.
    """

    def __init__(self, pool: AsyncPool, *, schema: str = "pgjournal",
                 source: str = "journal_store", serializer: Serializer | None = None,
                 _owned: bool = False) -> None:
        self.adapter = Adapter(schema=schema, source=source, family="session",
                               workflow=source, serializer=serializer)
        self.db = AsyncDB(self.adapter, pool, owned=_owned)

    @classmethod
    async def connect(cls, dsn: str | None = None, *, min_size: int = 1, max_size: int = 10,
                      schema: str = "pgjournal", serializer: Serializer | None = None
                      ) -> PostgresJournalStore:
        """Open a pool on ``dsn`` (None: ``PGJOURNAL_DSN`` or the embedded dev server);
        ``aclose`` closes it."""
        pool = await AsyncDB.open_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool, schema=schema, serializer=serializer, _owned=True)

    @property
    def pool(self) -> AsyncPool:
        return self.db.pool

    @staticmethod
    def schema_sql(schema: str = "pgjournal") -> list[str]:
        """The idempotent DDL of the whole pgjournal schema, for a DBA to review."""
        return [schema_script(schema)]

    async def init_schema(self) -> None:
        """Create or upgrade the schema (``pgjournal.migrate``); safe to repeat."""
        await self.db.migrate()

    async def get_step(self, session_id: str, step_name: str) -> JournalEntry | None:
        row = await self.db.fetchone("get_named", run=self.adapter.run(session_id)["run"],
                                     name=step_name, kind="step")
        if row is None:
            return None
        return JournalEntry(self.adapter.loads(row["output"]), row["updated_at"].timestamp())

    async def put_step(self, session_id: str, step_name: str, value: Any) -> None:
        text = self.adapter.dumps(value, f"value of step {step_name!r} of session {session_id!r}")
        await self.db.fetch("put_named", **self.adapter.run(session_id), name=step_name,
                            kind="step", output=text, chunks=None)

    async def get_stream(self, session_id: str, step_name: str) -> list[Any] | None:
        run = self.adapter.run(session_id)["run"]
        row = await self.db.fetchone("get_named", run=run, name=step_name, kind="stream")
        if row is None:
            return None
        rows = await self.db.fetch("get_chunks", run=run, position=row["position"])
        return [self.adapter.loads(r["chunk"]) for r in rows]

    async def put_stream(self, session_id: str, step_name: str, chunks: list[Any]) -> None:
        what = f"chunks of stream {step_name!r} of session {session_id!r}"
        text = "[" + ",".join(self.adapter.dumps(c, what) for c in chunks) + "]"
        await self.db.fetch("put_named", **self.adapter.run(session_id), name=step_name,
                            kind="stream", output=f'{{"chunks": {len(chunks)}}}', chunks=text)

    # -- what the runtime needs beyond the seed interface ------------------------

    async def set_session_status(self, session_id: str, status: str,
                                 error: dict[str, Any] | None = None) -> None:
        """Mark the session's run running (opened) or completed/failed (closed)."""
        await self.db.fetch("set_status", **self.adapter.run(session_id), status=status,
                            error=None if error is None else json.dumps(error))

    async def send_signal(self, session_id: str, name: str, payload: Any) -> None:
        """Store a signal for the session durably (and NOTIFY other processes)."""
        text = self.adapter.dumps(payload, f"payload of signal {name!r}")
        await self.db.fetch("send_signal", **self.adapter.run(session_id), name=name,
                            payload=text)

    async def take_signal(self, session_id: str, name: str, index: int) -> tuple[bool, Any]:
        """The ``index``-th signal ``name`` of the session: journaled, or consumed now."""
        row = await self.db.fetchone("take_signal", **self.adapter.run(session_id), name=name,
                                     index=index)
        if row is None or not row["found"]:
            return False, None
        return True, self.adapter.loads(row["payload"])

    async def aclose(self) -> None:
        await self.db.close()
