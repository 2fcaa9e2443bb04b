"""Schema migrations: numbered files in ``sql/migrations``, applied in order.

All pending files go in one transaction, under an advisory lock keyed on the
schema name, and each is recorded in ``<schema>.migrations``: any number of
processes may call :func:`migrate` at once and end with one correct schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ._sql import sql_dir, validate_identifier
from .connect import connect_sync, resolve_dsn
from .errors import SchemaNotReady

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations this code ships, in order."""
    found = []
    for path in sorted((sql_dir() / "migrations").iterdir()):
        m = _FILE.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    return found


def code_version() -> int:
    """The schema version this code expects."""
    return available()[-1].version


def migration_script(schema: str = "pgjournal") -> str:
    """The whole schema as one SQL script a DBA can review and apply with psql.

    Idempotent like :func:`migrate`: under the same advisory lock, each
    migration runs only if the schema's ``migrations`` table lacks it, so the
    script suits a fresh and an up-to-date schema alike.
    """
    schema = validate_identifier(schema)
    q = '"' + schema + '"'
    parts = [
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock(hashtextextended('pgjournal.migrate:{schema}', 0));",
        f"CREATE SCHEMA IF NOT EXISTS {q};",
        f"SET LOCAL search_path TO {q}, pg_catalog;",
        _MIGRATIONS_TABLE,
    ]
    for m in available():
        body, guard = f"$pgjournal_{m.version:04d}$", f"$pgjournal_do_{m.version:04d}$"
        if body in m.sql or guard in m.sql:
            raise RuntimeError(f"migration {m.version} contains a reserved dollar-quote tag")
        parts.append(
            f"-- migration {m.version:04d}_{m.name}\n"
            f"DO {guard}\nBEGIN\n"
            f"    IF NOT EXISTS (SELECT 1 FROM migrations WHERE version = {m.version}) THEN\n"
            f"        EXECUTE {body}{m.sql}{body};\n"
            f"        INSERT INTO migrations (version, name) VALUES ({m.version}, '{m.name}');\n"
            f"    END IF;\nEND\n{guard};"
        )
    parts.append("COMMIT;")
    return "\n".join(parts) + "\n"


_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);"""


def migrate(dsn: str | None = None, *, schema: str = "pgjournal") -> list[int]:
    """Bring ``schema`` up to this code's version; return the versions applied.

    Idempotent and safe to run from many processes at once. Raises
    ``SchemaNotReady`` if the database holds a newer schema than this code.
    """
    schema = validate_identifier(schema)
    dsn = resolve_dsn(dsn)
    ident = sql.Identifier(schema)
    applied: list[int] = []
    with connect_sync(dsn) as conn, conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"pgjournal.migrate:{schema}",),
        )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}, pg_catalog").format(ident))
        conn.execute(_MIGRATIONS_TABLE)
        done = {r["version"] for r in conn.execute("SELECT version FROM migrations")}
        known = available()
        newest = max(done, default=0)
        if newest > known[-1].version:
            raise SchemaNotReady(_newer_message(schema, newest, known[-1].version))
        for m in known:
            if m.version in done:
                continue
            conn.execute(m.sql.encode())
            conn.execute(
                "INSERT INTO migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
            )
            applied.append(m.version)
    return applied


def _newer_message(schema: str, db_version: int, code: int) -> str:
    return (
        f"schema {schema!r} is at version {db_version}, newer than this pgjournal "
        f"(which knows up to {code}); upgrade the pgjournal package"
    )


def _missing_message(schema: str) -> str:
    return (
        f"schema {schema!r} has no pgjournal tables; run `pgjournal migrate --schema {schema}` "
        "or pgjournal.migrate(dsn, schema=...) first"
    )


def schema_version_check(schema: str, row: dict[str, Any] | None) -> None:
    """Raise ``SchemaNotReady`` unless ``row`` (from the ``schema_version`` query) matches."""
    version = row["version"] if row else None
    if version is None:
        raise SchemaNotReady(_missing_message(schema))
    code = code_version()
    if version < code:
        raise SchemaNotReady(
            f"schema {schema!r} is at version {version} but this code needs {code}; "
            f"run `pgjournal migrate --schema {schema}`"
        )
    if version > code:
        raise SchemaNotReady(_newer_message(schema, version, code))


def schema_version_sql(schema: str) -> sql.Composed:
    """The query behind the version check; fails with UndefinedTable when missing."""
    return sql.SQL("SELECT max(version) AS version FROM {}.migrations").format(
        sql.Identifier(schema)
    )


def check_schema(conn: psycopg.Connection[dict[str, Any]], schema: str) -> None:
    """Synchronous schema check on an open connection."""
    try:
        row = conn.execute(schema_version_sql(schema)).fetchone()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        row = None
    schema_version_check(schema, row)
