"""The replay engine of a run: positions, turns, the replay gate, the journal
cursor, journal writes and the lease check. Its rules (``docs/contributing.md``):

- every journaled call takes the next position synchronously, before any await
  (``call``); a journal entry there makes it a replay, checked (``check``) to be
  for the same call, else ``NonDeterminismError``; otherwise it executes and is
  journaled (``journal_write``), fenced by the lease epoch;
- every result handed to the workflow (a delivery) has a turn: live ones are
  handed over in turn order (``take_turn``, ``deliver``, ``drop``), journaled
  ones only when their turn comes and after the calls that preceded them the
  first time (``await_replay_turn``); parallel branches so interleave as they
  did, and each call gets the position it had;
- live work is counted (``enter_live``, which confirms a stale lease); a wait
  that may suspend the run shuts the gate (``close_gate``) once no live work is
  in flight, and no new work starts until it is ``suspend``-ed or ``open_gate``-d;
- the journal is read in bounded pages as the replay reaches it (``journal``).

Feature modules use the engine only through ``INTERFACE`` (tests/test_layout.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid as uuidlib
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from .._unwind import Abandoned, Suspended
from ..errors import DatabaseUnavailable, NonDeterminismError
from ..tracing import replayed
from .journal import PAGE_BYTES as PAGE_BYTES
from .journal import PAGE_ENTRIES as PAGE_ENTRIES
from .journal import Journal

if TYPE_CHECKING:
    from ..serializer import Serializer
    from ..store import Claim, Store

#: A replay that waits this long for a journaled result whose turn never comes
#: (the workflow stopped asking in the recorded order) fails as non-deterministic.
REPLAY_STALL_SECONDS = 30.0
#: Default journal budget of one run (``App(max_journal_bytes=...)``).
DEFAULT_MAX_JOURNAL_BYTES = 256 * 1024 * 1024

#: The engine as feature modules see it: nothing else of it may they touch.
INTERFACE = frozenset({
    "id", "attempt", "workflow", "epoch", "store", "ser", "db_now",          # facts
    "call", "next_position", "next_occurrence", "check", "raise_if_closed",  # identity
    "outlined", "last_position", "patch_marks", "entry", "replays_failure",  # the journal
    "journal_write", "budget", "db", "what", "chain_write", "writes_durable",
    "await_replay_turn", "take_turn", "deliver", "drop", "skip", "skip_turn",  # order
    "enter_live", "exit_live", "reenter_live", "fresh", "confirm_lease", "busy",  # the gate
    "close_gate", "open_gate", "suspend", "suspended",
    "hold_stream", "release_stream", "open_streams",
    "lose", "database_failed",                                              # losing the run
})
#: What ``Run`` alone asks of the engine besides: the worker's calls around the body.
LIFECYCLE = frozenset({"outline", "unreplayed", "close", "db_failed"})


def fingerprint(fn: Callable[..., Any] | None, args: Any, kwargs: Any) -> str:
    """A short hash of a call: the function's name and its arguments.

    Values JSON cannot hold count by their type name only (their ``repr`` may
    hold a memory address, which differs on every execution).
    """
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    text = json.dumps([name, args, kwargs], sort_keys=True, separators=(",", ":"),
                      default=lambda o: f"<{type(o).__qualname__}>")
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class LeaseGuard(Protocol):
    """What ``Run`` needs of the worker's local lease (see ``pgjournal.lease``)."""

    async def ensure(self) -> bool: ...

    def fresh(self) -> bool: ...


class OpenStream(Protocol):
    """A stream the workflow holds open: journaled as cut before the gate shuts."""

    async def journal_cut(self, *, final: bool) -> None: ...


class Engine:
    """The deterministic core of one execution of a run (see the module doc)."""

    def __init__(self, store: Store, serializer: Serializer, claim: Claim, *,
                 lease: LeaseGuard | None, max_journal_bytes: int) -> None:
        self.store = store
        self.ser = serializer
        self._claim = claim
        self._lease = lease
        self._claimed_monotonic = time.monotonic()
        self.id: uuidlib.UUID = claim.run_id
        self.attempt: int = claim.attempt
        self.workflow: str = claim.workflow
        self.epoch: int = claim.epoch
        self.db_failed = False
        # Call identity.
        self._position = 0
        self._occurrences: Counter[str] = Counter()
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._main_task = asyncio.current_task()
        self._asked: set[int] = set()    # positions the workflow asked for
        # The journal, loaded lazily in pages.
        self._journal = Journal(store, claim.run_id, has_journal=claim.has_journal,
                                max_bytes=max_journal_bytes, db=self.db)
        # Delivery order.
        self._turn_idx = 0               # next journaled turn to deliver
        self._skipped: set[int] = set()  # journaled turns re-executed live instead
        self._live_taken = 0             # live turns taken (they follow the journaled)
        self._live_turns: set[int] = set()
        self._changed = asyncio.Event()
        # Suspension barrier: live work in flight, and a wait that may suspend.
        self._live = 0
        self._gate: asyncio.Future[datetime | None] | None = None
        self._streams: set[OpenStream] = set()
        self._closed: str | None = None
        self._suspended: tuple[datetime | None] | None = None
        #: The latest write that later database calls wait for (patch markers).
        self._barrier: asyncio.Task[None] | None = None

    # -- facts -----------------------------------------------------------------

    def db_now(self) -> datetime:
        """The database clock now, estimated from the claim (no round trip)."""
        elapsed = time.monotonic() - self._claimed_monotonic
        return self._claim.db_now + timedelta(seconds=elapsed)

    # -- identity ----------------------------------------------------------------

    def call(self, name: str) -> tuple[int, int]:
        """Allocate the position and occurrence of a call (synchronously)."""
        if not isinstance(name, str) or not name:
            raise TypeError("a step name must be a non-empty string")
        self.raise_if_closed()
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

    @property
    def next_position(self) -> int:
        """The position the next call will take."""
        return self._position

    def next_occurrence(self, name: str) -> int:
        """The occurrence the next call named ``name`` will take."""
        return self._occurrences[name]

    def raise_if_closed(self) -> None:
        if self._suspended is not None:
            raise Suspended(self._suspended[0])
        if self._closed is not None:
            raise Abandoned(self._closed)

    def check(self, position: int, entry: dict[str, Any], kind: str, name: str,
              fp: str | None) -> None:
        """The journaled entry at ``position`` is for this call, or the replay fails."""
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

    # -- the journal (journal.py reads it) --------------------------------------------

    @property
    def outlined(self) -> bool:
        """Whether the journal's outline (last position, turns, patch markers) is known."""
        return self._journal.outlined

    @property
    def last_position(self) -> int:
        """The journal's last position (-1: empty), once outlined."""
        return self._journal.last_position

    @property
    def patch_marks(self) -> dict[int, str]:
        """The journal's patch markers, position -> name, once outlined."""
        return self._journal.patch_marks

    async def outline(self) -> None:
        await self._journal.outline()

    async def entry(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position`` (taken: each is handed out once)."""
        return await self._journal.take(position)

    async def replays_failure(self, position: int, entry: dict[str, Any]) -> bool:
        """Whether a journaled failure is replayed, or executed again by this retry
        (it ended an earlier attempt)."""
        return await self._journal.replays_failure(position, entry, self.attempt)

    async def unreplayed(self) -> list[dict[str, Any]]:
        """Journal entries the workflow never asked for (its code changed under the run)."""
        return await self._journal.unreplayed(self._asked)

    def budget(self, size: int) -> None:
        self._journal.budget(size)

    # -- delivery order -------------------------------------------------------------

    def _progress(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _journaled_turn_pending(self) -> int | None:
        turns = self._journal.turns
        while self._turn_idx < len(turns) and turns[self._turn_idx] in self._skipped:
            self._turn_idx += 1
        return turns[self._turn_idx] if self._turn_idx < len(turns) else None

    async def await_replay_turn(self, turn: int | None, calls_before: int | None,
                                what: str) -> None:
        """Hand a journaled result back only when its turn comes (see module doc)."""
        replayed()
        if turn is None:
            return  # journaled before turns existed: in call order, as it was
        stalled_since = time.monotonic()
        while not (self._journaled_turn_pending() == turn
                   and self._position >= (calls_before or 0)):
            self.raise_if_closed()
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

    def take_turn(self) -> tuple[int, int]:
        """Number a live delivery; the caller must ``deliver`` or ``drop`` it. (Every
        live call reads its journal entry first: the journaled turns are known.)"""
        turns = self._journal.turns
        turn = (turns[-1] + 1 if turns else 0) + self._live_taken
        self._live_taken += 1
        self._live_turns.add(turn)
        return turn, self._position

    async def deliver(self, turn: int) -> None:
        """Wait until every earlier live delivery has been handed over."""
        while min(self._live_turns) != turn:
            if self._closed is not None:
                self.drop(turn)
                self.raise_if_closed()
            await self._changed.wait()
        self.drop(turn)

    def drop(self, turn: int) -> None:
        if turn in self._live_turns:
            self._live_turns.discard(turn)
            self._progress()

    def skip(self, entry: dict[str, Any]) -> None:
        """A journaled failure is executed again: its turn is not replayed."""
        if entry.get("turn") is not None:
            self._skipped.add(entry["turn"])
            self._progress()

    def skip_turn(self, turn: int) -> None:
        """A journaled delivery (a chunk of a failed stream) is not replayed."""
        self._skipped.add(turn)

    # -- live work, the lease, and the suspension gate ------------------------------------

    async def enter_live(self) -> None:
        """Before live work: wait while a signal wait or sleep may suspend the run,
        confirm the lease if its local deadline passed, then count the work."""
        while self._gate is not None:
            await asyncio.shield(self._gate)
            self.raise_if_closed()
        self.raise_if_closed()
        await self.confirm_lease()
        self._live += 1
        self._progress()

    def exit_live(self) -> None:
        self._live -= 1
        self._progress()

    def reenter_live(self) -> None:
        """Count live work again after handing a value to the workflow (a stream
        between chunks): no gate wait, no lease check."""
        self._live += 1

    def fresh(self) -> bool:
        """Thread-safe: may a step start now without asking the database?"""
        return self._lease is None or self._lease.fresh()

    async def confirm_lease(self) -> None:
        """Ask the database to confirm the lease; the run is lost if it cannot."""
        if self._lease is not None and not await self._lease.ensure():
            self._closed = "lease lost"
            raise Abandoned("lease lost before a step started") from None

    @property
    def busy(self) -> bool:
        """Other work of the run is in flight (live work, a shut gate, open streams)."""
        return self._live > 0 or self._gate is not None or bool(self._streams)

    def hold_stream(self, stream: OpenStream) -> None:
        self._streams.add(stream)

    def release_stream(self, stream: OpenStream) -> None:
        self._streams.discard(stream)

    def open_streams(self) -> list[OpenStream]:
        return list(self._streams)

    async def close_gate(self) -> asyncio.Future[datetime | None]:
        """A signal wait or sleep goes to the database only when no live work of the
        run is in flight, and no new work starts until it knows whether the run is
        suspended: in-flight steps are journaled, not lost to the suspension."""
        while self._gate is not None:
            await asyncio.shield(self._gate)
            self.raise_if_closed()
        self.raise_if_closed()
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
            self.open_gate(gate)
            raise
        return gate

    def open_gate(self, gate: asyncio.Future[datetime | None]) -> None:
        if self._gate is gate:
            self._gate = None
        if not gate.done():
            gate.set_result(None)
        self._progress()

    def suspend(self, gate: asyncio.Future[datetime | None], until: datetime | None) -> None:
        """The run is suspended: gated work unwinds too (the gate stays shut)."""
        self._suspended = (until,)
        self._closed = "suspended"
        if not gate.done():
            gate.set_result(until)
        self._progress()

    @property
    def suspended(self) -> bool:
        return self._suspended is not None

    # -- database plumbing ----------------------------------------------------------------

    async def db(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await a database call of the run; an unavailable database loses the run."""
        if self._barrier is not None:  # patch markers before anything after them
            try:
                await self.writes_durable()
            except BaseException:
                coro.close()
                raise
        try:
            return await coro
        except DatabaseUnavailable:
            # Whether the write committed is unknown: stop here and let the
            # lease expire; the next owner replays from what was committed.
            self.database_failed()

    def database_failed(self) -> NoReturn:
        """Whether a write committed is unknown: the run is lost to this worker."""
        self.db_failed = True
        self._closed = "database unavailable"
        raise Abandoned("database unavailable") from None

    def lose(self, reason: str) -> NoReturn:
        """The database says the run is no longer ours (``reason``): unwind."""
        self._closed = reason
        raise Abandoned(reason)

    async def journal_write(self, position: int, name: str, occurrence: int, kind: str,
                            status: str, output: str | None, error: dict[str, Any] | None,
                            **extra: Any) -> None:
        error_text = json.dumps(error) if error is not None else None
        self.budget(len(output or "") + len(error_text or ""))
        lost = await self.db(self.store.journal_step(
            run=self.id, epoch=self.epoch, position=position, name=name,
            occurrence=occurrence, kind=kind, status=status, output=output,
            error=error_text, attempt=self.attempt, **extra,
        ))
        if lost is not None:
            self.lose(lost)

    def chain_write(self, write: Callable[[], Awaitable[None]], name: str) -> None:
        """Start ``write`` after the chained writes before it; every later ``db`` call
        (and ``writes_durable``) waits for it: nothing after it commits without it."""
        previous = self._barrier

        async def ordered() -> None:
            if previous is not None:
                await previous  # committed in the order they were chained
            await write()

        self._barrier = asyncio.get_running_loop().create_task(ordered(), name=name)

    async def writes_durable(self) -> None:
        """Wait until the chained writes so far are committed (or raise what their
        write raised: the run was lost)."""
        if self._barrier is not None:
            await asyncio.shield(self._barrier)

    def what(self, kind: str, name: str) -> str:
        return f"{'result' if kind != 'stream' else 'chunk'} of {kind} {name!r} of run {self.id}"

    def close(self, reason: str = "finished") -> None:
        """Wake and unwind whatever the run's branches still wait for."""
        if self._closed is None:
            self._closed = reason
        if self._gate is not None and not self._gate.done():
            self._gate.set_result(None)
        self._progress()
