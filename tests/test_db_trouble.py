"""Issue 9, rows 11 and 18: the database down at worker start, and restarted
under a running worker and an open pool. Throwaway embedded servers that the
tests stop and start."""

from __future__ import annotations

from typing import Any

import pgjournal
from pgjournal.embedded import EmbeddedServer

from .conftest import Effects, wait_for


def _lines(output: str, needle: str) -> list[str]:
    return [line for line in output.splitlines() if needle in line]


async def test_worker_started_while_the_database_is_down_waits_and_serves(
        pgjournal_server_factory: Any, spawn_worker: Any) -> None:
    server: EmbeddedServer = pgjournal_server_factory()
    schema = "down_at_start"
    pgjournal.migrate(server.dsn, schema=schema)
    Effects(server.dsn, schema)
    dsn = server.dsn
    server.stop()
    worker = spawn_worker(dsn=dsn, schema=schema, lease=2)

    async def waiting() -> bool:
        return bool(_lines(worker.output(), "waits for it"))

    await wait_for(waiting, 30, what="the worker to say it waits for the database")
    assert worker.proc.poll() is None, worker.output()
    server.start()
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)
    try:
        handle = await app.start("five_steps", 2)
        assert await handle.result(timeout=60) == "s1,s2"
    finally:
        await app.close()
    out = worker.output()
    assert worker.proc.poll() is None, out
    assert len(_lines(out, "waits for it")) == 1, out  # said once, not once per retry
    assert "Traceback" not in out, out


async def test_pool_checks_connections_after_a_server_restart(
        pgjournal_server_factory: Any) -> None:
    """Connections pooled before a restart are dead; the first statement after it
    (one that is not retried: an enqueue) must not fail."""
    server: EmbeddedServer = pgjournal_server_factory()
    schema = "restarted"
    pgjournal.migrate(server.dsn, schema=schema)
    app = pgjournal.App(server.dsn, schema=schema, pool_size=4)
    try:
        store = await app.store()
        # Fill the pool with several open connections.
        held = [await store.pool.getconn() for _ in range(4)]
        for conn in held:
            await store.pool.putconn(conn)
        server.stop()
        server.start()
        for i in range(6):  # more uses than pooled connections: none may fail
            await app.start("anything", i)
        assert len(await store.list_runs()) == 6
    finally:
        await app.close()


async def test_worker_rides_out_database_restarts_quietly(
        pgjournal_server_factory: Any, spawn_worker: Any) -> None:
    """The server stops three times during a run, each time for longer than the
    lease, so the worker gives the run up and reclaims it after the restart. The
    run survives only one crash recovery (max_recoveries=1), yet completes: a
    lease that ran out while the server was down is an interruption, not "the
    worker vanished". The pool logs at most one reconnect line per outage and
    the worker one heartbeat line."""
    server: EmbeddedServer = pgjournal_server_factory(settings={})
    schema = "restarts"
    pgjournal.migrate(server.dsn, schema=schema)
    Effects(server.dsn, schema)
    dsn = server.dsn
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)
    outages = 3
    try:
        handle = await app.start("fragile", 40, 0.3)
        worker = spawn_worker(dsn=dsn, schema=schema, lease=3)
        store = await app.store()
        epoch = 0

        def counts() -> dict[str, int]:
            out = worker.output()
            return {k: len(_lines(out, k)) for k in (
                "heartbeat failed", "lost the lease", "heartbeats resumed", "psycopg.pool")}

        for k in range(outages):
            async def reclaimed(epoch: int = epoch) -> int:
                row = await store.get_run(handle.run_id)
                ok = row is not None and row["status"] == "running" and row["lease_epoch"] > epoch
                return int(row["lease_epoch"]) if row and ok else 0

            epoch = await wait_for(reclaimed, 60, what=f"the run running before outage {k + 1}")
            # Lines are counted from here: a lease lost to a slow machine before
            # the outage must not pass for this outage's.
            before = counts()
            server.stop()

            async def gave_up(before: dict[str, int] = before) -> bool:
                now = counts()
                return (now["heartbeat failed"] > before["heartbeat failed"]
                        and now["lost the lease"] > before["lost the lease"])

            await wait_for(gave_up, 30, what=f"the worker to give the run up in outage {k + 1}")
            server.start()

            async def resumed(before: dict[str, int] = before) -> bool:
                return counts()["heartbeats resumed"] > before["heartbeats resumed"]

            await wait_for(resumed, 30, what=f"heartbeats to resume after outage {k + 1}")
            after = counts()
            out = worker.output()
            # One heartbeat line and one lost-lease line per outage, at most one
            # pool line.
            assert after["heartbeat failed"] - before["heartbeat failed"] == 1, out
            assert after["lost the lease"] - before["lost the lease"] == 1, out
            assert after["psycopg.pool"] - before["psycopg.pool"] <= 1, out
        assert await handle.result(timeout=120) == 40
        row = await store.get_run(handle.run_id)
        assert row is not None and row["status"] == "completed", row
        # Every outage is an interruption, none a crash recovery (a recovery could
        # only come from a lease lost to a slow machine between outages).
        assert row["interruptions"] == outages, row
        assert row["recoveries"] <= 1, row
        assert worker.proc.poll() is None, worker.output()
    finally:
        await app.close()


async def test_pool_connections_detect_a_silent_network(pgjournal_dsn: str,
                                                       pgjournal_schema: str) -> None:
    """Pool connections (and the worker's heartbeat connection, opened with
    connect_async) get TCP keepalives and a user timeout (a host cut off from
    the database fails its statements in about a minute, not the kernel's ~15),
    except where the DSN sets its own."""
    from pgjournal.connect import NETWORK_DEFAULTS, connect_async

    sep = "&" if "?" in pgjournal_dsn else "?"
    for dsn, idle in ((pgjournal_dsn, "30"), (f"{pgjournal_dsn}{sep}keepalives_idle=7", "7")):
        app = pgjournal.App(dsn, schema=pgjournal_schema)
        try:
            store = await app.store()
            async with store.pool.connection() as conn:
                params = conn.info.get_parameters()
        finally:
            await app.close()
        direct = await connect_async(dsn)
        try:
            for got in (params, direct.info.get_parameters()):
                assert got.get("keepalives_idle") == idle
                assert got.get("tcp_user_timeout") == str(NETWORK_DEFAULTS["tcp_user_timeout"])
                assert got.get("keepalives") == "1"
        finally:
            await direct.close()


async def test_a_lease_confirmation_that_waits_out_an_outage_is_never_sent(
        pgjournal_server_factory: Any) -> None:
    """A step about to start confirms its lease; the server is down, so the
    confirmation waits for a pool connection. The server comes back only after
    the lease's local deadline: by then the worker has given the run up, so the
    confirmation must not be sent (it renewed the lease in the database, and the
    next claim counted a crash recovery instead of an interruption) and must not
    hand the run back to the step."""
    import asyncio
    import time

    from pgjournal.lease import Lease

    server: EmbeddedServer = pgjournal_server_factory(settings={})
    schema = "confirm_outage"
    pgjournal.migrate(server.dsn, schema=schema)
    app = pgjournal.App(server.dsn, schema=schema, poll_interval=0.2)
    try:
        store = await app.store()
        worker = pgjournal.Worker(app, queues=["default"], lease=2.0)
        worker._store = store
        await store.register_worker(worker.id, "test", 1, ["default"], 1, lease=2.0)
        await app.start("anything")
        sent = time.monotonic()
        (claim,) = await store.claim(worker.id, ["default"], 1, 2.0)
        lease = Lease(claim.run_id, claim.epoch, 2.0, sent_at=sent, confirm=worker._confirm)
        before = await store.get_run(claim.run_id)
        assert before is not None
        server.stop()
        # The step starts once the lease is no longer fresh: ensure() confirms.
        await asyncio.sleep(max(lease.valid_until - lease.margin + 0.05 - time.monotonic(), 0))
        assert not lease.fresh()
        confirming = asyncio.create_task(lease.ensure())
        # A clock deadline, not an event: the server stays down until past it.
        await asyncio.sleep(max(lease.valid_until + 0.5 - time.monotonic(), 0))
        server.start()
        assert await confirming is False
        assert lease.lost is not None
        after = await store.get_run(claim.run_id)
        assert after is not None
        assert (after["leased_at"], after["lease_epoch"]) == (
            before["leased_at"], before["lease_epoch"]), "the lease was renewed after the outage"
    finally:
        await app.close()
