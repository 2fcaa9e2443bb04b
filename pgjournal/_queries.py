"""The named statements of ``sql/cli.sql``, shared by the CLI, the demo and the demo app.

They live apart from both so that ``pgjournal.cli`` and ``pgjournal.demo`` do
not import each other: each imports this module.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from ._sql import sql_dir, validate_identifier
from .store import translate_error

if TYPE_CHECKING:
    from .app import App

Row = dict[str, Any]


@cache
def _cli_texts() -> dict[str, str]:
    """The named statements of ``sql/cli.sql`` (same format as ``queries.sql``)."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in (sql_dir() / "cli.sql").read_text().splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line.split(":", 1)[1].strip(), []
        elif name is not None and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def cli_query(name: str, schema: str, **literals: Any) -> sql.Composed:
    """Named query ``name`` for ``schema`` (validated, quoted); ``literals`` fill
    other placeholders as SQL literals (only for SQL printed for people)."""
    ident = sql.Identifier(validate_identifier(schema))
    parts = {k: sql.Literal(v) for k, v in literals.items()}
    return sql.SQL(_cli_texts()[name]).format(schema=ident, **parts)


async def run_query(conn: psycopg.AsyncConnection[Row], name: str, schema: str, /,
                    **params: Any) -> list[Row]:
    """Execute a named CLI query on ``conn``, with user-caused errors translated."""
    try:
        cur = await conn.execute(cli_query(name, schema), params)
        return await cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        raise translate_error(exc, schema) from exc


async def cli_fetch(app: App, name: str, /, **params: Any) -> list[Row]:
    """Execute a named CLI query through the app's pool (schema checked on open)."""
    store = await app.store()
    async with store.pool.connection() as conn:
        return await run_query(conn, name, app.schema, **params)
