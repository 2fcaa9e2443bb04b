"""Where the database is, and opening connections to it with clear errors.

DSN resolution, in order: the ``dsn`` argument, ``PGJOURNAL_DSN``, else the
embedded development server (started on demand, reused across runs).

Poolers: with ``pooler="transaction"`` (or ``PGJOURNAL_POOLER=transaction``)
the DSN points at a connection pooler in transaction mode (PgBouncer's
``pool_mode = transaction``, Supavisor, RDS Proxy...): consecutive
transactions of one client connection may run on different server sessions,
so connections opened here keep no session state. psycopg's server-side
prepared statements are off (``prepare_threshold=None``), nothing runs a
session ``SET``, and LISTEN goes over ``listen_dsn`` (a direct connection)
or not at all (workers and waiters then poll). See docs/deploy.md.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sys
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from .errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger("pgjournal")

_PASSWORD_URL = re.compile(r"(://[^:/@]*:)([^@]*)(@)")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


POOLERS = ("none", "session", "transaction")


def resolve_pooler(pooler: str | None = None) -> str:
    """The pooler mode: argument, then ``PGJOURNAL_POOLER``, else ``"none"``.

    ``"none"`` (a direct connection) and ``"session"`` (a pooler that gives each
    client its own server session for as long as it is connected) behave the
    same; ``"transaction"`` turns off everything that needs a session.
    """
    if pooler is None:
        pooler = os.environ.get("PGJOURNAL_POOLER", "").strip().lower() or "none"
    mode = pooler.strip().lower()
    if mode == "":
        mode = "none"
    if mode not in POOLERS:
        raise ConfigurationError(
            f"unknown pooler mode {pooler!r}: use one of {', '.join(POOLERS)} (a pooler in "
            "statement mode cannot run pgjournal: it needs multi-statement transactions)")
    return mode


def resolve_listen_dsn(listen_dsn: str | None, dsn: str, pooler: str) -> str | None:
    """Where LISTEN goes: ``listen_dsn``, then ``PGJOURNAL_LISTEN_DSN``; else the
    main DSN, unless that is a transaction-mode pooler (then ``None``: no LISTEN,
    a pooler would hand the session that listens to somebody else)."""
    if listen_dsn:
        return listen_dsn
    env = os.environ.get("PGJOURNAL_LISTEN_DSN")
    if env:
        return env
    return None if pooler == "transaction" else dsn


def _pooler_kwargs(kwargs: dict[str, Any], pooler: str | None) -> dict[str, Any]:
    if resolve_pooler(pooler) == "transaction":
        # PgBouncer 1.18 and most poolers do not carry protocol-level prepared
        # statements from one transaction to the next server connection.
        kwargs["prepare_threshold"] = None
    return kwargs


#: TCP settings of every connection pgjournal opens (pool, heartbeat, CLI),
#: unless the DSN or the caller sets its own. Without them a worker host cut
#: off from the database keeps a statement in flight for the kernel's ~15
#: minutes of retransmissions, holding a pool slot; with them the connection
#: fails within about a minute (unacknowledged data: 30 s; a silent peer while
#: waiting for an answer: 30 + 3 x 10 s) and is replaced. A slow statement is
#: not cut: the server acknowledges it. The LISTEN connection passes tighter
#: ones of its own (its pings).
NETWORK_DEFAULTS: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 30_000}


def _network_kwargs(kwargs: dict[str, Any], dsn: str) -> dict[str, Any]:
    """``kwargs`` with ``NETWORK_DEFAULTS`` added where neither they nor ``dsn``
    set a value."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.Error:
        return kwargs  # the connection attempt reports the bad DSN
    for key, value in NETWORK_DEFAULTS.items():
        if key not in given:
            kwargs.setdefault(key, value)
    return kwargs


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ``***`` (for messages and logs)."""
    return _PASSWORD_KV.sub(r"\1***", _PASSWORD_URL.sub(r"\1***\3", dsn))


def resolve_dsn(dsn: str | None = None) -> str:
    """Pick the DSN: argument, then ``PGJOURNAL_DSN``, then the embedded dev server.

    The fallback is loud (a WARNING): a production worker whose ``PGJOURNAL_DSN``
    was misspelled would otherwise quietly serve an empty local database. With
    ``PGJOURNAL_REQUIRE_DSN=1`` (the Docker image sets it) it is an error instead.
    """
    if dsn:
        return dsn
    env = os.environ.get("PGJOURNAL_DSN")
    if env:
        return env
    if os.environ.get("PGJOURNAL_REQUIRE_DSN", "").strip().lower() in ("1", "true", "yes"):
        raise ConfigurationError(
            "no DSN given and PGJOURNAL_DSN is unset, and PGJOURNAL_REQUIRE_DSN forbids "
            "falling back to the embedded dev server: set PGJOURNAL_DSN or pass --dsn")
    from .embedded import dev_server

    server = dev_server()
    if server.dsn not in _DEV_WARNED:  # once per process (the dashboard resolves twice)
        _DEV_WARNED.add(server.dsn)
        message = (f"no DSN given and PGJOURNAL_DSN unset: using the embedded dev server at "
                   f"{server.dsn} (data in {server.data_dir}); set PGJOURNAL_DSN for a real "
                   "database, or PGJOURNAL_REQUIRE_DSN=1 to make this an error")
        if log.hasHandlers():
            log.warning(message)
        else:  # logging not set up (the CLI, a script): Python would drop the level
            print(f"WARNING: pgjournal: {message}", file=sys.stderr)
    return server.dsn


#: Dev-server DSNs this process has warned about.
_DEV_WARNED: set[str] = set()


def describe_connect_error(dsn: str, exc: BaseException) -> str:
    """One line: which DSN failed, why (the server's or libpq's first line), what to check."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    # libpq's "connection failed: connection to server at ... failed: X": X is the news.
    reason = reason.removeprefix("connection failed: ")
    low = text.lower()
    if "password" in low:
        hint = "check the user name and password"
    elif "does not exist" in low and "database" in low:
        hint = "create the database or fix its name in the DSN"
    elif "role" in low and "does not exist" in low:
        hint = "create the role or fix the user name in the DSN"
    elif "resolve host" in low or "translate host name" in low or "name or service" in low:
        hint = "check the host name in the DSN: it could not be resolved"
    elif "connection refused" in low:
        hint = "nothing listens there: check that the server is running and the host and " \
               "port are right"
    elif "invalid" in low or "missing" in low or "syntax" in low:
        hint = "check the DSN's syntax (postgresql://user:pass@host:port/dbname)"
    else:
        hint = "check that the server is running and the host and port are right"
    return f"cannot connect to {mask_dsn(dsn)}: {mask_dsn(reason)} ({hint})"


def connect_sync(dsn: str, *, pooler: str | None = None,
                 **kwargs: Any) -> psycopg.Connection[dict[str, Any]]:
    """A synchronous connection with dict rows, or ``DatabaseUnavailable``.
    ``pooler``: see ``resolve_pooler`` (``None``: ``PGJOURNAL_POOLER``)."""
    kwargs.setdefault("connect_timeout", 10)
    _pooler_kwargs(kwargs, pooler)
    _network_kwargs(kwargs, dsn)
    try:
        return psycopg.connect(dsn, row_factory=dict_row, **kwargs)
    except (psycopg.Error, ValueError) as exc:
        raise DatabaseUnavailable(describe_connect_error(dsn, exc)) from None


async def connect_async(dsn: str, *, pooler: str | None = None,
                        **kwargs: Any) -> psycopg.AsyncConnection[dict[str, Any]]:
    """An async connection with dict rows, or ``DatabaseUnavailable``.
    ``pooler``: see ``resolve_pooler`` (``None``: ``PGJOURNAL_POOLER``)."""
    kwargs.setdefault("connect_timeout", 10)
    _pooler_kwargs(kwargs, pooler)
    _network_kwargs(kwargs, dsn)
    try:
        return await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row, **kwargs)
    except (psycopg.Error, ValueError) as exc:
        raise DatabaseUnavailable(describe_connect_error(dsn, exc)) from None


class _OncePerOutage(logging.Filter):
    """Lets through the first of the pool's reconnect warnings of an outage;
    the rest of that outage is silenced until a connection succeeds again."""

    def __init__(self) -> None:
        super().__init__()
        self.in_outage = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        if self.in_outage:
            return False
        self.in_outage = True
        return True


_pool_noise = _OncePerOutage()
logging.getLogger("psycopg.pool").addFilter(_pool_noise)


async def _connected(conn: psycopg.AsyncConnection[Any]) -> None:
    """Pool ``configure`` hook: a new connection means any outage is over."""
    _pool_noise.in_outage = False


async def _check_if_unsound(conn: psycopg.AsyncConnection[Any]) -> None:
    """Pool ``check`` hook: probe (one empty round trip) only a connection whose
    socket has something to read while it sat idle in the pool: the server
    closed it (a restart sends a FATAL and a FIN) or wrote to it. Probing every
    checkout doubled the round trips of every statement (S2 drain -38%)."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        unsound = bool(readable)
    except (OSError, ValueError):
        unsound = True
    if unsound:
        await AsyncConnectionPool.check_connection(conn)


async def open_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, name: str = "pgjournal",
    pooler: str | None = None,
) -> AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]:
    """Open a pool after one probe connection, so a bad DSN fails fast and clearly.
    ``pooler``: see ``resolve_pooler`` (``None``: ``PGJOURNAL_POOLER``)."""
    probe = await connect_async(dsn, pooler=pooler)
    await probe.close()
    pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        kwargs=_network_kwargs(_pooler_kwargs({"row_factory": dict_row, "autocommit": True},
                                              pooler), dsn),
        reconnect_timeout=300,
        # After a server restart the pool holds dead connections: check the
        # ones whose socket shows it before handing them out, so no first use fails.
        check=_check_if_unsound,
        configure=_connected,
    )
    await pool.open(wait=True, timeout=30)
    return pool
