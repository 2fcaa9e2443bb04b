"""Fault injection: pgjournal's promises checked from the database afterwards.

    python -m bench.chaos --runs 1000 --seconds 600 --settle 180   # large, on demand
    python -m bench.chaos --runs 150 --seconds 90                  # medium
    python -m bench.chaos --runs 40 --seconds 25 --settle 60 --server-kills 1  # CI

A throwaway embedded PostgreSQL (fsync off: a process crash loses nothing, and
``track_commit_timestamp`` on, so commit order is read from the database) serves
a schema ``chaos``. Worker processes (``python -m bench.chaos worker ...``) run
the workload of ``bench/chaos_workload.py``: the core ``chaos`` workflow (steps,
parallel steps, a durable sleep, a signal wait), child runs (``spawn_many``,
``wait_all``, ``wait_first``, cancel cascades), concurrency keys at their limit
with forks, a rate bucket, a per-second schedule with backfills, concurrent
``start_many`` with overlapping idempotency keys, and deadline failures
repaired by retries, while ``pgjournal prune`` (short ``--older-than``) and
``pgjournal maintain`` run every few seconds. Meanwhile this harness at random
``kill -9``s workers (and starts new ones), pauses workers with SIGSTOP past
their lease (then SIGCONT), and ``kill -9``s the server and restarts it.

Every step's side effect commits a row (run, step, occurrence, pid, the lease
epoch it ran under, when the step function was entered, when the effect
happened) to ``chaos.effects``. Afterwards ``bench/chaos_checks.py`` checks,
one row each whose count must be 0: invariants 1, 2a-2c, 3a-3b and 16 (1 and 16
by the entry time: a step started before a takeover may land its effect after
it, which the user's store refuses with ``run.fencing_token``), parents woken
exactly when their last awaited child ended (P1), no child lost (P2), cancel
cascades (C), key limits (K, sampled), forks keeping their key (F), rate
windows (R), schedule slots exactly once (S), ``start_many`` (SM), fresh
deadlines on retry (D), nothing needed pruned (N), no deadlock reaching a
user (X). Pruned rows are kept for the checks by the harness's own triggers
(schema ``chaos_audit``).

Prints progress and a table of faults and checks; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import pgjournal

from . import chaos_checks as checks
from . import chaos_workload as wl
from .chaos_checks import AUDIT, audit_sql
from .chaos_workload import QUEUE, worker_main

SCHEMA = "chaos"

# -- the harness -----------------------------------------------------------------------


@dataclass
class Faults:
    worker_kills: int = 0
    worker_pauses: int = 0
    server_kills: int = 0
    signals_sent: int = 0
    workers_started: int = 0

    def brief(self) -> str:
        return (f"kill {self.worker_kills} pause {self.worker_pauses} "
                f"server {self.server_kills} signals {self.signals_sent}")


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
                    self._conn.execute(f'SET search_path TO {AUDIT}, "{self.schema}"')
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
        rows = self.q(
            "SELECT r.id::text, r.status = 'suspended' AND r.wait_signal = 'go' FROM runs r "
            "WHERE r.workflow = 'chaos' AND r.status NOT IN ('completed', 'failed', 'dead', "
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
        """Runs by status, the pruned ones (ended) included."""
        return {str(s): int(n)
                for s, n in self.q("SELECT status, count(*) FROM a_runs GROUP BY 1")}

    def server_log(self) -> str:
        path = getattr(self.server, "log_file", None)
        return path.read_text(errors="replace") if path is not None and path.exists() else ""


def enqueue(h: Harness, i: int) -> None:
    """Start run ``i`` (idempotent: a server kill may hide whether it committed)."""
    a = h.args
    args = [h.rng.randint(2, 4), round(h.rng.uniform(0.2, 2.0), 2), a.parallel, a.step_pause]
    h.q("SELECT * FROM start_run(p_id => %s, p_workflow => 'chaos', p_queue => %s, "
        "p_input => %s, p_idempotency_key => %s, p_max_attempts => 3, "
        "p_max_recoveries => 1000)", uuid.uuid4(), QUEUE,
        json.dumps({"args": args, "kwargs": {}}), f"chaos-{i}")


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def setup(dsn: str) -> float:
    """The schema, the harness's tables and triggers, and the flow-control settings
    (as an operator would set them, through the App); returns when the
    per-second schedule was created (its first slot is the next second)."""
    pgjournal.migrate(dsn, schema=SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{SCHEMA}".effects (id bigserial PRIMARY KEY, run_id uuid NOT '
            "NULL, step text NOT NULL, occurrence int NOT NULL, pid int NOT NULL, "
            "epoch bigint NOT NULL, started timestamptz NOT NULL, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())")
        conn.execute(audit_sql(SCHEMA))

    async def limits() -> None:
        async with wl.build_app(dsn, SCHEMA) as app:
            await app.set_concurrency_limit(wl.SOLO, 1)
            await app.set_concurrency_limit("tenant-*", 2)
            await app.set_rate_limit(wl.BUCKET, wl.CAPACITY, wl.REFILL)
            await app.set_schedule(wl.SCHEDULE, "* * * * * *", "ticked", catchup="all",
                                   catchup_window=7200)

    asyncio.run(limits())
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT fire_after FROM "{SCHEMA}".schedules WHERE name = %s',
                           (wl.SCHEDULE,)).fetchone()
    assert row is not None
    return float(row[0].timestamp())


def run(args: argparse.Namespace) -> int:
    from pgjournal.embedded import throwaway_server

    rng = random.Random(args.seed)
    logdir = Path(tempfile.mkdtemp(prefix="pgjournal-chaos-"))
    server = throwaway_server(settings={"fsync": "off", "track_commit_timestamp": "on"})
    h: Harness | None = None
    bg: list[Any] = []
    try:
        dsn = server.dsn
        plan, ranges = wl.make_plan(args, rng, time.time())
        sched_lo = setup(dsn)
        h = Harness(dsn, SCHEMA, args, logdir, rng, server=server)
        print(f"chaos: {args.runs} runs of each mix, {args.workers} workers (lease "
              f"{args.lease}s), parallel steps {'on' if args.parallel else 'off'}, "
              f"prune --older-than {args.older_than}, seed {args.seed}; logs in {logdir}",
              flush=True)
        for _ in range(args.workers):
            h.spawn()
        driver = wl.Driver(dsn, SCHEMA, plan, rng.randrange(1 << 30))
        sampler = wl.KeySampler(dsn, SCHEMA)
        # Failed runs are kept for the operator (the deadline repairs retry them).
        pruner = wl.Maintenance(dsn, SCHEMA, ["prune", "--older-than", args.older_than,
                                              "--status", "completed", "--status", "cancelled"],
                                args.prune_interval, logdir / "prune.log")
        maint = wl.Maintenance(dsn, SCHEMA, ["maintain"], args.maintain_interval,
                               logdir / "maintain.log")
        bg = [sampler, pruner, maint]
        for t in bg:
            t.start()
        driver.start()
        t0 = time.monotonic()
        # Runs arrive over the first 60% of the fault window, so faults meet
        # runs at every stage (steps, sleeps, waits, replays).
        arrivals = sorted(t0 + rng.uniform(0, 0.6) * args.seconds for _ in range(args.runs))
        started = 0
        fault_end = t0 + args.seconds
        server_kill_at = sorted(t0 + rng.uniform(0.2, 0.8) * args.seconds
                                for _ in range(args.server_kills))
        next_fault = t0 + rng.uniform(0.5, 1.5) * args.fault_interval
        next_report = next_count = t0
        counts: dict[str, int] = {}
        final_deadline = fault_end + args.settle
        sched_hi: float | None = None
        sched_error: str | None = None
        while True:
            now = time.monotonic()
            while started < args.runs and arrivals[started] <= now:
                enqueue(h, started)
                started += 1
            h.resume_due(force=now >= fault_end)
            h.send_signals()
            if now >= fault_end and sched_hi is None:
                # Every slot up to now must fire; then the schedule is paused.
                (db_now,) = h.q("SELECT now()")[0]
                sched_error = wl.wait_schedule_caught_up(h.q, db_now, 30)
                h.q("SELECT pause_schedule(%s)", wl.SCHEDULE)
                sched_hi = db_now.timestamp()
            if now >= next_count:   # a scan of every run: once a second is enough
                counts = h.status_counts()
                next_count = now + 1
            live = sum(counts.get(s, 0) for s in ("queued", "running", "suspended"))
            if now >= next_report:
                print(f"  t={now - t0:5.1f}s  " + "  ".join(
                    f"{k}={v}" for k, v in sorted(counts.items())) +
                    f"  | faults {h.faults.brief()} | prunes {pruner.ok}, cancels "
                    f"{driver.tally.cancels}, "
                    f"forks {driver.tally.forks + driver.tally.tree_forks}, retries "
                    f"{driver.tally.deadline_retries}", flush=True)
                next_report = now + 2
            if driver.error is not None:
                raise RuntimeError("the client side failed") from driver.error
            if (sched_hi is not None and started == args.runs and driver.done.is_set()
                    and live == 0) or now > final_deadline:
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
        for t in bg:
            t.halt.set()
        driver.join(10)
        for w in h.alive():
            w.proc.send_signal(signal.SIGTERM)
        for w in h.workers:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)
        for t in bg:
            t.join(130)
        elapsed = time.monotonic() - t0
        return report(h, args, elapsed, driver, sampler, pruner, maint,
                      (sched_lo, sched_hi or time.time(), ranges, sched_error))
    finally:
        for w in h.workers if h is not None else []:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.wait(10)
        for t in bg:
            t.halt.set()
        with contextlib.suppress(Exception):
            server.kill()
        with contextlib.suppress(OSError):   # the deadlocks' details, for the report
            shutil.copy(server.log_file, logdir / "server.log")
        server.cleanup()


def report(h: Harness, args: argparse.Namespace, elapsed: float, driver: wl.Driver,
           sampler: wl.KeySampler, pruner: wl.Maintenance, maint: wl.Maintenance,
           sched: tuple[float, float, list[tuple[float, float]], str | None]) -> int:
    """Print the faults and events, then the checks (one row each, 0 violations
    wanted); write the figures as JSON when asked. Returns the exit code."""
    q = h.q
    tally = driver.tally
    worker_logs = [w.log.read_text(errors="replace") for w in h.workers]
    rows = checks.core_rows(q, tally, sampler, sched)
    # A worker's deadlock reached the user when it surfaced as a failure (a claim,
    # a batch of completions, a run's write reported as an outage), not when a
    # retry of it was merely logged.
    user_deadlocks = (tally.user_deadlocks + pruner.deadlocks + maint.deadlocks
                      + [line[:200] for text in worker_logs for line in text.splitlines()
                         if "deadlock" in line and ("failed" in line
                                                    or "unavailable" in line)])
    rows.append(checks.Row("X", "no deadlock or serialization failure reached a user "
                           "(start_many/cancel/retry callers, worker logs, prune, maintain)",
                           tally.start_many_calls + tally.cancels + pruner.ok + maint.ok,
                           [(d,) for d in user_deadlocks]))
    (recov,) = q("SELECT coalesce(sum(recoveries), 0)::int, count(*) FILTER "
                 "(WHERE attempt > 1)::int, coalesce(sum(interruptions), 0)::int "
                 "FROM a_runs")
    (journal,) = q("SELECT count(*) FILTER (WHERE kind = 'step'), count(*) FILTER "
                   "(WHERE kind = 'sleep'), count(*) FILTER (WHERE kind = 'signal'), "
                   "count(*) FILTER (WHERE name ~ '^p[ab][12]$'), count(*) FILTER "
                   "(WHERE kind = 'spawn'), count(*) FILTER (WHERE kind = 'children'), "
                   "count(*) FILTER (WHERE kind = 'rate') FROM a_steps")
    (late,) = q("SELECT count(*) FROM effects e WHERE EXISTS (SELECT 1 FROM "
                "a_events v WHERE v.run_id = e.run_id AND v.lease_epoch > e.epoch "
                "AND v.committed < e.at)")
    (reexec,) = q("SELECT count(*) - count(DISTINCT (run_id, step, occurrence)) FROM effects")
    (mix,) = q("SELECT count(*), count(*) FILTER (WHERE parent_run_id IS NOT NULL), "
               "count(*) FILTER (WHERE meta ? 'schedule'), (SELECT count(*) FROM gone_runs) "
               "FROM a_runs")
    deadlocks_logged = h.server_log().count("deadlock detected") if h.server else 0
    refused = sum(text.count("lost the lease") for text in worker_logs)
    f = h.faults
    print(f"\nchaos: {mix[0]} runs in {elapsed:.1f}s\n")
    print(table([
        ("fault / event", "count"),
        ("worker kill -9 (a new worker started each time)", str(f.worker_kills)),
        ("worker paused (SIGSTOP) past its lease", str(f.worker_pauses)),
        ("server kill -9 + restart", str(f.server_kills)),
        ("signals sent", str(f.signals_sent)),
        ("worker processes started", str(f.workers_started)),
        ("runs: all / children / schedule slots / pruned meanwhile", "/".join(map(str, mix))),
        ("start_many calls (3 at once, overlapping keys)", str(tally.start_many_calls)),
        ("trees cancelled / trees forked / solo runs forked / deadline repair retries",
         f"{tally.cancels}/{tally.tree_forks}/{tally.forks}/{tally.deadline_retries}"),
        ("prune runs ok / failed in an outage / failed otherwise",
         f"{pruner.ok}/{pruner.outages}/{pruner.failed}"),
        ("maintain runs ok / failed in an outage / failed otherwise",
         f"{maint.ok}/{maint.outages}/{maint.failed}"),
        ("key samples (running, live lease); peak per key",
         f"{sampler.samples}; " + ", ".join(f"{k}={v}" for k, v in sorted(sampler.peak.items()))),
        ("client calls that rode out an outage (retried)", str(tally.outages_ridden)),
        ("deadlocks in the server log (retried or not)", str(deadlocks_logged)),
        ("crash recoveries (claims of an expired lease)", str(recov[0])),
        ("claims after a server restart (interruptions)", str(recov[2])),
        ("runs retried (attempt > 1)", str(recov[1])),
        ("journal: steps/sleeps/signals/parallel/spawns/child waits/rate takes",
         "/".join(map(str, journal))),
        ("step re-executions (side effect before a lost journal write)", str(reexec[0])),
        ("'lost the lease' in worker logs (fenced off)", str(refused)),
        ("side effects landing after a takeover (step started before it)", str(late[0])),
    ]))
    print()
    print(table([("check", "checked", "violations", "what")] + [
        (r.label, str(r.checked), str(r.violations), r.what) for r in rows]))
    bad_total = sum(r.violations for r in rows)
    for r in rows:
        for example in r.bad[:5]:
            print(f"  violation {r.label}: {example}")
        if r.label == "3a" and r.bad:   # which runs, by workflow, status and error
            kinds = Counter(f"{wf} {status} {etype}" for _, wf, status, etype, _ in r.bad)
            print("  3a by kind: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
        if r.label == "K" and r.bad:
            print(f"  K: {sum(1 for o in sampler.over if not o[3])} of the samples over a "
                  "limit had no keyless run among the key's running runs")
    print(f"\nchaos: {'FAIL' if bad_total else 'PASS'}"
          f" ({bad_total} violations); logs in {h.logdir}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "runs": args.runs, "all_runs": mix[0], "seconds": elapsed, "faults": f.__dict__,
            "recoveries": recov[0], "retried": recov[1], "interruptions": recov[2],
            "fenced_off": refused, "late_effects": late[0], "parallel": args.parallel,
            "pauses": args.pauses, "pruned": mix[3], "deadlocks_logged": deadlocks_logged,
            "invariants": {r.label: {"what": r.what, "checked": r.checked,
                                     "violations": r.violations,
                                     "examples": [list(map(str, e)) for e in r.bad[:5]]}
                           for r in rows}}, indent=2))
    return 1 if bad_total else 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=300,
                   help="runs of the core workflow; the feature mix scales with it "
                        "(runs/8 trees, runs/4 keyed, runs/8 rated, runs/20 deadline "
                        "repairs, runs/10 rounds of start_many)")
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
    p.add_argument("--hold", type=float, default=0.6,
                   help="seconds a keyed run holds its key in its middle step")
    p.add_argument("--idle", type=float, default=4.0,
                   help="seconds a tree sleeps while its second children end (prune "
                        "may come by)")
    p.add_argument("--deadline", type=float, default=3.0,
                   help="timeout= of the child a deadliner spawns (it sleeps 2x that)")
    p.add_argument("--older-than", default="1s",
                   help="prune's --older-than, run every --prune-interval seconds")
    p.add_argument("--prune-interval", type=float, default=3.0,
                   help="seconds between prunes (each a CLI process: about a second "
                        "of CPU)")
    p.add_argument("--maintain-interval", type=float, default=8.0,
                   help="seconds between `pgjournal maintain` runs")
    p.add_argument("--backfill-slots", type=int, default=1000,
                   help="slots of the first backfill queued from SQL (1000 = one "
                        "round's budget: the second backfill then plans in a round "
                        "with none left)")
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
