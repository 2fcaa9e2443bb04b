"""``Run``: what a workflow body sees, and how its steps are journaled and replayed.

``Run`` is the one public object; it holds no rule of its own. The replay
engine (``pgjournal._run.engine``: positions, turns, the replay gate, the
journal cursor and writes, the lease check) keeps the rules, and each
feature is a module built on the engine's narrow interface alone:

- ``_run.steps``    steps and facts (``step``, ``now``, ``uuid``)
- ``_run.streams``  ``stream_step``
- ``_run.waits``    signals and durable timers (``wait_signal``, ``sleep``)
- ``_run.flow``     rate buckets (``step(..., rate=...)``, ``report_usage``)
- ``_run.family``   child runs (``spawn``, ``spawn_many``, ``wait_all``, ``wait_first``)
- ``_run.patches``  code changes under running runs (``patched``, ``deprecate_patch``)

See ``pgjournal/_run/engine.py`` for identity and delivery order, and
``docs/contributing.md`` for the map.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._exceptions import describe_exception, rebuild_exception
from ._run import flow, patches, steps, streams, waits
from ._run.engine import DEFAULT_MAX_JOURNAL_BYTES as DEFAULT_MAX_JOURNAL_BYTES
from ._run.engine import PAGE_BYTES as PAGE_BYTES
from ._run.engine import PAGE_ENTRIES as PAGE_ENTRIES
from ._run.engine import REPLAY_STALL_SECONDS as REPLAY_STALL_SECONDS
from ._run.engine import Engine
from ._run.engine import LeaseGuard as LeaseGuard
from ._run.engine import fingerprint as fingerprint
from ._run.family import Family
from ._run.flow import RATE_LOCAL_WAIT_SECONDS as RATE_LOCAL_WAIT_SECONDS
from ._run.flow import RateSpec as RateSpec
from ._run.steps import call_step_fn
from ._run.streams import STREAM_FLUSH_SECONDS as STREAM_FLUSH_SECONDS
from ._unwind import Abandoned, Suspended
from .children import ChildRun as ChildRun
from .children import ChildSettings as ChildSettings

if TYPE_CHECKING:
    from .serializer import Serializer
    from .store import Claim, Store

__all__ = ["Abandoned", "Run", "Suspended", "call_step_fn", "describe_exception",
           "rebuild_exception"]



class Run:
    """The handle a workflow receives: journaled steps, signals, timers, and facts.

    ``run.id``, ``run.attempt`` (1 on the first attempt, +1 per retry),
    ``run.workflow``, ``run.recoveries`` (crash recoveries so far) and
    ``run.fencing_token`` (the lease epoch this execution owns the run with:
    a store of your own can refuse writes carrying an older token).
    """

    def __init__(self, store: Store, serializer: Serializer, claim: Claim, *,
                 lease: LeaseGuard | None = None,
                 max_journal_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
                 child_settings: ChildSettings | None = None) -> None:
        self._store = store
        self._claim = claim
        self._engine = Engine(store, serializer, claim, lease=lease,
                              max_journal_bytes=max_journal_bytes)
        self._family = Family(self._engine, child_settings)
        self._reserved: dict[str, float] = {}       # units of the last take, per rate bucket
        self._patch_answers: dict[str, bool] = {}   # what ``patched`` answered, by name
        self.id: uuidlib.UUID = claim.run_id
        self.attempt: int = claim.attempt
        self.workflow: str = claim.workflow
        self.recoveries: int = claim.recoveries
        self.fencing_token: int = claim.epoch

    @property
    def db_failed(self) -> bool:
        """Whether the run was given up because the database was unavailable (whether
        its last write committed is unknown)."""
        return self._engine.db_failed

    # -- facts -----------------------------------------------------------------

    def db_now(self) -> datetime:
        """The database clock now, estimated from the claim (no round trip)."""
        return self._engine.db_now()

    async def now(self) -> datetime:
        """The current time, journaled: a replay gets the same value."""
        value: datetime = await steps.fact(
            self._engine, "now", self._engine.db_now, lambda v: json.dumps(v.isoformat()),
            datetime.fromisoformat)
        return value

    async def uuid(self) -> uuidlib.UUID:
        """A random UUID, journaled: a replay gets the same value."""
        value: uuidlib.UUID = await steps.fact(
            self._engine, "uuid", uuidlib.uuid4, lambda v: json.dumps(str(v)), uuidlib.UUID)
        return value

    # -- steps and streams -------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0,
                   backoff: float = 1.0, rate: RateSpec | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and journal its result.

        On replay the journaled result is returned without calling ``fn``. The
        value returned is always the journaled one (what a replay would see).
        A raising ``fn`` is retried in-process ``retries`` times with
        exponential ``backoff`` seconds; then its error is journaled and raised.

        ``rate=("openai-tpm", 3000)`` first takes 3,000 units from that rate
        bucket (``App.set_rate_limit``), shared by every worker; if the bucket
        lacks them the run waits for the refill, suspended (no worker held)
        when the wait is long. A third item, ``rate=(bucket, units, usage)``, is
        a function of the step's result returning the units really used: the
        bucket is corrected by the difference (see also ``report_usage``).
        Every call of ``fn`` takes its units: an in-process retry, and a new
        attempt of the run calling a step that failed, take them again (and
        wait for them); a replay, or a call made again after a crash, does not.
        """
        return await steps.step(self._engine, name, fn, args, kwargs, retries=retries,
                                backoff=backoff, rate=rate, reserved=self._reserved)

    def stream_step(self, name: str, fn: Callable[..., AsyncIterator[Any]], *args: Any,
                    **kwargs: Any) -> AsyncIterator[Any]:
        """Yield the chunks of the async iterator ``fn(*args, **kwargs)`` as they come,
        journaling them. A stream read to its end replays all its chunks; one cut
        short (``break``, an exception in the loop, ``aclose()``) journals the chunks
        that were consumed and replays exactly those, without calling ``fn`` again.
        A stream interrupted by a crash, or left open across a suspension, runs
        again from the start."""
        return streams.stream_step(self._engine, name, fn, args, kwargs)

    async def report_usage(self, bucket: str, units: float) -> None:
        """Correct bucket ``bucket`` by what the last step that took from it really
        used: ``units`` more or less than it took is taken or given back. Journaled:
        a replay does not correct twice."""
        await flow.report_usage(self._engine, bucket, units, reserved=self._reserved)

    # -- waits -------------------------------------------------------------------

    async def wait_signal(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the next signal ``name`` sent to this run.

        If none has arrived, the run is suspended (no worker is held) until one
        does, or until ``timeout`` seconds after the first wait, when
        ``TimeoutError`` is raised here. A retry of a run that failed on that
        timeout waits again, with a fresh deadline.
        """
        return await waits.wait_signal(self._engine, name, timeout)

    async def sleep(self, name: str, seconds: float) -> None:
        """A durable timer: the run is suspended (no worker held) until it is due."""
        await waits.sleep(self._engine, name, seconds)

    # -- child runs --------------------------------------------------------------

    async def spawn(self, workflow: str, *args: Any, queue: str | None = None,
                    key: str | None = None, timeout: float | None = None,
                    concurrency_key: str | None = None, **kwargs: Any) -> ChildRun:
        """Start a child run of ``workflow(*args, **kwargs)``; returns its ``ChildRun``.

        The spawn is journaled: a replay gets the same child back, and a spawn
        executed again after a crash finds the child it created (the child's
        id derives from this run's id and the spawn's position, or from
        ``key`` when given). ``queue``: default, the workflow's registered
        queue. ``timeout``: seconds the child may take to end (it fails with
        ``TimeoutError`` after); default, this run's own deadline, if any.
        ``concurrency_key``: as for ``App.start``.
        """
        children = await self._family.spawn(workflow, [(args, kwargs)], queue=queue,
                                            keys=None if key is None else [key],
                                            timeout=timeout, concurrency_key=concurrency_key)
        return children[0]

    async def spawn_many(self, workflow: str, items: Any, *, queue: str | None = None,
                         keys: list[str] | None = None, timeout: float | None = None,
                         concurrency_key: str | None = None) -> list[ChildRun]:
        """Start one child run of ``workflow`` per item, in one round trip.

        Each item is the child's arguments: a tuple is spread as positional
        arguments, anything else is the one argument (``[("a", 1), ("b", 2)]``
        calls ``wf(run, "a", 1)`` and ``wf(run, "b", 2)``; ``["a", "b"]`` calls
        ``wf(run, "a")`` and ``wf(run, "b")``). ``keys``: one per item, as
        ``spawn(key=...)``.
        """
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (item, {}) if isinstance(item, tuple) else ((item,), {}) for item in items]
        if keys is not None and len(keys) != len(calls):
            raise ValueError(f"spawn_many got {len(calls)} items but {len(keys)} keys")
        if not calls:
            return []
        return await self._family.spawn(workflow, calls, queue=queue, keys=keys,
                                        timeout=timeout, concurrency_key=concurrency_key)

    async def wait_all(self, children: list[ChildRun], *,
                       return_exceptions: bool = False) -> list[Any]:
        """The outputs of all ``children``, in order, once every one has ended.

        Until then the run is suspended: no worker holds it, and the
        transaction that ends the last child wakes it. A child that failed,
        died or was cancelled raises ``ChildFailed`` (the first such in the
        list), or stands in the list as that exception with
        ``return_exceptions=True``. The outcomes are journaled.
        """
        return await self._family.wait_all(children, return_exceptions=return_exceptions)

    async def wait_first(self, children: list[ChildRun], *,
                         cancel_rest: bool = False) -> ChildRun:
        """The first of ``children`` to end (``await it.result()`` for its output or
        ``ChildFailed``, without another wait). Suspends the run until one has.
        The others keep running, or are cancelled with ``cancel_rest=True``."""
        return await self._family.wait_first(children, cancel_rest=cancel_rest)

    # -- changing code under running runs ------------------------------------------

    async def prepare(self) -> None:
        """Load what the synchronous ``patched`` needs (the journal outline) before
        the workflow starts. Called by the worker; a run without a journal costs
        nothing, one with a journal the round trip its first call would make."""
        await self._engine.outline()

    def patched(self, name: str) -> bool:
        """Whether this run takes the code path added under patch ``name``.

        ``if run.patched("retry-with-backoff"): <new code> else: <old code>``.
        A run that reaches this point for the first time journals a marker and
        gets True; a replay of a run whose journal went past this point without
        the marker (journaled by the old code) gets False, and one that finds
        the marker gets True. The answer for a name is fixed for the whole
        execution (later calls with the same name return it again). Synchronous:
        no ``await``. See ``docs/code-changes.md``.
        """
        return patches.patched(self._engine, self._patch_answers, name)

    def deprecate_patch(self, name: str) -> None:
        """Where ``if run.patched(name):`` was, once no run that took the old path
        is left: runs journaled with the marker still replay (the marker's
        position is taken here), and new runs journal nothing."""
        patches.deprecate_patch(self._engine, name)

    # -- after the workflow ----------------------------------------------------------

    async def settle(self) -> None:
        """Called by the worker when the workflow returned or raised: streams it
        left open were cut short; journal what they delivered."""
        await streams.settle(self._engine)
        await self._engine.writes_durable()  # patch markers before the run is completed or failed

    async def unreplayed(self) -> list[dict[str, Any]]:
        """Journal entries the workflow never asked for (its code changed under the run)."""
        return await self._engine.unreplayed()

    def close(self, reason: str = "finished") -> None:
        """Wake and unwind whatever the run's branches still wait for."""
        self._engine.close(reason)
