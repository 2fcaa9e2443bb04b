"""Child runs as their parent executes them: spawns and waits, each a journal
entry of the parent. ``Family`` is the parent's side: ``ChildRun`` handles
(``pgjournal.children``) ask it to wait for them and to decode their output.
A wait whose children have not ended suspends the parent (no worker holds
it); the transaction that ends the last awaited child wakes it."""

from __future__ import annotations

import json
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from .._unwind import Suspended
from ..children import ChildRun, ChildSettings, child_id
from ..tracing import traced
from .engine import fingerprint

if TYPE_CHECKING:
    from .engine import Engine

#: The arguments of each child: (args, kwargs).
Calls = list[tuple[tuple[Any, ...], dict[str, Any]]]


class Family:
    """The children of one execution of a run (the parent's side of ``ChildRun``)."""

    def __init__(self, engine: Engine, settings: ChildSettings | None) -> None:
        self.engine = engine
        self.settings = settings

    def loads(self, text: str) -> Any:
        """A child's output, decoded by the parent's serializer."""
        return self.engine.ser.loads(text)

    async def spawn(self, workflow: str, calls: Calls, *, queue: str | None,
                    keys: list[str] | None, timeout: float | None,
                    concurrency_key: str | None) -> list[ChildRun]:
        return await _spawn(self.engine, workflow, calls, queue=queue, keys=keys,
                            timeout=timeout, concurrency_key=concurrency_key, family=self)

    async def wait_all(self, children: list[ChildRun], *,
                       return_exceptions: bool) -> list[Any]:
        kids = self._own(children)
        if not kids:
            return []
        if any(not c.done for c in kids):
            results = await _wait_children(self.engine, "wait_all", kids, "all", False,
                                           raise_failures=not return_exceptions)
            for c, outcome in zip(kids, results, strict=True):
                c._settle(outcome)
        return [c._value(return_exceptions=return_exceptions) for c in kids]

    async def wait_first(self, children: list[ChildRun], *, cancel_rest: bool) -> ChildRun:
        kids = self._own(children)
        if not kids:
            raise ValueError("wait_first needs at least one child")
        result = await _wait_children(self.engine, "wait_first", kids, "first", cancel_rest,
                                      raise_failures=False)
        winner = kids[int(result["index"])]
        winner._settle(result["outcome"])
        return winner

    async def wait_one(self, child: ChildRun) -> None:
        """``child.result()``: wait for one child; a failure it raises is retried
        by a retry of this run (see ``_wait_children``)."""
        (outcome,) = await _wait_children(self.engine, "result", [child], "all", False,
                                          raise_failures=True)
        child._settle(outcome)

    def _own(self, children: list[ChildRun]) -> list[ChildRun]:
        kids = list(children)
        for c in kids:
            if not isinstance(c, ChildRun) or c._parent is not self:
                raise TypeError(f"{c!r} is not a child run spawned by this run")
        return kids


@traced("spawn")
async def _spawn(engine: Engine, workflow: str, calls: Calls, *, queue: str | None,
                 keys: list[str] | None, timeout: float | None,
                 concurrency_key: str | None, family: Family) -> list[ChildRun]:
    if not isinstance(workflow, str) or not workflow:
        raise TypeError("spawn takes the child workflow's registered name")
    position, occurrence = engine.call(workflow)
    fp = fingerprint(None, [workflow, [list(a) for a, _ in calls], keys],
                     [k for _, k in calls])
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, "spawn", workflow, fp)
        ids = [uuidlib.UUID(i) for i in entry["output"]]
        await engine.await_replay_turn(entry["turn"], entry["calls_before"],
                                       f"spawn {workflow!r}")
        return [ChildRun(family, i, workflow) for i in ids]
    if family.settings is None:
        raise TypeError("this run cannot spawn children (no App behind it)")
    child_queue, max_attempts, max_recoveries = family.settings(workflow, queue)
    ids = [child_id(engine.id, position, n, None if keys is None else keys[n])
           for n in range(len(calls))]
    if len(set(ids)) != len(ids):
        raise ValueError("spawn_many got the same key twice")
    inputs = [engine.ser.dumps({"args": list(a), "kwargs": k},
                               what=f"input of child {n} of {workflow!r} of run {engine.id}")
              for n, (a, k) in enumerate(calls)]
    engine.budget(38 * len(ids))
    await engine.enter_live()
    try:
        turn, calls_before = engine.take_turn()
        try:
            lost = await engine.db(engine.store.spawn_runs(
                run=engine.id, epoch=engine.epoch, position=position, name=workflow,
                occurrence=occurrence, attempt=engine.attempt, turn=turn,
                calls_before=calls_before, fingerprint=fp, ids=ids, workflow=workflow,
                queue=child_queue, inputs=inputs, max_attempts=max_attempts,
                max_recoveries=max_recoveries, timeout=timeout,
                concurrency_key=concurrency_key))
            if lost is not None:
                engine.lose(lost)
            await engine.deliver(turn)
        finally:
            engine.drop(turn)
    finally:
        engine.exit_live()
    return [ChildRun(family, i, workflow) for i in ids]


@traced("children")
async def _wait_children(engine: Engine, name: str, kids: list[ChildRun], mode: str,
                         cancel_rest: bool, *, raise_failures: bool) -> Any:
    """Journal the outcomes of ``kids`` once the wait is over, suspending the run
    until then. With ``raise_failures`` an outcome the workflow will raise
    (``ChildFailed``) is journaled as a failure: if it ends this attempt, a
    retry of the run waits again, and sees the child's new outcome if the
    child was retried meanwhile."""
    position, occurrence = engine.call(name)
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, "children", name, None)
        if entry["status"] == "completed" or await engine.replays_failure(position, entry):
            await engine.await_replay_turn(entry["turn"], entry["calls_before"], name)
            return entry["output"]
        engine.skip(entry)
    ids = [c.id for c in kids]
    while True:
        gate = await engine.close_gate()
        turn, calls = engine.take_turn()
        try:
            outcome, results = await engine.db(engine.store.wait_children(
                run=engine.id, epoch=engine.epoch, position=position, name=name,
                occurrence=occurrence, attempt=engine.attempt, turn=turn,
                calls_before=calls, children=ids, mode=mode, cancel_rest=cancel_rest,
                raise_failures=raise_failures))
            if outcome == "suspended":
                engine.suspend(gate, None)
                raise Suspended(None)
            engine.open_gate(gate)
            if outcome == "ready":
                engine.budget(len(json.dumps(results)))
                await engine.deliver(turn)
                return results
            if outcome == "lost":
                engine.lose(str(results))
        finally:
            engine.drop(turn)
            if not gate.done():
                engine.open_gate(gate)
        # 'again': children ended while the parent's row was locked; the rest
        # must be locked before it (one lock order): ask once more.
