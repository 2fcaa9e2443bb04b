"""The overload benchmark (bench/overload.py) must not rot: run it tiny.

No timing is asserted (the machine is shared): only that the harness offers
runs, kills a worker, and reads back every figure it reports from the
database (timers that fired, runs the killed worker held, new runs' waits).
bench/README.md has the real figures, before and after migration 0020.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import psycopg

from bench import overload


def test_overload_bench_runs_tiny(pgjournal_dsn: str, tmp_path: Path) -> None:
    schema = f"bench_overload_{uuid.uuid4().hex[:10]}"
    out = tmp_path / "figures.json"
    try:
        f = overload.main(["--dsn", pgjournal_dsn, "--schema", schema, "--seconds", "7",
                           "--workers", "2", "--concurrency", "2", "--work", "0.5",
                           "--sleep", "0.5", "--kill-every", "3", "--lease", "1",
                           "--poll", "0.5", "--json", str(out)])
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(
                pgjournal_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert out.exists()
    assert f["offered"] > 0 and f["completed"] > 0
    assert f["kills"] >= 1
    assert f["timer_lateness_s"]["n"] + f["timers_due_not_fired"]["n"] > 0
    assert f["takeover_s"]["n"] + f["not_taken_over"]["n"] > 0, "the killed workers held no run"
    assert f["new_run_wait_s"]["n"] > 0
