"""The benchmark harness must not rot: drive its scenarios tiny, on real Postgres.

No timing is asserted (the machine is shared); what is asserted is what the
harness relies on: every enqueued job ends as done in the database, worker
processes report one latency per timed job, and the S5 recovery scenario
really kills a worker inside step 2 without step 1 running again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench import against
from bench import scenarios as sc
from bench.adapters import load
from bench.adapters.base import MODE_NOOP, MODE_STEPS
from bench.cli import Report, Result, fresh_database, tables
from bench.procs import ROOT


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


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
                    *args], cwd=cwd, check=True, capture_output=True)


def test_against_head_prints_a_ratio_per_figure(pgjournal_dsn: str, tmp_path: Path) -> None:
    """``bench --against HEAD`` at a tiny size: both trees measured, each with its
    own pgjournal package, one ratio row per figure, and the REF's worktree and
    both sides' databases gone afterwards.

    It runs in a clone of this repository holding this working tree's code,
    whose HEAD commit marks pgjournal's version and whose working tree takes
    the mark back (uncommitted): the version each side's bench process
    reports shows whose package it imported."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: --against needs the repository's history")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--shared", str(ROOT), str(clone))
    for name in ("bench", "pgjournal", "sql"):
        shutil.copytree(ROOT / name, clone / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "results*.json"))
    git(clone, "add", "-A")
    git(clone, "commit", "--quiet", "--allow-empty", "-m", "this working tree")
    init = clone / "pgjournal" / "__init__.py"
    unmarked = init.read_text()
    init.write_text(unmarked + '\n__version__ = "0.0.0+ref-mark"\n')
    git(clone, "commit", "--quiet", "-am", "mark the version")
    init.write_text(unmarked)

    prefix = f"bench_ag_{uuid.uuid4().hex[:8]}_"
    out = tmp_path / "against.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--against", "HEAD", "--dsn", pgjournal_dsn,
         "--db-prefix", prefix, "--systems", "pgjournal", "--scenarios", "S1,S2",
         "--quick", "--jobs", "500", "--repeat", "1", "--out", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=clone, env={**os.environ, "PYTHONPATH": str(clone)}, capture_output=True,
        text=True, timeout=240)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    figures = {(f["scenario"], f["case"]): f for f in data["figures"]}
    assert set(figures) == {("S1", "one at a time"), ("S1", "batches of 500"),
                            ("S2", "drain, 1 process"), ("S2", "drain, 2 processes")}
    rows = [line for line in done.stdout.splitlines() if line.startswith("| S")]
    for (scenario, case), f in figures.items():
        assert len(f["work"]) == len(f["ref"]) == 1 and f["work"][0] > 0 and f["ref"][0] > 0
        row = next(r for r in rows if r.startswith(f"| {scenario} | {case} | pgjournal |"))
        assert f"| {f['ratios'][0]:.2f}x |" in row and "higher is better" in row
    versions = {r["side"]: r["systems"]["pgjournal"]["version"] for r in data["rounds"]}
    assert versions["ref"] == "0.0.0+ref-mark" != versions["work"]
    ref_tree = Path(data["meta"]["ref"]["tree"])
    assert Path(data["meta"]["ref"]["imports"]["pgjournal"]).is_relative_to(ref_tree)
    assert Path(data["meta"]["work"]["imports"]["pgjournal"]).is_relative_to(clone)
    assert not ref_tree.exists()
    listed = subprocess.run(["git", "worktree", "list"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert str(ref_tree) not in listed
    assert count(pgjournal_dsn, "SELECT count(*) FROM pg_database "
                                f"WHERE datname LIKE '{prefix}%'") == 0


def test_against_an_unknown_ref_is_one_line() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: --against needs the repository's history")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--against", "no-such-ref-xyz", "--dsn", "host=nowhere"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "python -m bench --against: unknown ref 'no-such-ref-xyz' (not a commit in "
        f"{ROOT})"]


def test_against_says_what_a_refs_bench_lacks(tmp_path: Path) -> None:
    """A REF without a bench, or whose bench refuses the options, is named with
    its reason, not a traceback."""
    side = against.Side("ref", "REF old", tmp_path)
    with pytest.raises(against.AgainstError, match="REF old has no bench"):
        against.probe(side)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "__main__.py").write_text(
        "import sys\nsys.exit('python -m bench: error: unrecognized arguments: --db-prefix')\n")
    argv = [sys.executable, "-m", "bench", "--out", str(tmp_path / "out.json")]
    with pytest.raises(against.AgainstError) as caught:
        against.run_round(side, argv, "[ref 1/1]", tmp_path / "logs")
    assert str(caught.value).startswith(
        "REF old's bench failed in round [ref 1/1] (exit 1): python -m bench: error: "
        "unrecognized arguments: --db-prefix (see ")


def test_against_ratios_pair_rounds_and_say_which_way_is_better() -> None:
    def result(scenario: str, case: str, value: float, higher: bool) -> dict[str, object]:
        return {"scenario": scenario, "case": case, "system": "pgjournal", "metric": "m",
                "unit": "u", "higher_is_better": higher, "values": [value]}

    rounds = {"work": [{"results": [result("S2", "drain", 200, True),
                                    result("S3", "p50", 2.0, False)]},
                       {"results": [result("S2", "drain", 90, True),
                                    result("S3", "p50", 1.0, False)]},
                       {"results": [result("S2", "drain", 330, True)]}],
              "ref": [{"results": [result("S2", "drain", 100, True),
                                   result("S3", "p50", 4.0, False)]},
                      {"results": [result("S2", "drain", 100, True),
                                   result("S3", "p50", 2.0, False)]},
                      {"results": [result("S2", "drain", 300, True),
                                   result("S3", "p50", 3.0, False)]}]}
    drain, p50 = against.compare(rounds)
    assert drain.ratios == pytest.approx([2.0, 0.9, 1.1])
    assert drain.better_rounds() == 2
    assert against.ratio_line(drain).endswith(
        "| 200 u | 100 u | 1.10x | 0.90 / 1.10 / 2.00 | higher is better | 2 of 3 |")
    assert p50.ratios == [0.5, 0.5]  # round 3 has no working-tree figure
    assert against.ratio_line(p50).endswith("| 0.50x | 0.50 / 0.50 / 0.50 | lower is better "
                                            "| 2 of 2 |")
    missing = against.compare({"work": [{"results": [result("S9", "new", 1.0, True)]}],
                               "ref": [{"results": []}]})
    assert "n/a (missing on REF)" in against.ratio_line(missing[0])
