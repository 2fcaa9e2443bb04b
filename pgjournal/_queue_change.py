"""Changing a queue's settings: the rules ``pgjournal queues pause|resume|limit`` and
the dashboard's queue action share, so neither accepts what the other refuses.

A queue name is an identifier (as everywhere a queue is named); a limit is a
number >= 1 or ``none``; and a queue the schema has never seen (no runs,
settings or live workers) is not created by a typo: the CLI creates one only
with ``--create``, the dashboard (which offers the action on the queues it
lists) never.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._queries import cli_fetch
from ._sql import validate_identifier
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App

ACTIONS = ("pause", "resume", "limit")


def parse_limit(text: str, *, lift: str) -> int | None:
    """A concurrency limit as typed: a number >= 1, or ``none`` (``off``) to lift
    it. ``lift`` says how else to stop, for the error message."""
    text = text.strip()
    if text.lower() in ("none", "off"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigurationError(f"limit {text!r} is not a number (or 'none')") from None
    if value < 1:
        raise ConfigurationError(f"a concurrency limit must be at least 1; {lift}")
    return value


@dataclass(frozen=True)
class QueueSettings:
    """A queue's settings after a change."""

    name: str
    concurrency_limit: int | None
    paused: bool


async def change_queue(app: App, name: str, action: str, limit: str | None = None, *,
                       create: bool = False, lift: str, unknown_hint: str = "") -> QueueSettings:
    """Apply ``action`` (pause, resume, limit with ``limit`` typed as text) to the
    queue ``name`` of ``app``'s schema and return its settings.

    Everything that can be checked without the database is checked first;
    then a queue never seen is refused unless ``create`` (``unknown_hint`` ends
    that message: how to create it where one can). ``set_queue`` replaces both
    settings, so the one not changed is read and passed back.
    """
    name = validate_identifier(name, "queue name")
    if action not in ACTIONS:
        raise ConfigurationError(f"unknown queue action {action!r} (one of {', '.join(ACTIONS)})")
    new_limit = parse_limit(limit or "", lift=lift) if action == "limit" else None
    known = (await cli_fetch(app, "queue_known", name=name))[0]["known"]
    if not known and not create:
        raise ConfigurationError(
            f"queue {name!r} has never been seen in schema {app.schema!r} (no runs, "
            f"settings or workers); check the name{unknown_hint}")
    current = await cli_fetch(app, "queue_settings", name=name)
    concurrency_limit = current[0]["concurrency_limit"] if current else None
    paused = bool(current[0]["paused"]) if current else False
    if action == "pause":
        paused = True
    elif action == "resume":
        paused = False
    else:
        concurrency_limit = new_limit
    await app.set_queue(name, concurrency_limit=concurrency_limit, paused=paused)
    return QueueSettings(name, concurrency_limit, paused)
