"""``worker`` and ``workers``: run a worker process, list the registered ones."""

from __future__ import annotations

import argparse
import logging
import sys

from .._output import (
    compact,
    human_seconds,
    table,
    use_colour,
)
from .._queries import cli_fetch
from .._sql import validate_identifier
from ..app import App
from ._common import (
    Add,
    Row,
    fail,
    load_app,
    print_json,
    with_app,
)


def cmd_worker(args: argparse.Namespace) -> int:
    from ..worker import Worker

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_app(args.app, args)
    if args.concurrency < 1:
        raise fail("--concurrency must be at least 1")
    if args.lease <= 0:
        raise fail("--lease must be positive")
    for q in args.queue or []:
        validate_identifier(q, "queue name")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise fail(f"--metrics-port {args.metrics_port} is not a TCP port (0-65535)")
    worker = Worker(app, queues=args.queue or None, concurrency=args.concurrency,
                    lease=args.lease, grace_period=args.grace,
                    metrics_port=args.metrics_port, metrics_host=args.metrics_host)

    async def serve(app: App) -> None:
        await worker.run()

    with_app(args, serve, app=app)
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    async def go(app: App) -> list[Row]:
        return await cli_fetch(app, "workers", all=args.all)

    rows = with_app(args, go, read_only=True)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no live workers (use --all to include stopped ones)", file=sys.stderr)
        return 0
    colour = use_colour(sys.stdout)
    cells, styles = [], []
    state_style = {"alive": "green", "stale": "red", "gone": "red", "stopped": "dim"}
    for w in rows:
        flows = w.get("workflows")
        cells.append([str(w["id"]), w["host"], str(w["pid"]), w["state"],
                      human_seconds(w["heartbeat_age"].total_seconds()), str(w["runs_held"]),
                      str(w["concurrency"]), ",".join(w["queues"]),
                      "any" if flows is None else compact(",".join(flows), 40)])
        styles.append([None, None, None, state_style.get(w["state"]), None, None, None, None,
                       None])
    print(table(cells, ["WORKER", "HOST", "PID", "STATE", "HEARTBEAT", "HELD", "CONC",
                        "QUEUES", "WORKFLOWS"], colour=colour, styles=styles,
                right=(2, 4, 5, 6)))
    if any(w["state"] == "gone" for w in rows):
        print("(gone: silent for longer than its lease, e.g. killed; its runs are claimable "
              "by other workers)", file=sys.stderr)
    return 0


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
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
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve this worker's own counters (runs claimed/completed/failed, "
                        "step durations, claim latency, lost leases, slots) for Prometheus "
                        "on PORT (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address for --metrics-port (default 127.0.0.1: this host only)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log level on stderr (default info)")
    p = add("workers", "registered workers: host, pid, heartbeat age, runs held",
            """
            pgjournal workers
            pgjournal workers --all --json
            """, [db, js], cmd_workers)
    p.add_argument("--all", action="store_true",
                   help="include stopped workers and ones silent for over an hour")
