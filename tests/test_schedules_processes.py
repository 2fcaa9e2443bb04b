"""Schedules with real worker processes: exactly one run per slot across workers,
and catch-up after all workers were down, per policy (docs/flow-control.md)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from .conftest import ROOT, WorkerProcess

Spawn = Callable[..., WorkerProcess]


@pytest.fixture
def spawn(pgjournal_dsn: str, pgjournal_schema: str, tmp_path: Path) -> Iterator[Spawn]:
    """Start ``tests.procs_schedules`` workers; all are killed at teardown."""
    procs: list[WorkerProcess] = []

    def start(**opts: Any) -> WorkerProcess:
        args = [sys.executable, "-m", "tests.procs_schedules", pgjournal_dsn, pgjournal_schema]
        for key, value in opts.items():
            args += [f"--{key}", str(value)]
        log = tmp_path / f"sched-worker-{len(procs)}.log"
        proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wp = WorkerProcess(proc, log)
        procs.append(wp)
        return wp

    yield start
    for wp in procs:
        if wp.proc.poll() is None:
            wp.kill()
            wp.proc.wait(10)


class Db:
    def __init__(self, dsn: str, schema: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.schema = schema

    def q(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return self.conn.execute(sql.replace("S.", f'"{self.schema}".'), params).fetchall()

    def one(self, sql: str, *params: Any) -> Any:
        rows = self.q(sql, *params)
        return next(iter(rows[0].values())) if rows else None

    def now(self) -> datetime:
        return self.one("SELECT now() AS now")  # type: ignore[no-any-return]

    def slot_runs(self) -> list[dict[str, Any]]:
        return self.q("SELECT (meta->>'slot')::timestamptz AS slot, idempotency_key, created_at "
                      "FROM S.runs WHERE meta ? 'schedule' ORDER BY 1")


@pytest.fixture
def db(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Db]:
    d = Db(pgjournal_dsn, pgjournal_schema)
    yield d
    d.conn.close()


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


def live_workers(db: Db) -> int:
    return int(db.one("SELECT count(*) FROM S.workers WHERE stopped_at IS NULL"))


def stop(*procs: WorkerProcess) -> None:
    for p in procs:
        p.kill(signal.SIGTERM)
    for p in procs:
        assert p.wait(30) == 0, p.output()


async def test_three_workers_fire_every_second_exactly_once(spawn: Spawn, db: Db) -> None:
    workers = [spawn(cron="* * * * * *", catchup="all") for _ in range(3)]
    await until(lambda: live_workers(db) == 3, 60, "three workers to register")
    start = db.now()
    await asyncio.sleep(10)
    end = db.now()
    assert all(w.proc.poll() is None for w in workers), [w.output() for w in workers]
    # Every slot up to `end` has been considered by some round.
    await until(lambda: db.one("SELECT fire_after FROM S.schedules WHERE name = 'tick'") >= end,
                30, "the schedule's cursor to pass the window")
    runs = db.slot_runs()
    by_slot = Counter(r["slot"] for r in runs)
    assert max(by_slot.values()) == 1, [s for s, n in by_slot.items() if n > 1]
    for r in runs:
        assert r["idempotency_key"] == f"schedule:tick:{r['slot'].isoformat()}"
        assert r["slot"].microsecond == 0
    lo, hi = math.floor(start.timestamp()) + 1, math.floor(end.timestamp())
    expected = {datetime.fromtimestamp(t, start.tzinfo) for t in range(lo, hi + 1)}
    window = {s for s in by_slot if lo <= s.timestamp() <= hi}
    assert window == expected, (sorted(expected - window), sorted(window - expected))
    assert len(expected) >= 9
    # The runs were fired by the workers' schedulers, not long after their slot.
    late = [(r["created_at"] - r["slot"]).total_seconds() for r in runs
            if lo <= r["slot"].timestamp() <= hi]
    assert sorted(late)[len(late) // 2] < 1.0, late
    stop(*workers)


@pytest.mark.parametrize("policy", ["skip", "latest", "all"])
async def test_catch_up_after_all_workers_were_down(spawn: Spawn, db: Db, policy: str) -> None:
    window = 3.0 if policy == "all" else 86400.0
    first = [spawn(cron="* * * * * *", catchup=policy, window=window) for _ in range(2)]
    await until(lambda: len(db.slot_runs()) >= 2, 60, "the schedule to fire")
    stop(*first)
    assert live_workers(db) == 0
    cursor = db.one("SELECT fire_after FROM S.schedules WHERE name = 'tick'")
    fired_before = {r["slot"] for r in db.slot_runs()}
    assert max(fired_before) <= cursor
    # Down for at least six slots.
    await until(lambda: (db.now() - cursor).total_seconds() >= 6.5, 30, "six slots to pass")
    restart = db.now()
    back = spawn(cron="* * * * * *", catchup=policy, window=window)
    await until(lambda: live_workers(db) == 1, 60, "the worker to come back")
    # Slots keep firing once it is back.
    await until(lambda: any(r["created_at"] > restart and r["slot"] > restart
                            for r in db.slot_runs()), 30, "a slot after the restart to fire")
    runs = [r for r in db.slot_runs() if r["slot"] > cursor]
    assert all(r["created_at"] > restart for r in runs)
    # The first round after the restart: all its runs share its transaction's now().
    first_round = min(r["created_at"] for r in runs)
    now = first_round.timestamp()
    due = list(range(math.floor(cursor.timestamp()) + 1, math.floor(now) + 1))
    on_time = [t for t in due if now - t <= 0.5]  # per second: half the time to the next
    missed = [t for t in due if t not in on_time]
    assert len([t for t in missed if t <= restart.timestamp()]) >= 6
    fired = sorted(int(r["slot"].timestamp()) for r in runs if r["created_at"] == first_round)
    if policy == "skip":
        expected = on_time
    elif policy == "latest":
        expected = sorted({*on_time, max(missed)})
    else:
        expected = sorted({*on_time, *(t for t in missed if now - t <= window)})
        assert len(missed) - (len(expected) - len(on_time)) >= 3  # older ones were dropped
    assert fired == expected, (policy, fired, expected, now)
    # Nothing else of the outage fired later either.
    outage = {int(r["slot"].timestamp()) for r in runs if r["slot"].timestamp() <= now}
    assert outage == set(expected)
    stop(back)
