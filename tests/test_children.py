"""Child runs: spawn, waits that hold no worker, failures, cancel cascades, deadlines."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import serving, wait_for


def _q(dsn: str, schema: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.replace("S.", f'"{schema}".'), args)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def tree_app(pgjournal_dsn: str, pgjournal_schema: str) -> pgjournal.App:
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, poll_interval=0.2)
    release = asyncio.Event()
    app.release = release  # type: ignore[attr-defined]
    executed: list[str] = []
    app.executed = executed  # type: ignore[attr-defined]

    @app.workflow()
    async def research(run: pgjournal.Run, topic: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            executed.append(topic)
            return {"topic": topic, "words": len(topic), "x": 1e20}
        return await run.step("work", work)  # type: ignore[no-any-return]

    @app.workflow(max_attempts=1)
    async def broken(run: pgjournal.Run, why: str) -> None:
        raise KeyError(why)

    @app.workflow()
    async def held(run: pgjournal.Run, name: str) -> str:
        await run.wait_signal("go")
        return name

    @app.workflow()
    async def planner(run: pgjournal.Run, topics: list[str]) -> dict[str, Any]:
        kids = await run.spawn_many("research", topics)
        notes = await run.wait_all(kids)
        return {"notes": notes, "ids": [str(k.id) for k in kids]}

    @app.workflow()
    async def single(run: pgjournal.Run) -> Any:
        child = await run.spawn("research", "one")
        return await child.result()

    @app.workflow()
    async def catcher(run: pgjournal.Run) -> Any:
        ok = await run.spawn("research", "fine")
        bad = await run.spawn("broken", "boom")
        got = await run.wait_all([ok, bad], return_exceptions=True)
        try:
            await bad.result()
        except pgjournal.ChildFailed as exc:
            caught = [exc.status, exc.error["type"], exc.workflow, str(exc.run_id) == str(bad.id)]
        return [got[0], type(got[1]).__name__, caught]

    @app.workflow()
    async def racer(run: pgjournal.Run, cancel_rest: bool) -> Any:
        slow = await run.spawn_many("held", ["a", "b"])
        fast = await run.spawn("research", "fast")
        first = await run.wait_first([*slow, fast], cancel_rest=cancel_rest)
        return [str(first.id) == str(fast.id), await first.result(),
                [str(s.id) for s in slow]]

    @app.workflow()
    async def deep(run: pgjournal.Run, levels: int) -> Any:
        if levels == 0:
            await run.wait_signal("never")
            return None
        kids = await run.spawn_many("deep", [levels - 1, levels - 1])
        return await run.wait_all(kids)

    fixed: set[str] = set()
    app.fixed = fixed  # type: ignore[attr-defined]

    @app.workflow(max_attempts=1)
    async def until_fixed(run: pgjournal.Run, key: str) -> str:
        if key not in fixed:
            raise RuntimeError(f"{key} is broken")
        return f"{key} works"

    @app.workflow(max_attempts=1)
    async def strict(run: pgjournal.Run, key: str, how: str) -> Any:
        kid = await run.spawn("until_fixed", key)
        if how == "result":
            return await kid.result()
        return await run.wait_all([kid])

    @app.workflow()
    async def timed(run: pgjournal.Run) -> Any:
        child = await run.spawn("held", "late", timeout=0.5)
        try:
            return await child.result()
        except pgjournal.ChildFailed as exc:
            return ["timed out", exc.error["type"]]

    return app


async def test_fan_out_and_wait_all_returns_outputs_in_order(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    topics = [f"topic-{i}" for i in range(12)]
    handle = await tree_app.start("planner", topics)
    async with serving(tree_app, concurrency=3):
        out = await handle.result(timeout=60)
    assert [n["topic"] for n in out["notes"]] == topics
    assert out["notes"][0] == {"topic": "topic-0", "words": 7, "x": 1e20}
    rows = _q(pgjournal_dsn, pgjournal_schema,
              "SELECT id::text, parent_position, root_run_id, depth FROM S.runs "
              "WHERE parent_run_id = %s ORDER BY created_at, id", handle.run_id)
    assert sorted(r[0] for r in rows) == sorted(out["ids"])
    assert {(r[1], r[2], r[3]) for r in rows} == {(0, handle.run_id, 1)}
    # The parent ran twice (spawn + suspend, then replay + wait), each child once.
    assert sorted(tree_app.executed) == sorted(topics)  # type: ignore[attr-defined]
    kinds = _q(pgjournal_dsn, pgjournal_schema,
               "SELECT kind, name FROM S.steps WHERE run_id = %s ORDER BY position",
               handle.run_id)
    assert kinds == [("spawn", "research"), ("children", "wait_all")]
    tree = _q(pgjournal_dsn, pgjournal_schema,
              "SELECT depth, count(*), max(children) FROM S.run_tree WHERE root_run_id = %s "
              "GROUP BY depth ORDER BY depth", handle.run_id)
    assert tree == [(0, 1, 12), (1, 12, 0)]


async def test_a_waiting_parent_holds_no_slot(tree_app: pgjournal.App) -> None:
    # One slot: the parent must give it up while it waits, or no child can run.
    handle = await tree_app.start("planner", [f"t{i}" for i in range(20)])
    async with serving(tree_app, concurrency=1):
        out = await handle.result(timeout=60)
    assert len(out["notes"]) == 20


async def test_child_result_and_failure_is_catchable(tree_app: pgjournal.App) -> None:
    one = await tree_app.start("single")
    caught = await tree_app.start("catcher")
    async with serving(tree_app):
        assert (await one.result(timeout=60))["topic"] == "one"
        got = await caught.result(timeout=60)
    assert got[0]["topic"] == "fine"
    assert got[1] == "ChildFailed"
    assert got[2] == ["failed", "KeyError", "broken", True]


@pytest.mark.parametrize("cancel_rest", [False, True])
async def test_wait_first_returns_the_first_and_leaves_or_cancels_the_rest(
        tree_app: pgjournal.App, cancel_rest: bool) -> None:
    handle = await tree_app.start("racer", cancel_rest)
    async with serving(tree_app):
        won, value, slow = await handle.result(timeout=60)
        assert won is True and value["topic"] == "fast"
        statuses = [await tree_app.handle(s).status() for s in slow]
        if cancel_rest:
            assert statuses == ["cancelled", "cancelled"]
        else:
            assert set(statuses) <= {"queued", "running", "suspended"}
            for s in slow:
                await tree_app.signal(s, "go")
            assert [await tree_app.handle(s).result(timeout=30) for s in slow] == ["a", "b"]


@pytest.mark.parametrize("children", [True, False])
async def test_cancel_cascades_through_the_tree_unless_told_not_to(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        children: bool) -> None:
    handle = await tree_app.start("deep", 2)   # 1 + 2 + 4 runs
    async with serving(tree_app, concurrency=8):
        async def all_waiting() -> bool:
            rows = _q(pgjournal_dsn, pgjournal_schema,
                      "SELECT count(*) FROM S.runs WHERE status = 'suspended'")
            return rows[0][0] == 7
        await wait_for(all_waiting, 60, what="the whole tree to wait")
        assert await tree_app.cancel(handle.run_id, children=children) == "cancelled"
        rows = _q(pgjournal_dsn, pgjournal_schema,
                  "SELECT status, count(*) FROM S.runs GROUP BY status ORDER BY status")
    if children:
        assert rows == [("cancelled", 7)]
    else:
        assert rows == [("cancelled", 1), ("suspended", 6)]


async def test_a_child_timeout_fails_the_child_and_the_parent_sees_it(
        tree_app: pgjournal.App) -> None:
    handle = await tree_app.start("timed")
    async with serving(tree_app):
        assert await handle.result(timeout=60) == ["timed out", "TimeoutError"]


async def test_replays_see_the_same_children_and_outcomes(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    handle = await tree_app.start("planner", ["a", "b", "c"])
    async with serving(tree_app):
        first = await handle.result(timeout=60)
        # Replay the whole run from its journal (mark it failed, retry it): the
        # replay must find its children, not spawn new ones.
        _q(pgjournal_dsn, pgjournal_schema,
           "UPDATE S.runs SET status = 'failed', finished_at = now(), due_at = NULL "
           "WHERE id = %s", handle.run_id)
        await tree_app.retry(handle.run_id)
        again = await handle.result(timeout=60)
    assert again == first
    count = _q(pgjournal_dsn, pgjournal_schema,
               "SELECT count(*) FROM S.runs WHERE parent_run_id = %s", handle.run_id)
    assert count == [(3,)]


async def test_cli_lists_children_shows_the_tree_and_cancels_with_or_without_them(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    from .test_cli import run_cli

    def cli(*args: str) -> str:
        res = run_cli(*args, "--dsn", pgjournal_dsn, "--schema", pgjournal_schema)
        assert res.returncode == 0, res.stderr
        return res.stdout

    handle = await tree_app.start("deep", 1)   # a parent and two waiting children
    async with serving(tree_app):
        async def waiting() -> bool:
            rows = _q(pgjournal_dsn, pgjournal_schema,
                      "SELECT count(*) FROM S.runs WHERE status = 'suspended'")
            return rows[0][0] == 3
        await wait_for(waiting, 60, what="the tree to wait")
        kids = [str(r[0]) for r in _q(pgjournal_dsn, pgjournal_schema,
                                      "SELECT id FROM S.runs WHERE parent_run_id = %s",
                                      handle.run_id)]
        listed = await asyncio.to_thread(cli, "runs", "--parent", str(handle.run_id))
        assert sorted(k for k in kids if k in listed) == sorted(kids)
        assert str(handle.run_id) not in listed
        shown = await asyncio.to_thread(cli, "show", str(handle.run_id))
        assert "children (2: 2 suspended)" in shown
        assert "waiting for 2 of 2 child runs to end" in shown
        child = await asyncio.to_thread(cli, "show", kids[0])
        assert f"child of run {handle.run_id}" in child
        out = await asyncio.to_thread(cli, "cancel", kids[0], "--keep-children")
        assert "cancelled" in out
        out = await asyncio.to_thread(cli, "cancel", str(handle.run_id))
        assert "with its 1 unfinished child run" in out  # the other one was cancelled
    statuses = _q(pgjournal_dsn, pgjournal_schema,
                  "SELECT status, count(*) FROM S.runs GROUP BY status")
    assert statuses == [("cancelled", 3)]


async def test_dba_tree_queries_from_the_doc(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    from .test_dba import Db

    db = Db(pgjournal_dsn, pgjournal_schema)
    handle = await tree_app.start("deep", 2)   # 1 + 2 + 4 runs, the leaves wait
    async with serving(tree_app, concurrency=8):
        async def waiting() -> bool:
            rows = db.rows("SELECT count(*) AS n FROM runs WHERE status = 'suspended'")
            return rows[0]["n"] == 7
        await wait_for(waiting, 60, what="the tree to wait")
        tree = db.one_doc("tree-walk", handle.run_id)
        assert [(r["depth"], r["children"], r["children_unended"]) for r in tree] == \
            [(0, 2, 2), (1, 2, 2), (1, 2, 2), (2, 0, 0), (2, 0, 0), (2, 0, 0), (2, 0, 0)]
        assert tree[0]["id"] == handle.run_id and tree[0]["waiting_for_children"] == 2
        assert {r["parent_run_id"] for r in tree[1:3]} == {handle.run_id}
        parents = db.one_doc("tree-waiting")
        assert sorted((r["children_left"], r["child_status"], r["children"])
                      for r in parents) == [(2, "suspended", 2)] * 3
        await tree_app.cancel(handle.run_id)
    db.conn.close()


@pytest.mark.parametrize("how", ["result", "wait_all"])
async def test_retrying_a_parent_after_retrying_its_failed_child_sees_the_new_outcome(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str, how: str) -> None:
    """An uncaught ChildFailed ends the parent's attempt; the operator retries the
    child, then the parent: the parent's retry waits again and gets the value."""
    handle = await tree_app.start("strict", "k", how)
    async with serving(tree_app):
        with pytest.raises(pgjournal.RunFailed) as failed:
            await handle.result(timeout=60)
        assert failed.value.error["type"] == "ChildFailed"
        (kid,) = [r[0] for r in _q(pgjournal_dsn, pgjournal_schema,
                                   "SELECT id FROM S.runs WHERE parent_run_id = %s",
                                   handle.run_id)]
        tree_app.fixed.add("k")  # type: ignore[attr-defined]
        await tree_app.retry(kid)
        assert await tree_app.handle(kid).result(timeout=60) == "k works"
        await tree_app.retry(handle.run_id)
        got = await handle.result(timeout=60)
    assert got == ("k works" if how == "result" else ["k works"])
    spawned = _q(pgjournal_dsn, pgjournal_schema,
                 "SELECT count(*) FROM S.runs WHERE parent_run_id = %s", handle.run_id)
    assert spawned == [(1,)]


async def test_a_fork_shares_children_spawned_before_its_fork_point(
        tree_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    handle = await tree_app.start("planner", ["a", "b"])
    async with serving(tree_app):
        first = await handle.result(timeout=60)
        after_spawn = await tree_app.fork(handle.run_id, from_step=1)
        before_spawn = await tree_app.fork(handle.run_id, from_step=0)
        shared = await after_spawn.result(timeout=60)
        own = await before_spawn.result(timeout=60)
    assert shared == first                      # the same children, their outcomes
    assert own["notes"] == first["notes"] and set(own["ids"]).isdisjoint(first["ids"])
    counts = dict(_q(pgjournal_dsn, pgjournal_schema,
                     "SELECT parent_run_id, count(*) FROM S.runs "
                     "WHERE parent_run_id IS NOT NULL GROUP BY parent_run_id"))
    assert counts == {handle.run_id: 2, before_spawn.run_id: 2}
