"""The named statements of ``sql/cli.sql``, shared by the CLI, the demo and the demo app.

They live apart from both so that ``pgjournal.cli`` and ``pgjournal.demo`` do
not import each other: each imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg import sql

from ._sql import named_queries, schema_query
from .store import translate_error

if TYPE_CHECKING:
    from .store import Store

Row = dict[str, Any]


class Pooled(Protocol):
    """What ``cli_fetch`` needs of an app (``pgjournal.App`` has it). A protocol:
    the app imports this module, not the reverse."""

    @property
    def schema(self) -> str: ...

    async def store(self) -> Store: ...


def cli_query(name: str, schema: str, **literals: Any) -> sql.Composed:
    """Named query ``name`` for ``schema`` (validated, quoted); ``literals`` fill
    other placeholders as SQL literals (only for SQL printed for people)."""
    return schema_query(named_queries("cli.sql")[name], schema, **literals)


async def run_query(conn: psycopg.AsyncConnection[Row], name: str, schema: str, /,
                    **params: Any) -> list[Row]:
    """Execute a named CLI query on ``conn``, with user-caused errors translated."""
    try:
        cur = await conn.execute(cli_query(name, schema), params)
        return await cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        raise translate_error(exc, schema) from exc


async def cli_fetch(app: Pooled, name: str, /, **params: Any) -> list[Row]:
    """Execute a named CLI query through the app's pool (schema checked on open)."""
    store = await app.store()
    async with store.pool.connection() as conn:
        return await run_query(conn, name, app.schema, **params)
