"""pgjournal, through its public API (``App.start``, ``Worker``, ``Run.step``).

S1 one-at-a-time is ``App.start`` per job; its batch row (and the S2 release
of 10,000 jobs in one transaction) is ``App.start_many``: one call of the SQL
function ``start_runs`` per batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg

import pgjournal

from .base import (
    BATCH,
    EFFECTS_DDL,
    ENQUEUE,
    MODE_NOOP,
    MODE_RECOVER,
    MODE_STEPS,
    QUEUE,
    RECOVERY,
    SCALE,
    WORKFLOW,
    Adapter,
    count_effects,
    record_effect,
    report_latency,
)

SCHEMA = "pgjournal"
HISTORY_DAYS = 70  # S6 history: runs created over the last 10 weeks
QUEUE_NAME = "bench"
WORKFLOW_OF_MODE = {MODE_NOOP: "noop", MODE_STEPS: "three_steps", MODE_RECOVER: "recover"}


def _step_value(name: str) -> str:
    return name


def build_app(dsn: str, poll_interval: float = 1.0) -> pgjournal.App:
    """The app with the benchmark's workflows (shared by client and worker)."""
    app = pgjournal.App(dsn, schema=SCHEMA, poll_interval=poll_interval)

    @app.workflow(queue=QUEUE_NAME)
    async def noop(run: pgjournal.Run, t0: float = 0.0) -> None:
        report_latency(t0)

    @app.workflow(queue=QUEUE_NAME)
    async def three_steps(run: pgjournal.Run, t0: float = 0.0) -> str:
        a = await run.step("s1", _step_value, "s1")
        b = await run.step("s2", _step_value, "s2")
        c = await run.step("s3", _step_value, "s3")
        return a + b + c

    @app.workflow(queue=QUEUE_NAME)
    async def recover(run: pgjournal.Run, t0: float = 0.0) -> str:
        rid = str(run.id)
        out = []
        for name in ("s1", "s2", "s3"):
            out.append(await run.step(name, asyncio.to_thread, record_effect, dsn, rid, name))
        return ",".join(out)

    return app


class PgjournalAdapter(Adapter):
    name = "pgjournal"
    features = frozenset({ENQUEUE, BATCH, QUEUE, WORKFLOW, RECOVERY, SCALE})
    config_note = "Worker(concurrency=10, lease=30s default; S5 lease 2s), poll 1s + NOTIFY"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.app = build_app(dsn)
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @staticmethod
    def version() -> str:
        return pgjournal.__version__

    async def _c(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self._conn

    async def setup(self) -> None:
        await asyncio.to_thread(pgjournal.migrate, self.dsn, schema=SCHEMA)
        await (await self._c()).execute(EFFECTS_DDL)

    async def reset(self) -> None:
        await (await self._c()).execute(
            f'TRUNCATE "{SCHEMA}".runs, "{SCHEMA}".steps, "{SCHEMA}".stream_chunks, '
            f'"{SCHEMA}".signals, "{SCHEMA}".run_events, "{SCHEMA}".workers, '
            "public.bench_effects")

    async def close(self) -> None:
        await self.app.close()
        if self._conn is not None:
            await self._conn.close()

    async def enqueue_one(self, t0: float = 0.0, mode: str = MODE_NOOP) -> None:
        await self.app.start(WORKFLOW_OF_MODE[mode], t0)

    async def enqueue_batch(self, n: int, mode: str = MODE_NOOP) -> None:
        await self.app.start_many(WORKFLOW_OF_MODE[mode], [0.0] * n)

    async def enqueue_recover(self) -> None:
        await self.app.start("recover")

    async def unfinished(self) -> int:
        cur = await (await self._c()).execute(
            f"SELECT count(*) FROM \"{SCHEMA}\".runs WHERE status NOT IN "
            "('completed', 'failed', 'cancelled', 'dead')")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def any_unfinished(self) -> bool:
        # Unfinished runs are queued (with a due_at: the claim index) or
        # running (the runs_running index): no read of the finished ones.
        cur = await (await self._c()).execute(
            f'SELECT EXISTS (SELECT 1 FROM "{SCHEMA}".runs WHERE queue = %s '
            "AND due_at IS NOT NULL) OR EXISTS (SELECT 1 FROM "
            f'"{SCHEMA}".runs WHERE queue = %s AND status = \'running\')',
            (QUEUE_NAME, QUEUE_NAME))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def failed(self) -> int:
        cur = await (await self._c()).execute(
            f"SELECT count(*) FROM \"{SCHEMA}\".runs WHERE status IN ('failed', 'dead')")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def effects(self) -> dict[str, int]:
        return await count_effects(self.dsn)

    async def fill_history(self, runs: int, steps_per_run: int) -> None:
        """Finished runs with their journals and events, as the runtime leaves them.

        The runs are created over the last ``HISTORY_DAYS`` days (oldest first),
        so their history spreads over the time partitions of migration 0013;
        ``maintain`` creates those partitions before the load.
        """
        conn = await self._c()
        s = f'"{SCHEMA}"'
        await conn.execute(f"SELECT count(*) FROM {s}.maintain(p_since => now() - "
                           "make_interval(days => %s))", (HISTORY_DAYS,))
        chunk = 100_000
        for start in range(0, runs, chunk):
            n = min(chunk, runs - start)
            async with conn.transaction():
                # Triggers off for the bulk load (the event log rows are written
                # below, as the trigger would have): 3x faster to fill.
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(
                    "CREATE TEMP TABLE fill ON COMMIT DROP AS "
                    "SELECT gen_random_uuid() AS id, now() - make_interval(secs => "
                    "(1.0 - (%s + g)::float8 / %s) * %s * 86400) AS at "
                    "FROM generate_series(1, %s) g", (start, runs, HISTORY_DAYS, n))
                await conn.execute(
                    f"INSERT INTO {s}.runs (id, workflow, queue, status, input, output, "
                    f"lease_epoch, created_at, updated_at, started_at, finished_at) "
                    f"SELECT id, 'three_steps', %s, 'completed', "
                    "'{\"args\": [0.0], \"kwargs\": {}}', '\"s1s2s3\"', 1, at, at, at, at "
                    "FROM fill", (QUEUE_NAME,))
                await conn.execute(
                    f"INSERT INTO {s}.steps (run_created_at, run_id, position, name, "
                    f"occurrence, kind, status, output, lease_epoch) "
                    f"SELECT f.at, f.id, p, 's' || (p + 1), 0, 'step', 'completed', "
                    f"to_jsonb('s' || (p + 1)), 1 FROM fill f, generate_series(0, %s - 1) p",
                    (steps_per_run,))
                await conn.execute(
                    f"INSERT INTO {s}.run_events (run_created_at, run_id, from_status, "
                    f"to_status, attempt, lease_epoch) "
                    f"SELECT at, id, NULL, 'queued', 1, 0 FROM fill "
                    f"UNION ALL SELECT at, id, 'queued', 'running', 1, 1 FROM fill "
                    f"UNION ALL SELECT at, id, 'running', 'completed', 1, 1 FROM fill")
            if start and start % 1_000_000 == 0:
                print(f"    filled {start:,} runs", flush=True)
        for table in ("runs", "steps", "run_events"):
            await conn.execute(f"VACUUM ANALYZE {s}.{table}")

    # -- worker ------------------------------------------------------------

    async def serve(self, mode: str, concurrency: int, lease: float,
                    on_ready: Callable[[], None]) -> None:
        app = build_app(self.dsn)
        worker = pgjournal.Worker(app, queues=[QUEUE_NAME], concurrency=concurrency,
                                  lease=lease, grace_period=2.0)
        async with app:
            task = asyncio.create_task(worker.run())
            # Ready once the worker registered itself (its LISTEN follows at once;
            # the harness warms every worker up before timing wake-ups anyway).
            deadline = time.monotonic() + 30
            conn = await self._c()
            while time.monotonic() < deadline and not task.done():
                cur = await conn.execute(
                    f'SELECT 1 FROM "{SCHEMA}".workers WHERE id = %s', (worker.id,))
                if await cur.fetchone():
                    break
                await asyncio.sleep(0.02)
            on_ready()
            await task
