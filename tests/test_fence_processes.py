"""The fence with real worker processes: a stale worker's write reaches the fence
(its heartbeat held off, so nothing but the fence stops it), and `kill -9` at the
two moments where a crash is the hardest to get right: right after a signal was
consumed, and in the middle of a stream whose first chunks were flushed."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg

import pgjournal

from .conftest import Effects, lease_expired, wait_for


async def _one(app: pgjournal.App, query: str, *params: Any) -> Any:
    async with (await app.store()).pool.connection() as conn:
        cur = await conn.execute(query.replace("{s}", f'"{app.schema}"'), params)
        row = await cur.fetchone()
    return None if row is None else next(iter(row.values()))


async def test_stale_write_reaches_the_fence_and_is_refused(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        tmp_path: Path) -> None:
    """A worker whose heartbeat never runs holds s2 past its lease; another worker
    takes the run over and is inside s2 too. The stale worker then finishes s2 and
    writes its result: only the fence in ``journal_step`` stands in the way."""
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("five_steps", 3)
    stale_go, fresh_go = tmp_path / "stale-go", tmp_path / "fresh-go"
    stale = spawn_worker(env={"PGJ_GATE": f"s2:{stale_go}"}, lease=1, heartbeat=3600,
                         concurrency=1)
    await effects.wait(handle.run_id, "s2")
    await wait_for(lambda: lease_expired(store, handle.run_id), 30, what="lease expiry")
    fresh = spawn_worker(env={"PGJ_GATE": f"s2:{fresh_go}"}, lease=30, concurrency=1)
    await effects.wait(handle.run_id, "s2", n=2)  # the new owner is inside s2 as well
    assert await _one(app, "SELECT lease_epoch FROM {s}.runs WHERE id = %s",
                      handle.run_id) == 2

    stale_go.touch()  # the stale worker finishes s2 and tries to journal it

    async def refused() -> bool:
        return "lost the lease" in stale.output()

    await wait_for(refused, 30, what="the stale worker's write to be refused")
    steps = await store.get_steps(handle.run_id)
    assert [(s["position"], s["name"], s["lease_epoch"]) for s in steps] == [(0, "s1", 1)], \
        "the stale worker's write got into the journal"
    assert stale.proc.poll() is None  # refused, not crashed

    fresh_go.touch()
    assert await handle.result(timeout=60) == "s1,s2,s3"
    steps = await store.get_steps(handle.run_id)
    assert [(s["position"], s["name"], s["lease_epoch"]) for s in steps] == [
        (0, "s1", 1), (1, "s2", 2), (2, "s3", 2)]
    by_step = {}
    for _r, step, pid in effects.rows(handle.run_id):
        by_step.setdefault(step, []).append(pid)
    assert by_step == {"s1": [stale.pid], "s2": [stale.pid, fresh.pid], "s3": [fresh.pid]}
    row = await store.get_run(handle.run_id)
    assert row is not None and (row["status"], row["lease_epoch"]) == ("completed", 2)


async def test_kill9_right_after_a_signal_is_consumed(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """The signal is consumed and journaled in one transaction; the worker dies in
    the next step. The new owner replays the signal: it neither waits again nor
    consumes a second one."""
    app = pgjournal_app
    handle = await app.start("waiter", ["go", "go"])
    await app.signal(handle.run_id, "go", "one")
    first = spawn_worker(env={"PGJ_BLOCK": "after-go"}, lease=1)
    await effects.wait(handle.run_id, "after-go")  # the signal was consumed before this
    first.kill(signal.SIGKILL)
    first.wait()
    spawn_worker(lease=2)
    await app.signal(handle.run_id, "go", "two")
    assert await handle.result(timeout=60) == ["one", "two"]
    with psycopg.connect(pgjournal_dsn) as conn:
        sigs = conn.execute(
            f'SELECT payload, consumed_position FROM "{pgjournal_schema}".signals '
            "WHERE run_id = %s ORDER BY id", (handle.run_id,)).fetchall()
        steps = conn.execute(
            f'SELECT position, name, kind, output FROM "{pgjournal_schema}".steps '
            "WHERE run_id = %s ORDER BY position", (handle.run_id,)).fetchall()
    assert sigs == [("one", 0), ("two", 2)]
    assert steps == [(0, "go", "signal", "one"), (1, "after-go", "step", "after-go"),
                     (2, "go", "signal", "two"), (3, "after-go", "step", "after-go")]
    assert effects.count(handle.run_id, "after-go") == 3  # killed once before its journal


async def test_kill9_mid_stream_after_a_chunk_flush(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any) -> None:
    """Chunks flushed for watchers by a worker that then dies are replaced by the
    new owner's re-run of the stream: no chunk twice, none missing, in order."""
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("streamer", 10)
    first = spawn_worker(env={"PGJ_BLOCK": "tok7"}, lease=1)
    await effects.wait(handle.run_id, "tok7")

    async def flushed() -> int:
        return len(await store.get_chunks(handle.run_id))

    partial = await wait_for(flushed, 30, what="a chunk flush before the kill")
    assert await store.get_steps(handle.run_id) == []  # the stream step is not journaled yet
    first.kill(signal.SIGKILL)
    first.wait()
    assert 0 < partial <= 7
    spawn_worker(lease=2)
    tokens = [f"t{i}" for i in range(10)]
    assert await handle.result(timeout=60) == tokens
    chunks = await store.get_chunks(handle.run_id)
    assert [(c["seq"], c["chunk"]) for c in chunks] == list(enumerate(tokens))
    steps = await store.get_steps(handle.run_id)
    assert [(s["name"], s["kind"], s["status"]) for s in steps] == [
        ("llm", "stream", "completed"), ("after", "step", "completed")]
    assert effects.count(handle.run_id, "tok0") == 2  # the stream re-ran from the start
    assert effects.count(handle.run_id, "tok9") == 1
    assert effects.count(handle.run_id, "after") == 1


async def test_worker_past_its_lease_starts_no_step(
        pgjournal_app: pgjournal.App, effects: Effects, spawn_worker: Any,
        tmp_path: Path) -> None:
    """Invariant 1's second half: a worker starts no step after its locally known
    lease deadline without confirming the lease. Here the worker is held between
    two steps (its heartbeat off) until another worker has finished the run."""
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("gap")
    go = tmp_path / "go"
    stale = spawn_worker(env={"PGJ_GATE": f"gap:{go}"}, lease=1, heartbeat=3600,
                         concurrency=1)

    async def s1_journaled() -> bool:
        return len(await store.get_steps(handle.run_id)) == 1

    await wait_for(s1_journaled, 30, what="s1 to be journaled")
    await wait_for(lambda: lease_expired(store, handle.run_id), 30, what="lease expiry")
    fresh = spawn_worker(lease=30, concurrency=1)
    assert await handle.result(timeout=60) == "ok"
    go.touch()  # the stale worker goes on to s2, its lease long gone

    async def gave_up() -> bool:
        return "lost the lease" in stale.output()

    await wait_for(gave_up, 30, what="the stale worker to give the run up")
    s2 = [pid for _r, step, pid in effects.rows(handle.run_id) if step == "s2"]
    assert s2 == [fresh.pid], "the stale worker started s2 after its lease had expired"
