"""A LISTEN connection that survives database restarts.

NOTIFY is only a wake-up hint in pgjournal: whoever listens also polls, so a
notification lost while reconnecting costs latency, never correctness.

A connection that only waits for notifications never notices a half-open
socket (a NAT or load balancer that dropped it silently, a server host that
vanished): it would wait forever for wake-ups that no longer come. So the
listener pings (``SELECT 1``) after every ``ping_interval`` seconds without a
notification, and a ping not answered within ``ping_timeout`` counts as a lost
connection: the socket is shut down under the waiting ping (no cancel
request, which could wait on the same dead path). TCP keepalives and
``tcp_user_timeout`` are on as well.

LISTEN needs a session: it must not go through a pooler in transaction mode
(the ``listen_dsn`` of an ``App`` is a direct connection).

``act``: an optional coroutine function called with the listening connection
and the payloads just heard, right after ``on_notify`` has seen them, on the
listener's own task. The worker claims there: the connection is already open
and idle, so a wake-up costs no pool checkout and no task switch before the
claim. Notifications that arrive while ``act`` runs are kept by psycopg and
delivered next. An ``act`` that loses the connection makes the listener
reconnect, like a failed ping; any other error of ``act`` is logged and the
listener goes on listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from .connect import connect_async
from .errors import DatabaseUnavailable

log = logging.getLogger("pgjournal.listener")

#: ``act(conn, payloads)``: work to do on the listening connection after a wake-up.
Act = Callable[[psycopg.AsyncConnection[Any], Sequence[str]], Awaitable[None]]


class Listener:
    """Calls ``on_notify(payload)`` for every notification on ``channel``.

    ``on_connect`` runs after each (re)connection, once LISTEN is active, so the
    owner can re-check what it may have missed while disconnected.
    """

    def __init__(self, dsn: str, channel: str, on_notify: Callable[[str], None],
                 on_connect: Callable[[], None] | None = None, *,
                 ping_interval: float = 30.0, ping_timeout: float = 10.0,
                 act: Act | None = None) -> None:
        self._dsn = dsn
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        #: Pings answered (for tests and curiosity).
        self.pings = 0
        self._channel = channel
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._act = act
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"listen:{self._channel}")
            ready = asyncio.create_task(self.ready.wait())
            await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=30)
            ready.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _ping(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """``SELECT 1``, or ``TimeoutError`` after ``ping_timeout`` (the
        connection is then unusable: its socket is shut down)."""
        ping = asyncio.ensure_future(conn.execute("SELECT 1"))
        done, _ = await asyncio.wait({ping}, timeout=self.ping_timeout)
        if done:
            ping.result()
            return
        # shutdown() on a duplicate of the descriptor: the socket reads EOF and
        # psycopg's wait ends with an error; the descriptor itself stays psycopg's.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):  # not CancelledError: stop() must stop
            await asyncio.wait_for(ping, 5)
        raise TimeoutError(f"no answer to a ping within {self.ping_timeout:g}s")

    async def _acting(self, conn: psycopg.AsyncConnection[Any], heard: Sequence[str]) -> None:
        """``act`` on the listening connection; a lost connection propagates."""
        assert self._act is not None
        try:
            await self._act(conn, heard)
        except (psycopg.OperationalError, DatabaseUnavailable):
            raise
        except Exception:
            log.exception("listener on %s: acting on a wake-up failed", self._channel)
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the listening connection broke while acting")

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                # pooler="none": the LISTEN DSN is a direct connection, whatever
                # PGJOURNAL_POOLER says about the main one.
                conn = await connect_async(self._dsn, autocommit=True, pooler="none",
                                           keepalives=1, keepalives_idle=30,
                                           keepalives_interval=10, keepalives_count=3,
                                           # a ping the other end never acknowledges
                                           # fails in the kernel, with no cancel dance
                                           tcp_user_timeout=int(self.ping_timeout * 1000))
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                delay = 0.1
                self.ready.set()
                if self._on_connect:
                    self._on_connect()
                while True:
                    heard: list[str] = []
                    # stop_after=1: back here after the first packet of notifications
                    # (all of that packet is yielded), so ``act`` can use the connection.
                    async with contextlib.aclosing(conn.notifies(
                            timeout=self.ping_interval,
                            stop_after=None if self._act is None else 1)) as notes:
                        async for note in notes:
                            heard.append(note.payload)
                            self._on_notify(note.payload)
                    if not heard:  # quiet for ping_interval: is the other end still there?
                        await self._ping(conn)
                        self.pings += 1
                    elif self._act is not None:
                        await self._acting(conn, heard)
            except (psycopg.OperationalError, DatabaseUnavailable, TimeoutError) as exc:
                self.ready.clear()
                log.warning("listener on %s lost its connection (%s); reconnecting in %.1fs",
                            self._channel, str(exc).splitlines()[0] if str(exc) else exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
