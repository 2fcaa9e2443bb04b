"""``pgjournal demo``: worker processes, agent-like runs, one worker killed -9.

What it does, in order:

1. resets its own schema (``pgjournal_demo`` unless ``--schema``; it refuses a
   schema that holds anything but an earlier demo) and migrates it;
2. starts worker *processes* (``python -m pgjournal worker pgjournal._demo_app:app``)
   with 2-second leases, so the runs of a dead worker come back quickly;
3. starts a batch of runs of the ``agent`` workflow (fake model calls with
   latency, a streamed draft, a wait for an approval signal that the demo sends
   as a reviewer would, a durable sleep, a publish step);
4. SIGKILLs one worker while it holds runs with journaled steps, and shows
   the progress until every run has finished on the remaining workers;
5. checks in SQL that no step executed twice (the step functions log their side
   effects in a table of the demo's own; that log is compared with the
   journal), prints a summary and the SQL a DBA would run to see the same.

Exit status 0 only if every run completed and no step ran twice. Worker
processes are stopped in a ``finally``, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psycopg

from ._output import human_seconds, paint, shorten, table, use_colour
from ._queries import cli_fetch, cli_query, run_query
from ._sql import validate_identifier
from .app import App
from .connect import connect_async, mask_dsn, resolve_dsn
from .embedded import EmbeddedServer, dev_data_dir
from .errors import ConfigurationError, InvalidState, PgJournalError
from .migrations import migrate

DEMO_SCHEMA = "pgjournal_demo"
LEASE = 2.0
TASKS = (
    "summarise the incident reports of last week",
    "compare three vector databases for a RAG service",
    "draft the release notes of version 2.4",
    "triage the open support tickets",
    "plan a migration from cron jobs to durable workflows",
    "review the pull requests waiting on the team",
    "research the pricing of managed Postgres",
    "write the onboarding guide for new engineers",
    "audit the access rights of service accounts",
    "estimate the cloud bill for the next quarter",
    "collect feedback on the new dashboard",
    "prepare the board meeting briefing",
)


@dataclass(frozen=True)
class Settings:
    runs: int
    workers: int
    concurrency: int
    latency: float
    cool_down: float
    review: float
    kill: bool
    kill_after: float
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        short = bool(args.short)
        runs = args.runs if args.runs is not None else (12 if short else 24)
        if runs < 1:
            raise ConfigurationError("--runs must be at least 1")
        if args.workers < 0:
            raise ConfigurationError("--workers cannot be negative")
        if args.workers == 1 and not args.no_kill:
            raise ConfigurationError("killing the only worker would leave nobody to finish; "
                                     "use --workers 2 or more, or --no-kill")
        return cls(
            runs=runs, workers=args.workers, concurrency=4,
            latency=0.2 if short else 0.6, cool_down=0.5 if short else 2.0,
            review=0.3 if short else 1.0,
            kill=args.workers > 1 and not args.no_kill, kill_after=0.4 if short else 2.0,
            timeout=args.timeout or (45.0 if short else 90.0),
        )


@dataclass
class WorkerProc:
    number: int
    proc: subprocess.Popen[bytes]
    log: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Kill:
    worker: WorkerProc
    at: float
    held: int
    worker_id: uuid.UUID


@dataclass
class Counts:
    completed: int = 0
    running: int = 0
    queued: int = 0
    approval: int = 0
    sleeping: int = 0
    other_ended: int = 0
    recovered: int = 0

    def ended(self) -> int:
        return self.completed + self.other_ended


@dataclass
class Display:
    """Live progress: redrawn in place on a terminal, periodic lines otherwise."""

    out: TextIO
    total: int
    tty: bool
    colour: bool
    started: float = field(default_factory=time.monotonic)
    _drawn: int = 0
    _last_line: str = ""
    _last_print: float = 0.0

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def event(self, text: str, style: str | None = None) -> None:
        self._clear()
        self.out.write(f"{self.elapsed()} {paint(text, style, self.colour)}\n")
        self.out.flush()

    def status(self, c: Counts, workers: list[WorkerProc]) -> None:
        width = 24
        filled = round(width * c.completed / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = (f"{c.completed}/{self.total} completed · {c.running} running · "
                f"{c.approval} awaiting approval · {c.sleeping} sleeping · {c.queued} queued"
                f" · {c.recovered} recovered")
        if c.other_ended:
            line += f" · {c.other_ended} failed"
        if self.tty:
            self._clear()
            # A wrapped line would break the in-place redraw: cut to the width.
            room = shutil.get_terminal_size().columns - len(self.elapsed()) - width - 5
            line = shorten(line, max(room, 20))
            lines = [f"{self.elapsed()} [{paint(bar, 'green', self.colour)}] {line}"]
            if workers:
                lines.append("         workers: " + "  ".join(
                    paint(f"#{w.number} pid {w.pid} killed", "red", self.colour) if w.killed
                    else f"#{w.number} pid {w.pid} " + paint("up", "green", self.colour)
                    for w in workers))
            self.out.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
            self.out.flush()
            return
        now = time.monotonic()
        if (line != self._last_line and now - self._last_print >= 1.0) or \
                now - self._last_print >= 5.0:
            self.out.write(f"{self.elapsed()} [{bar}] {line}\n")
            self.out.flush()
            self._last_line, self._last_print = line, now

    def close(self) -> None:
        self._drawn = 0


class Demo:
    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.s = settings
        self.schema = validate_identifier(args.schema or DEMO_SCHEMA)
        self.out = sys.stdout
        self.colour = use_colour(self.out)
        self.display = Display(self.out, settings.runs, self.out.isatty(), self.colour)
        self.workers: list[WorkerProc] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="pgjournal-demo-"))
        self.run_ids: list[uuid.UUID] = []
        self.kill: Kill | None = None
        self.dsn = ""
        self.started_server: EmbeddedServer | None = None

    def say(self, text: str = "", style: str | None = None) -> None:
        self.out.write(paint(text, style, self.colour) + "\n")
        self.out.flush()

    # -- setup -----------------------------------------------------------------

    def resolve(self) -> None:
        if not (self.args.dsn or os.environ.get("PGJOURNAL_DSN")):
            server = EmbeddedServer(dev_data_dir())
            if not server.is_running():
                self.say("starting the embedded PostgreSQL (the first time takes a few "
                         "seconds)", "dim")
                self.started_server = server
        self.dsn = resolve_dsn(self.args.dsn)

    def stop_server(self) -> None:
        """Stop the embedded server if the demo started it: no process is left behind.

        Its data stays, and any later command (``pgjournal runs``) starts it again.
        """
        if self.started_server is not None and not self.args.keep_server:
            self.started_server.stop()
            self.say(f"stopped the embedded PostgreSQL the demo started (data kept in "
                     f"{self.started_server.data_dir}; pgjournal commands restart it)", "dim")

    async def reset_schema(self) -> None:
        """Drop and re-create the demo schema, refusing any schema that is not a demo's."""
        conn = await connect_async(self.dsn, autocommit=True)
        async with conn:
            state = (await run_query(conn, "demo_schema_state", self.schema,
                                     schema=self.schema))[0]
            # With external workers (--workers 0) they already serve the schema:
            # it is kept, and only the runs this demo starts are counted.
            if self.s.workers > 0:
                if state["present"] and state["relations"] and not state["is_demo"]:
                    raise ConfigurationError(
                        f"schema {self.schema!r} already holds tables that are not the "
                        "demo's; the demo resets its schema, so pick another one with "
                        "--schema")
                await run_query(conn, "demo_drop_schema", self.schema)
        await asyncio.to_thread(migrate, self.dsn, schema=self.schema)
        conn = await connect_async(self.dsn, autocommit=True)
        async with conn:
            await run_query(conn, "demo_setup", self.schema)

    def spawn_workers(self) -> None:
        # The DSN goes by environment, not argv, so no password shows in `ps`.
        env = {**os.environ, "PGJOURNAL_DSN": self.dsn, "PGJOURNAL_SCHEMA": self.schema,
               "PYTHONUNBUFFERED": "1"}
        for n in range(1, self.s.workers + 1):
            log = self.logdir / f"worker-{n}.log"
            cmd = [sys.executable, "-m", "pgjournal", "worker", "pgjournal._demo_app:app",
                   "--schema", self.schema, "--queue", "agents",
                   "--concurrency", str(self.s.concurrency), "--lease", str(LEASE),
                   "--grace", "3"]
            with log.open("wb") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
            self.workers.append(WorkerProc(n, proc, log))

    async def wait_registered(self, app: App) -> None:
        deadline = time.monotonic() + 60
        pids = [w.pid for w in self.workers]
        while True:
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise PgJournalError(
                        f"worker {w.number} exited at start (status {w.proc.returncode}):\n"
                        f"{w.tail()}")
            up = {r["pid"] for r in await cli_fetch(app, "demo_registered", pids=pids)}
            if up >= set(pids):
                return
            if time.monotonic() > deadline:
                raise PgJournalError("worker processes did not register within 60s")
            await asyncio.sleep(0.1)

    def stop_workers(self) -> None:
        """SIGTERM every live worker, then SIGKILL what is left after a few seconds."""
        for w in self.workers:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGCONT)
                    w.proc.terminate()
        deadline = time.monotonic() + 8
        for w in self.workers:
            try:
                w.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)

    # -- the show ----------------------------------------------------------------

    async def start_runs(self, app: App) -> None:
        for i in range(self.s.runs):
            task = TASKS[i % len(TASKS)]
            handle = await app.start("agent", task, queue="agents", latency=self.s.latency,
                                     cool_down=self.s.cool_down)
            self.run_ids.append(handle.run_id)

    async def counts(self, app: App) -> Counts:
        c = Counts()
        for r in await cli_fetch(app, "demo_progress", runs=self.run_ids):
            n, status = int(r["n"]), r["status"]
            c.recovered += int(r["recovered"])
            if status == "completed":
                c.completed += n
            elif status in ("failed", "cancelled", "dead"):
                c.other_ended += n
            elif status == "running":
                c.running += n
            elif status == "queued":
                c.queued += n
            elif r["wait_signal"] == "approval":
                c.approval += n
            else:
                c.sleeping += n
        return c

    async def review(self, app: App, seen: dict[uuid.UUID, float], sent: set[uuid.UUID]) -> None:
        """Approve each run once it has waited ``review`` seconds, as a person would."""
        now = time.monotonic()
        for r in await cli_fetch(app, "demo_awaiting_approval", runs=self.run_ids):
            rid = r["id"]
            if rid in sent:
                continue
            first = seen.setdefault(rid, now)
            if now - first >= self.s.review:
                with contextlib.suppress(InvalidState):
                    await app.signal(rid, "approval", {"approved": True, "by": "demo-reviewer"})
                sent.add(rid)

    async def try_kill(self, app: App, elapsed: float) -> None:
        """SIGKILL the victim while it holds runs with journaled steps.

        The worker is frozen (SIGSTOP) first and killed only if none of its
        step functions has finished its side effect without the journal entry
        being committed yet: a crash in that instant re-runs that one step
        (at-least-once is all any journal can give for an uncommitted step), and
        would blur what the demo shows. Otherwise it resumes and we try later.
        """
        victim = self.workers[len(self.workers) // 2]
        rows = await cli_fetch(app, "demo_worker_state", pid=victim.pid)
        # Prefer a moment when it holds two runs mid-way; settle for one later.
        wanted = 2 if elapsed < self.s.kill_after + 3 else 1
        if not rows or rows[0]["held_with_journal"] < wanted:
            return
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)  # let writes already sent by the worker land
            rows = await cli_fetch(app, "demo_worker_state", pid=victim.pid)
            state = rows[0] if rows else None
            if state is None or state["unjournaled_effects"] or state["held"] < 1:
                os.kill(victim.pid, signal.SIGCONT)
                return
            os.kill(victim.pid, signal.SIGKILL)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGCONT)
            raise
        await asyncio.to_thread(victim.proc.wait)
        victim.killed = True
        self.kill = Kill(victim, time.monotonic(), int(state["held"]), state["worker_id"])
        self.display.event(
            f"killed worker #{victim.number} (pid {victim.pid}) with SIGKILL while it held "
            f"{plural(state['held'], 'run')}; other workers take them over when their {LEASE:g}s "
            "leases expire", "red+bold")

    async def watch(self, app: App) -> Counts:
        seen: dict[uuid.UUID, float] = {}
        sent: set[uuid.UUID] = set()
        started = time.monotonic()
        last = Counts()
        while True:
            c = await self.counts(app)
            if c.recovered > last.recovered:
                # A running total, not a new batch: say so, or 1, 3, 4 reads as 8.
                self.display.event(f"recovered so far: {plural(c.recovered, 'run')} in total, "
                                   "taken over by surviving workers that replay their journals",
                                   "green")
            last = c
            self.display.status(c, self.workers)
            if c.ended() >= self.s.runs:
                return c
            elapsed = time.monotonic() - started
            if elapsed > self.s.timeout:
                raise PgJournalError(
                    f"the runs did not finish within {self.s.timeout:g}s "
                    f"({c.completed}/{self.s.runs} completed); worker logs in {self.logdir}")
            for w in self.workers:
                if not w.killed and w.proc.poll() is not None:
                    raise PgJournalError(f"worker #{w.number} died unexpectedly:\n{w.tail()}")
            await self.review(app, seen, sent)
            if self.s.kill and self.kill is None and elapsed >= self.s.kill_after:
                await self.try_kill(app, elapsed)
            await asyncio.sleep(0.2)

    # -- the verdict ---------------------------------------------------------------

    async def report(self, app: App, c: Counts, took: float) -> int:
        check = (await cli_fetch(app, "demo_check", runs=self.run_ids))[0]
        summary = (await cli_fetch(app, "demo_summary", runs=self.run_ids))[0]
        by_worker = await cli_fetch(app, "demo_steps_by_worker", runs=self.run_ids)
        steps, execs = int(check["steps"]), int(check["executions"])
        twice_ok = steps == execs and not check["repeated"] and not check["unexecuted"]
        all_ok = c.completed == self.s.runs
        self.say()
        median = human_seconds(summary["median_seconds"])
        if all_ok:
            # The progress lines' clock starts with the demo (setup included);
            # say which span "in" covers so the two figures agree.
            self.say(f"all {self.s.runs} runs completed in {human_seconds(took)} from the "
                     f"first start (median run {median})", "green+bold")
        else:
            self.say(f"{c.completed} of {self.s.runs} runs completed; {c.other_ended} did not",
                     "red+bold")
        if self.kill is not None:
            self.say(f"worker #{self.kill.worker.number} (pid {self.kill.worker.pid}) was "
                     f"killed holding {plural(self.kill.held, 'run')}; "
                     f"{plural(summary['recovered'], 'run')} taken over by other workers, "
                     "which replayed the journaled steps instead of running them again")
        line = f"no step executed twice: {steps} steps, {execs} executions"
        if twice_ok:
            self.say(line, "green+bold")
        else:
            self.say(f"STEPS EXECUTED MORE THAN ONCE OR NOT AT ALL: {steps} journaled steps, "
                     f"{execs} executions, {check['repeated']} repeated, "
                     f"{check['unexecuted']} without an execution", "red+bold")
            for r in await cli_fetch(app, "demo_repeated", runs=self.run_ids):
                self.say(f"  step {r['step']!r} of run {r['run_id']} ran {r['n']} times "
                         f"(pids {', '.join(map(str, r['pids']))})", "red")
            if check["repeated"] and self.s.workers == 0:
                self.say("  a worker killed after a step's side effect but before its journal "
                         "commit makes that step run again: pgjournal's promise covers steps "
                         "whose result was committed (see `pgjournal show RUN_ID`)", "dim")
        kinds = {r["kind"]: int(r["n"]) for r in
                 await cli_fetch(app, "demo_journal_kinds", runs=self.run_ids)}
        self.say(f"journal: {sum(kinds.values())} entries: "
                 f"{plural(kinds.get('step', 0), 'step')}, "
                 f"{plural(kinds.get('stream', 0), 'streamed draft')}, "
                 f"{plural(kinds.get('signal', 0), 'approval signal')}, "
                 f"{plural(kinds.get('sleep', 0), 'durable sleep')}")
        if by_worker:
            killed = {w.pid for w in self.workers if w.killed}
            self.say()
            self.say("steps journaled by each worker process:")
            cells = [[str(r["pid"]), str(r["steps"]), str(r["runs"]),
                      "killed -9" if r["pid"] in killed else ""] for r in by_worker]
            self.say("  " + table(cells, ["PID", "STEPS", "RUNS", ""], colour=self.colour,
                                  right=(1, 2)).replace("\n", "\n  "))
        if self.kill is not None:
            self.say("(the kill is timed outside the instant between a step's side effect "
                     "and its journal commit: a crash exactly there re-runs that one step; "
                     "pgjournal's promise is for steps whose result was committed)", "dim")
        self.print_dba(app)
        return 0 if all_ok and twice_ok else 1

    def print_dba(self, app: App) -> None:
        dsn_flag = f" --dsn '{mask_dsn(self.dsn)}'" if self.args.dsn else ""
        example = str(self.run_ids[0])
        self.say()
        self.say("look closer:", "bold")
        self.say(f"  pgjournal runs --schema {self.schema}{dsn_flag}")
        self.say(f"  pgjournal show {example} --schema {self.schema}{dsn_flag}")
        self.say()
        self.say(f"the SQL a DBA would run (`pgjournal psql --schema {self.schema}{dsn_flag}` "
                 "opens the psql bundled with pgjournal on this database):", "bold")
        queries = [
            ("every run, newest first", "dba_runs"),
            ("what one run did, step by step", "dba_timeline"),
            ("its status changes, and which worker held each lease", "dba_events"),
            ("steps that ran other than exactly once (expect no rows)", "dba_no_step_twice"),
        ]
        for title, name in queries:
            text = cli_query(name, self.schema, run=example).as_string(None)
            self.say(f"  -- {title}", "dim")
            self.say("  " + text.replace("\n", "\n  ") + ";")

    # -- main ------------------------------------------------------------------

    async def take_schema(self) -> psycopg.AsyncConnection[dict[str, object]]:
        """Hold the demo's advisory lock on its schema for the whole demo.

        Two demos on one server would otherwise reset each other's schema
        mid-run; the second one refuses politely instead.
        """
        conn = await connect_async(self.dsn, autocommit=True)
        got = (await run_query(conn, "demo_lock", self.schema, schema=self.schema))[0]["got"]
        if not got:
            await conn.close()
            raise ConfigurationError(
                f"another pgjournal demo is running on this server in schema {self.schema!r}; "
                "wait for it to finish, or give this one a schema of its own: "
                f"pgjournal demo --schema {self.schema}_2")
        return conn

    async def main(self) -> int:
        await asyncio.to_thread(self.resolve)
        lock = await self.take_schema()
        try:
            return await self._main()
        finally:
            await lock.close()

    async def _main(self) -> int:
        await self.reset_schema()
        self.say(paint("pgjournal demo", "bold", self.colour)
                 + f": {self.s.runs} agent runs, {self.s.workers or 'external'} worker "
                 f"processes, schema {self.schema} on {mask_dsn(self.dsn)}")
        self.say("  each run: plan (model call) -> 2-3 tool calls -> streamed draft -> waits "
                 "for an approval signal -> durable sleep -> publish", "dim")
        app = App(self.dsn, schema=self.schema, pool_size=4)
        try:
            self.spawn_workers()
            if self.workers:
                await self.wait_registered(app)
                self.display.event(f"{len(self.workers)} worker processes up (pids "
                                   f"{', '.join(str(w.pid) for w in self.workers)}), "
                                   f"{self.s.concurrency} runs each, {LEASE:g}s leases")
            began = time.monotonic()
            await self.start_runs(app)
            self.display.event(f"started {self.s.runs} runs")
            counts = await self.watch(app)
            took = time.monotonic() - began
            self.display.close()
            await self.pick_example(app)
            return await self.report(app, counts, took)
        finally:
            self.stop_workers()
            await app.close()

    async def pick_example(self, app: App) -> None:
        """Show a recovered run in the printed examples when there is one."""
        store = await app.store()
        for rid in self.run_ids:
            row = await store.get_run(rid)
            if row is not None and row["recoveries"] > 0:
                self.run_ids.remove(rid)
                self.run_ids.insert(0, rid)
                return


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``pgjournal demo``; returns the exit status."""
    settings = Settings.from_args(args)
    demo = Demo(args, settings)
    ok = False

    def terminated(signum: int, _frame: object) -> None:
        # Unwind through the finally below, so the workers go too.
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminated)
    try:
        code = asyncio.run(demo.main())
        ok = code == 0
        return code
    finally:
        demo.stop_workers()
        demo.stop_server()
        if ok:
            shutil.rmtree(demo.logdir, ignore_errors=True)
        elif demo.workers:
            print(f"worker logs kept in {demo.logdir}", file=sys.stderr)
