"""The chaos harness, small: `python -m bench.chaos` with 40 runs of the core
workflow and the feature mix (child runs and cancel cascades, concurrency keys
at their limit with forks, a rate bucket, a per-second schedule with backfills,
concurrent start_many with overlapping keys, deadline repairs, prune and
maintain every few seconds), worker kills and pauses past the lease, and one server
kill -9 + restart, on its own throwaway embedded server; every check is read
from the database afterwards, each one a row whose count must be 0."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench import chaos_checks as checks

from .conftest import ROOT

# Every row of the checks table (bench/chaos_checks.py, plus X from the logs).
ROWS = {"1", "2a", "2b", "2c", "3a", "3b", "16", "P1", "P2", "C", "K", "F", "R", "S",
        "SM", "D", "N", "X"}


def chaos(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, object]]:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--runs", "40", "--seconds", "25",
         "--settle", "60", "--server-kills", "1", "--json", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    text = proc.stdout + proc.stderr
    assert out.exists(), text
    return proc.returncode, text, json.loads(out.read_text())


def violations(figures: dict[str, object]) -> dict[str, int]:
    inv = figures["invariants"]
    assert isinstance(inv, dict) and set(inv) == ROWS, inv
    return {k: int(v["violations"]) for k, v in inv.items()}


def test_chaos_small_without_pauses(tmp_path: Path) -> None:
    """Worker kill -9 and a server kill -9, every feature in the mix: every row
    of the checks table must be 0."""
    code, text, figures = chaos(tmp_path, "--no-pauses", "--seed", "7", "--backfill-slots", "100")
    faults = figures["faults"]
    assert isinstance(faults, dict)
    assert faults["worker_kills"] >= 2 and faults["server_kills"] == 1, text
    assert faults["signals_sent"] == 40, text
    inv = figures["invariants"]
    assert isinstance(inv, dict)
    # The mix really ran: children waited for, keys sampled, takes, slots, start_many.
    for label in ("P1", "P2", "K", "R", "S", "SM", "D"):
        assert inv[label]["checked"] > 0, (label, text)
    assert {k: v for k, v in violations(figures).items() if v} == {}, text
    assert code == 0, text


def test_chaos_small_with_pauses(tmp_path: Path) -> None:
    """Workers also paused past their lease (SIGSTOP, then SIGCONT). Every row but
    1 and 16 must be 0. 1 and 16 hold unless a pause lands right after the lease
    guard and before the step function is entered. The guard is checked on the
    event loop and again in the executor's thread just before a sync step is
    called; what remains is the window the README documents (close it with
    ``run.fencing_token``), so a hit there is an expected failure, not a pass."""
    code, text, figures = chaos(tmp_path, "--seed", "11")
    faults = figures["faults"]
    assert isinstance(faults, dict) and faults["worker_pauses"] >= 1, text
    bad = violations(figures)
    assert {k: v for k, v in bad.items() if v and k not in ("1", "16")} == {}, text
    if bad["1"] or bad["16"]:
        pytest.xfail("a step entered past its lease in the window right after the "
                     "guard:\n" + text)
    assert code == 0, text


# -- the checks themselves, on made-up rows: each must be able to fail -----------------


def fake(rows: list[tuple[object, ...]]) -> checks.Query:
    def q(query: str, *params: object) -> list[tuple[object, ...]]:
        return list(rows)
    return q


def test_rate_window_check_counts_a_window_over_capacity() -> None:
    """capacity 6, refill 4/s: 9 units ready within 0.2 s is over 6 + 4 x 0.25."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    paced = [(t0 + timedelta(seconds=i * 0.75), 3.0) for i in range(6)]
    assert checks.rate_windows(fake(paced), "api", 6, 4).violations == 0
    burst = [(t0 + timedelta(seconds=i * 0.1), 3.0) for i in range(3)]
    row = checks.rate_windows(fake(burst), "api", 6, 4)
    assert row.violations == 1 and row.checked == 3


def test_schedule_check_counts_missing_and_doubled_slots() -> None:
    lo = datetime(2026, 1, 1, tzinfo=UTC).timestamp()

    def slot(s: int) -> tuple[str]:
        return (datetime.fromtimestamp(lo + s, UTC).isoformat(),)

    whole = [slot(s) for s in range(1, 11)]
    assert checks.schedule_slots(fake(whole), "tick", lo, lo + 10, [], None).violations == 0
    holed = [slot(s) for s in range(1, 11) if s not in (4, 5)] + [slot(7)]
    row = checks.schedule_slots(fake(holed), "tick", lo, lo + 10, [], "IndexError")
    assert row.violations == 3 and row.bad[0][:2] == ("missing", 2)


def test_expected_end_check_allows_only_the_harness_cancels() -> None:
    """A racer cancelled by its parent's wait_first(cancel_rest=True) is expected;
    one whose parent did not ask for it is not; nor is a run left running."""
    rows = [("p1", "tree", "completed", None, None, None, {"kwargs": {"cancel_rest": True}}, 1),
            ("p2", "tree", "completed", None, None, None, {"kwargs": {"cancel_rest": False}}, 1),
            ("r1", "leaf", "cancelled", "p1", None, None, {"args": [101, 0.2]}, 1),
            ("r2", "leaf", "cancelled", "p2", None, None, {"args": [101, 0.2]}, 1),
            ("k1", "leaf", "cancelled", "p3", None, None, {"args": [1, 0.2]}, 1),
            ("x", "keyed", "running", None, None, None, {"kwargs": {}}, 1)]
    row = checks.runs_as_expected(fake(rows), cancelled={"p3"})
    assert [b[0] for b in row.bad] == ["r2", "x"]


def test_expected_end_check_allows_only_a_repair_that_missed_its_fresh_deadline() -> None:
    """A retried child that failed again by its deadline (attempt 2) and its
    parent are expected; a child the harness never retried, or one that failed
    for another reason, is not."""
    def kid(rid: str, parent: str, etype: str, attempt: int) -> tuple[Any, ...]:
        return (rid, "slowkid", "failed", parent, etype, "", {"args": [6.0]}, attempt)

    def par(rid: str) -> tuple[Any, ...]:
        return (rid, "deadliner", "failed", None, "ChildFailed", "", {"args": [3.0]}, 2)

    rows = [par("d1"), kid("s1", "d1", "TimeoutError", 2),     # repaired, missed again
            par("d2"), kid("s2", "d2", "TimeoutError", 1),     # never retried
            par("d3"), kid("s3", "d3", "ValueError", 2)]       # failed otherwise
    row = checks.runs_as_expected(fake(rows), cancelled=set(), retried={"s1", "s2", "s3"})
    assert sorted(b[0] for b in row.bad) == ["d2", "d3", "s2", "s3"]
    assert "1 repaired children" in row.what
