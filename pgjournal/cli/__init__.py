"""The ``pgjournal`` command: operate workers, inspect and steer runs, keep history tidy.

Every command reaches the database the same way: ``--dsn``, else
``PGJOURNAL_DSN``, else the embedded development server; ``--schema``, else
``PGJOURNAL_SCHEMA``, else ``pgjournal``. The commands that only read (``runs``,
``show``, ``workers``, the listings of ``queues``, ``limits`` and ``schedules``,
``metrics``, the dashboard's pages) read from ``--reader-dsn`` /
``PGJOURNAL_READER_DSN`` (a replica) when given; writes always use the primary.
State changes go through the same ``App``/``Store`` calls (and so the same SQL
functions) as Python code; the reads the CLI needs beyond the store are named
queries in ``sql/cli.sql`` (``pgjournal._queries``).

One module per command group (``runs``, ``queues``, ``limits``, ``schedules``,
``worker``, ``admin``, ``dev``), each with a ``register`` that adds its
subcommands. Errors a user can cause print one line on stderr and exit with
status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

import psycopg

from .. import __version__
from .._queries import cli_fetch, cli_query, run_query
from ..connect import mask_dsn
from ..errors import PgJournalError
from . import admin, dashboard, dev, limits, metrics, queues, runs, schedules, worker
from ._common import READER_HELP, Formatter, db_parent, json_parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgjournal", formatter_class=Formatter,
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
    parser.add_argument("--reader-dsn", metavar="DSN", default=None, help=READER_HELP)
    parser.add_argument("--version", action="version", version=f"pgjournal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    db, js = db_parent(), json_parent()

    def add(name: str, help_: str, examples: str, parents: Sequence[argparse.ArgumentParser],
            func: Callable[[argparse.Namespace], int],
            more: str = "") -> argparse.ArgumentParser:
        text = "\n\n".join(textwrap.fill(par, 79) for par in (help_ + more).split("\n\n"))
        # The examples are written indented in the source: dedent before indenting.
        p = sub.add_parser(name, help=help_, description=text, parents=list(parents),
                           formatter_class=Formatter,
                           epilog="examples:\n" + textwrap.indent(
                               textwrap.dedent(examples).strip(), "  "))
        p.set_defaults(func=func)
        return p

    for group in (admin, worker, runs, queues, limits, schedules, dev, metrics, dashboard):
        group.register(add, db, js)
    return parser


def _read_only_error(args: argparse.Namespace, exc: psycopg.Error) -> str:
    """A write refused by a read-only server: most likely ``--dsn`` names a standby."""
    dsn = args.dsn or os.environ.get("PGJOURNAL_DSN") or "the embedded dev server"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"pgjournal: error: {args.command} writes, and the database at {mask_dsn(dsn)} "
            f"is read-only ({first}): is it a standby? --dsn must name the primary "
            "(a replica belongs in --reader-dsn)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgjournal`` console script; returns the exit status."""
    parser = build_parser()
    # psql's own options (`pgjournal psql -c 'SELECT 1'`) pass through, with or
    # without `--`; every other command keeps argparse's refusal of unknowns.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if getattr(args, "command", None) != "psql":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.psql_args = [*unknown, *args.psql_args]
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
        if isinstance(exc.__cause__, psycopg.errors.ReadOnlySqlTransaction):
            print(_read_only_error(args, exc.__cause__), file=sys.stderr)
            return 1
        print(f"pgjournal: error: {exc}", file=sys.stderr)
        return 1
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        print(_read_only_error(args, exc), file=sys.stderr)
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
