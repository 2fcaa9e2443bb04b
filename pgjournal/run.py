"""``Run``: what a workflow body sees, and how its steps are journaled and replayed.

Every call on ``Run`` takes the next *position* in the run's call order. If
the journal (loaded with the claim) holds an entry at that position, the call
is a replay: it returns the journaled value at no database cost, after
checking that the entry is for the same step (else ``NonDeterminismError``).
Otherwise the call executes and journals its result in one round trip, fenced
by the lease epoch: if this worker no longer owns the run, nothing is written
and the workflow is unwound.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._exceptions import describe_exception as describe_exception
from ._exceptions import rebuild_exception as rebuild_exception
from .errors import DatabaseUnavailable, NonDeterminismError, TerminalError

if TYPE_CHECKING:
    from .serializer import Serializer
    from .store import Claim, Store

#: How often a running stream step writes its chunks so far (for watchers).
STREAM_FLUSH_SECONDS = 0.5


class Suspended(BaseException):
    """Unwinds a workflow whose run was suspended (signal wait, durable sleep).

    A ``BaseException`` so that a workflow's ``except Exception`` cannot swallow it.
    """

    def __init__(self, until: datetime | None) -> None:
        super().__init__(until)
        self.until = until


class Abandoned(BaseException):
    """Unwinds a workflow whose worker lost the run (lease moved on, cancelled, DB gone)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


async def call_step_fn(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Call a step function: awaited if async, in a thread if sync (so it cannot
    block the event loop and the other runs of the worker)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


class Run:
    """The handle a workflow receives: journaled steps, signals, timers, and facts.

    ``run.id``, ``run.attempt`` (1 on the first attempt, +1 per retry),
    ``run.workflow`` and ``run.recoveries`` (crash recoveries so far).
    """

    def __init__(self, store: Store, serializer: Serializer, claim: Claim) -> None:
        self._store = store
        self._ser = serializer
        self._claim = claim
        self._journal: dict[int, dict[str, Any]] = {e["position"]: e for e in claim.journal}
        self._last_position = max(self._journal, default=-1)
        self._position = 0
        self._occurrences: Counter[str] = Counter()
        self._claimed_monotonic = time.monotonic()
        self.id: uuidlib.UUID = claim.run_id
        self.attempt: int = claim.attempt
        self.workflow: str = claim.workflow
        self.recoveries: int = claim.recoveries
        self.db_failed = False

    # -- bookkeeping -----------------------------------------------------------

    def _next(self, name: str, kind: str) -> tuple[int, int, dict[str, Any] | None]:
        if not isinstance(name, str) or not name:
            raise TypeError("a step name must be a non-empty string")
        position = self._position
        self._position += 1
        occurrence = self._occurrences[name]
        self._occurrences[name] += 1
        entry = self._journal.get(position)
        if entry is not None and (entry["name"] != name or entry["kind"] != kind):
            raise NonDeterminismError(
                f"run {self.id} asked for {kind} {name!r} at position {position}, but its "
                f"journal holds {entry['kind']} {entry['name']!r} there: the workflow code "
                "changed, or depends on something that is not journaled"
            )
        return position, occurrence, entry

    def _replays_failure(self, position: int, entry: dict[str, Any]) -> bool:
        """A journaled failure is replayed, except the one that ended an earlier
        attempt (the last entry): a retry re-executes that step."""
        return not (position == self._last_position and entry["attempt"] < self.attempt)

    def db_now(self) -> datetime:
        """The database clock now, estimated from the claim (no round trip)."""
        elapsed = time.monotonic() - self._claimed_monotonic
        return self._claim.db_now + timedelta(seconds=elapsed)

    async def _db(self, coro: Any) -> Any:
        try:
            return await coro
        except DatabaseUnavailable:
            # Whether the write committed is unknown: stop here and let the
            # lease expire; the next owner replays from what was committed.
            self.db_failed = True
            raise Abandoned("database unavailable") from None

    async def _journal_write(self, position: int, name: str, occurrence: int, kind: str,
                             status: str, output: str | None, error: dict[str, Any] | None,
                             **extra: Any) -> None:
        lost = await self._db(self._store.journal_step(
            run=self.id, epoch=self._claim.epoch, position=position, name=name,
            occurrence=occurrence, kind=kind, status=status, output=output,
            error=json.dumps(error) if error is not None else None, attempt=self.attempt,
            **extra,
        ))
        if lost is not None:
            raise Abandoned(lost)

    # -- the workflow API ------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0,
                   backoff: float = 1.0, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and journal its result.

        On replay the journaled result is returned without calling ``fn``. The
        value returned is always the journaled one (what a replay would see).
        A raising ``fn`` is retried in-process ``retries`` times with
        exponential ``backoff`` seconds; then its error is journaled and raised.
        """
        position, occurrence, entry = self._next(name, "step")
        if entry is not None:
            if entry["status"] == "completed":
                return self._ser.loads(entry["output"])
            if self._replays_failure(position, entry):
                raise rebuild_exception(entry["error"])
        started = self.db_now()
        tries = 0
        while True:
            tries += 1
            try:
                result = await call_step_fn(fn, args, kwargs)
                break
            except Exception as exc:
                if tries <= retries and not isinstance(exc, TerminalError):
                    await asyncio.sleep(backoff * 2 ** (tries - 1))
                    continue
                await self._journal_write(position, name, occurrence, "step", "failed", None,
                                          describe_exception(exc), tries=tries,
                                          started_at=started)
                raise
        text, value = self._ser.roundtrip(
            result, what=f"result of step {name!r} of run {self.id}")
        await self._journal_write(position, name, occurrence, "step", "completed", text, None,
                                  tries=tries, started_at=started)
        return value

    async def stream_step(self, name: str, fn: Callable[..., AsyncIterator[Any]], *args: Any,
                          **kwargs: Any) -> AsyncIterator[Any]:
        """Yield the chunks of the async iterator ``fn(*args, **kwargs)`` as they come,
        journaling them; a finished stream replays its journaled chunks. A stream
        cut by a crash is re-run from the start."""
        position, occurrence, entry = self._next(name, "stream")
        if entry is not None:
            if entry["status"] == "completed":
                for chunk in entry.get("chunks") or []:
                    yield self._ser.loads(chunk)
                return
            if self._replays_failure(position, entry):
                raise rebuild_exception(entry["error"])
        started = self.db_now()
        pending: list[str] = []
        flushed = 0
        last_flush = time.monotonic()
        what = f"chunk of stream step {name!r} of run {self.id}"
        try:
            async for chunk in fn(*args, **kwargs):
                text, value = self._ser.roundtrip(chunk, what=what)
                pending.append(text)
                yield value
                if time.monotonic() - last_flush >= STREAM_FLUSH_SECONDS:
                    lost = await self._db(self._store.append_chunks(
                        run=self.id, epoch=self._claim.epoch, position=position,
                        chunk_start=flushed, chunks="[" + ",".join(pending) + "]"))
                    if lost is not None:
                        raise Abandoned(lost)
                    flushed += len(pending)
                    pending = []
                    last_flush = time.monotonic()
        except Exception as exc:
            await self._journal_write(position, name, occurrence, "stream", "failed", None,
                                      describe_exception(exc), started_at=started)
            raise
        await self._journal_write(
            position, name, occurrence, "stream", "completed",
            json.dumps({"chunks": flushed + len(pending)}), None, started_at=started,
            chunks="[" + ",".join(pending) + "]", chunk_start=flushed)

    async def wait_signal(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the next signal ``name`` sent to this run.

        If none has arrived, the run is suspended (no worker is held) until one
        does, or until ``timeout`` seconds after the first wait, when
        ``TimeoutError`` is raised here.
        """
        position, occurrence, entry = self._next(name, "signal")
        if entry is not None:
            if entry["status"] == "completed":
                return self._ser.loads(entry["output"])
            raise TimeoutError(entry["error"].get("message", f"no signal {name!r}"))
        outcome, payload = await self._db(self._store.wait_signal(
            run=self.id, epoch=self._claim.epoch, position=position, name=name,
            occurrence=occurrence, timeout=timeout, attempt=self.attempt))
        if outcome == "received":
            return self._ser.loads(payload)
        if outcome == "timeout":
            raise TimeoutError(f"no signal {name!r} arrived within {timeout} s")
        if outcome == "suspended":
            until = None if timeout is None else self.db_now() + timedelta(seconds=timeout)
            raise Suspended(until)
        raise Abandoned(str(payload))

    async def sleep(self, name: str, seconds: float) -> None:
        """A durable timer: the run is suspended (no worker held) until it is due."""
        position, occurrence, entry = self._next(name, "sleep")
        wake_at: datetime | None = None
        if entry is not None:
            wake_at = datetime.fromisoformat(entry["output"])
            if wake_at <= self.db_now():
                return
        outcome, due = await self._db(self._store.sleep_until(
            run=self.id, epoch=self._claim.epoch, position=position, name=name,
            occurrence=occurrence, seconds=seconds, wake_at=wake_at, attempt=self.attempt))
        if outcome == "due":
            return
        if outcome == "suspended":
            raise Suspended(due)
        raise Abandoned(outcome)

    async def now(self) -> datetime:
        """The current time, journaled: a replay gets the same value."""
        position, occurrence, entry = self._next("pgjournal.now", "now")
        if entry is not None:
            return datetime.fromisoformat(entry["output"])
        value = self.db_now()
        await self._journal_write(position, "pgjournal.now", occurrence, "now", "completed",
                                  json.dumps(value.isoformat()), None)
        return value

    async def uuid(self) -> uuidlib.UUID:
        """A random UUID, journaled: a replay gets the same value."""
        position, occurrence, entry = self._next("pgjournal.uuid", "uuid")
        if entry is not None:
            return uuidlib.UUID(entry["output"])
        value = uuidlib.uuid4()
        await self._journal_write(position, "pgjournal.uuid", occurrence, "uuid", "completed",
                                  json.dumps(str(value)), None)
        return value
