"""Steps and facts: a function's result, or a fact of the moment (the time, a
UUID), executed once per run and journaled; a replay gets the journaled value."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import describe_exception, rebuild_exception
from ..errors import TerminalError
from ..tracing import traced
from . import flow
from .engine import fingerprint

if TYPE_CHECKING:
    from .engine import Engine
    from .flow import RateSpec


class _StaleInThread(Exception):
    """A sync step's thread found the lease no longer fresh before calling it."""


async def call_step_fn(fn: Callable[..., Any], args: Any, kwargs: Any, *,
                       guard: Callable[[], bool] | None = None) -> Any:
    """Call a step function: awaited if async, in a thread if sync (so it cannot
    block the event loop and the other runs of the worker).

    ``guard`` is checked again in the thread right before a sync function is
    called: waiting for a free thread (or a pause) may outlast the lease that
    was checked on the event loop. It raises ``_StaleInThread`` then.
    """
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)

    def guarded() -> Any:
        if guard is not None and not guard():
            raise _StaleInThread
        return fn(*args, **kwargs)

    result = await asyncio.to_thread(guarded)
    if inspect.isawaitable(result):
        result = await result
    return result


@traced("step")
async def step(engine: Engine, name: str, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], *, retries: int, backoff: float,
               rate: RateSpec | None, reserved: dict[str, float]) -> Any:
    """``Run.step``: the step's arguments come packed (``args``, ``kwargs``), so
    that none of them can be taken for an option of this function."""
    take = flow.call_rate(engine, rate) if rate is not None else None
    position, occurrence = engine.call(name)
    taken_in: int | None = None
    if take is not None:
        taken_in = await flow.take_units(engine, *take, reserved=reserved)
    fp = fingerprint(fn, args, kwargs)
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, "step", name, fp)
        if entry["status"] == "completed":
            value = engine.ser.loads(entry["output"])
            await engine.await_replay_turn(entry["turn"], entry["calls_before"],
                                           f"step {name!r}")
            if rate is not None and len(rate) > 2:
                await flow.report_usage(engine, rate[0], rate[2](value), reserved=reserved)
            return value
        if await engine.replays_failure(position, entry):
            exc = rebuild_exception(entry["error"])
            await engine.await_replay_turn(entry["turn"], entry["calls_before"],
                                           f"step {name!r}")
            raise exc
        engine.skip(entry)
        if take is not None and taken_in is not None and taken_in <= entry["attempt"]:
            # This attempt calls again a step whose call failed in an earlier
            # one: the new call takes its units (once: a replay of this
            # attempt finds the take's attempt moved on).
            await flow.retake_units(engine, *take, reserved=reserved, in_step=False)
    await engine.enter_live()
    try:
        started = engine.db_now()
        tries = 0
        while True:
            tries += 1
            try:
                result = await call_step_fn(fn, args, kwargs, guard=engine.fresh)
                break
            except _StaleInThread:
                tries -= 1
                await engine.confirm_lease()
                continue
            except Exception as exc:
                if tries <= retries and not isinstance(exc, TerminalError):
                    await asyncio.sleep(backoff * 2 ** (tries - 1))
                    if take is not None:
                        await flow.retake_units(engine, *take, reserved=reserved,
                                                in_step=True)
                    # A retry is a new execution of the step: not past a lost
                    # lease (the backoff or the wait may outlast it).
                    await engine.confirm_lease()
                    continue
                turn, calls = engine.take_turn()
                try:
                    await engine.journal_write(
                        position, name, occurrence, "step", "failed", None,
                        describe_exception(exc), tries=tries, started_at=started,
                        turn=turn, calls_before=calls, fingerprint=fp)
                    await engine.deliver(turn)
                finally:
                    engine.drop(turn)
                raise
        text, value = engine.ser.roundtrip(
            result, what=f"result of step {name!r} of run {engine.id}")
        turn, calls = engine.take_turn()
        try:
            await engine.journal_write(position, name, occurrence, "step", "completed",
                                       text, None, tries=tries, started_at=started,
                                       turn=turn, calls_before=calls, fingerprint=fp)
            await engine.deliver(turn)
        finally:
            engine.drop(turn)
    finally:
        engine.exit_live()
    if rate is not None and len(rate) > 2:
        usage = rate[2](value)
        await flow.report_usage(engine, rate[0], usage, reserved=reserved)
    return value


async def fact(engine: Engine, kind: str, make: Callable[[], Any],
               encode: Callable[[Any], str], decode: Callable[[Any], Any]) -> Any:
    """``Run.now`` and ``Run.uuid``: ``make()`` once, journaled as ``encode`` gives it;
    every execution gets ``decode`` of the journaled value."""
    name = f"pgjournal.{kind}"
    position, occurrence = engine.call(name)
    entry = await engine.entry(position)
    if entry is not None:
        engine.check(position, entry, kind, name, None)
        value = decode(entry["output"])
        await engine.await_replay_turn(entry["turn"], entry["calls_before"], name)
        return value
    await engine.enter_live()
    try:
        text = encode(make())
        turn, calls = engine.take_turn()
        try:
            await engine.journal_write(position, name, occurrence, kind, "completed",
                                       text, None, turn=turn, calls_before=calls)
            await engine.deliver(turn)
        finally:
            engine.drop(turn)
        return decode(json.loads(text))  # what a replay will see, tzinfo included
    finally:
        engine.exit_live()
