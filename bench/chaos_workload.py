"""The chaos run's workload: the workflows the worker processes run, and what
the harness does as a user while faults are injected (see bench/chaos.py).

Workflows (queue ``chaos``), each step's side effect a committed row of
``effects`` (run, step, occurrence, pid, lease epoch, start time):

- ``chaos``: steps, parallel branches, a durable sleep, a signal wait, steps;
- ``tree``: ``spawn_many`` of ``leaf`` children and ``wait_all`` (suspends until
  the last ends); two more children, a durable sleep during which they end
  (``prune`` with its short ``--older-than`` may come by), then ``wait_all``
  of those; three racers and ``wait_first`` (``cancel_rest`` for some trees);
  the harness cancels every third tree midway (cascade), and forks every
  third from step 3 during its sleep (the fork shares the two children);
- ``keyed``: three steps, the middle one held; concurrency key ``solo`` (limit
  1) or ``tenant-1``/``tenant-2`` (``tenant-*``: 2); the harness forks ``solo``
  runs from step 1 while they run;
- ``rated``: two steps taking 1-3 units each from bucket ``api``;
- ``deadliner``: spawns a ``slowkid`` with ``timeout=`` half the child's
  durable sleep, so the child fails by its deadline and the parent
  (``max_attempts=1``) with ``ChildFailed``; once the sleep's wake time has
  passed the harness retries the child, and once it ended, the parent
  (docs/fan-out.md's repair): with a fresh deadline both complete;
- ``ticked``: the per-second schedule ``tick`` (``catchup='all'``), with two
  backfills queued from SQL (the first one a round's whole budget) and one
  started through the App;
- ``noop``: started by pairs of concurrent ``start_many`` calls with the same
  idempotency keys in opposite orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

import pgjournal
from pgjournal.errors import DatabaseUnavailable, InvalidState

QUEUE = "chaos"
SOLO, TENANTS = "solo", ("tenant-1", "tenant-2")
KEY_LIMITS = {SOLO: 1, "tenant-1": 2, "tenant-2": 2}
BUCKET, CAPACITY, REFILL = "api", 6.0, 4.0
SCHEDULE = "tick"

log = logging.getLogger("bench.chaos")

# -- the worker side -------------------------------------------------------------------

_local = threading.local()
_target: tuple[str, str] = ("", "")


def effect(run_id: str, step: str, occurrence: int, epoch: int, pause: float) -> str:
    """A step's side effect: one committed row per execution, written first.

    ``started`` is the wall clock when the step function was entered (the server
    runs on this host: the same clock as its commit timestamps); ``at``, set by
    the server, is when the side effect happened (after connecting, maybe later).
    """
    started = datetime.now(UTC)
    dsn, schema = _target
    deadline = time.monotonic() + 120
    while True:  # the server may be down for a moment (server kills)
        try:
            conn = getattr(_local, "conn", None)
            if conn is None or conn.closed:
                conn = _local.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
            conn.execute(
                f'INSERT INTO "{schema}".effects (run_id, step, occurrence, pid, epoch, '
                "started) VALUES (%s, %s, %s, %s, %s, %s)",
                (run_id, step, occurrence, os.getpid(), epoch, started))
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            _local.conn = None
            time.sleep(0.2)
    time.sleep(pause)
    return f"{step}#{occurrence}"


def _epoch(run: pgjournal.Run) -> int:
    token = getattr(run, "fencing_token", None)
    return int(token if token is not None else run._claim.epoch)


def build_app(dsn: str, schema: str) -> pgjournal.App:
    global _target
    _target = (dsn, schema)
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)

    def durable() -> Callable[[Any], Any]:
        """Retried with a short back-off; never parked dead by the many kills."""
        return app.workflow(queue=QUEUE, max_attempts=3, retry_backoff=0.1,
                            max_recoveries=1000)

    async def step(run: pgjournal.Run, name: str, occurrence: int, pause: float,
                   rate: tuple[str, float] | None = None) -> str:
        def call() -> str:
            # The epoch is read when the step function runs: the one it executes
            # under. Not an argument: arguments are fingerprinted for replay.
            return effect(str(run.id), name, occurrence, _epoch(run), pause)

        if rate is None:
            return str(await run.step(name, call))
        return str(await run.step(name, call, rate=rate))

    @durable()
    async def chaos(run: pgjournal.Run, ticks: int, nap: float, parallel: bool,
                    pause: float) -> list[str]:
        out = [await step(run, "tick", i, pause) for i in range(ticks)]
        if parallel:
            async def branch(b: str) -> list[str]:
                return [await step(run, f"{b}1", 0, pause), await step(run, f"{b}2", 0, pause)]
            pa, pb = await asyncio.gather(branch("pa"), branch("pb"))
            out += pa + pb
        await run.sleep("nap", nap)
        got = await run.wait_signal("go")
        out.append(f"go={got}")
        out += [await step(run, "tock", i, pause) for i in range(ticks)]
        return out

    @durable()
    async def leaf(run: pgjournal.Run, i: int, pause: float) -> int:
        await step(run, "work", 0, pause)
        return i

    @durable()
    async def tree(run: pgjournal.Run, width: int, idle: float, cancel_rest: bool,
                   pause: float) -> int:
        kids = await run.spawn_many("leaf", [(i, pause) for i in range(width)])
        got = await run.wait_all(kids)
        more = await run.spawn_many("leaf", [(50, 0.0), (51, 0.0)])
        await run.sleep("idle", idle)     # they end meanwhile; prune may come by
        got += await run.wait_all(more)
        racers = await run.spawn_many("leaf", [(100 + i, pause * (1 + 2 * i))
                                               for i in range(3)])
        first = await run.wait_first(racers, cancel_rest=cancel_rest)
        won: int = await first.result()
        await step(run, "sum", 0, 0.0)
        return int(sum(got)) + won

    @durable()
    async def keyed(run: pgjournal.Run, tenant: str, hold: float) -> str:
        await step(run, "a", 0, 0.0)
        await step(run, "hold", 0, hold)
        await step(run, "b", 0, 0.0)
        return tenant

    @durable()
    async def rated(run: pgjournal.Run, units: list[int]) -> int:
        for n, u in enumerate(units):
            await step(run, "call", n, 0.0, rate=(BUCKET, u))
        return sum(units)

    @app.workflow(queue=QUEUE, max_attempts=1, max_recoveries=1000)
    async def deadliner(run: pgjournal.Run, limit: float) -> str:
        kid = await run.spawn("slowkid", limit * 2, timeout=limit)
        return str(await kid.result())

    @app.workflow(queue=QUEUE, max_attempts=1, max_recoveries=1000)
    async def slowkid(run: pgjournal.Run, nap: float) -> str:
        # The first attempt outsleeps its deadline; the sleep's wake time is
        # journaled, so a retry (with a fresh deadline) finds it passed.
        await run.sleep("nap", nap)
        await step(run, "done", 0, 0.0)
        return "late but done"

    @durable()
    async def ticked(run: pgjournal.Run) -> str:
        return "tick"

    @durable()
    async def noop(run: pgjournal.Run, i: int) -> int:
        return i

    return app


def worker_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.chaos worker")
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(args.dsn, args.schema)
    worker = pgjournal.Worker(app, queues=[QUEUE], concurrency=args.concurrency,
                              lease=args.lease, grace_period=2.0)

    async def serve() -> None:
        async with app:
            await worker.run()

    asyncio.run(serve())


# -- the user's side: the client actions ------------------------------------------------


def _deadlocked(exc: BaseException) -> bool:
    """An error that is a deadlock or serialization failure (40P01, 40001), however
    it was wrapped (the store maps them to DatabaseUnavailable today)."""
    e: BaseException | None = exc
    while e is not None:
        if getattr(e, "sqlstate", None) in ("40P01", "40001") or "deadlock" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass
class Tally:
    """What the client side did, and what reached it that should not have."""

    started: dict[str, int] = field(default_factory=dict)
    start_many_calls: int = 0
    start_many_mismatch: list[tuple[str, ...]] = field(default_factory=list)
    cancels: int = 0
    forks: int = 0
    tree_forks: int = 0
    deadline_retries: int = 0
    backfill_runs: int = 0
    user_deadlocks: list[str] = field(default_factory=list)
    outages_ridden: int = 0
    cancelled: set[str] = field(default_factory=set)
    #: children retried after failing by their deadline -> database time of the retry
    retried: dict[str, datetime] = field(default_factory=dict)
    sm_keys: set[str] = field(default_factory=set)


def bump(c: dict[str, int], k: str, n: int = 1) -> None:
    c[k] = c.get(k, 0) + n


class Driver:
    """Acts as the application's users do, in a thread with its own event loop and
    a client ``App``: starts runs (``start``, concurrent ``start_many`` with
    overlapping keys), cancels trees, forks keyed runs, repairs deadline
    failures, queues backfills. Every call rides out server restarts (retried
    on ``DatabaseUnavailable``, with idempotency keys where a retry could
    duplicate); a deadlock or serialization failure that reaches it is tallied.
    """

    def __init__(self, dsn: str, schema: str, plan: list[tuple[float, str, Any]],
                 seed: int) -> None:
        self.dsn, self.schema, self.plan = dsn, schema, sorted(plan, key=lambda p: p[0])
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.done = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="chaos-driver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the harness
            self.error = exc
        finally:
            self.done.set()

    async def call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        deadline = time.monotonic() + 120
        while True:
            try:
                return await fn()
            except Exception as exc:
                if _deadlocked(exc):
                    self.tally.user_deadlocks.append(f"{what}: {str(exc)[:160]}")
                    await asyncio.sleep(0.05)
                    continue
                if isinstance(exc, DatabaseUnavailable | psycopg.OperationalError) \
                        and time.monotonic() < deadline:
                    self.tally.outages_ridden += 1
                    await asyncio.sleep(0.3)
                    continue
                raise

    async def _run(self) -> None:
        self.app = build_app(self.dsn, self.schema)
        async with self.app:
            t0 = time.monotonic()
            pending = list(self.plan)
            tasks: set[asyncio.Task[None]] = set()
            while pending or tasks:
                now = time.monotonic() - t0
                while pending and pending[0][0] <= now:
                    _, kind, arg = pending.pop(0)
                    task = asyncio.create_task(getattr(self, f"do_{kind}")(arg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(self._raise_later)
                if self.error is not None:
                    raise self.error
                await asyncio.sleep(0.05)

    def _raise_later(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()

    # the actions (each scheduled by the plan)
    async def do_start(self, spec: tuple[str, str, dict[str, Any], str | None]) -> None:
        wf, key, kwargs, ckey = spec
        await self.call("start", lambda: self.app.start(
            wf, idempotency_key=key, concurrency_key=ckey, **kwargs))
        bump(self.tally.started, wf)

    async def do_start_many(self, n: int) -> None:
        """Two callers at once, the same keys in opposite orders (and a third
        with every other key): each must get the same run for each key."""
        keys = [f"sm-{n}-{i}" for i in range(12)]
        self.tally.sm_keys |= set(keys)

        async def one(order: list[str]) -> dict[str, str]:
            handles = await self.call("start_many", lambda: self.app.start_many(
                "noop", [int(k.rsplit("-", 1)[1]) for k in order], idempotency_keys=order))
            return {k: str(h.run_id) for k, h in zip(order, handles, strict=True)}

        got = await asyncio.gather(one(keys), one(keys[::-1]), one(keys[1::2][::-1]))
        self.tally.start_many_calls += 3
        for k in keys:
            ids = {g[k] for g in got if k in g}
            if len(ids) != 1:
                self.tally.start_many_mismatch.append((k, *sorted(ids)[:2]))
        bump(self.tally.started, "noop", len(keys))

    async def do_cancel(self, key: str) -> None:
        """Cancel a tree (and its unfinished children) midway: once it has a child
        that has not ended, so the cascade has something to do."""
        rid = None
        for _ in range(400):
            rows = await self._rows(
                "SELECT r.id::text, r.status, EXISTS (SELECT 1 FROM runs c WHERE "
                "c.parent_run_id = r.id AND c.status NOT IN ('completed', 'failed', "
                "'cancelled', 'dead')) FROM runs r WHERE r.idempotency_key = %s", key)
            if rows and (rows[0][2] or rows[0][1] in ("completed", "failed")):
                rid = rows[0][0]
                break
            await asyncio.sleep(0.05)
        if rid is None:
            return
        self.tally.cancelled.add(rid)
        with contextlib.suppress(InvalidState):
            await self.call("cancel", lambda: self.app.cancel(rid, children=True))
        self.tally.cancels += 1

    async def do_fork(self, key: str) -> None:
        """Fork a running ``solo`` run from step 1 (its first entry copied)."""
        for _ in range(200):
            rows = await self._rows(
                "SELECT r.id::text, r.status FROM runs r WHERE r.idempotency_key = %s "
                "AND EXISTS (SELECT 1 FROM steps s WHERE s.run_id = r.id "
                "AND s.position = 0)", key)
            if rows:
                await self.call("fork", partial(self.app.fork, rows[0][0], from_step=1))
                self.tally.forks += 1
                return
            if self.stop.is_set():
                return
            await asyncio.sleep(0.1)

    async def do_fork_tree(self, key: str) -> None:
        """Fork a tree from step 3 while it sleeps (positions 0-2 copied: the first
        spawn and wait, and the spawn of two more children, which the fork then
        shares with its source and waits for after its own sleep). Forked only
        once those children have ended (a wait for a shared child that has not
        ended is refused) and before the source waited for them."""
        for _ in range(600):
            rows = await self._rows(
                "SELECT r.id::text, r.status = 'suspended' AND EXISTS (SELECT 1 FROM steps s "
                "WHERE s.run_id = r.id AND s.position = 3 AND s.kind = 'sleep') "
                "AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.run_id = r.id "
                "AND s.position = 4) AND NOT EXISTS (SELECT 1 FROM runs c WHERE "
                "c.parent_run_id = r.id AND c.parent_position = 2 AND c.status NOT IN "
                "('completed', 'failed', 'cancelled', 'dead')), r.status "
                "FROM runs r WHERE r.idempotency_key = %s", key)
            if rows and rows[0][1]:
                await self.call("fork", partial(self.app.fork, rows[0][0], from_step=3))
                self.tally.tree_forks += 1
                return
            if (rows and rows[0][2] in ("completed", "failed", "cancelled", "dead")) \
                    or self.stop.is_set():
                return
            await asyncio.sleep(0.05)

    async def do_repair(self, key: str) -> None:
        """docs/fan-out.md's repair of a deadline failure: retry the child, and
        once it has ended, the parent. Nothing to repair when the parent
        completed, or failed for another reason (3a reports that)."""
        ended = ("completed", "failed", "cancelled", "dead")
        while not self.stop.is_set():
            rows = await self._rows(
                "SELECT p.id::text, p.status, c.id::text, c.status FROM runs p "
                "LEFT JOIN runs c ON c.parent_run_id = p.id WHERE p.idempotency_key = %s", key)
            if rows and rows[0][1] in ended:
                break
            await asyncio.sleep(0.1)
        else:
            return
        parent, p_status, child, c_status = rows[0]
        if p_status != "failed" or c_status != "failed":
            return
        # Retried once its durable sleep's wake time has passed (the retry
        # replays it) and the work in progress is not backed up, so the fresh
        # deadline is not spent waiting in the queue. A retried run started
        # before, so it is claimed ahead of new runs (resumptions first): a
        # backlog of new runs (the 1000 backfilled slots, a large run's
        # offered load) does not delay it. A user would wait up to 5 minutes.
        for _ in range(3000):
            (ready,) = (await self._rows(
                "SELECT coalesce((SELECT (s.output #>> '{}')::timestamptz < now() "
                "FROM steps s WHERE s.run_id = %s AND s.name = 'nap'), true) "
                "AND (SELECT count(*) FROM runs WHERE status = 'queued' "
                "AND started_at IS NOT NULL) < 50", child))[0]
            if ready or self.stop.is_set():
                break
            await asyncio.sleep(0.1)
        (at,) = (await self._rows("SELECT now()"))[0]
        await self.call("retry", partial(self.app.retry, child))
        self.tally.retried[child] = at
        while not self.stop.is_set():
            rows = await self._rows("SELECT status FROM runs WHERE id = %s", child)
            if not rows or rows[0][0] in ended:
                break
            await asyncio.sleep(0.1)
        await self.call("retry", partial(self.app.retry, parent))
        self.tally.deadline_retries += 2

    async def do_backfill(self, ranges: list[tuple[float, float]]) -> None:
        """Two ranges queued from SQL in one statement (a day, then the next, as
        a DBA would in psql: started by the next worker round), then one the
        App computes and starts at once."""
        (a1, b1), (a2, b2), (a3, b3) = [
            (datetime.fromtimestamp(lo, UTC), datetime.fromtimestamp(hi, UTC))
            for lo, hi in ranges]
        await self._rows("SELECT backfill_schedule(%s, %s, %s), "
                         "backfill_schedule(%s, %s, %s)", SCHEDULE, a1, b1, SCHEDULE, a2, b2)
        self.tally.backfill_runs += await self.call(
            "backfill", lambda: self.app.backfill_schedule(SCHEDULE, a3, b3))

    async def _rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        async def go() -> list[tuple[Any, ...]]:
            async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=5) as conn:
                await conn.execute(f'SET search_path TO "{self.schema}"')
                cur = await conn.execute(query, params)
                return await cur.fetchall() if cur.description else []
        return list(await self.call("sql", go))


def make_plan(args: Any, rng: random.Random, now: float) -> tuple[
        list[tuple[float, str, Any]], list[tuple[float, float]]]:
    """The user actions of the run, over the first 60% of the fault window, and
    the backfilled ranges (seconds since the epoch, before the schedule exists)."""
    n = args.runs
    span = 0.6 * args.seconds

    def at() -> float:
        return rng.uniform(0, span)

    plan: list[tuple[float, str, Any]] = []
    for i in range(max(2, n // 8)):
        t = at()
        key = f"tree-{i}"
        width = rng.randint(3, 6)
        plan.append((t, "start", ("tree", key, {
            "width": width, "idle": args.idle, "cancel_rest": rng.random() < 0.5,
            "pause": args.step_pause}, None)))
        if i % 3 == 1:
            plan.append((t + rng.uniform(0.5, 4.0), "cancel", key))
        elif i % 3 == 2:
            plan.append((t + 0.1, "fork_tree", key))
    for i in range(max(4, n // 4)):
        t = at()
        tenant = SOLO if i % 2 == 0 else TENANTS[(i // 2) % 2]
        key = f"keyed-{i}"
        plan.append((t, "start", ("keyed", key, {"tenant": tenant, "hold": args.hold},
                                  tenant)))
        if tenant == SOLO and i % 4 == 0:
            plan.append((t + 0.05, "fork", key))
    for i in range(max(3, n // 8)):
        plan.append((at(), "start", ("rated", f"rated-{i}", {
            "units": [rng.randint(1, 3), rng.randint(1, 3)]}, None)))
    for i in range(max(2, n // 20)):
        t = at()
        key = f"deadline-{i}"
        plan.append((t, "start", ("deadliner", key, {"limit": args.deadline}, None)))
        plan.append((t, "repair", key))
    for i in range(max(4, n // 4)):
        plan.append((at(), "start_many", i))
    # Backfills of the per-second schedule, of seconds before it existed: the
    # first holds --backfill-slots slots (1000: a round's whole budget).
    b = args.backfill_slots
    ranges = [(now - b - 31, now - 31), (now - 30, now - 21), (now - 20, now - 11)]
    plan.append((rng.uniform(0.2, 0.4) * span, "backfill", ranges))
    return plan, ranges


# -- background loops: the key sampler, prune and maintain -------------------------------


class KeySampler(threading.Thread):
    """Counts, from its own connection, the running runs with a live lease of each
    concurrency key, every ``interval`` seconds. A run's key is the tenant in its
    input (the key it was started with): a fork that lost its key still counts."""

    QUERY = """SELECT input->'kwargs'->>'tenant', count(*),
                      count(*) FILTER (WHERE concurrency_key IS NULL),
                      count(*) FILTER (WHERE forked_from IS NOT NULL)
               FROM runs
               WHERE workflow = 'keyed' AND status = 'running'
                 AND coalesce(lease_until, due_at) > now() GROUP BY 1"""

    def __init__(self, dsn: str, schema: str, interval: float = 0.05) -> None:
        super().__init__(name="chaos-key-sampler", daemon=True)
        self.dsn, self.schema, self.interval = dsn, schema, interval
        self.samples = 0
        #: samples over the limit: key, running, limit, how many of them had no
        #: key (a fork that lost it), how many were forks
        self.over: list[tuple[str, int, int, int, int]] = []
        self.peak: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.halt.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                    conn.execute(f'SET search_path TO "{self.schema}"')
                rows = conn.execute(self.QUERY).fetchall()
                self.samples += 1
                for key, n, keyless, forks in rows:
                    self.peak[key] = max(self.peak.get(key, 0), int(n))
                    if int(n) > KEY_LIMITS.get(key, 10**9):
                        self.over.append((key, int(n), KEY_LIMITS[key], int(keyless),
                                          int(forks)))
            except psycopg.OperationalError:
                conn = None
                time.sleep(0.2)
            self.halt.wait(self.interval)
        if conn is not None:
            conn.close()


class Maintenance(threading.Thread):
    """Runs ``pgjournal prune --older-than AGE`` (or ``pgjournal maintain``) as an
    operator's cron would, every ``interval`` seconds, through the CLI. A run
    that failed only because the server was being restarted is tallied apart."""

    def __init__(self, dsn: str, schema: str, argv: list[str], interval: float,
                 log_path: Path) -> None:
        super().__init__(name=f"chaos-{argv[0]}", daemon=True)
        self.cmd = [sys.executable, "-m", "pgjournal", *argv, "--dsn", dsn,
                    "--schema", schema]
        self.interval, self.log_path = interval, log_path
        self.ok = self.failed = self.outages = 0
        self.deadlocks: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with self.log_path.open("a") as fh:
            while not self.halt.wait(self.interval):
                res = subprocess.run(self.cmd, capture_output=True, text=True, check=False,
                                     timeout=120)
                fh.write(f"$ {' '.join(self.cmd[2:4])} -> {res.returncode}\n"
                         f"{res.stdout}{res.stderr}\n")
                fh.flush()
                if res.returncode == 0:
                    self.ok += 1
                elif "deadlock" in res.stderr or "40P01" in res.stderr:
                    self.deadlocks.append(res.stderr.strip().splitlines()[-1][:200])
                elif any(w in res.stderr for w in ("connect", "unavailable", "terminat",
                                                   "shut", "closed")):
                    self.outages += 1
                else:
                    self.failed += 1


def wait_schedule_caught_up(q: Callable[..., list[tuple[Any, ...]]], until: datetime,
                            timeout: float) -> str | None:
    """Wait until the schedule's cursor passed ``until`` (every slot up to it was
    considered); returns its ``last_error`` if it has one by then."""
    end = time.monotonic() + timeout
    while True:
        row = q("SELECT fire_after, last_error FROM schedules WHERE name = %s", SCHEDULE)
        if not row:
            return "schedule missing"
        fire_after, error = row[0]
        if fire_after >= until or error or time.monotonic() > end:
            return str(error) if error else None
        time.sleep(0.2)
