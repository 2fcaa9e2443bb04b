"""Fixtures for the adapter tests: pools on the test's own migrated schema."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def apool(pgjournal_dsn: str, pgjournal_schema: str) -> AsyncIterator[Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        pgjournal_dsn, min_size=1, max_size=6, open=False, kwargs={"autocommit": True})
    await pool.open(wait=True)
    yield pool
    await pool.close()


@pytest.fixture
def spool(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Any]:
    pool: ConnectionPool[Any] = ConnectionPool(pgjournal_dsn, min_size=1, max_size=4,
                                               open=False, kwargs={"autocommit": True})
    pool.open(wait=True)
    yield pool
    pool.close()


class DBA:
    """Plain SELECTs a DBA would run, on the test's schema."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema

    def rows(self, query: str, *params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


@pytest.fixture
def dba(pgjournal_dsn: str, pgjournal_schema: str) -> DBA:
    return DBA(pgjournal_dsn, pgjournal_schema)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start ``tests.adapters.procs`` as real processes; killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"proc-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "tests.adapters.procs", *args],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe:
                pipe.close()
