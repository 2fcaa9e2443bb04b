"""Migrations: idempotent, race-free across processes, version mismatches explained."""

from __future__ import annotations

import subprocess
import sys
import uuid

import psycopg
import pytest

import pgjournal
from pgjournal.migrations import available, code_version, migration_script

from .conftest import ROOT


def _dsn_with_db(dsn: str, db: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + db


@pytest.fixture
def empty_db(pgjournal_dsn: str):  # type: ignore[no-untyped-def]
    name = f"mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _dsn_with_db(pgjournal_dsn, name)
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_is_idempotent(pgjournal_dsn: str) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    first = pgjournal.migrate(pgjournal_dsn, schema=schema)
    assert first == [m.version for m in available()]
    assert pgjournal.migrate(pgjournal_dsn, schema=schema) == []


def test_eight_processes_migrate_one_empty_database(empty_db: str) -> None:
    code = (
        "import sys, pgjournal; "
        "print(pgjournal.migrate(sys.argv[1], schema='pgjournal'))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, empty_db], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _out, err in results]
    applied = [out.strip() for out, _err in results]
    # Exactly one process applied everything; the other seven found nothing to do.
    full = str([m.version for m in available()])
    assert sorted(applied) == sorted([full] + ["[]"] * 7)
    with psycopg.connect(empty_db) as conn:
        rows = conn.execute("SELECT version FROM pgjournal.migrations ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == [m.version for m in available()]
        assert conn.execute("SELECT to_regclass('pgjournal.runs') IS NOT NULL").fetchone() == (
            True,)


async def test_schema_older_than_code_says_run_migrate(pgjournal_dsn: str,
                                                       pgjournal_schema: str) -> None:
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(f'DELETE FROM "{pgjournal_schema}".migrations WHERE version = %s',
                     (code_version(),))
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema)
    with pytest.raises(pgjournal.SchemaNotReady, match="run `pgjournal migrate"):
        await app.store()
    await app.close()


async def test_schema_newer_than_code_says_upgrade(pgjournal_dsn: str,
                                                   pgjournal_schema: str) -> None:
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO \"{pgjournal_schema}\".migrations VALUES (9999, 'future')")
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema)
    with pytest.raises(pgjournal.SchemaNotReady, match="upgrade the pgjournal package"):
        await app.store()
    await app.close()
    with pytest.raises(pgjournal.SchemaNotReady, match="newer than this pgjournal"):
        pgjournal.migrate(pgjournal_dsn, schema=pgjournal_schema)


async def test_missing_schema_says_run_migrate(pgjournal_dsn: str) -> None:
    app = pgjournal.App(pgjournal_dsn, schema="never_migrated")
    with pytest.raises(pgjournal.SchemaNotReady, match="pgjournal migrate --schema never_migrated"):
        await app.store()
    await app.close()


def test_migration_script_applies_with_plain_sql(empty_db: str) -> None:
    script = migration_script("from_script")
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(script.encode())
    # The runner then sees it as up to date.
    assert pgjournal.migrate(empty_db, schema="from_script") == []


def test_migration_script_is_idempotent(empty_db: str) -> None:
    script = migration_script("twice")
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(script.encode())
        conn.execute(script.encode())
        rows = conn.execute("SELECT version FROM twice.migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [m.version for m in available()]
