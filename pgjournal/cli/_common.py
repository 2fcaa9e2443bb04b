"""What every command shares: reaching the database, loading apps, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .._output import STATUS_STYLE, paint, shorten, to_json
from .._queue_change import parse_limit as _parse_limit
from .._sql import validate_identifier
from ..app import App
from ..errors import ConfigurationError
from ..roles import permission_denied

T = TypeVar("T")
Row = dict[str, Any]
#: ``add(name, help, examples, parents, func, more="")`` -> the command's parser.
Add = Callable[..., argparse.ArgumentParser]

ENDED = ("completed", "failed", "cancelled", "dead")
STATUSES = ("queued", "running", "suspended", *ENDED)
DEFAULT_SCHEMA = "pgjournal"


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
        # json's messages may end in "at" ("Unterminated string starting at").
        raise fail(f"{what} is not valid JSON ({exc.msg.removesuffix(' at')} at column "
                   f"{exc.colno}): "
                   f"{shorten(text, 60)!r}") from None


def reader_dsn_of(args: argparse.Namespace) -> str | None:
    """``--reader-dsn``, else ``PGJOURNAL_READER_DSN``, else ``None`` (read the primary)."""
    return (getattr(args, "reader_dsn", None) or os.environ.get("PGJOURNAL_READER_DSN")
            or None)


def with_app(args: argparse.Namespace, work: Callable[[App], Coroutine[Any, Any, T]],
             app: App | None = None, *, read_only: bool = False) -> T:
    """Run ``work(app)`` on an app for ``--dsn``/``--schema``, closing it afterwards.

    ``read_only``: ``work`` only reads, so the app connects to the reader
    (``--reader-dsn`` / ``PGJOURNAL_READER_DSN``, e.g. a streaming replica) when
    one is given. Everything else always goes to ``--dsn``, the primary.
    """
    async def go() -> T:
        nonlocal app
        dsn = args.dsn
        if app is None:
            dsn = (reader_dsn_of(args) if read_only else None) or args.dsn
            app = App(dsn, schema=schema_of(args), pool_size=2)
        try:
            return await work(app)
        except psycopg.errors.InsufficientPrivilege as exc:
            # e.g. --reader-dsn names the worker role, which reads no view: one line
            # naming the role to use instead.
            user = conninfo_to_dict(dsn).get("user") if dsn else None
            raise permission_denied(exc, schema=app.schema,
                                    user=str(user) if user else None,
                                    write=not read_only) from exc
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


class Formatter(argparse.RawDescriptionHelpFormatter):
    pass


READER_HELP = ("DSN the read-only commands (runs, show, workers, queues, limits and "
               "schedules listings, metrics, the dashboard's pages) read from, e.g. a "
               "streaming replica; writes always use --dsn (default: "
               "$PGJOURNAL_READER_DSN, else --dsn)")


def db_parent() -> argparse.ArgumentParser:
    """``--dsn``/``--schema`` accepted after the command too (without resetting them)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("database")
    g.add_argument("--dsn", default=argparse.SUPPRESS,
                   help="PostgreSQL DSN (default: $PGJOURNAL_DSN, else the embedded dev "
                        "server)")
    g.add_argument("--schema", default=argparse.SUPPRESS,
                   help="pgjournal schema (default: $PGJOURNAL_SCHEMA, else pgjournal)")
    g.add_argument("--reader-dsn", metavar="DSN", default=argparse.SUPPRESS,
                   help=READER_HELP)
    return p


def json_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return p


def paint_status(status: str, colour: bool) -> str:
    return paint(f"[{status}]", STATUS_STYLE.get(status, "bold"), colour)


def plural(n: int, word: str) -> str:
    """``1 run``, ``5 runs``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def parse_limit(text: str, *, lift: str) -> int | None:
    """A concurrency limit typed on the command line: a number >= 1, or ``none``
    (``off``) to lift it. ``lift`` says how else to stop, for the error message.
    The dashboard's queue action parses with the same function."""
    return _parse_limit(text, lift=lift)
