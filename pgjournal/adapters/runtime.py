"""Journaled runtime: sessions whose steps, streams and signals are journaled, so
re-running a session (in this process or another) replays finished steps.

``JournaledRuntime(store)`` keeps the journal in any ``JournalStore``;
``PostgresRuntime`` is one on pgjournal's tables (``runs.source = 'runtime'``),
where signals are durable and a session waiting in one process is woken by a
signal sent from another. ``InProcRuntime`` journals nothing.

Compatibility note: like the seed, steps are keyed by *name* (or
``idempotency_key``), so a loop calling ``step("llm", ...)`` twice gets the
first answer back the second time. The native API numbers occurrences
instead: with ``pgjournal.App`` and ``Run.step`` the n-th call of a name is
its own journal entry. See docs/adapters.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any, ClassVar, Protocol

from ..listener import Listener
from ..run import call_step_fn, describe_exception
from ..serializer import Serializer
from ._core import AsyncDB, AsyncPool
from .journal_store import InMemoryJournalStore, JournalStore, PostgresJournalStore

_current: ContextVar[Session | None] = ContextVar("pgjournal_adapter_session", default=None)

SIGNAL_CHANNEL = "pgjournal_adapter_signal"


class _Signals(Protocol):
    async def send_signal(self, session_id: str, name: str, payload: Any) -> None: ...

    async def take_signal(self, session_id: str, name: str, index: int) -> tuple[bool, Any]: ...


class _MemorySignals:
    """Signals held in this process. A received one is journaled in the store
    under ``signal:<name>:<n>`` so a replayed session gets the same payload."""

    def __init__(self, store: JournalStore | None) -> None:
        self._store = store
        self._inbox: dict[tuple[str, str], deque[Any]] = defaultdict(deque)

    async def send_signal(self, session_id: str, name: str, payload: Any) -> None:
        self._inbox[(session_id, name)].append(payload)

    async def take_signal(self, session_id: str, name: str, index: int) -> tuple[bool, Any]:
        key = f"signal:{name}:{index}"
        if self._store is not None:
            entry = await self._store.get_step(session_id, key)
            if entry is not None:
                return True, entry.value
        box = self._inbox.get((session_id, name))
        if not box:
            return False, None
        payload = box.popleft()
        if self._store is not None:
            await self._store.put_step(session_id, key, payload)
        return True, payload


class Session:
    """An open session: its steps are journaled under ``id``; it receives signals."""

    def __init__(self, runtime: _Runtime, session_id: str) -> None:
        self.id = session_id
        self._runtime = runtime
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._received: dict[str, int] = defaultdict(int)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    async def deliver(self, name: str, payload: Any = None) -> None:
        """Hand signal ``name`` to this session (stored durably on Postgres)."""
        await self._runtime._send(self.id, name, payload)

    async def wait(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the next signal ``name`` for this session.

        Signals are received in the order they were sent, each exactly once;
        a replayed session gets the payloads it received before, in order.
        Raises ``TimeoutError`` after ``timeout`` seconds without one.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        event = self._events[name]
        async with self._locks[name]:
            index = self._received[name]
            while True:
                event.clear()
                found, payload = await self._runtime._signals.take_signal(self.id, name, index)
                if found:
                    self._received[name] = index + 1
                    return payload
                await self._runtime._listen()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"no signal {name!r} for session {self.id!r} within {timeout} s")
                poll = self._runtime.poll_interval
                limit = poll if remaining is None else min(remaining, poll or remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), limit)

    def _wake(self, name: str | None = None) -> None:
        """Wake waits for signal ``name`` (None: all of this session's waits)."""
        for key, event in self._events.items():
            if name is None or key == name:
                event.set()


class _Runtime:
    """Sessions, steps, streams and signals over a journal (None: no journal)."""

    name: ClassVar[str] = "runtime"

    def __init__(self, store: JournalStore | None, *, poll_interval: float | None = None
                 ) -> None:
        self._journal = store
        self.poll_interval = poll_interval
        self._signals: _Signals = (store if isinstance(store, PostgresJournalStore)
                                   else _MemorySignals(store))
        self._open: dict[str, set[Session]] = defaultdict(set)
        self._listener: Listener | None = None

    # -- sessions -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self, session_id: str) -> AsyncIterator[Session]:
        """``async with runtime.session(id) as s:`` -- steps inside belong to ``s``.

        The current session is a context variable, so concurrent sessions in
        one process (one per task) never mix.
        """
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"a session id must be a non-empty string, not {session_id!r}")
        s = Session(self, session_id)
        await self._set_status(session_id, "running")
        self._open[session_id].add(s)
        token = _current.set(s)
        try:
            yield s
        except Exception as exc:
            await self._set_status(session_id, "failed", describe_exception(exc))
            raise
        else:
            await self._set_status(session_id, "completed")
        finally:
            _current.reset(token)
            self._open[session_id].discard(s)
            if not self._open[session_id]:
                del self._open[session_id]

    async def _set_status(self, session_id: str, status: str,
                          error: dict[str, Any] | None = None) -> None:
        if isinstance(self._journal, PostgresJournalStore):
            await self._journal.set_session_status(session_id, status, error)

    def _session(self, what: str) -> Session:
        s = _current.get()
        if s is None:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() needs an open session: call it inside "
                "`async with runtime.session(session_id):`")
        return s

    # -- steps --------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any,
                   idempotency_key: str | None = None, **kwargs: Any) -> Any:
        """The journaled result of ``fn(*args, **kwargs)`` under ``idempotency_key``
        (default ``name``) in the current session; ``fn`` runs only if there is none."""
        if self._journal is None:
            return await call_step_fn(fn, args, kwargs)
        s = self._session("step")
        key = idempotency_key or name
        entry = await self._journal.get_step(s.id, key)
        if entry is not None:
            return entry.value
        result = self._as_journaled(await call_step_fn(fn, args, kwargs), f"result of step {key!r}")
        await self._journal.put_step(s.id, key, result)
        return result

    async def stream_step(self, name: str, fn: Callable[..., Any], *args: Any,
                          **kwargs: Any) -> AsyncIterator[Any]:
        """Iterate ``fn(*args, **kwargs)``'s chunks, journaling them when the stream
        ends; a finished stream replays from the journal. A stream that was cut
        off (error, crash, consumer stopped early) is not journaled and re-runs."""
        s = None if self._journal is None else self._session("stream_step")
        if s is not None and self._journal is not None:
            chunks = await self._journal.get_stream(s.id, name)
            if chunks is not None:
                for chunk in chunks:
                    yield chunk
                return
        source = fn(*args, **kwargs)
        if inspect.isawaitable(source):
            source = await source
        got: list[Any] = []
        async for raw in source:
            chunk = self._as_journaled(raw, f"chunk of stream {name!r}")
            got.append(chunk)
            yield chunk
        if s is not None and self._journal is not None:
            await self._journal.put_stream(s.id, name, got)

    def _as_journaled(self, value: Any, what: str) -> Any:
        """The value as a replay from Postgres will return it (a tuple comes back
        as a list, a pydantic model as an equal copy), so a first run and a
        replay see the same thing; unstorable values fail here, before use."""
        if isinstance(self._journal, PostgresJournalStore):
            return self._journal.adapter.serializer.roundtrip(value, what=what)[1]
        return value

    # -- signals ------------------------------------------------------------------

    async def signal(self, session_id: str, name: str, payload: Any = None) -> None:
        """Send signal ``name`` to a session: an open one here receives it through
        ``deliver``; otherwise it is kept for the session (durably on Postgres)."""
        local = self._open.get(session_id)
        if local:
            await next(iter(local)).deliver(name, payload)
        else:
            await self._send(session_id, name, payload)

    async def _send(self, session_id: str, name: str, payload: Any) -> None:
        await self._signals.send_signal(session_id, name, payload)
        for s in self._open.get(session_id, ()):
            s._wake(name)

    async def _listen(self) -> None:
        """On Postgres, LISTEN for signals sent by other processes (once)."""
        if self._listener is not None or not isinstance(self._journal, PostgresJournalStore):
            return
        store = self._journal
        schema = store.adapter.schema

        def on_notify(payload: str) -> None:
            sch, _, run = payload.partition(":")
            if sch != schema:
                return
            for sid, sessions in self._open.items():
                if str(store.adapter.run(sid)["run"]) == run:
                    for s in sessions:
                        s._wake()

        def wake_all() -> None:
            for sessions in self._open.values():
                for s in sessions:
                    s._wake()

        self._listener = Listener(str(store.pool.conninfo), SIGNAL_CHANNEL, on_notify, wake_all)
        await self._listener.start()

    async def aclose(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._journal is not None:
            await self._journal.aclose()


class JournaledRuntime(_Runtime):
    """A runtime whose steps are journaled in ``store`` (None: in memory)."""

    name: ClassVar[str] = "journaled"

    def __init__(self, store: JournalStore | None = None, *,
                 poll_interval: float | None = None) -> None:
        journal = store if store is not None else InMemoryJournalStore()
        if poll_interval is None and isinstance(journal, PostgresJournalStore):
            poll_interval = 1.0  # safety net under NOTIFY
        super().__init__(journal, poll_interval=poll_interval)

    @property
    def store(self) -> JournalStore:
        assert self._journal is not None
        return self._journal


class InProcRuntime(_Runtime):
    """No journal: every step runs every time. Sessions and signals live in memory."""

    name: ClassVar[str] = "inproc"

    def __init__(self) -> None:
        super().__init__(None)


class PostgresRuntime(JournaledRuntime):
    """A ``JournaledRuntime`` on pgjournal's tables; sessions are runs with
    ``source = 'runtime'`` and signals are durable rows of ``signals``."""

    name: ClassVar[str] = "postgres"

    def __init__(self, pool: AsyncPool, *, schema: str = "pgjournal",
                 serializer: Serializer | None = None, poll_interval: float = 1.0,
                 _owned: bool = False) -> None:
        store = PostgresJournalStore(pool, schema=schema, source="runtime",
                                     serializer=serializer, _owned=_owned)
        super().__init__(store, poll_interval=poll_interval)

    @classmethod
    async def connect(cls, dsn: str | None = None, *, min_size: int = 1, max_size: int = 10,
                      schema: str = "pgjournal", poll_interval: float = 1.0
                      ) -> PostgresRuntime:
        """Open a pool on ``dsn`` (None: ``PGJOURNAL_DSN`` or the embedded dev server);
        ``aclose`` closes it."""
        pool = await AsyncDB.open_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool, schema=schema, poll_interval=poll_interval, _owned=True)

    @property
    def store(self) -> PostgresJournalStore:
        assert isinstance(self._journal, PostgresJournalStore)
        return self._journal

    async def init_schema(self) -> None:
        """Create or upgrade the pgjournal schema; safe to repeat."""
        await self.store.init_schema()
