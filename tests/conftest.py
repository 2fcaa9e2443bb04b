"""Shared helpers: side-effect counting and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float = 30.0,
                   interval: float = 0.05, what: str = "condition") -> Any:
    """Await until ``check()`` returns something truthy (a DB-observed event)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def lease_expired(store: Any, run_id: Any) -> bool:
    """True once the run's lease (lease_until while running; due_at for rows
    written the old way) lies in the past."""
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            f'SELECT status = \'running\' AND coalesce(lease_until, due_at) < now() AS expired '
            f'FROM "{store.schema}".runs WHERE id = %s', (run_id,))
        row = await cur.fetchone()
    return bool(row and row["expired"])


@contextlib.asynccontextmanager
async def serving(app: Any, **kw: Any) -> AsyncIterator[Any]:
    """An in-process ``pgjournal.Worker`` on ``app`` for the body of the block
    (concurrency 4 and a 5 s lease unless given), stopped gracefully after it."""
    import pgjournal

    kw.setdefault("concurrency", 4)
    kw.setdefault("lease", 5)
    worker = pgjournal.Worker(app, **kw)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        yield worker
    finally:
        worker.stop()
        await task


class Effects:
    """Counts the side effects that step functions in ``tests.procs`` commit."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{schema}".test_effects (id bigserial PRIMARY KEY, '
                "run_id text NOT NULL, step text NOT NULL, pid int NOT NULL, "
                "at timestamptz NOT NULL DEFAULT now())"
            )

    def rows(self, run_id: Any = None) -> list[tuple[str, str, int]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(
                f'SELECT run_id, step, pid FROM "{self.schema}".test_effects '
                "WHERE %s::text IS NULL OR run_id = %s::text ORDER BY id",
                (None if run_id is None else str(run_id),) * 2,
            ).fetchall()

    def count(self, run_id: Any, step: str) -> int:
        return sum(1 for _r, s, _p in self.rows(run_id) if s == step)

    async def wait(self, run_id: Any, step: str, n: int = 1, timeout: float = 30) -> None:
        async def check() -> bool:
            return await asyncio.to_thread(self.count, run_id, step) >= n
        await wait_for(check, timeout, what=f"step {step} of run {run_id} to run {n}x")


@pytest.fixture
def effects(pgjournal_dsn: str, pgjournal_schema: str) -> Effects:
    return Effects(pgjournal_dsn, pgjournal_schema)


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def spawn_worker(pgjournal_dsn: str, pgjournal_schema: str,
                 tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``tests.procs`` workers as real processes; all are killed at teardown."""
    procs: list[WorkerProcess] = []

    def spawn(*, env: dict[str, str] | None = None, dsn: str | None = None,
              schema: str | None = None, **opts: Any) -> WorkerProcess:
        args = [sys.executable, "-m", "tests.procs", dsn or pgjournal_dsn,
                schema or pgjournal_schema]
        for key, value in opts.items():
            args += [f"--{key}", str(value)]
        log = tmp_path / f"worker-{len(procs)}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT)
        wp = WorkerProcess(proc, log)
        procs.append(wp)
        return wp

    yield spawn
    for wp in procs:
        if wp.proc.poll() is None:
            os.kill(wp.proc.pid, signal.SIGCONT)
            wp.kill()
            wp.proc.wait(10)


#: Modules whose tests start servers of their own and never use the session's.
_OWN_SERVER_MODULES = {"test_chaos", "test_demo", "test_embedded"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``own_server`` the tests that never touch the session's server (they
    start throwaway servers of their own): CI's second pass, on the machine's
    existing server, leaves them out, since they would only repeat the first."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in _OWN_SERVER_MODULES or \
                "pgjournal_server_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.own_server)
