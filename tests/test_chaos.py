"""The chaos harness, small: `python -m bench.chaos` with 40 runs, worker kills and
pauses past the lease, and one server kill -9 + restart, on its own throwaway
embedded server; every invariant is checked from the database afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def chaos(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, object]]:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--runs", "40", "--seconds", "25",
         "--settle", "60", "--server-kills", "1", "--json", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    text = proc.stdout + proc.stderr
    assert out.exists(), text
    return proc.returncode, text, json.loads(out.read_text())


def test_chaos_small_without_pauses(tmp_path: Path) -> None:
    """Worker kill -9 and a server kill -9, parallel steps included: every
    invariant must hold."""
    code, text, figures = chaos(tmp_path, "--no-pauses", "--seed", "7")
    faults = figures["faults"]
    assert isinstance(faults, dict)
    assert faults["worker_kills"] >= 2 and faults["server_kills"] == 1, text
    assert faults["signals_sent"] == 40, text
    assert code == 0, text


def test_chaos_small_with_pauses(tmp_path: Path) -> None:
    """Workers also paused past their lease (SIGSTOP, then SIGCONT). 2 and 3 must
    hold. 1 and 16 hold unless a pause lands right after the lease guard and before
    the step function is entered. The guard is checked on the event loop and again
    in the executor's thread just before a sync step is called (before that, a
    pause or a busy thread pool let a stale worker enter the step about once in 4
    runs); what remains is the window the README documents (close it with
    ``run.fencing_token``), so a hit there is an expected failure, not a pass."""
    code, text, figures = chaos(tmp_path, "--seed", "11")
    inv = figures["invariants"]
    assert isinstance(inv, dict)
    faults = figures["faults"]
    assert isinstance(faults, dict) and faults["worker_pauses"] >= 1, text
    assert {k: v["violations"] for k, v in inv.items() if k[0] in "23"} == {
        "2a": 0, "2b": 0, "2c": 0, "3a": 0, "3b": 0}, text
    if inv["1"]["violations"] or inv["16"]["violations"]:
        pytest.xfail("a step entered past its lease in the window right after the "
                     "guard:\n" + text)
    assert code == 0, text
