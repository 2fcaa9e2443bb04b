"""A sync step waits for a thread of the executor; if its lease went stale
meanwhile (a pause, a busy pool), the thread must not start the step."""

from __future__ import annotations

import uuid

import pytest

import pgjournal
from pgjournal.run import Abandoned, Run


class StaleInTheThread:
    """A lease that is fresh when the event loop checks it, and stale (and then
    lost) by the time the executor thread picks the step up."""

    def __init__(self) -> None:
        self.checks = 0
        self.confirmed = 0

    async def ensure(self) -> bool:
        self.confirmed += 1
        return self.confirmed == 1          # fresh on the loop; not confirmable later

    def fresh(self) -> bool:
        self.checks += 1
        return False


async def test_a_sync_step_is_not_started_by_a_thread_after_its_lease_went_stale(
        pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    store = await app.store()
    await app.start("work")
    (claim,) = await store.claim(uuid.uuid4(), ["default"], 1, 30)
    lease = StaleInTheThread()
    run = Run(store, app.serializer, claim, lease=lease)
    called: list[str] = []
    with pytest.raises(Abandoned):
        await run.step("charge", lambda: called.append("charged"))
    assert called == []                      # the side effect never happened
    assert lease.checks == 1 and lease.confirmed == 2
    assert await store.get_steps(claim.run_id) == []
