"""The ``pgjournal`` CLI, driven as a user would: subprocesses against real Postgres."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgjournal.cli import cli_query

ROOT = Path(__file__).resolve().parent.parent
DEMO_APP = "pgjournal._demo_app:app"

COMMANDS = ["migrate", "worker", "start", "runs", "show", "signal", "cancel", "retry",
            "queues", "workers", "prune", "maintain", "roles", "dev", "demo", "fork", "limits",
            "schedules", "metrics", "dashboard"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PGJOURNAL_DSN", "PGJOURNAL_SCHEMA", "PGJOURNAL_DEV_DATA")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgjournal", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env or clean_env(), timeout=timeout,
                          check=False)


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(pgjournal_dsn: str, pgjournal_schema: str) -> Cli:
    """Run a command against the test's schema; fails the test on a non-zero exit
    unless ``expect`` says otherwise."""
    return cli_for(pgjournal_dsn, pgjournal_schema)


def cli_for(pgjournal_dsn: str, pgjournal_schema: str) -> Cli:
    """The ``cli`` fixture's callable (other test modules build theirs with it)."""
    def call(*args: str, expect: int = 0, **kw: Any) -> subprocess.CompletedProcess[str]:
        res = run_cli("--dsn", pgjournal_dsn, "--schema", pgjournal_schema, *args, **kw)
        assert res.returncode == expect, (args, res.returncode, res.stdout, res.stderr)
        return res
    return call


@pytest.fixture
def db(pgjournal_dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def one_line_error(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A user error: status 1, one line on stderr naming the problem, no traceback."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pgjournal: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def wait_db(conn: psycopg.Connection[dict[str, Any]], query: str, params: Any = None,
            timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(query, params).fetchone()
        if row:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {query} {params}")
        time.sleep(0.05)


def cli_query_text(text: str, schema: str) -> Any:
    """Ad-hoc test SQL on the test's schema (quoted identifier)."""
    return psycopg.sql.SQL(text).format(schema=psycopg.sql.Identifier(schema))  # type: ignore[arg-type]


# -- help and offline commands ------------------------------------------------------


def test_every_command_has_help_with_examples() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert command in top.stdout
        res = run_cli(command, "--help")
        assert res.returncode == 0, res.stderr
        assert "examples:" in res.stdout and f"pgjournal {command}" in res.stdout, command


def test_migrate_sql_needs_no_database() -> None:
    res = run_cli("--dsn", "postgresql://nobody@127.0.0.1:1/none", "migrate", "--sql",
                  "--schema", "audit_jobs")
    assert res.returncode == 0, res.stderr
    assert 'CREATE SCHEMA IF NOT EXISTS "audit_jobs"' in res.stdout
    assert res.stdout.rstrip().endswith("COMMIT;")


def test_migrate_applies_then_reports_up_to_date(pgjournal_dsn: str,
                                                 db: psycopg.Connection[Any]) -> None:
    schema = f"cli_{uuid.uuid4().hex[:10]}"
    try:
        first = run_cli("migrate", "--dsn", pgjournal_dsn, "--schema", schema, "--json")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["applied"][0] == 1
        versions = [r["version"] for r in db.execute(
            cli_query_text("SELECT version FROM {schema}.migrations ORDER BY 1", schema))]
        assert versions == json.loads(first.stdout)["applied"]
        again = run_cli("migrate", "--dsn", pgjournal_dsn, "--schema", schema)
        assert again.returncode == 0
        assert "already up to date" in again.stdout
    finally:
        db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_roles_prints_the_script_for_the_schema() -> None:
    res = run_cli("roles", "--schema", "jobs_x")
    assert res.returncode == 0, res.stderr
    assert '"jobs_x"' in res.stdout or "jobs_x" in res.stdout
    assert "ROLE" in res.stdout.upper()


# -- bad input ----------------------------------------------------------------------


def test_unreachable_database_is_one_line() -> None:
    res = run_cli("--dsn", "postgresql://postgres@127.0.0.1:1/postgres", "runs")
    one_line_error(res, "cannot connect to postgresql://postgres@127.0.0.1:1/postgres")


def test_missing_schema_says_to_migrate(pgjournal_dsn: str) -> None:
    res = run_cli("--dsn", pgjournal_dsn, "--schema", "no_such_schema_here", "queues")
    one_line_error(res, "no_such_schema_here", "pgjournal migrate")


def test_invalid_schema_name_is_refused_before_sql(pgjournal_dsn: str) -> None:
    res = run_cli("--dsn", pgjournal_dsn, "--schema", 'x"; DROP TABLE y; --', "runs")
    one_line_error(res, "invalid schema name")


def test_bad_input_gets_one_clear_line(cli: Cli) -> None:
    one_line_error(cli("show", "not-a-uuid", expect=1), "not a run id")
    missing = str(uuid.uuid4())
    one_line_error(cli("show", missing, expect=1), missing, "does not exist")
    one_line_error(cli("signal", missing, "go", "{}", expect=1), "does not exist")
    one_line_error(cli("cancel", missing, expect=1), "does not exist")
    one_line_error(cli("retry", missing, expect=1), "does not exist")
    one_line_error(cli("start", "wf", "--args", "[1, 2", expect=1), "--args is not valid JSON")
    one_line_error(cli("start", "wf", "--args", '{"a": 1}', expect=1), "JSON array")
    one_line_error(cli("start", "wf", "--kwargs", "[1]", expect=1), "JSON object")
    one_line_error(cli("start", "nope", "--app", DEMO_APP, expect=1),
                   "no workflow 'nope'", "agent")
    one_line_error(cli("start", "x", "--app", "no_such_module_zz:app", expect=1),
                   "cannot import 'no_such_module_zz'")
    one_line_error(cli("start", "x", "--app", "pgjournal:nothing", expect=1),
                   "has no attribute 'nothing'")
    one_line_error(cli("start", "x", "--app", "pgjournal:migrate", expect=1),
                   "not a pgjournal.App")
    one_line_error(cli("runs", "--since", "yesterday", expect=1), "not a duration")
    one_line_error(cli("prune", "--older-than", "soon", expect=1), "not a duration")
    one_line_error(cli("queues", "limit", "q", "lots", expect=1), "not a number")
    one_line_error(cli("queues", "limit", "q", "0", expect=1), "queues pause")
    one_line_error(cli("queues", "pause", "bad-name", expect=1), "invalid queue name")
    run_id = cli("start", "wf", "--queue", "default").stdout.strip()
    one_line_error(cli("signal", run_id, "go", "{nope", expect=1), "payload is not valid JSON")
    one_line_error(cli("start", "wf", "--queue", "default", "--wait", "0.2", expect=1),
                   "did not end within 0.2s")
    # argparse's own usage errors exit with 2 and say what is wrong
    res = cli("runs", "--status", "sleepy", expect=2)
    assert "invalid choice: 'sleepy'" in res.stderr


# -- runs: start, list, show, signal, cancel, retry ---------------------------------


def test_start_then_list_and_filter(cli: Cli, db: psycopg.Connection[Any],
                                    pgjournal_schema: str) -> None:
    a = cli("start", "research", "--args", '["durable agents"]', "--kwargs",
            '{"depth": 2}', "--queue", "agents", "--priority", "5").stdout.strip()
    b = cli("start", "mail", "--queue", "default", "--idempotency-key", "k-1", "--json").stdout
    b_id = json.loads(b)["run_id"]
    again = cli("start", "mail", "--queue", "default", "--idempotency-key", "k-1")
    assert again.stdout.strip() == b_id
    row = db.execute(cli_query_text("SELECT * FROM {schema}.runs WHERE id = %s",
                                    pgjournal_schema), (a,)).fetchone()
    assert row["workflow"] == "research" and row["queue"] == "agents"
    assert row["priority"] == 5
    assert row["input"] == {"args": ["durable agents"], "kwargs": {"depth": 2}}

    listed = json.loads(cli("runs", "--json").stdout)
    assert [r["id"] for r in listed] == [b_id, a]  # newest first
    only = json.loads(cli("runs", "--workflow", "research", "--json").stdout)
    assert [r["id"] for r in only] == [a]
    assert json.loads(cli("runs", "--queue", "nowhere", "--json").stdout) == []
    assert len(json.loads(cli("runs", "--limit", "1", "--json").stdout)) == 1
    assert len(json.loads(cli("runs", "--since", "1h", "--json").stdout)) == 2
    db.execute(cli_query_text("UPDATE {schema}.runs SET created_at = now() - interval '2 days'"
                              " WHERE id = %s", pgjournal_schema), (a,))
    assert [r["id"] for r in json.loads(cli("runs", "--since", "1d", "--json").stdout)] == [
        b_id]

    table = cli("runs").stdout.splitlines()
    assert table[0].split()[:4] == ["RUN", "WORKFLOW", "QUEUE", "STATUS"]
    assert any(line.startswith(a) and "research" in line and "queued" in line
               for line in table[1:])

    shown = cli("show", a).stdout
    assert f"run {a}" in shown and "research" in shown and "[queued]" in shown
    assert "no steps journaled yet" in shown


def test_cancel_and_retry(cli: Cli, db: psycopg.Connection[Any], pgjournal_schema: str) -> None:
    run_id = cli("start", "never_served", "--queue", "default").stdout.strip()
    status = cli_query_text("SELECT status FROM {schema}.runs WHERE id = %s", pgjournal_schema)
    assert "cancelled" in cli("cancel", run_id).stdout
    assert db.execute(status, (run_id,)).fetchone()["status"] == "cancelled"
    assert "cancelled" in cli("cancel", run_id).stdout  # idempotent
    done = cli("start", "never_served", "--queue", "default").stdout.strip()
    db.execute(cli_query_text("UPDATE {schema}.runs SET status = 'completed', due_at = NULL, "
                              "finished_at = now() WHERE id = %s", pgjournal_schema), (done,))
    one_line_error(cli("cancel", done, expect=1), "already ended (completed)")
    one_line_error(cli("signal", run_id, "go", expect=1), "already ended")
    assert "queued again" in cli("retry", run_id).stdout
    assert db.execute(status, (run_id,)).fetchone()["status"] == "queued"
    one_line_error(cli("retry", run_id, expect=1), "only failed, dead or cancelled")


def test_worker_runs_a_workflow_signal_show_and_sigterm(
        cli: Cli, db: psycopg.Connection[Any], pgjournal_dsn: str, pgjournal_schema: str,
        tmp_path: Path) -> None:
    db.execute(cli_query("demo_setup", pgjournal_schema))
    log = tmp_path / "worker.log"
    with log.open("w") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgjournal", "worker", DEMO_APP, "--dsn", pgjournal_dsn,
             "--schema", pgjournal_schema, "--queue", "agents", "--concurrency", "2",
             "--lease", "5"], cwd=ROOT, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        run_id = cli("start", "agent", "--app", DEMO_APP, "--args", '["test the cli"]',
                     "--kwargs", '{"latency": 0.01, "cool_down": 0.2}').stdout.strip()
        runs = cli_query_text("SELECT * FROM {schema}.runs WHERE id = %s AND status = %s",
                              pgjournal_schema)
        wait_db(db, runs, (run_id, "suspended"))

        workers = json.loads(cli("workers", "--json").stdout)
        assert [w["pid"] for w in workers] == [worker.pid]
        assert workers[0]["queues"] == ["agents"] and workers[0]["runs_held"] == 0
        assert str(worker.pid) in cli("workers").stdout
        queues = {q["queue"]: q for q in json.loads(cli("queues", "--json").stdout)}
        assert queues["agents"]["suspended"] == 1 and queues["agents"]["queued_due"] == 0
        assert workers[0]["state"] == "alive"

        cli("signal", run_id, "approval", '{"approved": true, "by": "tester"}')
        wait_db(db, runs, (run_id, "completed"))

        data = json.loads(cli("show", run_id, "--json").stdout)
        names = [s["name"] for s in data["steps"]]
        assert names[0] == "plan" and names[-4:] == ["draft", "approval", "cool-down",
                                                     "publish"]
        assert data["signals"][0]["payload"] == {"approved": True, "by": "tester"}
        assert data["run"]["output"]["approved_by"] == "tester"
        assert [e["to_status"] for e in data["events"]][-1] == "completed"
        human = cli("show", run_id).stdout
        for fragment in ("[completed]", "steps", "draft", "chunks", "signals", "tester",
                         "events"):
            assert fragment in human, fragment

        # A signal sent before the run waits is kept; --wait prints the output.
        second = cli("start", "agent", "--app", DEMO_APP, "--idempotency-key", "second",
                     "--args", '["again"]', "--kwargs", '{"latency": 0.01, "cool_down": 0}'
                     ).stdout.strip()
        cli("signal", second, "approval", '{"by": "early"}')
        res = cli("start", "agent", "--app", DEMO_APP, "--idempotency-key", "second",
                  "--wait", "60", "--json")
        assert json.loads(res.stdout)["run_id"] == second
        assert json.loads(res.stdout)["output"]["approved_by"] == "early"

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    output = log.read_text()
    assert "serving queues agents" in output and "stopped" in output, output
    assert json.loads(cli("workers", "--json").stdout) == []
    stopped = json.loads(cli("workers", "--all", "--json").stdout)
    assert stopped[0]["pid"] == worker.pid and stopped[0]["stopped_at"] is not None


def test_worker_bad_app_is_one_line(cli: Cli) -> None:
    one_line_error(cli("worker", "nonexistent_mod_q:app", expect=1), "cannot import")
    one_line_error(cli("worker", "no-colon", expect=1), "module:attribute")


# -- queues, prune, dev -------------------------------------------------------------


def test_queues_depth_pause_resume_limit(cli: Cli, db: psycopg.Connection[Any],
                                         pgjournal_schema: str) -> None:
    for _ in range(2):
        cli("start", "wf", "--queue", "mail")
    cli("start", "wf", "--queue", "mail", "--delay", "3600")
    settings = cli_query_text("SELECT concurrency_limit, paused FROM {schema}.queues "
                              "WHERE name = 'mail'", pgjournal_schema)

    def queue() -> dict[str, Any]:
        rows = {q["queue"]: q for q in json.loads(cli("queues", "--json").stdout)}
        return rows["mail"]

    q = queue()
    assert (q["queued_due"], q["delayed"], q["running"], q["paused"]) == (2, 1, 0, False)
    assert q["oldest_due_age"] >= 0 and q["concurrency_limit"] is None

    assert "paused" in cli("queues", "pause", "mail").stdout
    assert db.execute(settings).fetchone() == {"concurrency_limit": None, "paused": True}
    cli("queues", "limit", "mail", "3")
    assert db.execute(settings).fetchone() == {"concurrency_limit": 3, "paused": True}
    cli("queues", "resume", "mail")
    assert db.execute(settings).fetchone() == {"concurrency_limit": 3, "paused": False}
    assert queue()["concurrency_limit"] == 3
    cli("queues", "limit", "mail", "none")
    assert db.execute(settings).fetchone() == {"concurrency_limit": None, "paused": False}
    human = cli("queues").stdout.splitlines()
    assert human[0].split()[0] == "QUEUE" and human[1].split()[:3] == ["mail", "2", "1"]
    res = cli("queues", "pause", expect=2)
    assert "needs a QUEUE" in res.stderr


def test_prune_deletes_only_old_ended_runs_in_batches(cli: Cli, db: psycopg.Connection[Any],
                                                      pgjournal_schema: str) -> None:
    def q(text: str) -> Any:
        return cli_query_text(text, pgjournal_schema)

    ids = {name: cli("start", "wf", "--queue", "default").stdout.strip() for name in
           ("old_done1", "old_done2", "old_failed", "old_cancelled", "new_done", "old_queued",
            "old_suspended")}
    for name in ("old_done1", "old_done2", "new_done"):
        db.execute(q("UPDATE {schema}.runs SET status = 'completed', due_at = NULL, "
                     "finished_at = now() WHERE id = %s"), (ids[name],))
    db.execute(q("UPDATE {schema}.runs SET status = 'failed', due_at = NULL, "
                 "finished_at = now() WHERE id = %s"), (ids["old_failed"],))
    cli("cancel", ids["old_cancelled"])
    db.execute(q("UPDATE {schema}.runs SET status = 'suspended', due_at = NULL, "
                 "wait_signal = 'x' WHERE id = %s"), (ids["old_suspended"],))
    db.execute(q("INSERT INTO {schema}.signals (run_id, name) VALUES (%s, 'kept')"),
               (ids["old_done1"],))
    old = [ids[n] for n in ids if n.startswith("old")]
    db.execute(q("UPDATE {schema}.runs SET created_at = now() - interval '40 days', "
                 "finished_at = CASE WHEN finished_at IS NULL THEN NULL "
                 "ELSE now() - interval '35 days' END WHERE id = ANY(%s::uuid[])"), (old,))

    dry = json.loads(cli("prune", "--older-than", "30d", "--dry-run", "--json").stdout)
    assert dry["matched"] == 4 and dry["deleted"] == 0
    assert db.execute(q("SELECT count(*) AS n FROM {schema}.runs")).fetchone()["n"] == 7

    res = cli("prune", "--older-than", "30d", "--status", "failed", "--status", "cancelled")
    assert "deleted 2 runs" in res.stdout
    res = cli("prune", "--older-than", "30d", "--batch-size", "1")
    assert "deleted 2 runs" in res.stdout
    assert "pruning runs" in res.stderr and "2/2" in res.stderr

    left = {r["id"] for r in db.execute(q("SELECT id::text FROM {schema}.runs"))}
    assert left == {ids["new_done"], ids["old_queued"], ids["old_suspended"]}
    orphans = db.execute(q(
        "SELECT (SELECT count(*) FROM {schema}.run_events e WHERE NOT EXISTS "
        "(SELECT 1 FROM {schema}.runs r WHERE r.id = e.run_id)) + "
        "(SELECT count(*) FROM {schema}.signals g WHERE NOT EXISTS "
        "(SELECT 1 FROM {schema}.runs r WHERE r.id = g.run_id)) AS n")).fetchone()["n"]
    assert orphans == 0
    res = cli("prune", "--older-than", "30d", "--status", "queued", expect=2)
    assert "invalid choice" in res.stderr


def test_dev_server_start_status_stop() -> None:
    data = Path(tempfile.mkdtemp(prefix="pgjournal-devtest-"))
    data.chmod(0o755)
    env = clean_env(PGJOURNAL_DEV_DATA=str(data / "dev"))
    try:
        res = run_cli("dev", "status", env=env)
        assert res.returncode == 3 and "not created yet" in res.stdout
        res = run_cli("dev", "start", env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        dsn = res.stdout.strip()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        status = json.loads(run_cli("dev", "status", "--json", env=env).stdout)
        assert status["running"] is True and status["dsn"] == dsn
        # No --dsn and no PGJOURNAL_DSN: commands use the dev server.
        assert run_cli("migrate", env=env).returncode == 0
        assert run_cli("runs", "--json", env=env).stdout.strip() == "[]"
        assert run_cli("dev", "stop", env=env).returncode == 0
        res = run_cli("dev", "status", env=env)
        assert res.returncode == 3 and "stopped" in res.stdout
    finally:
        run_cli("dev", "stop", env=env)
        shutil.rmtree(data, ignore_errors=True)


def test_options_after_the_command_and_from_env(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    run_id = run_cli("start", "wf", "--queue", "default", "--dsn", pgjournal_dsn, "--schema",
                     pgjournal_schema).stdout.strip()
    uuid.UUID(run_id)
    env = clean_env(PGJOURNAL_DSN=pgjournal_dsn, PGJOURNAL_SCHEMA=pgjournal_schema)
    listed = json.loads(run_cli("runs", "--json", env=env).stdout)
    assert [r["id"] for r in listed] == [run_id]


def test_prune_while_a_worker_works_never_touches_unfinished_runs(
        cli: Cli, db: psycopg.Connection[Any], pgjournal_dsn: str, pgjournal_schema: str,
        tmp_path: Path) -> None:
    db.execute(cli_query("demo_setup", pgjournal_schema))
    log = tmp_path / "worker.log"
    with log.open("w") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgjournal", "worker", DEMO_APP, "--dsn", pgjournal_dsn,
             "--schema", pgjournal_schema, "--concurrency", "4", "--lease", "5"],
            cwd=ROOT, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        ids = [cli("start", "agent", "--queue", "agents", "--args", f'["task {i}"]',
                   "--kwargs", '{"latency": 0.05, "cool_down": 0.3}').stdout.strip()
               for i in range(6)]
        waiting = cli_query_text("SELECT count(*) AS n FROM {schema}.runs WHERE status = "
                                 "'suspended' HAVING count(*) = 6", pgjournal_schema)
        wait_db(db, waiting)
        assert "deleted 0 runs" in cli("prune", "--older-than", "0s").stdout
        for run_id in ids:
            cli("signal", run_id, "approval", '{"by": "t"}')
        # Prune in a loop while the runs resume, sleep, publish and complete.
        pruned = 0
        deadline = time.monotonic() + 60
        while pruned < 6:
            assert time.monotonic() < deadline, f"only {pruned} pruned"
            res = json.loads(cli("prune", "--older-than", "0s", "--json").stdout)
            pruned += res["deleted"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    output = log.read_text()
    assert "lost the lease" not in output and "Traceback" not in output, output
    effects = db.execute(cli_query_text(
        "SELECT run_id::text, count(*) FILTER (WHERE step = 'publish') AS published "
        "FROM {schema}.demo_effects GROUP BY run_id", pgjournal_schema)).fetchall()
    assert {r["run_id"]: r["published"] for r in effects} == dict.fromkeys(ids, 1)


# -- issue 10: a newcomer's first hour ----------------------------------------------


def test_help_examples_are_dedented() -> None:
    for command in [*COMMANDS, "psql"]:
        res = run_cli(command, "--help")
        assert res.returncode == 0, res.stderr
        examples = res.stdout.split("examples:\n", 1)[1].splitlines()
        assert examples, command
        for line in examples:
            if line.strip():
                assert line.startswith("  ") and not line.startswith("   "), (command, line)


def test_prune_age_needs_a_unit(cli: Cli) -> None:
    one_line_error(cli("prune", "--older-than", "30", "--dry-run", expect=1),
                   "'30' has no unit", "30d")
    res = cli("prune", "--older-than", "30d", "--dry-run")
    assert "ended more than 30d ago would be deleted" in res.stdout


def test_queues_refuses_an_unseen_queue_unless_create(cli: Cli, pgjournal_dsn: str,
                                                      pgjournal_schema: str) -> None:
    one_line_error(cli("queues", "pause", "nosuchqueue", expect=1),
                   "'nosuchqueue' has never been seen", "--create")
    listing = cli("queues", "--json")
    assert "nosuchqueue" not in listing.stdout, "a refused pause created the queue"
    assert "paused" in cli("queues", "pause", "nosuchqueue", "--create").stdout
    assert "at most 1 run at once" in cli("queues", "limit", "nosuchqueue", "1").stdout
    # a queue that has runs is known without --create
    cli("start", "wf", "--queue", "mail")
    assert "resumed" in cli("queues", "resume", "mail").stdout


def test_connection_errors_keep_the_first_line_and_hide_the_password() -> None:
    res = run_cli("--dsn", "postgresql://bob:s3cret@127.0.0.1:1/db", "runs")
    one_line_error(res, "Connection refused", "port 1", "nothing listens there")
    assert "\t" not in res.stderr and "s3cret" not in res.stderr
    res = run_cli("--dsn", "postgresql://bob:s3cret@no-such-host.invalid/db", "runs")
    one_line_error(res, "no-such-host.invalid", "check the host name")
    assert "syntax" not in res.stderr and "s3cret" not in res.stderr


def test_bad_json_message_reads_cleanly(cli: Cli) -> None:
    res = cli("start", "wf", "--args", '["x', expect=1)
    one_line_error(res, "Unterminated string starting at column 2")
    assert "at at" not in res.stderr


def test_app_reads_pgjournal_schema_and_psql_opens_on_it(pgjournal_dsn: str,
                                                        pgjournal_schema: str) -> None:
    env = clean_env(PGJOURNAL_SCHEMA=pgjournal_schema, PGJOURNAL_DSN=pgjournal_dsn)
    res = subprocess.run([sys.executable, "-c", "import pgjournal; print(pgjournal.App().schema)"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert res.stdout.strip() == pgjournal_schema, res.stderr
    res = run_cli("psql", "--", "-Atc", "SHOW search_path", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f'"{pgjournal_schema}",public'
    res = run_cli("psql", "--", "-Atc", "SELECT count(*) FROM run_overview", env=env)
    assert res.returncode == 0 and res.stdout.strip() == "0", res.stderr


def test_require_dsn_refuses_the_dev_server_fallback() -> None:
    res = run_cli("runs", env=clean_env(PGJOURNAL_REQUIRE_DSN="1"))
    one_line_error(res, "PGJOURNAL_REQUIRE_DSN", "PGJOURNAL_DSN")
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "PGJOURNAL_REQUIRE_DSN=1" in dockerfile


def test_dev_data_and_psql_are_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "PGJOURNAL_DEV_DATA" in readme and "pgjournal psql" in readme
    assert "PGJOURNAL_DEV_DATA" in run_cli("dev", "--help").stdout


def test_roles_output_is_ready_for_psql(pgjournal_dsn: str, pgjournal_schema: str,
                                       db: psycopg.Connection[Any]) -> None:
    suffix = uuid.uuid4().hex[:8]
    worker, reader = f"pjw_{suffix}", f"pjr_{suffix}"
    res = run_cli("roles", "--schema", pgjournal_schema, "--worker-role", worker,
                  "--reader-role", reader)
    assert res.returncode == 0, res.stderr
    assert "--!" not in res.stdout and "Do not feed" not in res.stdout
    try:
        # `pgjournal roles | pgjournal psql`, as the output says
        piped = subprocess.run(
            [sys.executable, "-m", "pgjournal", "--dsn", pgjournal_dsn, "--schema",
             pgjournal_schema, "psql", "--", "-v", "ON_ERROR_STOP=1", "-q"],
            input=res.stdout, capture_output=True, text=True, cwd=ROOT, env=clean_env(),
            timeout=60, check=False)
        assert piped.returncode == 0, piped.stderr
        assert db.execute("SELECT count(*) AS n FROM pg_roles WHERE rolname IN (%s, %s)",
                          (worker, reader)).fetchone() == {"n": 2}
    finally:
        for role in (worker, reader):
            if db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                db.execute(f'DROP OWNED BY "{role}"')
                db.execute(f'DROP ROLE "{role}"')


def test_show_an_adapter_run_by_its_own_id(cli: Cli, pgjournal_dsn: str,
                                           pgjournal_schema: str) -> None:
    from pgjournal.adapters.run_store import PostgresRunStore, RunRecord, StepRecord

    original = f"order-{uuid.uuid4().hex[:6]}"
    store = PostgresRunStore(pgjournal_dsn, schema=pgjournal_schema)
    try:
        # The record's own created_at is later than the rows' database times.
        later = "2999-01-01T00:00:00+00:00"
        store.save_run(RunRecord(run_id=original, blueprint_name="checkout",
                                 created_at=later, updated_at=later))
        store.save_step(StepRecord(run_id=original, step_index=0, component="pay"))
    finally:
        store.close()
    res = cli("show", original)
    assert "checkout" in res.stdout and "pay" in res.stdout
    assert "+-" not in res.stdout, res.stdout
    one_line_error(cli("show", "order-none", expect=1), "not a run id", "adapter")


def test_result_timeout_names_the_run_its_status_and_the_workers(cli: Cli) -> None:
    res = cli("start", "wf", "--queue", "lonely", "--wait", "0.3", expect=1)
    one_line_error(res, "did not end within 0.3s", "'wf' is queued in queue 'lonely'",
                   "no live worker serves that queue")


def test_demo_refuses_politely_while_another_demo_runs(pgjournal_dsn: str,
                                                       db: psycopg.Connection[Any]) -> None:
    schema = f"demo_{uuid.uuid4().hex[:8]}"
    got = db.execute(cli_query("demo_lock", schema), {"schema": schema}).fetchone()
    assert got is not None and got["got"]
    try:
        res = run_cli("demo", "--short", "--dsn", pgjournal_dsn, "--schema", schema)
        one_line_error(res, "another pgjournal demo is running", schema)
        assert db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                          (schema,)).fetchone() is None, "the refused demo touched the schema"
    finally:
        db.execute("SELECT pg_advisory_unlock_all()")


def test_start_without_app_uses_the_queue_a_live_worker_serves_or_refuses(
        cli: Cli, db: psycopg.Connection[Any], pgjournal_dsn: str, pgjournal_schema: str,
        tmp_path: Path) -> None:
    # No live worker: a typo (or a worker not deployed yet) is refused with a hint.
    refused = cli("start", "agent", expect=1)
    one_line_error(refused, "no live worker knows workflow 'agent'", "--queue")
    db.execute(cli_query("demo_setup", pgjournal_schema))
    log = tmp_path / "worker.log"
    with log.open("w") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgjournal", "worker", DEMO_APP, "--dsn", pgjournal_dsn,
             "--schema", pgjournal_schema, "--queue", "agents", "--lease", "5"],
            cwd=ROOT, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        alive = cli_query_text("SELECT 1 FROM {schema}.worker_health WHERE state = 'alive' "
                               "AND workflow_queues ? 'agent'", pgjournal_schema)
        wait_db(db, alive)
        one_line_error(cli("start", "agnet", expect=1), "did you mean 'agent'")
        run_id = cli("start", "agent", "--args", '["cli"]', "--kwargs",
                     '{"latency": 0.01, "cool_down": 0.1}').stdout.strip()
        row = db.execute(cli_query_text("SELECT queue FROM {schema}.runs WHERE id = %s",
                                        pgjournal_schema), (run_id,)).fetchone()
        assert row["queue"] == "agents"     # the worker's queue, not 'default'
        workers = cli("workers").stdout
        assert "WORKFLOWS" in workers and "agent" in workers
        # A run no live worker can take shows up under `queues`.
        cli("start", "agent_v2", "--queue", "agents")
        assert "workflow 'agent_v2' on queue agents, which no live worker knows" in \
            cli("queues").stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


def test_signal_with_an_idempotency_key_is_sent_once(cli: Cli, db: psycopg.Connection[Any],
                                                      pgjournal_schema: str) -> None:
    run_id = cli("start", "waits", "--queue", "default").stdout.strip()
    for _ in range(3):   # a client retrying after a lost connection
        cli("signal", run_id, "approval", '{"ok": true}', "--idempotency-key", "review-7")
    cli("signal", run_id, "approval", '{"ok": false}')
    sent = db.execute(cli_query_text("SELECT payload::text AS p FROM {schema}.signals "
                                     "WHERE run_id = %s ORDER BY id", pgjournal_schema),
                      (run_id,)).fetchall()
    assert [s["p"] for s in sent] == ['{"ok":true}', '{"ok":false}']  # the text as sent
