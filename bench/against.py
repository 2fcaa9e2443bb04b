"""``python -m bench --against REF``: the working tree against a git ref, in one sitting.

Why: a change measured alone on a shared machine comes out "within the noise",
and several such changes in a row lost a sixth of the drain (issue 23). Here
both trees run the same scenarios on one server, in alternating rounds
(working tree, REF, working tree, REF, ...), so load that comes and goes falls
on both sides alike, and each figure is printed as the ratio working tree /
REF of adjacent rounds, with its spread over the rounds.

How: REF is checked out with ``git worktree add --detach`` into a temporary
directory, removed at the end. Each round of each side is one ``python -m
bench`` child process started from its tree with that tree first on
PYTHONPATH, so it uses its own pgjournal package, ``sql/`` migrations,
adapters and worker processes. The REF's bench is driven only through its
command line (``--dsn``, ``--db-prefix``, ``--systems``, ``--scenarios``,
``--repeat``, ``--out`` ...), so any commit whose bench has those flags can be
compared; one that lacks something fails with its own one-line reason.

Each side gets databases of its own on the one server (``<prefix>work_<system>``
and ``<prefix>ref_<system>``, made afresh every round and dropped at the end):
the adapters fix their schema names, and the REF's adapters cannot be changed,
so a database per side is the separation available from outside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .cli import machine, open_server, server_facts
from .procs import ROOT


class AgainstError(Exception):
    """Why the comparison cannot go on, in one line for the user."""


@dataclass
class Side:
    """One of the two trees being compared."""

    key: str  # "work" or "ref": database prefix and JSON key
    label: str  # how tables and progress name it
    tree: Path
    imports: dict[str, str] = field(default_factory=dict)


@dataclass
class Figure:
    """One measured quantity (scenario, case, system, metric) on both sides, per round."""

    scenario: str
    case: str
    system: str
    metric: str
    unit: str
    higher_is_better: bool
    work: list[float | None]
    ref: list[float | None]

    @property
    def ratios(self) -> list[float]:
        """Working tree / REF of each round where both sides have a usable value."""
        return [w / r for w, r in zip(self.work, self.ref, strict=True)
                if w is not None and r is not None and r > 0]

    def better_rounds(self) -> int:
        """Rounds in which the working tree came out better than REF."""
        return sum(1 for x in self.ratios if (x > 1) == self.higher_is_better and x != 1)


# -- git ----------------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> str:
    """Run git; its last stderr line becomes the error when it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=False)
    except FileNotFoundError as exc:
        raise AgainstError("git is not installed; --against needs it") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise AgainstError(f"git {args[0]}: {lines[-1]}")
    return done.stdout.strip()


def resolve(ref: str) -> tuple[str, str]:
    """The commit ``ref`` names (full hash) and its subject line."""
    try:
        git("rev-parse", "--show-toplevel")
    except AgainstError as exc:
        raise AgainstError(f"{ROOT} is not a git checkout; --against needs its history") \
            from exc
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except AgainstError as exc:
        raise AgainstError(f"unknown ref {ref!r} (not a commit in {ROOT})") from exc
    return sha, git("log", "-1", "--format=%s", sha)


@contextlib.contextmanager
def ref_tree(sha: str) -> Iterator[Path]:
    """A detached worktree of ``sha`` in a temporary directory, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="pgjournal-against-"))
    tree = tmp / "ref"
    try:
        git("worktree", "add", "--detach", "--quiet", str(tree), sha)
        yield tree
    finally:
        with contextlib.suppress(AgainstError):
            git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(AgainstError):
            git("worktree", "prune")


# -- the two sides --------------------------------------------------------------


def side_env(tree: Path) -> dict[str, str]:
    """The environment of a side's processes: its tree first on PYTHONPATH, and
    neither the other tree nor this one after it (a module only one tree has
    must not be found in the other)."""
    others = {str(ROOT), str(tree)}
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and str(Path(p).resolve()) not in others]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *rest]),
            "PYTHONUNBUFFERED": "1"}


def probe(side: Side) -> None:
    """Check the side has a bench and imports its own code (kept in the JSON)."""
    if not (side.tree / "bench" / "__main__.py").is_file():
        raise AgainstError(f"{side.label} has no bench (bench/__main__.py is missing)")
    done = subprocess.run(
        [sys.executable, "-c",
         "import bench, pgjournal; print(bench.__file__); print(pgjournal.__file__)"],
        cwd=side.tree, env=side_env(side.tree), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise AgainstError(f"{side.label}: cannot import its bench and pgjournal: {last}")
    bench_file, pgjournal_file = done.stdout.split()
    side.imports = {"bench": bench_file, "pgjournal": pgjournal_file}
    for name, path in side.imports.items():
        if not Path(path).resolve().is_relative_to(side.tree.resolve()):
            raise AgainstError(f"{side.label}: {name} imports from {path}, not from its "
                               f"tree {side.tree}")


def child_argv(args: argparse.Namespace, side: Side, admin_dsn: str, out: Path,
               log_dir: Path) -> list[str]:
    """One round of one side: its own ``python -m bench``, one repetition."""
    argv = [sys.executable, "-m", "bench", "--dsn", admin_dsn,
            "--db-prefix", f"{args.db_prefix}{side.key}_",
            "--systems", ",".join(args.systems), "--scenarios", ",".join(args.scenarios),
            "--repeat", "1", "--out", str(out), "--log-dir", str(log_dir)]
    if args.quick:
        argv.append("--quick")
    if args.jobs:
        argv += ["--jobs", str(args.jobs)]
    if args.history:
        argv += ["--history", str(args.history)]
    return argv


def run_round(side: Side, argv: list[str], tag: str, log_dir: Path) -> dict[str, Any]:
    """Run one round, echoing its result lines; its JSON output, parsed."""
    out = Path(argv[argv.index("--out") + 1])
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / "bench-stderr.log"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=side.tree, env=side_env(side.tree),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                # Result lines and notes are indented; the child's own tables are not.
                if line.startswith("  "):
                    print(f"  {tag} {line.strip()}", flush=True)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: let it stop its worker processes
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        lines = stderr_path.read_text(errors="replace").strip().splitlines()
        raise AgainstError(f"{side.label}'s bench failed in round {tag} (exit {rc}): "
                           f"{lines[-1] if lines else 'no message'} (see {stderr_path})")
    try:
        data: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise AgainstError(f"{side.label}'s bench wrote no readable results to {out}: "
                           f"{exc}") from exc
    return data


# -- comparing ---------------------------------------------------------------------


def _value(result: dict[str, Any]) -> float | None:
    values = [float(v) for v in result.get("values", []) if v is not None]
    values = [v for v in values if not math.isnan(v)]
    return float(statistics.median(values)) if values else None


def compare(rounds: dict[str, list[dict[str, Any]]]) -> list[Figure]:
    """Figures in the working tree's order (then REF-only ones), round by round."""
    n = len(rounds["work"])
    figures: dict[tuple[str, str, str, str], Figure] = {}
    for key in ("work", "ref"):
        for i, data in enumerate(rounds[key]):
            for r in data.get("results", []):
                ident = (r["scenario"], r["case"], r["system"], r["metric"])
                if ident not in figures:
                    figures[ident] = Figure(*ident, unit=r.get("unit", ""),
                                            higher_is_better=bool(r["higher_is_better"]),
                                            work=[None] * n, ref=[None] * n)
                getattr(figures[ident], key)[i] = _value(r)
    return list(figures.values())


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(statistics.median(got)) if got else None


def ratio_line(f: Figure) -> str:
    """One table row: both sides' medians, the ratio's median and spread, the verdict."""
    better = "higher" if f.higher_is_better else "lower"
    head = (f"| {f.scenario} | {f.case} | {f.system} | {fmt(_median(f.work))} {f.unit} | "
            f"{fmt(_median(f.ref))} {f.unit} |")
    ratios = f.ratios
    if not ratios:
        missing = ("missing in the working tree" if _median(f.work) is None
                   else "missing on REF" if _median(f.ref) is None else "REF measured 0")
        return f"{head} n/a ({missing}) | | {better} is better | |"
    spread = (f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"
              if len(ratios) > 1 else "one round")
    return (f"{head} {statistics.median(ratios):.2f}x | {spread} | {better} is better | "
            f"{f.better_rounds()} of {len(ratios)} |")


def table(figures: list[Figure], ref_label: str, rounds: int) -> str:
    out = [f"\n### working tree / {ref_label}: {rounds} round(s) each, alternating\n",
           "| scenario | case | system | working tree | REF | ratio | min / median / max "
           "| direction | working tree better in |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    out += [ratio_line(f) for f in figures]
    if any(f.system == "raw" for f in figures):
        out.append("\nThe raw loop's code is the same on both sides unless bench/adapters/"
                   "raw.py changed: its ratios are this sitting's noise.")
    return "\n".join(out) + "\n"


# -- the whole run -------------------------------------------------------------------


def drop_databases(admin_dsn: str, prefix: str, systems: list[str]) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for key in ("work", "ref"):
            for system in systems:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(f"{prefix}{key}_{system}")))


def run_against(args: argparse.Namespace) -> int:
    """``--against``: exit 0 with the ratios printed, or 2 with one line on stderr."""
    try:
        return _run(args)
    except AgainstError as exc:
        print(f"python -m bench --against: {exc}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    sha, subject = resolve(args.against)
    head = git("rev-parse", "--short", "HEAD")
    dirty = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
    ref_label = f"{args.against} ({sha[:9]})"
    work = Side("work", "working tree", ROOT)
    print(f"working tree: {ROOT} at {head}"
          f"{f' with uncommitted changes in {dirty} file(s)' if dirty else ''}", flush=True)
    print(f"against {ref_label}: {subject[:100]}", flush=True)
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "rounds": args.repeat, "systems": args.systems, "scenarios": args.scenarios,
        "quick": args.quick, "jobs": args.jobs, "history": args.history}
    rounds: dict[str, list[dict[str, Any]]] = {"work": [], "ref": []}
    seconds: dict[str, list[float]] = {"work": [], "ref": []}
    with ref_tree(sha) as tree, open_server(args) as (admin, where):
        ref = Side("ref", f"REF {ref_label}", tree)
        for side in (work, ref):
            probe(side)
        facts = server_facts(admin)
        meta |= {"server": where, "postgres": facts,
                 "work": {"tree": str(ROOT), "head": head, "uncommitted_files": dirty,
                          "imports": work.imports},
                 "ref": {"ref": args.against, "commit": sha, "subject": subject,
                         "tree": str(tree), "imports": ref.imports}}
        print(f"PostgreSQL {facts['server_version']}, fsync={facts['fsync']}, "
              f"synchronous_commit={facts['synchronous_commit']}; {args.repeat} round(s) "
              f"per side of {','.join(args.scenarios)} for {','.join(args.systems)}; "
              f"logs in {args.log_dir}", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="pgjournal-against-out-") as outs:
                for i in range(1, args.repeat + 1):
                    for side in (work, ref):
                        tag = f"[{side.key} {i}/{args.repeat}]"
                        print(f"{tag} {side.label}", flush=True)
                        log_dir = Path(args.log_dir) / f"{side.key}-{i}"
                        out = Path(outs) / f"{side.key}-{i}.json"
                        t = time.monotonic()
                        data = run_round(side, child_argv(args, side, admin, out, log_dir),
                                         tag, log_dir)
                        seconds[side.key].append(round(time.monotonic() - t, 1))
                        rounds[side.key].append(data)
                        print(f"{tag} done in {seconds[side.key][-1]:.0f}s", flush=True)
        finally:
            with contextlib.suppress(psycopg.Error):
                drop_databases(admin, args.db_prefix, args.systems)
    figures = compare(rounds)
    notes = [f"{key} round {i + 1}: {note}" for key in ("work", "ref")
             for i, data in enumerate(rounds[key]) for note in data.get("notes", [])]
    meta["seconds"] = round(time.monotonic() - t0, 1)
    Path(args.out).write_text(json.dumps({
        "meta": meta,
        "figures": [asdict(f) | {"ratios": f.ratios} for f in figures],
        "rounds": [{"side": key, "round": i + 1, "seconds": seconds[key][i],
                    "systems": data.get("meta", {}).get("systems", {}),
                    "results": data.get("results", []), "notes": data.get("notes", [])}
                   for i in range(args.repeat) for key in ("work", "ref")
                   for data in [rounds[key][i]]],
        "notes": notes}, indent=2, default=str))
    print(table(figures, ref_label, args.repeat))
    for note in notes:
        print(f"note: {note}")
    print(f"results written to {args.out} ({meta['seconds']}s)", flush=True)
    return 0
