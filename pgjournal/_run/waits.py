"""Waits: a signal and a durable timer. Both close the engine's gate, go to the
database once no live work of the run is in flight, and either get their
answer or suspend the run (no worker held) until the database wakes it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._unwind import Suspended
from ..tracing import traced

if TYPE_CHECKING:
    from .engine import Engine


@traced("signal")
async def wait_signal(engine: Engine, name: str, timeout: float | None) -> Any:
    """``Run.wait_signal``: the payload of the next signal ``name`` sent to this run.

    If none has arrived, the run is suspended (no worker is held) until one
    does, or until ``timeout`` seconds after the first wait, when
    ``TimeoutError`` is raised here. A retry of a run that failed on that
    timeout waits again, with a fresh deadline.
    """
    position, occurrence = engine.call(name)
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, "signal", name, None)
        what = f"signal {name!r}"
        if entry["status"] == "completed":
            value = engine.ser.loads(entry["output"])
            await engine.await_replay_turn(entry["turn"], entry["calls_before"], what)
            return value
        if await engine.replays_failure(position, entry):
            await engine.await_replay_turn(entry["turn"], entry["calls_before"], what)
            raise TimeoutError((entry["error"] or {}).get("message",
                                                          f"no signal {name!r}"))
        engine.skip(entry)
    gate = await engine.close_gate()
    turn, calls = engine.take_turn()
    try:
        outcome, payload = await engine.db(engine.store.wait_signal(
            run=engine.id, epoch=engine.epoch, position=position, name=name,
            occurrence=occurrence, timeout=timeout, attempt=engine.attempt, turn=turn,
            calls_before=calls))
        if outcome == "suspended":
            until = None if timeout is None else engine.db_now() + timedelta(seconds=timeout)
            engine.suspend(gate, until)
            raise Suspended(until)
        engine.open_gate(gate)
        if outcome == "received":
            value = engine.ser.loads(payload)
            await engine.deliver(turn)
            return value
        if outcome == "timeout":
            await engine.deliver(turn)
            raise TimeoutError(f"no signal {name!r} arrived within {timeout} s")
        engine.lose(str(payload))
    finally:
        engine.drop(turn)
        if not gate.done():
            engine.open_gate(gate)


@traced("sleep")
async def sleep(engine: Engine, name: str, seconds: float) -> None:
    """A durable timer: the run is suspended (no worker held) until it is due."""
    position, occurrence = engine.call(name)
    entry = await engine.entry(position)
    wake_at: datetime | None = None
    if entry is not None:
        engine.check(position, entry, "sleep", name, None)
        wake_at = datetime.fromisoformat(entry["output"])
        if wake_at <= engine.db_now():
            await engine.await_replay_turn(entry["turn"], entry["calls_before"],
                                           f"sleep {name!r}")
            return
    gate = await engine.close_gate()
    turn, calls = engine.take_turn()
    try:
        outcome, due = await engine.db(engine.store.sleep_until(
            run=engine.id, epoch=engine.epoch, position=position, name=name,
            occurrence=occurrence, seconds=seconds, wake_at=wake_at,
            attempt=engine.attempt, turn=turn if entry is None else None,
            calls_before=calls if entry is None else None))
        if outcome == "suspended":
            engine.suspend(gate, due)
            raise Suspended(due)
        engine.open_gate(gate)
        if outcome == "due":
            if entry is None:
                await engine.deliver(turn)
            else:
                engine.drop(turn)
                await engine.await_replay_turn(entry["turn"], entry["calls_before"],
                                               f"sleep {name!r}")
            return
        engine.lose(outcome)
    finally:
        engine.drop(turn)
        if not gate.done():
            engine.open_gate(gate)
