"""DBOS Transact, through ``DBOS`` (workers) and ``DBOSClient`` (enqueue).

Workflows are synchronous functions with ``@DBOS.step()`` steps, run from a
queue registered with DBOS' defaults (no worker concurrency limit, 1 s queue
polling interval): DBOS workers find queued work by polling, not NOTIFY.
Batch enqueue is ``DBOSClient.enqueue_in_transaction`` for every job inside
one SQLAlchemy transaction.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from importlib.metadata import version as pkg_version
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSClient, EnqueueOptions

from .base import (
    BATCH,
    EFFECTS_DDL,
    ENQUEUE,
    MODE_NOOP,
    MODE_RECOVER,
    MODE_STEPS,
    QUEUE,
    RECOVERY,
    WORKFLOW,
    Adapter,
    as_url,
    count_effects,
    execute,
    record_effect,
    report_latency,
    scalar,
)

APP = "bench"
QUEUE_NAME = "bench"
WORKFLOW_OF_MODE = {MODE_NOOP: "noop", MODE_STEPS: "three_steps", MODE_RECOVER: "recover"}
UNFINISHED = "('ENQUEUED', 'PENDING', 'DELAYED')"


class DbosAdapter(Adapter):
    name = "dbos"
    features = frozenset({ENQUEUE, BATCH, QUEUE, WORKFLOW, RECOVERY})
    config_note = ("queue without worker_concurrency (default; a limit of 10 gives ~10 "
                   "runs/s), polling_interval_sec=1 (default), sync workflows and steps")

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.url = as_url(dsn)
        self._client: DBOSClient | None = None
        self._engine: sa.Engine | None = None

    @staticmethod
    def version() -> str:
        return pkg_version("dbos")

    def _c(self) -> DBOSClient:
        if self._client is None:
            self._client = DBOSClient(system_database_url=self.url, application_name=APP)
        return self._client

    async def setup(self) -> None:
        # DBOS creates its system tables when the first process launches; a
        # short-lived launch here keeps that out of every measurement.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c",
            f"from bench.adapters.dbos_ import launch_once; launch_once({self.url!r})",
            env={**os.environ})
        if await proc.wait() != 0:
            raise RuntimeError("DBOS launch failed")
        await execute(self.dsn, EFFECTS_DDL)
        await asyncio.to_thread(self._c)

    async def reset(self) -> None:
        await execute(self.dsn, "TRUNCATE dbos.workflow_status CASCADE; "
                                "TRUNCATE public.bench_effects")

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.destroy)
        if self._engine is not None:
            self._engine.dispose()

    def _options(self, mode: str) -> EnqueueOptions:
        return {"workflow_name": WORKFLOW_OF_MODE[mode], "queue_name": QUEUE_NAME}

    async def enqueue_one(self, t0: float = 0.0, mode: str = MODE_NOOP) -> None:
        await self._c().enqueue_async(self._options(mode), t0)

    async def enqueue_batch(self, n: int, mode: str = MODE_NOOP) -> None:
        client = self._c()
        if self._engine is None:
            self._engine = sa.create_engine(self.url.replace("postgresql://",
                                                             "postgresql+psycopg://"))
        engine = self._engine
        options = self._options(mode)

        def batch() -> None:
            with engine.begin() as conn:
                for _ in range(n):
                    client.enqueue_in_transaction(conn, options, 0.0)

        await asyncio.to_thread(batch)

    async def enqueue_recover(self) -> None:
        await self.enqueue_one(0.0, MODE_RECOVER)

    async def unfinished(self) -> int:
        return await scalar(self.dsn, "SELECT count(*) FROM dbos.workflow_status "
                                      f"WHERE status IN {UNFINISHED}")

    async def any_unfinished(self) -> bool:
        return bool(await scalar(self.dsn, "SELECT EXISTS (SELECT 1 FROM dbos.workflow_status "
                                           f"WHERE status IN {UNFINISHED})::int"))

    async def failed(self) -> int:
        return await scalar(self.dsn, "SELECT count(*) FROM dbos.workflow_status "
                                      "WHERE status NOT IN ('SUCCESS', 'ENQUEUED', 'PENDING', "
                                      "'DELAYED')")

    async def effects(self) -> dict[str, int]:
        return await count_effects(self.dsn)

    async def serve(self, mode: str, concurrency: int, lease: float,
                    on_ready: Callable[[], None]) -> None:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        await asyncio.to_thread(_serve_sync, self.url, self.dsn, concurrency, on_ready, stop)


def _register(url: str, dsn: str, concurrency: int) -> None:
    DBOS(config={"name": APP, "system_database_url": url, "log_level": "WARNING"})

    @DBOS.step()
    def step_value(name: str) -> str:
        return name

    @DBOS.step()
    def effect(run: str, name: str) -> str:
        return record_effect(dsn, run, name)

    @DBOS.workflow(name="noop")
    def noop(t0: float = 0.0) -> None:
        report_latency(t0)

    @DBOS.workflow(name="three_steps")
    def three_steps(t0: float = 0.0) -> str:
        return step_value("s1") + step_value("s2") + step_value("s3")

    @DBOS.workflow(name="recover")
    def recover(t0: float = 0.0) -> str:
        wid = str(DBOS.workflow_id)
        return ",".join(effect(wid, n) for n in ("s1", "s2", "s3"))

    _keep: list[Any] = [noop, three_steps, recover]
    del _keep


def _serve_sync(url: str, dsn: str, concurrency: int, on_ready: Callable[[], None],
                stop: threading.Event) -> None:
    _register(url, dsn, concurrency)
    DBOS.launch()
    # No worker_concurrency (DBOS' default): with a limit of 10, each 1 s poll
    # takes at most 10 workflows and a drain crawls at ~10/s.
    DBOS.register_queue(QUEUE_NAME)
    on_ready()
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=2)


def launch_once(url: str) -> None:
    """Create DBOS' system tables (run in a throwaway process by ``setup``)."""
    _register(url, url, 10)
    DBOS.launch()
    DBOS.register_queue(QUEUE_NAME)
    DBOS.destroy()
