"""PgQueuer, driven through its ``Queries`` and ``QueueManager`` API on psycopg.

A job is a row in ``pgqueuer``; completion deletes it and logs it in
``pgqueuer_log`` (buffered), so "unfinished" is the queue table's row count.
Batch enqueue is PgQueuer's list form of ``Queries.enqueue`` (one statement).
"""

from __future__ import annotations

import asyncio
import signal
import struct
from collections.abc import Callable
from importlib.metadata import version as pkg_version
from typing import Any

import psycopg
from pgqueuer import PsycopgDriver, Queries, QueueManager
from pgqueuer.models import Job

from .base import BATCH, ENQUEUE, MODE_NOOP, QUEUE, Adapter, report_latency, scalar


def _t0(payload: bytes | None) -> float:
    return float(struct.unpack("<d", payload)[0]) if payload else 0.0


class PgqueuerAdapter(Adapter):
    name = "pgqueuer"
    features = frozenset({ENQUEUE, BATCH, QUEUE})
    config_note = ("QueueManager.run(batch_size=10), PsycopgDriver (one connection per "
                   "process), NOTIFY wake-ups")

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._q: Queries | None = None

    @staticmethod
    def version() -> str:
        return pkg_version("pgqueuer")

    async def _queries(self) -> Queries:
        if self._q is None:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            self._q = Queries(PsycopgDriver(self._conn))
        return self._q

    async def setup(self) -> None:
        await (await self._queries()).install()

    async def reset(self) -> None:
        q = await self._queries()
        await q.clear_queue()
        await q.clear_queue_log()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def enqueue_one(self, t0: float = 0.0, mode: str = MODE_NOOP) -> None:
        await (await self._queries()).enqueue("noop", struct.pack("<d", t0))

    async def enqueue_batch(self, n: int, mode: str = MODE_NOOP) -> None:
        payload = struct.pack("<d", 0.0)
        await (await self._queries()).enqueue(["noop"] * n, [payload] * n, [0] * n)

    async def unfinished(self) -> int:
        return await scalar(self.dsn, "SELECT count(*) FROM pgqueuer")

    async def any_unfinished(self) -> bool:
        return bool(await scalar(self.dsn, "SELECT EXISTS (SELECT 1 FROM pgqueuer)::int"))

    async def failed(self) -> int:
        return await scalar(self.dsn,
                            "SELECT count(*) FROM pgqueuer_log WHERE status = 'exception'")

    async def serve(self, mode: str, concurrency: int, lease: float,
                    on_ready: Callable[[], None]) -> None:
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        qm = QueueManager(Queries(PsycopgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            report_latency(_t0(job.payload))

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)
        on_ready()
        await qm.run(batch_size=concurrency)
        await conn.close()
