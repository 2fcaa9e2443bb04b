"""Changing code under running runs: ``run.patched`` and ``run.deprecate_patch``.

In process (a suspended run resumed by other code), and across kill -9 of real
worker processes whose code differs (``tests.procs_codechange``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import pgjournal
from pgjournal.run import Run

from .conftest import ROOT, Effects, WorkerProcess, serving, wait_for
from .test_parallel import Calls, until_status

PATCH = "retry-with-backoff"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def spawn_code(pgjournal_dsn: str, pgjournal_schema: str,
               tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_code("v2", hold=[f"{run}:notify"])``: a ``tests.procs_codechange``
    worker process with that code version; all are killed at teardown."""
    started: list[WorkerProcess] = []

    def spawn(code: str, *, hold: Sequence[str] = (), lease: float = 1.0,
              env: dict[str, str] | None = None) -> WorkerProcess:
        log = tmp_path / f"worker-{code}-{len(started)}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PGJ_CODE": code,
                    "PGJ_HOLD": ",".join(hold), **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs_codechange", pgjournal_dsn,
             pgjournal_schema, "--lease", str(lease)],
            cwd=ROOT, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wp = WorkerProcess(proc, log)
        started.append(wp)
        return wp

    yield spawn
    for wp in started:
        if wp.proc.poll() is None:
            wp.kill()
            wp.proc.wait(10)


async def journal(app: pgjournal.App, run_id: Any) -> list[tuple[int, str, str]]:
    steps = await (await app.store()).get_steps(run_id)
    return [(s["position"], s["kind"], s["name"]) for s in steps]


async def events(app: pgjournal.App, run_id: Any, event: str) -> list[Any]:
    rows = await (await app.store()).get_events(run_id)
    return [r["detail"] for r in rows if (r["detail"] or {}).get("event") == event]


OLD = [(0, "step", "fetch"), (1, "step", "charge"), (2, "step", "notify")]
NEW = [(0, "step", "fetch"), (1, "patch", PATCH), (2, "step", "setup-backoff"),
       (3, "step", "charge"), (4, "step", "notify")]
NEW_UNMARKED = [(0, "step", "fetch"), (1, "step", "setup-backoff"), (2, "step", "charge"),
                (3, "step", "notify")]


def kill9(worker: WorkerProcess) -> None:
    worker.kill(signal.SIGKILL)
    worker.wait()


# -- across kill -9 of real workers whose code changed --------------------------------------


async def test_old_journal_replays_the_old_path_and_new_runs_take_the_new_one(
        pgjournal_app: pgjournal.App, effects: Effects,
        spawn_code: Callable[..., WorkerProcess]) -> None:
    app = pgjournal_app
    passed = await app.start("billing")    # v1 journals fetch, charge; killed in notify
    before = await app.start("billing")    # v1 journals fetch; killed in charge
    old = spawn_code("v1", hold=[f"{passed.run_id}:notify", f"{before.run_id}:charge-plain"])
    await effects.wait(passed.run_id, "notify")
    await effects.wait(before.run_id, "charge-plain")
    kill9(old)

    spawn_code("v2")
    fresh = await app.start("billing")
    # Its journal went past the patch point without the marker: the old path,
    # with the journaled charge (positions unchanged: the False took none).
    assert await passed.result(timeout=60) == ["fetch", "charge-plain", "notify"]
    # Its journal ends before the patch point: the new path, marker journaled.
    assert await before.result(timeout=60) == ["fetch", "charge-backoff", "notify"]
    assert await fresh.result(timeout=60) == ["fetch", "charge-backoff", "notify"]

    assert [effects.count(passed.run_id, s) for s in
            ("fetch", "charge-plain", "setup-backoff", "charge-backoff", "notify")] == \
        [1, 1, 0, 0, 2]
    assert [effects.count(before.run_id, s) for s in
            ("fetch", "charge-plain", "setup-backoff", "charge-backoff", "notify")] == \
        [1, 1, 1, 1, 1]
    assert await journal(app, passed.run_id) == OLD
    assert await journal(app, before.run_id) == NEW
    assert await journal(app, fresh.run_id) == NEW
    for h in (passed, before, fresh):
        assert await events(app, h.run_id, "unreplayed_entries") == []


async def test_a_run_with_the_marker_replays_the_new_path_after_kill9(
        pgjournal_app: pgjournal.App, effects: Effects,
        spawn_code: Callable[..., WorkerProcess]) -> None:
    app = pgjournal_app
    late = await app.start("billing")      # killed in notify: marker and charge journaled
    early = await app.start("billing")     # killed right after the marker (in setup-backoff)
    first = spawn_code("v2", hold=[f"{late.run_id}:notify", f"{early.run_id}:setup-backoff"])
    await effects.wait(late.run_id, "notify")
    await effects.wait(early.run_id, "setup-backoff")
    kill9(first)

    spawn_code("v2")
    assert await late.result(timeout=60) == ["fetch", "charge-backoff", "notify"]
    assert await early.result(timeout=60) == ["fetch", "charge-backoff", "notify"]
    assert [effects.count(late.run_id, s) for s in
            ("fetch", "charge-plain", "setup-backoff", "charge-backoff", "notify")] == \
        [1, 0, 1, 1, 2]
    assert [effects.count(early.run_id, s) for s in
            ("fetch", "charge-plain", "setup-backoff", "charge-backoff", "notify")] == \
        [1, 0, 2, 1, 1]
    assert await journal(app, late.run_id) == NEW
    assert await journal(app, early.run_id) == NEW   # one marker, not two


async def test_deprecate_patch_replays_journals_with_and_without_the_marker(
        pgjournal_app: pgjournal.App, effects: Effects,
        spawn_code: Callable[..., WorkerProcess]) -> None:
    app = pgjournal_app
    marked = await app.start("billing")     # v2, new path, killed in notify
    unreached = await app.start("billing")  # v2, killed in fetch: no marker yet
    v2 = spawn_code("v2", hold=[f"{marked.run_id}:notify", f"{unreached.run_id}:fetch"])
    await effects.wait(marked.run_id, "notify")
    await effects.wait(unreached.run_id, "fetch")
    kill9(v2)

    unmarked = await app.start("billing")   # v3 journals no marker; killed in notify
    v3 = spawn_code("v3", hold=[f"{unmarked.run_id}:notify"])
    await effects.wait(unmarked.run_id, "notify")
    kill9(v3)

    spawn_code("v3")
    for h in (marked, unreached, unmarked):
        assert await h.result(timeout=60) == ["fetch", "charge-backoff", "notify"]
    assert [effects.count(marked.run_id, s) for s in
            ("fetch", "setup-backoff", "charge-backoff", "notify")] == [1, 1, 1, 2]
    assert [effects.count(unreached.run_id, s) for s in
            ("fetch", "setup-backoff", "charge-backoff", "notify")] == [2, 1, 1, 1]
    assert [effects.count(unmarked.run_id, s) for s in
            ("fetch", "setup-backoff", "charge-backoff", "notify")] == [1, 1, 1, 2]
    assert await journal(app, marked.run_id) == NEW   # the marker was consumed
    assert await journal(app, unreached.run_id) == NEW_UNMARKED
    assert await journal(app, unmarked.run_id) == NEW_UNMARKED
    for h in (marked, unreached, unmarked):
        assert await events(app, h.run_id, "unreplayed_entries") == []


# -- in process: a suspended run resumed by changed code ------------------------------------


def billing_app(app: pgjournal.App, code: dict[str, str], calls: Calls) -> None:
    """``billing`` with a signal wait before notify; ``code["v"]`` picks the version
    the next execution (or replay) runs."""
    def act(label: str) -> str:
        calls.log.append(label)
        return label

    @app.workflow(max_attempts=1)
    async def billing(run: pgjournal.Run) -> list[str]:
        fetched = await run.step("fetch", act, "fetch")
        version = code["v"]
        answer = None
        if version == "v2":
            answer = run.patched(PATCH)
            assert type(answer) is bool
            assert run.patched(PATCH) is answer   # fixed for the execution
        elif version == "v3":
            run.deprecate_patch(PATCH)
        if version == "v1" or answer is False:
            charged = await run.step("charge", act, "charge-plain")
        else:
            await run.step("setup-backoff", act, "setup-backoff")
            charged = await run.step("charge", act, "charge-backoff")
        await run.wait_signal("go")
        notified = await run.step("notify", act, "notify")
        return [fetched, charged, notified]


async def test_patched_is_a_plain_method_returning_bool() -> None:
    assert not inspect.iscoroutinefunction(Run.patched)
    assert not inspect.iscoroutinefunction(Run.deprecate_patch)


async def run_through(app: pgjournal.App, code: dict[str, str], start: str,
                      resume: str) -> pgjournal.RunHandle:
    """Start under ``start`` code, suspend, resume under ``resume`` code."""
    code["v"] = start
    async with serving(app):
        handle = await app.start("billing")
        await until_status(handle, "suspended")
    code["v"] = resume
    await app.signal(handle.run_id, "go")
    return handle


@pytest.mark.parametrize(("start", "resume", "output", "shape"), [
    ("v1", "v2", "charge-plain", "old"),      # journal passed the point: False, no position
    ("v2", "v2", "charge-backoff", "new"),    # marker found: True
    ("v2", "v3", "charge-backoff", "new"),    # deprecated: the marker's position is taken
    ("v3", "v3", "charge-backoff", "unmarked"),
    ("v3", "v4", "charge-backoff", "unmarked"),
])
async def test_resumed_by_other_code(pgjournal_app: pgjournal.App, start: str, resume: str,
                                     output: str, shape: str) -> None:
    app, code, calls = pgjournal_app, {"v": start}, Calls()
    billing_app(app, code, calls)
    handle = await run_through(app, code, start, resume)
    async with serving(app):
        assert await handle.result(timeout=30) == ["fetch", output, "notify"]
    # Each step ran once: the resumed code replayed what the first code journaled.
    assert sorted(calls.log) == sorted(
        ["fetch", "notify", *(["charge-plain"] if shape == "old"
                              else ["setup-backoff", "charge-backoff"])])
    positions = [(p, k, n) for p, k, n in await journal(app, handle.run_id)]
    expected = {"old": OLD, "new": NEW, "unmarked": NEW_UNMARKED}[shape]
    # The signal wait sits before notify.
    assert [e for e in positions if e[1] != "signal"] == [
        (p + (1 if n == "notify" else 0), k, n) for p, k, n in expected]
    assert await events(app, handle.run_id, "unreplayed_entries") == []


@pytest.mark.parametrize(("start", "resume"), [
    ("v1", "v3"),   # deprecated before the runs on the old path drained
    ("v2", "v4"),   # the deprecation removed while runs with the marker remain
])
async def test_removing_too_early_fails_loudly(pgjournal_app: pgjournal.App, start: str,
                                               resume: str) -> None:
    app, code, calls = pgjournal_app, {"v": start}, Calls()
    billing_app(app, code, calls)
    handle = await run_through(app, code, start, resume)
    async with serving(app):
        with pytest.raises(pgjournal.RunFailed, match="NonDeterminismError"):
            await handle.result(timeout=30)


async def test_parallel_branches_each_with_a_patch_replay(pgjournal_app: pgjournal.App) -> None:
    app, calls = pgjournal_app, Calls()

    async def work(label: str) -> str:
        calls.log.append(label)
        await asyncio.sleep(0.01 * (3 - int(label[-1])))   # later branches finish first
        return label

    @app.workflow()
    async def fan(run: pgjournal.Run) -> Any:
        async def branch(i: int) -> list[Any]:
            first = await run.step(f"first-{i}", work, f"first-{i}")
            new = run.patched(f"fix-{i}")
            second = await run.step(f"second-{i}", work, f"second-{i}")
            return [first, new, second]

        out = await asyncio.gather(*[branch(i) for i in range(3)])
        shared = run.patched("shared")        # after the gather: one marker
        await run.wait_signal("go")
        return [out, shared, run.patched("shared")]

    async with serving(app):
        handle = await app.start(fan)
        await until_status(handle, "suspended")
        await app.signal(handle.run_id, "go")
        result = await handle.result(timeout=30)
    assert result == [[[f"first-{i}", True, f"second-{i}"] for i in range(3)], True, True]
    assert sorted(calls.log) == sorted(f"{w}-{i}" for w in ("first", "second")
                                       for i in range(3))
    marks = [n for _p, k, n in await journal(app, handle.run_id) if k == "patch"]
    assert sorted(marks) == ["fix-0", "fix-1", "fix-2", "shared"]
    assert await events(app, handle.run_id, "unreplayed_entries") == []


async def test_a_marker_is_committed_before_anything_after_it(
        pgjournal_app: pgjournal.App, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker's write is held back: neither the next step's entry nor the
    run's completion may be committed before it (a crash would otherwise leave
    later entries whose positions assume a marker the journal lacks)."""
    app = pgjournal_app
    store = await app.store()
    release = asyncio.Event()
    real = store.journal_step

    async def held(**params: Any) -> str | None:
        if params["kind"] == "patch":
            await release.wait()
        return await real(**params)

    monkeypatch.setattr(store, "journal_step", held)
    ran: list[str] = []

    def after() -> str:
        ran.append("after")
        return "after"

    @app.workflow()
    async def marked(run: pgjournal.Run, more: bool) -> Any:
        new = run.patched("p")
        if more:
            return [new, await run.step("after", after)]
        return [new]

    async with serving(app):
        with_step = await app.start(marked, True)
        ending = await app.start(marked, False)
        await wait_for(lambda: asyncio.sleep(0, ran), 30, what="the step after the patch")
        await asyncio.sleep(0.5)
        assert await journal(app, with_step.run_id) == []
        assert await journal(app, ending.run_id) == []
        assert await with_step.status() == "running"
        assert await ending.status() == "running"
        release.set()
        assert await with_step.result(timeout=30) == [True, "after"]
        assert await ending.result(timeout=30) == [True]
    assert await journal(app, with_step.run_id) == [(0, "patch", "p"), (1, "step", "after")]
    assert await journal(app, ending.run_id) == [(0, "patch", "p")]


async def test_patch_names_are_checked(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow(max_attempts=1)
    async def bad(run: pgjournal.Run) -> None:
        run.patched("")

    async with serving(app):
        handle = await app.start(bad)
        with pytest.raises(pgjournal.RunFailed, match="non-empty string"):
            await handle.result(timeout=30)


async def test_patched_as_the_first_call_of_a_resumed_run(pgjournal_app: pgjournal.App) -> None:
    """Nothing was awaited on the run yet, so the journal's markers must be known
    before the workflow starts (the worker loads the outline first)."""
    app, calls = pgjournal_app, Calls()

    @app.workflow(max_attempts=1)
    async def first(run: pgjournal.Run) -> Any:
        new = run.patched("first")
        calls.log.append(f"patched={new}")
        got = await run.wait_signal("go")
        return [new, got]

    async with serving(app):
        handle = await app.start(first)
        await until_status(handle, "suspended")
        await app.signal(handle.run_id, "go", 1)
        assert await handle.result(timeout=30) == [True, 1]
    assert calls.log == ["patched=True", "patched=True"]
    assert await journal(app, handle.run_id) == [(0, "patch", "first"), (1, "signal", "go")]
