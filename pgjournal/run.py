"""``Run``: what a workflow body sees, and how its steps are journaled and replayed.

Identity. Every call on ``Run`` (step, stream, signal wait, sleep, now, uuid)
takes the next *position* when it is made, synchronously, before any await.
If the journal holds an entry at that position the call is a replay: it gets
the journaled value (after checking the entry is for the same call, else
``NonDeterminismError``); otherwise it executes and journals its result,
fenced by the lease epoch.

Order. With parallel steps (``asyncio.gather``, ``TaskGroup``, ``create_task``)
the position a call gets depends on how the branches interleaved, which
depends on the order in which results reached them. So every result handed
to the workflow (a *delivery*) is numbered (its ``turn``) and journaled with
how many calls the workflow had made by then (``calls_before``). Live results
are handed over in turn order; a replay hands each journaled result back only
when its turn comes and no earlier than the calls that preceded it the first
time. The branches then interleave exactly as they did, and each call gets
the position it had. A replay that still asks differently fails loudly.

The journal is loaded in bounded pages as the replay reaches it, so a large
journal costs the claim nothing and its replay a few round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import time
import uuid as uuidlib
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from ._exceptions import describe_exception, rebuild_exception
from ._unwind import Abandoned, Suspended
from .children import ChildRun, ChildSettings, child_id
from .errors import (
    DatabaseUnavailable,
    JournalTooLarge,
    NonDeterminismError,
    SerializationError,
    TerminalError,
)
from .tracing import replayed, traced, traced_stream

if TYPE_CHECKING:
    from .serializer import Serializer
    from .store import Claim, Store

__all__ = ["Abandoned", "Run", "Suspended", "call_step_fn", "describe_exception",
           "rebuild_exception"]

#: How often a running stream step writes its chunks so far (for watchers).
STREAM_FLUSH_SECONDS = 0.5
#: Journal entries (and stream chunks) loaded per round trip, and their byte budget.
PAGE_ENTRIES = 500
PAGE_BYTES = 8 * 1024 * 1024
#: A replay that waits this long for a journaled result whose turn never comes
#: (the workflow stopped asking in the recorded order) fails as non-deterministic.
REPLAY_STALL_SECONDS = 30.0
#: A rate take whose units are ready within this many seconds waits in the
#: worker; a longer wait suspends the run (no worker held) until they are.
RATE_LOCAL_WAIT_SECONDS = 1.0
#: Default journal budget of one run (``App(max_journal_bytes=...)``).
DEFAULT_MAX_JOURNAL_BYTES = 256 * 1024 * 1024


#: ``rate=`` of a step: (bucket, units) or (bucket, units, usage_from_result).
RateSpec = tuple[str, float] | tuple[str, float, Callable[[Any], float]]


class LeaseGuard(Protocol):
    """What ``Run`` needs of the worker's local lease (see ``pgjournal.lease``)."""

    async def ensure(self) -> bool: ...

    def fresh(self) -> bool: ...


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


def fingerprint(fn: Callable[..., Any] | None, args: Any, kwargs: Any) -> str:
    """A short hash of a call: the function's name and its arguments.

    Values JSON cannot hold count by their type name only (their ``repr`` may
    hold a memory address, which differs on every execution).
    """
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    text = json.dumps([name, args, kwargs], sort_keys=True, separators=(",", ":"),
                      default=lambda o: f"<{type(o).__qualname__}>")
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class Run:
    """The handle a workflow receives: journaled steps, signals, timers, and facts.

    ``run.id``, ``run.attempt`` (1 on the first attempt, +1 per retry),
    ``run.workflow``, ``run.recoveries`` (crash recoveries so far) and
    ``run.fencing_token`` (the lease epoch this execution owns the run with:
    a store of your own can refuse writes carrying an older token).
    """

    def __init__(self, store: Store, serializer: Serializer, claim: Claim, *,
                 lease: LeaseGuard | None = None,
                 max_journal_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
                 child_settings: ChildSettings | None = None) -> None:
        self._store = store
        self._ser = serializer
        self._claim = claim
        self._lease = lease
        self._max_journal_bytes = max_journal_bytes
        self._child_settings = child_settings
        self._claimed_monotonic = time.monotonic()
        self.id: uuidlib.UUID = claim.run_id
        self.attempt: int = claim.attempt
        self.workflow: str = claim.workflow
        self.recoveries: int = claim.recoveries
        self.fencing_token: int = claim.epoch
        self.db_failed = False
        # Call identity.
        self._position = 0
        self._occurrences: Counter[str] = Counter()
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._main_task = asyncio.current_task()
        # The journal, loaded lazily in pages.
        self._outlined = not claim.has_journal
        self._last_position = -1
        self._entries: dict[int, dict[str, Any]] = {}
        self._loaded_upto = -1
        self._page_lock = asyncio.Lock()
        self._journal_bytes = 0
        self._asked: set[int] = set()
        # Delivery order.
        self._turns: list[int] = []      # journaled turns, sorted
        self._turn_idx = 0               # next journaled turn to deliver
        self._skipped: set[int] = set()  # journaled turns re-executed live instead
        self._next_turn = 0
        self._live_turns: set[int] = set()
        self._changed = asyncio.Event()
        # Suspension barrier: live work in flight, and a wait that may suspend.
        self._live = 0
        self._gate: asyncio.Future[datetime | None] | None = None
        self._streams: set[_Stream] = set()
        self._closed: str | None = None
        self._suspended: tuple[datetime | None] | None = None
        self._summary: dict[int, tuple[str, int]] = {}  # consumed entries: status, attempt
        self._reserved: dict[str, float] = {}  # units of the last take, per rate bucket

    # -- facts -----------------------------------------------------------------

    def db_now(self) -> datetime:
        """The database clock now, estimated from the claim (no round trip)."""
        elapsed = time.monotonic() - self._claimed_monotonic
        return self._claim.db_now + timedelta(seconds=elapsed)

    # -- identity ----------------------------------------------------------------

    def _call(self, name: str) -> tuple[int, int]:
        """Allocate the position and occurrence of a call (synchronously)."""
        if not isinstance(name, str) or not name:
            raise TypeError("a step name must be a non-empty string")
        self._raise_if_closed()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        position = self._position
        self._position += 1
        occurrence = self._occurrences[name]
        self._occurrences[name] += 1
        self._asked.add(position)
        self._progress()
        return position, occurrence

    def _raise_if_closed(self) -> None:
        if self._suspended is not None:
            raise Suspended(self._suspended[0])
        if self._closed is not None:
            raise Abandoned(self._closed)

    def _check(self, position: int, entry: dict[str, Any], kind: str, name: str,
               fp: str | None) -> None:
        if entry["name"] != name or entry["kind"] != kind:
            raise NonDeterminismError(
                f"run {self.id} asked for {kind} {name!r} at position {position}, but its "
                f"journal holds {entry['kind']} {entry['name']!r} there: the workflow code "
                "changed, or depends on something that is not journaled (with parallel "
                "branches: the branches must reach their steps in an order that depends "
                "only on journaled results)"
            )
        if fp is None or entry.get("fingerprint") in (None, fp):
            return
        if entry["status"] == "failed" and entry["attempt"] < self.attempt:
            return  # may be executed again by this retry, with this attempt's arguments
        # Arguments are checked only while parallel branches of the run are alive:
        # there they tell whose result an entry is. Sequential code may pass
        # values that are not journaled (a timestamp in a log line) without harm.
        current = asyncio.current_task()
        in_branch = current is not None and current is not self._main_task
        if in_branch or sum(1 for t in self._tasks if not t.done()) > 1:
            raise NonDeterminismError(
                f"run {self.id}: {kind} {name!r} at position {position} was called with other "
                "arguments (or another function) than the journaled call there. In parallel "
                "branches a step's arguments tell whose result it is: give each branch's "
                "steps their own names (e.g. f'search-{i}'), or make the arguments depend "
                "only on journaled values"
            )

    # -- the journal ---------------------------------------------------------------

    async def _outline(self) -> None:
        if self._outlined:
            return
        async with self._page_lock:
            if self._outlined:
                return
            row = await self._db(self._store.journal_outline(self.id))
            self._turns = list(row["turns"] or [])
            self._last_position = -1 if row["last_position"] is None else row["last_position"]
            self._next_turn = (self._turns[-1] + 1) if self._turns else 0
            if row["bytes"] > self._max_journal_bytes:
                raise JournalTooLarge(
                    f"run {self.id} holds a journal of {row['bytes']} bytes, over its budget "
                    f"of {self._max_journal_bytes} (App(max_journal_bytes=...)); journal "
                    "references to large data instead of the data"
                )
            self._journal_bytes = int(row["bytes"])
            self._patch_marks = dict(zip(row["patch_positions"], row["patch_names"], strict=True))
            self._outlined = True

    async def _entry(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position`` (taken: each is handed out once)."""
        entry = await self._peek(position)
        if entry is not None:
            del self._entries[position]
            self._summary[position] = (entry["status"], entry["attempt"])
        return entry

    async def _peek(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position``, loading pages as the replay reaches them."""
        await self._outline()
        if position > self._last_position:
            return None
        while position > self._loaded_upto:
            async with self._page_lock:
                if position <= self._loaded_upto:
                    break
                rows = await self._db(self._store.journal_page(
                    self.id, self._loaded_upto, limit=PAGE_ENTRIES, max_bytes=PAGE_BYTES))
                if not rows:
                    self._loaded_upto = self._last_position
                    break
                for r in rows:
                    self._entries[r["position"]] = r
                self._loaded_upto = rows[-1]["position"]
        return self._entries.get(position)

    async def _replays_failure(self, position: int, entry: dict[str, Any]) -> bool:
        """A journaled failure is replayed (the workflow may have caught it and gone
        on), except the failures that ended an earlier attempt, i.e. failures of an
        earlier attempt with nothing after them but such failures (the last step,
        or the last steps of parallel branches): a retry executes those again."""
        if entry["attempt"] >= self.attempt:
            return True
        for p in range(position + 1, self._last_position + 1):
            later = self._summary.get(p)
            if later is None:
                e = await self._peek(p)
                later = (e["status"], e["attempt"]) if e is not None else ("missing", 0)
            if not (later[0] == "failed" and later[1] < self.attempt):
                return True
        return False

    # -- delivery order -------------------------------------------------------------

    def _progress(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _journaled_turn_pending(self) -> int | None:
        while self._turn_idx < len(self._turns) and self._turns[self._turn_idx] in self._skipped:
            self._turn_idx += 1
        return self._turns[self._turn_idx] if self._turn_idx < len(self._turns) else None

    async def _await_replay_turn(self, turn: int | None, calls_before: int | None,
                                 what: str) -> None:
        """Hand a journaled result back only when its turn comes (see module doc)."""
        replayed()
        if turn is None:
            return  # journaled before turns existed: in call order, as it was
        stalled_since = time.monotonic()
        while not (self._journaled_turn_pending() == turn
                   and self._position >= (calls_before or 0)):
            self._raise_if_closed()
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=1.0)
                stalled_since = time.monotonic()
            except TimeoutError:
                if self._live == 0 and time.monotonic() - stalled_since > REPLAY_STALL_SECONDS:
                    raise NonDeterminismError(
                        f"run {self.id}: the replay of {what} waits for journaled results "
                        "that the workflow no longer asks for (turn "
                        f"{self._journaled_turn_pending()} is next, {self._position} calls "
                        f"made, {calls_before} expected): parallel branches must reach "
                        "their steps in an order that depends only on journaled results"
                    ) from None
        self._turn_idx += 1
        self._progress()

    def _take_turn(self) -> tuple[int, int]:
        """Number a live delivery; the caller must ``_deliver`` or ``_drop`` it."""
        turn = self._next_turn
        self._next_turn += 1
        self._live_turns.add(turn)
        return turn, self._position

    async def _deliver(self, turn: int) -> None:
        """Wait until every earlier live delivery has been handed over."""
        while min(self._live_turns) != turn:
            if self._closed is not None:
                self._drop(turn)
                self._raise_if_closed()
            await self._changed.wait()
        self._drop(turn)

    def _drop(self, turn: int) -> None:
        if turn in self._live_turns:
            self._live_turns.discard(turn)
            self._progress()

    # -- the suspension barrier ---------------------------------------------------------

    async def _enter_live(self) -> None:
        """Before live work: wait while a signal wait or sleep may suspend the run,
        confirm the lease if its local deadline passed, then count the work."""
        while self._gate is not None:
            await asyncio.shield(self._gate)
            self._raise_if_closed()
        self._raise_if_closed()
        if self._lease is not None and not await self._lease.ensure():
            self._closed = "lease lost"
            raise Abandoned("lease lost before a step started")
        self._live += 1
        self._progress()

    def _fresh(self) -> bool:
        """Thread-safe: may a step start now without asking the database?"""
        return self._lease is None or self._lease.fresh()

    def _exit_live(self) -> None:
        self._live -= 1
        self._progress()

    async def _close_gate(self) -> asyncio.Future[datetime | None]:
        """A signal wait or sleep goes to the database only when no live work of the
        run is in flight, and no new work starts until it knows whether the run is
        suspended: in-flight steps are journaled, not lost to the suspension."""
        while self._gate is not None:
            await asyncio.shield(self._gate)
            self._raise_if_closed()
        self._raise_if_closed()
        gate: asyncio.Future[datetime | None] = asyncio.get_running_loop().create_future()
        self._gate = gate
        try:
            while self._live > 0:
                await self._changed.wait()
            # Streams the workflow holds open are journaled as cut here, in case
            # the run suspends: a replay then gives back what was read and does
            # not call the model again. If the run goes on instead, so can they.
            for stream in list(self._streams):
                await stream.journal_cut(final=False)
        except BaseException:
            self._open_gate(gate)
            raise
        return gate

    def _open_gate(self, gate: asyncio.Future[datetime | None]) -> None:
        if self._gate is gate:
            self._gate = None
        if not gate.done():
            gate.set_result(None)
        self._progress()

    def _suspend(self, gate: asyncio.Future[datetime | None], until: datetime | None) -> None:
        """The run is suspended: gated work unwinds too (the gate stays shut)."""
        self._suspended = (until,)
        self._closed = "suspended"
        if not gate.done():
            gate.set_result(until)
        self._progress()

    # -- database plumbing ----------------------------------------------------------------

    async def _db(self, coro: Any) -> Any:
        if self._marker_write is not None:  # patch markers before anything after them
            try:
                await self._markers_durable()
            except BaseException:
                coro.close()
                raise
        try:
            return await coro
        except DatabaseUnavailable:
            # Whether the write committed is unknown: stop here and let the
            # lease expire; the next owner replays from what was committed.
            self.db_failed = True
            self._closed = "database unavailable"
            raise Abandoned("database unavailable") from None

    def _budget(self, size: int) -> None:
        self._journal_bytes += size
        if self._journal_bytes > self._max_journal_bytes:
            raise JournalTooLarge(
                f"run {self.id} would journal {self._journal_bytes} bytes, over its budget "
                f"of {self._max_journal_bytes} (App(max_journal_bytes=...)); journal "
                "references to large data instead of the data"
            )

    async def _journal_write(self, position: int, name: str, occurrence: int, kind: str,
                             status: str, output: str | None, error: dict[str, Any] | None,
                             **extra: Any) -> None:
        error_text = json.dumps(error) if error is not None else None
        self._budget(len(output or "") + len(error_text or ""))
        lost = await self._db(self._store.journal_step(
            run=self.id, epoch=self._claim.epoch, position=position, name=name,
            occurrence=occurrence, kind=kind, status=status, output=output,
            error=error_text, attempt=self.attempt, **extra,
        ))
        if lost is not None:
            self._closed = lost
            raise Abandoned(lost)

    def _what(self, kind: str, name: str) -> str:
        return f"{'result' if kind != 'stream' else 'chunk'} of {kind} {name!r} of run {self.id}"

    # -- the workflow API ------------------------------------------------------------------

    @traced("step")
    async def step(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0,
                   backoff: float = 1.0, rate: RateSpec | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and journal its result.

        On replay the journaled result is returned without calling ``fn``. The
        value returned is always the journaled one (what a replay would see).
        A raising ``fn`` is retried in-process ``retries`` times with
        exponential ``backoff`` seconds; then its error is journaled and raised.

        ``rate=("openai-tpm", 3000)`` first takes 3,000 units from that rate
        bucket (``App.set_rate_limit``), shared by every worker; if the bucket
        lacks them the run waits for the refill, suspended (no worker held)
        when the wait is long. A third item, ``rate=(bucket, units, usage)``, is
        a function of the step's result returning the units really used: the
        bucket is corrected by the difference (see also ``report_usage``).
        Every call of ``fn`` takes its units: an in-process retry, and a new
        attempt of the run calling a step that failed, take them again (and
        wait for them); a replay, or a call made again after a crash, does not.
        """
        take = self._call_rate(rate) if rate is not None else None
        position, occurrence = self._call(name)
        taken_in: int | None = None
        if take is not None:
            taken_in = await self._take_units(*take)
        fp = fingerprint(fn, args, kwargs)
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, "step", name, fp)
            if entry["status"] == "completed":
                value = self._ser.loads(entry["output"])
                await self._await_replay_turn(entry["turn"], entry["calls_before"],
                                              f"step {name!r}")
                if rate is not None and len(rate) > 2:
                    await self.report_usage(rate[0], rate[2](value))
                return value
            if await self._replays_failure(position, entry):
                exc = rebuild_exception(entry["error"])
                await self._await_replay_turn(entry["turn"], entry["calls_before"],
                                              f"step {name!r}")
                raise exc
            self._skip(entry)
            if take is not None and taken_in is not None and taken_in <= entry["attempt"]:
                # This attempt calls again a step whose call failed in an
                # earlier one: the new call takes its units (once: a replay of
                # this attempt finds the take's attempt moved on).
                await self._retake_units(*take, in_step=False)
        await self._enter_live()
        try:
            started = self.db_now()
            tries = 0
            while True:
                tries += 1
                try:
                    result = await call_step_fn(fn, args, kwargs, guard=self._fresh)
                    break
                except _StaleInThread:
                    tries -= 1
                    if self._lease is not None and not await self._lease.ensure():
                        self._closed = "lease lost"
                        raise Abandoned("lease lost before a step started") from None
                    continue
                except Exception as exc:
                    if tries <= retries and not isinstance(exc, TerminalError):
                        await asyncio.sleep(backoff * 2 ** (tries - 1))
                        if take is not None:
                            await self._retake_units(*take, in_step=True)
                        # A retry is a new execution of the step: not past a
                        # lost lease (the backoff or the wait may outlast it).
                        if self._lease is not None and not await self._lease.ensure():
                            self._closed = "lease lost"
                            raise Abandoned("lease lost before a step retry started") from None
                        continue
                    turn, calls = self._take_turn()
                    try:
                        await self._journal_write(
                            position, name, occurrence, "step", "failed", None,
                            describe_exception(exc), tries=tries, started_at=started,
                            turn=turn, calls_before=calls, fingerprint=fp)
                        await self._deliver(turn)
                    finally:
                        self._drop(turn)
                    raise
            text, value = self._ser.roundtrip(
                result, what=f"result of step {name!r} of run {self.id}")
            turn, calls = self._take_turn()
            try:
                await self._journal_write(position, name, occurrence, "step", "completed",
                                          text, None, tries=tries, started_at=started,
                                          turn=turn, calls_before=calls, fingerprint=fp)
                await self._deliver(turn)
            finally:
                self._drop(turn)
        finally:
            self._exit_live()
        if rate is not None and len(rate) > 2:
            usage = rate[2](value)
            await self.report_usage(rate[0], usage)
        return value

    def _skip(self, entry: dict[str, Any]) -> None:
        """A journaled failure is executed again: its turn is not replayed."""
        if entry.get("turn") is not None:
            self._skipped.add(entry["turn"])
            self._progress()

    @traced_stream
    def stream_step(self, name: str, fn: Callable[..., AsyncIterator[Any]], *args: Any,
                    **kwargs: Any) -> AsyncIterator[Any]:
        """Yield the chunks of the async iterator ``fn(*args, **kwargs)`` as they come,
        journaling them. A stream read to its end replays all its chunks; one cut
        short (``break``, an exception in the loop, ``aclose()``) journals the chunks
        that were consumed and replays exactly those, without calling ``fn`` again.
        A stream interrupted by a crash, or left open across a suspension, runs
        again from the start."""
        position, occurrence = self._call(name)
        stream = _Stream(self, position, occurrence, name, fn, args, kwargs)
        return stream.iterate()

    async def settle(self) -> None:
        """Called by the worker when the workflow returned or raised: streams it
        left open were cut short; journal what they delivered."""
        for stream in list(self._streams):
            with contextlib.suppress(Abandoned):
                await stream.journal_cut(final=True)
        await self._markers_durable()  # before the run is completed or failed

    @traced("signal")
    async def wait_signal(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the next signal ``name`` sent to this run.

        If none has arrived, the run is suspended (no worker is held) until one
        does, or until ``timeout`` seconds after the first wait, when
        ``TimeoutError`` is raised here. A retry of a run that failed on that
        timeout waits again, with a fresh deadline.
        """
        position, occurrence = self._call(name)
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, "signal", name, None)
            what = f"signal {name!r}"
            if entry["status"] == "completed":
                value = self._ser.loads(entry["output"])
                await self._await_replay_turn(entry["turn"], entry["calls_before"], what)
                return value
            if await self._replays_failure(position, entry):
                await self._await_replay_turn(entry["turn"], entry["calls_before"], what)
                raise TimeoutError((entry["error"] or {}).get("message",
                                                              f"no signal {name!r}"))
            self._skip(entry)
        gate = await self._close_gate()
        turn, calls = self._take_turn()
        try:
            outcome, payload = await self._db(self._store.wait_signal(
                run=self.id, epoch=self._claim.epoch, position=position, name=name,
                occurrence=occurrence, timeout=timeout, attempt=self.attempt, turn=turn,
                calls_before=calls))
            if outcome == "suspended":
                until = None if timeout is None else self.db_now() + timedelta(seconds=timeout)
                self._suspend(gate, until)
                raise Suspended(until)
            self._open_gate(gate)
            if outcome == "received":
                value = self._ser.loads(payload)
                await self._deliver(turn)
                return value
            if outcome == "timeout":
                await self._deliver(turn)
                raise TimeoutError(f"no signal {name!r} arrived within {timeout} s")
            self._closed = str(payload)
            raise Abandoned(str(payload))
        finally:
            self._drop(turn)
            if not gate.done():
                self._open_gate(gate)

    @traced("sleep")
    async def sleep(self, name: str, seconds: float) -> None:
        """A durable timer: the run is suspended (no worker held) until it is due."""
        position, occurrence = self._call(name)
        entry = await self._entry(position)
        wake_at: datetime | None = None
        if entry is not None:
            self._check(position, entry, "sleep", name, None)
            wake_at = datetime.fromisoformat(entry["output"])
            if wake_at <= self.db_now():
                await self._await_replay_turn(entry["turn"], entry["calls_before"],
                                              f"sleep {name!r}")
                return
        gate = await self._close_gate()
        turn, calls = self._take_turn()
        try:
            outcome, due = await self._db(self._store.sleep_until(
                run=self.id, epoch=self._claim.epoch, position=position, name=name,
                occurrence=occurrence, seconds=seconds, wake_at=wake_at,
                attempt=self.attempt, turn=turn if entry is None else None,
                calls_before=calls if entry is None else None))
            if outcome == "suspended":
                self._suspend(gate, due)
                raise Suspended(due)
            self._open_gate(gate)
            if outcome == "due":
                if entry is None:
                    await self._deliver(turn)
                else:
                    self._drop(turn)
                    await self._await_replay_turn(entry["turn"], entry["calls_before"],
                                                  f"sleep {name!r}")
                return
            self._closed = outcome
            raise Abandoned(outcome)
        finally:
            self._drop(turn)
            if not gate.done():
                self._open_gate(gate)

    async def _fact(self, kind: str, make: Callable[[], Any], encode: Callable[[Any], str],
                    decode: Callable[[Any], Any]) -> Any:
        name = f"pgjournal.{kind}"
        position, occurrence = self._call(name)
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, kind, name, None)
            value = decode(entry["output"])
            await self._await_replay_turn(entry["turn"], entry["calls_before"], name)
            return value
        await self._enter_live()
        try:
            text = encode(make())
            turn, calls = self._take_turn()
            try:
                await self._journal_write(position, name, occurrence, kind, "completed",
                                          text, None, turn=turn, calls_before=calls)
                await self._deliver(turn)
            finally:
                self._drop(turn)
            return decode(json.loads(text))  # what a replay will see, tzinfo included
        finally:
            self._exit_live()

    async def now(self) -> datetime:
        """The current time, journaled: a replay gets the same value."""
        value: datetime = await self._fact(
            "now", self.db_now, lambda v: json.dumps(v.isoformat()), datetime.fromisoformat)
        return value

    async def uuid(self) -> uuidlib.UUID:
        """A random UUID, journaled: a replay gets the same value."""
        value: uuidlib.UUID = await self._fact(
            "uuid", uuidlib.uuid4, lambda v: json.dumps(str(v)), uuidlib.UUID)
        return value

    # -- rate buckets ----------------------------------------------------------------------

    def _call_rate(self, rate: RateSpec) -> tuple[int, int, str, float]:
        """Take the position of a rate take (synchronously, with the step's call)."""
        if not isinstance(rate, tuple) or len(rate) not in (2, 3) \
                or not isinstance(rate[0], str) or not rate[0] \
                or not isinstance(rate[1], int | float) or isinstance(rate[1], bool) \
                or rate[1] <= 0 or (len(rate) == 3 and not callable(rate[2])):
            raise TypeError("rate must be (bucket, units) or (bucket, units, usage_fn) with "
                            f"units > 0, not {rate!r}")
        bucket, units = rate[0], float(rate[1])
        position, occurrence = self._call(f"rate:{bucket}")
        return position, occurrence, bucket, units

    @traced("rate")
    async def _take_units(self, position: int, occurrence: int, bucket: str,
                          units: float) -> int | None:
        """Take ``units`` from ``bucket`` (journaled, with the time they are ready),
        then wait until they are (``_wait_until``). Returns the attempt that took
        them last when the take was replayed, None when it was taken now."""
        name = f"rate:{bucket}"
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, "rate", name, None)
            ready = datetime.fromisoformat(entry["output"]["ready_at"])
            self._reserved[bucket] = float(entry["output"]["units"])
            await self._await_replay_turn(entry["turn"], entry["calls_before"], name)
            await self._wait_until(ready, position, occurrence, name)
            return int(entry["attempt"])
        await self._enter_live()
        try:
            turn, calls = self._take_turn()
            try:
                outcome, ready = await self._db(self._store.take_units(
                    run=self.id, epoch=self._claim.epoch, position=position, name=name,
                    occurrence=occurrence, bucket=bucket, units=units,
                    attempt=self.attempt, turn=turn, calls_before=calls))
                if outcome.startswith("lost:"):
                    self._closed = outcome[5:]
                    raise Abandoned(outcome[5:])
                self._reserved[bucket] = units
                await self._deliver(turn)
            finally:
                self._drop(turn)
        finally:
            self._exit_live()
        await self._wait_until(ready, position, occurrence, name)
        return None

    async def _retake_units(self, position: int, occurrence: int, bucket: str, units: float,
                            *, in_step: bool) -> None:
        """Take a step's units again for a new call of its function, into the take
        already journaled at ``position`` (``take_units`` with ``again``), then wait
        until they are ready: in the worker when called between the tries of a
        step (``in_step``: the step is live work), else as any take."""
        name = f"rate:{bucket}"
        if not in_step:
            await self._enter_live()
        try:
            outcome, ready = await self._db(self._store.take_units(
                run=self.id, epoch=self._claim.epoch, position=position, name=name,
                occurrence=occurrence, bucket=bucket, units=units, attempt=self.attempt,
                again=True))
            if outcome.startswith("lost:"):
                self._closed = outcome[5:]
                raise Abandoned(outcome[5:])
            self._reserved[bucket] = units
        finally:
            if not in_step:
                self._exit_live()
        await self._wait_until(ready, position, occurrence, name)

    async def _wait_until(self, ready: datetime, position: int, occurrence: int,
                          name: str) -> None:
        """Wait for a rate take to be ready: here if it is soon (or other work of the
        run is in flight), else suspended until then (no worker held)."""
        wait = (ready - self.db_now()).total_seconds()
        if wait <= 0:
            return
        if wait <= RATE_LOCAL_WAIT_SECONDS or self._live > 0 or self._gate is not None \
                or self._streams:
            await asyncio.sleep(wait)
            return
        gate = await self._close_gate()
        try:
            outcome, due = await self._db(self._store.sleep_until(
                run=self.id, epoch=self._claim.epoch, position=position, name=name,
                occurrence=occurrence, seconds=0, wake_at=ready, attempt=self.attempt))
            if outcome == "suspended":
                self._suspend(gate, due)
                raise Suspended(due)
            self._open_gate(gate)
            if outcome != "due":
                self._closed = outcome
                raise Abandoned(outcome)
        finally:
            if not gate.done():
                self._open_gate(gate)

    async def report_usage(self, bucket: str, units: float) -> None:
        """Correct bucket ``bucket`` by what the last step that took from it really
        used: ``units`` more or less than it took is taken or given back. Journaled:
        a replay does not correct twice."""
        reserved = self._reserved.get(bucket)
        if reserved is None:
            raise ValueError(f"report_usage({bucket!r}): no step of this run took units "
                             f"from {bucket!r} (step(..., rate=({bucket!r}, units)))")
        if not isinstance(units, int | float) or isinstance(units, bool) or units < 0:
            raise TypeError(f"report_usage needs the units used (a number >= 0), not {units!r}")
        name = f"usage:{bucket}"
        position, occurrence = self._call(name)
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, "rate", name, None)
            await self._await_replay_turn(entry["turn"], entry["calls_before"], name)
            return
        await self._enter_live()
        try:
            turn, calls = self._take_turn()
            try:
                outcome, _ready = await self._db(self._store.take_units(
                    run=self.id, epoch=self._claim.epoch, position=position, name=name,
                    occurrence=occurrence, bucket=bucket, units=float(units) - reserved,
                    attempt=self.attempt, turn=turn, calls_before=calls))
                if outcome.startswith("lost:"):
                    self._closed = outcome[5:]
                    raise Abandoned(outcome[5:])
                await self._deliver(turn)
            finally:
                self._drop(turn)
        finally:
            self._exit_live()

    # -- child runs ----------------------------------------------------------------------

    async def spawn(self, workflow: str, *args: Any, queue: str | None = None,
                    key: str | None = None, timeout: float | None = None,
                    concurrency_key: str | None = None, **kwargs: Any) -> ChildRun:
        """Start a child run of ``workflow(*args, **kwargs)``; returns its ``ChildRun``.

        The spawn is journaled: a replay gets the same child back, and a spawn
        executed again after a crash finds the child it created (the child's
        id derives from this run's id and the spawn's position, or from
        ``key`` when given). ``queue``: default, the workflow's registered
        queue. ``timeout``: seconds the child may take to end (it fails with
        ``TimeoutError`` after); default, this run's own deadline, if any.
        ``concurrency_key``: as for ``App.start``.
        """
        children = await self._spawn(workflow, [(args, kwargs)], queue=queue,
                                     keys=None if key is None else [key], timeout=timeout,
                                     concurrency_key=concurrency_key)
        return children[0]

    async def spawn_many(self, workflow: str, items: Any, *, queue: str | None = None,
                         keys: list[str] | None = None, timeout: float | None = None,
                         concurrency_key: str | None = None) -> list[ChildRun]:
        """Start one child run of ``workflow`` per item, in one round trip.

        Each item is the child's arguments: a tuple is spread as positional
        arguments, anything else is the one argument (``[("a", 1), ("b", 2)]``
        calls ``wf(run, "a", 1)`` and ``wf(run, "b", 2)``; ``["a", "b"]`` calls
        ``wf(run, "a")`` and ``wf(run, "b")``). ``keys``: one per item, as
        ``spawn(key=...)``.
        """
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (item, {}) if isinstance(item, tuple) else ((item,), {}) for item in items]
        if keys is not None and len(keys) != len(calls):
            raise ValueError(f"spawn_many got {len(calls)} items but {len(keys)} keys")
        if not calls:
            return []
        return await self._spawn(workflow, calls, queue=queue, keys=keys, timeout=timeout,
                                 concurrency_key=concurrency_key)

    @traced("spawn")
    async def _spawn(self, workflow: str, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                     *, queue: str | None, keys: list[str] | None,
                     timeout: float | None, concurrency_key: str | None) -> list[ChildRun]:
        if not isinstance(workflow, str) or not workflow:
            raise TypeError("spawn takes the child workflow's registered name")
        position, occurrence = self._call(workflow)
        fp = fingerprint(None, [workflow, [list(a) for a, _ in calls], keys],
                         [k for _, k in calls])
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, "spawn", workflow, fp)
            ids = [uuidlib.UUID(i) for i in entry["output"]]
            await self._await_replay_turn(entry["turn"], entry["calls_before"],
                                          f"spawn {workflow!r}")
            return [ChildRun(self, i, workflow) for i in ids]
        if self._child_settings is None:
            raise TypeError("this run cannot spawn children (no App behind it)")
        child_queue, max_attempts, max_recoveries = self._child_settings(workflow, queue)
        ids = [child_id(self.id, position, n, None if keys is None else keys[n])
               for n in range(len(calls))]
        if len(set(ids)) != len(ids):
            raise ValueError("spawn_many got the same key twice")
        inputs = [self._ser.dumps({"args": list(a), "kwargs": k},
                                  what=f"input of child {n} of {workflow!r} of run {self.id}")
                  for n, (a, k) in enumerate(calls)]
        self._budget(38 * len(ids))
        await self._enter_live()
        try:
            turn, calls_before = self._take_turn()
            try:
                lost = await self._db(self._store.spawn_runs(
                    run=self.id, epoch=self._claim.epoch, position=position, name=workflow,
                    occurrence=occurrence, attempt=self.attempt, turn=turn,
                    calls_before=calls_before, fingerprint=fp, ids=ids, workflow=workflow,
                    queue=child_queue, inputs=inputs, max_attempts=max_attempts,
                    max_recoveries=max_recoveries, timeout=timeout,
                    concurrency_key=concurrency_key))
                if lost is not None:
                    self._closed = lost
                    raise Abandoned(lost)
                await self._deliver(turn)
            finally:
                self._drop(turn)
        finally:
            self._exit_live()
        return [ChildRun(self, i, workflow) for i in ids]

    async def wait_all(self, children: list[ChildRun], *,
                       return_exceptions: bool = False) -> list[Any]:
        """The outputs of all ``children``, in order, once every one has ended.

        Until then the run is suspended: no worker holds it, and the
        transaction that ends the last child wakes it. A child that failed,
        died or was cancelled raises ``ChildFailed`` (the first such in the
        list), or stands in the list as that exception with
        ``return_exceptions=True``. The outcomes are journaled.
        """
        kids = self._own(children)
        if not kids:
            return []
        if any(c._outcome is None for c in kids):
            results = await self._wait_children("wait_all", kids, "all", False,
                                                raise_failures=not return_exceptions)
            for c, outcome in zip(kids, results, strict=True):
                c._settle(outcome)
        return [c._value(return_exceptions=return_exceptions) for c in kids]

    async def wait_first(self, children: list[ChildRun], *,
                         cancel_rest: bool = False) -> ChildRun:
        """The first of ``children`` to end (``await it.result()`` for its output or
        ``ChildFailed``, without another wait). Suspends the run until one has.
        The others keep running, or are cancelled with ``cancel_rest=True``."""
        kids = self._own(children)
        if not kids:
            raise ValueError("wait_first needs at least one child")
        result = await self._wait_children("wait_first", kids, "first", cancel_rest,
                                           raise_failures=False)
        winner = kids[int(result["index"])]
        winner._settle(result["outcome"])
        return winner

    def _own(self, children: list[ChildRun]) -> list[ChildRun]:
        kids = list(children)
        for c in kids:
            if not isinstance(c, ChildRun) or c._run is not self:
                raise TypeError(f"{c!r} is not a child run spawned by this run")
        return kids

    async def _wait_one(self, child: ChildRun) -> None:
        """``child.result()``: wait for one child; a failure it raises is retried
        by a retry of this run (see ``_wait_children``)."""
        (outcome,) = await self._wait_children("result", [child], "all", False,
                                               raise_failures=True)
        child._settle(outcome)

    @traced("children")
    async def _wait_children(self, name: str, kids: list[ChildRun], mode: str,
                             cancel_rest: bool, *, raise_failures: bool) -> Any:
        """Journal the outcomes of ``kids`` once the wait is over, suspending the run
        until then. With ``raise_failures`` an outcome the workflow will raise
        (``ChildFailed``) is journaled as a failure: if it ends this attempt, a
        retry of the run waits again, and sees the child's new outcome if the
        child was retried meanwhile."""
        position, occurrence = self._call(name)
        entry = await self._entry(position)
        if entry is not None:
            self._check(position, entry, "children", name, None)
            if entry["status"] == "completed" or await self._replays_failure(position, entry):
                await self._await_replay_turn(entry["turn"], entry["calls_before"], name)
                return entry["output"]
            self._skip(entry)
        ids = [c.id for c in kids]
        while True:
            gate = await self._close_gate()
            turn, calls = self._take_turn()
            try:
                outcome, results = await self._db(self._store.wait_children(
                    run=self.id, epoch=self._claim.epoch, position=position, name=name,
                    occurrence=occurrence, attempt=self.attempt, turn=turn,
                    calls_before=calls, children=ids, mode=mode, cancel_rest=cancel_rest,
                    raise_failures=raise_failures))
                if outcome == "suspended":
                    self._suspend(gate, None)
                    raise Suspended(None)
                self._open_gate(gate)
                if outcome == "ready":
                    self._budget(len(json.dumps(results)))
                    await self._deliver(turn)
                    return results
                if outcome == "lost":
                    self._closed = str(results)
                    raise Abandoned(str(results))
            finally:
                self._drop(turn)
                if not gate.done():
                    self._open_gate(gate)
            # 'again': children ended while the parent's row was locked; the rest
            # must be locked before it (one lock order): ask once more.

    # -- changing code under running runs -------------------------------------------------
    #
    # ``patched(name)`` decides synchronously, from the journal's patch markers
    # (loaded with the outline before the workflow starts, see ``prepare``):
    # a marker of that name at the call's position -> True (the marker is the
    # call's entry); the journal went past the position without it -> False
    # (the run was journaled by the old code; no position is taken, so later
    # entries keep theirs); otherwise the execution is live -> True, and the
    # marker is journaled by a task. Every later database call of the run
    # (``_db``) and the end of the workflow (``settle``) wait for that task, so
    # no entry after a marker can be committed without it: a crash can never
    # leave later entries whose positions assumed a marker that is missing.
    # Markers are not deliveries (no turn): ``patched`` does not await, so it
    # cannot change how parallel branches interleave.

    #: The journal's patch markers, position -> name (``_outline`` sets it).
    _patch_marks: dict[int, str] | None = None
    #: What ``patched`` answered so far in this execution, by patch name.
    _patch_answers: dict[str, bool] | None = None
    #: The latest live marker write; each waits for the one before it.
    _marker_write: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        """Load what the synchronous ``patched`` needs (the journal outline) before
        the workflow starts. Called by the worker; a run without a journal costs
        nothing, one with a journal the round trip its first call would make."""
        await self._outline()

    def patched(self, name: str) -> bool:
        """Whether this run takes the code path added under patch ``name``.

        ``if run.patched("retry-with-backoff"): <new code> else: <old code>``.
        A run that reaches this point for the first time journals a marker and
        gets True; a replay of a run whose journal went past this point without
        the marker (journaled by the old code) gets False, and one that finds
        the marker gets True. The answer for a name is fixed for the whole
        execution (later calls with the same name return it again). Synchronous:
        no ``await``. See ``docs/code-changes.md``.
        """
        if not isinstance(name, str) or not name:
            raise TypeError("a patch name must be a non-empty string")
        answers = self._patch_answers
        if answers is None:
            answers = self._patch_answers = {}
        if name in answers:
            return answers[name]
        self._raise_if_closed()
        marks = self._marks("patched")
        position = self._position
        if marks.get(position) == name:
            self._call(name)  # the marker is this call's journal entry
            answer = True
        elif position <= self._last_position:
            answer = False    # journaled by the old code: take no position
        else:
            position, occurrence = self._call(name)
            self._journal_marker(position, occurrence, name)
            answer = True
        answers[name] = answer
        return answer

    def deprecate_patch(self, name: str) -> None:
        """Where ``if run.patched(name):`` was, once no run that took the old path
        is left: runs journaled with the marker still replay (the marker's
        position is taken here), and new runs journal nothing."""
        if not isinstance(name, str) or not name:
            raise TypeError("a patch name must be a non-empty string")
        self._raise_if_closed()
        if self._marks("deprecate_patch").get(self._position) == name:
            self._call(name)

    def _marks(self, what: str) -> dict[int, str]:
        if not self._outlined:
            raise RuntimeError(
                f"run.{what}() needs the run's journal outline, which the worker loads "
                "before the workflow starts (await run.prepare() first)")
        return self._patch_marks or {}

    def _journal_marker(self, position: int, occurrence: int, name: str) -> None:
        previous = self._marker_write
        started = self.db_now()

        async def write() -> None:
            if previous is not None:
                await previous  # markers are committed in position order
            try:
                lost = await self._store.journal_step(
                    run=self.id, epoch=self._claim.epoch, position=position, name=name,
                    occurrence=occurrence, kind="patch", status="completed", output="true",
                    error=None, attempt=self.attempt, started_at=started)
            except DatabaseUnavailable:
                self.db_failed = True
                self._closed = "database unavailable"
                raise Abandoned("database unavailable") from None
            if lost is None:
                return
            if lost == "suspended" and self._suspended is not None:
                # A parallel branch suspended the run first: nothing after the
                # marker can be journaled now, and the resumed run decides again.
                return
            self._closed = lost
            raise Abandoned(lost)

        self._marker_write = asyncio.get_running_loop().create_task(
            write(), name=f"pgjournal-patch-{self.id}-{position}")

    async def _markers_durable(self) -> None:
        """Wait until the patch markers journaled so far are committed (or raise
        what their write raised: the run was lost)."""
        if self._marker_write is not None:
            await asyncio.shield(self._marker_write)

    # -- after the workflow -------------------------------------------------------------------

    async def unreplayed(self) -> list[dict[str, Any]]:
        """Journal entries the workflow never asked for (its code changed under the run)."""
        if not self._claim.has_journal:
            return []
        await self._outline()
        missing = [p for p in range(self._last_position + 1) if p not in self._asked]
        if not missing:
            return []
        found: list[dict[str, Any]] = []
        for p in missing[:20]:
            entry = self._entries.get(p)
            if entry is None and p > self._loaded_upto:
                entry = await self._entry(p)
            if entry is not None:
                found.append({"position": p, "name": entry["name"], "kind": entry["kind"]})
        return found

    def close(self, reason: str = "finished") -> None:
        """Wake and unwind whatever the run's branches still wait for."""
        if self._closed is None:
            self._closed = reason
        if self._gate is not None and not self._gate.done():
            self._gate.set_result(None)
        self._progress()


class _Stream:
    """One ``stream_step`` call: its replay, or its live iteration and journaling."""

    def __init__(self, run: Run, position: int, occurrence: int, name: str,
                 fn: Callable[..., AsyncIterator[Any]], args: Any, kwargs: Any) -> None:
        self.run = run
        self.position = position
        self.occurrence = occurrence
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.delivered: list[tuple[str, int, int]] = []   # (text, turn, calls_before)
        self.flushed = 0
        self.journaled = False
        self.started = run.db_now()

    async def iterate(self) -> AsyncGenerator[Any, None]:
        run = self.run
        entry = await run._entry(self.position)
        if entry is not None:
            run._check(self.position, entry, "stream", self.name,
                       fingerprint(self.fn, self.args, self.kwargs))
            if entry["status"] == "completed":
                async for value in self._replay(entry):
                    yield value
                return
            if await run._replays_failure(self.position, entry):
                async for value in self._replay(entry):
                    yield value
                exc = rebuild_exception(entry["error"])
                await run._await_replay_turn(entry["turn"], entry["calls_before"],
                                             f"stream {self.name!r}")
                raise exc
            run._skip(entry)
            after = -1
            while True:  # the chunks of the failed attempt are not replayed either
                rows = await run._db(run._store.chunk_page(run.id, self.position, after))
                if not rows:
                    break
                for r in rows:
                    if r["turn"] is not None:
                        run._skipped.add(r["turn"])
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
        run = self.run
        after = -1
        what = f"stream {self.name!r}"
        output = entry.get("output")
        cut = (entry["status"] == "completed" and isinstance(output, dict)
               and bool(output.get("cut")))
        count = output.get("chunks") if cut and isinstance(output, dict) else None
        while count is None or after + 1 < count:
            rows = await run._db(run._store.chunk_page(run.id, self.position, after))
            if not rows:
                break
            for r in rows:
                if count is not None and r["seq"] >= count:
                    break
                value = run._ser.loads(r["chunk"])
                await run._await_replay_turn(r["turn"], r["calls_before"], what)
                yield value
                after = r["seq"]
        if cut:
            # The first execution stopped reading here; so must the replay.
            raise NonDeterminismError(
                f"run {run.id}: stream {self.name!r} was cut short after {after + 1} chunks "
                "on its first execution, and the replay reads past them (a stream left "
                "open while the run waited for a signal or slept cannot be read on after "
                "it resumes: read it to the end, or stop reading it, before waiting)")
        if entry["status"] == "completed":
            await run._await_replay_turn(entry["turn"], entry["calls_before"], what)

    async def _live(self) -> AsyncGenerator[Any, None]:
        run = self.run
        await run._enter_live()
        run._streams.add(self)
        what = run._what("stream", self.name)
        finished = False
        try:
            last_flush = time.monotonic()
            async for chunk in self.fn(*self.args, **self.kwargs):
                text, value = run._ser.roundtrip(chunk, what=what)
                turn, calls = run._take_turn()
                try:
                    await run._deliver(turn)
                finally:
                    run._drop(turn)
                self.delivered.append((text, turn, calls))
                run._exit_live()
                try:
                    yield value
                finally:
                    run._live += 1
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
            run._streams.discard(self)
            run._exit_live()
        if finished and not self.journaled:
            turn, calls = run._take_turn()
            try:
                await self._journal("completed", {"chunks": len(self.delivered)}, None,
                                    turn=turn, calls=calls)
                await run._deliver(turn)
            finally:
                run._drop(turn)

    async def _flush(self) -> None:
        run = self.run
        pending = self.delivered[self.flushed:]
        if not pending:
            return
        lost = await run._db(run._store.append_chunks(
            run=run.id, epoch=run._claim.epoch, position=self.position,
            chunk_start=self.flushed, chunks="[" + ",".join(t for t, _, _ in pending) + "]",
            chunk_turns=[t for _, t, _ in pending], chunk_calls=[c for _, _, c in pending]))
        if lost is not None:
            run._closed = lost
            raise Abandoned(lost)
        self.flushed += len(pending)

    async def _journal(self, status: str, output: Any, error: dict[str, Any] | None, *,
                       turn: int | None = None, calls: int | None = None) -> None:
        run = self.run
        pending = self.delivered[self.flushed:]
        self.journaled = True
        start = self.flushed
        self.flushed = len(self.delivered)
        await run._journal_write(
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
            self.run._streams.discard(self)
        # If the run is gone or ending, the stream runs again on resume.
        with contextlib.suppress(Abandoned, SerializationError, JournalTooLarge):
            await self._journal("completed", {"chunks": len(self.delivered), "cut": True}, None)
        if not final:
            self.journaled = False

