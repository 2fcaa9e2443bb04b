"""Fault injection: pgjournal's promises checked from the database afterwards.

    python -m bench.chaos --runs 300 --seconds 180          # the large run (on demand)
    python -m bench.chaos --runs 40 --seconds 40 --server-kills 1   # what CI runs

A throwaway embedded PostgreSQL (fsync off: a process crash loses nothing, and
``track_commit_timestamp`` on, so commit order is read from the database) serves
a schema ``chaos``. Worker processes (``python -m bench.chaos worker ...``) run
one workflow per run: a loop of steps, parallel steps (``asyncio.gather`` of two
branches of two steps, ``--no-parallel`` leaves them out), a durable sleep, a
signal wait (the harness sends each run one signal) and a second loop. While
they work, the harness at random ``kill -9``s workers (and starts new ones),
pauses workers with SIGSTOP past their lease (then SIGCONT), and ``kill -9``s
the server and restarts it.

Every step's side effect commits a row (run, step, occurrence, pid, the lease
epoch it ran under, when the step function was entered, when the effect
happened) to ``chaos.effects``. Checked afterwards (1 and 16 by the entry time:
a step started before a takeover may land its effect after it, which the
user's store refuses with ``run.fencing_token``; the table counts those):

1. no step ran again after its journal entry committed;
2. every journal entry carries the epoch of a claim of its run, one entry per
   position and per (name, occurrence), and no later claim had committed before it;
3. every run completed; every signal was consumed exactly once, by the journal
   entry of the wait at its position;
16. no step started under an epoch after a later claim (or cancel) of its run had
   committed: a worker paused past its lease starts nothing when it wakes up.

Prints progress and a table of faults and checks; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

import pgjournal

SCHEMA = "chaos"
QUEUE = "chaos"

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

    async def step(run: pgjournal.Run, name: str, occurrence: int, pause: float) -> str:
        def call() -> str:
            # The epoch is read when the step function runs: the one it executes
            # under. Not an argument: arguments are fingerprinted for replay.
            return effect(str(run.id), name, occurrence, _epoch(run), pause)

        return str(await run.step(name, call))

    @app.workflow(queue=QUEUE, max_attempts=3, retry_backoff=0.1, max_recoveries=1000)
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

    return app


def worker_main(argv: list[str]) -> None:
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


# -- the harness -----------------------------------------------------------------------


@dataclass
class Faults:
    worker_kills: int = 0
    worker_pauses: int = 0
    server_kills: int = 0
    signals_sent: int = 0
    workers_started: int = 0


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path
    paused_until: float | None = None


@dataclass
class Harness:
    dsn: str
    schema: str
    args: argparse.Namespace
    logdir: Path
    rng: random.Random
    server: Any = None
    faults: Faults = field(default_factory=Faults)
    workers: list[Proc] = field(default_factory=list)
    signaled: set[str] = field(default_factory=set)
    _conn: psycopg.Connection[Any] | None = None

    # database access that rides out server restarts
    def q(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + 120
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                    self._conn.execute(f'SET search_path TO "{self.schema}"')
                cur = self._conn.execute(query, params)
                return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                self._conn = None
                time.sleep(0.2)

    def spawn(self) -> None:
        log = self.logdir / f"worker-{self.faults.workers_started}.log"
        cmd = [sys.executable, "-m", "bench.chaos", "worker", self.dsn, self.schema,
               "--lease", str(self.args.lease), "--concurrency", str(self.args.concurrency)]
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                    cwd=Path(__file__).resolve().parent.parent,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.workers.append(Proc(proc, log))
        self.faults.workers_started += 1

    def alive(self) -> list[Proc]:
        return [w for w in self.workers if w.proc.poll() is None]

    # faults
    def kill_worker(self) -> None:
        victims = self.alive()
        if not victims:
            return
        w = self.rng.choice(victims)
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(10)
        self.faults.worker_kills += 1
        self.spawn()

    def pause_worker(self) -> None:
        running = [w for w in self.alive() if w.paused_until is None]
        if len(running) < 2:
            return  # keep one worker going
        w = self.rng.choice(running)
        os.kill(w.proc.pid, signal.SIGSTOP)
        w.paused_until = time.monotonic() + self.args.lease * self.rng.uniform(1.5, 3.0)
        self.faults.worker_pauses += 1

    def resume_due(self, force: bool = False) -> None:
        for w in self.workers:
            if w.paused_until is not None and (force or time.monotonic() >= w.paused_until):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGCONT)
                w.paused_until = None

    def kill_server(self) -> None:
        if self.server is None:
            return
        self.server.kill()
        self.faults.server_kills += 1
        self.server.start()
        if self.server.dsn != self.dsn:
            raise RuntimeError("the restarted server came back on another port")

    def send_signals(self) -> None:
        """One signal per run, sometimes before its wait, sometimes while it waits."""
        rows = self.q("SELECT r.id::text, r.status = 'suspended' AND r.wait_signal = 'go' "
                      "FROM runs r WHERE r.status NOT IN ('completed', 'failed', 'dead', "
                      "'cancelled') AND EXISTS (SELECT 1 FROM steps s WHERE s.run_id = r.id "
                      "AND s.name = 'nap')")
        for run_id, waiting in rows:
            if run_id in self.signaled or not (waiting or self.rng.random() < 0.3):
                continue
            # Sent at most once even if a server kill hides whether it committed
            # (q retries it): the idempotency key makes the retry a no-op.
            try:
                self.q("SELECT send_signal(%s, 'go', to_json(%s::text), "
                       "p_idempotency_key => %s)", run_id, f"sig-{run_id[:8]}",
                       f"chaos-{run_id}")
            except psycopg.Error as exc:
                if exc.sqlstate != "PJ409":  # the run ended meanwhile (it failed)
                    raise
                continue
            self.signaled.add(run_id)
            self.faults.signals_sent += 1

    def status_counts(self) -> dict[str, int]:
        return {str(s): int(n) for s, n in self.q("SELECT status, count(*) FROM runs GROUP BY 1")}


def enqueue(h: Harness, i: int) -> None:
    """Start run ``i`` (idempotent: a server kill may hide whether it committed)."""
    a = h.args
    args = [h.rng.randint(2, 4), round(h.rng.uniform(0.2, 2.0), 2), a.parallel, a.step_pause]
    h.q("SELECT * FROM start_run(p_id => %s, p_workflow => 'chaos', p_queue => %s, "
        "p_input => %s, p_idempotency_key => %s, p_max_attempts => 3, "
        "p_max_recoveries => 1000)", uuid.uuid4(), QUEUE,
        json.dumps({"args": args, "kwargs": {}}), f"chaos-{i}")


INVARIANTS: list[tuple[str, str, str, str]] = [
    # (label, what is checked, query counting the items checked, query listing violations)
    ("1", "no step ran again after its journal entry committed",
     "SELECT count(*) FROM effects",
     """SELECT e.run_id, e.step, e.occurrence, e.pid, e.epoch, e.started
        FROM effects e JOIN steps s ON s.run_id = e.run_id AND s.name = e.step
             AND s.occurrence = e.occurrence AND s.status = 'completed'
        WHERE e.started > pg_xact_commit_timestamp(s.xmin)"""),
    ("2a", "every journal entry's epoch is a claim epoch of its run",
     "SELECT count(*) FROM steps",
     """SELECT s.run_id, s.position, s.name, s.lease_epoch FROM steps s
        WHERE NOT EXISTS (SELECT 1 FROM run_events v WHERE v.run_id = s.run_id
                          AND v.to_status = 'running' AND v.lease_epoch = s.lease_epoch)"""),
    ("2b", "no entry committed after a later claim of its run had committed",
     "SELECT count(*) FROM steps",
     """SELECT s.run_id, s.position, s.name, s.lease_epoch, v.lease_epoch AS later
        FROM steps s JOIN run_events v ON v.run_id = s.run_id
             AND v.lease_epoch > s.lease_epoch
        WHERE pg_xact_commit_timestamp(v.xmin) < pg_xact_commit_timestamp(s.xmin)"""),
    ("2c", "one entry per (run, name, occurrence) and per position",
     "SELECT count(DISTINCT run_id) FROM steps",
     """SELECT run_id, name, occurrence, count(*) FROM steps
        GROUP BY 1, 2, 3 HAVING count(*) > 1
        UNION ALL
        SELECT run_id, position::text, NULL, count(*) FROM steps
        GROUP BY 1, 2 HAVING count(*) > 1"""),
    ("3a", "every run completed",
     "SELECT count(*) FROM runs",
     "SELECT id, status, error->>'type', error->>'message' FROM runs "
     "WHERE status <> 'completed'"),
    ("3b", "every signal consumed exactly once, by the wait journaled at its position",
     "SELECT count(*) FROM signals",
     """SELECT g.run_id, g.id, g.consumed_position, s.name, s.kind FROM signals g
        LEFT JOIN steps s ON s.run_id = g.run_id AND s.position = g.consumed_position
        WHERE g.consumed_at IS NULL OR s.kind IS DISTINCT FROM 'signal'
           OR s.output::jsonb IS DISTINCT FROM g.payload::jsonb
        UNION ALL
        SELECT s.run_id, NULL, s.position, s.name, 'entry without its signal' FROM steps s
        WHERE s.kind = 'signal' AND s.status = 'completed' AND (SELECT count(*) FROM signals g
              WHERE g.run_id = s.run_id AND g.consumed_position = s.position) <> 1"""),
    ("16", "no step started under an epoch a later claim or cancel had superseded",
     "SELECT count(*) FROM effects",
     """SELECT e.run_id, e.step, e.occurrence, e.pid, e.epoch, min(v.lease_epoch),
               e.started
        FROM effects e JOIN run_events v ON v.run_id = e.run_id
             AND v.lease_epoch > e.epoch
        WHERE pg_xact_commit_timestamp(v.xmin) < e.started
        GROUP BY e.id, e.run_id, e.step, e.occurrence, e.pid, e.epoch, e.started"""),
]


def check(h: Harness) -> list[tuple[str, str, int, list[tuple[Any, ...]]]]:
    out = []
    for label, what, count_q, bad_q in INVARIANTS:
        checked = int(h.q(count_q)[0][0])
        out.append((label, what, checked, h.q(bad_q)))
    return out


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pgjournal.embedded import throwaway_server

    rng = random.Random(args.seed)
    logdir = Path(tempfile.mkdtemp(prefix="pgjournal-chaos-"))
    server = throwaway_server(settings={"fsync": "off", "track_commit_timestamp": "on"})
    h: Harness | None = None
    try:
        dsn = server.dsn
        pgjournal.migrate(dsn, schema=SCHEMA)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{SCHEMA}".effects (id bigserial PRIMARY KEY, run_id uuid NOT '
                "NULL, step text NOT NULL, occurrence int NOT NULL, pid int NOT NULL, "
                "epoch bigint NOT NULL, started timestamptz NOT NULL, "
                "at timestamptz NOT NULL DEFAULT clock_timestamp())")
        h = Harness(dsn, SCHEMA, args, logdir, rng, server=server)
        print(f"chaos: {args.runs} runs, {args.workers} workers (lease {args.lease}s), "
              f"parallel steps {'on' if args.parallel else 'off'}, seed {args.seed}; "
              f"logs in {logdir}", flush=True)
        for _ in range(args.workers):
            h.spawn()
        t0 = time.monotonic()
        # Runs arrive over the first 60% of the fault window, so faults meet
        # runs at every stage (steps, sleeps, waits, replays).
        arrivals = sorted(t0 + rng.uniform(0, 0.6) * args.seconds for _ in range(args.runs))
        started = 0
        fault_end = t0 + args.seconds
        server_kill_at = sorted(t0 + rng.uniform(0.2, 0.8) * args.seconds
                                for _ in range(args.server_kills))
        next_fault = t0 + rng.uniform(0.5, 1.5) * args.fault_interval
        next_report = t0
        final_deadline = fault_end + args.settle
        ended = ("completed", "failed", "dead", "cancelled")
        while True:
            now = time.monotonic()
            while started < args.runs and arrivals[started] <= now:
                enqueue(h, started)
                started += 1
            h.resume_due(force=now >= fault_end)
            h.send_signals()
            counts = h.status_counts()
            done = sum(counts.get(s, 0) for s in ended)
            if now >= next_report:
                print(f"  t={now - t0:5.1f}s  " + "  ".join(
                    f"{k}={v}" for k, v in sorted(counts.items())) + f"  | faults {h.faults}",
                    flush=True)
                next_report = now + 2
            if (started == args.runs and done == args.runs) or now > final_deadline:
                break
            if now < fault_end:
                if server_kill_at and now >= server_kill_at[0]:
                    server_kill_at.pop(0)
                    h.kill_server()
                elif now >= next_fault:
                    pause = args.pauses and rng.random() < 0.5
                    (h.pause_worker if pause else h.kill_worker)()
                    next_fault = now + rng.uniform(0.5, 1.5) * args.fault_interval
            time.sleep(0.1)
        h.resume_due(force=True)
        for w in h.alive():
            w.proc.send_signal(signal.SIGTERM)
        for w in h.workers:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)
        elapsed = time.monotonic() - t0
        results = check(h)
        (recov,) = h.q("SELECT coalesce(sum(recoveries), 0)::int, count(*) FILTER "
                       "(WHERE attempt > 1)::int, coalesce(sum(interruptions), 0)::int "
                       "FROM runs")
        (journal,) = h.q("SELECT count(*) FILTER (WHERE kind = 'step'), count(*) FILTER "
                         "(WHERE kind = 'sleep'), count(*) FILTER (WHERE kind = 'signal'), "
                         "count(*) FILTER (WHERE name ~ '^p[ab][12]$') FROM steps")
        (late,) = h.q("SELECT count(*) FROM effects e WHERE EXISTS (SELECT 1 FROM "
                      "run_events v WHERE v.run_id = e.run_id AND v.lease_epoch > e.epoch "
                      "AND pg_xact_commit_timestamp(v.xmin) < e.at)")
        (reexec,) = h.q("SELECT count(*) - count(DISTINCT (run_id, step, occurrence)) "
                        "FROM effects")
        refused = sum(w.log.read_text(errors="replace").count("lost the lease")
                      for w in h.workers)
        f = h.faults
        print(f"\nchaos: {args.runs} runs in {elapsed:.1f}s\n")
        print(table([
            ("fault / event", "count"),
            ("worker kill -9 (a new worker started each time)", str(f.worker_kills)),
            ("worker paused (SIGSTOP) past its lease", str(f.worker_pauses)),
            ("server kill -9 + restart", str(f.server_kills)),
            ("signals sent", str(f.signals_sent)),
            ("worker processes started", str(f.workers_started)),
            ("crash recoveries (claims of an expired lease)", str(recov[0])),
            ("claims after a server restart (interruptions)", str(recov[2])),
            ("runs retried (attempt > 1)", str(recov[1])),
            ("journal entries: steps / sleeps / signals / parallel", "/".join(map(str, journal))),
            ("step re-executions (side effect before a lost journal write)", str(reexec[0])),
            ("'lost the lease' in worker logs (fenced off)", str(refused)),
            ("side effects landing after a takeover (step started before it)", str(late[0])),
        ]))
        print()
        print(table([("invariant", "checked", "violations", "what")] + [
            (label, str(n), str(len(bad)), what) for label, what, n, bad in results]))
        bad_total = 0
        for label, _what, _n, bad in results:
            bad_total += len(bad)
            for row in bad[:5]:
                print(f"  violation {label}: {row}")
        print(f"\nchaos: {'FAIL' if bad_total else 'PASS'}"
              f" ({bad_total} violations); worker logs in {logdir}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "runs": args.runs, "seconds": elapsed, "faults": f.__dict__,
                "recoveries": recov[0], "retried": recov[1], "interruptions": recov[2],
                "fenced_off": refused, "late_effects": late[0], "parallel": args.parallel,
                "pauses": args.pauses,
                "invariants": {label: {"checked": n, "violations": len(bad),
                                       "examples": [list(map(str, r)) for r in bad[:5]]}
                               for label, _w, n, bad in results}}, indent=2))
        return 1 if bad_total else 0
    finally:
        for w in h.workers if h is not None else []:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.wait(10)
        with contextlib.suppress(Exception):
            server.kill()
        server.cleanup()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--seconds", type=float, default=180.0,
                   help="how long faults are injected (then the runs may finish)")
    p.add_argument("--settle", type=float, default=90.0,
                   help="after the faults, how long the runs get to finish")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--fault-interval", type=float, default=2.0,
                   help="mean seconds between worker faults")
    p.add_argument("--server-kills", type=int, default=2)
    p.add_argument("--step-pause", type=float, default=0.2,
                   help="seconds each step function takes after its side effect")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="include the parallel steps (asyncio.gather)")
    p.add_argument("--pauses", action=argparse.BooleanOptionalAction, default=True,
                   help="pause workers past their lease (half the worker faults)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
