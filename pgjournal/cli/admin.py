"""``migrate``, ``prune``, ``roles``: the schema and its history, for operators."""

from __future__ import annotations

import argparse
import sys
from typing import Any

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
    grantees = _grantees(args.dsn, schema) if applied else []
    if args.json:
        print_json({"schema": schema, "applied": applied, "roles_to_reapply": grantees})
        return 0
    if applied:
        print(f"schema {schema}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"schema {schema}: already up to date")
    if grantees:
        # Migrations replace functions, and a replaced function loses the
        # SECURITY DEFINER and EXECUTE grants the roles script gave it.
        print(f"roles with rights on schema {schema}: {', '.join(grantees)}. Migrations "
              "replace functions, which drops what the roles script set on them: run it "
              f"again, e.g. pgjournal roles --schema {schema} | psql \"$DSN\" (add "
              "--worker-role/--reader-role if you named the roles yourself)")
    return 0


def _grantees(dsn: str | None, schema: str) -> list[str]:
    """Roles other than the owner with USAGE on ``schema`` (see ``schema_grantees``)."""
    from .._queries import cli_query
    from ..connect import connect_sync, resolve_dsn

    with connect_sync(resolve_dsn(dsn)) as conn:
        rows = conn.execute(cli_query("schema_grantees", schema), {"schema": schema}).fetchall()
    return [str(r["role"]) for r in rows]


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:,.1f} MB"


def _range(row: dict[str, Any]) -> str:
    return f"{row['lower_bound']:%Y-%m-%d} .. {row['upper_bound']:%Y-%m-%d}"


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        # A unit is required: a bare "30" read as seconds deleted recent history.
        age = parse_duration(args.older_than, require_unit=True).total_seconds()
    except ValueError as exc:
        raise fail(f"--older-than: {exc}") from None
    statuses = args.status or list(ENDED)
    if args.batch_size < 1:
        raise fail("--batch-size must be at least 1")
    if args.partition_batch_size < 1:
        raise fail("--partition-batch-size must be at least 1")
    quiet = args.json

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    async def go(app: App) -> dict[str, Any]:
        total = int((await cli_fetch(app, "prune_count", statuses=statuses, age=age))[0]["n"])
        cutoff = (await cli_fetch(app, "prune_cutoff", age=age))[0]["cutoff"]
        parts: list[dict[str, Any]] = []
        if not args.no_partitions and total:
            parts = [dict(r) for r in await cli_fetch(
                app, "prune_partitions", cutoff=cutoff, statuses=statuses)]
        in_parts = sum(int(p["runs"]) for p in parts)
        out: dict[str, Any] = {
            "matched": total, "deleted": 0, "deleted_by_partition": 0,
            "deleted_by_batches": 0, "partitions_dropped": [], "partitions_kept": [],
            "partitions": [{"from": str(p["lower_bound"]), "to": str(p["upper_bound"]),
                            "tables": list(p["partitions"]), "runs": int(p["runs"]),
                            "bytes": int(p["bytes"] or 0)} for p in parts],
            "by_batches": max(total - in_parts, 0)}
        if args.dry_run:
            return out
        # 1. Whole partitions: the runs of the range (rows of runs only), then
        #    the three partitions in one short transaction.
        for p in parts:
            bar = (Progress(int(p["runs"]), f"runs created {_range(p)}")
                   if not quiet and p["runs"] else None)
            done = 0
            while True:
                n = int((await cli_fetch(app, "prune_partition_batch", lo=p["lower_bound"],
                                         hi=p["upper_bound"], cutoff=cutoff,
                                         statuses=statuses,
                                         batch=args.partition_batch_size))[0]["n"])
                done += n
                if bar is not None:
                    bar.total = max(bar.total, done)
                    bar.update(done)
                if n < args.partition_batch_size:
                    break
            if bar is not None:
                bar.finish()
            out["deleted_by_partition"] += done
            dropped = (await cli_fetch(app, "prune_drop_partitions", lo=p["lower_bound"],
                                       hi=p["upper_bound"],
                                       lock_timeout_ms=args.lock_timeout_ms))[0]["dropped"]
            if dropped is None:
                out["partitions_kept"].extend(p["partitions"])
                say(f"kept {', '.join(p['partitions'])}: a run created in that range is "
                    "left (retried or locked meanwhile); the next prune drops them")
            else:
                out["partitions_dropped"].extend(dropped)
                say(f"dropped {', '.join(dropped)} ({done} runs, {_mb(p['bytes'])})")
        # 2. What is left, in batches of DELETE (runs of partitions that also
        #    hold newer or unfinished runs, runs in the DEFAULT partitions).
        left = int((await cli_fetch(app, "prune_count", statuses=statuses, age=age))[0]["n"])
        bar = Progress(left, "pruning runs") if not quiet and left else None
        deleted = 0
        while left:
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
        out["deleted_by_batches"] = deleted
        out["deleted"] = out["deleted_by_partition"] + deleted
        return out

    out = with_app(args, go)
    what = f"runs ({', '.join(statuses)}) ended more than {args.older_than} ago"
    if args.json:
        print_json(out | {"dry_run": args.dry_run, "statuses": statuses,
                          "older_than_seconds": age})
    elif args.dry_run:
        for p in out["partitions"]:
            print(f"would drop {', '.join(p['tables'])}: {p['runs']} runs, "
                  f"{_mb(p['bytes'])}")
        print(f"{out['matched']} {what} would be deleted: "
              f"{out['matched'] - out['by_batches']} with {len(out['partitions'])} "
              f"partition range(s), {out['by_batches']} in batches")
    else:
        print(f"deleted {out['deleted']} {what}, with their steps, chunks, signals and "
              f"events: {out['deleted_by_partition']} by dropping "
              f"{len(out['partitions_dropped'])} partitions, {out['deleted_by_batches']} "
              "in batches")
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    async def go(app: App) -> list[dict[str, Any]]:
        return [dict(r) for r in await cli_fetch(app, "maintain", ahead=args.ahead_days,
                                                 moves=args.max_moves)]

    rows = with_app(args, go)
    if args.json:
        print_json({"created": [{"table": r["table_name"], "partition": r["partition_name"],
                                 "from": str(r["lower_bound"]), "to": str(r["upper_bound"])}
                                for r in rows]})
    elif not rows:
        print("history partitions: nothing to do")
    else:
        for r in rows:
            print(f"created {r['partition_name']} ({r['lower_bound']} .. {r['upper_bound']})")
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
    p = add("prune", "delete ended runs older than an age: whole history partitions where "
                     "it can, the rest in batches (safe while workers work)",
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
    p.add_argument("--dry-run", action="store_true",
                   help="only say what would go: the partitions dropped whole, the runs "
                        "deleted in batches")
    p.add_argument("--no-partitions", action="store_true",
                   help="never drop partitions: delete every run in batches (the pre-0011 "
                        "way)")
    p.add_argument("--partition-batch-size", type=int, default=10_000,
                   help="runs deleted per transaction before a partition drop (default "
                        "10000; their journal and events go with the partition)")
    p.add_argument("--lock-timeout-ms", type=int, default=5000,
                   help="longest wait for the brief exclusive lock a partition drop "
                        "takes on the history tables (default 5000)")
    p = add("maintain", "create history partitions ahead and empty the DEFAULT ones "
                        "(daily, e.g. from cron or pg_cron)",
            """
            pgjournal maintain
            pgjournal maintain --ahead-days 60 --json
            """, [db, js], cmd_maintain)
    p.add_argument("--ahead-days", type=int, default=None,
                   help="create partitions this far ahead (default: partition_settings."
                        "ahead_days, 28)")
    p.add_argument("--max-moves", type=int, default=10,
                   help="at most this many partitions filled from a DEFAULT partition per "
                        "call (default 10)")
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
