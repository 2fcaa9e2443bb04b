"""``App``: the workflow registry and the client API (start, signal, cancel, retry, results)."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import inspect
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ._sql import validate_identifier
from .connect import resolve_dsn, resolve_listen_dsn, resolve_pooler
from .errors import (
    Cancelled,
    ConfigurationError,
    DatabaseUnavailable,
    RunFailed,
    SerializationError,
    UnknownRun,
    UnknownSchedule,
    UnknownWorkflow,
)
from .listener import Listener
from .migrations import migrate
from .run import DEFAULT_MAX_JOURNAL_BYTES
from .schedules import DEFAULT_CATCHUP_WINDOW, ScheduleSpec
from .serializer import DEFAULT_MAX_BYTES, Serializer
from .store import Store
from .tracing import start as traced_start

log = logging.getLogger("pgjournal")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
ENDED = frozenset({"completed", "failed", "cancelled", "dead"})


def exponential_backoff(attempt: int) -> float:
    """Default retry delay: 1 s, 2 s, 4 s ... capped at 5 minutes."""
    return float(min(2 ** (attempt - 1), 300))


@dataclass(frozen=True)
class Workflow:
    """A registered workflow and its run settings."""

    name: str
    fn: Callable[..., Awaitable[Any]]
    queue: str
    max_attempts: int
    retry_backoff: Callable[[int], float]
    timeout: float | None
    max_recoveries: int
    signature: inspect.Signature


def _check_key(key: str | None) -> str | None:
    if key is not None and (not isinstance(key, str) or not key):
        raise ConfigurationError(f"a concurrency key must be a non-empty string, not {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class _StartTarget:
    """Where a start goes: the workflow name, its queue and its run settings."""

    name: str
    queue: str
    max_attempts: int
    max_recoveries: int


def _new_run_ids(n: int) -> list[uuid.UUID]:
    """``n`` new run ids for a batch: UUID version 7 (RFC 9562), the Unix time in
    milliseconds followed by 74 random bits.

    Ids made together sort together, so a batch's rows go to the rightmost
    pages of the indexes on run ids (``runs`` and ``run_events``) instead of
    ``n`` random ones: 20% less server time for a batch of 1,000 (measured at
    30,000 runs; the gap grows with the table).
    """
    prefix = (time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF).to_bytes(6, "big")
    tail = bytearray(os.urandom(10 * n))  # per id: version + rand_a, variant + rand_b
    tail[0::10] = bytes(0x70 | (b & 0x0F) for b in tail[0::10])
    tail[2::10] = bytes(0x80 | (b & 0x3F) for b in tail[2::10])
    return [uuid.UUID(bytes=prefix + tail[i:i + 10]) for i in range(0, 10 * n, 10)]


def _as_uuid(run_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(run_id, uuid.UUID):
        return run_id
    try:
        return uuid.UUID(str(run_id))
    except ValueError:
        raise UnknownRun(f"{run_id!r} is not a run id (expected a UUID)") from None


class RunHandle:
    """A run, by id: its status and (awaited) result. Cheap to create."""

    def __init__(self, app: App, run_id: uuid.UUID) -> None:
        self.app = app
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"RunHandle({str(self.run_id)!r})"

    async def status(self) -> str:
        row = await (await self.app.store()).get_run(self.run_id)
        if row is None:
            raise UnknownRun(f"run {self.run_id} does not exist")
        return str(row["status"])

    async def info(self) -> dict[str, Any]:
        """The run's row (status, attempts, error, timestamps ...)."""
        row = await (await self.app.store()).get_run(self.run_id)
        if row is None:
            raise UnknownRun(f"run {self.run_id} does not exist")
        return row

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its output.

        Raises ``RunFailed`` (failed or dead), ``Cancelled``, or ``TimeoutError``
        after ``timeout`` seconds. Woken by NOTIFY; polls as a safety net.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self.app._wait_result(self.run_id)
        except TimeoutError:
            raise TimeoutError(await self._timeout_reason(timeout)) from None

    async def _timeout_reason(self, timeout: float | None) -> str:
        """Why the wait ended: the run, its status, and whether any worker serves it
        (with no worker running, a run stays queued forever)."""
        head = f"run {self.run_id} did not end within {timeout:g}s"
        try:
            from ._queries import cli_fetch

            rows = await asyncio.wait_for(
                cli_fetch(self.app, "result_timeout_state", run=self.run_id), 5)
        except Exception as exc:  # the reason is a courtesy; the timeout stands
            return f"{head} (its state could not be read: {exc})"
        if not rows:
            return f"{head}; it no longer exists"
        r = rows[0]
        text = f"{head}: workflow {r['workflow']!r} is {r['status']} in queue {r['queue']!r}"
        if r["paused"]:
            text += ", which is paused (pgjournal queues resume " + r["queue"] + ")"
        if r["live_workers"]:
            n = int(r["live_workers"])
            return text + f"; {n} live worker{'s' if n != 1 else ''} serve{'s' if n == 1 else ''}" \
                " that queue"
        return text + ("; no live worker serves that queue: start one, e.g. "
                       "`pgjournal worker yourmodule:app`")

    async def signal(self, name: str, payload: Any = None, *,
                     idempotency_key: str | None = None) -> None:
        await self.app.signal(self.run_id, name, payload, idempotency_key=idempotency_key)

    async def cancel(self, *, children: bool = True) -> str:
        return await self.app.cancel(self.run_id, children=children)


class App:
    """A pgjournal application: workflows plus a connection to one schema.

    ``dsn=None`` uses ``PGJOURNAL_DSN``, else the embedded development server
    (with a WARNING; an error under ``PGJOURNAL_REQUIRE_DSN=1``). ``schema=None``
    uses ``PGJOURNAL_SCHEMA``, else ``pgjournal``.
    Connections open lazily on first use; ``async with app`` closes them.

    Behind a connection pooler in transaction mode (PgBouncer ``pool_mode =
    transaction`` and the like) pass ``pooler="transaction"`` (or set
    ``PGJOURNAL_POOLER=transaction``): no session state is then kept on
    pooled connections. LISTEN needs a session of its own, so it goes over
    ``listen_dsn`` (or ``PGJOURNAL_LISTEN_DSN``), a direct connection to the
    server; without one, workers and result waiters poll every
    ``poll_interval``. See docs/deploy.md.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        allow_pickle: bool = False,
        max_value_bytes: int = DEFAULT_MAX_BYTES,
        pool_size: int = 10,
        poll_interval: float = 1.0,
        max_journal_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
        pooler: str | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        # Like the CLI: argument, else PGJOURNAL_SCHEMA, else "pgjournal" (so a
        # worker started with PGJOURNAL_SCHEMA=other serves that schema).
        if schema is None:
            schema = os.environ.get("PGJOURNAL_SCHEMA") or "pgjournal"
        self.schema = validate_identifier(schema)
        self._dsn = dsn
        #: "none", "session" or "transaction" (see ``pgjournal.connect.resolve_pooler``).
        self.pooler = resolve_pooler(pooler)
        self._listen_dsn = listen_dsn
        self.serializer = Serializer(allow_pickle=allow_pickle, max_bytes=max_value_bytes)
        self.pool_size = pool_size
        if max_journal_bytes <= 0:
            raise ConfigurationError("max_journal_bytes must be positive (bytes a run's "
                                     "journal may hold)")
        self.max_journal_bytes = max_journal_bytes
        self.poll_interval = poll_interval
        self.workflows: dict[str, Workflow] = {}
        self.schedules: dict[str, ScheduleSpec] = {}
        self._store: Store | None = None
        #: workflow -> (queue live workers serve it on, monotonic expiry): see _client_queue.
        self._served: dict[str, tuple[str, float]] = {}
        self._open_lock: asyncio.Lock | None = None
        self._done_listener: Listener | None = None
        self._waiters: dict[uuid.UUID, set[asyncio.Future[None]]] = {}
        self._loop_guard: asyncio.Task[None] | None = None

    # -- registry ------------------------------------------------------------

    def workflow(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 3,
        retry_backoff: Callable[[int], float] | float = exponential_backoff,
        timeout: float | None = None,
        max_recoveries: int = 5,
    ) -> Callable[[F], F]:
        """Register ``async def wf(run, *args, **kwargs)`` as a workflow.

        ``retry_backoff`` is seconds (a number, or a function of the attempt
        that failed). ``timeout`` bounds one attempt. ``max_recoveries``: how
        many worker crashes a run survives before it is parked as ``dead``.
        """
        validate_identifier(queue, "queue name")
        if max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        backoff: Callable[[int], float]
        if callable(retry_backoff):
            backoff = retry_backoff
        else:
            fixed = float(retry_backoff)
            backoff = lambda _attempt: fixed  # noqa: E731

        def register(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(f"workflow {fn.__name__!r} must be an async def")
            wf_name = name or fn.__name__
            if not wf_name:
                raise ConfigurationError("a workflow needs a non-empty name")
            self.workflows[wf_name] = Workflow(wf_name, fn, queue, max_attempts, backoff,
                                               timeout, max_recoveries, inspect.signature(fn))
            return fn  # type: ignore[return-value]  # narrowed by iscoroutinefunction

        return register

    def schedule(
        self,
        cron: str,
        *,
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timezone: str = "UTC",
        catchup: str = "latest",
        catchup_window: float | timedelta = DEFAULT_CATCHUP_WINDOW,
        queue: str | None = None,
    ) -> Callable[[F], F]:
        """Start the decorated workflow on a cron schedule: one run per slot.

        Put it above ``@app.workflow()`` (or apply it to a registered
        workflow function: ``app.schedule("0 * * * *", name="hourly")(fn)``;
        one workflow may have several schedules, each with its own ``name``,
        default the workflow's name). ``cron``: 5 fields (minute hour day
        month weekday), 6 (a seconds field first) or ``@hourly`` etc., in the
        IANA ``timezone``. ``catchup`` after downtime: ``skip`` (missed slots
        are not run), ``latest`` (the most recent missed slot runs) or ``all``
        (every missed slot within ``catchup_window`` seconds). The row is
        upserted when a worker of this app starts (not at import), keeping a
        pause set by an operator; see docs/flow-control.md.
        """
        from . import schedules as sch

        sch.CronRule(cron, timezone)  # cron and timezone errors at import, naming the field
        sch.validate_policy(catchup)
        window = sch.validate_window(catchup_window)
        if queue is not None:
            validate_identifier(queue, "queue name")
        args_json = self.serializer.dumps(list(args), what="schedule args")
        kwargs_json = self.serializer.dumps(dict(kwargs or {}), what="schedule kwargs")

        def register(fn: F) -> F:
            found = [w for w in self.workflows.values() if w.fn is fn]
            sched_name = sch.validate_name(name or (found[0].name if found else fn.__name__))
            if sched_name in self.schedules and self.schedules[sched_name].fn is not fn:
                raise ConfigurationError(f"schedule {sched_name!r} is declared twice")
            self.schedules[sched_name] = sch.ScheduleSpec(
                sched_name, cron, timezone, catchup, window, args_json, kwargs_json, fn, queue)
            return fn

        return register

    # -- connection ----------------------------------------------------------

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = resolve_dsn(None)
        return self._dsn

    @property
    def listen_dsn(self) -> str | None:
        """Where LISTEN connects, or ``None`` when there is no LISTEN (a
        transaction-mode pooler and no ``listen_dsn``): then everybody polls."""
        return resolve_listen_dsn(self._listen_dsn, self.dsn, self.pooler)

    async def store(self) -> Store:
        """The app's store, opened (and the schema version checked) on first use."""
        if self._store is None:
            if self._open_lock is None:
                self._open_lock = asyncio.Lock()
            async with self._open_lock:
                if self._store is None:
                    dsn = await asyncio.to_thread(lambda: self.dsn)
                    self._store = await Store.open(dsn, schema=self.schema,
                                                   max_size=self._pool_target(),
                                                   serializer=self.serializer,
                                                   pooler=self.pooler)
                    self._guard_loop_end()
        return self._store

    # Pool sizing follows the workers using this app: each needs a connection
    # per concurrent run plus a few for claims and completions (heartbeats have
    # their own connection). Works whether or not the pool is already open.

    def _pool_demand(self) -> dict[uuid.UUID, int]:
        demand: dict[uuid.UUID, int] | None = self.__dict__.get("_worker_demand")
        if demand is None:
            demand = self.__dict__["_worker_demand"] = {}
        return demand

    def _pool_target(self) -> int:
        workers = self._pool_demand()
        need = sum(workers.values()) + 4 * len(workers)
        return max(self.pool_size, need)

    def _claim_connections(self, worker: uuid.UUID, concurrency: int) -> None:
        self._pool_demand()[worker] = concurrency

    def _release_connections(self, worker: uuid.UUID) -> None:
        self._pool_demand().pop(worker, None)

    async def _fit_pool(self) -> None:
        """Resize the open pool to what the app's workers need now."""
        store = self._store
        if store is None or store.pool.closed:
            return
        target = self._pool_target()
        if store.pool.max_size != target:
            await store.pool.resize(min_size=min(store.pool.min_size, target),
                                    max_size=target)

    async def migrate(self) -> list[int]:
        """Apply pending migrations to the app's schema (see ``pgjournal.migrate``)."""
        dsn = await asyncio.to_thread(lambda: self.dsn)
        return await asyncio.to_thread(migrate, dsn, schema=self.schema)

    def _guard_loop_end(self) -> None:
        """Close the connections when the event loop ends, if nobody closed the app.

        ``asyncio.run()`` cancels every task at the end; a pool task cancelled in
        the middle of a connect could swallow that and keep ``asyncio.run()``
        from ever returning. A guard task, cancelled with them, closes the pool
        (which stops its tasks) so an App that is never closed cannot hang exit.
        """
        async def guard() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if self._loop_guard is asyncio.current_task():  # not cancelled by close()
                    self._loop_guard = None
                    # The pool's own tasks were cancelled with this one, so its
                    # close() may end before closing the idle connections: those
                    # are closed here (the pool keeps them in ``_pool``).
                    idle = list(getattr(self._store.pool, "_pool", ())) if self._store else []
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(self.close(), 5)
                    self._store = self._done_listener = None
                    for conn in idle:
                        with contextlib.suppress(BaseException):
                            await conn.close()
                raise

        self._loop_guard = asyncio.get_running_loop().create_task(
            guard(), name="pgjournal-app-loop-guard")

    async def close(self) -> None:
        guard, self._loop_guard = self._loop_guard, None
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()
        if self._done_listener is not None:
            await self._done_listener.stop()
            self._done_listener = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> App:
        await self.store()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- client API ----------------------------------------------------------

    async def start(
        self,
        workflow: str | Callable[..., Any],
        *args: Any,
        queue: str | None = None,
        priority: int = 0,
        delay: float | None = None,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        **kwargs: Any,
    ) -> RunHandle:
        """Enqueue a run of ``workflow`` (a name, or the registered function).

        ``concurrency_key``: a flow-control key (a tenant, an API key): at most
        the key's limit (``set_concurrency_limit``) of its runs run at once,
        across all workers.

        An app with workflows registered refuses a name it does not know
        (``UnknownWorkflow``, naming the closest registered ones): a typo must
        not sit in a queue forever. A client-only app (no workflows
        registered) may start any name; only workers that registered it claim
        the run; without ``queue=`` it goes to the queue live workers
        registered the name on (``ConfigurationError`` if they serve it on
        several), or ``default`` if no live worker knows it yet. The same
        ``idempotency_key`` always yields the same run.
        """
        target = self._start_target(workflow, await self._client_queue(workflow, queue))
        input_json = self.serializer.dumps({"args": list(args), "kwargs": kwargs},
                                           what=f"input of workflow {target.name!r}")
        store = await self.store()
        run_id, _created = await traced_start(store.start_run,
            uuid.uuid4(), target.name, target.queue, input_json, priority=priority,
            delay=delay or 0.0, idempotency_key=idempotency_key,
            max_attempts=target.max_attempts, max_recoveries=target.max_recoveries,
            concurrency_key=_check_key(concurrency_key),
        )
        return RunHandle(self, run_id)

    async def start_many(
        self,
        workflow: str | Callable[..., Any],
        items: Iterable[Any],
        *,
        kwargs_list: Sequence[Mapping[str, Any]] | None = None,
        idempotency_keys: Sequence[str | None] | None = None,
        queue: str | None = None,
        priority: int = 0,
        delay: float | None = None,
        concurrency_key: str | None = None,
        concurrency_keys: Sequence[str | None] | None = None,
    ) -> list[RunHandle]:
        """Enqueue one run of ``workflow`` per element of ``items``, in one round trip.

        Each element of ``items`` gives the positional arguments of one run:
        a ``tuple`` is the argument list (``("a", 1)`` runs ``wf(run, "a", 1)``,
        ``()`` runs ``wf(run)``); any other value is the single argument
        (``[1, 2, 3]`` starts ``wf(run, 1)``, ``wf(run, 2)`` and ``wf(run, 3)``;
        a list element is one list argument). To pass one tuple as the only
        argument, wrap it: ``((x, y),)``. ``kwargs_list``, if given, holds the
        keyword arguments of each run, one mapping per element of ``items``.

        Returns one handle per element, in the order given. The workflow name,
        ``queue``, ``priority`` and ``delay`` apply to every run, with the same
        rules as :meth:`start` (``UnknownWorkflow`` for a name the app does not
        know). ``idempotency_keys``, if given, holds one key (or ``None``) per
        element: a key that already names a run returns that run, and a key
        repeated within the batch creates one run, returned for each element
        that carries it. An element whose input cannot be stored raises
        ``SerializationError`` naming its index, before any SQL; lists of
        different lengths raise ``ConfigurationError``. All runs are created in
        one transaction (all or none), with one wake-up for the queue's idle
        workers. An empty ``items`` returns ``[]`` without touching the database.
        ``concurrency_key`` keys every run (see :meth:`start`);
        ``concurrency_keys`` gives one key (or ``None``) per element instead.
        The new runs' ids are UUIDs of version 7 (time-ordered; see
        ``_new_run_ids``), where ``start`` makes version 4 ones.
        """
        target = self._start_target(workflow, await self._client_queue(workflow, queue))
        if isinstance(items, str | bytes | Mapping):
            raise ConfigurationError(
                f"start_many: items is a {type(items).__qualname__}; give a list with "
                "one element per run (e.g. [value] for one run)")
        batch = list(items)
        n = len(batch)
        kw_list: list[Mapping[str, Any]] | None = None
        if kwargs_list is not None:
            kw_list = list(kwargs_list)
            if len(kw_list) != n:
                raise ConfigurationError(
                    f"start_many: kwargs_list has {len(kw_list)} elements for {n} items; "
                    "give one mapping per item")
        keys: list[str | None] | None = None
        if idempotency_keys is not None:
            if isinstance(idempotency_keys, str):
                raise ConfigurationError(
                    "start_many: idempotency_keys must be a sequence of keys, one per "
                    "item, not a single string")
            keys = list(idempotency_keys)
            if len(keys) != n:
                raise ConfigurationError(
                    f"start_many: idempotency_keys has {len(keys)} elements for {n} "
                    "items; give one key (or None) per item")
            for i, key in enumerate(keys):
                if key is not None and not isinstance(key, str):
                    raise ConfigurationError(
                        f"start_many: idempotency_keys[{i}] is a "
                        f"{type(key).__qualname__}; a key is a str or None")
            if all(k is None for k in keys):
                keys = None
        ckeys: list[str | None] | None = None
        if concurrency_keys is not None:
            if concurrency_key is not None or isinstance(concurrency_keys, str):
                raise ConfigurationError(
                    "start_many: give concurrency_key (one for every run) or "
                    "concurrency_keys (a sequence, one per item), not both")
            ckeys = [_check_key(k) for k in concurrency_keys]
            if len(ckeys) != n:
                raise ConfigurationError(
                    f"start_many: concurrency_keys has {len(ckeys)} elements for {n} "
                    "items; give one key (or None) per item")
        elif concurrency_key is not None:
            ckeys = [_check_key(concurrency_key)] * n
        if not n:
            return []
        payloads = [{"args": list(item) if isinstance(item, tuple) else [item], "kwargs": {}}
                    for item in batch]
        if kw_list is not None:
            for i, (payload, kw) in enumerate(zip(payloads, kw_list, strict=True)):
                if not isinstance(kw, Mapping):
                    raise ConfigurationError(
                        f"start_many: kwargs_list[{i}] is a {type(kw).__qualname__}, "
                        "not a mapping of keyword arguments")
                payload["kwargs"] = dict(kw)
        inputs = self._dump_inputs(target.name, payloads)
        store = await self.store()
        started = await traced_start(store.start_runs,
            _new_run_ids(n), target.name, target.queue, inputs, priority=priority,
            delay=delay or 0.0, idempotency_keys=keys,
            max_attempts=target.max_attempts, max_recoveries=target.max_recoveries,
            concurrency_keys=ckeys,
        )
        return [RunHandle(self, run_id) for run_id, _created in started]

    def _dump_inputs(self, name: str, payloads: list[dict[str, Any]]) -> str:
        """The inputs of a batch as one JSON array text, each element exactly what
        ``start`` would store for that run.

        One encoding of the whole list is 4x faster than one per run; it gives
        the same text, and when the whole fits the size cap every element does.
        On any refusal the elements are encoded one by one, so the error names
        the item (and a batch over the cap whose elements fit still goes through).
        """
        try:
            return self.serializer.dumps(payloads, what=f"inputs of workflow {name!r}")
        except SerializationError:
            pass
        texts = [self.serializer.dumps(p, what=f"input of workflow {name!r} (item {i})")
                 for i, p in enumerate(payloads)]
        return "[" + ",".join(texts) + "]"

    async def served_queues(self, workflow: str) -> list[str]:
        """The queues on which live workers take runs of ``workflow`` (each worker
        registers its workflows' queues), sorted."""
        store = await self.store()
        rows = await store.fetch("served_queues", workflow=workflow)
        return sorted(str(r["queue"]) for r in rows)

    async def _client_queue(self, workflow: str | Callable[..., Any],
                            queue: str | None) -> str | None:
        """The queue a client-only app (no workflows registered) starts ``workflow``
        on when no ``queue=`` is given: the one live workers serve it on. Without
        this a run went to ``default`` while a worker served the name on another
        queue, and waited there forever. Answers are kept 30 s (one query, not
        one per start)."""
        if queue is not None or self.workflows or not isinstance(workflow, str):
            return queue
        now = time.monotonic()
        known = self._served.get(workflow)
        if known is not None and known[1] > now:
            return known[0]
        queues = await self.served_queues(workflow)
        if len(queues) > 1:
            raise ConfigurationError(
                f"live workers serve workflow {workflow!r} on several queues "
                f"({', '.join(queues)}); pass queue= to choose one")
        if not queues:
            return None
        self._served[workflow] = (queues[0], now + 30.0)
        return queues[0]

    def _start_target(self, workflow: str | Callable[..., Any],
                      queue: str | None) -> _StartTarget:
        """What ``start`` and ``start_many`` enqueue: the workflow's name, queue and
        run settings; a name unknown to an app with workflows is refused."""
        if callable(workflow):
            found = [w for w in self.workflows.values() if w.fn is workflow]
            if not found:
                raise ConfigurationError(
                    f"{getattr(workflow, '__name__', workflow)!r} is not registered with "
                    "this app; decorate it with @app.workflow()")
            name = found[0].name
        else:
            name = workflow
        wf = self.workflows.get(name)
        if wf is None and self.workflows:
            raise UnknownWorkflow(self._unknown_workflow_message(name))
        return _StartTarget(
            name=name,
            queue=validate_identifier(queue or (wf.queue if wf else "default"), "queue name"),
            max_attempts=wf.max_attempts if wf else 3,
            max_recoveries=wf.max_recoveries if wf else 5,
        )

    def _child_settings(self, name: str, queue: str | None) -> tuple[str, int, int]:
        """Queue, max_attempts and max_recoveries of a child run of ``name`` (spawned
        by a workflow of this app); ``UnknownWorkflow`` as for ``start``."""
        target = self._start_target(name, queue)
        return target.queue, target.max_attempts, target.max_recoveries

    def _unknown_workflow_message(self, name: str) -> str:
        known = sorted(self.workflows)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if close:
            hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
        else:
            hint = "registered: " + ", ".join(repr(k) for k in known[:10])
            if len(known) > 10:
                hint += f" ... ({len(known)} in all)"
        return (f"no workflow named {name!r} is registered with this app; {hint} "
                "(a client-only App, with no workflows registered, may start any name)")

    def handle(self, run_id: uuid.UUID | str) -> RunHandle:
        """The handle of an existing run, without a round trip."""
        return RunHandle(self, _as_uuid(run_id))

    async def signal(self, run_id: uuid.UUID | str, name: str, payload: Any = None, *,
                     idempotency_key: str | None = None) -> None:
        """Send signal ``name`` to a run; durable even if the run is not waiting yet.

        A payload that cannot be stored exactly raises ``SerializationError``
        (naming the run and the path inside the payload) before any SQL. With
        ``idempotency_key`` the signal is delivered once however often it is
        sent: retry freely when a connection dropped with the commit's outcome
        unknown.
        """
        rid = _as_uuid(run_id)
        store = await self.store()
        try:
            await store.send_signal(rid, name, payload, idempotency_key=idempotency_key)
        except SerializationError as exc:
            raise SerializationError(f"{exc} (signal to run {rid})") from exc

    async def cancel(self, run_id: uuid.UUID | str, *, children: bool = True) -> str:
        """Cancel a run; a running one stops at its next step. Returns its status.

        Its unfinished child runs (and theirs) are cancelled too, in the same
        transaction, unless ``children=False``.
        """
        return await (await self.store()).cancel_run(_as_uuid(run_id), children=children)

    async def retry(self, run_id: uuid.UUID | str) -> str:
        """Requeue a failed, dead or cancelled run; its completed steps are not redone."""
        return await (await self.store()).retry_run(_as_uuid(run_id))

    async def fork(self, run_id: uuid.UUID | str, *, from_step: int) -> RunHandle:
        """Start a new run of the same workflow and input whose journal is a copy
        of this run's entries at positions below ``from_step``: a worker replays
        those (nothing before ``from_step`` runs again) and executes the rest
        with the code it has now. "Re-run from the model call, with the fixed
        prompt."

        ``from_step`` is a journal position (``pgjournal show RUN`` lists them):
        0 copies nothing, last position + 1 copies everything. The old run is not
        changed; it may still be running or suspended (what it committed is
        copied). The new run's ``forked_from`` is the old run's id. Raises
        ``UnknownRun``, or ``ConfigurationError`` for a ``from_step`` outside
        0 to last position + 1.
        """
        if isinstance(from_step, bool) or not isinstance(from_step, int) or from_step < 0:
            raise ConfigurationError(f"from_step must be a journal position (an int >= 0), "
                                     f"not {from_step!r}")
        store = await self.store()
        new_id = await store.fork_run(_as_uuid(run_id), from_step, uuid.uuid4())
        return RunHandle(self, new_id)

    async def set_concurrency_limit(self, pattern: str, max_running: int | None) -> None:
        """At most ``max_running`` runs of a concurrency key run at once, across all
        workers. ``pattern``: a key (``"tenant-42"``) or a prefix ending in ``*``
        (``"tenant-*"``); the exact key wins over a prefix, a longer prefix over a
        shorter. ``None`` removes the limit (keys without one are unlimited)."""
        if not isinstance(pattern, str) or not pattern or pattern == "*" or \
                "*" in pattern[:-1]:
            raise ConfigurationError(
                f"bad concurrency key pattern {pattern!r}: a key, or a prefix ending in * "
                "(e.g. 'tenant-*')")
        if max_running is not None and (not isinstance(max_running, int) or max_running < 1):
            raise ConfigurationError("max_running must be a positive integer (or None to "
                                     "remove the limit)")
        await (await self.store()).set_concurrency_limit(pattern, max_running)

    async def set_rate_limit(self, name: str, capacity: float | None,
                             refill_per_second: float | None = None) -> None:
        """Create or change the rate bucket ``name``: ``capacity`` units, refilled at
        ``refill_per_second`` (e.g. 90,000 tokens per minute: ``capacity=90_000,
        refill_per_second=1_500``). Steps take units with ``rate=(name, units)``.
        ``capacity=None`` removes the bucket."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a rate bucket needs a non-empty name")
        if capacity is not None and (capacity <= 0 or refill_per_second is None
                                     or refill_per_second <= 0):
            raise ConfigurationError("a rate bucket needs capacity > 0 and "
                                     "refill_per_second > 0")
        await (await self.store()).set_rate_limit(name, capacity, refill_per_second)

    async def set_queue(self, name: str, *, concurrency_limit: int | None = None,
                        paused: bool | None = None) -> None:
        """Set a queue's concurrency limit (across all workers) and paused flag."""
        await (await self.store()).set_queue(name, concurrency_limit=concurrency_limit,
                                             paused=paused)

    # -- schedules -----------------------------------------------------------

    async def set_schedule(
        self,
        name: str,
        cron: str,
        workflow: str | Callable[..., Any],
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timezone: str = "UTC",
        catchup: str = "latest",
        catchup_window: float | timedelta = DEFAULT_CATCHUP_WINDOW,
        queue: str | None = None,
        paused: bool = False,
    ) -> bool:
        """Create or replace the schedule ``name`` in the database (no code
        declaration needed; every worker that registered ``workflow`` fires it).
        A new cron or timezone applies from now on. Cron, timezone and the other
        settings are checked before any SQL. Returns True if it was created."""
        from . import schedules as sch

        sch.validate_name(name)
        rule = sch.CronRule(cron, timezone)
        sch.validate_policy(catchup)
        window = sch.validate_window(catchup_window)
        target = self._start_target(workflow, queue)
        store = await self.store()
        return await store.set_schedule(
            name=name, cron=rule.cron.strip(), workflow=target.name,
            args=self.serializer.dumps(list(args), what=f"args of schedule {name!r}"),
            kwargs=self.serializer.dumps(dict(kwargs or {}), what=f"kwargs of schedule {name!r}"),
            timezone=timezone, queue=target.queue, catchup=catchup, catchup_window=window,
            paused=paused, max_attempts=target.max_attempts,
            max_recoveries=target.max_recoveries)

    async def pause_schedule(self, name: str) -> None:
        """Stop firing ``name``; slots while paused are never caught up."""
        await (await self.store()).schedule_action("pause", name)

    async def resume_schedule(self, name: str) -> None:
        """Fire ``name`` again, from its next slot after now."""
        await (await self.store()).schedule_action("resume", name)

    async def delete_schedule(self, name: str) -> None:
        """Remove ``name`` (its runs stay). A schedule still declared in code comes
        back when a worker declaring it starts."""
        await (await self.store()).schedule_action("delete", name)

    async def trigger_schedule(self, name: str) -> RunHandle:
        """Start one run of the schedule's workflow now, outside its slots."""
        return RunHandle(self, await (await self.store()).trigger_schedule(name))

    async def backfill_schedule(self, name: str, start: datetime, end: datetime) -> int:
        """Start the runs of the slots of ``name`` in ``[start, end]`` (aware
        datetimes) that have none yet; returns how many started."""
        from . import schedules as sch

        store = await self.store()
        row = await store.get_schedule(name)
        if row is None:
            raise UnknownSchedule(f"schedule {name!r} does not exist")
        slots = sch.backfill_slots(row["cron"], row["timezone"], start, end)
        started = await store.backfill_schedule(name, start, end, slots)
        return int(started or 0)

    async def get_schedule(self, name: str) -> dict[str, Any] | None:
        """The ``schedule_status`` row of ``name``, or None."""
        return await (await self.store()).get_schedule(name)

    async def list_schedules(self) -> list[dict[str, Any]]:
        """Every schedule's ``schedule_status`` row."""
        return await (await self.store()).list_schedules()

    # -- waiting for results --------------------------------------------------

    def _on_done(self, payload: str) -> None:
        schema, _, run = payload.partition(":")
        if schema != self.schema:
            return
        with contextlib.suppress(ValueError):
            for fut in self._waiters.get(uuid.UUID(run), []):
                if not fut.done():
                    fut.set_result(None)

    def _wake_all_waiters(self) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    async def _wait_result(self, run_id: uuid.UUID) -> Any:
        store = await self.store()
        listen_dsn = await asyncio.to_thread(lambda: self.listen_dsn)
        if self._done_listener is None and listen_dsn is not None:
            self._done_listener = Listener(listen_dsn, "pgjournal_done", self._on_done,
                                           self._wake_all_waiters)
            await self._done_listener.start()
        # Without LISTEN the poll is all there is: at poll_interval, not 5x it.
        recheck = self.poll_interval * (5 if listen_dsn is not None else 1)
        loop = asyncio.get_running_loop()
        waiters = self._waiters.setdefault(run_id, set())
        fut: asyncio.Future[None] | None = None
        backoff = 0.1
        try:
            while True:
                fut = loop.create_future()
                waiters.add(fut)
                try:
                    row = await store.request_result(run_id)
                except DatabaseUnavailable as exc:
                    # Waiting outlives a database restart; the caller's timeout bounds it.
                    log.warning("waiting for run %s: %s; retrying", run_id, exc)
                    waiters.discard(fut)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                if row is None:
                    raise UnknownRun(f"run {run_id} does not exist")
                status = row["status"]
                if status == "completed":
                    return self.serializer.loads(row["output"])
                if status == "cancelled":
                    raise Cancelled(f"run {run_id} was cancelled")
                if status in ("failed", "dead"):
                    raise RunFailed(str(run_id), row["error"], status)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), recheck)
                waiters.discard(fut)
        finally:
            if fut is not None:
                waiters.discard(fut)
            if not waiters:
                self._waiters.pop(run_id, None)
