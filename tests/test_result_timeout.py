"""``RunHandle.result``'s timeout says which run, its status, and whether a worker serves it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import pgjournal

app = pgjournal.App()


@app.workflow(queue="reviews")
async def needs_review(run: pgjournal.Run) -> str:
    verdict = await run.wait_signal("review")
    return str(verdict)


async def test_timeout_with_a_live_worker_names_the_status(
        pgjournal_worker: Callable[..., Awaitable[pgjournal.App]]) -> None:
    bound = await pgjournal_worker(app)
    handle = await bound.start(needs_review)
    with pytest.raises(TimeoutError) as caught:
        await handle.result(timeout=1.5)
    text = str(caught.value)
    assert str(handle.run_id) in text and "'needs_review'" in text
    assert "in queue 'reviews'" in text and "1 live worker serves that queue" in text
    assert "is suspended" in text or "is running" in text or "is queued" in text


async def test_timeout_without_a_worker_says_to_start_one(pgjournal_app: pgjournal.App) -> None:
    handle = await pgjournal_app.start("needs_review", queue="reviews")
    with pytest.raises(TimeoutError, match=r"is queued in queue 'reviews'; no live worker "
                                           r"serves that queue: start one"):
        await handle.result(timeout=0.3)
