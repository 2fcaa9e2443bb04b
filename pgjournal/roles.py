"""The optional least-privilege roles script (``sql/roles.sql``), ready to run.

pgjournal works without it (one role owning the schema). A DBA who wants
workers that can only move runs through the fenced functions, and people who
can only read, runs the script this module returns, e.g.
``pgjournal roles --schema app | psql "$DSN"``. See ``docs/dba.md``.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from ._sql import sql_dir, validate_identifier
from .errors import ConfigurationError, PermissionDenied

DEFAULT_WORKER_ROLE = "pgjournal_worker"
DEFAULT_READER_ROLE = "pgjournal_reader"


def roles_sql(
    schema: str = "pgjournal",
    *,
    worker_role: str = DEFAULT_WORKER_ROLE,
    reader_role: str = DEFAULT_READER_ROLE,
) -> str:
    """The roles script for ``schema``, with the two role names filled in.

    Every name is validated as an identifier before it reaches the SQL, then
    quoted by psycopg; roles are cluster-wide, so tests (or a cluster hosting
    several schemas with separate rights) pass their own names.
    """
    names = {
        "schema": validate_identifier(schema),
        "worker": validate_identifier(worker_role, "role name"),
        "reader": validate_identifier(reader_role, "role name"),
    }
    if names["worker"] == names["reader"]:
        raise ConfigurationError(f"the worker and reader roles must differ (both {worker_role!r})")
    # "--!" lines talk about the template itself; the printed script is for psql.
    template = "".join(line for line in (sql_dir() / "roles.sql").read_text()
                       .splitlines(keepends=True) if not line.startswith("--!"))
    params: dict[str, sql.Composable] = {}
    for key, name in names.items():
        params[key] = sql.Identifier(name)
        params[f"{key}_name"] = sql.Literal(name)
    return sql.SQL(template).format(**params).as_string(None)


def permission_denied(exc: psycopg.Error, *, schema: str, user: str | None,
                      write: bool = False) -> PermissionDenied:
    """A refused statement (``insufficient_privilege``) as one clear sentence: what
    the database said, which role, and which role of the roles script may do it.

    Dashboards, scrapes and listings pointed at the worker role (which reads no
    view, by design) or at a role without grants answer this, never a traceback.
    ``write``: the refused statement changes state (an action, not a read).
    """
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    who = f"role {user!r}" if user else "this database role"
    if write:
        return PermissionDenied(
            f"{said}: {who} may not change schema {schema!r}. Actions need the schema's "
            "owner, or a role granted the client functions (docs/dba.md, Roles)")
    return PermissionDenied(
        f"{said}: {who} may not read schema {schema!r}. Dashboards, metrics scrapes "
        f"and read-only commands need the reader role (`pgjournal roles --schema {schema}`, "
        "docs/dba.md) or SELECT on the schema's tables and views")
