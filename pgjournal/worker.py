"""``Worker``: claims runs, executes them, heartbeats their leases.

One loop claims in batches (one round trip per batch) whenever it has free
slots and something may be claimable: woken by NOTIFY, by a finished run, by
a local timer for a short sleep, or by the poll interval as the safety net.
Completions are batched too: while one ``complete_runs`` call is in flight,
the next ones queue up and go together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from ._exceptions import MAX_MESSAGE_CHARS, sanitize
from ._sql import validate_identifier
from .app import App, Workflow
from .connect import connect_async
from .errors import (
    DatabaseUnavailable,
    SerializationError,
    TerminalError,
    TransactionConflict,
)
from .lease import Lease
from .listener import Listener
from .metrics import DEFAULT_HOST, WorkerMetrics, bound_address, serve_metrics
from .run import Abandoned, Run, Suspended, describe_exception
from .schedules import WAKE_TOPIC, Scheduler
from .store import Claim, Store, conflict_pause
from .tracing import attempt as traced_attempt
from .tracing import claim as traced_claim

log = logging.getLogger("pgjournal.worker")


def _unwinding(group: BaseExceptionGroup[BaseException]) -> Suspended | Abandoned | None:
    """The suspension or abandonment inside an exception group, if any."""
    for exc in group.exceptions:
        if isinstance(exc, Suspended | Abandoned):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _unwinding(exc)
            if inner is not None:
                return inner
    return None


class _Completer:
    """Group commit for run completions: one statement per batch.

    One bad item must not fail the others: if a batch statement fails with
    anything but a lost database, its items are retried one by one, so only
    the item the database refuses gets the error (its run then fails
    terminally) while the others complete.

    A batch that lost a deadlock or serialization conflict even after the
    store's own retries (``TransactionConflict``: rolled back, nothing
    written, the database is up) is sent again after a random pause, up to
    ``conflict_rounds`` times: giving its runs up made each wait out its lease
    and count a crash recovery (issue 20, row 7).
    """

    #: Sends of one batch that keeps losing conflicts, the first included.
    conflict_rounds = 4

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[uuid.UUID, int, str, asyncio.Future[bool]]] = []
        self._task: asyncio.Task[None] | None = None

    async def complete(self, run_id: uuid.UUID, epoch: int, output: str) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((run_id, epoch, output, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        conflicts = 0
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                done = await self._store.complete_runs([(r, e, o) for r, e, o, _ in batch])
            except DatabaseUnavailable as exc:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            except TransactionConflict as exc:
                conflicts += 1
                if conflicts < self.conflict_rounds:
                    pause = conflict_pause(conflicts + self._store.conflict_tries)
                    log.info("a batch of %d completions lost a conflict with another "
                             "transaction (%s); sending it again in %.0f ms", len(batch),
                             exc, pause * 1000)
                    await asyncio.sleep(pause)
                    self._pending = batch + self._pending
                    continue
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                conflicts = 0
                continue
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0][3].done():
                        batch[0][3].set_exception(exc)
                    continue
                log.warning("a batch of %d completions failed (%s: %s); completing them one "
                            "by one", len(batch), type(exc).__name__, exc)
                await self._one_by_one(batch)
                continue
            conflicts = 0
            for run_id, _, _, fut in batch:
                if not fut.done():
                    fut.set_result(run_id in done)

    async def _one_by_one(self, batch: list[tuple[uuid.UUID, int, str,
                                                  asyncio.Future[bool]]]) -> None:
        lost: DatabaseUnavailable | None = None
        for run_id, epoch, output, fut in batch:
            try:
                if lost is not None:
                    raise lost
                done = await self._store.complete_runs([(run_id, epoch, output)])
            except Exception as exc:
                if isinstance(exc, DatabaseUnavailable):
                    lost = exc
                if not fut.done():
                    fut.set_exception(exc)
                continue
            if not fut.done():
                fut.set_result(run_id in done)


#: The shortest time a lease confirmation may take, even for a lease that is
#: already past its local deadline (the database still decides).
CONFIRM_FLOOR = 0.25


class Worker:
    """Serves ``queues`` (default: the queues of the app's workflows).

    ``concurrency`` runs at once; ``lease`` seconds without a heartbeat before
    another worker may take a run over (heartbeats every ``lease / 3``).
    ``poll_interval``: how often an idle worker looks for work without a
    NOTIFY, and how often any worker looks for runs whose lease expired (a run
    whose worker died is taken over within lease + poll interval).
    ``grace_period``: on stop, how long in-flight runs may finish before their
    leases are released for others. ``schedules``: also fire the due schedules
    of the workflows it registered (see ``pgjournal.schedules``).
    ``metrics_port``: serve this worker's own counters (``self.metrics``) in
    the Prometheus text format on ``metrics_host:metrics_port`` (0: a free port,
    see ``metrics_address``) while it runs.
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        lease: float = 30.0,
        *,
        poll_interval: float | None = None,
        grace_period: float = 30.0,
        heartbeat_interval: float | None = None,
        schedules: bool = True,
        metrics_port: int | None = None,
        metrics_host: str = DEFAULT_HOST,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.app = app
        if queues is None:
            queues = sorted({w.queue for w in app.workflows.values()}) or ["default"]
        self.queues = [validate_identifier(q, "queue name") for q in queues]
        self.concurrency = concurrency
        self.lease = float(lease)
        self.poll_interval = app.poll_interval if poll_interval is None else poll_interval
        self.grace_period = grace_period
        self.heartbeat_interval = heartbeat_interval or self.lease / 3
        self.id = uuid.uuid4()
        self._inflight: dict[uuid.UUID, tuple[asyncio.Task[None], int]] = {}
        self._leases: dict[uuid.UUID, Lease] = {}
        self._lost_logged: set[tuple[uuid.UUID, int]] = set()
        self._hb_conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._hb_failing = False
        self._stuck_beats: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        #: Set once the worker is registered (its workflows' queues are known to
        #: clients: ``App.start`` without ``queue=``) and about to claim.
        self.serving = asyncio.Event()
        self._store: Store | None = None
        self._completer: _Completer | None = None
        self._hungry = False
        # Held while a claim is in flight (the claim loop's or a wake-up's), so
        # two claims never count the same free slots.
        self._claiming = asyncio.Lock()
        # A wake-up for our queues heard by a listener that claims itself.
        self._acting = False
        # When a claim of ours last looked for expired leases (monotonic).
        self._expired_looked_at = -math.inf
        self.schedules = schedules
        self._scheduler: Scheduler | None = None
        self.metrics = WorkerMetrics(concurrency, lambda: len(self._inflight))
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        #: (host, port) of the metrics endpoint while it is served.
        self.metrics_address: tuple[str, int] | None = None
        if schedules:
            for spec in app.schedules.values():
                spec.workflow_name(app)  # a schedule on an unregistered function: say so now

    @property
    def workflows(self) -> list[str]:
        """The workflows this worker claims runs of: those registered with its app.
        During a rolling deploy, old workers leave new workflows' runs queued."""
        return sorted(self.app.workflows)

    # -- control -------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new claims; in-flight runs get the grace period."""
        self._stopping.set()
        self._wake.set()

    def _on_wake(self, payload: str) -> None:
        schema, _, queue = payload.partition(":")
        if schema == self.app.schema and queue in self.queues:
            if not self._acting:  # else _act_on_wake claims right away
                self._wake.set()
        elif schema == self.app.schema and queue == WAKE_TOPIC and self._scheduler:
            self._scheduler.wake()

    def _ours(self, payload: str) -> bool:
        schema, _, queue = payload.partition(":")
        return schema == self.app.schema and queue in self.queues

    async def _act_on_wake(self, conn: psycopg.AsyncConnection[Any],
                           payloads: Sequence[str]) -> None:
        """A run became claimable on one of our queues: claim on the listening
        connection at once (it is open and idle), instead of waking the claim
        loop, which would first check a connection out of the pool.

        If the claim loop is claiming already, or nothing is free, it is left
        to the claim loop. After a claim that got some runs but not all, the
        claim loop claims again (a key's runs may have been cut to its room,
        and other runs be claimable behind them) and goes hungry if short.
        """
        if not any(self._ours(p) for p in payloads):
            return
        store = self._store
        free = self.concurrency - len(self._inflight)
        if (store is None or self._stopping.is_set() or free <= 0
                or self._claiming.locked()):
            self._wake.set()
            return
        async with self._claiming:
            free = self.concurrency - len(self._inflight)
            if free <= 0 or self._stopping.is_set():
                return
            sent = time.monotonic()
            looks = self._expired_turn()
            try:
                claims = await traced_claim(store, store.claim(
                    self.id, self.queues, free, self.lease, workflows=self.workflows,
                    expired=looks, conn=conn))
            except TransactionConflict:
                # Rolled back whole, not an outage: the claim loop claims again.
                self._wake.set()
                return
            except BaseException:
                self._wake.set()  # the claim loop tries, on a pool connection
                raise
            self._after_look(looks, claims)
            self.metrics.claim_latency(time.monotonic() - sent)
            got = self._spawn_all(claims, sent)
        if got == free:
            self._hungry = False  # the claim cleared the flag in the database too
        elif got > 0:
            self._wake.set()

    def _expired_turn(self) -> bool:
        """Whether the claim about to be sent also looks for runs whose lease
        expired. That part reads every running run of the queues (a lease's
        expiry is in no index, so heartbeats stay HOT updates), which made each
        claim cost 1.6x with 2,000 running runs and 3.9x with 10,000; expired
        leases are rare and no NOTIFY announces them, so one claim per poll
        interval looks (and the claim after a look that took a run over, see
        ``_after_look``)."""
        now = time.monotonic()
        if now - self._expired_looked_at < self.poll_interval:
            return False
        self._expired_looked_at = now
        return True

    def _after_look(self, looked: bool, claims: list[Claim]) -> None:
        """After a look for expired leases that took a run over, the next claim
        looks again, not one poll interval later: a dead worker leaves up to its
        concurrency of runs behind, and a busy worker claims only as many as it
        has free slots (often one), so looking once per poll interval took them
        over one at a time (takeover p50 above lease + poll interval at 2x
        load, bench/README.md). A claim counts as a takeover when a run it
        returned was ever taken over or interrupted: a run recovered long ago
        costs at most one extra look."""
        if looked and any(c.recoveries or c.interruptions for c in claims):
            self._expired_looked_at = -math.inf

    def _on_listen(self) -> None:
        """(Re)connected to LISTEN: look again, wake-ups may have been missed."""
        self._wake.set()
        if self._scheduler is not None:
            self._scheduler.wake()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve until ``stop()`` or SIGTERM/SIGINT, then stop gracefully."""
        if self.metrics_port is None:
            await self._serve(handle_signals)
            return

        async def body() -> str:
            return self.metrics.render()

        server = await serve_metrics(body, port=self.metrics_port, host=self.metrics_host)
        self.metrics_address = bound_address(server)
        log.info("worker %s serves metrics on http://%s:%d/metrics", self.id,
                 *self.metrics_address)
        try:
            await self._serve(handle_signals)
        finally:
            server.close()
            self.metrics_address = None

    async def _serve(self, handle_signals: bool) -> None:
        self.app._claim_connections(self.id, self.concurrency)
        try:
            store = await self._start_up()
        except BaseException:
            self.app._release_connections(self.id)
            raise
        if store is None:  # stopped while waiting for the database
            self.app._release_connections(self.id)
            return
        self._store = store
        self._completer = _Completer(store)
        self.serving.set()
        log.info("worker %s serving queues %s (concurrency %d, lease %.0fs)", self.id,
                 ",".join(self.queues), self.concurrency, self.lease)
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        listener = self._listener()
        if listener is not None:
            await listener.start()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="pgjournal-heartbeat")
        scheduling = self._start_scheduler(store)
        try:
            await self._claim_loop()
        finally:
            if scheduling is not None:
                scheduling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await scheduling
            await self._shutdown()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if listener is not None:
                await listener.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)
            if self._hb_conn is not None:
                with contextlib.suppress(Exception):
                    await self._hb_conn.close()
                self._hb_conn = None
            with contextlib.suppress(Exception):
                await store.stop_worker(self.id)
            self.app._release_connections(self.id)
            with contextlib.suppress(Exception):
                await self.app._fit_pool()
            log.info("worker %s stopped", self.id)

    async def _start_up(self) -> Store | None:
        """Open the app's store (sized for this worker) and register the worker.

        While the database is unreachable, wait and retry with back-off, saying
        so once; None if ``stop()`` was called meanwhile.
        """
        delay = 0.2
        waiting_since: float | None = None
        while True:
            try:
                store = await self.app.store()
                await self.app._fit_pool()
                await store.register_worker(self.id, socket.gethostname(), os.getpid(),
                                            self.queues, self.concurrency, lease=self.lease,
                                            workflows=self.workflows,
                                            workflow_queues=self._workflow_queues())
                if waiting_since is not None:
                    log.info("database reachable after %.1fs; worker %s starting",
                             time.monotonic() - waiting_since, self.id)
                return store
            except DatabaseUnavailable as exc:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.warning("database unavailable (%s); worker %s waits for it, retrying "
                                "with back-off", exc, self.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return None
            delay = min(delay * 2, 5.0)

    def _workflow_queues(self) -> dict[str, str]:
        """Which queue each served workflow is on (``pgjournal start`` without
        ``--app`` uses it to enqueue a run where a live worker will take it)."""
        return {w.name: w.queue for w in self.app.workflows.values() if w.queue in self.queues}

    def _start_scheduler(self, store: Store) -> asyncio.Task[None] | None:
        """The task that fires due schedules of this worker's workflows."""
        if not self.schedules or not self.app.workflows:
            return None
        self._scheduler = Scheduler(self.app, store, self.workflows, self.poll_interval)
        return asyncio.create_task(self._scheduler.run(), name="pgjournal-scheduler")

    # -- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        assert self._store is not None
        backoff = 0.1
        while not self._stopping.is_set():
            if self.concurrency - len(self._inflight) > 0:
                self._wake.clear()
                try:
                    async with self._claiming:
                        free = self.concurrency - len(self._inflight)
                        got = await self._claim_round(free) if free > 0 else 0
                    backoff = 0.1
                except TransactionConflict as exc:
                    # Not an outage: the claim was rolled back whole; claim again
                    # after a random pause (the store already retried it).
                    pause = conflict_pause(self._store.conflict_tries)
                    log.info("claim lost a conflict with another transaction (%s); "
                             "claiming again in %.0f ms", exc, pause * 1000)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), pause)
                    continue
                except DatabaseUnavailable as exc:
                    log.warning("claim failed (%s); retrying in %.1fs", exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if got == free:
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _claim_round(self, free: int) -> int:
        """One claim of up to ``free`` runs (and a hungry one if it came back
        short); how many runs it got. Called with ``_claiming`` held."""
        assert self._store is not None
        sent = time.monotonic()
        looks = self._expired_turn()
        claims = await traced_claim(self._store, self._store.claim(
            self.id, self.queues, free, self.lease, workflows=self.workflows,
            expired=looks))
        self._after_look(looks, claims)
        self.metrics.claim_latency(time.monotonic() - sent)
        got = self._spawn_all(claims, sent)
        if got < free and (got > 0 or not self._hungry):
            # Going idle: ask for NOTIFYs, and claim once more under
            # the queue locks so no enqueue slips between the two.
            # Also after a claim that got some but not all: a key's
            # runs may have been cut to its room, and the runs of
            # other keys behind them are claimable now.
            sent = time.monotonic()
            looks = self._expired_turn()
            claims = await traced_claim(self._store, self._store.claim(
                self.id, self.queues, free - got, self.lease, hungry=True,
                workflows=self.workflows, expired=looks))
            self._after_look(looks, claims)
            self.metrics.claim_latency(time.monotonic() - sent)
            got += self._spawn_all(claims, sent)
            self._hungry = got < free
        elif got == free:
            self._hungry = False
        return got

    def _spawn_all(self, claims: list[Claim], sent_at: float) -> int:
        for claim in claims:
            self._spawn(claim, sent_at)
        return len(claims)

    def _spawn(self, claim: Claim, sent_at: float) -> None:
        if claim.recoveries and claim.has_journal:
            log.info("run %s (%s) recovered after its worker vanished (recovery %d); "
                     "replaying its journal", claim.run_id, claim.workflow,
                     claim.recoveries)
        else:
            log.info("claimed run %s (%s) attempt %d", claim.run_id, claim.workflow,
                     claim.attempt)
        # The lease counts from when the claim was *sent*: a claim answered
        # after a pause of this process may already be past its lease.
        lease = Lease(claim.run_id, claim.epoch, self.lease, sent_at=sent_at,
                      confirm=self._confirm, margin=self._margin())
        self.metrics.run_claimed(claim.workflow)
        task = asyncio.create_task(self._execute(claim, lease), name=f"run:{claim.run_id}")
        self._inflight[claim.run_id] = (task, claim.epoch)
        self._leases[claim.run_id] = lease

        def done(_t: asyncio.Task[None]) -> None:
            if self._inflight.get(claim.run_id, (None,))[0] is task:
                del self._inflight[claim.run_id]
                self._leases.pop(claim.run_id, None)
            self._lost_logged.discard((claim.run_id, claim.epoch))
            self._wake.set()

        task.add_done_callback(done)

    # -- executing -----------------------------------------------------------

    async def _fail(self, claim: Claim, exc: BaseException, *, terminal: bool,
                    wf: Workflow | None = None, error: dict[str, Any] | None = None) -> None:
        assert self._store is not None
        delay = wf.retry_backoff(claim.attempt) if wf else 0.0
        status = await self._store.fail_run(claim.run_id, claim.epoch,
                                            error or describe_exception(exc),
                                            delay=delay, terminal=terminal)
        self.metrics.run_failed(claim.workflow, status)
        if status == "queued":
            log.warning("run %s (%s) attempt %d raised %s: %s; retrying in %.1fs",
                        claim.run_id, claim.workflow, claim.attempt, type(exc).__name__,
                        exc, delay)
        elif status.startswith("lost:"):
            self._log_abandoned(claim, f"now {status[5:]}, before its failure was recorded")
        else:
            log.error("run %s (%s) failed: %s: %s", claim.run_id, claim.workflow,
                      type(exc).__name__, exc)

    async def _execute(self, claim: Claim, lease: Lease) -> None:
        store = self._store
        assert store is not None and self._completer is not None
        wf = self.app.workflows.get(claim.workflow)
        try:
            if wf is None:
                known = ", ".join(sorted(self.app.workflows)) or "none"
                msg = (f"no workflow named {claim.workflow!r} is registered in this worker "
                       f"(known: {known})")
                await self._fail(claim, LookupError(msg), terminal=True, error={
                    "type": "UnknownWorkflow", "module": "pgjournal.errors",
                    "message": sanitize(msg, MAX_MESSAGE_CHARS)})
                return
            try:
                data = self.app.serializer.loads(claim.input)
                args, kwargs = list(data.get("args", [])), dict(data.get("kwargs", {}))
                run = Run(self.metrics.timed(store, claim), self.app.serializer, claim,
                          lease=lease,
                          max_journal_bytes=self.app.max_journal_bytes,
                          child_settings=self.app._child_settings)
                wf.signature.bind(run, *args, **kwargs)
            except Exception as exc:
                await self._fail(claim, exc, terminal=True, error={
                    "type": "BadInput", "module": "pgjournal.errors",
                    "message": sanitize(f"cannot call workflow {wf.name!r} with this input: "
                                        f"{exc}", MAX_MESSAGE_CHARS)})
                return
            try:
                try:
                    async with asyncio.timeout(wf.timeout):
                        await run.prepare()  # the outline run.patched() needs
                        output = await traced_attempt(run, wf.fn(run, *args, **kwargs))
                finally:
                    await run.settle()
            except BaseExceptionGroup as group:
                # A TaskGroup in the workflow wraps what unwinds it.
                found = _unwinding(group)
                if found is None:
                    raise
                if isinstance(found, Suspended):
                    self.metrics.run_suspended(claim.workflow)
                    self._timer_wake(found.until, run)
                else:
                    self._log_abandoned(claim, found.status)
                return
            except Suspended as s:
                log.debug("run %s suspended until %s", claim.run_id, s.until)
                self.metrics.run_suspended(claim.workflow)
                self._timer_wake(s.until, run)
                return
            except Abandoned as a:
                self._log_abandoned(claim, a.status)
                return
            except Exception as exc:
                if run.db_failed:
                    self._log_abandoned(claim, "database unavailable")
                    return
                terminal = isinstance(exc, TerminalError | SerializationError)
                await self._fail(claim, exc, terminal=terminal, wf=wf)
                return
            finally:
                run.close()
            unasked = await run.unreplayed()
            if unasked:
                names = ", ".join(f"{e['kind']} {e['name']!r} at {e['position']}"
                                  for e in unasked)
                log.warning("run %s (%s) completed, but its journal holds entries the "
                            "replay never asked for (the workflow code changed under the "
                            "run?): %s", claim.run_id, claim.workflow, names)
                await store.note_run_event(claim.run_id, claim.epoch, {
                    "event": "unreplayed_entries", "entries": unasked})
            try:
                text = self.app.serializer.dumps(
                    output, what=f"output of workflow {wf.name!r} of run {claim.run_id}")
                completed = await self._completer.complete(claim.run_id, claim.epoch, text)
            except (DatabaseUnavailable, TransactionConflict):
                raise
            except Exception as exc:
                # Refused in Python (SerializationError) or, alone, by the database:
                # the output will not become storable by trying again.
                await self._fail(claim, exc, terminal=True, wf=wf)
                return
            if completed:
                self.metrics.run_completed(claim.workflow)
                log.debug("run %s completed", claim.run_id)
            else:
                self._log_abandoned(claim, "lost before completion")
        except DatabaseUnavailable as exc:
            log.warning("run %s: database unavailable (%s); its lease will expire and the "
                        "run will be replayed", claim.run_id, exc)
        except TransactionConflict as exc:
            # Not an outage: a write lost lock conflicts every time it was
            # sent (the store's and the completer's retries); nothing of it
            # was written. The run is left to its lease like a lost write.
            log.warning("run %s: its last write kept losing conflicts with other "
                        "transactions (%s); its lease will expire and the run will be "
                        "replayed", claim.run_id, exc)

    def _log_abandoned(self, claim: Claim, status: str) -> None:
        key = (claim.run_id, claim.epoch)
        if key in self._lost_logged:
            return  # one line per run and lease
        self._lost_logged.add(key)
        self.metrics.lease_lost(status)
        if status == "cancelled":
            log.info("run %s was cancelled; stopped at a step boundary", claim.run_id)
        elif status == "deleted":
            log.info("run %s no longer exists (deleted); stopped it", claim.run_id)
        else:
            log.warning("worker %s lost the lease of run %s (%s); it executes and writes "
                        "nothing more for it", self.id, claim.run_id, status)

    def _timer_wake(self, until: Any, run: Run) -> None:
        """Claim again right when a short timer of a run we just suspended is due."""
        if until is None:
            return
        delay = (until - run.db_now()).total_seconds()
        if 0 <= delay < self.poll_interval * 10:
            asyncio.get_running_loop().call_later(delay + 0.005, self._wake.set)

    # -- leases --------------------------------------------------------------

    def _margin(self) -> float:
        """How long before a lease's local deadline a step must confirm it first."""
        return min(self.heartbeat_interval, self.lease / 2)

    async def _confirm(self, lease: Lease) -> bool:
        """One round trip: extend this run's lease alone, if it is still ours.

        Each try is bounded by what is left of the local lease (at least a
        short round trip): a confirmation still waiting for a pool connection
        when the worker gives the run up (a database restart, a cut network)
        must not be sent later and renew, in the database, a lease the worker
        no longer heartbeats. That renewal delayed the takeover by a lease and
        made the next claim count as a crash recovery, not an interruption.
        """
        assert self._store is not None
        for attempt in range(3):
            sent = time.monotonic()
            async with asyncio.timeout(max(lease.valid_until - sent, CONFIRM_FLOOR)):
                rows = await self._store.heartbeat(self.id, [(lease.run_id, lease.epoch)],
                                                   self.lease)
            if not rows:
                lease.renewed(sent)
                return True
            _run_id, status, _epoch = rows[0]
            if status != "busy":
                lease.mark_lost(f"now {status}")
                return False
            # The row is locked (our own parallel write, or a DBA): not renewed.
            if attempt < 2:
                await asyncio.sleep(0.05 * (attempt + 1))
        lease.mark_lost("lease not renewed in time: its row stayed locked")
        return False

    def _listener(self) -> Listener | None:
        """The LISTEN connection for wake-ups, or ``None`` (said once in the log)
        when there is none: a transaction-mode pooler and no ``listen_dsn``."""
        listen_dsn = self.app.listen_dsn
        if listen_dsn is None:
            log.info("worker %s: no LISTEN (pooler=%s and no listen_dsn): polling every "
                     "%.2fs for new runs", self.id, self.app.pooler, self.poll_interval)
            return None
        self._acting = True
        return Listener(listen_dsn, "pgjournal_wake", self._on_wake, self._on_listen,
                        act=self._act_on_wake)

    async def _heartbeat_conn(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        """The worker's own connection for heartbeats: they never queue behind
        journal writes for a pool connection. Statements on it time out below
        the heartbeat interval."""
        if self._hb_conn is None or self._hb_conn.closed:
            self._hb_conn = None
            conn = await connect_async(self.app.dsn, autocommit=True, pooler=self.app.pooler,
                                       connect_timeout=max(2, int(self.heartbeat_interval)))
            if self.app.pooler != "transaction":  # else SET LOCAL per beat, see _beat
                await conn.execute(f"SET statement_timeout = {self._hb_timeout_ms}")
            self._hb_conn = conn
        return self._hb_conn

    @property
    def _hb_timeout_ms(self) -> int:
        return max(100, int(self.heartbeat_interval * 800))

    async def _drop_heartbeat_conn(self) -> None:
        conn, self._hb_conn = self._hb_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _heartbeat_loop(self) -> None:
        """Renew the leases of all in-flight runs every ``heartbeat_interval``.

        Never stops on an error: every failure is logged (a database outage
        once) and the next beat tries again. A run whose lease could not be
        renewed is given up at the first check after its local deadline (at
        most two intervals late: a beat that hangs is left behind after one);
        no step starts past ``deadline - margin`` without a round trip that
        confirms the lease, so a late give-up never runs a step twice.
        """
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            beat = asyncio.create_task(self._beat())
            try:
                done, _ = await asyncio.wait({beat}, timeout=self.heartbeat_interval)
                if not done:
                    # A black-holed connection: psycopg's handling of the
                    # cancellation may take seconds; leave it behind.
                    beat.cancel()
                    self._stuck_beats.add(beat)
                    beat.add_done_callback(self._stuck_beat_done)
                    self._hb_conn = None
                    raise TimeoutError("heartbeat timed out")
                beat.result()
            except asyncio.CancelledError:
                beat.cancel()
                raise
            except TransactionConflict as exc:
                # Not an outage (the connection is fine): the next beat renews.
                log.info("heartbeat lost a conflict with another transaction (%s); "
                         "renewing at the next beat", exc)
            except Exception as exc:
                await self._drop_heartbeat_conn()
                if isinstance(exc, DatabaseUnavailable | psycopg.OperationalError | TimeoutError):
                    if not self._hb_failing:
                        log.warning("heartbeat failed (%s); retrying every %.1fs",
                                    str(exc).splitlines()[0] if str(exc) else
                                    type(exc).__name__, self.heartbeat_interval)
                else:
                    log.exception("heartbeat failed; retrying in %.1fs",
                                  self.heartbeat_interval)
                self._hb_failing = True
            self._abandon_expired()

    async def _beat(self) -> None:
        assert self._store is not None
        items = [(rid, epoch) for rid, (_t, epoch) in self._inflight.items()
                 if not (rid in self._leases and self._leases[rid].lost)]
        sent = time.monotonic()
        async with asyncio.timeout(self.heartbeat_interval):
            conn = await self._heartbeat_conn()
            if self.app.pooler == "transaction":
                # No session SET through a pooler: it would stay on a server
                # connection that other clients get next.
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL statement_timeout = {self._hb_timeout_ms}")
                    lost = await self._store.heartbeat(self.id, items, self.lease, conn=conn)
            else:
                lost = await self._store.heartbeat(self.id, items, self.lease, conn=conn)
        if self._hb_failing:
            self._hb_failing = False
            log.info("heartbeats resumed")
        not_renewed = set()
        for run_id, status, epoch in lost:
            not_renewed.add(run_id)
            if status == "busy":
                continue  # row locked elsewhere: not renewed this time, not lost
            entry = self._inflight.get(run_id)
            if entry is None or epoch == entry[1]:
                continue  # finished meanwhile, or our own last write raced this beat
            lease = self._leases.get(run_id)
            if lease is not None:
                lease.mark_lost(f"now {status}")
            self._log_abandoned_id(run_id, entry[1], status)
            entry[0].cancel()
        for run_id, epoch in items:
            lease = self._leases.get(run_id)
            if run_id not in not_renewed and lease is not None and lease.epoch == epoch:
                lease.renewed(sent)

    def _stuck_beat_done(self, task: asyncio.Task[None]) -> None:
        self._stuck_beats.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the beat was given up already

    def _abandon_expired(self) -> None:
        """Give up runs whose lease ran out locally: the database may hand them on.

        They start no further step (``Lease.ensure`` now says no) and are left
        out of heartbeats. A journal write already in flight is not cancelled:
        it is fenced by the epoch, and cancelling it could only lose a result
        whose side effect already happened.
        """
        now = time.monotonic()
        for run_id, lease in list(self._leases.items()):
            entry = self._inflight.get(run_id)
            if entry is None or entry[0].done() or lease.lost or not lease.expired(now):
                continue
            lease.mark_lost("lease not renewed in time")
            self._log_abandoned_id(run_id, entry[1], "lease not renewed in time")

    def _log_abandoned_id(self, run_id: uuid.UUID, epoch: int, status: str) -> None:
        key = (run_id, epoch)
        if key in self._lost_logged:
            return
        self._lost_logged.add(key)
        self.metrics.lease_lost(status)
        if status == "cancelled":
            log.info("run %s was cancelled; stopping it", run_id)
        elif status == "deleted":
            log.info("run %s no longer exists (deleted); stopping it", run_id)
        else:
            log.warning("worker %s lost the lease of run %s (%s); stopping it", self.id,
                        run_id, status)

    async def _shutdown(self) -> None:
        if not self._inflight:
            return
        tasks = [t for t, _ in self._inflight.values()]
        log.info("stopping: waiting up to %.0fs for %d in-flight runs", self.grace_period,
                 len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.grace_period)
        if not pending:
            return
        items = [(rid, epoch) for rid, (t, epoch) in self._inflight.items() if t in pending]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert self._store is not None
        with contextlib.suppress(DatabaseUnavailable):
            released = await self._store.release_runs(items)
            log.info("released the leases of %d runs for other workers", released)
