"""The chaos harness, small: `python -m bench.chaos` with 40 runs of the core
workflow and the feature mix (child runs and cancel cascades, concurrency keys
at their limit with forks, a rate bucket, a per-second schedule with backfills,
concurrent start_many with overlapping keys, deadline repairs, prune and
maintain every 2 s), worker kills and pauses past the lease, and one server
kill -9 + restart, on its own throwaway embedded server; every check is read
from the database afterwards, each one a row whose count must be 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
