"""Streams: ``run.stream_step`` hands the chunks of an async iterator to the
workflow as they come, each a delivery with its turn, and journals them (in
batches while it runs, for watchers). A replay gives back exactly the chunks
the first execution delivered, in their turns, without calling the function.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import describe_exception, rebuild_exception
from .._unwind import Abandoned
from ..errors import JournalTooLarge, NonDeterminismError, SerializationError
from ..tracing import traced_stream
from .engine import fingerprint

if TYPE_CHECKING:
    from .engine import Engine

#: How often a running stream step writes its chunks so far (for watchers).
STREAM_FLUSH_SECONDS = 0.5


@traced_stream
def stream_step(engine: Engine, name: str, fn: Callable[..., AsyncIterator[Any]],
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    """``Run.stream_step`` (the function's arguments come packed)."""
    position, occurrence = engine.call(name)
    return Stream(engine, position, occurrence, name, fn, args, kwargs).iterate()


async def settle(engine: Engine) -> None:
    """Streams the workflow left open were cut short: journal what they delivered."""
    for stream in engine.open_streams():
        with contextlib.suppress(Abandoned):
            await stream.journal_cut(final=True)


class Stream:
    """One ``stream_step`` call: its replay, or its live iteration and journaling."""

    def __init__(self, engine: Engine, position: int, occurrence: int, name: str,
                 fn: Callable[..., AsyncIterator[Any]], args: Any, kwargs: Any) -> None:
        self.engine = engine
        self.position = position
        self.occurrence = occurrence
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.delivered: list[tuple[str, int, int]] = []   # (text, turn, calls_before)
        self.flushed = 0
        self.journaled = False
        self.started = engine.db_now()

    async def iterate(self) -> AsyncGenerator[Any, None]:
        engine = self.engine
        entry = await engine.entry(self.position)
        if entry is not None:
            engine.check(self.position, entry, "stream", self.name,
                         fingerprint(self.fn, self.args, self.kwargs))
            if entry["status"] == "completed":
                async for value in self._replay(entry):
                    yield value
                return
            if await engine.replays_failure(self.position, entry):
                async for value in self._replay(entry):
                    yield value
                exc = rebuild_exception(entry["error"])
                await engine.await_replay_turn(entry["turn"], entry["calls_before"],
                                               f"stream {self.name!r}")
                raise exc
            engine.skip(entry)
            after = -1
            while True:  # the chunks of the failed attempt are not replayed either
                rows = await engine.db(engine.store.chunk_page(engine.id, self.position, after))
                if not rows:
                    break
                for r in rows:
                    if r["turn"] is not None:
                        engine.skip_turn(r["turn"])
                after = rows[-1]["seq"]
        inner = self._live()
        try:
            async for value in inner:
                yield value
        finally:
            # Close the live part now (not when it is garbage collected), so a
            # stream cut short is journaled before the workflow goes on.
            await inner.aclose()

    async def _replay(self, entry: dict[str, Any]) -> AsyncIterator[Any]:
        engine = self.engine
        after = -1
        what = f"stream {self.name!r}"
        output = entry.get("output")
        cut = (entry["status"] == "completed" and isinstance(output, dict)
               and bool(output.get("cut")))
        count = output.get("chunks") if cut and isinstance(output, dict) else None
        while count is None or after + 1 < count:
            rows = await engine.db(engine.store.chunk_page(engine.id, self.position, after))
            if not rows:
                break
            for r in rows:
                if count is not None and r["seq"] >= count:
                    break
                value = engine.ser.loads(r["chunk"])
                await engine.await_replay_turn(r["turn"], r["calls_before"], what)
                yield value
                after = r["seq"]
        if cut:
            # The first execution stopped reading here; so must the replay.
            raise NonDeterminismError(
                f"run {engine.id}: stream {self.name!r} was cut short after {after + 1} chunks "
                "on its first execution, and the replay reads past them (a stream left "
                "open while the run waited for a signal or slept cannot be read on after "
                "it resumes: read it to the end, or stop reading it, before waiting)")
        if entry["status"] == "completed":
            await engine.await_replay_turn(entry["turn"], entry["calls_before"], what)

    async def _live(self) -> AsyncGenerator[Any, None]:
        engine = self.engine
        await engine.enter_live()
        engine.hold_stream(self)
        what = engine.what("stream", self.name)
        finished = False
        try:
            last_flush = time.monotonic()
            async for chunk in self.fn(*self.args, **self.kwargs):
                text, value = engine.ser.roundtrip(chunk, what=what)
                turn, calls = engine.take_turn()
                try:
                    await engine.deliver(turn)
                finally:
                    engine.drop(turn)
                self.delivered.append((text, turn, calls))
                engine.exit_live()
                try:
                    yield value
                finally:
                    engine.reenter_live()
                if time.monotonic() - last_flush >= STREAM_FLUSH_SECONDS:
                    await self._flush()
                    last_flush = time.monotonic()
            finished = True
        except Exception as exc:
            if not self.journaled:
                await self._journal("failed", None, describe_exception(exc))
            raise
        except GeneratorExit:
            # Closed by the consumer (break, aclose, an exception in its loop):
            # what it consumed is what a replay must give it.
            await self.journal_cut(final=True)
            raise
        finally:
            engine.release_stream(self)
            engine.exit_live()
        if finished and not self.journaled:
            turn, calls = engine.take_turn()
            try:
                await self._journal("completed", {"chunks": len(self.delivered)}, None,
                                    turn=turn, calls=calls)
                await engine.deliver(turn)
            finally:
                engine.drop(turn)

    async def _flush(self) -> None:
        engine = self.engine
        pending = self.delivered[self.flushed:]
        if not pending:
            return
        lost = await engine.db(engine.store.append_chunks(
            run=engine.id, epoch=engine.epoch, position=self.position,
            chunk_start=self.flushed, chunks="[" + ",".join(t for t, _, _ in pending) + "]",
            chunk_turns=[t for _, t, _ in pending], chunk_calls=[c for _, _, c in pending]))
        if lost is not None:
            engine.lose(lost)
        self.flushed += len(pending)

    async def _journal(self, status: str, output: Any, error: dict[str, Any] | None, *,
                       turn: int | None = None, calls: int | None = None) -> None:
        engine = self.engine
        pending = self.delivered[self.flushed:]
        self.journaled = True
        start = self.flushed
        self.flushed = len(self.delivered)
        await engine.journal_write(
            self.position, self.name, self.occurrence, "stream", status,
            json.dumps(output) if output is not None else None, error,
            started_at=self.started, chunk_start=start,
            chunks="[" + ",".join(t for t, _, _ in pending) + "]",
            chunk_turns=[t for _, t, _ in pending], chunk_calls=[c for _, _, c in pending],
            turn=turn, calls_before=calls,
            fingerprint=fingerprint(self.fn, self.args, self.kwargs))

    async def journal_cut(self, *, final: bool) -> None:
        """Journal the chunks consumed so far as the whole stream. ``final=False``:
        the consumer may still read on (the entry is then extended)."""
        if self.journaled:
            return
        if final:
            self.engine.release_stream(self)
        # If the run is gone or ending, the stream runs again on resume.
        with contextlib.suppress(Abandoned, SerializationError, JournalTooLarge):
            await self._journal("completed", {"chunks": len(self.delivered), "cut": True}, None)
        if not final:
            self.journaled = False

