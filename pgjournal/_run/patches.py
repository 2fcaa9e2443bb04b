"""Changing code under running runs: ``run.patched(name)`` and ``deprecate_patch``.

``patched(name)`` decides synchronously, from the journal's patch markers
(loaded with the outline before the workflow starts, see ``Run.prepare``): a
marker of that name at the call's position -> True (the marker is the call's
entry); the journal went past the position without it -> False (the run was
journaled by the old code; no position is taken, so later entries keep
theirs); otherwise the execution is live -> True, and the marker is journaled
by a task chained on the engine (``chain_write``). Every later database call
of the run and the end of the workflow (``Run.settle``) wait for that task, so
no entry after a marker can be committed without it: a crash can never leave
later entries whose positions assumed a marker that is missing. Markers are
not deliveries (no turn): ``patched`` does not await, so it cannot change how
parallel branches interleave.

``answers`` is what ``patched`` answered so far in this execution, by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DatabaseUnavailable

if TYPE_CHECKING:
    from .engine import Engine


def patched(engine: Engine, answers: dict[str, bool], name: str) -> bool:
    """``Run.patched``."""
    if not isinstance(name, str) or not name:
        raise TypeError("a patch name must be a non-empty string")
    if name in answers:
        return answers[name]
    engine.raise_if_closed()
    marks = _marks(engine, "patched")
    position = engine.next_position
    if marks.get(position) == name:
        engine.call(name)  # the marker is this call's journal entry
        answer = True
    elif position <= engine.last_position:
        answer = False     # journaled by the old code: take no position
    else:
        position, occurrence = engine.call(name)
        _journal_marker(engine, position, occurrence, name)
        answer = True
    answers[name] = answer
    return answer


def deprecate_patch(engine: Engine, name: str) -> None:
    """``Run.deprecate_patch``."""
    if not isinstance(name, str) or not name:
        raise TypeError("a patch name must be a non-empty string")
    engine.raise_if_closed()
    if _marks(engine, "deprecate_patch").get(engine.next_position) == name:
        engine.call(name)


def _marks(engine: Engine, what: str) -> dict[int, str]:
    if not engine.outlined:
        raise RuntimeError(
            f"run.{what}() needs the run's journal outline, which the worker loads "
            "before the workflow starts (await run.prepare() first)")
    return engine.patch_marks


def _journal_marker(engine: Engine, position: int, occurrence: int, name: str) -> None:
    started = engine.db_now()

    async def write() -> None:
        try:
            lost = await engine.store.journal_step(
                run=engine.id, epoch=engine.epoch, position=position, name=name,
                occurrence=occurrence, kind="patch", status="completed", output="true",
                error=None, attempt=engine.attempt, started_at=started)
        except DatabaseUnavailable:
            engine.database_failed()
        if lost is None:
            return
        if lost == "suspended" and engine.suspended:
            # A parallel branch suspended the run first: nothing after the
            # marker can be journaled now, and the resumed run decides again.
            return
        engine.lose(lost)

    engine.chain_write(write, name=f"pgjournal-patch-{engine.id}-{position}")

