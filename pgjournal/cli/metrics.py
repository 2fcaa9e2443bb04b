"""``metrics``: serve the database-wide gauges for Prometheus (or print them once)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..app import App
from ..metrics import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WINDOW, bound_address, collect
from ..metrics import serve_metrics as start_server
from ._common import Add, fail, with_app


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.window <= 0:
        raise fail("--window must be positive (seconds)")
    if not 0 <= args.port <= 65535:
        raise fail(f"--port {args.port} is not a TCP port (0-65535; 0 picks a free one)")

    async def once(app: App) -> str:
        return await collect(app, window=args.window)

    if args.once:
        sys.stdout.write(with_app(args, once, read_only=True))
        return 0

    async def serve(app: App) -> None:
        await collect(app, window=args.window)  # fail now, not at the first scrape

        async def body() -> str:
            return await collect(app, window=args.window)

        try:
            server = await start_server(body, port=args.port, host=args.host)
        except OSError as exc:
            raise fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
                       ) from None
        host, port = bound_address(server)
        print(f"pgjournal: serving metrics of schema {app.schema} on "
              f"http://{host}:{port}/metrics (Ctrl-C stops)", file=sys.stderr, flush=True)
        async with server:
            await asyncio.Event().wait()  # until Ctrl-C / SIGTERM

    with_app(args, serve, read_only=True)
    return 0


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("metrics", "serve Prometheus metrics: queue depth and lag, recent ends, workers, "
                       "limits",
            """
            pgjournal metrics                          # http://127.0.0.1:9464/metrics
            pgjournal metrics --port 9500 --host 0.0.0.0   # reachable from other hosts
            pgjournal metrics --once                   # print one scrape and exit
            """, [db], cmd_metrics,
            more=".\n\nEach scrape runs the statements of sql/metrics.sql in one read-only "
                 "snapshot; each is index-backed, so a scrape costs the same however many "
                 "finished runs the history holds (docs/observability.md). A worker's own "
                 "counters come from `pgjournal worker --metrics-port`.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this host only; "
                        "0.0.0.0 for every interface)")
    p.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                   help="seconds of the *_recent gauges: runs ended, lease takeovers "
                        f"(default {DEFAULT_WINDOW:g})")
    p.add_argument("--once", action="store_true",
                   help="print one scrape on stdout and exit instead of serving")
