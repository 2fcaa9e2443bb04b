"""The dashboard's SQL (``queries.sql`` beside this file) and its filters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from psycopg import sql

from .._output import parse_duration
from .._sql import parse_named_queries, schema_query

Row = dict[str, Any]
STATUSES = ("queued", "running", "suspended", "completed", "failed", "cancelled", "dead")
#: Statuses each bulk action can change (retry_run / cancel_run accept these).
RETRYABLE = ("failed", "dead", "cancelled")
CANCELLABLE = ("queued", "running", "suspended")
PAGE_SIZE = 50
#: At most this many runs per bulk click (each in its own short transaction).
BULK_LIMIT = 1000


@cache
def _texts() -> dict[str, str]:
    """The named statements of ``queries.sql`` beside this module."""
    return parse_named_queries(Path(__file__).with_name("queries.sql").read_text())


def query(name: str, schema: str) -> sql.Composed:
    return schema_query(_texts()[name], schema)


class FilterError(ValueError):
    """A filter value the user typed that makes no sense (shown on the page)."""


@dataclass
class RunFilter:
    """The runs list's filters, from and back to the query string."""

    status: str | None = None
    workflow: str | None = None
    queue: str | None = None
    key: str | None = None
    since: str | None = None  # an age: 15m, 1h, 2d
    until: str | None = None  # an ISO date or time (created before it)
    cursor: str | None = None  # "<created_at ISO>_<id>"
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_query(cls, q: Any) -> RunFilter:
        def get(name: str) -> str | None:
            value = q.get(name)
            return value.strip() or None if isinstance(value, str) else None

        f = cls(status=get("status"), workflow=get("workflow"), queue=get("queue"),
                key=get("key"), since=get("since"), until=get("until"), cursor=get("after"))
        if f.status is not None and f.status not in STATUSES:
            f.errors.append(f"unknown status {f.status!r}")
            f.status = None
        return f

    def params(self) -> dict[str, Any]:
        since = until = cursor_at = cursor_id = None
        if self.since:
            try:
                since = datetime.now(UTC) - parse_duration(self.since)
            except ValueError as exc:
                self.errors.append(f"since: {exc}")
        if self.until:
            try:
                until = datetime.fromisoformat(self.until)
                if until.tzinfo is None:
                    until = until.replace(tzinfo=UTC)
            except ValueError:
                self.errors.append(f"until: {self.until!r} is not a date or time "
                                   "(2026-01-31 or 2026-01-31T12:00)")
        if self.cursor:
            at, _, rid = self.cursor.rpartition("_")
            try:
                cursor_at, cursor_id = datetime.fromisoformat(at), uuid.UUID(rid)
            except ValueError:
                self.errors.append("bad page cursor; showing the first page")
        return {"status": self.status, "workflow": self.workflow, "queue": self.queue,
                "key": self.key, "since": since, "until": until, "cursor_at": cursor_at,
                "cursor_id": cursor_id}

    def query_items(self, *, cursor: str | None = None) -> list[tuple[str, str]]:
        items = [(k, v) for k, v in (("status", self.status), ("workflow", self.workflow),
                                     ("queue", self.queue), ("key", self.key),
                                     ("since", self.since), ("until", self.until)) if v]
        if cursor:
            items.append(("after", cursor))
        return items

    @property
    def any(self) -> bool:
        return bool(self.query_items())


def cursor_of(row: Row) -> str:
    return f"{row['created_at'].isoformat()}_{row['id']}"


def fingerprint(row: Row) -> str:
    """What the live poll compares: a run's status and when it last changed."""
    updated = row.get("updated_at")
    return (f"{row['status']}:{updated.timestamp() if updated else ''}:"
            f"{row.get('last_position', '')}")
