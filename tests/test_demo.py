"""``pgjournal demo --short``: the README's first command, as CI runs it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgjournal.cli import cli_query
from pgjournal.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent


def run_demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGJOURNAL_DSN",
                                                            "PGJOURNAL_SCHEMA")}
    return subprocess.run([sys.executable, "-m", "pgjournal", "demo", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
                          check=False)


def gone(pid: int) -> bool:
    """True when the process no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


@pytest.fixture
def demo_schema(pgjournal_dsn: str) -> Iterator[str]:
    schema = f"demo_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_demo_short_kills_a_worker_and_no_step_runs_twice(pgjournal_dsn: str,
                                                          demo_schema: str) -> None:
    res = run_demo("--short", "--dsn", pgjournal_dsn, "--schema", demo_schema)
    out = res.stdout
    assert res.returncode == 0, (out, res.stderr)

    m = re.search(r"^no step executed twice: (\d+) steps, (\d+) executions$", out, re.M)
    assert m, out
    steps, executions = int(m.group(1)), int(m.group(2))
    assert steps == executions and steps > 0
    assert re.search(r"killed worker #\d \(pid \d+\) with SIGKILL", out), out
    assert "SELECT" in out and f'"{demo_schema}".steps' in out  # the SQL for a DBA
    assert f"pgjournal psql --schema {demo_schema}" in out        # and where psql is
    # the recovery counter reads as a running total, not as separate events
    assert re.search(r"recovered so far: \d+ runs? in total", out), out

    pids = [int(p) for p in re.search(r"pids ([\d, ]+)\)", out).group(1).split(", ")]  # type: ignore[union-attr]
    assert len(pids) == 3
    assert all(gone(pid) for pid in pids), "the demo left a worker process behind"

    # The database agrees with what the demo printed.
    def q(text: str) -> Any:
        return sql.SQL(text).format(schema=sql.Identifier(demo_schema))  # type: ignore[arg-type]

    with psycopg.connect(pgjournal_dsn) as conn:
        statuses = dict(conn.execute(q(
            "SELECT status, count(*) FROM {schema}.runs GROUP BY status")).fetchall())
        assert statuses == {"completed": 12}
        recovered = conn.execute(q(
            "SELECT count(*) FROM {schema}.runs WHERE recoveries > 0")).fetchone()
        assert recovered is not None and recovered[0] >= 1
        journal = conn.execute(q(
            "SELECT count(*) FROM {schema}.steps WHERE kind IN ('step', 'stream')"
            " AND status = 'completed'")).fetchone()
        effects = conn.execute(q("SELECT count(*), count(DISTINCT (run_id, step)) "
                                 "FROM {schema}.demo_effects")).fetchone()
        assert journal is not None and effects is not None
        assert journal[0] == steps and effects == (executions, executions)
        # The two survivors were stopped cleanly (SIGTERM); only the killed one was not.
        unstopped = conn.execute(q("SELECT count(*) FILTER (WHERE stopped_at IS NULL), "
                                   "count(*) FROM {schema}.workers")).fetchone()
        assert unstopped == (1, 3)


def test_demo_refuses_a_schema_that_is_not_its_own(pgjournal_dsn: str,
                                                   pgjournal_schema: str) -> None:
    res = run_demo("--short", "--dsn", pgjournal_dsn, "--schema", pgjournal_schema)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"pgjournal: error: schema {pgjournal_schema!r} already holds tables that are not "
        "the demo's; the demo resets its schema, so pick another one with --schema"]


def test_demo_on_a_fresh_machine_uses_the_embedded_server_and_stops_it() -> None:
    """No DSN anywhere: the demo creates the embedded dev server, and stops it again."""
    base = Path(tempfile.mkdtemp(prefix="pgjournal-demo-dev-"))
    base.chmod(0o755)  # as root the server runs as another user, which must get in
    data = base / "dev"
    env = {k: v for k, v in os.environ.items() if k not in ("PGJOURNAL_DSN",
                                                            "PGJOURNAL_SCHEMA")}
    env["PGJOURNAL_DEV_DATA"] = str(data)
    try:
        res = subprocess.run([sys.executable, "-m", "pgjournal", "demo", "--short"],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=240,
                             check=False)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert "starting the embedded PostgreSQL" in res.stdout
        assert re.search(r"^no step executed twice: (\d+) steps, \1 executions$", res.stdout,
                         re.M), res.stdout
        assert (data / "PG_VERSION").exists()
        assert not (data / "postmaster.pid").exists(), "the demo left its server running"
    finally:
        EmbeddedServer(data).stop()
        shutil.rmtree(base, ignore_errors=True)


def test_demo_with_external_workers_keeps_the_schema(pgjournal_dsn: str, pgjournal_schema: str,
                                                     tmp_path: Path) -> None:
    """``--workers 0`` (docker compose): workers started elsewhere serve the demo's runs."""
    env = {**os.environ, "PGJOURNAL_DSN": pgjournal_dsn, "PGJOURNAL_SCHEMA": pgjournal_schema}
    workers = []
    for n in range(2):
        with (tmp_path / f"w{n}.log").open("w") as log:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "pgjournal", "worker", "pgjournal._demo_app:app",
                 "--lease", "2"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        res = run_demo("--short", "--workers", "0", "--runs", "6", "--dsn", pgjournal_dsn,
                       "--schema", pgjournal_schema)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert re.search(r"^no step executed twice: (\d+) steps, \1 executions$", res.stdout,
                         re.M), res.stdout
        assert "killed" not in res.stdout
        assert all(w.poll() is None for w in workers), "the demo must not touch them"
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
    with psycopg.connect(pgjournal_dsn) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE status = 'completed'), "
                                   "count(*) FROM {}.runs").format(
                                       sql.Identifier(pgjournal_schema))).fetchone()
        assert row == (6, 6)


def test_demo_stopped_midway_takes_its_workers_with_it(pgjournal_dsn: str, demo_schema: str,
                                                      tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PGJOURNAL_DSN",
                                                            "PGJOURNAL_SCHEMA")}
    out = tmp_path / "demo.out"
    with out.open("w") as fh:
        demo = subprocess.Popen([sys.executable, "-m", "pgjournal", "demo", "--no-kill",
                                 "--dsn", pgjournal_dsn, "--schema", demo_schema],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"pids ([\d, ]+)\)", out.read_text())):
            assert demo.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        pids = [int(p) for p in m.group(1).split(", ")]
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 128 + signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
    assert all(gone(pid) for pid in pids), out.read_text()


def test_demo_check_catches_a_step_that_ran_twice(pgjournal_dsn: str, pgjournal_schema: str,
                                                  tmp_path: Path) -> None:
    """The verdict is computed, not printed: a duplicated side effect fails the demo."""
    env = {**os.environ, "PGJOURNAL_DSN": pgjournal_dsn, "PGJOURNAL_SCHEMA": pgjournal_schema}
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(cli_query("demo_setup", pgjournal_schema))
    with (tmp_path / "w.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgjournal", "worker", "pgjournal._demo_app:app"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    out = tmp_path / "demo.out"
    try:
        with out.open("w") as fh:
            demo = subprocess.Popen(
                [sys.executable, "-m", "pgjournal", "demo", "--short", "--workers", "0",
                 "--runs", "2", "--dsn", pgjournal_dsn, "--schema", pgjournal_schema],
                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        effects = sql.Identifier(pgjournal_schema, "demo_effects")
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while True:
                dup = conn.execute(sql.SQL(
                    "INSERT INTO {} (run_id, step, pid) SELECT run_id, step, 0 FROM {} "
                    "WHERE step = 'plan' LIMIT 1 RETURNING run_id").format(effects, effects))
                row = dup.fetchone()
                if row:
                    break
                assert time.monotonic() < deadline and demo.poll() is None, out.read_text()
                time.sleep(0.05)
        assert demo.wait(60) == 1, out.read_text()
    finally:
        worker.terminate()
        worker.wait(30)
    text = out.read_text()
    assert "no step executed twice" not in text
    assert f"step 'plan' of run {row[0]} ran 2 times" in text, text
