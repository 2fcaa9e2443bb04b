"""``migrate``, ``prune``, ``roles``: the schema and its history, for operators."""

from __future__ import annotations

import argparse
import sys

from .._output import (
    Progress,
    parse_duration,
)
from .._queries import cli_fetch
from ..app import App
from ..migrations import migrate, migration_script
from ._common import (
    ENDED,
    Add,
    fail,
    print_json,
    schema_of,
    with_app,
)


def cmd_migrate(args: argparse.Namespace) -> int:
    schema = schema_of(args)
    if args.sql:
        sys.stdout.write(migration_script(schema))
        return 0
    applied = migrate(args.dsn, schema=schema)
    if args.json:
        print_json({"schema": schema, "applied": applied})
    elif applied:
        print(f"schema {schema}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"schema {schema}: already up to date")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        # A unit is required: a bare "30" read as seconds deleted recent history.
        age = parse_duration(args.older_than, require_unit=True).total_seconds()
    except ValueError as exc:
        raise fail(f"--older-than: {exc}") from None
    statuses = args.status or list(ENDED)
    if args.batch_size < 1:
        raise fail("--batch-size must be at least 1")

    async def go(app: App) -> tuple[int, int]:
        total = int((await cli_fetch(app, "prune_count", statuses=statuses, age=age))[0]["n"])
        if args.dry_run or total == 0:
            return total, 0
        bar = Progress(total, "pruning runs") if not args.json else None
        deleted = 0
        while True:
            batch = await cli_fetch(app, "prune_batch", statuses=statuses, age=age,
                                    batch=args.batch_size)
            deleted += len(batch)
            if bar is not None:
                bar.total = max(bar.total, deleted)
                bar.update(deleted)
            if len(batch) < args.batch_size:
                break
        if bar is not None:
            bar.finish()
        return total, deleted

    total, deleted = with_app(args, go)
    if args.json:
        print_json({"matched": total, "deleted": deleted, "dry_run": args.dry_run,
                    "statuses": statuses, "older_than_seconds": age})
    elif args.dry_run:
        print(f"{total} runs ({', '.join(statuses)}) ended more than {args.older_than} ago "
              "would be deleted")
    else:
        print(f"deleted {deleted} runs ({', '.join(statuses)}) ended more than "
              f"{args.older_than} ago, with their steps, chunks, signals and events")
    return 0


def cmd_roles(args: argparse.Namespace) -> int:
    from ..roles import roles_sql

    sys.stdout.write(roles_sql(schema_of(args), worker_role=args.worker_role,
                               reader_role=args.reader_role))
    return 0


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("migrate", "create or upgrade the schema (idempotent, safe to run concurrently)",
            """
            pgjournal migrate
            pgjournal migrate --schema jobs --dsn postgresql://app@db/app
            pgjournal migrate --sql > pgjournal.sql   # review, then: psql -f pgjournal.sql
            """, [db, js], cmd_migrate)
    p.add_argument("--sql", action="store_true",
                   help="print the SQL instead of applying it (no database needed)")
    p = add("prune", "delete ended runs older than an age, in batches (safe while workers "
                     "work)",
            """
            pgjournal prune --older-than 30d
            pgjournal prune --older-than 7d --status completed --dry-run
            """, [db, js], cmd_prune)
    p.add_argument("--older-than", required=True, metavar="AGE",
                   help="runs that ended longer ago than AGE, with a unit: 30d, 12h, 90m, 45s, 2w")
    p.add_argument("--status", action="append", choices=ENDED,
                   help="only runs with this status (repeatable; default: every ended "
                        "status). Queued, running and suspended runs are never pruned")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="runs deleted per transaction (default 1000)")
    p.add_argument("--dry-run", action="store_true", help="only count what would go")
    p = add("roles", "print SQL creating a worker role and a read-only DBA role",
            """
            pgjournal roles > roles.sql && psql -f roles.sql
            pgjournal roles --schema jobs --worker-role jobs_worker --reader-role jobs_dba
            """, [db], cmd_roles)
    from ..roles import DEFAULT_READER_ROLE, DEFAULT_WORKER_ROLE

    p.add_argument("--worker-role", default=DEFAULT_WORKER_ROLE,
                   help=f"name of the worker role (default {DEFAULT_WORKER_ROLE})")
    p.add_argument("--reader-role", default=DEFAULT_READER_ROLE,
                   help=f"name of the read-only DBA role (default {DEFAULT_READER_ROLE})")
