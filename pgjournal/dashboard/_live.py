"""Live updates: one poller per dashboard process, feeding every open page stream.

Why a poll and not LISTEN/NOTIFY: pgjournal_done only fires for runs somebody
waits on, and a NOTIFY on every status change would be paid by every worker
commit (a transaction that NOTIFYs takes a database-wide lock at commit; the
schema's own notes measured enqueues at 2,100/s with a NOTIFY against 3,400/s
without) whether or not anybody has a dashboard open. The poller costs nothing
while no page is open, and while pages are open one query per interval for
all of them together: primary-key lookups of the runs the pages show (plus
one ``max(created_at)`` from the ``runs_created`` index), whatever the number
of open pages. A runs-list page whose filter may have new rows costs one more
indexed EXISTS, only in the intervals in which a newer run was created.
docs/dashboard.md has the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._data import Row, fingerprint

log = logging.getLogger("pgjournal.dashboard")

Fetch = Callable[..., Awaitable[list[Row]]]


@dataclass(eq=False)
class Subscriber:
    """One open page's stream: the runs it shows (id -> fingerprint it has)."""

    runs: dict[uuid.UUID, str]
    #: The runs list: the newest created_at shown and its filters (None: no watch).
    top: datetime | None = None
    filters: dict[str, Any] = field(default_factory=dict)
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=1000))
    told_newer: bool = False

    def put(self, event: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a stalled page drops updates
            self.queue.put_nowait((event, data))


class Live:
    """Polls while at least one subscriber is open, every ``interval`` seconds."""

    def __init__(self, fetch: Fetch, interval: float = 1.0) -> None:
        self._fetch = fetch
        self.interval = interval
        self._subs: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._newest: datetime | None = None
        #: Polls made (for tests and the docs' measurements).
        self.polls = 0

    def subscribe(self, sub: Subscriber) -> None:
        self._subs.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="pgjournal-dashboard-live")

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    async def close(self) -> None:
        self._subs.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while self._subs:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be away: try again later
                log.warning("dashboard live poll failed: %s", str(exc).splitlines()[0]
                            if str(exc) else type(exc).__name__)
            await asyncio.sleep(self.interval)

    async def poll(self) -> None:
        """One round: tell every subscriber what changed since it last heard."""
        subs = list(self._subs)
        ids = sorted({rid for s in subs for rid in s.runs}, key=str)
        self.polls += 1
        rows = {r["id"]: r for r in await self._fetch("watch", ids=ids)} if ids else {}
        for sub in subs:
            for rid, seen in list(sub.runs.items()):
                row = rows.get(rid)
                if row is None:
                    continue
                fp = fingerprint(row)
                if fp != seen:
                    sub.runs[rid] = fp
                    sub.put("run", {"id": str(rid), "status": row["status"], "fp": fp,
                                    "attempt": row["attempt"]})
        watching = [s for s in subs if s.top is not None and not s.told_newer]
        if not watching:
            return
        newest = (await self._fetch("newest"))[0]["newest"]
        if newest is None:
            return
        for sub in watching:
            assert sub.top is not None
            if newest > sub.top and (await self._fetch("newer_exists", top=sub.top,
                                                       **sub.filters))[0]["newer"]:
                sub.told_newer = True
                sub.put("newer", {})
