"""pgjournal through a real PgBouncer in transaction pooling mode (issue 14).

Workers run as processes connected through PgBouncer with
``PGJOURNAL_POOLER=transaction``; the test's own App goes through it too.
Skipped, saying why, where the ``pgbouncer`` binary is missing.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import pgjournal
from pgjournal.connect import resolve_listen_dsn, resolve_pooler
from pgjournal.errors import ConfigurationError
from pgjournal.listener import Listener
from pgjournal.pytest_plugin import TestPostgres

from .conftest import ROOT, Effects, wait_for
from .pgbouncer import Bouncer, pgbouncer_fixture  # noqa: F401  (the fixture)

POOLED = {"PGJOURNAL_POOLER": "transaction"}


@pytest.fixture
async def app(pgbouncer: Bouncer, pgjournal_schema: str) -> AsyncIterator[pgjournal.App]:
    """The test's App, through PgBouncer, with no LISTEN (it polls)."""
    app = pgjournal.App(pgbouncer.dsn, schema=pgjournal_schema, poll_interval=0.2,
                        pooler="transaction")
    try:
        yield app
    finally:
        await app.close()


async def _status_is(app: pgjournal.App, run_id: Any, status: str) -> bool:
    row = await (await app.store()).get_run(run_id)
    return bool(row and row["status"] == status)


def _xacts(bouncer: Bouncer, dbname: str) -> int:
    return sum(int(str(r["total_xact_count"])) for r in bouncer.show("STATS")
               if r["database"] == dbname)


def test_pooler_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGJOURNAL_LISTEN_DSN", raising=False)
    monkeypatch.setenv("PGJOURNAL_POOLER", "transaction")
    assert resolve_pooler(None) == "transaction"
    assert resolve_pooler("none") == "none"  # the argument wins
    assert resolve_listen_dsn(None, "main", "transaction") is None
    assert resolve_pooler("Transaction") == "transaction"
    assert resolve_pooler("") == "none"
    with pytest.raises(ConfigurationError, match="statement mode"):
        resolve_pooler("statement")
    assert resolve_listen_dsn(None, "main", "none") == "main"
    assert resolve_listen_dsn(None, "main", "session") == "main"
    assert resolve_listen_dsn("direct", "main", "transaction") == "direct"


async def test_runs_complete_through_pgbouncer_by_polling(
        app: pgjournal.App, pgbouncer: Bouncer, effects: Effects, spawn_worker: Any,
        pgjournal_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGJOURNAL_LISTEN_DSN", raising=False)
    assert app.listen_dsn is None
    dbname = str(psycopg.conninfo.conninfo_to_dict(pgbouncer.dsn)["dbname"])
    before = _xacts(pgbouncer, dbname)
    # lease 1 s: the paced run (about 2 s) completes only if heartbeats get through.
    worker = spawn_worker(dsn=pgbouncer.dsn, env=POOLED, lease=1, concurrency=4)
    paced = await app.start("paced", 4, 0.5)
    # Many runs of one workflow: psycopg would prepare its statements by the
    # 5th execution, and a prepared statement does not survive PgBouncer's
    # switching of server connections.
    handles = [await app.start("five_steps", 5) for _ in range(12)]
    for handle in handles:
        assert await handle.result(timeout=30) == "s1,s2,s3,s4,s5"
    assert await paced.result(timeout=30) == 4
    row = await (await app.store()).get_run(paced.run_id)
    assert row is not None and row["recoveries"] == 0  # its lease was never lost
    assert "no LISTEN (pooler=transaction and no listen_dsn): polling" in worker.output()
    assert "prepared statement" not in worker.output()
    assert _xacts(pgbouncer, dbname) > before + 100  # it all went through PgBouncer

    # No session state left behind: as many client connections as PgBouncer
    # has server connections, each holding one in a transaction (so together
    # they cover every one of them), all see the defaults.
    servers = [r for r in pgbouncer.show("SERVERS") if r["database"] == dbname]
    assert servers
    conns = [await psycopg.AsyncConnection.connect(pgbouncer.dsn, prepare_threshold=None)
             for _ in servers]
    try:
        for conn in conns:
            cur = await conn.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("0",)
    finally:
        for conn in conns:
            await conn.close()


async def test_signal_wait_and_resume_with_a_direct_listen_dsn(
        pgbouncer: Bouncer, pgjournal_schema: str, effects: Effects,
        spawn_worker: Any) -> None:
    # A long poll interval: the prompt wake-ups come from LISTEN on the direct DSN.
    async with pgjournal.App(pgbouncer.dsn, schema=pgjournal_schema, poll_interval=5,
                             pooler="transaction",
                             listen_dsn=pgbouncer.direct_dsn) as app:
        handle = await app.start("waiter", ["go"])
        worker = spawn_worker(dsn=pgbouncer.dsn, lease=2,
                              env={**POOLED, "PGJOURNAL_LISTEN_DSN": pgbouncer.direct_dsn})
        await wait_for(lambda: _status_is(app, handle.run_id, "suspended"), 30,
                       what="the run to suspend")
        await app.signal(handle.run_id, "go", {"n": 7})
        assert await handle.result(timeout=30) == [{"n": 7}]
        assert "no LISTEN" not in worker.output()
        assert effects.count(handle.run_id, "after-go") == 1


async def test_kill9_and_recovery_through_pgbouncer(
        app: pgjournal.App, pgbouncer: Bouncer, effects: Effects,
        spawn_worker: Any) -> None:
    handle = await app.start("five_steps", 5)
    first = spawn_worker(dsn=pgbouncer.dsn, env={**POOLED, "PGJ_BLOCK": "s3"}, lease=1)
    await effects.wait(handle.run_id, "s3")
    first.kill(signal.SIGKILL)
    first.wait()
    second = spawn_worker(dsn=pgbouncer.dsn, env=POOLED, lease=1)
    assert await handle.result(timeout=30) == "s1,s2,s3,s4,s5"
    assert [effects.count(handle.run_id, f"s{i}") for i in range(1, 6)] == [1, 1, 2, 1, 1]
    row = await (await app.store()).get_run(handle.run_id)
    assert row is not None and row["recoveries"] == 1
    assert {p for _r, s, p in effects.rows(handle.run_id) if s in ("s4", "s5")} == {second.pid}


async def test_cli_through_pgbouncer(app: pgjournal.App, pgbouncer: Bouncer,
                                     pgjournal_schema: str, spawn_worker: Any,
                                     effects: Effects) -> None:
    spawn_worker(dsn=pgbouncer.dsn, env=POOLED)
    handle = await app.start("five_steps", 2)
    assert await handle.result(timeout=30) == "s1,s2"

    def cli(*args: str) -> str:
        import os
        env = {k: v for k, v in os.environ.items()
               if k not in ("PGJOURNAL_DSN", "PGJOURNAL_SCHEMA", "PGJOURNAL_DEV_DATA")}
        res = subprocess.run(
            [sys.executable, "-m", "pgjournal", "--dsn", pgbouncer.dsn, "--schema",
             pgjournal_schema, *args], capture_output=True, text=True, cwd=ROOT,
            env={**env, **POOLED}, timeout=60, check=False)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res.stdout

    runs, shown = await asyncio.gather(asyncio.to_thread(cli, "runs"),
                                       asyncio.to_thread(cli, "show", str(handle.run_id)))
    assert str(handle.run_id)[:8] in runs and "completed" in runs
    assert "s1" in shown and "s2" in shown and "completed" in shown


async def test_listener_pings_when_quiet_and_still_hears(
        pgjournal_postgres: TestPostgres) -> None:
    pgjournal_dsn = pgjournal_postgres.dsn  # LISTEN: the server itself, never PgBouncer
    heard: list[str] = []
    listener = Listener(pgjournal_dsn, "pgjournal_ping_test", heard.append,
                        ping_interval=0.1, ping_timeout=2)
    await listener.start()
    try:
        async def pinged() -> bool:
            return listener.pings >= 2
        await wait_for(pinged, 10, what="two pings")
        async with await psycopg.AsyncConnection.connect(pgjournal_dsn,
                                                         autocommit=True) as conn:
            await conn.execute("NOTIFY pgjournal_ping_test, 'hello'")

        async def got() -> bool:
            return heard == ["hello"]
        await wait_for(got, 10, what="the notification")
    finally:
        await listener.stop()


class _Proxy:
    """A TCP forwarder that can go silent: open connections stay open but
    nothing passes any more (a half-open socket); new ones are forwarded."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.silenced: set[asyncio.StreamWriter] = set()
        self.live: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def go_silent(self) -> None:
        self.silenced.update(self.live)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    tag: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if tag in self.silenced:
                    continue  # swallowed: the other end hears nothing, no FIN
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.live.append(writer)
        await asyncio.gather(self._pipe(reader, up_writer, writer),
                             self._pipe(up_reader, writer, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.live:
            writer.close()


async def test_listener_reconnects_from_a_half_open_socket(
        pgjournal_postgres: TestPostgres) -> None:
    info = psycopg.conninfo.conninfo_to_dict(pgjournal_postgres.dsn)
    proxy = _Proxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    port = await proxy.start()
    info.update(host="127.0.0.1", port=port)
    connects: list[int] = []
    listener = Listener(psycopg.conninfo.make_conninfo(**info), "pgjournal_half_open",
                        lambda _p: None, lambda: connects.append(1),
                        ping_interval=0.2, ping_timeout=0.5)
    await listener.start()
    try:
        assert connects == [1]
        proxy.go_silent()

        async def reconnected() -> bool:
            return len(connects) >= 2
        await wait_for(reconnected, 20, what="the listener to notice and reconnect")
    finally:
        await listener.stop()
        await proxy.close()


def test_the_pgbouncer_pass_goes_through_pgbouncer(
        pgjournal_dsn: str, pgjournal_postgres: TestPostgres) -> None:
    """In CI's PgBouncer pass (``PGJOURNAL_TEST_POOLER=pgbouncer``): what tests
    hand to Apps, workers and the CLI is PgBouncer in transaction mode, and
    LISTEN is pointed at the server itself."""
    from .conftest import THROUGH_PGBOUNCER

    if not THROUGH_PGBOUNCER:
        pytest.skip("only in the PgBouncer pass (PGJOURNAL_TEST_POOLER=pgbouncer)")
    import os

    assert pgjournal_dsn != pgjournal_postgres.dsn
    assert os.environ["PGJOURNAL_POOLER"] == "transaction"
    assert os.environ["PGJOURNAL_LISTEN_DSN"] == pgjournal_postgres.dsn
    info = psycopg.conninfo.conninfo_to_dict(pgjournal_dsn)
    info["dbname"] = "pgbouncer"
    with psycopg.connect(psycopg.conninfo.make_conninfo(**info), autocommit=True,
                         prepare_threshold=None) as admin:
        modes = {row[0]: row for row in admin.execute("SHOW CONFIG").fetchall()}
    assert modes["pool_mode"][1] == "transaction"
    # The tests' own plain connections prepare nothing either.
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        assert conn.prepare_threshold is None
