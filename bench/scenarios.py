"""The scenarios S1-S6, written once against the adapter interface.

Each function measures one system once and returns raw numbers; the CLI
repeats them, keeps every value and reports median and min-max.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters.base import MODE_NOOP, MODE_RECOVER, MODE_STEPS, Adapter
from .procs import WorkerPool


@dataclass
class Settings:
    """Sizes of one benchmark run (full or ``--quick``)."""

    jobs: int = 10_000  # S1, S2
    wakeups: int = 200  # S3
    wakeup_interval: float = 0.020  # S3
    workflows: int = 1_000  # S4
    history: int = 1_000_000  # S6
    repeat: int = 3
    concurrency: int = 10
    batch: int = 1_000  # S1 batch size
    #: S1 stops a repetition after this many seconds even if fewer than
    #: ``jobs`` were enqueued, and S2 shrinks the drain of a system so slow that
    #: 10,000 jobs would take much longer (the rate is what is compared).
    time_cap: float = 6.0
    drain_cap: float = 15.0
    recovery_lease: float = 2.0  # S5
    log_dir: Path = field(default_factory=lambda: Path("/tmp"))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank on the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float,
                     interval: float = 0.02, what: str = "condition") -> None:
    """Poll ``check`` (a database read) until it holds; the harness' only clock."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


# -- S1 ---------------------------------------------------------------------


async def s1_enqueue_one(adapter: Adapter, s: Settings) -> float:
    """Jobs/s enqueued one call at a time from one client (one connection)."""
    await adapter.reset()
    await adapter.enqueue_one()  # warm the client's connection and statements
    t = time.perf_counter()
    deadline = t + s.time_cap
    done = 0
    while done < s.jobs:
        await adapter.enqueue_one()
        done += 1
        if done % 100 == 0 and time.perf_counter() > deadline:
            break
    return done / (time.perf_counter() - t)


async def s1_enqueue_batch(adapter: Adapter, s: Settings) -> float:
    """Jobs/s enqueued in batches of ``s.batch`` (one call and transaction each)."""
    await adapter.reset()
    await adapter.enqueue_batch(1)
    t = time.perf_counter()
    deadline = t + s.time_cap
    done = 0
    while done + s.batch <= s.jobs:
        await adapter.enqueue_batch(s.batch)
        done += s.batch
        if time.perf_counter() > deadline:
            break
    return done / (time.perf_counter() - t)


# -- S2, S4, S6 drains --------------------------------------------------------


async def drain(adapter: Adapter, s: Settings, *, n: int, procs: int, mode: str,
                reset: bool = True) -> float:
    """Jobs/s: ``procs`` warm worker processes drain ``n`` jobs released at once.

    The workers are started and ready before the jobs exist; the jobs are
    enqueued in one transaction, so all become visible at its commit, when
    the clock starts. The clock stops when the database shows none unfinished.
    """
    if reset:
        await adapter.reset()
    before = await adapter.unfinished()
    if before:
        raise RuntimeError(f"{adapter.name}: {before} unfinished jobs before a drain")
    failed_before = await adapter.failed()
    async with WorkerPool(adapter.name, adapter.dsn, mode, count=procs,
                          concurrency=s.concurrency, log_dir=s.log_dir) as pool:
        await pool.wait_ready()
        await adapter.enqueue_batch(n, mode)
        t = time.perf_counter()

        async def done() -> bool:
            return not await adapter.any_unfinished()

        await wait_until(done, timeout=max(120.0, n / 20), what=f"{adapter.name} drain")
        elapsed = time.perf_counter() - t
    failed = await adapter.failed() - failed_before
    if failed:
        raise RuntimeError(f"{adapter.name}: {failed} jobs failed during the drain")
    return n / elapsed


# -- S3 ---------------------------------------------------------------------


async def wakeup(adapter: Adapter, s: Settings, *, reset: bool = True) -> list[float]:
    """Latencies (ms) from just before an enqueue call to the job body starting.

    One idle worker process; one job every ``s.wakeup_interval`` seconds. Three
    untimed warm-up jobs first, so connections and LISTEN are in place.
    """
    if reset:
        await adapter.reset()
    async with WorkerPool(adapter.name, adapter.dsn, MODE_NOOP, count=1,
                          concurrency=s.concurrency, log_dir=s.log_dir) as pool:
        await pool.wait_ready()
        for _ in range(3):
            await adapter.enqueue_one(time.time())
            await pool.wait_latencies(len(pool.latencies) + 1, timeout=30)
        pool.latencies.clear()
        start = time.perf_counter()
        for i in range(s.wakeups):
            await adapter.enqueue_one(time.time())
            pause = start + (i + 1) * s.wakeup_interval - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
        got = await pool.wait_latencies(s.wakeups, timeout=30)
    if len(got) < s.wakeups:
        raise RuntimeError(f"{adapter.name}: only {len(got)} of {s.wakeups} jobs started")
    return got


# -- S4 ---------------------------------------------------------------------


async def statements_per_run(adapter: Adapter, admin_dsn: str, runs: int,
                             body: Callable[[], Awaitable[Any]]) -> tuple[Any, float | None]:
    """Run ``body`` and count the statements the system sent per run.

    Counted with ``pg_stat_statements`` in the system's database, without the
    harness' own polling (count queries) and the LISTEN/NOTIFY plumbing. Every
    statement a worker sends outside a pipeline is one round trip.
    """
    import psycopg

    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
    except psycopg.Error:
        return await body(), None
    result = await body()
    dbname = psycopg.conninfo.conninfo_to_dict(adapter.dsn)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s "
            "AND s.query NOT ILIKE '%%count(%%' AND s.query NOT ILIKE 'LISTEN%%' "
            "AND s.query NOT ILIKE '%%pg_stat_statements%%' "
            "AND s.query NOT ILIKE 'SELECT 1 FROM%%workers%%'",
            (dbname,)).fetchone()
    return result, (float(row[0]) / runs if row else None)


async def s4_workflows(adapter: Adapter, s: Settings, admin_dsn: str) -> tuple[float, float | None]:
    """Runs/s of 3-step journaled workflows (1 worker process) and statements per run."""
    async def body() -> float:
        return await drain(adapter, s, n=s.workflows, procs=1, mode=MODE_STEPS)

    rate, per_run = await statements_per_run(adapter, admin_dsn, s.workflows, body)
    return float(rate), per_run


# -- S5 ---------------------------------------------------------------------


async def recovery(adapter: Adapter, s: Settings) -> tuple[float, int, int]:
    """Seconds from SIGKILL (worker inside step 2) to the run completing under a
    new worker, and how many times steps 1 and 2 ran in total."""
    await adapter.reset()
    async with WorkerPool(adapter.name, adapter.dsn, MODE_RECOVER, count=0,
                          concurrency=1, lease=s.recovery_lease, log_dir=s.log_dir) as pool:
        await pool.start_one(env={"BENCH_BLOCK": "1"})
        await pool.wait_ready()
        await adapter.enqueue_recover()

        async def in_step2() -> bool:
            return (await adapter.effects()).get("s2", 0) >= 1

        await wait_until(in_step2, timeout=60, what="step 2 to start")
        pool.kill(0)
        killed = time.perf_counter()
        await pool.procs[0].wait()
        await pool.start_one()

        async def done() -> bool:
            return await adapter.unfinished() == 0

        await wait_until(done, timeout=120, what=f"{adapter.name} recovery")
        elapsed = time.perf_counter() - killed
    effects = await adapter.effects()
    return elapsed, effects.get("s1", 0), effects.get("s2", 0)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
