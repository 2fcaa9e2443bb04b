"""The worker registry stays small and honest; claim and heartbeat share one
lock order (runs, then the worker row)."""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

import pgjournal

from .conftest import wait_for


def _sql(schema: str, text: str) -> psycopg.sql.Composed:
    return psycopg.sql.SQL(text).format(schema=psycopg.sql.Identifier(schema))


async def test_a_killed_worker_is_gone_once_its_lease_passed_and_old_rows_are_pruned(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        spawn_worker: Any) -> None:
    app = pgjournal_app
    store = await app.store()
    worker = spawn_worker(lease=1)

    async def state() -> dict[str, Any] | None:
        async with store.pool.connection() as conn:
            cur = await conn.execute(_sql(pgjournal_schema,
                                          "SELECT state, hungry FROM {schema}.worker_health "
                                          "WHERE pid = %s"), (worker.pid,))
            return await cur.fetchone()

    async def idle() -> bool:
        row = await state()
        return bool(row and row["state"] == "alive" and row["hungry"])

    await wait_for(idle, 30, what="the worker to register and go idle")
    worker.kill(signal.SIGKILL)
    worker.wait()

    async def gone() -> bool:
        row = await state()
        return bool(row and row["state"] == "gone" and not row["hungry"])

    # Its lease is 1 s: gone well before the old 60 s staleness threshold.
    await wait_for(gone, 15, what="the killed worker to show as gone")

    # Workers stopped over a day ago, or silent for a week, are forgotten.
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(_sql(pgjournal_schema,
            "INSERT INTO {schema}.workers (id, host, pid, queues, concurrency, heartbeat_at,"
            " stopped_at) SELECT gen_random_uuid(), 'old', g, ARRAY['default'], 1,"
            " now() - interval '8 days', CASE WHEN g % 2 = 0 THEN now() - interval '2 days'"
            " END FROM generate_series(1, 2000) g"))
    await store.register_worker(uuid.uuid4(), "new", 1, ["default"], 1, lease=5)
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        left = conn.execute(_sql(pgjournal_schema,
                                 "SELECT count(*) AS n FROM {schema}.workers")).fetchone()
    assert left is not None and left["n"] == 2   # the killed one (recent) and the new one


def test_claim_and_heartbeat_of_one_worker_never_deadlock(pgjournal_dsn: str,
                                                          pgjournal_schema: str) -> None:
    """A worker re-claims its own expired run while its heartbeat runs: claim
    locked runs then the worker row, heartbeat the reverse ("deadlock detected")."""
    worker = uuid.uuid4()
    errors: list[BaseException] = []
    stop = threading.Event()

    def conn() -> psycopg.Connection[dict[str, Any]]:
        c = psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row)
        c.execute(psycopg.sql.SQL("SET search_path TO {}").format(
            psycopg.sql.Identifier(pgjournal_schema)))
        return c

    with conn() as setup:
        setup.execute("SELECT register_worker(%s, 'h', 1, ARRAY['q'], 50)", (worker,))
        for _ in range(20):
            setup.execute("SELECT start_run(gen_random_uuid(), 'wf', 'q', '{}')")

    def claimer() -> None:
        with conn() as c:
            for i in range(400):
                # go_hungry flags the worker hungry; a full claim_runs batch then
                # clears the flag: runs locked, then the worker row.
                fn = "go_hungry" if i % 2 else "claim_runs"
                try:
                    c.execute(psycopg.sql.SQL("SELECT * FROM {}(%s, ARRAY['q'], 5, 0.001)")
                              .format(psycopg.sql.Identifier(fn)), (worker,)).fetchall()
                except psycopg.errors.DeadlockDetected as exc:
                    errors.append(exc)
            stop.set()

    def beater() -> None:
        with conn() as c:
            while not stop.is_set():
                held = c.execute("SELECT id, lease_epoch FROM runs WHERE worker_id = %s",
                                 (worker,)).fetchall()
                try:
                    c.execute("SELECT * FROM heartbeat(%s, %s, %s, 0.001)",
                              (worker, [r["id"] for r in held],
                               [r["lease_epoch"] for r in held])).fetchall()
                except psycopg.errors.DeadlockDetected as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=claimer), threading.Thread(target=beater),
               threading.Thread(target=beater)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


async def test_registry_index_keeps_enqueue_off_stale_workers(pgjournal_dsn: str,
                                                              pgjournal_schema: str) -> None:
    """notify_wake looks only at hungry live workers, through a partial index: the
    plan of its lookup does not scan the workers table."""
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(_sql(pgjournal_schema,
            "INSERT INTO {schema}.workers (id, host, pid, queues, concurrency, heartbeat_at,"
            " hungry) SELECT gen_random_uuid(), 'old', g, ARRAY['default'], 1,"
            " now() - interval '1 hour', true FROM generate_series(1, 20000) g"))
        conn.execute(_sql(pgjournal_schema, "ANALYZE {schema}.workers"))
        plan = conn.execute(_sql(pgjournal_schema,
            "EXPLAIN SELECT 1 FROM {schema}.workers w WHERE w.hungry AND w.stopped_at IS NULL"
            " AND w.heartbeat_at > now() - interval '5 minutes'"
            " AND 'default' = ANY (w.queues)")).fetchall()
    text = "\n".join(r["QUERY PLAN"] for r in plan)
    assert "workers_hungry_live" in text, text
    await asyncio.sleep(0)
