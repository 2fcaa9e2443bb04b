"""The reference loop: plain psycopg, one job per transaction, no library.

Enqueue is one INSERT (with its NOTIFY) per job. A worker process is one
connection that claims one row with ``FOR UPDATE SKIP LOCKED``, runs the body
and marks the row done in the same transaction; it sleeps on LISTEN when the
queue is empty. A journaled workflow writes each step result with one INSERT
in its own transaction. This is the floor a library's per-job and per-step
cost is compared against: a library that batches can beat it, one that adds
round trips falls behind it.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from importlib.metadata import version as pkg_version
from typing import Any

import psycopg

from .base import (
    BATCH,
    ENQUEUE,
    MODE_NOOP,
    MODE_RECOVER,
    MODE_STEPS,
    QUEUE,
    SCALE,
    WORKFLOW,
    Adapter,
    report_latency,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    status      text NOT NULL DEFAULT 'queued',
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (id) WHERE status = 'running';
CREATE TABLE IF NOT EXISTS journal (
    job_id   bigint NOT NULL,
    position integer NOT NULL,
    output   jsonb,
    PRIMARY KEY (job_id, position)
);
"""

ENQUEUE_SQL = """WITH j AS (INSERT INTO jobs (kind, payload) VALUES (%s, %s) RETURNING id)
SELECT pg_notify('raw_jobs', '') FROM j"""


class RawAdapter(Adapter):
    name = "raw"
    features = frozenset({ENQUEUE, BATCH, QUEUE, WORKFLOW, SCALE})
    config_note = "1 connection per process, 1 job per transaction, LISTEN when idle"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @staticmethod
    def version() -> str:
        return f"psycopg {pkg_version('psycopg')}"

    async def _c(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self._conn

    async def setup(self) -> None:
        await (await self._c()).execute(SCHEMA)

    async def reset(self) -> None:
        await (await self._c()).execute("TRUNCATE jobs, journal RESTART IDENTITY")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def enqueue_one(self, t0: float = 0.0, mode: str = MODE_NOOP) -> None:
        await (await self._c()).execute(ENQUEUE_SQL, (mode, json.dumps({"t0": t0})))

    async def enqueue_batch(self, n: int, mode: str = MODE_NOOP) -> None:
        conn = await self._c()
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO jobs (kind, payload) SELECT %s, '{\"t0\": 0}' "
                "FROM generate_series(1, %s)", (mode, n))
            await conn.execute("SELECT pg_notify('raw_jobs', '')")

    async def unfinished(self) -> int:
        cur = await (await self._c()).execute("SELECT count(*) FROM jobs WHERE status <> 'done'")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def any_unfinished(self) -> bool:
        cur = await (await self._c()).execute(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued') "
            "OR EXISTS (SELECT 1 FROM jobs WHERE status = 'running')")
        row = await cur.fetchone()
        return bool(row and row[0])

    async def fill_history(self, runs: int, steps_per_run: int) -> None:
        conn = await self._c()
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO jobs (kind, status, payload, finished_at) "
                "SELECT 'steps', 'done', '{\"t0\": 0}', now() FROM generate_series(1, %s)",
                (runs,))
            await conn.execute(
                "INSERT INTO journal (job_id, position, output) "
                "SELECT j.id, p, '\"done\"' FROM jobs j, generate_series(0, %s - 1) p "
                "WHERE j.status = 'done'", (steps_per_run,))
        await conn.execute("VACUUM ANALYZE jobs")
        await conn.execute("VACUUM ANALYZE journal")

    # -- worker ------------------------------------------------------------

    async def serve(self, mode: str, concurrency: int, lease: float,
                    on_ready: Callable[[], None]) -> None:
        if mode == MODE_RECOVER:
            raise NotImplementedError("the raw loop has no leases or replay")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        wake = asyncio.Event()
        conn = await psycopg.AsyncConnection.connect(self.dsn)
        listen = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await listen.execute("LISTEN raw_jobs")

        async def listener() -> None:
            async for _ in listen.notifies():
                wake.set()

        listen_task = asyncio.create_task(listener())
        on_ready()
        try:
            while not stop.is_set():
                wake.clear()
                if await self._one(conn, mode):
                    continue
                waiter = asyncio.create_task(wake.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, timeout=1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
        finally:
            listen_task.cancel()
            await conn.close()
            await listen.close()

    async def _one(self, conn: psycopg.AsyncConnection[Any], mode: str) -> bool:
        """Claim, run and finish one job; False when the queue is empty."""
        if mode == MODE_STEPS:
            # Claim in its own transaction, then one INSERT per step (each its
            # own transaction, as a journal must be), then finish.
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1 "
                    "FOR UPDATE SKIP LOCKED")
                row = await cur.fetchone()
                if row is None:
                    return False
                await conn.execute("UPDATE jobs SET status = 'running' WHERE id = %s", row)
            for position in range(3):
                await conn.execute(
                    "INSERT INTO journal (job_id, position, output) VALUES (%s, %s, %s)",
                    (row[0], position, json.dumps(f"s{position + 1}")))
                await conn.commit()
            await conn.execute(
                "UPDATE jobs SET status = 'done', finished_at = now() WHERE id = %s", row)
            await conn.commit()
            return True
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT id, payload FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1 "
                "FOR UPDATE SKIP LOCKED")
            got = await cur.fetchone()
            if got is None:
                return False
            report_latency(float(got[1].get("t0", 0.0)))
            await conn.execute(
                "UPDATE jobs SET status = 'done', finished_at = now() WHERE id = %s", (got[0],))
        return True
