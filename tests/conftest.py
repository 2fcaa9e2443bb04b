"""Shared helpers: side-effect counting and worker processes; the PgBouncer pass.

``PGJOURNAL_TEST_POOLER=pgbouncer`` runs the tests with a real PgBouncer in
transaction mode in front of the session's server: ``pgjournal_dsn`` (what
tests give ``App``, workers, the CLI) is PgBouncer's DSN, ``PGJOURNAL_POOLER``
is ``transaction`` and ``PGJOURNAL_LISTEN_DSN`` the server itself, for every
App and every process a test starts. Schemas are still migrated directly, and
``pgjournal_postgres.dsn`` stays the server itself. Tests that need a direct
connection are skipped in that pass, each with its reason (``_DIRECT_ONLY``).
"""

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

from pgjournal.pytest_plugin import TestPostgres

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


#: ``PGJOURNAL_TEST_POOLER``: ``pgbouncer`` for the PgBouncer pass, else unset.
TEST_POOLER = os.environ.get("PGJOURNAL_TEST_POOLER", "").strip().lower()
if TEST_POOLER not in ("", "none", "pgbouncer"):
    raise pytest.UsageError(f"PGJOURNAL_TEST_POOLER={TEST_POOLER!r}: expected pgbouncer")
THROUGH_PGBOUNCER = TEST_POOLER == "pgbouncer"


@pytest.fixture(scope="session")
def session_pgbouncer(pgjournal_postgres: TestPostgres,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The PgBouncer pass's PgBouncer (``None`` outside that pass). While it
    runs, ``PGJOURNAL_POOLER=transaction`` and ``PGJOURNAL_LISTEN_DSN`` (the
    server, direct) are in the environment of the tests and their processes."""
    if not THROUGH_PGBOUNCER:
        yield None
        return
    from .pgbouncer import find_pgbouncer, running_bouncer

    if find_pgbouncer() is None:
        pytest.fail("PGJOURNAL_TEST_POOLER=pgbouncer but pgbouncer is not installed "
                    "(Debian: apt-get install pgbouncer)", pytrace=False)
    log = tmp_path_factory.mktemp("pgbouncer") / "pgbouncer.log"
    # Room for the heaviest tests' workers (several processes of concurrency 4
    # to 10) without heartbeats queueing in PgBouncer for longer than a lease.
    with running_bouncer(pgjournal_postgres.dsn, keep_log=log, pool_size=60) as bouncer:
        patch = pytest.MonkeyPatch()
        patch.setenv("PGJOURNAL_POOLER", "transaction")
        patch.setenv("PGJOURNAL_LISTEN_DSN", pgjournal_postgres.dsn)
        # The tests' own connections (helpers that poll with plain psycopg.connect)
        # too: a statement polled 5 times would be prepared on one server
        # connection and executed on another ("prepared statement does not exist").
        from psycopg._preparing import PrepareManager

        def never(_self: Any, _value: Any = None) -> None:
            return None

        patch.setattr(PrepareManager, "prepare_threshold", property(never, never))
        try:
            yield bouncer
        finally:
            patch.undo()


@pytest.fixture
def pgjournal_dsn(pgjournal_postgres: TestPostgres, session_pgbouncer: Any) -> str:
    """The DSN tests hand to Apps, workers and the CLI: the server's, or in the
    PgBouncer pass PgBouncer's (overrides the plugin's fixture)."""
    if session_pgbouncer is not None:
        return str(session_pgbouncer.dsn)
    return pgjournal_postgres.dsn


#: Tests skipped in the PgBouncer pass: node id (without parameters) -> why.
_DIRECT_ONLY: dict[str, str] = {
    "tests/test_children.py::test_dba_tree_queries_from_the_doc":
        "the test's DBA connection (tests/test_dba.py's Db) sets search_path for its "
        "session, as a psql session would",
    "tests/test_cli.py::test_app_reads_pgjournal_schema_and_psql_opens_on_it":
        "pgjournal psql passes search_path as a startup option, which PgBouncer refuses "
        "(docs/deploy.md: point psql at the server directly)",
    "tests/test_cli.py::test_roles_output_is_ready_for_psql":
        "it feeds pgjournal roles' SQL to pgjournal psql (search_path as a startup option, "
        "which PgBouncer refuses)",
    "tests/test_cli.py::test_demo_refuses_politely_while_another_demo_runs":
        "the demo's one-at-a-time guard is a session advisory lock (the demo is a local "
        "tool, not run through a pooler)",
}


#: Modules whose tests start servers of their own and never use the session's.
_OWN_SERVER_MODULES = {"test_chaos", "test_demo", "test_embedded"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``own_server`` the tests that never touch the session's server (they
    start throwaway servers of their own): CI's second pass, on the machine's
    existing server, leaves them out, since they would only repeat the first.

    In the PgBouncer pass, tests that never ask for ``pgjournal_dsn`` (help
    texts, argument checks, servers of their own) are deselected: nothing of
    theirs would go through PgBouncer. Those that need a direct connection are
    skipped with their reason."""
    if THROUGH_PGBOUNCER:
        dropped = [item for item in items
                   if "pgjournal_dsn" not in getattr(item, "fixturenames", ())]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if item not in dropped]
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in _OWN_SERVER_MODULES or \
                "pgjournal_server_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.own_server)
        if THROUGH_PGBOUNCER:
            reason = _DIRECT_ONLY.get(item.nodeid.split("[", 1)[0]) \
                or _DIRECT_ONLY.get(item.nodeid.split("::", 1)[0])
            if reason:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs a direct connection (PgBouncer pass): {reason}"))
