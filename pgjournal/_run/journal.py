"""The journal of one run as its replay reads it, a part of the engine
(``engine.Engine`` alone uses it): the outline (last position, turns, patch
markers, size) in one round trip, then the entries in bounded pages as the
replay reaches them, so a large journal costs the claim nothing and its replay
a few round trips. Each entry is handed out once (``take``)."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..errors import JournalTooLarge

if TYPE_CHECKING:
    from ..store import Store

#: Journal entries (and stream chunks) loaded per round trip, and their byte budget.
PAGE_ENTRIES = 500
PAGE_BYTES = 8 * 1024 * 1024


class Journal:
    """The stored journal of one run: read lazily, and its size kept to a budget."""

    def __init__(self, store: Store, run_id: uuidlib.UUID, *, has_journal: bool,
                 max_bytes: int, db: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]
                 ) -> None:
        self._store = store
        self._id = run_id
        self._db = db   # the engine's database calls (they wait for chained writes)
        self._max_bytes = max_bytes
        self.has_journal = has_journal
        self.outlined = not has_journal
        self.last_position = -1
        self.turns: list[int] = []                # journaled turns, sorted
        self.patch_marks: dict[int, str] = {}     # patch markers: position -> name
        self._entries: dict[int, dict[str, Any]] = {}
        self._loaded_upto = -1
        self._page_lock = asyncio.Lock()
        self._bytes = 0
        self._summary: dict[int, tuple[str, int]] = {}  # taken entries: status, attempt

    async def outline(self) -> None:
        if self.outlined:
            return
        async with self._page_lock:
            if self.outlined:
                return
            row = await self._db(self._store.journal_outline(self._id))
            self.turns = list(row["turns"] or [])
            self.last_position = -1 if row["last_position"] is None else row["last_position"]
            if row["bytes"] > self._max_bytes:
                raise JournalTooLarge(
                    f"run {self._id} holds a journal of {row['bytes']} bytes, over its budget "
                    f"of {self._max_bytes} (App(max_journal_bytes=...)); journal "
                    "references to large data instead of the data"
                )
            self._bytes = int(row["bytes"])
            self.patch_marks = dict(zip(row["patch_positions"], row["patch_names"], strict=True))
            self.outlined = True

    async def take(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position`` (taken: each is handed out once)."""
        entry = await self._peek(position)
        if entry is not None:
            del self._entries[position]
            self._summary[position] = (entry["status"], entry["attempt"])
        return entry

    async def _peek(self, position: int) -> dict[str, Any] | None:
        """The journal entry at ``position``, loading pages as the replay reaches them."""
        await self.outline()
        if position > self.last_position:
            return None
        while position > self._loaded_upto:
            async with self._page_lock:
                if position <= self._loaded_upto:
                    break
                rows = await self._db(self._store.journal_page(
                    self._id, self._loaded_upto, limit=PAGE_ENTRIES, max_bytes=PAGE_BYTES))
                if not rows:
                    self._loaded_upto = self.last_position
                    break
                for r in rows:
                    self._entries[r["position"]] = r
                self._loaded_upto = rows[-1]["position"]
        return self._entries.get(position)

    async def replays_failure(self, position: int, entry: dict[str, Any], attempt: int) -> bool:
        """A journaled failure is replayed (the workflow may have caught it and gone
        on), except the failures that ended an earlier attempt, i.e. failures of an
        earlier attempt with nothing after them but such failures (the last step,
        or the last steps of parallel branches): a retry executes those again."""
        if entry["attempt"] >= attempt:
            return True
        for p in range(position + 1, self.last_position + 1):
            later = self._summary.get(p)
            if later is None:
                e = await self._peek(p)
                later = (e["status"], e["attempt"]) if e is not None else ("missing", 0)
            if not (later[0] == "failed" and later[1] < attempt):
                return True
        return False

    async def unreplayed(self, asked: set[int]) -> list[dict[str, Any]]:
        """Journal entries the workflow never asked for (its code changed under the run)."""
        if not self.has_journal:
            return []
        await self.outline()
        missing = [p for p in range(self.last_position + 1) if p not in asked]
        if not missing:
            return []
        found: list[dict[str, Any]] = []
        for p in missing[:20]:
            entry = self._entries.get(p)
            if entry is None and p > self._loaded_upto:
                entry = await self.take(p)
            if entry is not None:
                found.append({"position": p, "name": entry["name"], "kind": entry["kind"]})
        return found

    def budget(self, size: int) -> None:
        """Count ``size`` more bytes journaled; over the budget, ``JournalTooLarge``."""
        self._bytes += size
        if self._bytes > self._max_bytes:
            raise JournalTooLarge(
                f"run {self._id} would journal {self._bytes} bytes, over its budget "
                f"of {self._max_bytes} (App(max_journal_bytes=...)); journal "
                "references to large data instead of the data"
            )
