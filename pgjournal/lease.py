"""``Lease``: what a worker knows locally about its lease on one run.

The database decides who owns a run (the lease epoch fences every write), but
a worker that paused (GC, swap, SIGSTOP) or could not renew its lease would
still *execute* the next step function before its fenced write is refused:
the side effect would happen twice. So each in-flight run keeps "valid until"
on the monotonic clock, which runs on through a pause:

    valid_until = time the last successful claim or heartbeat was *sent* + lease

The database set the lease from its own clock at some moment after the send,
so this is never later than the database's expiry. Before a step function
runs (one not answered from the journal), ``ensure()`` is free while the lease
is comfortably valid; past ``valid_until - margin`` it confirms the lease in
one round trip (a heartbeat of this run alone) or reports the run as lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

log = logging.getLogger("pgjournal.worker")

#: Confirms (and extends) the lease of one run; True while the run is still ours.
Confirm = Callable[["Lease"], Awaitable[bool]]


class Lease:
    """The local view of one run's lease (one per in-flight run)."""

    def __init__(self, run_id: uuid.UUID, epoch: int, duration: float, *, sent_at: float,
                 confirm: Confirm, margin: float | None = None) -> None:
        if duration <= 0:
            raise ValueError("a lease duration must be positive")
        self.run_id = run_id
        self.epoch = epoch
        self.duration = float(duration)
        self.margin = duration / 3 if margin is None else max(0.0, min(margin, duration))
        self.valid_until = sent_at + self.duration
        self.lost: str | None = None
        self._confirm = confirm

    def __repr__(self) -> str:
        left = self.valid_until - time.monotonic()
        return f"Lease({self.run_id}, epoch={self.epoch}, {left:.2f}s left, lost={self.lost})"

    def renewed(self, sent_at: float) -> None:
        """A claim or heartbeat sent at ``sent_at`` (monotonic) renewed the lease."""
        if self.lost is None:
            self.valid_until = max(self.valid_until, sent_at + self.duration)

    def mark_lost(self, status: str) -> None:
        """The run is no longer ours (taken over, cancelled, unconfirmable)."""
        if self.lost is None:
            self.lost = status

    def expired(self, now: float | None = None) -> bool:
        """True once the locally known deadline has passed."""
        return (time.monotonic() if now is None else now) >= self.valid_until

    def fresh(self, now: float | None = None) -> bool:
        """True while a new step may start without asking the database."""
        if self.lost is not None:
            return False
        return (time.monotonic() if now is None else now) < self.valid_until - self.margin

    async def ensure(self) -> bool:
        """Is the run still ours? Free while the lease is fresh; else one round trip."""
        if self.lost is not None:
            return False
        if self.fresh():
            return True
        try:
            ok = await self._confirm(self)
        except Exception as exc:  # whatever failed, the lease is not confirmed
            log.debug("confirming the lease of run %s failed: %s", self.run_id, exc)
            ok = False
        if not ok:
            self.mark_lost(self.lost or "lease not confirmed in time")
        # A confirmation that comes back after the worker gave the run up does
        # not take it back: the worker no longer heartbeats it.
        return ok and self.lost is None
