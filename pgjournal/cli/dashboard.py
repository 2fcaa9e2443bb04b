"""``dashboard``: the web dashboard (needs the ``dashboard`` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..app import App
from ..dashboard import INSTALL_HINT
from ._common import Add, reader_dsn_of, schema_of, with_app

LOOPBACK = ("localhost",)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ..dashboard import create_app, require_extra

    require_extra()  # before anything else: a clear error naming the extra
    import uvicorn

    token = args.token or os.environ.get("PGJOURNAL_DASHBOARD_TOKEN") or None
    # --reader-dsn / PGJOURNAL_READER_DSN as every read command; the older
    # PGJOURNAL_DASHBOARD_READER_DSN still works for the dashboard alone.
    reader = reader_dsn_of(args) or os.environ.get("PGJOURNAL_DASHBOARD_READER_DSN") or None

    async def reachable(checked: App) -> None:
        await checked.store()  # connects and checks the schema version

    # A wrong DSN or a schema not migrated is one clear line now, not an error
    # page at the first request.
    with_app(args, reachable)
    if reader:
        with_app(args, reachable, app=App(reader, schema=schema_of(args), pool_size=1))
    app = App(args.dsn, schema=schema_of(args), pool_size=4)
    asgi = create_app(app, token=token, read_only=args.read_only, reader_dsn=reader,
                      allowed_origins=args.allow_origin or (),
                      login_to_read=args.login_to_read, close_app=True)
    mode = ("read-only" if args.read_only or not token
            else "actions need the token (log in once in the browser)")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"pgjournal dashboard: http://{host}:{args.port}/ (schema {app.schema}; {mode})",
          file=sys.stderr)
    if not token and not args.read_only:
        print("pgjournal dashboard: no token (PGJOURNAL_DASHBOARD_TOKEN or --token): "
              "read-only", file=sys.stderr)
    if not _is_loopback(args.host):
        print(f"pgjournal dashboard: WARNING: listening on {args.host}, not only on this "
              "machine; serve it behind TLS (the token and session cookie travel in "
              "every request)", file=sys.stderr)
    uvicorn.run(asgi, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=2)
    return 0


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("dashboard", "serve the web dashboard: runs, queues, workers, limits, schedules",
            """
            pgjournal dashboard                                  # http://127.0.0.1:8080/
            PGJOURNAL_DASHBOARD_TOKEN=s3cret pgjournal dashboard  # with actions
            pgjournal dashboard --read-only --port 9000
            pgjournal dashboard --reader-dsn postgresql://pgjournal_reader@db/app
            """, [db], cmd_dashboard,
            more=f"\n\nNeeds the dashboard extra: {INSTALL_HINT}. "
                 "Retry, cancel, signal, bulk actions and queue settings need the token "
                 "(PGJOURNAL_DASHBOARD_TOKEN or --token), entered once in the browser; "
                 "without one the dashboard is read-only. See docs/dashboard.md.")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--read-only", action="store_true",
                   help="no actions, even with a token")
    p.add_argument("--token", default=None,
                   help="the secret that unlocks actions (default: "
                        "$PGJOURNAL_DASHBOARD_TOKEN); prefer the variable: arguments "
                        "show in ps")
    p.add_argument("--login-to-read", action="store_true",
                   help="the pages too need the token (run inputs and outputs may be "
                        "sensitive)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="also accept forms posted from this origin, e.g. "
                        "https://ops.example.com (behind a proxy that rewrites Host); "
                        "repeatable")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")
