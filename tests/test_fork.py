"""``app.fork(run, from_step=N)`` and ``pgjournal fork``: a new run whose journal is
a copy of an old run's entries before position N, replayed by a worker; N and
later execute with the code the worker has now."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, WorkerProcess, serving
from .test_cli import one_line_error, run_cli
from .test_parallel import Calls, until_status
from .test_patches import spawn_code  # noqa: F401  (fixture)

COPIED = ("position", "name", "occurrence", "kind", "status", "output", "error", "tries",
          "started_at", "finished_at", "turn", "calls_before", "fingerprint", "meta")


async def snapshot(app: pgjournal.App, run_id: Any) -> dict[str, Any]:
    store = await app.store()
    return {"run": await store.get_run(run_id), "steps": await store.get_steps(run_id),
            "chunks": await store.get_chunks(run_id), "events": await store.get_events(run_id)}


async def test_fork_of_a_completed_run_replays_before_n_and_executes_the_rest_with_new_code(
        pgjournal_app: pgjournal.App, effects: Effects,
        spawn_code: Callable[..., WorkerProcess]) -> None:  # noqa: F811
    app = pgjournal_app
    old = await app.start("agent", "tides")
    first = spawn_code("v1", env={"PGJ_PROMPT": "old"})
    assert await old.result(timeout=60) == [
        "plan-tides", "thought0", "thought1", "thought2", "draft-old", "review"]
    first.kill(signal.SIGTERM)
    first.wait()
    before = await snapshot(app, old.run_id)
    assert [(s["position"], s["kind"], s["name"]) for s in before["steps"]] == [
        (0, "step", "plan"), (1, "stream", "think"), (2, "step", "draft"), (3, "step", "review")]

    spawn_code("v1", env={"PGJ_PROMPT": "fixed"})     # the prompt is fixed
    fork = await app.fork(old.run_id, from_step=2)     # re-run from the draft
    assert await fork.result(timeout=60) == [
        "plan-tides", "thought0", "thought1", "thought2", "draft-fixed", "review"]

    # Steps before 2 were replayed from the copy (the stream too), 2 and later executed.
    counts = {s: effects.count(fork.run_id, s) for s in
              ("plan-tides", "thought0", "thought1", "thought2", "draft-old", "draft-fixed",
               "review")}
    assert counts == {"plan-tides": 0, "thought0": 0, "thought1": 0, "thought2": 0,
                      "draft-old": 0, "draft-fixed": 1, "review": 1}
    after = await snapshot(app, fork.run_id)
    assert after["run"]["forked_from"] == old.run_id
    assert after["run"]["workflow"] == "agent" and after["run"]["input"] == before["run"]["input"]
    copied = {s["position"]: s for s in after["steps"]}
    for s in before["steps"][:2]:
        assert {k: copied[s["position"]][k] for k in COPIED} == {k: s[k] for k in COPIED}
        assert copied[s["position"]]["attempt"] == 0
        assert copied[s["position"]]["lease_epoch"] == 0
    assert copied[2]["output"] == "draft-fixed" and copied[2]["attempt"] == 1
    assert [c["chunk"] for c in after["chunks"]] == [c["chunk"] for c in before["chunks"]]
    created = after["events"][0]
    assert created["to_status"] == "queued" and created["detail"] == {
        "event": "forked", "forked_from": str(old.run_id), "from_step": 2, "entries": 2,
        "chunks": 3}
    # The old run is untouched.
    assert await snapshot(app, old.run_id) == before


def agent(app: pgjournal.App, calls: Calls, version: dict[str, str]) -> None:
    def act(label: str) -> str:
        calls.log.append(label)
        if label == "draft-broken":
            raise ValueError("the prompt is broken")
        return label

    @app.workflow(max_attempts=1)
    async def writer(run: pgjournal.Run, topic: str) -> list[Any]:
        plan = await run.step("plan", act, f"plan-{topic}")
        new = run.patched("two-drafts")
        draft = await run.step("draft", act, f"draft-{version['prompt']}")
        review = await run.wait_signal("review") if version.get("wait") else None
        return [plan, new, draft, review]


async def test_fork_bounds_and_unknown_runs(pgjournal_app: pgjournal.App) -> None:
    app, calls, version = pgjournal_app, Calls(), {"prompt": "ok"}
    agent(app, calls, version)
    async with serving(app):
        old = await app.start("writer", "x")
        assert await old.result(timeout=30) == ["plan-x", True, "draft-ok", None]
        # journal: plan 0, patch marker 1, draft 2
        with pytest.raises(pgjournal.ConfigurationError, match=r"0 to 2 .*0 to 3"):
            await app.fork(old.run_id, from_step=4)
        with pytest.raises(pgjournal.ConfigurationError, match="from_step"):
            await app.fork(old.run_id, from_step=-1)
        with pytest.raises(pgjournal.UnknownRun):
            await app.fork(uuid.uuid4(), from_step=0)
        with pytest.raises(pgjournal.UnknownRun):
            await app.fork("not-a-run", from_step=0)

        calls.log.clear()
        everything = await app.fork(old.run_id, from_step=3)   # nothing to execute
        assert await everything.result(timeout=30) == ["plan-x", True, "draft-ok", None]
        assert calls.log == []
        nothing = await app.fork(old.run_id, from_step=0)      # a fresh run, same input
        assert await nothing.result(timeout=30) == ["plan-x", True, "draft-ok", None]
        assert calls.log == ["plan-x", "draft-ok"]
        calls.log.clear()
        # From the marker's position: the new code path is decided again (live: True).
        at_marker = await app.fork(old.run_id, from_step=1)
        assert await at_marker.result(timeout=30) == ["plan-x", True, "draft-ok", None]
        assert calls.log == ["draft-ok"]
    for h in (everything, nothing, at_marker):
        row = await h.info()
        assert row["forked_from"] == old.run_id and row["attempt"] == 1


async def test_fork_of_a_failed_run_executes_the_failure_again(
        pgjournal_app: pgjournal.App) -> None:
    """The failed entry that ended the old run is copied (from_step past it) but,
    like on a retry, executed again by the fork; the old run stays failed."""
    app, calls, version = pgjournal_app, Calls(), {"prompt": "broken"}
    agent(app, calls, version)
    async with serving(app):
        old = await app.start("writer", "y")
        with pytest.raises(pgjournal.RunFailed, match="the prompt is broken"):
            await old.result(timeout=30)
        version["prompt"] = "fixed"
        fork = await app.fork(old.run_id, from_step=3)
        assert await fork.result(timeout=30) == ["plan-y", True, "draft-fixed", None]
    assert calls.log == ["plan-y", "draft-broken", "draft-fixed"]
    assert await old.status() == "failed"


async def test_fork_of_a_suspended_run_copies_what_it_committed(
        pgjournal_app: pgjournal.App) -> None:
    app, calls, version = pgjournal_app, Calls(), {"prompt": "ok", "wait": "yes"}
    agent(app, calls, version)
    async with serving(app):
        old = await app.start("writer", "z")
        await until_status(old, "suspended")
        before = await snapshot(app, old.run_id)
        fork = await app.fork(old.run_id, from_step=3)
        await until_status(fork, "suspended")
        assert await snapshot(app, old.run_id) == before
        await app.signal(fork.run_id, "review", "fine")
        assert await fork.result(timeout=30) == ["plan-z", True, "draft-ok", "fine"]
        await app.signal(old.run_id, "review", "also fine")
        assert await old.result(timeout=30) == ["plan-z", True, "draft-ok", "also fine"]
    assert calls.log == ["plan-z", "draft-ok"]


async def test_cli_fork(pgjournal_app: pgjournal.App, pgjournal_dsn: str,
                        pgjournal_schema: str) -> None:
    app, calls = pgjournal_app, Calls()
    agent(app, calls, {"prompt": "ok"})
    async with serving(app):
        old = await app.start("writer", "c")
        await old.result(timeout=30)
    base = ["--dsn", pgjournal_dsn, "--schema", pgjournal_schema]

    res = run_cli(*base, "fork", str(old.run_id), "--from-step", "2")
    assert res.returncode == 0, res.stderr
    new_id = uuid.UUID(res.stdout.strip())
    row = await app.handle(new_id).info()
    assert row["forked_from"] == old.run_id and row["status"] == "queued"
    res = run_cli(*base, "fork", str(old.run_id), "--from-step", "0", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["forked_from"] == str(old.run_id) and out["from_step"] == 0
    assert (await app.handle(out["run_id"]).info())["forked_from"] == old.run_id

    one_line_error(run_cli(*base, "fork", str(old.run_id), "--from-step", "9"),
                   "cannot fork", "0 to 3")
    one_line_error(run_cli(*base, "fork", str(uuid.uuid4()), "--from-step", "0"),
                   "does not exist")
    assert run_cli(*base, "fork", str(old.run_id)).returncode == 2   # --from-step required
    helped = run_cli("fork", "--help")
    assert helped.returncode == 0
    assert "examples:" in helped.stdout and "pgjournal fork" in helped.stdout
    assert "--from-step" in helped.stdout and "replay" in helped.stdout


# -- issue 20, row 4: a fork keeps its run's concurrency key and deadline rule ------------------

async def test_a_fork_keeps_the_concurrency_key_and_does_not_run_beside_the_original(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Key limited to 1, the original holds it (blocked in a step): the fork is
    not claimable until the original ends, and never runs beside it."""
    app = pgjournal_app
    entered: list[str] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    @app.workflow()
    async def keyed(run: pgjournal.Run) -> str:
        async def hold() -> str:
            entered.append(str(run.id))
            inside.set()
            await release.wait()
            return "held"
        return await run.step("hold", hold)  # type: ignore[no-any-return]

    await app.set_concurrency_limit("k1", 1)
    async with serving(app, concurrency=4):
        old = await app.start("keyed", concurrency_key="k1")
        await asyncio.wait_for(inside.wait(), 60)
        assert entered == [str(old.run_id)]
        fork = await app.fork(old.run_id, from_step=0)
        store = await app.store()
        ghost = uuid.uuid4()
        await store.register_worker(ghost, "test", 0, ["default"], 1, lease=60.0)
        # A claim of the fork's queue while the original holds the key gets nothing.
        claimed = await store.claim(ghost, ["default"], 10, 60.0)
        row = await store.get_run(fork.run_id)
        assert row is not None
        assert row["concurrency_key"] == "k1", "the fork lost its run's concurrency key"
        assert [c.run_id for c in claimed] == [] and row["status"] == "queued", (
            f"the fork was claimed beside the original ({row['status']}, {claimed})")
        release.set()
        assert await old.result(timeout=60) == "held"
        assert await fork.result(timeout=60) == "held"
    # From the event log: the fork was claimed after the original completed.
    # By event id, not `at` (a transaction's start: a claim that began before
    # the completion committed, and waited for the key, carries an earlier time).
    events = {h: await store.get_events(h) for h in (old.run_id, fork.run_id)}
    old_done = next(e["id"] for e in events[old.run_id] if e["to_status"] == "completed")
    fork_runs = [e["id"] for e in events[fork.run_id] if e["to_status"] == "running"]
    assert fork_runs and min(fork_runs) > old_done


async def test_a_fork_of_a_run_with_a_deadline_gets_the_same_timeout_from_its_start(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = pgjournal_app

    @app.workflow()
    async def waits(run: pgjournal.Run) -> str:
        await run.wait_signal("go")
        return "done"

    @app.workflow()
    async def parent(run: pgjournal.Run) -> str:
        kid = await run.spawn("waits", timeout=3600)
        return await kid.result()  # type: ignore[no-any-return]

    async with serving(app):
        top = await app.start("parent")
        await until_status(top, "suspended")
        store = await app.store()
        (kid,) = [r["id"] for r in await store.list_runs(workflow="waits")]
        fork = await app.fork(kid, from_step=0)
        await until_status(fork, "suspended")
        await app.cancel(top.run_id)
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            f'SELECT id, deadline_at, created_at, now() FROM "{pgjournal_schema}".runs '
            "WHERE id = ANY(%s)", ([kid, fork.run_id],))}
    deadline, created, now = rows[fork.run_id]
    assert deadline is not None, "the fork lost its run's deadline rule"
    # The same timeout, counted from the fork's creation (not the original's deadline).
    assert abs((deadline - created).total_seconds() - 3600) < 1
    assert deadline > rows[kid][0] and deadline > now
    await app.cancel(fork.run_id)
