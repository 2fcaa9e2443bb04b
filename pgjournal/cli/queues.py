"""``queues``: depth and settings of the queues; pause, resume, limit."""

from __future__ import annotations

import argparse
import sys

from .._output import (
    human_seconds,
    paint,
    table,
    use_colour,
)
from .._queries import cli_fetch
from .._queue_change import change_queue
from ..app import App
from ._common import (
    Add,
    Row,
    parse_limit,
    plural,
    print_json,
    with_app,
)


def cmd_queues(args: argparse.Namespace) -> int:
    action = args.action

    async def go(app: App) -> list[Row]:
        if action:
            await change_queue(app, args.name, action, args.limit, create=args.create,
                               lift=_LIFT, unknown_hint=", or pass --create to configure it "
                                                        "ahead of its first run")
        unserved.extend(await cli_fetch(app, "unserved"))
        return await cli_fetch(app, "queues")

    unserved: list[Row] = []
    if action == "limit":
        _parse_limit(args.limit)
    rows = with_app(args, go, read_only=not action)
    if action and not args.json:
        limit = _parse_limit(args.limit) if action == "limit" else None
        print({"pause": f"queue {args.name} paused: workers claim nothing from it",
               "resume": f"queue {args.name} resumed",
               "limit": f"queue {args.name}: at most {plural(limit, 'run')} at "
                        "once across all workers" if limit else
                        f"queue {args.name}: no concurrency limit"}[action])
        return 0
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no queues: nothing queued, running or configured", file=sys.stderr)
        return 0
    colour = use_colour(sys.stdout)
    cells, styles = [], []
    for r in rows:
        cells.append([r["queue"], str(r["queued_due"]), str(r["delayed"]), str(r["running"]),
                      str(r["expired_leases"]), str(r["suspended"]),
                      _lag(r, "resumptions_due", "oldest_resumption_age"),
                      _lag(r, "new_due", "oldest_new_age"),
                      str(r["concurrency_limit"] or "-"), "yes" if r["paused"] else "no"])
        row_styles: list[str | None] = [None] * 4
        row_styles += ["red" if r["expired_leases"] else None, None, None, None, None]
        row_styles.append("yellow" if r["paused"] else None)
        styles.append(row_styles)
    # A claim takes runs that already started (timer due, signal arrived,
    # children ended, lease expired) before new runs of the same priority, so
    # their lags are shown apart: RESUMING should stay small even when NEW grows.
    print(table(cells, ["QUEUE", "DUE", "DELAYED", "RUNNING", "EXPIRED-LEASES", "SUSPENDED",
                        "RESUMING (LAG)", "NEW (LAG)", "LIMIT", "PAUSED"], colour=colour,
                styles=styles, right=(1, 2, 3, 4, 5, 6, 7, 8)))
    for u in unserved:
        print(paint(f"{plural(u['runs'], 'queued run')} of workflow {u['workflow']!r} on "
                    f"queue {u['queue']}, which no live worker knows (a typo, or a worker "
                    "not deployed yet)", "yellow", colour))
    return 0


_LIFT = "to stop a queue use `pgjournal queues pause`, to lift the limit use 'none'"


def _lag(row: Row, count: str, age: str) -> str:
    """``3 (12s)``: claimable runs of one kind and how long the oldest has been due."""
    n, oldest = row.get(count), row.get(age)
    if n is None:  # a schema before migration 0020 has no such column
        return "?"
    return f"{n} ({human_seconds(oldest.total_seconds())})" if oldest is not None else str(n)


def _parse_limit(text: str) -> int | None:
    return parse_limit(text, lift=_LIFT)


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("queues", "queue depth, running, lag of resumptions and of new runs, limits; "
                      "pause, resume, limit",
            """
            pgjournal queues
            pgjournal queues pause agents
            pgjournal queues resume agents
            pgjournal queues limit agents 5      # at most 5 running across all workers
            pgjournal queues limit agents none
            pgjournal queues pause newqueue --create   # a queue with no runs yet
            """, [db, js], cmd_queues)
    p.add_argument("action", nargs="?", choices=["pause", "resume", "limit"])
    p.add_argument("name", nargs="?", metavar="QUEUE")
    p.add_argument("limit", nargs="?", metavar="N")
    p.add_argument("--create", action="store_true",
                   help="configure a queue that has no runs, settings or workers yet")
