"""Rate buckets as a run sees them: ``step(..., rate=...)`` takes units before the
step (journaled, with the time they are ready) and waits for them, and
``report_usage`` corrects the bucket by what the step really used.

``reserved`` is the run's record of the units of the last take, per bucket
(what ``report_usage`` corrects)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._unwind import Suspended
from ..tracing import traced

if TYPE_CHECKING:
    from .engine import Engine

#: A rate take whose units are ready within this many seconds waits in the
#: worker; a longer wait suspends the run (no worker held) until they are.
RATE_LOCAL_WAIT_SECONDS = 1.0

#: ``rate=`` of a step: (bucket, units) or (bucket, units, usage_from_result).
RateSpec = tuple[str, float] | tuple[str, float, Callable[[Any], float]]


def call_rate(engine: Engine, rate: RateSpec) -> tuple[int, int, str, float]:
    """Take the position of a rate take (synchronously, with the step's call)."""
    if not isinstance(rate, tuple) or len(rate) not in (2, 3) \
            or not isinstance(rate[0], str) or not rate[0] \
            or not isinstance(rate[1], int | float) or isinstance(rate[1], bool) \
            or rate[1] <= 0 or (len(rate) == 3 and not callable(rate[2])):
        raise TypeError("rate must be (bucket, units) or (bucket, units, usage_fn) with "
                        f"units > 0, not {rate!r}")
    bucket, units = rate[0], float(rate[1])
    position, occurrence = engine.call(f"rate:{bucket}")
    return position, occurrence, bucket, units


@traced("rate")
async def take_units(engine: Engine, position: int, occurrence: int, bucket: str,
                     units: float, *, reserved: dict[str, float]) -> int | None:
    """Take ``units`` from ``bucket`` (journaled, with the time they are ready),
    then wait until they are (``wait_until``). Returns the attempt that took
    them last when the take was replayed, None when it was taken now."""
    name = f"rate:{bucket}"
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, "rate", name, None)
        ready = datetime.fromisoformat(entry["output"]["ready_at"])
        reserved[bucket] = float(entry["output"]["units"])
        await engine.await_replay_turn(entry["turn"], entry["calls_before"], name)
        await wait_until(engine, ready, position, occurrence, name)
        return int(entry["attempt"])
    await engine.enter_live()
    try:
        turn, calls = engine.take_turn()
        try:
            outcome, ready = await engine.db(engine.store.take_units(
                run=engine.id, epoch=engine.epoch, position=position, name=name,
                occurrence=occurrence, bucket=bucket, units=units,
                attempt=engine.attempt, turn=turn, calls_before=calls))
            if outcome.startswith("lost:"):
                engine.lose(outcome[5:])
            reserved[bucket] = units
            await engine.deliver(turn)
        finally:
            engine.drop(turn)
    finally:
        engine.exit_live()
    await wait_until(engine, ready, position, occurrence, name)
    return None


async def retake_units(engine: Engine, position: int, occurrence: int, bucket: str,
                       units: float, *, reserved: dict[str, float], in_step: bool) -> None:
    """Take a step's units again for a new call of its function, into the take
    already journaled at ``position`` (``take_units`` with ``again``), then wait
    until they are ready: in the worker when called between the tries of a
    step (``in_step``: the step is live work), else as any take."""
    name = f"rate:{bucket}"
    if not in_step:
        await engine.enter_live()
    try:
        outcome, ready = await engine.db(engine.store.take_units(
            run=engine.id, epoch=engine.epoch, position=position, name=name,
            occurrence=occurrence, bucket=bucket, units=units, attempt=engine.attempt,
            again=True))
        if outcome.startswith("lost:"):
            engine.lose(outcome[5:])
        reserved[bucket] = units
    finally:
        if not in_step:
            engine.exit_live()
    await wait_until(engine, ready, position, occurrence, name)


async def wait_until(engine: Engine, ready: datetime, position: int, occurrence: int,
                     name: str) -> None:
    """Wait for a rate take to be ready: here if it is soon (or other work of the
    run is in flight), else suspended until then (no worker held)."""
    wait = (ready - engine.db_now()).total_seconds()
    if wait <= 0:
        return
    if wait <= RATE_LOCAL_WAIT_SECONDS or engine.busy:
        await asyncio.sleep(wait)
        return
    gate = await engine.close_gate()
    try:
        outcome, due = await engine.db(engine.store.sleep_until(
            run=engine.id, epoch=engine.epoch, position=position, name=name,
            occurrence=occurrence, seconds=0, wake_at=ready, attempt=engine.attempt))
        if outcome == "suspended":
            engine.suspend(gate, due)
            raise Suspended(due)
        engine.open_gate(gate)
        if outcome != "due":
            engine.lose(outcome)
    finally:
        if not gate.done():
            engine.open_gate(gate)


async def report_usage(engine: Engine, bucket: str, units: float, *,
                       reserved: dict[str, float]) -> None:
    """``Run.report_usage``: correct ``bucket`` by what the last take really used."""
    taken = reserved.get(bucket)
    if taken is None:
        raise ValueError(f"report_usage({bucket!r}): no step of this run took units "
                         f"from {bucket!r} (step(..., rate=({bucket!r}, units)))")
    if not isinstance(units, int | float) or isinstance(units, bool) or units < 0:
        raise TypeError(f"report_usage needs the units used (a number >= 0), not {units!r}")
    name = f"usage:{bucket}"
    position, occurrence = engine.call(name)
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, "rate", name, None)
        await engine.await_replay_turn(entry["turn"], entry["calls_before"], name)
        return
    await engine.enter_live()
    try:
        turn, calls = engine.take_turn()
        try:
            outcome, _ready = await engine.db(engine.store.take_units(
                run=engine.id, epoch=engine.epoch, position=position, name=name,
                occurrence=occurrence, bucket=bucket, units=float(units) - taken,
                attempt=engine.attempt, turn=turn, calls_before=calls))
            if outcome.startswith("lost:"):
                engine.lose(outcome[5:])
            await engine.deliver(turn)
        finally:
            engine.drop(turn)
    finally:
        engine.exit_live()
