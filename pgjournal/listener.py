"""A LISTEN connection that survives database restarts.

NOTIFY is only a wake-up hint in pgjournal: whoever listens also polls, so a
notification lost while reconnecting costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql

from .connect import connect_async
from .errors import DatabaseUnavailable

log = logging.getLogger("pgjournal.listener")


class Listener:
    """Calls ``on_notify(payload)`` for every notification on ``channel``.

    ``on_connect`` runs after each (re)connection, once LISTEN is active, so the
    owner can re-check what it may have missed while disconnected.
    """

    def __init__(self, dsn: str, channel: str, on_notify: Callable[[str], None],
                 on_connect: Callable[[], None] | None = None) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_notify = on_notify
        self._on_connect = on_connect
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

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                conn = await connect_async(self._dsn, autocommit=True)
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                delay = 0.1
                self.ready.set()
                if self._on_connect:
                    self._on_connect()
                async for note in conn.notifies():
                    self._on_notify(note.payload)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                self.ready.clear()
                log.warning("listener on %s lost its connection (%s); reconnecting in %.1fs",
                            self._channel, str(exc).splitlines()[0] if str(exc) else exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
