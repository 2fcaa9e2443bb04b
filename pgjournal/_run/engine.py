"""The replay engine of a run: positions, turns, the replay gate, the journal
cursor, journal writes and the lease check.

Identity. Every journaled call takes the next *position* when it is made,
synchronously, before any await (``call``). If the journal holds an entry at
that position the call is a replay: it gets the journaled value (after
``check`` found the entry is for the same call, else ``NonDeterminismError``);
otherwise it executes and journals its result (``journal_write``), fenced by
the lease epoch.

Order. With parallel steps (``asyncio.gather``, ``TaskGroup``, ``create_task``)
the position a call gets depends on how the branches interleaved, which
depends on the order in which results reached them. So every result handed
to the workflow (a *delivery*) is numbered (its ``turn``) and journaled with
how many calls the workflow had made by then (``calls_before``). Live results
are handed over in turn order (``take_turn``, ``deliver``, ``drop``); a
replay hands each journaled result back only when its turn comes and no
earlier than the calls that preceded it the first time
(``await_replay_turn``). The branches then interleave exactly as they did,
and each call gets the position it had. A replay that still asks
differently fails loudly.

The gate. Live work is counted (``enter_live`` / ``exit_live``; entering
confirms the lease if its local deadline passed). A signal wait or sleep
closes the gate (``close_gate``): it goes to the database only when no live
work is in flight, and no new work starts until it knows whether the run is
suspended (``suspend``) or goes on (``open_gate``).

The journal is loaded in bounded pages as the replay reaches it, so a large
journal costs the claim nothing and its replay a few round trips.

Feature modules (steps, streams, waits, rate buckets, child runs, patches)
use the engine only through ``INTERFACE``; ``tests/test_layout.py`` checks it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid as uuidlib
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from .._unwind import Abandoned, Suspended
from ..errors import DatabaseUnavailable, JournalTooLarge, NonDeterminismError
from ..tracing import replayed

if TYPE_CHECKING:
    from ..serializer import Serializer
    from ..store import Claim, Store

#: Journal entries (and stream chunks) loaded per round trip, and their byte budget.
PAGE_ENTRIES = 500
PAGE_BYTES = 8 * 1024 * 1024
#: A replay that waits this long for a journaled result whose turn never comes
#: (the workflow stopped asking in the recorded order) fails as non-deterministic.
REPLAY_STALL_SECONDS = 30.0
#: Default journal budget of one run (``App(max_journal_bytes=...)``).
DEFAULT_MAX_JOURNAL_BYTES = 256 * 1024 * 1024

#: The engine as feature modules see it: nothing else of it may they touch.
INTERFACE = frozenset({
    # facts of the run
    "id", "attempt", "workflow", "epoch", "store", "ser", "db_now",
    # identity
    "call", "next_position", "next_occurrence", "check", "raise_if_closed",
    # the journal
    "outlined", "last_position", "patch_marks", "entry", "replays_failure",
    "journal_write", "budget", "db", "what",
    # delivery order
    "await_replay_turn", "take_turn", "deliver", "drop", "skip", "skip_turn",
    # live work, the lease and the gate
    "enter_live", "exit_live", "reenter_live", "fresh", "confirm_lease", "busy",
    "close_gate", "open_gate", "suspend", "suspended",
    "hold_stream", "release_stream", "open_streams",
    # ending
    "lose", "database_failed", "chain_write", "writes_durable",
})


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
        self._max_journal_bytes = max_journal_bytes
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
        # The journal, loaded lazily in pages.
        self._outlined = not claim.has_journal
        self._last_position = -1
        self._entries: dict[int, dict[str, Any]] = {}
        self._loaded_upto = -1
        self._page_lock = asyncio.Lock()
        self._journal_bytes = 0
        self._asked: set[int] = set()
        self._patch_marks: dict[int, str] = {}
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
        self._streams: set[OpenStream] = set()
        self._closed: str | None = None
        self._suspended: tuple[datetime | None] | None = None
        self._summary: dict[int, tuple[str, int]] = {}  # consumed entries: status, attempt
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

    # -- the journal ---------------------------------------------------------------

    @property
    def outlined(self) -> bool:
        """Whether the journal's outline (last position, turns, patch markers) is known."""
        return self._outlined

    @property
    def last_position(self) -> int:
        """The journal's last position (-1: empty), once outlined."""
        return self._last_position

    @property
    def patch_marks(self) -> dict[int, str]:
        """The journal's patch markers, position -> name, once outlined."""
        return self._patch_marks

    async def outline(self) -> None:
        if self._outlined:
            return
        async with self._page_lock:
            if self._outlined:
                return
            row = await self.db(self.store.journal_outline(self.id))
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

    async def entry(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position`` (taken: each is handed out once)."""
        entry = await self._peek(position)
        if entry is not None:
            del self._entries[position]
            self._summary[position] = (entry["status"], entry["attempt"])
        return entry

    async def _peek(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position``, loading pages as the replay reaches them."""
        await self.outline()
        if position > self._last_position:
            return None
        while position > self._loaded_upto:
            async with self._page_lock:
                if position <= self._loaded_upto:
                    break
                rows = await self.db(self.store.journal_page(
                    self.id, self._loaded_upto, limit=PAGE_ENTRIES, max_bytes=PAGE_BYTES))
                if not rows:
                    self._loaded_upto = self._last_position
                    break
                for r in rows:
                    self._entries[r["position"]] = r
                self._loaded_upto = rows[-1]["position"]
        return self._entries.get(position)

    async def replays_failure(self, position: int, entry: dict[str, Any]) -> bool:
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

    async def unreplayed(self) -> list[dict[str, Any]]:
        """Journal entries the workflow never asked for (its code changed under the run)."""
        if not self._claim.has_journal:
            return []
        await self.outline()
        missing = [p for p in range(self._last_position + 1) if p not in self._asked]
        if not missing:
            return []
        found: list[dict[str, Any]] = []
        for p in missing[:20]:
            entry = self._entries.get(p)
            if entry is None and p > self._loaded_upto:
                entry = await self.entry(p)
            if entry is not None:
                found.append({"position": p, "name": entry["name"], "kind": entry["kind"]})
        return found

    # -- delivery order -------------------------------------------------------------

    def _progress(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _journaled_turn_pending(self) -> int | None:
        while self._turn_idx < len(self._turns) and self._turns[self._turn_idx] in self._skipped:
            self._turn_idx += 1
        return self._turns[self._turn_idx] if self._turn_idx < len(self._turns) else None

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
        """Number a live delivery; the caller must ``deliver`` or ``drop`` it."""
        turn = self._next_turn
        self._next_turn += 1
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
        if self._lease is not None and not await self._lease.ensure():
            self._closed = "lease lost"
            raise Abandoned("lease lost before a step started")
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

    def budget(self, size: int) -> None:
        self._journal_bytes += size
        if self._journal_bytes > self._max_journal_bytes:
            raise JournalTooLarge(
                f"run {self.id} would journal {self._journal_bytes} bytes, over its budget "
                f"of {self._max_journal_bytes} (App(max_journal_bytes=...)); journal "
                "references to large data instead of the data"
            )

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
