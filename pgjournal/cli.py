"""The ``pgjournal`` command: operate workers, inspect and steer runs, keep history tidy.

Every command reaches the database the same way: ``--dsn``, else
``PGJOURNAL_DSN``, else the embedded development server; ``--schema``, else
``PGJOURNAL_SCHEMA``, else ``pgjournal``. State changes go through the same
``App``/``Store`` calls (and so the same SQL functions) as Python code; the
reads the CLI needs beyond the store are named queries in ``sql/cli.sql``.

Errors a user can cause print one line on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from . import __version__
from ._output import (
    STATUS_STYLE,
    Progress,
    ago,
    between,
    compact,
    human_seconds,
    paint,
    parse_duration,
    shorten,
    table,
    to_json,
    use_colour,
)
from ._sql import sql_dir, validate_identifier
from .app import App
from .errors import (
    ConfigurationError,
    InvalidState,
    PgJournalError,
    UnknownRun,
    UnknownWorkflow,
)
from .migrations import migrate, migration_script
from .store import translate_error

T = TypeVar("T")
Row = dict[str, Any]

ENDED = ("completed", "failed", "cancelled", "dead")
STATUSES = ("queued", "running", "suspended", *ENDED)
DEFAULT_SCHEMA = "pgjournal"

# -- named queries of sql/cli.sql -------------------------------------------------


@cache
def _cli_texts() -> dict[str, str]:
    """The named statements of ``sql/cli.sql`` (same format as ``queries.sql``)."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in (sql_dir() / "cli.sql").read_text().splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line.split(":", 1)[1].strip(), []
        elif name is not None and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def cli_query(name: str, schema: str, **literals: Any) -> sql.Composed:
    """Named query ``name`` for ``schema`` (validated, quoted); ``literals`` fill
    other placeholders as SQL literals (only for SQL printed for people)."""
    ident = sql.Identifier(validate_identifier(schema))
    parts = {k: sql.Literal(v) for k, v in literals.items()}
    return sql.SQL(_cli_texts()[name]).format(schema=ident, **parts)


async def run_query(conn: psycopg.AsyncConnection[Row], name: str, schema: str, /,
                    **params: Any) -> list[Row]:
    """Execute a named CLI query on ``conn``, with user-caused errors translated."""
    try:
        cur = await conn.execute(cli_query(name, schema), params)
        return await cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        raise translate_error(exc, schema) from exc


async def cli_fetch(app: App, name: str, /, **params: Any) -> list[Row]:
    """Execute a named CLI query through the app's pool (schema checked on open)."""
    store = await app.store()
    async with store.pool.connection() as conn:
        return await run_query(conn, name, app.schema, **params)


# -- helpers ----------------------------------------------------------------------


def fail(message: str) -> ConfigurationError:
    """A user error: ``main`` prints its one line and exits 1."""
    return ConfigurationError(message)


def schema_of(args: argparse.Namespace) -> str:
    return validate_identifier(
        getattr(args, "schema", None) or os.environ.get("PGJOURNAL_SCHEMA") or DEFAULT_SCHEMA)


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): "
                   f"{shorten(text, 60)!r}") from None


def with_app(args: argparse.Namespace, work: Callable[[App], Coroutine[Any, Any, T]],
             app: App | None = None) -> T:
    """Run ``work(app)`` on an app for ``--dsn``/``--schema``, closing it afterwards."""
    async def go() -> T:
        nonlocal app
        if app is None:
            app = App(args.dsn, schema=schema_of(args), pool_size=2)
        try:
            return await work(app)
        finally:
            await app.close()
    return asyncio.run(go())


def load_app(spec: str, args: argparse.Namespace) -> App:
    """Import ``module:attribute`` and return the ``App`` it names.

    ``--dsn``/``--schema`` are exported as ``PGJOURNAL_DSN``/``PGJOURNAL_SCHEMA``
    before the import, so an app that reads them at import time follows them.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise fail(f"{spec!r} is not module:attribute (e.g. myproject.jobs:app)")
    if args.dsn:
        os.environ["PGJOURNAL_DSN"] = args.dsn
    if getattr(args, "schema", None):
        os.environ["PGJOURNAL_SCHEMA"] = args.schema
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise fail(f"cannot import {module_name!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise fail(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, App):
        raise fail(f"{spec} is a {type(obj).__name__}, not a pgjournal.App")
    if getattr(args, "schema", None) and obj.schema != args.schema:
        raise fail(f"{spec} is bound to schema {obj.schema!r} but --schema {args.schema} "
                   "was given; make the app read PGJOURNAL_SCHEMA or drop --schema")
    return obj


def print_json(value: Any) -> None:
    print(to_json(value))


def error_text(error: Any, width: int = 60) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        return shorten(f"{error.get('type', 'Error')}: {error.get('message', '')}", width)
    return shorten(str(error), width)


def local(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


# -- commands ---------------------------------------------------------------------


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


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_app(args.app, args)
    if args.concurrency < 1:
        raise fail("--concurrency must be at least 1")
    if args.lease <= 0:
        raise fail("--lease must be positive")
    for q in args.queue or []:
        validate_identifier(q, "queue name")
    worker = Worker(app, queues=args.queue or None, concurrency=args.concurrency,
                    lease=args.lease, grace_period=args.grace)

    async def serve(app: App) -> None:
        await worker.run()

    with_app(args, serve, app=app)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    positional = parse_json(args.args, "--args")
    if not isinstance(positional, list):
        raise fail("--args must be a JSON array of positional arguments, e.g. "
                   "'[\"durable agents\"]' (keyword arguments go in --kwargs)")
    keywords = parse_json(args.kwargs, "--kwargs")
    if not isinstance(keywords, dict):
        raise fail("--kwargs must be a JSON object, e.g. '{\"topic\": \"agents\"}'")
    app = load_app(args.app, args) if args.app else None
    if app is not None and args.workflow not in app.workflows:
        known = ", ".join(sorted(app.workflows)) or "none"
        raise UnknownWorkflow(f"{args.app} has no workflow {args.workflow!r} (known: {known})")
    if args.queue:
        validate_identifier(args.queue, "queue name")

    async def go(app: App) -> dict[str, Any]:
        handle = await app.start(args.workflow, *positional, queue=args.queue,
                                 priority=args.priority, delay=args.delay,
                                 idempotency_key=args.idempotency_key, **keywords)
        out: dict[str, Any] = {"run_id": str(handle.run_id)}
        if args.wait is not None:
            try:
                out["output"] = await handle.result(timeout=args.wait)
            except TimeoutError:
                raise fail(f"run {handle.run_id} did not end within {args.wait:g}s "
                           "(it goes on; see `pgjournal show`)") from None
        return out

    out = with_app(args, go, app=app)
    if args.json:
        print_json(out)
    else:
        print(out["run_id"])
        if "output" in out:
            print(to_json(out["output"]))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        try:
            since = datetime.now(UTC) - parse_duration(args.since)
        except ValueError as exc:
            raise fail(f"--since: {exc}") from None
    if args.limit < 1:
        raise fail("--limit must be at least 1")

    async def go(app: App) -> list[Row]:
        store = await app.store()
        return await store.list_runs(status=args.status, workflow=args.workflow,
                                     queue=args.queue, since=since, limit=args.limit)

    rows = with_app(args, go)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no runs match", file=sys.stderr)
        return 0
    colour = use_colour(sys.stdout)
    now = datetime.now(UTC)
    cells, styles = [], []
    for r in rows:
        end = r["finished_at"] or (now if r["started_at"] else None)
        cells.append([str(r["id"]), r["workflow"], r["queue"], r["status"], str(r["attempt"]),
                      str(r["recoveries"]), ago(r["created_at"], now),
                      between(r["started_at"], end), error_text(r["error"], 50)])
        styles.append([None, None, None, STATUS_STYLE.get(r["status"]), None, None, None,
                       None, "red"])
    print(table(cells, ["RUN", "WORKFLOW", "QUEUE", "STATUS", "ATT", "REC", "CREATED",
                        "TOOK", "ERROR"], colour=colour, styles=styles, right=(4, 5)))
    if len(rows) == args.limit:
        print(f"(the newest {args.limit}; --limit N for more)", file=sys.stderr)
    return 0


def _step_detail(step: Row, chunks: dict[int, int]) -> str:
    if step["status"] == "failed":
        return error_text(step["error"], 70)
    if step["kind"] == "stream":
        return f"{chunks.get(step['position'], 0)} chunks"
    if step["kind"] == "sleep":
        return f"until {local(datetime.fromisoformat(step['output']))}" if step["output"] \
            else ""
    return compact(step["output"], 70)


def cmd_show(args: argparse.Namespace) -> int:
    async def go(app: App) -> dict[str, Any]:
        run_id = app.handle(args.run_id).run_id
        store = await app.store()
        run = await store.get_run(run_id)
        if run is None:
            raise UnknownRun(f"run {run_id} does not exist in schema {app.schema!r}")
        return {"run": run, "steps": await store.get_steps(run_id),
                "chunks": await store.get_chunks(run_id),
                "signals": await store.get_signals(run_id),
                "events": await store.get_events(run_id)}

    data = with_app(args, go)
    if args.json:
        print_json(data)
        return 0
    colour = use_colour(sys.stdout)
    run = data["run"]
    t0: datetime = run["created_at"]
    now = datetime.now(UTC)
    print(f"run {run['id']}  {run['workflow']}  "
          f"{_paint_status(run['status'], colour)}")
    print(f"  queue {run['queue']} · priority {run['priority']} · attempt "
          f"{run['attempt']}/{run['max_attempts']} · crash recoveries {run['recoveries']} · "
          f"lease epoch {run['lease_epoch']}")
    end = run["finished_at"] or now
    print(f"  created {local(t0)} · started "
          f"{'+' + between(t0, run['started_at']) if run['started_at'] else '-'} · "
          f"{'took' if run['finished_at'] else 'running for'} {between(t0, end)}")
    if run["idempotency_key"]:
        print(f"  idempotency key {run['idempotency_key']}")
    if run["status"] == "suspended":
        waiting = f"signal {run['wait_signal']!r}" if run["wait_signal"] else "timer"
        print(f"  waiting for {waiting}" + (f" until {local(run['due_at'])}"
                                            if run["due_at"] else ""))
    print(f"  input  {compact(run['input'], 100)}")
    if run["output"] is not None:
        print(f"  output {compact(run['output'], 100)}")
    if run["error"]:
        print("  error  " + _paint(error_text(run["error"], 100), "red", colour))

    chunks: dict[int, int] = {}
    for c in data["chunks"]:
        chunks[c["position"]] = chunks.get(c["position"], 0) + 1
    print()
    if data["steps"]:
        print(_paint("steps", "bold", colour) + " (at = offset from the run's creation)")
        cells, styles = [], []
        for s in data["steps"]:
            cells.append([str(s["position"]), "+" + between(t0, s["started_at"]),
                          between(s["started_at"], s["finished_at"]), s["kind"], s["name"],
                          s["status"], str(s["attempt"]), str(s["tries"]),
                          _step_detail(s, chunks)])
            styles.append([None, None, None, None, None, STATUS_STYLE.get(s["status"]), None,
                           None, "red" if s["status"] == "failed" else None])
        print(textwrap.indent(table(cells, ["#", "AT", "TOOK", "KIND", "NAME", "STATUS",
                                            "ATT", "TRIES", "RESULT"],
                                    colour=colour, styles=styles, right=(0, 6, 7)), "  "))
    else:
        print("no steps journaled yet")
    if data["signals"]:
        print()
        print(_paint("signals", "bold", colour))
        cells = [[str(g["id"]), g["name"], "+" + between(t0, g["created_at"]),
                  ("+" + between(t0, g["consumed_at"])) if g["consumed_at"] else "pending",
                  compact(g["payload"], 60)] for g in data["signals"]]
        print(textwrap.indent(table(cells, ["ID", "NAME", "SENT", "CONSUMED", "PAYLOAD"],
                                    colour=colour), "  "))
    if data["events"]:
        print()
        print(_paint("events", "bold", colour))
        cells, styles = [], []
        for e in data["events"]:
            detail = error_text(e["detail"], 50)
            if e["from_status"] == e["to_status"] == "running":
                detail = detail or "lease expired: taken over by another worker"
            cells.append(["+" + between(t0, e["at"]), e["from_status"] or "-", e["to_status"],
                          str(e["attempt"]), str(e["lease_epoch"]),
                          str(e["worker_id"] or "-"), detail])
            styles.append([None, None, STATUS_STYLE.get(e["to_status"]), None, None, None,
                           "red"])
        print(textwrap.indent(table(cells, ["AT", "FROM", "TO", "ATT", "EPOCH", "WORKER",
                                            "DETAIL"], colour=colour, styles=styles,
                                    right=(3, 4)), "  "))
    return 0


def _paint(text: str, style: str, colour: bool) -> str:
    return paint(text, style, colour)


def _paint_status(status: str, colour: bool) -> str:
    return _paint(f"[{status}]", STATUS_STYLE.get(status, "bold"), colour)


def cmd_signal(args: argparse.Namespace) -> int:
    payload = parse_json(args.payload, "the signal payload")

    async def go(app: App) -> None:
        await app.signal(args.run_id, args.name, payload)

    with_app(args, go)
    print(f"signal {args.name!r} sent to run {args.run_id}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    async def go(app: App) -> str:
        return await app.cancel(args.run_id)

    status = with_app(args, go)
    if status != "cancelled":
        raise InvalidState(f"run {args.run_id} had already ended ({status}); not cancelled")
    print(f"run {args.run_id} cancelled")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    async def go(app: App) -> str:
        return await app.retry(args.run_id)

    status = with_app(args, go)
    print(f"run {args.run_id} {status} again (journaled steps are kept, not redone)")
    return 0


def cmd_queues(args: argparse.Namespace) -> int:
    action = args.action

    async def go(app: App) -> list[Row]:
        if action:
            name = validate_identifier(args.name, "queue name")
            current = await cli_fetch(app, "queue_settings", name=name)
            limit = current[0]["concurrency_limit"] if current else None
            paused = bool(current[0]["paused"]) if current else False
            if action == "pause":
                paused = True
            elif action == "resume":
                paused = False
            elif action == "limit":
                limit = _parse_limit(args.limit)
            # set_queue replaces both settings, so the untouched one is passed back.
            await app.set_queue(name, concurrency_limit=limit, paused=paused)
        return await cli_fetch(app, "queues")

    if action == "limit":
        _parse_limit(args.limit)
    rows = with_app(args, go)
    if action and not args.json:
        print({"pause": f"queue {args.name} paused: workers claim nothing from it",
               "resume": f"queue {args.name} resumed",
               "limit": f"queue {args.name}: at most {args.limit} runs at once across all "
                        "workers" if args.limit != "none" else
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
        age = r["oldest_due_age"]
        cells.append([r["queue"], str(r["queued_due"]), str(r["delayed"]), str(r["running"]),
                      str(r["expired_leases"]), str(r["suspended"]),
                      human_seconds(age.total_seconds()) if age is not None else "-",
                      str(r["concurrency_limit"] or "-"), "yes" if r["paused"] else "no"])
        row_styles: list[str | None] = [None] * 4
        row_styles += ["red" if r["expired_leases"] else None, None, None, None]
        row_styles.append("yellow" if r["paused"] else None)
        styles.append(row_styles)
    print(table(cells, ["QUEUE", "DUE", "DELAYED", "RUNNING", "EXPIRED-LEASES", "SUSPENDED",
                        "OLDEST-DUE", "LIMIT", "PAUSED"], colour=colour, styles=styles,
                right=(1, 2, 3, 4, 5, 6, 7)))
    return 0


def _parse_limit(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise fail(f"limit {text!r} is not a number (or 'none')") from None
    if value < 1:
        raise fail("a concurrency limit must be at least 1; to stop a queue use "
                   "`pgjournal queues pause`, to lift the limit use 'none'")
    return value


def cmd_workers(args: argparse.Namespace) -> int:
    async def go(app: App) -> list[Row]:
        return await cli_fetch(app, "workers", all=args.all)

    rows = with_app(args, go)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no live workers (use --all to include stopped ones)", file=sys.stderr)
        return 0
    colour = use_colour(sys.stdout)
    cells, styles = [], []
    state_style = {"alive": "green", "stale": "red", "stopped": "dim"}
    for w in rows:
        cells.append([str(w["id"]), w["host"], str(w["pid"]), w["state"],
                      human_seconds(w["heartbeat_age"].total_seconds()), str(w["runs_held"]),
                      str(w["concurrency"]), ",".join(w["queues"])])
        styles.append([None, None, None, state_style.get(w["state"]), None, None, None, None])
    print(table(cells, ["WORKER", "HOST", "PID", "STATE", "HEARTBEAT", "HELD", "CONC",
                        "QUEUES"], colour=colour, styles=styles, right=(2, 4, 5, 6)))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        age = parse_duration(args.older_than).total_seconds()
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
    from .roles import roles_sql

    sys.stdout.write(roles_sql(schema_of(args), worker_role=args.worker_role,
                               reader_role=args.reader_role))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from .embedded import EmbeddedServer, dev_data_dir, dev_server

    data = dev_data_dir()
    if args.action == "start":
        server = dev_server()
        info = {"running": True, "dsn": server.dsn, "data_dir": str(server.data_dir),
                "pid": server.pid}
        if args.json:
            print_json(info)
        else:
            print(server.dsn)
            print(f"embedded PostgreSQL running (pid {server.pid}, data in {server.data_dir});"
                  f" pgjournal uses it when PGJOURNAL_DSN is unset", file=sys.stderr)
        return 0
    server = EmbeddedServer(data)
    initialised = (data / "pgjournal.conf").exists()
    if args.action == "stop":
        was = server.is_running()
        server.stop()
        msg = "embedded PostgreSQL stopped" if was else "embedded PostgreSQL was not running"
        if args.json:
            print_json({"running": False, "was_running": was, "data_dir": str(data)})
        else:
            print(msg)
        return 0
    running = initialised and server.is_running()
    info = {"running": running, "dsn": server.dsn if initialised else None,
            "data_dir": str(data), "pid": server.pid if initialised else None}
    if args.json:
        print_json(info)
    elif running:
        print(f"running: {server.dsn} (pid {server.pid}, data in {data})")
    elif initialised:
        print(f"stopped (data in {data}); `pgjournal dev start` starts it")
    else:
        print(f"not created yet (would live in {data}); `pgjournal dev start` creates it")
    return 0 if running else 3


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- parser -----------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _db_parent() -> argparse.ArgumentParser:
    """``--dsn``/``--schema`` accepted after the command too (without resetting them)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("database")
    g.add_argument("--dsn", default=argparse.SUPPRESS,
                   help="PostgreSQL DSN (default: $PGJOURNAL_DSN, else the embedded dev "
                        "server)")
    g.add_argument("--schema", default=argparse.SUPPRESS,
                   help="pgjournal schema (default: $PGJOURNAL_SCHEMA, else pgjournal)")
    return p


def _json_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgjournal", formatter_class=_Formatter,
        description="Durable, journaled runs on PostgreSQL: run workers, inspect and steer "
                    "runs, keep history tidy.",
        epilog=textwrap.dedent("""\
            examples:
              pgjournal demo                         # see it work (embedded Postgres)
              pgjournal migrate --dsn postgresql://app@db/app
              pgjournal worker myproject.jobs:app --queue agents --concurrency 20
              pgjournal runs --status failed --since 1d
              pgjournal show 0b6c4e1e-...

            Run `pgjournal COMMAND --help` for the options of a command."""))
    parser.add_argument("--dsn", default=None,
                        help="PostgreSQL DSN (default: $PGJOURNAL_DSN, else the embedded dev "
                             "server)")
    parser.add_argument("--schema", default=None,
                        help="pgjournal schema (default: $PGJOURNAL_SCHEMA, else pgjournal)")
    parser.add_argument("--version", action="version", version=f"pgjournal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    db, js = _db_parent(), _json_parent()

    def add(name: str, help_: str, examples: str, parents: Sequence[argparse.ArgumentParser],
            func: Callable[[argparse.Namespace], int],
            more: str = "") -> argparse.ArgumentParser:
        text = "\n\n".join(textwrap.fill(par, 79) for par in (help_ + more).split("\n\n"))
        p = sub.add_parser(name, help=help_, description=text, parents=list(parents),
                           formatter_class=_Formatter,
                           epilog="examples:\n" + textwrap.indent(examples.strip(), "  "))
        p.set_defaults(func=func)
        return p

    p = add("migrate", "create or upgrade the schema (idempotent, safe to run concurrently)",
            """
            pgjournal migrate
            pgjournal migrate --schema jobs --dsn postgresql://app@db/app
            pgjournal migrate --sql > pgjournal.sql   # review, then: psql -f pgjournal.sql
            """, [db, js], cmd_migrate)
    p.add_argument("--sql", action="store_true",
                   help="print the SQL instead of applying it (no database needed)")

    p = add("worker", "run a worker process serving the workflows of an App",
            """
            pgjournal worker myproject.jobs:app
            pgjournal worker myproject.jobs:app --queue agents --queue mail --concurrency 20
            PGJOURNAL_DSN=postgresql://app@db/app pgjournal worker pgjournal._demo_app:app
            """, [db], cmd_worker,
            more=".\n\n--dsn/--schema are exported as PGJOURNAL_DSN/PGJOURNAL_SCHEMA before "
                 "the app is imported, for apps that read them. SIGTERM or Ctrl-C stops it "
                 "gracefully: no new claims, in-flight runs get --grace seconds, then their "
                 "leases are released for other workers.")
    p.add_argument("app", metavar="MODULE:APP", help="import path of the pgjournal.App")
    p.add_argument("--queue", action="append", metavar="Q",
                   help="queue to serve (repeatable; default: the queues of the app's "
                        "workflows)")
    p.add_argument("--concurrency", type=int, default=10, help="runs at once (default 10)")
    p.add_argument("--lease", type=float, default=30.0,
                   help="seconds without heartbeat before another worker takes a run over "
                        "(default 30)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight runs may finish before their leases "
                        "are released (default 30)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log level on stderr (default info)")

    p = add("start", "start a run of a workflow and print its id",
            """
            pgjournal start research --args '["durable agents"]'
            pgjournal start research --args '[]' --kwargs '{"topic": "x"}' --queue agents
            pgjournal start research --args '["x"]' --app myproject.jobs:app --wait 60
            """, [db, js], cmd_start)
    p.add_argument("workflow", metavar="WORKFLOW")
    p.add_argument("--args", default="[]", metavar="JSON",
                   help="positional arguments as a JSON array (default [])")
    p.add_argument("--kwargs", default="{}", metavar="JSON",
                   help="keyword arguments as a JSON object (default {})")
    p.add_argument("--queue", help="queue (default: the workflow's, else 'default')")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--delay", type=float, default=None, metavar="SECONDS",
                   help="start no earlier than this many seconds from now")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="the same key always yields the same run")
    p.add_argument("--app", metavar="MODULE:APP",
                   help="check WORKFLOW against this App and use its queue and settings")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for the run to end and print its output")

    p = add("runs", "list runs, newest first",
            """
            pgjournal runs
            pgjournal runs --status failed --since 1d
            pgjournal runs --workflow research --queue agents --limit 100 --json
            """, [db, js], cmd_runs)
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--workflow")
    p.add_argument("--queue")
    p.add_argument("--since", metavar="AGE", help="created in the last AGE (90s, 15m, 1h, 2d)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")

    p = add("show", "one run: its state, then its steps as a timeline, signals and events",
            """
            pgjournal show 0b6c4e1e-7d6c-4a55-9a4f-2f1f0c8d2b9e
            pgjournal show 0b6c4e1e-7d6c-4a55-9a4f-2f1f0c8d2b9e --json | jq .steps
            """, [db, js], cmd_show)
    p.add_argument("run_id", metavar="RUN_ID")

    p = add("signal", "send a signal (durable, even if the run is not waiting yet)",
            """
            pgjournal signal 0b6c4e1e-... approval '{"ok": true}'
            pgjournal signal 0b6c4e1e-... go
            """, [db], cmd_signal)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("name", metavar="NAME")
    p.add_argument("payload", metavar="JSON", nargs="?", default="null",
                   help="payload as JSON (default null)")

    p = add("cancel", "cancel a run (a running one stops at its next step)",
            "pgjournal cancel 0b6c4e1e-...", [db], cmd_cancel)
    p.add_argument("run_id", metavar="RUN_ID")

    p = add("retry", "requeue a failed, dead or cancelled run; completed steps are not redone",
            "pgjournal retry 0b6c4e1e-...", [db], cmd_retry)
    p.add_argument("run_id", metavar="RUN_ID")

    p = add("queues", "queue depth, running, oldest due, limits; pause, resume, limit",
            """
            pgjournal queues
            pgjournal queues pause agents
            pgjournal queues resume agents
            pgjournal queues limit agents 5      # at most 5 running across all workers
            pgjournal queues limit agents none
            """, [db, js], cmd_queues)
    p.add_argument("action", nargs="?", choices=["pause", "resume", "limit"])
    p.add_argument("name", nargs="?", metavar="QUEUE")
    p.add_argument("limit", nargs="?", metavar="N")

    p = add("workers", "registered workers: host, pid, heartbeat age, runs held",
            """
            pgjournal workers
            pgjournal workers --all --json
            """, [db, js], cmd_workers)
    p.add_argument("--all", action="store_true",
                   help="include stopped workers and ones silent for over an hour")

    p = add("prune", "delete ended runs older than an age, in batches (safe while workers "
                     "work)",
            """
            pgjournal prune --older-than 30d
            pgjournal prune --older-than 7d --status completed --dry-run
            """, [db, js], cmd_prune)
    p.add_argument("--older-than", required=True, metavar="AGE",
                   help="runs that ended longer ago than AGE (e.g. 30d, 12h)")
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
    from .roles import DEFAULT_READER_ROLE, DEFAULT_WORKER_ROLE

    p.add_argument("--worker-role", default=DEFAULT_WORKER_ROLE,
                   help=f"name of the worker role (default {DEFAULT_WORKER_ROLE})")
    p.add_argument("--reader-role", default=DEFAULT_READER_ROLE,
                   help=f"name of the read-only DBA role (default {DEFAULT_READER_ROLE})")

    p = add("dev", "start, stop or inspect the embedded development PostgreSQL",
            """
            pgjournal dev start      # prints the DSN
            pgjournal dev status     # exit status 3 when it is not running
            pgjournal dev stop
            """, [js], cmd_dev)
    p.add_argument("action", choices=["start", "stop", "status"])

    p = add("demo", "watch pgjournal survive a killed worker (embedded Postgres by default)",
            """
            pgjournal demo
            pgjournal demo --short                 # fewer, faster runs (CI)
            pgjournal demo --dsn postgresql://postgres@localhost/postgres
            """, [db], cmd_demo)
    p.add_argument("--short", action="store_true", help="fewer runs, shorter latencies (~10s)")
    p.add_argument("--runs", type=int, help="number of agent runs (default 24; 12 if --short)")
    p.add_argument("--workers", type=int, default=3,
                   help="worker processes to start (default 3). 0: use workers already "
                        "running elsewhere (e.g. docker compose); nothing is killed")
    p.add_argument("--no-kill", action="store_true", help="do not kill a worker")
    p.add_argument("--keep-server", action="store_true",
                   help="leave the embedded PostgreSQL running if the demo started it")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up after this many seconds (default 90; 45 if --short)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgjournal`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if args.command == "queues" and args.action and not args.name:
            parser.error(f"queues {args.action} needs a QUEUE name")
        if args.command == "queues" and args.action == "limit" and args.limit is None:
            parser.error("queues limit needs QUEUE and N (a number, or 'none')")
        return int(args.func(args))
    except PgJournalError as exc:
        print(f"pgjournal: error: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pgjournal: database error: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pgjournal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `pgjournal runs | head`: the reader left; silence the flush at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


__all__ = ["build_parser", "cli_fetch", "cli_query", "main", "run_query"]

if __name__ == "__main__":
    sys.exit(main())
