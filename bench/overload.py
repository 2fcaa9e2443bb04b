"""Overload: timer lateness and takeover after ``kill -9`` while the backlog grows.

    python -m bench.overload --dsn postgresql://postgres@127.0.0.1/postgres \\
        [--code DIR] [--seconds 90] [--load 2.0] [--workers 3] [--concurrency 4] \\
        [--lease 2] [--poll 1] [--work 1.0] [--sleep 1.0] [--kill-every 10] [--json FILE]

Issue 20, item 3: a claim used to order by (priority, due time), and a
resumption's due time is when it became due, so under overload a backlog of
new runs enqueued earlier was served first: timers fired late and a crashed
run's takeover waited behind the backlog. This measures exactly that.

Each run of the workflow holds a worker slot for ``--work`` seconds (two
journaled steps of ``--work/2`` each, asyncio sleeps: no CPU), with a durable
sleep of ``--sleep`` seconds between them (no slot held). The workers can
drain at most workers x concurrency / work runs per second, less on a busy
machine; the harness measures the drain as it goes (completed runs per second
over the last 10 s) and offers ``--load`` times that, one ``start_run`` at a
time at an even pace, for ``--seconds``. Every ``--kill-every`` seconds it
``kill -9``s a worker process and starts a replacement at once. At the end
every worker is killed and the figures are read from the database (server
clock):

* timer lateness: for each durable sleep whose wake time passed during the
  load, the claim that resumed the run minus the wake time (the journal holds
  the wake time, ``run_events`` the claim); timers due and not resumed by the
  end count as late by at least end - wake time, and are reported apart;
* takeover: for each run held by a killed worker, its next claim (a
  running -> running event) minus the moment of the kill (server clock read
  just before the signal); runs never taken over are reported apart;
* new runs' wait: first claim minus enqueue, for new runs claimed during the
  load, and the backlog of never-started runs at the end.

``--code DIR`` runs the workers (and the schema migration) with the pgjournal
package of another checkout, e.g. a ``git worktree`` of an older commit, so
before and after are measured in one sitting on one server. The harness
itself talks to the database with plain SQL (``start_run``, the tables), which
every version since 0001 has. The schema (``--schema``, default
``bench_overload``) is dropped first and left behind for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "overload"
INPUT = '{"args": [], "kwargs": {}}'
Row = dict[str, Any]


# -- the worker process (runs with the pgjournal of --code) ----------------------


def worker_main(argv: list[str]) -> None:
    """``overload.py --worker DSN SCHEMA CONCURRENCY LEASE POLL WORK SLEEP``.

    Imports only pgjournal's public API, so it runs against older checkouts."""
    dsn, schema = argv[0], argv[1]
    concurrency, lease, poll, work, nap = int(argv[2]), *map(float, argv[3:7])
    import pgjournal

    app = pgjournal.App(dsn, schema=schema, poll_interval=poll)

    async def busy(seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return True

    @app.workflow(name="ov", queue=QUEUE)
    async def ov(run: pgjournal.Run) -> bool:
        await run.step("a", busy, work / 2)
        await run.sleep("nap", nap)
        await run.step("b", busy, work / 2)
        return True

    worker = pgjournal.Worker(app, [QUEUE], concurrency=concurrency, lease=lease,
                              poll_interval=poll, schedules=False)
    asyncio.run(worker.run())


# -- the harness ---------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _pct(values, 0.5), "p90": _pct(values, 0.9),
            "max": max(values) if values else None,
            "mean": statistics.fmean(values) if values else None}


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.schema = args.schema
        self.procs: list[subprocess.Popen[bytes]] = []
        self.kills: list[tuple[int, Any]] = []  # (pid, server time just before the signal)
        self.log_dir = Path(tempfile.mkdtemp(prefix="pgjournal-overload-"))
        # The child processes run in the checkout (cwd first on sys.path for -c).
        self.code = Path(args.code).resolve() if args.code else ROOT
        self.env = {**os.environ, "PYTHONPATH": str(self.code), "PYTHONUNBUFFERED": "1"}

    def connect(self) -> psycopg.Connection[Row]:
        conn = psycopg.connect(self.args.dsn, autocommit=True, row_factory=dict_row)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def prepare(self) -> None:
        with psycopg.connect(self.args.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(self.schema)))
        subprocess.run([sys.executable, "-c",
                        "import sys; from pgjournal.migrations import migrate; "
                        "migrate(sys.argv[1], schema=sys.argv[2])", self.args.dsn, self.schema],
                       env=self.env, cwd=self.code, check=True)

    def start_worker(self) -> None:
        a = self.args
        log = (self.log_dir / f"worker-{len(self.procs)}.log").open("ab")
        self.procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", a.dsn, self.schema,
             str(a.concurrency), str(a.lease), str(a.poll), str(a.work), str(a.sleep)],
            env=self.env, cwd=self.code, stdout=log, stderr=log))
        log.close()

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    async def wait_workers(self, conn: psycopg.Connection[Row], n: int) -> None:
        deadline = time.monotonic() + 120
        while True:
            row = conn.execute("SELECT count(*) AS n FROM workers WHERE stopped_at IS NULL "
                               "AND heartbeat_at > now() - interval '10 seconds'").fetchone()
            if row and row["n"] >= n:
                return
            if time.monotonic() > deadline or not self.live():
                raise RuntimeError(f"workers not ready; logs in {self.log_dir}")
            await asyncio.sleep(0.1)

    async def offer(self, conn: psycopg.Connection[Row], probe: psycopg.Connection[Row],
                    seconds: float) -> int:
        """``start_run`` at an even pace for ``seconds``: ``--load`` times what
        the workers drain. The drain is measured, not assumed (a shared machine
        drains less than workers x slots / work): completed runs per second over
        the last 10 s, re-read every 2 s; the first 5 s offer ``--load`` times
        the nominal capacity."""
        a = self.args
        rate = a.load * a.workers * a.concurrency / a.work
        t0 = last = time.monotonic()
        measured_at = t0
        credit, n = 0.0, 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                return n
            if now - t0 >= 5 and now - measured_at >= 2:
                window = min(10.0, now - t0)
                row = probe.execute(
                    "SELECT count(*) AS n FROM runs WHERE status = 'completed' "
                    "AND finished_at > clock_timestamp() - make_interval(secs => %s)",
                    (window,)).fetchone()
                drained = (row["n"] if row else 0) / window
                rate = max(a.load * drained, 1.0)
                measured_at = now
            credit += rate * (now - last)
            last = now
            while credit >= 1:
                conn.execute("SELECT start_run(gen_random_uuid(), 'ov', %s, %s::json)",
                             (QUEUE, INPUT))
                n += 1
                credit -= 1
            await asyncio.sleep(0.02)

    async def chaos(self, conn: psycopg.Connection[Row], seconds: float, rng: random.Random
                    ) -> None:
        t0 = time.monotonic()
        every = self.args.kill_every
        if every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            if time.monotonic() - t0 >= seconds - 0.5:
                return
            live = self.live()
            if not live:
                continue
            victim = rng.choice(live)
            row = conn.execute("SELECT clock_timestamp() AS at").fetchone()
            assert row is not None
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            self.kills.append((victim.pid, row["at"]))
            self.start_worker()

    def stop_all(self) -> None:
        for p in self.live():
            p.kill()
        for p in self.procs:
            p.wait()

    def figures(self, conn: psycopg.Connection[Row], started: Any, ended: Any,
                offered: int) -> dict[str, Any]:
        timers = conn.execute(
            """
            SELECT s.run_id, (s.output #>> '{}')::timestamptz AS wake,
                   (SELECT min(e.at) FROM run_events e
                    WHERE e.run_id = s.run_id AND e.from_status = 'suspended'
                      AND e.to_status = 'running') AS resumed
            FROM steps s
            WHERE s.kind = 'sleep' AND (s.output #>> '{}')::timestamptz <= %s
            """, (ended,)).fetchall()
        late = [(t["resumed"] - t["wake"]).total_seconds() for t in timers
                if t["resumed"] is not None and t["resumed"] <= ended]
        waiting = [(ended - t["wake"]).total_seconds() for t in timers
                   if t["resumed"] is None or t["resumed"] > ended]
        takeovers: list[float] = []
        never: list[float] = []
        for pid, at in self.kills:
            held = conn.execute(
                """
                SELECT e.run_id,
                       (SELECT min(x.at) FROM run_events x
                        WHERE x.run_id = e.run_id AND x.at > %(at)s
                          AND x.from_status = 'running' AND x.to_status = 'running'
                          AND x.detail IS NULL) AS taken
                FROM run_events e JOIN workers w ON w.id = e.worker_id
                WHERE w.pid = %(pid)s AND e.to_status = 'running' AND e.at <= %(at)s
                  AND NOT EXISTS (SELECT 1 FROM run_events later
                                  WHERE later.run_id = e.run_id AND later.id > e.id
                                    AND later.at <= %(at)s AND later.detail IS NULL)
                """, {"pid": pid, "at": at}).fetchall()
            for h in held:
                if h["taken"] is not None and h["taken"] <= ended:
                    takeovers.append((h["taken"] - at).total_seconds())
                else:
                    never.append((ended - at).total_seconds())
        fresh = conn.execute(
            """
            SELECT extract(epoch FROM r.started_at - r.created_at)::float8 AS wait
            FROM runs r WHERE r.started_at IS NOT NULL AND r.started_at <= %s
            """, (ended,)).fetchall()
        row = conn.execute(
            """
            SELECT count(*) FILTER (WHERE status = 'completed' AND finished_at <= %(end)s) AS done,
                   count(*) FILTER (WHERE started_at IS NULL OR started_at > %(end)s) AS backlog
            FROM runs
            """, {"end": ended}).fetchone()
        assert row is not None
        span = (ended - started).total_seconds()
        a = self.args
        return {
            "settings": {k: getattr(a, k) for k in ("seconds", "load", "workers", "concurrency",
                                                      "lease", "poll", "work", "sleep",
                                                      "kill_every", "code")},
            "capacity_per_s": a.workers * a.concurrency / a.work,
            "offered": offered, "offered_per_s": offered / span,
            "completed": row["done"], "completed_per_s": row["done"] / span,
            "backlog_at_end": row["backlog"], "kills": len(self.kills),
            "timer_lateness_s": _summary(late),
            "timers_due_not_fired": _summary(waiting),
            "takeover_s": _summary(takeovers),
            "not_taken_over": _summary(never),
            "new_run_wait_s": _summary([r["wait"] for r in fresh]),
            "worker_logs": str(self.log_dir),
        }

    async def run(self) -> dict[str, Any]:
        a = self.args
        self.prepare()
        with self.connect() as conn:
            for _ in range(a.workers):
                self.start_worker()
            try:
                await self.wait_workers(conn, a.workers)
                (started,) = conn.execute("SELECT now() AS t").fetchone().values()
                with self.connect() as killer, self.connect() as probe:
                    offered, _ = await asyncio.gather(
                        self.offer(conn, probe, a.seconds),
                        self.chaos(killer, a.seconds, random.Random(a.seed)))
                (ended,) = conn.execute("SELECT clock_timestamp() AS t").fetchone().values()
            finally:
                self.stop_all()
            return self.figures(conn, started, ended, offered)


def _fmt(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "none"
    return f"{s['p50']:.2f} / {s['p90']:.2f} / {s['max']:.2f} s (n={s['n']})"


def report(f: dict[str, Any]) -> str:
    lines = [
        f"offered {f['offered']} runs ({f['offered_per_s']:.1f}/s; capacity at most "
        f"{f['capacity_per_s']:.1f}/s), completed {f['completed']} "
        f"({f['completed_per_s']:.1f}/s), backlog of never-started runs at the end "
        f"{f['backlog_at_end']}, kill -9: {f['kills']}",
        "| measure | p50 / p90 / max |",
        "| --- | --- |",
        f"| timer lateness | {_fmt(f['timer_lateness_s'])} |",
        f"| timers due, not fired by the end (waiting so far) | "
        f"{_fmt(f['timers_due_not_fired'])} |",
        f"| takeover after kill -9 | {_fmt(f['takeover_s'])} |",
        f"| runs not taken over by the end (waiting so far) | {_fmt(f['not_taken_over'])} |",
        f"| new runs: wait for the first claim | {_fmt(f['new_run_wait_s'])} |",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("PGJOURNAL_TEST_DSN"),
                    help="server to use (default: $PGJOURNAL_TEST_DSN)")
    ap.add_argument("--schema", default="bench_overload",
                    help="schema to create (dropped first; default bench_overload)")
    ap.add_argument("--code", default=None,
                    help="checkout whose pgjournal the workers use (default: this one)")
    ap.add_argument("--seconds", type=float, default=90.0, help="load phase (default 90)")
    ap.add_argument("--load", type=float, default=2.0,
                    help="offered load / what the workers drain, measured (default 2)")
    ap.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    ap.add_argument("--concurrency", type=int, default=4, help="slots per worker (default 4)")
    ap.add_argument("--lease", type=float, default=2.0, help="lease seconds (default 2)")
    ap.add_argument("--poll", type=float, default=1.0, help="poll interval (default 1)")
    ap.add_argument("--work", type=float, default=1.0,
                    help="seconds a run holds a slot, in two steps (default 1)")
    ap.add_argument("--sleep", type=float, default=1.0,
                    help="durable sleep between the steps (default 1)")
    ap.add_argument("--kill-every", type=float, default=10.0,
                    help="kill -9 a worker this often, 0: never (default 10)")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)
    if not args.dsn:
        ap.error("--dsn (or PGJOURNAL_TEST_DSN) is required")
    for name in ("seconds", "load", "lease", "poll", "work"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive")
    if args.workers < 1 or args.concurrency < 1:
        ap.error("--workers and --concurrency must be at least 1")
    if args.sleep < 0 or args.kill_every < 0:
        ap.error("--sleep and --kill-every must not be negative")
    if args.code and not (Path(args.code) / "pgjournal").is_dir():
        ap.error(f"--code: {args.code} holds no pgjournal package")
    from pgjournal._sql import validate_identifier
    from pgjournal.errors import ConfigurationError
    try:
        validate_identifier(args.schema)
    except ConfigurationError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    figures = asyncio.run(Harness(args).run())
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        main()
