"""Child runs with real worker processes: a parent holds no slot while it waits,
and spawns and waits survive kill -9, a pause past the lease and a server restart
with exactly N children, each run once, and the parent completing."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, lease_expired, wait_for

#: Rounds of the "two children end in the same instant" test (more with PGJOURNAL_STRESS=1).
ROUNDS = 40 if os.environ.get("PGJOURNAL_STRESS") == "1" else 4


async def _tree(store: pgjournal.Store, parent: Any) -> dict[str, Any]:
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            f'SELECT count(*) AS n, count(*) FILTER (WHERE status = \'completed\') AS done, '
            f'count(DISTINCT id) AS ids FROM "{store.schema}".runs WHERE parent_run_id = %s',
            (parent,))
        row = await cur.fetchone()
        cur = await conn.execute(
            f'SELECT kind, count(*) AS n FROM "{store.schema}".steps WHERE run_id = %s '
            "GROUP BY kind ORDER BY kind", (parent,))
        kinds = {r["kind"]: r["n"] for r in await cur.fetchall()}
        cur = await conn.execute(
            f'SELECT count(*) AS n FROM "{store.schema}".steps s JOIN "{store.schema}".runs r '
            "ON r.id = s.run_id WHERE r.parent_run_id = %s", (parent,))
        leaf_entries = (await cur.fetchone() or {}).get("n")
    assert row is not None
    return {"children": row["n"], "completed": row["done"], "kinds": kinds,
            "leaf_entries": leaf_entries}


async def _status(store: pgjournal.Store, run_id: Any) -> str | None:
    row = await store.get_run(run_id)
    return None if row is None else str(row["status"])


async def test_two_hundred_children_on_one_slot(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    """With concurrency=1 the parent must give its slot up while it waits."""
    app = pgjournal_app
    handle = await app.start("fanout", 200)
    spawn_worker(concurrency=1)
    assert await handle.result(timeout=240) == sum(2 * i for i in range(200))
    tree = await _tree(await app.store(), handle.run_id)
    assert tree == {"children": 200, "completed": 200, "leaf_entries": 200,
                    "kinds": {"children": 1, "spawn": 1, "step": 3}}
    assert effects.count(handle.run_id, "before") == 1
    assert effects.count(handle.run_id, "after") == 1


@pytest.mark.parametrize("server_commits", [True, False],
                         ids=["spawn-committed", "spawn-rolled-back"])
async def test_kill9_during_spawn_many(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Effects, spawn_worker: Any, tmp_path: Path, server_commits: bool) -> None:
    """The worker is killed while its spawn statement is in flight (held on a
    table lock). Whether the server then commits the spawn or rolls it back,
    the next worker ends with exactly N children, each run once."""
    app = pgjournal_app
    store = await app.store()
    gate = tmp_path / "gate"
    handle = await app.start("fanout", 8)
    first = spawn_worker(env={"PGJ_GATE": f"fanout:{gate}"}, concurrency=2, lease=2)
    await effects.wait(handle.run_id, "before")
    with psycopg.connect(pgjournal_dsn) as locker:
        # Blocks inserts and updates of runs (the spawn), not the reads of a claim.
        locker.execute(f'LOCK TABLE "{pgjournal_schema}".runs IN SHARE MODE')
        gate.touch()
        with psycopg.connect(pgjournal_dsn, autocommit=True) as watch:
            def spawn_waiting() -> list[tuple[int]]:
                return watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE %s", ("%spawn_runs%",)).fetchall()

            async def blocked() -> list[tuple[int]]:
                return spawn_waiting()

            pids = await wait_for(blocked, 30, what="the spawn to wait on the lock")
            first.kill(signal.SIGKILL)
            first.wait()
            if not server_commits:
                watch.execute("SELECT pg_terminate_backend(%s)", (pids[0][0],))
        locker.commit()
    spawn_worker(concurrency=4)
    assert await handle.result(timeout=60) == sum(2 * i for i in range(8))
    tree = await _tree(store, handle.run_id)
    assert tree == {"children": 8, "completed": 8, "leaf_entries": 8,
                    "kinds": {"children": 1, "spawn": 1, "step": 3}}
    assert effects.count(handle.run_id, "before") == 1
    assert effects.count(None, "leaf") == 8


async def test_kill9_during_wait_all(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        tmp_path: Path) -> None:
    """The worker dies while the parent waits and its children are mid-step."""
    app = pgjournal_app
    store = await app.store()
    gate = tmp_path / "gate"
    handle = await app.start("fanout", 6)
    first = spawn_worker(env={"PGJ_GATE": f"leaf:{gate}"}, concurrency=4, lease=2)

    async def four_leaves_in_flight() -> bool:
        return effects.count(None, "leaf") == 4 and \
            await _status(store, handle.run_id) == "suspended"

    await wait_for(four_leaves_in_flight, 30, what="the parent to wait on busy children")
    first.kill(signal.SIGKILL)
    first.wait()
    gate.touch()
    spawn_worker(concurrency=4, lease=2)
    assert await handle.result(timeout=60) == sum(2 * i for i in range(6))
    tree = await _tree(store, handle.run_id)
    assert tree == {"children": 6, "completed": 6, "leaf_entries": 6,
                    "kinds": {"children": 1, "spawn": 1, "step": 3}}
    # The four children killed mid-step ran that step again; the other two once.
    assert effects.count(None, "leaf") == 10
    assert effects.count(handle.run_id, "spawned") == 1


async def test_the_last_two_children_ending_together_still_wake_the_parent(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        tmp_path: Path) -> None:
    """Two workers hold one child each at a gate; the gate opens and both end at
    once, each in its own transaction. Repeated: the parent is woken every time."""
    app = pgjournal_app
    store = await app.store()
    gate = tmp_path / "gate"
    env = {"PGJ_GATE": f"leaf:{gate}"}
    spawn_worker(env=env, concurrency=1)
    spawn_worker(env=env, concurrency=1)
    for round_ in range(ROUNDS):
        gate.unlink(missing_ok=True)
        # Counted before the start: a worker may claim the parent and its
        # leaves may record themselves before this process runs its next line.
        before = effects.count(None, "leaf")
        handle = await app.start("fanout", 2)

        async def both_at_gate(before: int = before, handle: Any = handle) -> bool:
            return effects.count(None, "leaf") == before + 2 and \
                await _status(store, handle.run_id) == "suspended"

        await wait_for(both_at_gate, 30, what=f"both children at the gate (round {round_})")
        gate.touch()
        assert await handle.result(timeout=30) == 2, f"round {round_}"


async def test_a_parent_paused_past_its_lease_spawns_nothing(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        tmp_path: Path) -> None:
    """The parent's worker stops (SIGSTOP) right before the spawn, past its lease;
    another worker finishes the tree; the paused one, resumed, spawns nothing."""
    app = pgjournal_app
    store = await app.store()
    gate = tmp_path / "gate"
    handle = await app.start("fanout", 5)
    stale = spawn_worker(env={"PGJ_GATE": f"fanout:{gate}"}, concurrency=2, lease=1)
    await effects.wait(handle.run_id, "before")
    stale.kill(signal.SIGSTOP)
    await wait_for(lambda: lease_expired(store, handle.run_id), 30, what="lease expiry")
    spawn_worker(concurrency=4, lease=5)
    assert await handle.result(timeout=60) == sum(2 * i for i in range(5))
    gate.touch()
    stale.kill(signal.SIGCONT)

    async def gave_up() -> bool:
        return "lost the lease" in stale.output()

    await wait_for(gave_up, 30, what="the stale worker to give the run up")
    tree = await _tree(store, handle.run_id)
    assert tree["children"] == 5 and tree["leaf_entries"] == 5
    assert tree["kinds"] == {"children": 1, "spawn": 1, "step": 3}
    assert effects.count(None, "leaf") == 5


async def test_a_waiting_parent_is_woken_across_a_server_restart(
        pgjournal_server_factory: Any, spawn_worker: Any, tmp_path: Path) -> None:
    """The server restarts while the parent waits and its children are held: the
    wake-up is in the database, so the tree completes after the restart."""
    server = pgjournal_server_factory(settings={})
    schema = "tree_restart"
    pgjournal.migrate(server.dsn, schema=schema)
    effects = Effects(server.dsn, schema)
    app = pgjournal.App(server.dsn, schema=schema, poll_interval=0.2)
    gate = tmp_path / "gate"
    try:
        store = await app.store()
        handle = await app.start("fanout", 4)
        spawn_worker(dsn=server.dsn, schema=schema, env={"PGJ_GATE": f"leaf:{gate}"},
                     concurrency=4, lease=3)

        async def waiting() -> bool:
            return effects.count(None, "leaf") == 4 and \
                await _status(store, handle.run_id) == "suspended"

        await wait_for(waiting, 30, what="the parent to wait on held children")
        server.stop()
        server.start()
        gate.touch()
        assert await handle.result(timeout=120) == sum(2 * i for i in range(4))
        tree = await _tree(store, handle.run_id)
        assert tree["children"] == 4 and tree["completed"] == 4
        assert tree["leaf_entries"] == 4
        assert tree["kinds"] == {"children": 1, "spawn": 1, "step": 3}
        await asyncio.sleep(0)
    finally:
        await app.close()
