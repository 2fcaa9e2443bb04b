"""OpenTelemetry tracing of starts, claims, run attempts and journaled calls.

Tracing is on when the process has configured an OpenTelemetry
``TracerProvider`` (``opentelemetry.trace.set_tracer_provider``, or the
``opentelemetry-instrument`` launcher), the convention for libraries: they use
the global provider, and with the API alone (no SDK, no provider) they cost
nothing. pgjournal never imports ``opentelemetry`` itself: it looks in
``sys.modules`` for ``opentelemetry.trace``, which an application that
configured a provider has imported. ``PGJOURNAL_TRACING=off`` turns tracing
off in a process that has a provider.

Each hook below is one call from ``app``, ``worker`` or ``run``; when tracing
is off it hands back the coroutine (or result) it was given, unchanged.

Context propagation: ``start`` stores the W3C trace context of its
``pgjournal.start`` span in ``runs.meta->'trace'`` (``traceparent`` and
``tracestate``), in the same INSERT as the run. A worker reads it back for the
runs of each claimed batch (one query, only with tracing on) and opens the run
attempt's span as its child, so the spans of every attempt, on any host and
after every crash, belong to the trace of the code that called ``start``. A
child run (``run.spawn``) has no context of its own: it uses its parent's, or
else its root run's.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from ._unwind import Abandoned, Suspended

if TYPE_CHECKING:
    from .store import Claim, Store

log = logging.getLogger("pgjournal.tracing")


class RunFacts(Protocol):
    """What a span tells of the run it belongs to. Protocols, not ``Run``: tracing
    is imported by the run's modules and imports none of them."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def workflow(self) -> str: ...

    @property
    def attempt(self) -> int: ...


class Journaled(RunFacts, Protocol):
    """The replay engine of a run (``pgjournal._run.engine.Engine``), as the
    decorators of its journaled calls see it."""

    def next_occurrence(self, name: str) -> int: ...


class Attempted(RunFacts, Protocol):
    """A ``Run``, as ``attempt`` sees it: its claim and the store it came from."""

    @property
    def recoveries(self) -> int: ...

    @property
    def fencing_token(self) -> int: ...

    @property
    def _store(self) -> Store: ...

    @property
    def _claim(self) -> Claim: ...

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

TRACER_NAME = "pgjournal"
_OFF = os.environ.get("PGJOURNAL_TRACING", "").strip().lower() in {"0", "off", "false", "no"}

#: The span of the journaled call in progress (set only while tracing is on):
#: ``replayed`` marks it as answered from the journal.
_call_span: contextvars.ContextVar[Any] = contextvars.ContextVar("pgjournal_call_span",
                                                                 default=None)

#: Trace contexts read at a claim, by (run id, lease epoch), until the attempt starts.
_claimed: OrderedDict[tuple[uuid.UUID, int], tuple[dict[str, str] | None, Any]] = OrderedDict()
_CLAIMED_MAX = 10_000


#: Whether reading the stored trace contexts failed once already (warned once).
_warned = False

#: A provider given to ``set_tracer_provider`` (else the global one is used).
_provider: Any = None


def set_tracer_provider(provider: Any) -> None:
    """Make pgjournal use ``provider`` (an OpenTelemetry ``TracerProvider``)
    instead of the global one; ``None`` goes back to the global provider.
    For tests, and for processes that keep pgjournal's spans apart."""
    global _provider
    _provider = provider


def _otel() -> Any:
    """The ``opentelemetry.trace`` module if tracing is on, else None."""
    if _OFF:
        return None
    mod = sys.modules.get("opentelemetry.trace")
    if mod is None:
        return None
    if _provider is not None:
        return mod
    provider = mod.get_tracer_provider()
    if isinstance(provider, mod.ProxyTracerProvider | mod.NoOpTracerProvider):
        return None  # the API alone: no provider was configured
    return mod


def enabled() -> bool:
    """Whether pgjournal emits spans in this process now."""
    return _otel() is not None


def _tracer(otel: Any) -> Any:
    from . import __version__

    return otel.get_tracer(TRACER_NAME, __version__, tracer_provider=_provider)


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _unwinding(exc: BaseException) -> str | None:
    """'suspended' or 'abandoned' for how a run unwinds (inside groups too), else None."""
    if isinstance(exc, Suspended):
        return "suspended"
    if isinstance(exc, Abandoned):
        return "abandoned"
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _unwinding(inner)
            if found is not None:
                return found
    return None


def _end_with_exception(otel: Any, span: Any, exc: BaseException) -> None:
    """Record how a span's work ended by ``exc``: a suspension or a lost lease is
    not an error; anything else is recorded and sets the status to error."""
    how = _unwinding(exc)
    if how is not None:
        span.set_attribute(f"pgjournal.{how}", True)
        return
    span.record_exception(exc)
    span.set_status(otel.Status(otel.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _run_attributes(run: RunFacts) -> dict[str, Any]:
    return {"pgjournal.run_id": str(run.id), "pgjournal.workflow": run.workflow,
            "pgjournal.attempt": run.attempt}


# -- the client: starts -------------------------------------------------------------


def start(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Awaitable[T]:
    """``fn(*args, **kwargs)`` (``Store.start_run`` or ``Store.start_runs``: run
    id(s), workflow, queue, ...) in a ``pgjournal.start`` span whose context is
    stored in the runs' ``meta`` under ``trace``."""
    otel = _otel()
    if otel is None:
        return fn(*args, **kwargs)
    return _start(otel, fn, args, kwargs)


async def _start(otel: Any, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> T:
    batch = isinstance(args[0], list | tuple)
    attributes: dict[str, Any] = {"pgjournal.workflow": args[1], "pgjournal.queue": args[2]}
    if batch:
        attributes["pgjournal.runs"] = len(args[0])
    with _tracer(otel).start_as_current_span(
            "pgjournal.start", kind=otel.SpanKind.PRODUCER, attributes=attributes,
            record_exception=False, set_status_on_exception=False) as span:
        carrier: dict[str, str] = {}
        _propagator().inject(carrier)
        kwargs["meta"] = {**(kwargs.get("meta") or {}), "trace": carrier}
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            _end_with_exception(otel, span, exc)
            raise
        if not batch:
            run_id, created = cast(tuple[uuid.UUID, bool], result)
            span.set_attribute("pgjournal.run_id", str(run_id))
            span.set_attribute("pgjournal.created", bool(created))
        return result


# -- the worker: claims and attempts --------------------------------------------------


def claim(store: Store, coro: Awaitable[list[Claim]]) -> Awaitable[list[Claim]]:
    """A claim batch; with tracing on, a ``pgjournal.claim`` span for a batch that
    claimed something, and the stored trace contexts of its runs read."""
    otel = _otel()
    if otel is None:
        return coro
    return _claim(otel, store, coro)


async def _claim(otel: Any, store: Store, coro: Awaitable[list[Claim]]) -> list[Claim]:
    began = time.time_ns()
    claims = await coro
    if not claims:
        return claims  # an idle poll: no span
    span = _tracer(otel).start_span(
        "pgjournal.claim", context=_empty_context(), start_time=began,
        attributes={"pgjournal.queues": sorted({c.queue for c in claims}),
                    "pgjournal.claimed": len(claims)})
    try:
        with otel.use_span(span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False):
            contexts = await _read_contexts(store, [c.run_id for c in claims])
    finally:
        span.end()
    link = span.get_span_context()
    for c in claims:
        _claimed[(c.run_id, c.epoch)] = (contexts.get(c.run_id), link)
    while len(_claimed) > _CLAIMED_MAX:
        _claimed.popitem(last=False)
    return claims


async def _read_contexts(store: Store, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """The stored trace context of each run: its own, else its parent's, else its
    root's (child runs carry the context of the run that spawned them).

    Read through the schema's ``trace_contexts`` function (``sql/queries.sql``),
    never from ``runs`` directly: the worker role of ``sql/roles.sql`` may not
    read tables, and its spans would silently leave the caller's trace."""
    global _warned
    try:
        async with store.pool.connection() as conn:
            cur = await conn.execute(store.q["trace_contexts"], {"ids": ids})
            rows = await cur.fetchall()
    except Exception as exc:  # tracing never fails a run, but says once why it is cut
        if not _warned:
            _warned = True
            log.warning("could not read the trace contexts of claimed runs (their spans "
                        "start traces of their own): %s", str(exc).splitlines()[0]
                        if str(exc) else type(exc).__name__)
        else:
            log.debug("could not read trace contexts: %s", exc)
        return {}
    return {r["run_id"]: r["trace"] for r in rows if isinstance(r["trace"], dict)}


def _empty_context() -> Any:
    from opentelemetry.context import Context

    return Context()


def attempt(run: Attempted, coro: Awaitable[T]) -> Awaitable[T]:
    """The workflow body of one execution of a run, in a ``pgjournal.run <workflow>``
    span whose parent is the trace context stored with the run."""
    otel = _otel()
    if otel is None:
        return coro
    return _attempt(otel, run, coro)


async def _attempt(otel: Any, run: Attempted, coro: Awaitable[T]) -> T:
    key = (run.id, run.fencing_token)
    stash = _claimed.pop(key, None)
    if stash is None:  # not claimed by a worker's claim loop (or claimed before tracing)
        stash = ((await _read_contexts(run._store, [run.id])).get(run.id), None)
    carrier, claim_link = stash
    parent = _propagator().extract(carrier) if carrier else _empty_context()
    links = [otel.Link(claim_link)] if claim_link is not None else None
    attributes = {**_run_attributes(run), "pgjournal.queue": run._claim.queue,
                  "pgjournal.recoveries": run.recoveries}
    with _tracer(otel).start_as_current_span(
            f"pgjournal.run {run.workflow}", context=parent, kind=otel.SpanKind.CONSUMER,
            attributes=attributes, links=links, record_exception=False,
            set_status_on_exception=False) as span:
        try:
            return await coro
        except BaseException as exc:
            _end_with_exception(otel, span, exc)
            raise


# -- the run: journaled calls ---------------------------------------------------------

#: kind -> how a call names itself: (name, occurrence) from the run and the arguments.
_IDENTITY: dict[str, Callable[[Journaled, tuple[Any, ...], dict[str, Any]], tuple[Any, Any]]] = {
    "rate": lambda run, a, kw: (f"rate:{a[2]}", a[1]),  # take_units(engine, pos, occ, bucket)
}


def _identity(kind: str, run: Journaled, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[Any, Any]:
    special = _IDENTITY.get(kind)
    if special is not None:
        return special(run, args, kwargs)
    name = args[0] if args else kwargs.get("name", kwargs.get("workflow"))
    if not isinstance(name, str):
        return None, None
    return name, run.next_occurrence(name)  # the occurrence the call is about to take


def traced(kind: str) -> Callable[[F], F]:
    """Decorate a journaled call (an async function of the run's engine whose
    first argument after it is the call's name): one ``pgjournal.<kind> <name>`` span per call."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(run: Journaled, *args: Any, **kwargs: Any) -> Any:
            otel = _otel()
            if otel is None:
                return fn(run, *args, **kwargs)
            return _call(otel, kind, fn, run, args, kwargs)
        return cast(F, wrapper)
    return decorate


async def _call(otel: Any, kind: str, fn: Callable[..., Awaitable[T]], run: Journaled,
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    # No await before ``fn`` starts: the occurrence read here is the one it takes.
    name, occurrence = _identity(kind, run, args, kwargs)
    if name is None:
        return await fn(run, *args, **kwargs)
    span = _tracer(otel).start_span(f"pgjournal.{kind} {name}",
                                    attributes=_call_attributes(run, kind, name, occurrence))
    token = _call_span.set(span)
    try:
        with otel.use_span(span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False):
            return await fn(run, *args, **kwargs)
    except BaseException as exc:
        _end_with_exception(otel, span, exc)
        raise
    finally:
        _call_span.reset(token)
        span.end()


def _call_attributes(run: RunFacts, kind: str, name: str, occurrence: Any) -> dict[str, Any]:
    return {**_run_attributes(run), "pgjournal.step.kind": kind, "pgjournal.step.name": name,
            "pgjournal.step.occurrence": occurrence, "pgjournal.replayed": False}


def traced_stream(fn: F) -> F:
    """Decorate ``stream_step`` (of the run's engine): one ``pgjournal.stream <name>``
    span from the first chunk asked for to the end of the iteration (not made current: the
    workflow's code runs between chunks)."""
    @functools.wraps(fn)
    def wrapper(run: Journaled, name: Any, *args: Any, **kwargs: Any) -> Any:
        otel = _otel()
        if otel is None or not isinstance(name, str):
            return fn(run, name, *args, **kwargs)
        occurrence = run.next_occurrence(name)
        return _stream(otel, run, name, occurrence, fn(run, name, *args, **kwargs))
    return cast(F, wrapper)


async def _stream(otel: Any, run: Journaled, name: str, occurrence: int,
                  chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    span = _tracer(otel).start_span(f"pgjournal.stream {name}",
                                    attributes=_call_attributes(run, "stream", name, occurrence))
    count = 0
    try:
        while True:
            token = _call_span.set(span)
            try:
                value = await anext(chunks)
            except StopAsyncIteration:
                break
            finally:
                _call_span.reset(token)
            count += 1
            yield value
    except GeneratorExit:
        span.set_attribute("pgjournal.stream.cut", True)
        raise
    except BaseException as exc:
        _end_with_exception(otel, span, exc)
        raise
    finally:
        span.set_attribute("pgjournal.stream.chunks", count)
        try:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            span.end()


def replayed() -> None:
    """The journaled call in progress was answered from the journal."""
    span = _call_span.get()
    if span is not None:
        span.set_attribute("pgjournal.replayed", True)
