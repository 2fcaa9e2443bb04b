"""Bad input gets one clear error, before any SQL runs where possible, and nothing half-written."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psycopg
import pytest
from pydantic import BaseModel

import pgjournal
from pgjournal.embedded import EmbeddedServer


@pytest.mark.parametrize("name", ["a;drop", "", "x" * 64, "1abc", "bad-name", "a b", 'q"'])
def test_invalid_schema_names_rejected_before_sql(name: str) -> None:
    with pytest.raises(ValueError, match="invalid schema name"):
        pgjournal.App("postgresql://nobody@127.0.0.1:1/none", schema=name)
    with pytest.raises(ValueError, match="invalid schema name"):
        pgjournal.migrate("postgresql://nobody@127.0.0.1:1/none", schema=name)


def test_journal_budget_must_be_positive() -> None:
    with pytest.raises(pgjournal.ConfigurationError, match="max_journal_bytes"):
        pgjournal.App("postgresql://nobody@127.0.0.1:1/none", max_journal_bytes=0)


def test_invalid_queue_name_rejected() -> None:
    app = pgjournal.App("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="invalid queue name"):
        app.workflow(queue="q;drop")


def test_unreachable_host_is_one_clear_line() -> None:
    dsn = "postgresql://someone:s3cret@127.0.0.1:1/db"
    with pytest.raises(pgjournal.DatabaseUnavailable) as info:
        pgjournal.migrate(dsn)
    msg = str(info.value)
    assert "s3cret" not in msg and "***" in msg
    assert "127.0.0.1:1" in msg and "check that the server is running" in msg
    assert "\n" not in msg


async def test_nonexistent_database(pgjournal_dsn: str) -> None:
    dsn = pgjournal_dsn.rsplit("/", 1)[0] + "/no_such_db_here"
    app = pgjournal.App(dsn)
    with pytest.raises(pgjournal.DatabaseUnavailable,
                       match=r"no_such_db_here.*create the database"):
        await app.store()


def test_wrong_password(pgjournal_server_factory) -> None:  # type: ignore[no-untyped-def]
    server: EmbeddedServer = pgjournal_server_factory()
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute("CREATE ROLE pw_user LOGIN PASSWORD 'right'")
    hba = Path(server.data_dir) / "pg_hba.conf"
    hba.write_text("host all pw_user 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    dsn = f"postgresql://pw_user:wrong@127.0.0.1:{server.port}/postgres"
    with pytest.raises(pgjournal.DatabaseUnavailable) as info:
        pgjournal.migrate(dsn)
    msg = str(info.value)
    assert "password" in msg and "wrong" not in msg.replace("pw_user", "")


async def _run_one(app: pgjournal.App, name: str, *args: object) -> pgjournal.RunHandle:
    worker = pgjournal.Worker(app, concurrency=1, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        handle = await app.start(name, *args)
        with pytest.raises(pgjournal.RunFailed) as info:
            await handle.result(timeout=20)
        handle.error = info.value.error  # type: ignore[attr-defined]
        return handle
    finally:
        worker.stop()
        await task


async def test_unserializable_step_result_names_step_and_type(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    class Opaque:
        pass

    @app.workflow(max_attempts=3)
    async def bad(run: pgjournal.Run) -> None:
        await run.step("ok", lambda: 1)
        await run.step("returns-object", Opaque)

    handle = await _run_one(app, "bad")
    err = handle.error  # type: ignore[attr-defined]
    assert err["type"] == "SerializationError"
    assert "returns-object" in err["message"] and "Opaque" in err["message"]
    info = await handle.info()
    assert info["attempt"] == 1, "a serialization error is not retried"
    steps = await (await app.store()).get_steps(handle.run_id)
    assert [s["name"] for s in steps] == ["ok"], "nothing half-written"


async def test_value_over_size_limit_is_refused(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, max_value_bytes=1000,
                        poll_interval=0.2)

    @app.workflow()
    async def big(run: pgjournal.Run) -> None:
        await run.step("huge", lambda: "x" * 5000)

    try:
        handle = await _run_one(app, "big")
        assert "over the limit of 1000 bytes" in handle.error["message"]  # type: ignore[attr-defined]
        assert await (await app.store()).get_steps(handle.run_id) == []
        with pytest.raises(pgjournal.SerializationError, match="input of workflow 'big'"):
            await app.start("big", "y" * 2000)
    finally:
        await app.close()


async def test_unknown_workflow_refused_at_start_and_worker_keeps_serving(
        pgjournal_app: pgjournal.App) -> None:
    """A name the app does not know is refused at start (issue 9, row 8); the
    worker-side filter (such runs stay queued) is in test_leases.py."""
    app = pgjournal_app

    @app.workflow()
    async def fine(run: pgjournal.Run) -> str:
        return "fine"

    worker = pgjournal.Worker(app, concurrency=2, lease=5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        with pytest.raises(pgjournal.UnknownWorkflow, match="no workflow named 'no_such_wo"):
            await app.start("no_such_workflow")
        wrong_args = await app.start("fine", 1, 2, 3)
        with pytest.raises(pgjournal.RunFailed, match="cannot call workflow 'fine'"):
            await wrong_args.result(timeout=20)
        ok = await app.start("fine")
        assert await ok.result(timeout=20) == "fine"
    finally:
        worker.stop()
        await task


async def test_unknown_run_id(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    with pytest.raises(pgjournal.UnknownRun):
        await app.signal(uuid.uuid4(), "x", 1)
    with pytest.raises(pgjournal.UnknownRun):
        await app.cancel(uuid.uuid4())
    with pytest.raises(pgjournal.UnknownRun):
        await app.handle(uuid.uuid4()).status()
    with pytest.raises(pgjournal.UnknownRun, match="not a run id"):
        app.handle("not-a-uuid")


class Point(BaseModel):
    x: int
    y: int


def test_serializer_round_trips_and_refuses_pickle_by_default() -> None:
    ser = pgjournal.Serializer()
    text, value = ser.roundtrip({"p": Point(x=1, y=2), "l": [1, "a", None]})
    assert value == {"p": Point(x=1, y=2), "l": [1, "a", None]}
    assert '"$pgjournal":"pydantic"' in text
    with pytest.raises(pgjournal.SerializationError, match="opt in to pickle"):
        ser.dumps({1, 2}, what="result of step 's'")
    trusting = pgjournal.Serializer(allow_pickle=True)
    text, value = trusting.roundtrip({1, 2})
    assert value == {1, 2}
    with pytest.raises(pgjournal.SerializationError, match="stored with pickle"):
        import json

        ser.loads(json.loads(text))
