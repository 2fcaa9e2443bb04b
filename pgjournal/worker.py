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
import os
import signal
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from ._sql import validate_identifier
from .app import App, Workflow
from .errors import DatabaseUnavailable, SerializationError, TerminalError
from .listener import Listener
from .run import Abandoned, Run, Suspended, describe_exception
from .store import Claim, Store

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
    """

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
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                done = await self._store.complete_runs([(r, e, o) for r, e, o, _ in batch])
            except DatabaseUnavailable as exc:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
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


class Worker:
    """Serves ``queues`` (default: the queues of the app's workflows).

    ``concurrency`` runs at once; ``lease`` seconds without a heartbeat before
    another worker may take a run over (heartbeats every ``lease / 3``).
    ``grace_period``: on stop, how long in-flight runs may finish before their
    leases are released for others.
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
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._store: Store | None = None
        self._completer: _Completer | None = None
        self._hungry = False

    # -- control -------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new claims; in-flight runs get the grace period."""
        self._stopping.set()
        self._wake.set()

    def _on_wake(self, payload: str) -> None:
        schema, _, queue = payload.partition(":")
        if schema == self.app.schema and queue in self.queues:
            self._wake.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve until ``stop()`` or SIGTERM/SIGINT, then stop gracefully."""
        if self.app._store is None:
            self.app.pool_size = max(self.app.pool_size, self.concurrency + 4)
        store = self._store = await self.app.store()
        self._completer = _Completer(store)
        await store.register_worker(self.id, socket.gethostname(), os.getpid(), self.queues,
                                    self.concurrency)
        log.info("worker %s serving queues %s (concurrency %d, lease %.0fs)", self.id,
                 ",".join(self.queues), self.concurrency, self.lease)
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        listener = Listener(self.app.dsn, "pgjournal_wake", self._on_wake, self._wake.set)
        await listener.start()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="pgjournal-heartbeat")
        try:
            await self._claim_loop()
        finally:
            await self._shutdown()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await listener.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                await store.stop_worker(self.id)
            log.info("worker %s stopped", self.id)

    # -- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        assert self._store is not None
        backoff = 0.1
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free > 0:
                self._wake.clear()
                try:
                    got = self._spawn_all(await self._store.claim(
                        self.id, self.queues, free, self.lease))
                    if got < free and not self._hungry:
                        # Going idle: ask for NOTIFYs, and claim once more under
                        # the queue locks so no enqueue slips between the two.
                        got += self._spawn_all(await self._store.claim(
                            self.id, self.queues, free - got, self.lease, hungry=True))
                        self._hungry = got < free
                    elif got == free:
                        self._hungry = False
                    backoff = 0.1
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

    def _spawn_all(self, claims: list[Claim]) -> int:
        for claim in claims:
            self._spawn(claim)
        return len(claims)

    def _spawn(self, claim: Claim) -> None:
        if claim.recoveries and claim.has_journal:
            log.info("run %s (%s) recovered after its worker vanished (recovery %d); "
                     "replaying its journal", claim.run_id, claim.workflow,
                     claim.recoveries)
        else:
            log.info("claimed run %s (%s) attempt %d", claim.run_id, claim.workflow,
                     claim.attempt)
        task = asyncio.create_task(self._execute(claim), name=f"run:{claim.run_id}")
        self._inflight[claim.run_id] = (task, claim.epoch)

        def done(_t: asyncio.Task[None]) -> None:
            if self._inflight.get(claim.run_id, (None,))[0] is task:
                del self._inflight[claim.run_id]
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
        if status == "queued":
            log.warning("run %s (%s) attempt %d raised %s: %s; retrying in %.1fs",
                        claim.run_id, claim.workflow, claim.attempt, type(exc).__name__,
                        exc, delay)
        elif status.startswith("lost:"):
            log.warning("run %s: lost the lease before recording its failure (%s)",
                        claim.run_id, status[5:])
        else:
            log.error("run %s (%s) failed: %s: %s", claim.run_id, claim.workflow,
                      type(exc).__name__, exc)

    async def _execute(self, claim: Claim) -> None:
        store = self._store
        assert store is not None and self._completer is not None
        wf = self.app.workflows.get(claim.workflow)
        try:
            if wf is None:
                known = ", ".join(sorted(self.app.workflows)) or "none"
                msg = (f"no workflow named {claim.workflow!r} is registered in this worker "
                       f"(known: {known})")
                await self._fail(claim, LookupError(msg), terminal=True, error={
                    "type": "UnknownWorkflow", "module": "pgjournal.errors", "message": msg})
                return
            try:
                data = self.app.serializer.loads(claim.input)
                args, kwargs = list(data.get("args", [])), dict(data.get("kwargs", {}))
                run = Run(store, self.app.serializer, claim,
                          max_journal_bytes=self.app.max_journal_bytes)
                wf.signature.bind(run, *args, **kwargs)
            except Exception as exc:
                await self._fail(claim, exc, terminal=True, error={
                    "type": "BadInput", "module": "pgjournal.errors",
                    "message": f"cannot call workflow {wf.name!r} with this input: {exc}"})
                return
            try:
                try:
                    async with asyncio.timeout(wf.timeout):
                        output = await wf.fn(run, *args, **kwargs)
                finally:
                    await run.settle()
            except BaseExceptionGroup as group:
                # A TaskGroup in the workflow wraps what unwinds it.
                found = _unwinding(group)
                if found is None:
                    raise
                if isinstance(found, Suspended):
                    self._timer_wake(found.until, run)
                else:
                    self._log_abandoned(claim, found.status)
                return
            except Suspended as s:
                log.debug("run %s suspended until %s", claim.run_id, s.until)
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
            except DatabaseUnavailable:
                raise
            except Exception as exc:
                # Refused in Python (SerializationError) or, alone, by the database:
                # the output will not become storable by trying again.
                await self._fail(claim, exc, terminal=True, wf=wf)
                return
            if completed:
                log.debug("run %s completed", claim.run_id)
            else:
                self._log_abandoned(claim, "lost before completion")
        except DatabaseUnavailable as exc:
            log.warning("run %s: database unavailable (%s); its lease will expire and the "
                        "run will be replayed", claim.run_id, exc)

    def _log_abandoned(self, claim: Claim, status: str) -> None:
        if status == "cancelled":
            log.info("run %s was cancelled; stopped at a step boundary", claim.run_id)
        else:
            log.warning("worker %s lost the lease of run %s (%s); it writes nothing more "
                        "for it", self.id, claim.run_id, status)

    def _timer_wake(self, until: Any, run: Run) -> None:
        """Claim again right when a short timer of a run we just suspended is due."""
        if until is None:
            return
        delay = (until - run.db_now()).total_seconds()
        if 0 <= delay < self.poll_interval * 10:
            asyncio.get_running_loop().call_later(delay + 0.005, self._wake.set)

    # -- leases --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._store is not None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            items = [(rid, epoch) for rid, (_t, epoch) in self._inflight.items()]
            try:
                lost = await self._store.heartbeat(self.id, items, self.lease)
            except DatabaseUnavailable as exc:
                log.warning("heartbeat failed (%s)", exc)
                continue
            for run_id, status, epoch in lost:
                entry = self._inflight.get(run_id)
                if entry is None or epoch == entry[1]:
                    continue  # finished meanwhile, or our own last write raced this beat
                self._log_abandoned_id(run_id, status)
                entry[0].cancel()

    def _log_abandoned_id(self, run_id: uuid.UUID, status: str) -> None:
        if status == "cancelled":
            log.info("run %s was cancelled; stopping it", run_id)
        elif status == "deleted":
            log.info("run %s no longer exists (deleted); stopping it", run_id)
        else:
            log.warning("worker %s lost the lease of run %s (now %s); stopping it", self.id,
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
