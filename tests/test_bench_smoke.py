"""The benchmark harness must not rot: drive its scenarios tiny, on real Postgres.

No timing is asserted (the machine is shared); what is asserted is what the
harness relies on: every enqueued job ends as done in the database, worker
processes report one latency per timed job, and the S5 recovery scenario
really kills a worker inside step 2 without step 1 running again.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench import scenarios as sc
from bench.adapters import load
from bench.adapters.base import MODE_NOOP, MODE_STEPS
from bench.cli import Report, Result, fresh_database, tables


@pytest.fixture
def bench_dsn(pgjournal_dsn: str) -> Iterator[str]:
    """A database of its own on the session's server, as the harness gives each system."""
    name = f"bench_smoke_{uuid.uuid4().hex[:12]}"
    dsn = fresh_database(pgjournal_dsn, name)
    yield dsn
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tiny(tmp_path: Path) -> sc.Settings:
    return sc.Settings(jobs=40, wakeups=5, workflows=10, history=50, repeat=1, batch=20,
                       concurrency=4, recovery_lease=1.0, log_dir=tmp_path)


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query.encode()).fetchone()
        return int(row[0]) if row else -1


async def test_raw_adapter_drains_and_times_wakeups(bench_dsn: str, tmp_path: Path) -> None:
    s = tiny(tmp_path)
    adapter = load("raw")(bench_dsn)
    await adapter.setup()
    try:
        assert await sc.s1_enqueue_one(adapter, s) > 0
        assert count(bench_dsn, "SELECT count(*) FROM jobs") == s.jobs + 1
        await sc.drain(adapter, s, n=s.jobs, procs=2, mode=MODE_NOOP)
        assert count(bench_dsn, "SELECT count(*) FROM jobs WHERE status = 'done'") == s.jobs
        await sc.drain(adapter, s, n=s.workflows, procs=1, mode=MODE_STEPS)
        assert count(bench_dsn, "SELECT count(*) FROM journal") == 3 * s.workflows
        latencies = await sc.wakeup(adapter, s)
        assert len(latencies) == s.wakeups
        assert all(v > 0 for v in latencies)
        assert await adapter.unfinished() == 0
    finally:
        await adapter.close()


async def test_pgjournal_adapter_drain_history_and_recovery(bench_dsn: str,
                                                           tmp_path: Path) -> None:
    s = tiny(tmp_path)
    adapter = load("pgjournal")(bench_dsn)
    await adapter.setup()
    try:
        await adapter.fill_history(s.history, 3)
        assert count(bench_dsn, "SELECT count(*) FROM pgjournal.steps") == 3 * s.history
        await sc.drain(adapter, s, n=s.workflows, procs=1, mode=MODE_STEPS, reset=False)
        assert count(bench_dsn, "SELECT count(*) FROM pgjournal.runs "
                                "WHERE status = 'completed'") == s.history + s.workflows
        _seconds, step1, step2 = await sc.recovery(adapter, s)
        assert (step1, step2) == (1, 2)  # step 2 was cut by the kill and ran again
        assert count(bench_dsn, "SELECT count(*) FROM pgjournal.runs "
                                "WHERE workflow = 'recover' AND status = 'completed'") == 1
    finally:
        await adapter.close()


def test_tables_show_the_ratio_to_pgjournal() -> None:
    report = Report()
    report.results += [
        Result("S2", "drain", "pgjournal", "drain", "jobs/s", True, [300.0, 200.0, 400.0]),
        Result("S2", "drain", "raw", "drain", "jobs/s", True, [100.0, 150.0, 50.0]),
    ]
    text = tables(report)
    assert "| drain | raw | 100 jobs/s" in text
    assert "| 3.00x |" in text
    assert "200-400" in text


def test_claim_cost_bench_runs_both_kinds_of_claim(bench_dsn: str) -> None:
    """bench/claim_cost.py: every claim gets the run just enqueued, with and
    without the expired-lease scan, at each count of running runs."""
    from bench import claim_cost

    rows = claim_cost.main(["--dsn", bench_dsn, "--running", "0,30", "--claims", "6"])
    assert [r["running"] for r in rows] == [0, 30]
    assert all(r["with_p50_ms"] > 0 and r["without_p50_ms"] > 0 for r in rows)


async def test_wakeup_parts_splits_every_timed_run(bench_dsn: str) -> None:
    """bench/wakeup_parts.py: a worker process, runs timed from enqueue to body,
    each split into parts that add up to the whole."""
    from bench import wakeup_parts

    parts = await wakeup_parts._client(bench_dsn, jobs=5, interval=0.05, async_claim=False)
    assert set(parts) >= {"enqueue", "claim", "claim -> body", "total"}
    assert parts["total"]["p50"] >= parts["claim"]["p50"]
