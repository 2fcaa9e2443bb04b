"""What the adapters share: their named queries, id mapping, value encoding,
and one way to run a statement, synchronously or asynchronously.

Every adapter keeps its data in pgjournal's own tables (``runs``, ``steps``,
``stream_chunks``, ``signals``; ``run_events`` is written by the runs trigger),
so a DBA sees adapter runs next to native ones, told apart by ``runs.source``.
The SQL lives in ``sql/adapters.sql`` and the functions of
``sql/migrations/0004_adapters.sql``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from .._sql import Queries, validate_identifier
from ..connect import connect_sync, mask_dsn, open_pool, resolve_dsn
from ..errors import InvalidState, PgJournalError
from ..migrations import migrate, migration_script
from ..serializer import Serializer
from ..store import translate_error

Row = dict[str, Any]
AsyncPool = AsyncConnectionPool[Any]
SyncPool = ConnectionPool[Any]

#: The queue of every adapter run. Not a valid identifier, so no worker can be
#: configured to claim it.
ADAPTER_QUEUE = "pgjournal.adapters"

#: Namespace of the uuid5 ids given to adapter ids that are not UUIDs.
NAMESPACE = uuid.UUID("6f1c3a52-2d0e-5b8e-9a53-70676a6f7572")


class DuplicateEntry(InvalidState):
    """An entry with that key (sequence, event seq) is already journaled; entries are
    never overwritten."""


class CorruptEntry(PgJournalError):
    """A stored row cannot be turned back into the adapter's record type."""


def run_uuid(family: str, original: str | uuid.UUID) -> uuid.UUID:
    """The run id for an adapter's own id (session, agent, run id ...).

    A UUID (or its text) is used as it is, so a session id can be a run id.
    Anything else maps deterministically to a uuid5 within ``family``, so the
    same agent name used with two adapters does not share one run.
    """
    if isinstance(original, uuid.UUID):
        return original
    if not isinstance(original, str) or not original:
        raise ValueError(f"an id must be a non-empty string, not {original!r}")
    try:
        return uuid.UUID(original)
    except ValueError:
        return uuid.uuid5(NAMESPACE, f"{family}:{original}")


def original_id(row: Row) -> str:
    """The id the adapter's user gave, from a runs row."""
    meta = row.get("meta") or {}
    return str(meta.get("original_id", row["id"]))


def parse_time(text: str | None) -> datetime | None:
    """An ISO-8601 string as an aware datetime (naive means UTC); None if unparsable."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


#: The whole pgjournal schema as one idempotent SQL script for a DBA (the
#: seed interfaces' ``schema_sql()``): the same script as ``pgjournal migrate --sql``.
schema_script = migration_script


class Adapter:
    """An adapter's identity and statements on one schema: the ``source`` it
    writes in ``runs.source``, the ``family`` its ids map in, the name its runs
    get in ``runs.workflow``, and how its values are encoded."""

    def __init__(self, *, schema: str, source: str, family: str, workflow: str,
                 serializer: Serializer | None = None,
                 read_sources: tuple[str, ...] | None = None) -> None:
        self.schema = validate_identifier(schema)
        self.source = source
        self.family = family
        self.workflow = workflow
        self.read_sources = list(read_sources or (source,))
        self.serializer = serializer or Serializer()
        self._q = Queries(self.schema, "adapters.sql")

    def query(self, name: str) -> sql.Composed:
        return self._q[name]

    def run(self, original: str | uuid.UUID) -> dict[str, Any]:
        """The parameters naming the adapter run of ``original`` for the SQL functions."""
        return {"run": run_uuid(self.family, original), "source": self.source,
                "workflow": self.workflow,
                "run_meta": json.dumps({"original_id": str(original), "adapter": self.source})}

    def dumps(self, value: Any, what: str) -> str:
        return self.serializer.dumps(value, what=what)

    def loads(self, value: Any) -> Any:
        return self.serializer.loads(value)

    def translate(self, exc: psycopg.Error) -> Exception:
        if getattr(exc, "sqlstate", None) == "PJ412":
            msg = str(exc).splitlines()[0] if str(exc) else "duplicate entry"
            return DuplicateEntry(msg)
        return translate_error(exc, self.schema)


# -- running statements ----------------------------------------------------------


class SyncDB:
    """Synchronous statements through a psycopg ``ConnectionPool`` (given, or
    opened from a DSN and then owned and closed by ``close``)."""

    def __init__(self, adapter: Adapter, dsn_or_pool: str | SyncPool | None, *,
                 min_size: int = 1, max_size: int = 10) -> None:
        self.adapter = adapter
        if isinstance(dsn_or_pool, ConnectionPool):
            self.pool: SyncPool = dsn_or_pool
            self.owned = False
            self.dsn = str(dsn_or_pool.conninfo)
        else:
            self.dsn = resolve_dsn(dsn_or_pool)
            connect_sync(self.dsn).close()  # a bad DSN fails here, in one line
            self.pool = ConnectionPool(self.dsn, min_size=min_size, max_size=max_size,
                                       open=False, name=f"pgjournal:{mask_dsn(self.dsn)}",
                                       kwargs={"autocommit": True})
            self.pool.open(wait=True, timeout=30)
            self.owned = True

    def fetch(self, query: str, /, **params: Any) -> list[Row]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                cur.execute(self.adapter.query(query), params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise self.adapter.translate(exc) from exc

    def fetchone(self, query: str, /, **params: Any) -> Row | None:
        rows = self.fetch(query, **params)
        return rows[0] if rows else None

    def migrate(self) -> None:
        migrate(self.dsn, schema=self.adapter.schema)

    def close(self) -> None:
        if self.owned:
            self.pool.close()


class AsyncDB:
    """Asynchronous statements through a psycopg ``AsyncConnectionPool``."""

    def __init__(self, adapter: Adapter, pool: AsyncPool, *, owned: bool = False) -> None:
        self.adapter = adapter
        self.pool = pool
        self.owned = owned

    @staticmethod
    async def open_pool(dsn: str | None, *, min_size: int, max_size: int) -> AsyncPool:
        """A pool on ``dsn`` (see ``resolve_dsn``); a bad DSN fails in one line."""
        import asyncio

        resolved = await asyncio.to_thread(resolve_dsn, dsn)
        return await open_pool(resolved, min_size=min_size, max_size=max_size,
                               name=f"pgjournal:{mask_dsn(resolved)}")

    async def fetch(self, query: str, /, **params: Any) -> list[Row]:
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(self.adapter.query(query), params)
                return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise self.adapter.translate(exc) from exc

    async def fetchone(self, query: str, /, **params: Any) -> Row | None:
        rows = await self.fetch(query, **params)
        return rows[0] if rows else None

    async def migrate(self) -> None:
        import asyncio

        await asyncio.to_thread(migrate, str(self.pool.conninfo), schema=self.adapter.schema)

    async def close(self) -> None:
        if self.owned:
            await self.pool.close()


ToDict = Callable[[Any], dict[str, Any]]
FromDict = Callable[[dict[str, Any]], Any]


def codec(cls: type[Any]) -> tuple[ToDict, FromDict]:
    """``(to_dict, from_dict)`` for a class with ``to_dict``/``from_dict`` or a pydantic model."""
    from pydantic import BaseModel

    if isinstance(cls, type) and issubclass(cls, BaseModel):
        model: Any = cls
        return (lambda obj: obj.model_dump(mode="json")), model.model_validate
    if not callable(getattr(cls, "from_dict", None)):
        raise TypeError(f"{cls!r} needs to_dict()/from_dict() or to be a pydantic model")
    return (lambda obj: obj.to_dict()), cls.from_dict
