"""What a newcomer hit in their first hour (issue 21's frictions), each as a
test that failed on the code they tried."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgjournal
from pgjournal.serializer import Serializer

from .test_cli import Cli, clean_env, cli_for, run_cli


@pytest.fixture
def cli(pgjournal_dsn: str, pgjournal_schema: str) -> Cli:
    return cli_for(pgjournal_dsn, pgjournal_schema)


jobs = pgjournal.App()   # a module-level app, as in the newcomer's project


@jobs.workflow(queue="agents")
async def summarize(run: pgjournal.Run, text: str) -> str:
    return await run.step("shorten", lambda: text[:5])


@jobs.workflow(queue="agents")
async def priced(run: pgjournal.Run) -> dict[str, Any]:
    return {"item": "tea", "cost": Decimal("1.50")}   # not JSON: the run fails


async def test_client_without_queue_uses_the_queue_the_live_worker_serves(
        pgjournal_worker: Any, pgjournal_app: pgjournal.App) -> None:
    """`pgjournal_app.start("summarize")` went to `default` while the worker served
    `agents`: the test hung, then said no live worker served the queue."""
    await pgjournal_worker(jobs)
    handle = await pgjournal_app.start("summarize", "durable agents")
    assert await handle.result(timeout=20) == "durab"
    info = await handle.info()
    assert info["queue"] == "agents"


async def test_client_refuses_a_workflow_served_on_several_queues(
        pgjournal_worker: Any, pgjournal_app: pgjournal.App) -> None:
    await pgjournal_worker(jobs)
    elsewhere = pgjournal.App()

    @elsewhere.workflow(name="summarize", queue="batch")
    async def summarize_batch(run: pgjournal.Run, text: str) -> str:
        return text

    await pgjournal_worker(elsewhere)
    with pytest.raises(pgjournal.ConfigurationError, match=r"several queues \(agents, batch\)"):
        await pgjournal_app.start("summarize", "x")
    handle = await pgjournal_app.start("summarize", "x", queue="batch")   # chosen: fine
    assert await handle.result(timeout=20) == "x"


async def test_show_prints_the_useful_end_of_an_error_and_why_no_steps(
        pgjournal_worker: Any, cli: Cli) -> None:
    app = await pgjournal_worker(jobs)
    handle = await app.start("priced")
    with pytest.raises(pgjournal.RunFailed):
        await handle.result(timeout=20)
    out = cli("show", str(handle.run_id)).stdout
    assert "$.cost is of type Decimal" in out, out       # only in --json before
    assert "no steps journaled yet" not in out
    assert "no steps journaled: the run ended (failed) before its first journal entry" in out


def test_pickle_opt_in_is_named_as_the_readme_names_it() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "App(..., allow_pickle=True)" in readme or "allow_pickle=True" in readme
    ser = Serializer()
    with pytest.raises(pgjournal.SerializationError) as result:
        ser.dumps({"when": object()}, what="result of step 'x'")
    assert "return JSON data" in str(result.value)
    assert "App(..., allow_pickle=True)" in str(result.value)
    with pytest.raises(pgjournal.SerializationError) as bad_input:
        ser.dumps({"args": [object()]}, what="input of workflow 'x'")
    assert "pass JSON data" in str(bad_input.value), bad_input.value   # not "return"
    assert "return JSON" not in str(bad_input.value)


def test_psql_passes_its_own_options_through(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    res = run_cli("--dsn", pgjournal_dsn, "--schema", pgjournal_schema, "psql", "-At",
                  "-c", "SELECT count(*) FROM run_overview")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"
    res = run_cli("--dsn", pgjournal_dsn, "runs", "--no-such-option")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-option" in res.stderr


def test_show_and_cancel_take_the_short_id_the_dashboard_shows(
        cli: Cli, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    run_id = cli("start", "never_served", "--queue", "default").stdout.strip()
    short = run_id[:8]
    assert run_id in cli("show", short).stdout
    # Two runs sharing a prefix: refused, naming both.
    other = uuid.UUID(run_id[:8] + "0" * 24)
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as db:
        db.execute(psycopg.sql.SQL(
            "INSERT INTO {}.runs (id, workflow, queue, input, status, due_at) "
            "VALUES (%s, 'never_served', 'default', '{{}}', 'queued', now())").format(
                psycopg.sql.Identifier(pgjournal_schema)), (other,))
    res = cli("show", short, expect=1)
    assert "start of several run ids" in res.stderr and str(other) in res.stderr
    # A run with no children is cancelled without claiming any.
    res = cli("cancel", run_id[:13])
    assert res.stdout.strip() == f"run {run_id} cancelled", res.stdout


def test_dev_server_fallback_warns_once_with_the_word_warning() -> None:
    """The README promises a WARNING; the CLI printed none (logging not set up)
    and the dashboard's two DSN look-ups printed the notice twice."""
    data = Path(tempfile.mkdtemp(prefix="pgjournal-devwarn-"))
    data.chmod(0o755)
    env = clean_env(PGJOURNAL_DEV_DATA=str(data / "dev"))
    try:
        res = run_cli("queues", env=env, timeout=180)   # schema missing: exit 1 is fine
        warnings = [line for line in res.stderr.splitlines() if "embedded dev server" in line]
        assert len(warnings) == 1 and warnings[0].startswith("WARNING: pgjournal: "), res.stderr
        code = ("from pgjournal.connect import resolve_dsn\n"
                "assert resolve_dsn() == resolve_dsn()\n")
        import subprocess
        import sys
        res2 = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert res2.returncode == 0, res2.stderr
        assert res2.stderr.count("embedded dev server") == 1, res2.stderr
    finally:
        run_cli("dev", "stop", env=env)
        shutil.rmtree(data, ignore_errors=True)
