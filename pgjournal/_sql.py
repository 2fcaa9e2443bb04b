"""SQL plumbing: identifier validation and the named queries of ``sql/queries.sql``.

The SQL text lives in ``sql/``; Python only fills in the schema name, always
as a quoted identifier after validation, never by pasting user text.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from psycopg import sql

from .errors import ConfigurationError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_identifier(name: str, what: str = "schema name") -> str:
    """Return ``name`` if it is a safe Postgres identifier, else raise ``ConfigurationError``.

    Allowed: a letter or underscore, then letters, digits or underscores, at
    most 63 characters (Postgres' limit). Checked before any SQL runs.
    """
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ConfigurationError(
            f"invalid {what} {name!r}: use 1-63 letters, digits or underscores, "
            "starting with a letter or underscore"
        )
    return name


def sql_dir() -> Path:
    """The ``sql/`` directory: inside the wheel, or at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError("pgjournal's sql/ directory is missing from the installation")


def parse_named_queries(text: str) -> dict[str, str]:
    """The ``-- name: x`` blocks of a SQL file's text, by name (comment lines
    inside a block are left out; a trailing semicolon is dropped)."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line.split(":", 1)[1].strip(), []
        elif name is not None and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


@cache
def named_queries(filename: str = "queries.sql") -> dict[str, str]:
    """The ``-- name: x`` blocks of one file in ``sql/``, by name."""
    return parse_named_queries((sql_dir() / filename).read_text())


def schema_query(text: str, schema: str, **literals: object) -> sql.Composed:
    """``text`` with ``{schema}`` as the quoted, validated schema identifier (and
    other placeholders as SQL literals: only for SQL printed for people)."""
    ident = sql.Identifier(validate_identifier(schema))
    parts = {k: sql.Literal(v) for k, v in literals.items()}
    return sql.SQL(text).format(schema=ident, **parts)


class Queries:
    """The named queries of ``sql/<filename>``, formatted once for one schema."""

    def __init__(self, schema: str, filename: str = "queries.sql") -> None:
        self.schema = validate_identifier(schema)
        ident = sql.Identifier(self.schema)
        self._q = {
            name: sql.SQL(text).format(schema=ident)
            for name, text in named_queries(filename).items()
        }

    def __getitem__(self, name: str) -> sql.Composed:
        return self._q[name]
