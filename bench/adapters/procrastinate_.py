"""Procrastinate, through its ``App``/task API on its psycopg connector.

Jobs stay in ``procrastinate_jobs`` with status ``succeeded`` (the default
``delete_jobs=never``). Workers run with the same concurrency as every other
system (Procrastinate's own default is 1).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version as pkg_version

import procrastinate

from .base import BATCH, ENQUEUE, MODE_NOOP, QUEUE, Adapter, execute, report_latency, scalar


def build_app(dsn: str) -> tuple[procrastinate.App, procrastinate.tasks.Task[..., None, ...]]:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue="bench")
    async def noop(t0: float = 0.0) -> None:
        report_latency(t0)

    return app, noop


class ProcrastinateAdapter(Adapter):
    name = "procrastinate"
    features = frozenset({ENQUEUE, BATCH, QUEUE})
    config_note = "run_worker_async(concurrency=10, listen_notify=True)"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.app, self.task = build_app(dsn)
        self._open = False

    @staticmethod
    def version() -> str:
        return pkg_version("procrastinate")

    async def _app(self) -> procrastinate.App:
        if not self._open:
            await self.app.open_async()
            self._open = True
        return self.app

    async def setup(self) -> None:
        await (await self._app()).schema_manager.apply_schema_async()

    async def reset(self) -> None:
        await execute(self.dsn, "TRUNCATE procrastinate_jobs CASCADE")

    async def close(self) -> None:
        if self._open:
            await self.app.close_async()

    async def enqueue_one(self, t0: float = 0.0, mode: str = MODE_NOOP) -> None:
        await self._app()
        await self.task.defer_async(t0=t0)

    async def enqueue_batch(self, n: int, mode: str = MODE_NOOP) -> None:
        await self._app()
        await self.task.batch_defer_async(*({"t0": 0.0} for _ in range(n)))

    async def unfinished(self) -> int:
        return await scalar(self.dsn, "SELECT count(*) FROM procrastinate_jobs "
                                      "WHERE status IN ('todo', 'doing')")

    async def any_unfinished(self) -> bool:
        # The predicate of Procrastinate's own partial index on open jobs.
        return bool(await scalar(self.dsn, "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs "
                                           "WHERE status = ANY (ARRAY['todo', 'doing']::"
                                           "procrastinate_job_status[]))::int"))

    async def failed(self) -> int:
        return await scalar(self.dsn, "SELECT count(*) FROM procrastinate_jobs "
                                      "WHERE status = 'failed'")

    async def serve(self, mode: str, concurrency: int, lease: float,
                    on_ready: Callable[[], None]) -> None:
        app, _ = build_app(self.dsn)
        async with app.open_async():
            on_ready()
            await app.run_worker_async(queues=["bench"], concurrency=concurrency,
                                       install_signal_handlers=True)
