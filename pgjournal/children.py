"""Child runs as a parent workflow sees them: ``ChildRun`` handles and their outcomes.

A parent creates children with ``run.spawn`` / ``run.spawn_many`` and waits
for them with ``child.result()``, ``run.wait_all`` or ``run.wait_first``. A
wait whose children have not ended suspends the parent (no worker holds it);
the transaction that ends the last awaited child wakes it. Every spawn and
every wait is a journal entry of the parent, so a replay sees the same
children and the same outcomes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol

from .errors import ChildFailed

__all__ = ["ChildRun", "ChildSettings", "child_id"]

#: ``(workflow, queue or None) -> (queue, max_attempts, max_recoveries)`` for a
#: child of that workflow; raises ``UnknownWorkflow`` for a name the app lacks.
ChildSettings = Callable[[str, "str | None"], tuple[str, int, int]]

_UNSET: Any = object()


class Parent(Protocol):
    """What a ``ChildRun`` asks of the run that spawned it (its child runs' side,
    ``pgjournal._run.family.Family``): a protocol, so this module imports no run."""

    async def wait_one(self, child: ChildRun) -> None: ...

    def loads(self, text: str) -> Any: ...


def child_id(parent: uuid.UUID, position: int, index: int, key: str | None) -> uuid.UUID:
    """The id of a child: derived from its parent and the spawn entry (or the
    caller's ``key``), so executing a spawn again finds the same child."""
    name = f"key:{key}" if key is not None else f"spawn:{position}:{index}"
    return uuid.uuid5(parent, name)


class ChildRun:
    """A child run of the running workflow: ``id``, ``workflow``, and its outcome
    through ``await child.result()`` (or ``run.wait_all`` / ``run.wait_first``)."""

    def __init__(self, parent: Parent, child: uuid.UUID, workflow: str) -> None:
        self._parent = parent
        self.id = child
        self.workflow = workflow
        self._outcome: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"ChildRun({str(self.id)!r}, {self.workflow!r})"

    @property
    def done(self) -> bool:
        """Whether a journaled wait of this run already saw the child end."""
        return self._outcome is not None

    async def result(self) -> Any:
        """The child's output; ``ChildFailed`` if it failed, died or was cancelled.

        If the child has not ended, the parent is suspended until it does (no
        worker is held meanwhile). The outcome is journaled in the parent.
        """
        if self._outcome is None:
            await self._parent.wait_one(self)
        assert self._outcome is not None
        return self._value()

    def _settle(self, outcome: dict[str, Any]) -> None:
        self._outcome = outcome

    def _value(self, *, return_exceptions: bool = False) -> Any:
        outcome = self._outcome
        assert outcome is not None
        if outcome["status"] == "completed":
            return self._parent.loads(outcome["output"])
        exc = ChildFailed(str(self.id), outcome.get("error"), outcome["status"],
                          workflow=self.workflow)
        if return_exceptions:
            return exc
        raise exc
