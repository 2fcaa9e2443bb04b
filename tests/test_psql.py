"""``pgjournal psql`` opens on the schema whatever its spelling: the schema goes into
``search_path`` quoted, as every other command quotes it (a mixed-case name left
unquoted is folded to lower case by the server and names another schema)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgjournal.migrations import migrate
from pgjournal.pytest_plugin import TestPostgres

from .test_cli import clean_env, run_cli


@pytest.fixture
def mixed_case_schema(pgjournal_postgres: TestPostgres) -> Iterator[str]:
    schema = f"Psql_{uuid.uuid4().hex[:10]}"
    migrate(pgjournal_postgres.dsn, schema=schema)
    try:
        yield schema
    finally:
        with psycopg.connect(pgjournal_postgres.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_psql_opens_on_a_mixed_case_schema(pgjournal_postgres: TestPostgres,
                                           mixed_case_schema: str) -> None:
    # The server directly: a transaction-mode pooler refuses startup options.
    env = clean_env(PGJOURNAL_DSN=pgjournal_postgres.dsn, PGJOURNAL_SCHEMA=mixed_case_schema)
    res = run_cli("psql", "--", "-Atc", "SELECT current_schema()", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == mixed_case_schema
    res = run_cli("psql", "--", "-Atc", "SELECT count(*) FROM run_overview", env=env)
    assert res.returncode == 0 and res.stdout.strip() == "0", res.stderr
