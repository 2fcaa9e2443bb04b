"""``reader_dsn``: the CLI's read commands and the dashboard read from a replica.

A real streaming replica: an embedded primary, and a standby made from it with
``pg_basebackup -R`` (the same PostgreSQL install the embedded server uses),
started as a hot standby. Reads are shown to come from the standby by pausing
its WAL replay: a run started on the primary afterwards is missing from what
the reader shows, and appears once replay resumes. Writes go to the primary
even when a reader is given; a primary DSN that names the standby fails with
one clear line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
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

from pgjournal.embedded import (
    SERVICE_USER,
    EmbeddedServer,
    _free_port,
    bin_dir,
    throwaway_server,
)
from pgjournal.migrations import migrate

from .conftest import ROOT, wait_for

pytestmark = pytest.mark.own_server


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PGJOURNAL_") or k == "PGJOURNAL_DEV_DATA"}
    return {**env, **extra}


def _standby_of(primary: EmbeddedServer) -> EmbeddedServer:
    """A hot standby of ``primary``, streaming from it (``pg_basebackup -R``)."""
    base = Path(tempfile.mkdtemp(prefix="pgjournal-standby-"))
    base.chmod(0o755)
    data = base / "data"
    user_kw: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL runs as the service user, as embedded.py does
        import pwd

        entry = pwd.getpwnam(SERVICE_USER)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        user_kw = {"user": SERVICE_USER}
    res = subprocess.run(
        [str(bin_dir() / "pg_basebackup"), "-D", str(data), "-h", "127.0.0.1", "-p",
         str(primary.port), "-U", "postgres", "-R", "-X", "stream", "--no-sync"],
        capture_output=True, text=True, timeout=120, check=False, cwd="/", **user_kw)
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"cannot build a streaming replica here: pg_basebackup failed: "
                    f"{res.stderr.strip()[-300:]}")
    # The copy carries the primary's settings, port included: give it its own.
    conf = data / "pgjournal.conf"
    conf.write_text("".join(
        f"port = {_free_port()}\n" if line.startswith("port") else line + "\n"
        for line in conf.read_text().splitlines()) + "hot_standby = on\n")
    (data / "server.log").unlink(missing_ok=True)  # the primary's, copied
    if user_kw:
        import pwd

        entry = pwd.getpwnam(SERVICE_USER)
        os.chown(conf, entry.pw_uid, entry.pw_gid)
    return EmbeddedServer(data, ephemeral=True).start()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[EmbeddedServer, EmbeddedServer]]:
    """An embedded primary and its hot standby, shared by this module's tests."""
    primary = throwaway_server(settings={"fsync": "off"})
    try:
        standby = _standby_of(primary)
        try:
            with psycopg.connect(standby.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                assert row == (True,), "the standby is not in recovery"
            yield primary, standby
        finally:
            standby.cleanup()
    finally:
        primary.cleanup()


@pytest.fixture
def replica(servers: tuple[EmbeddedServer, EmbeddedServer],
            ) -> Iterator[tuple[EmbeddedServer, EmbeddedServer, str]]:
    """(primary, standby, schema): a schema of the test's own, migrated on the
    primary; the standby's WAL replay is running again after the test."""
    primary, standby = servers
    schema = f"t_{uuid.uuid4().hex[:12]}"
    migrate(primary.dsn, schema=schema)
    deadline = time.monotonic() + 60
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        while conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                           (schema,)).fetchone() is None:
            assert time.monotonic() < deadline, "the schema never reached the standby"
            time.sleep(0.05)
    try:
        yield primary, standby, schema
    finally:
        _replay(standby, "resume")


def cli(*args: str, expect: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "pgjournal", *args], capture_output=True,
                         text=True, cwd=ROOT, env=clean_env(**env), timeout=60, check=False)
    assert res.returncode == expect, (args, res.returncode, res.stdout, res.stderr)
    return res


async def _on_standby(standby: EmbeddedServer, schema: str, run_id: str) -> bool:
    def look() -> bool:
        with psycopg.connect(standby.dsn, autocommit=True) as conn:
            return conn.execute(
                psycopg.sql.SQL("SELECT 1 FROM {}.runs WHERE id = %s").format(
                    psycopg.sql.Identifier(schema)), (run_id,)).fetchone() is not None
    return await asyncio.to_thread(look)


def _replay(standby: EmbeddedServer, action: str) -> None:
    """Pause or resume the standby's WAL replay; a pause is awaited until the
    standby reports it in effect (a request alone may still replay a record)."""
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        conn.execute(f"SELECT pg_wal_replay_{action}()")
        deadline = time.monotonic() + 60
        while action == "pause" and conn.execute(
                "SELECT pg_get_wal_replay_pause_state()").fetchone() != ("paused",):
            assert time.monotonic() < deadline, "the standby's replay never paused"
            time.sleep(0.05)


async def test_read_commands_read_the_replica_and_writes_go_to_the_primary(
        replica: tuple[EmbeddedServer, EmbeddedServer, str]) -> None:
    primary, standby, schema = replica
    db = ("--dsn", primary.dsn, "--schema", schema)
    first = cli(*db, "start", "agent", "--queue", "q1").stdout.strip()
    await wait_for(lambda: _on_standby(standby, schema, first), 30,
                   what="the first run to reach the standby")

    # Replay paused: what the primary commits from now on is not on the standby.
    _replay(standby, "pause")
    second = cli(*db, "start", "agent", "--queue", "q1").stdout.strip()
    assert not await _on_standby(standby, schema, second)

    def ids(res: subprocess.CompletedProcess[str]) -> set[str]:
        return {str(r["id"]) for r in json.loads(res.stdout)}

    # Through the reader (flag or environment): the standby's view.
    assert ids(cli(*db, "--reader-dsn", standby.dsn, "runs", "--json")) == {first}
    assert ids(cli(*db, "runs", "--json", PGJOURNAL_READER_DSN=standby.dsn)) == {first}
    queues = json.loads(cli(*db, "--reader-dsn", standby.dsn, "queues", "--json").stdout)
    assert [(q["queue"], q["queued_due"]) for q in queues] == [("q1", 1)]
    missing = cli(*db, "--reader-dsn", standby.dsn, "show", second, expect=1)
    assert "does not exist" in missing.stderr
    assert first in cli(*db, "show", first, "--json", PGJOURNAL_READER_DSN=standby.dsn).stdout
    cli(*db, "workers", "--json", PGJOURNAL_READER_DSN=standby.dsn)
    metrics = cli(*db, "metrics", "--once", PGJOURNAL_READER_DSN=standby.dsn).stdout
    assert re.search(r'^pgjournal_queue_claimable\{queue="q1"\} 1(\.0)?$', metrics, re.M), \
        metrics
    # Without one: the primary's.
    assert ids(cli(*db, "runs", "--json")) == {first, second}

    # Writes go to the primary though a reader is given (and the read after a
    # queue setting's write is the primary's too).
    cli(*db, "--reader-dsn", standby.dsn, "cancel", second)
    cli(*db, "--reader-dsn", standby.dsn, "queues", "pause", "q1")
    cli(*db, "signal", first, "go", "{}", PGJOURNAL_READER_DSN=standby.dsn)
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        q = psycopg.sql.Identifier(schema)
        status = conn.execute(psycopg.sql.SQL("SELECT status FROM {}.runs WHERE id = %s")
                              .format(q), (second,)).fetchone()
        assert status == ("cancelled",)
        paused = conn.execute(psycopg.sql.SQL(
            "SELECT paused FROM {}.queues WHERE name = 'q1'").format(q)).fetchone()
        assert paused == (True,)

    # Replay resumed: the replica catches up, and the reader shows the second run.
    _replay(standby, "resume")

    async def caught_up() -> bool:
        res = await asyncio.to_thread(cli, *db, "runs", "--json", "--status", "cancelled",
                                      PGJOURNAL_READER_DSN=standby.dsn)
        return ids(res) == {second}
    await wait_for(caught_up, 30, what="the cancelled run to show through the reader")


def test_a_primary_dsn_naming_the_standby_fails_writes_clearly(
        replica: tuple[EmbeddedServer, EmbeddedServer, str]) -> None:
    _primary, standby, schema = replica
    db = ("--dsn", standby.dsn, "--schema", schema)
    cli(*db, "runs")  # reads work there
    for args in (("start", "agent", "--queue", "q1"), ("queues", "pause", "q1", "--create"),
                 ("migrate",)):
        res = cli(*db, *args, expect=1)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("pgjournal: "), res.stderr
        assert "read-only" in lines[0] and "primary" in lines[0], (args, lines[0])
        assert "Traceback" not in res.stderr


async def test_the_dashboard_reads_the_replica(
        replica: tuple[EmbeddedServer, EmbeddedServer, str]) -> None:
    pytest.importorskip("starlette")
    import httpx

    import pgjournal
    from pgjournal.dashboard import create_app

    primary, standby, schema = replica
    async with pgjournal.App(primary.dsn, schema=schema) as app:
        first = await app.start("agent", queue="q1")
        await wait_for(lambda: _on_standby(standby, schema, str(first.run_id)), 30,
                       what="the first run to reach the standby")
        _replay(standby, "pause")
        second = await app.start("agent", queue="q1")
        asgi = create_app(app, reader_dsn=standby.dsn)
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            page = (await c.get("/")).text
            assert str(first.run_id) in page
            assert str(second.run_id) not in page
            scraped = (await c.get("/metrics")).text  # the scrape reads the replica too
            assert re.search(r'^pgjournal_queue_claimable\{queue="q1"\} 1(\.0)?$', scraped,
                             re.M), scraped
        await asgi.state.dashboard.close()
        _replay(standby, "resume")
