"""``App.start_many``: many runs in one round trip (SQL ``start_runs``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgjournal
from tests.conftest import serving, wait_for


async def _count_runs(app: pgjournal.App) -> int:
    async with (await app.store()).pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT count(*) AS n FROM {}.runs").format(sql.Identifier(app.schema)))
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def _hungry(app: pgjournal.App, worker: pgjournal.Worker) -> bool:
    async with (await app.store()).pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT hungry FROM {}.worker_health WHERE id = %s")
            .format(sql.Identifier(app.schema)), (worker.id,))
        row = await cur.fetchone()
    return bool(row and row["hungry"])


async def test_runs_complete_and_handles_follow_the_input_order(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow()
    async def echo(run: pgjournal.Run, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    items: list[Any] = [(i, f"s{i}") for i in range(30)]
    items += [7, [1, 2], {"k": "v"}, (), ((1, 2),), None]
    kwargs_list: list[dict[str, Any]] = [{} for _ in items]
    kwargs_list[-2] = {"flag": True}
    handles = await app.start_many(echo, items, kwargs_list=kwargs_list)
    assert len(handles) == len(items) == len({h.run_id for h in handles})
    # The order of the handles is the order of the items: each run got its own input.
    for h, item in zip(handles, items, strict=True):
        args = list(item) if isinstance(item, tuple) else [item]
        assert (await h.info())["input"]["args"] == [
            list(a) if isinstance(a, tuple) else a for a in args]
    async with serving(app, concurrency=8):
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert results[0] == [[0, "s0"], {}]
    assert results[29] == [[29, "s29"], {}]
    assert results[30:] == [[[7], {}], [[[1, 2]], {}], [[{"k": "v"}], {}], [[], {}],
                            [[[1, 2]], {"flag": True}], [[None], {}]]


async def test_idempotency_keys_return_the_same_runs(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow()
    async def wf(run: pgjournal.Run, x: int) -> int:
        return x

    first = await app.start_many("wf", [1, 2, 3, 4], idempotency_keys=["a", "b", None, "a"])
    ids = [h.run_id for h in first]
    # A key repeated inside one batch creates one run, returned for both items;
    # the run holds the first item's input.
    assert ids[0] == ids[3] and len(set(ids)) == 3
    assert (await first[0].info())["input"]["args"] == [1]
    assert await _count_runs(app) == 3

    again = await app.start_many("wf", [5, 6, 7, 8], idempotency_keys=["b", "c", "a", "b"])
    ids2 = [h.run_id for h in again]
    assert ids2[0] == ids[1] and ids2[2] == ids[0] and ids2[3] == ids[1]
    assert ids2[1] not in ids
    assert await _count_runs(app) == 4
    # start() with a key a batch used returns the batch's run, and the reverse.
    assert (await app.start("wf", 9, idempotency_key="c")).run_id == ids2[1]
    solo = await app.start("wf", 10, idempotency_key="d")
    assert [h.run_id for h in await app.start_many("wf", [11], idempotency_keys=["d"])] \
        == [solo.run_id]
    assert (await solo.info())["input"]["args"] == [10]


async def test_unknown_workflow_is_refused(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow()
    async def resize(run: pgjournal.Run, x: int) -> int:
        return x

    async def not_registered(run: pgjournal.Run) -> None:
        return None

    with pytest.raises(pgjournal.UnknownWorkflow, match="did you mean 'resize'"):
        await app.start_many("resise", [1, 2])
    with pytest.raises(pgjournal.UnknownWorkflow):
        await app.start_many("resise", [])
    with pytest.raises(pgjournal.ConfigurationError, match="not registered"):
        await app.start_many(not_registered, [1])
    assert await _count_runs(app) == 0


async def test_client_only_app_starts_any_name(pgjournal_app: pgjournal.App) -> None:
    handles = await pgjournal_app.start_many("elsewhere", [1, 2], queue="other")
    info = await handles[1].info()
    assert (info["workflow"], info["queue"], info["status"]) == ("elsewhere", "other", "queued")


async def test_mismatched_lengths_are_refused(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    with pytest.raises(pgjournal.ConfigurationError,
                       match="idempotency_keys has 2 elements for 3 items"):
        await app.start_many("wf", [1, 2, 3], idempotency_keys=["a", "b"])
    with pytest.raises(pgjournal.ConfigurationError, match="kwargs_list has 1 elements for 2"):
        await app.start_many("wf", [1, 2], kwargs_list=[{}])
    with pytest.raises(pgjournal.ConfigurationError, match="items is a str"):
        await app.start_many("wf", "abc")
    with pytest.raises(pgjournal.ConfigurationError, match="items is a dict"):
        await app.start_many("wf", {"x": 1})
    with pytest.raises(pgjournal.ConfigurationError, match="not a single string"):
        await app.start_many("wf", [1, 2], idempotency_keys="ab")
    with pytest.raises(pgjournal.ConfigurationError, match=r"kwargs_list\[1\] is a list"):
        await app.start_many("wf", [1, 2], kwargs_list=[{}, [("a", 1)]])  # type: ignore[list-item]
    with pytest.raises(pgjournal.ConfigurationError, match=r"idempotency_keys\[1\] is a int"):
        await app.start_many("wf", [1, 2], idempotency_keys=["a", 2])  # type: ignore[list-item]
    assert await _count_runs(app) == 0


async def test_serialization_error_names_the_item(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    with pytest.raises(pgjournal.SerializationError,
                       match=r"input of workflow 'wf' \(item 2\): \$\.args\[0\]\.x contains a NUL"):
        await app.start_many("wf", [1, 2, {"x": "a\x00b"}, 4])
    with pytest.raises(pgjournal.SerializationError,
                       match=r"\(item 1\): \$\.kwargs\.when is of type object"):
        await app.start_many("wf", [1, 2], kwargs_list=[{}, {"when": object()}])
    assert await _count_runs(app) == 0


async def test_size_cap_applies_per_item_not_per_batch(pgjournal_dsn: str,
                                                       pgjournal_schema: str) -> None:
    async with pgjournal.App(pgjournal_dsn, schema=pgjournal_schema,
                             max_value_bytes=1000) as app:
        # 20 inputs of ~400 bytes: the batch is over the cap, every item is under it.
        handles = await app.start_many("wf", ["x" * 400] * 20)
        assert len(handles) == 20
        with pytest.raises(pgjournal.SerializationError, match=r"\(item 3\) is \d+ bytes"):
            await app.start_many("wf", ["x", "y", "z", "x" * 2000])
        assert await _count_runs(app) == 20


async def test_empty_batch_makes_no_round_trip(pgjournal_dsn: str,
                                               pgjournal_schema: str) -> None:
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema)
    assert await app.start_many("anything", []) == []
    assert await app.start_many("anything", [], idempotency_keys=[]) == []
    assert app._store is None  # the pool was never opened
    await app.close()


async def test_one_wake_up_per_batch_and_none_when_delayed_or_nothing_new(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str) -> None:
    app = pgjournal_app
    done = 0
    all_done = asyncio.Event()

    @app.workflow()
    async def tick(run: pgjournal.Run, i: int) -> int:
        nonlocal done
        done += 1
        if done == 50:
            all_done.set()
        return i

    mine = f"{app.schema}:default"
    async with await psycopg.AsyncConnection.connect(pgjournal_dsn,
                                                     autocommit=True) as listen:
        await listen.execute("LISTEN pgjournal_wake")

        async def wake_ups(timeout: float) -> int:
            # Other tests on the server send wake-ups for their own schemas.
            return len([n async for n in listen.notifies(timeout=timeout)
                        if n.payload == mine])

        async with serving(app, poll_interval=120) as worker:
            await wait_for(lambda: _hungry(app, worker), 20, what="the worker to go hungry")
            await app.start_many("tick", list(range(50)), idempotency_keys=[
                f"k{i}" for i in range(50)])
            # The poll is 120 s: only the batch's NOTIFY can get these claimed in time.
            await asyncio.wait_for(all_done.wait(), 20)
            assert await wake_ups(0.5) == 1
            await wait_for(lambda: _hungry(app, worker), 20, what="the worker to go hungry")
            # Nothing created (every key exists): no wake-up.
            await app.start_many("tick", [1, 2], idempotency_keys=["k1", "k2"])
            # Delayed runs are not claimable yet: no wake-up either.
            delayed = await app.start_many("tick", [1, 2], delay=60)
            assert await wake_ups(0.5) == 0
    assert [await h.status() for h in delayed] == ["queued", "queued"]


async def test_priority_and_delay_apply_to_every_run(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    handles = await app.start_many("wf", [1, 2, 3], priority=7, delay=3600, queue="later")
    async with (await app.store()).pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT id, priority, queue, due_at > now() + interval '59 minutes' AS later"
                    " FROM {}.runs").format(sql.Identifier(app.schema)))
        rows = {r["id"]: r for r in await cur.fetchall()}
    assert set(rows) == {h.run_id for h in handles}
    assert all((r["priority"], r["queue"], r["later"]) == (7, "later", True)
               for r in rows.values())


async def test_every_new_run_has_its_queued_event(pgjournal_app: pgjournal.App) -> None:
    """The statement-level trigger writes what the row-level one wrote."""
    app = pgjournal_app
    handles = await app.start_many("wf", [1, 2, 3], idempotency_keys=["a", None, "a"])
    single = await app.start("wf", 4)
    async with (await app.store()).pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT run_id, from_status, to_status, attempt, lease_epoch, worker_id, "
                    "detail FROM {}.run_events ORDER BY id").format(sql.Identifier(app.schema)))
        events = await cur.fetchall()
    expected = [handles[0].run_id, handles[1].run_id, single.run_id]
    assert [e["run_id"] for e in events] == expected
    assert all((e["from_status"], e["to_status"], e["attempt"], e["lease_epoch"],
                e["worker_id"], e["detail"]) == (None, "queued", 1, 0, None, None)
               for e in events)


def test_sql_function_for_a_dba(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """``start_runs`` called from psql: arrays in, (run_id, created) out in input order."""
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    s = sql.Identifier(pgjournal_schema)
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL(
            "SELECT * FROM {}.start_runs(%s, 'wf', 'default', "
            "ARRAY['{{\"args\": [1], \"kwargs\": {{}}}}', '{{\"args\": [2]}}', "
            "'{{\"args\": [3]}}']::json[], p_idempotency_keys => ARRAY['k', NULL, 'k'])"
        ).format(s), ([a, b, c],)).fetchall()
        assert rows == [(a, True), (b, True), (a, False)]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="same length"):
            conn.execute(sql.SQL("SELECT * FROM {}.start_runs(%s, 'wf', 'default', "
                                 "ARRAY['1']::json[])").format(s), ([a, b],))
        assert conn.execute(sql.SQL("SELECT * FROM {}.start_runs('{{}}', 'wf', 'default', "
                                    "'{{}}')").format(s)).fetchall() == []


async def test_two_clients_start_the_same_keys_in_opposite_orders(
        pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Issue 20, row 9, forced with an open transaction: client B's batch (keys
    k2, k0, k1) waits at k0, which a third transaction inserted and has not
    committed; client A's batch (k1, k2) comes in; then k0 commits. Inserted
    in the caller's order, B held k2 and A held k1, each waiting for the other:
    a deadlock, reported as "database connection failed". Inserted in key
    order, both calls return the same run for each key."""
    tag = uuid.uuid4().hex[:8]
    k0, k1, k2 = (f"{tag}-{i}" for i in range(3))
    name = f"start-many-{tag}"
    a = pgjournal.App(make_conninfo(pgjournal_dsn, application_name=f"{name}-a"),
                      schema=pgjournal_schema)
    b = pgjournal.App(make_conninfo(pgjournal_dsn, application_name=f"{name}-b"),
                      schema=pgjournal_schema)
    holder = await psycopg.AsyncConnection.connect(pgjournal_dsn)
    try:
        await holder.execute(
            sql.SQL("SELECT * FROM {}.start_run(gen_random_uuid(), 'wf', 'default', "
                    "'{{}}'::json, 0, 0, %s)").format(sql.Identifier(pgjournal_schema)), (k0,))

        async def waiting(client: str) -> bool:
            async with await psycopg.AsyncConnection.connect(pgjournal_dsn,
                                                             autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = %s", (f"{name}-{client}",))
                row = await cur.fetchone()
            return bool(row and row[0])

        late = asyncio.create_task(b.start_many("wf", [1, 2, 3], idempotency_keys=[k2, k0, k1]))
        await wait_for(lambda: waiting("b"), what="B waiting for k0")
        early = asyncio.create_task(a.start_many("wf", [4, 5], idempotency_keys=[k1, k2]))
        await wait_for(lambda: _either(early, waiting("a")), what="A waiting or done")
        await holder.commit()
        got_b, got_a = await late, await early
    finally:
        await holder.close()
        await a.close()
        await b.close()
    assert [h.run_id for h in got_a] == [got_b[2].run_id, got_b[0].run_id]
    assert len({h.run_id for h in got_b}) == 3


async def _either(task: asyncio.Task[Any], check: Any) -> bool:
    if task.done():
        check.close()
        return True
    return bool(await check)
