"""The async store: every read and write of runs, journal entries, chunks,
signals and events, as calls of the named queries in ``sql/queries.sql``.

The store knows nothing of workflows; the runtime (``app``, ``run``,
``worker``) decides what to write and the store writes it in one round trip.
Database errors that a user can cause come out as pgjournal errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import errors as pgerr
from psycopg_pool import AsyncConnectionPool

from ._sql import Queries, validate_identifier
from .connect import mask_dsn, open_pool, resolve_dsn
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidState,
    SchemaNotReady,
    TransactionConflict,
    UnknownRun,
    UnknownSchedule,
)
from .migrations import schema_version_check
from .serializer import Serializer

Row = dict[str, Any]
Pool = AsyncConnectionPool[psycopg.AsyncConnection[Row]]

log = logging.getLogger("pgjournal.store")

#: SQLSTATEs of a transaction that lost a conflict with another one: a deadlock
#: (40P01) or a serialization failure (40001). The server rolled the whole
#: transaction back and is up; nothing it wrote is left.
CONFLICT_STATES = frozenset({"40P01", "40001"})

#: How many times the store sends a statement that lost such a conflict (the
#: first try included) before it raises ``TransactionConflict``.
CONFLICT_TRIES = 6


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadlock or a serialization failure (see ``CONFLICT_STATES``)."""
    return getattr(exc, "sqlstate", None) in CONFLICT_STATES


def conflict_pause(attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1`` of a statement that lost a
    conflict: uniform between 0 and 20 ms x 2^(attempt-1), at most 1 s ("full
    jitter"). Two transactions that deadlocked each other, sent again at once,
    tend to meet again; a random pause lets one of them finish first."""
    return random.uniform(0.0, min(1.0, 0.02 * 2 ** max(attempt - 1, 0)))


@dataclass(frozen=True, slots=True)
class Claim:
    """A run a worker just claimed. Its journal, if it has one, is loaded by the
    run itself in bounded pages (``journal_page``), never inside the claim."""

    run_id: UUID
    workflow: str
    queue: str
    input: Any
    attempt: int
    max_attempts: int
    epoch: int
    recoveries: int
    db_now: datetime
    has_journal: bool
    interruptions: int = 0


#: Queries that may run twice without harm (reads, and idempotent flag/lease updates).
_RETRYABLE = frozenset({
    "schema_version", "request_result", "heartbeat", "get_run", "get_steps", "get_chunks",
    "get_signals", "get_events", "list_runs", "journal_outline", "journal_page", "chunk_page",
    "schedules_next_due", "get_schedule", "list_schedules",
})


def translate_error(exc: psycopg.Error, schema: str) -> Exception:
    state = getattr(exc, "sqlstate", None)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if state == "PJ404":
        return UnknownRun(msg)
    if state == "PJ409":
        return InvalidState(msg)
    if state in CONFLICT_STATES:
        # Before the OperationalError test below: psycopg's DeadlockDetected
        # and SerializationFailure are OperationalErrors, but the database is
        # up and nothing was written.
        what = "a deadlock" if state == "40P01" else "a serialization failure"
        return TransactionConflict(
            f"the statement lost {what} with another transaction ({msg}); nothing was "
            "written and trying again is safe")
    if isinstance(exc, pgerr.UndefinedTable | pgerr.UndefinedFunction | pgerr.InvalidSchemaName):
        return SchemaNotReady(
            f"schema {schema!r} is missing or incomplete ({msg}); run "
            f"`pgjournal migrate --schema {schema}`"
        )
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseUnavailable(f"database connection failed: {msg}")
    return exc


class Store:
    """Async access to one pgjournal schema through a connection pool.

    Each named query is one statement on an autocommit connection: one whole
    transaction. One that loses a deadlock or a serialization failure
    (``CONFLICT_STATES``) was rolled back entirely, so it is sent again, up to
    ``conflict_tries`` times with a random pause (``conflict_pause``): its
    caller never sees it, and it is never reported as ``DatabaseUnavailable``.
    Past that it raises ``TransactionConflict``.
    """

    #: Tries of a statement that keeps losing conflicts (see the class docstring).
    conflict_tries: int = CONFLICT_TRIES

    def __init__(self, pool: Pool, *, schema: str = "pgjournal",
                 serializer: Serializer | None = None) -> None:
        self.pool = pool
        self.schema = validate_identifier(schema)
        self.q = Queries(schema)
        self.serializer = serializer or Serializer()

    @classmethod
    async def open(
        cls,
        dsn: str | None = None,
        *,
        schema: str = "pgjournal",
        min_size: int = 1,
        max_size: int = 10,
        serializer: Serializer | None = None,
        check: bool = True,
        pooler: str | None = None,
    ) -> Store:
        """Open a pool on ``dsn`` (see ``resolve_dsn``) and check the schema version."""
        validate_identifier(schema)
        dsn = resolve_dsn(dsn)
        pool = await open_pool(dsn, min_size=min_size, max_size=max_size,
                               name=f"pgjournal:{mask_dsn(dsn)}", pooler=pooler)
        store = cls(pool, schema=schema, serializer=serializer)
        if check:
            try:
                await store.check_schema()
            except BaseException:
                await pool.close()
                raise
        return store

    async def close(self) -> None:
        await self.pool.close()

    # -- plumbing ------------------------------------------------------------

    async def fetch(self, query: str, /, **params: Any) -> list[Row]:
        """Run the named query and return all rows, translating user-caused errors.

        A query that is safe to repeat is retried once on a broken connection
        (after a server restart the pool may still hold dead connections).
        Any query is sent again after a deadlock or a serialization failure:
        on the pool's autocommit connections it was a whole transaction, and
        the server rolled all of it back (see the class docstring).
        """
        tries = 2 if query in _RETRYABLE else 1
        broken = conflicts = 0
        while True:
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(self.q[query], params)
                    return await cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                if is_conflict(exc):
                    conflicts += 1
                    if conflicts < self.conflict_tries:
                        await self._pause_after_conflict(query, exc, conflicts)
                        continue
                elif isinstance(exc, psycopg.OperationalError):
                    broken += 1
                    if broken < tries:
                        continue
                raise translate_error(exc, self.schema) from exc

    async def fetch_on(self, conn: psycopg.AsyncConnection[Row], query: str, /,
                       **params: Any) -> list[Row]:
        """Run the named query on ``conn`` (not the pool), translating errors.

        On an autocommit connection outside a transaction block the statement
        is a whole transaction, and is sent again after a deadlock or a
        serialization failure, as in ``fetch``. Inside a caller's transaction
        it is not (the caller's transaction is aborted): the caller gets
        ``TransactionConflict`` and decides.
        """
        whole = conn.autocommit and \
            conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conflicts = 0
        while True:
            try:
                cur = await conn.execute(self.q[query], params)
                return await cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                if whole and is_conflict(exc):
                    conflicts += 1
                    if conflicts < self.conflict_tries:
                        await self._pause_after_conflict(query, exc, conflicts)
                        continue
                raise translate_error(exc, self.schema) from exc

    async def _pause_after_conflict(self, query: str, exc: psycopg.Error, attempt: int) -> None:
        """Say (at INFO: it is no fault) that ``query`` lost a conflict and
        will be sent again, then wait a random while (``conflict_pause``)."""
        pause = conflict_pause(attempt)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.info("%s lost a conflict with another transaction (%s, SQLSTATE %s); "
                 "retry %d of %d in %.0f ms", query, first,
                 getattr(exc, "sqlstate", None), attempt, self.conflict_tries - 1,
                 pause * 1000)
        await asyncio.sleep(pause)

    async def fetchone(self, query: str, /, **params: Any) -> Row | None:
        rows = await self.fetch(query, **params)
        return rows[0] if rows else None

    async def check_schema(self) -> None:
        try:
            row = await self.fetchone("schema_version")
        except SchemaNotReady:
            row = None
        schema_version_check(self.schema, row)

    # -- runs ----------------------------------------------------------------

    async def start_run(
        self,
        run_id: UUID,
        workflow: str,
        queue: str,
        input_json: str,
        *,
        priority: int = 0,
        delay: float = 0.0,
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        max_recoveries: int = 5,
        source: str = "native",
        meta: dict[str, Any] | None = None,
        concurrency_key: str | None = None,
    ) -> tuple[UUID, bool]:
        row = await self.fetchone(
            "start_run", id=run_id, workflow=workflow, queue=queue, input=input_json,
            priority=priority, delay=delay, idempotency_key=idempotency_key,
            max_attempts=max_attempts, max_recoveries=max_recoveries, source=source,
            meta=json.dumps(meta or {}), concurrency_key=concurrency_key,
        )
        assert row is not None
        return row["run_id"], row["created"]

    async def start_runs(
        self,
        run_ids: Sequence[UUID],
        workflow: str,
        queue: str,
        inputs: str | Sequence[str],
        *,
        priority: int = 0,
        delay: float = 0.0,
        idempotency_keys: Sequence[str | None] | None = None,
        max_attempts: int = 3,
        max_recoveries: int = 5,
        source: str = "native",
        meta: dict[str, Any] | None = None,
        concurrency_keys: Sequence[str | None] | None = None,
    ) -> list[tuple[UUID, bool]]:
        """Enqueue ``len(run_ids)`` runs in one statement (SQL ``start_runs``).

        ``inputs``: the input of each run as JSON text (as ``Serializer.dumps``
        makes it), or all of them as the text of one JSON array. Returns (run
        id, created) per run, in input order: an element whose idempotency key
        already named a run (or an earlier element of the batch) gets that
        run's id and ``created=False``.

        The arrays travel as one value each (the ids as 16-byte chunks of one
        bytea, the inputs and keys as one JSON array) and the query unpacks
        them: psycopg adapts a Python list element by element, which cost more
        than the whole INSERT (about 9 ms per 1,000 short strings).
        """
        if idempotency_keys is not None and len(idempotency_keys) != len(run_ids):
            raise ValueError(f"start_runs: {len(idempotency_keys)} idempotency keys for "
                             f"{len(run_ids)} runs")
        if not isinstance(inputs, str):
            if len(inputs) != len(run_ids):
                raise ValueError(f"start_runs: {len(inputs)} inputs for {len(run_ids)} runs")
            inputs = "[" + ",".join(inputs) + "]"
        if not run_ids:
            return []
        rows = await self.fetch(
            "start_runs", ids=b"".join(r.bytes for r in run_ids), workflow=workflow,
            queue=queue, inputs=inputs, priority=priority, delay=delay,
            idempotency_keys=None if idempotency_keys is None
            else json.dumps(list(idempotency_keys)),
            max_attempts=max_attempts, max_recoveries=max_recoveries, source=source,
            meta=json.dumps(meta or {}),
            concurrency_keys=None if concurrency_keys is None
            else json.dumps(list(concurrency_keys)),
        )
        # Only the elements that did not create their own run come back.
        started = [(run_id, True) for run_id in run_ids]
        for row in rows:
            started[row["item"]] = (row["run_id"], False)
        return started

    async def claim(self, worker: UUID, queues: Sequence[str], limit: int,
                    lease: float, *, hungry: bool = False,
                    workflows: Sequence[str] | None = None, expired: bool = True,
                    conn: psycopg.AsyncConnection[Row] | None = None) -> list[Claim]:
        """Claim up to ``limit`` runs. ``hungry=True``: the worker is about to
        sleep on LISTEN, so it is flagged for wake-ups (see ``go_hungry``).
        ``workflows``: claim only runs of these (None: any workflow).
        ``expired``: also look for running runs whose lease expired (a scan of
        the queue's running runs; see migration 0014).
        ``conn``: claim on this (autocommit) connection instead of the pool."""
        params = {"worker": worker, "queues": list(queues), "limit": limit, "lease": lease,
                  "workflows": None if workflows is None else list(workflows),
                  "expired": expired}
        query = "go_hungry" if hungry else "claim_runs"
        if conn is not None:
            rows = await self.fetch_on(conn, query, **params)
        else:
            rows = await self.fetch(query, **params)
        return [
            Claim(r["id"], r["workflow"], r["queue"], r["input"], r["attempt"],
                  r["max_attempts"], r["lease_epoch"], r["recoveries"], r["db_now"],
                  r["has_journal"], r["interruptions"])
            for r in rows
        ]

    async def journal_outline(self, run: UUID) -> Row:
        """Delivery turns (sorted), last position, entry count and bytes of a journal,
        and the positions and names of its patch markers (``patch_positions``,
        ``patch_names``)."""
        row = await self.fetchone("journal_outline", run=run)
        assert row is not None
        return row

    async def journal_page(self, run: UUID, after: int, *, limit: int = 500,
                           max_bytes: int = 8 * 1024 * 1024) -> list[Row]:
        """Journal entries after position ``after``: at most ``limit`` rows and,
        past the first, about ``max_bytes`` of values."""
        return await self.fetch("journal_page", run=run, after=after, limit=limit,
                                max_bytes=max_bytes)

    async def chunk_page(self, run: UUID, position: int, after: int, *, limit: int = 2000,
                         max_bytes: int = 8 * 1024 * 1024) -> list[Row]:
        """Chunks of the stream entry at ``position`` after chunk ``after``, bounded."""
        return await self.fetch("chunk_page", run=run, position=position, after=after,
                                limit=limit, max_bytes=max_bytes)

    async def note_run_event(self, run: UUID, epoch: int, detail: dict[str, Any]) -> None:
        await self.fetch("note_run_event", run=run, epoch=epoch, detail=json.dumps(detail))

    async def journal_step(self, **params: Any) -> str | None:
        """Write one journal entry (see ``journal_step`` in SQL); None or the lost status."""
        params.setdefault("tries", 1)
        params.setdefault("started_at", None)
        params.setdefault("chunks", None)
        params.setdefault("chunk_start", 0)
        params.setdefault("turn", None)
        params.setdefault("fingerprint", None)
        params.setdefault("chunk_turns", None)
        params.setdefault("calls_before", None)
        params.setdefault("chunk_calls", None)
        row = await self.fetchone("journal_step", **params)
        return row["lost"] if row else "deleted"

    async def append_chunks(self, **params: Any) -> str | None:
        params.setdefault("chunk_turns", None)
        params.setdefault("chunk_calls", None)
        row = await self.fetchone("append_chunks", **params)
        return row["lost"] if row else "deleted"

    async def wait_signal(self, **params: Any) -> tuple[str, Any]:
        params.setdefault("turn", None)
        params.setdefault("calls_before", None)
        row = await self.fetchone("wait_signal", **params)
        assert row is not None
        return row["outcome"], row["payload"]

    async def sleep_until(self, **params: Any) -> tuple[str, datetime | None]:
        params.setdefault("turn", None)
        params.setdefault("calls_before", None)
        row = await self.fetchone("sleep_until", **params)
        assert row is not None
        return row["outcome"], row["wake_at"]

    async def spawn_runs(self, **params: Any) -> str | None:
        """Create child runs and journal their spawn (see ``spawn_runs`` in SQL);
        None, or the parent's status when its caller lost it."""
        row = await self.fetchone("spawn_runs", **params)
        return row["lost"] if row else "deleted"

    async def wait_children(self, **params: Any) -> tuple[str, Any]:
        """Journal the children's outcomes if the wait is over, else suspend the
        parent: ('ready', outcomes) | ('suspended', None) | ('again', None) |
        ('lost', status)."""
        row = await self.fetchone("wait_children", **params)
        assert row is not None
        return row["outcome"], row["results"]

    async def take_units(self, **params: Any) -> tuple[str, datetime]:
        """Take units from a rate bucket for a journal entry (see ``take_units`` in SQL):
        ('taken' | 'lost:<status>', the time the units are ready). ``again=True``
        takes them again for the entry already journaled (a new call of its step)."""
        params.setdefault("turn", None)
        params.setdefault("calls_before", None)
        params.setdefault("again", False)
        row = await self.fetchone("take_units", **params)
        assert row is not None
        return row["outcome"], row["ready_at"]

    async def set_concurrency_limit(self, pattern: str, max_running: int | None) -> None:
        await self.fetch("set_concurrency_limit", pattern=pattern, max_running=max_running)

    async def set_rate_limit(self, name: str, capacity: float | None,
                             refill_per_second: float | None) -> None:
        await self.fetch("set_rate_limit", name=name, capacity=capacity,
                         refill=refill_per_second)

    async def complete_runs(self, items: Sequence[tuple[UUID, int, str]]) -> set[UUID]:
        rows = await self.fetch(
            "complete_runs",
            ids=[i[0] for i in items], epochs=[i[1] for i in items],
            outputs=[i[2] for i in items],
        )
        return {r["run_id"] for r in rows}

    async def fail_run(self, run: UUID, epoch: int, error: dict[str, Any], *,
                       delay: float, terminal: bool) -> str:
        row = await self.fetchone("fail_run", run=run, epoch=epoch, error=json.dumps(error),
                                  delay=delay, terminal=terminal)
        assert row is not None
        return str(row["status"])

    async def release_runs(self, items: Sequence[tuple[UUID, int]]) -> int:
        row = await self.fetchone("release_runs", ids=[i[0] for i in items],
                                  epochs=[i[1] for i in items])
        return int(row["released"]) if row else 0

    async def heartbeat(self, worker: UUID, items: Sequence[tuple[UUID, int]],
                        lease: float, *, conn: psycopg.AsyncConnection[Row] | None = None,
                        ) -> list[tuple[UUID, str, int | None]]:
        """Extend leases; return (run, status, epoch now) of the runs not renewed:
        no longer running here, or ``'busy'`` (row locked elsewhere, not renewed
        this time). ``conn``: a dedicated connection instead of the pool."""
        params = {"worker": worker, "ids": [i[0] for i in items],
                  "epochs": [i[1] for i in items], "lease": lease}
        if conn is not None:
            rows = await self.fetch_on(conn, "heartbeat", **params)
        else:
            rows = await self.fetch("heartbeat", **params)
        return [(r["lost_run_id"], r["status"], r["lease_epoch"]) for r in rows]

    async def register_worker(self, worker: UUID, host: str, pid: int,
                              queues: Sequence[str], concurrency: int, *,
                              lease: float | None = None,
                              workflows: Sequence[str] | None = None,
                              workflow_queues: dict[str, str] | None = None) -> None:
        await self.fetch("register_worker", id=worker, host=host, pid=pid,
                         queues=list(queues), concurrency=concurrency, lease=lease,
                         workflows=None if workflows is None else list(workflows),
                         workflow_queues=None if workflow_queues is None
                         else json.dumps(workflow_queues))

    async def stop_worker(self, worker: UUID) -> None:
        await self.fetch("stop_worker", id=worker)

    async def send_signal(self, run: UUID, name: str, payload: Any, *,
                          idempotency_key: str | None = None) -> int:
        """Send a signal; its id. With ``idempotency_key``, sending again (a retry
        after a dropped connection) delivers nothing more and returns the same id."""
        text = self.serializer.dumps(payload, what=f"payload of signal {name!r}")
        row = await self.fetchone("send_signal", run=run, name=name, payload=text,
                                  idempotency_key=idempotency_key)
        assert row is not None
        return int(row["signal_id"])

    async def cancel_run(self, run: UUID, *, children: bool = True) -> str:
        row = await self.fetchone("cancel_run", run=run, children=children)
        assert row is not None
        return str(row["status"])

    async def retry_run(self, run: UUID) -> str:
        row = await self.fetchone("retry_run", run=run)
        assert row is not None
        return str(row["status"])

    async def fork_run(self, run: UUID, from_step: int, new_run: UUID) -> UUID:
        """Copy ``run``'s journal below position ``from_step`` into a new queued run
        ``new_run`` of the same workflow and input (see ``fork_run`` in SQL)."""
        try:
            row = await self.fetchone("fork_run", run=run, from_step=from_step, new=new_run)
        except pgerr.InvalidParameterValue as exc:
            # from_step outside the journal: a bad argument, said in one line.
            raise ConfigurationError(str(exc).splitlines()[0]) from None
        assert row is not None
        return UUID(str(row["run_id"]))

    async def request_result(self, run: UUID) -> Row | None:
        return await self.fetchone("request_result", run=run)

    async def set_queue(self, name: str, *, concurrency_limit: int | None = None,
                        paused: bool | None = None) -> None:
        validate_identifier(name, "queue name")
        await self.fetch("set_queue", name=name, limit=concurrency_limit, paused=paused)

    # -- reads ---------------------------------------------------------------

    async def get_run(self, run: UUID) -> Row | None:
        return await self.fetchone("get_run", run=run)

    async def get_steps(self, run: UUID) -> list[Row]:
        return await self.fetch("get_steps", run=run)

    async def get_chunks(self, run: UUID) -> list[Row]:
        return await self.fetch("get_chunks", run=run)

    async def get_signals(self, run: UUID) -> list[Row]:
        return await self.fetch("get_signals", run=run)

    async def get_events(self, run: UUID) -> list[Row]:
        return await self.fetch("get_events", run=run)

    async def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                        queue: str | None = None, since: datetime | None = None,
                        limit: int = 50, parent: UUID | None = None) -> list[Row]:
        """The newest runs matching every filter given (``parent``: its children)."""
        return await self.fetch("list_runs", status=status, workflow=workflow, queue=queue,
                                since=since, limit=limit, parent=parent)

    # -- schedules (see pgjournal.schedules) ---------------------------------

    async def _schedule_call(self, query: str, /, **params: Any) -> list[Row]:
        """A schedule function call; an unknown name is ``UnknownSchedule`` and a
        value the database refuses is a one-line ``ConfigurationError``."""
        try:
            return await self.fetch(query, **params)
        except psycopg.Error as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if getattr(exc, "sqlstate", None) == "PJS04":
                raise UnknownSchedule(first) from None
            if isinstance(exc, pgerr.InvalidParameterValue | pgerr.CheckViolation):
                raise ConfigurationError(first) from None
            raise

    async def declare_schedules(self, defs: Sequence[dict[str, Any]]) -> None:
        await self._schedule_call("declare_schedules", defs=json.dumps(list(defs)))

    async def run_schedule_round(
        self, workflows: Sequence[str], declared: Sequence[str],
        plan: Any, *, limit: int = 50,
    ) -> int:
        """One scheduler round in one transaction: claim due schedules (skipping
        rows other rounds hold), ``plan(row)`` each in Python, start the runs and
        advance the rows. Returns the number of runs started."""
        conflicts = 0
        while True:
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    rows = await self.fetch_on(conn, "claim_schedules",
                                               workflows=list(workflows),
                                               declared=list(declared), limit=limit)
                    if not rows:
                        return 0
                    items = [plan(row) for row in rows]
                    out = await self.fetch_on(conn, "fire_schedules", items=json.dumps(items))
                    return int(out[0]["started"]) if out else 0
            except (TransactionConflict, psycopg.Error) as exc:
                # A conflict (in a statement, or at commit) rolled the round's
                # transaction back whole; the plan is computed from the rows it
                # claims, so the round runs again.
                cause = exc.__cause__ if isinstance(exc, TransactionConflict) else exc
                if isinstance(cause, psycopg.Error) and is_conflict(cause):
                    conflicts += 1
                    if conflicts < self.conflict_tries:
                        await self._pause_after_conflict("schedule round", cause, conflicts)
                        continue
                if isinstance(exc, psycopg.OperationalError):
                    raise translate_error(exc, self.schema) from exc
                raise

    async def schedules_next_due(self, workflows: Sequence[str], declared: Sequence[str],
                                 ) -> tuple[datetime | None, datetime]:
        row = await self.fetchone("schedules_next_due", workflows=list(workflows),
                                  declared=list(declared))
        assert row is not None
        return row["next_due"], row["db_now"]

    async def set_schedule(self, **params: Any) -> bool:
        rows = await self._schedule_call("set_schedule", **params)
        return bool(rows[0]["created"])

    async def schedule_action(self, action: str, name: str) -> None:
        """``pause``, ``resume`` or ``delete`` the schedule ``name``."""
        await self._schedule_call(f"{action}_schedule", name=name)

    async def trigger_schedule(self, name: str, idempotency_key: str | None = None) -> UUID:
        rows = await self._schedule_call("trigger_schedule", name=name,
                                         idempotency_key=idempotency_key)
        return UUID(str(rows[0]["run_id"]))

    async def backfill_schedule(self, name: str, start: datetime, end: datetime,
                                slots: Sequence[datetime] | None) -> int | None:
        rows = await self._schedule_call("backfill_schedule", name=name, start=start, end=end,
                                         slots=None if slots is None else list(slots))
        started = rows[0]["started"]
        return None if started is None else int(started)

    async def get_schedule(self, name: str) -> Row | None:
        rows = await self.fetch("get_schedule", name=name)
        return rows[0] if rows else None

    async def list_schedules(self) -> list[Row]:
        return await self.fetch("list_schedules")
