"""Prometheus metrics: database-wide gauges and a worker's own counters.

Two sources, both rendered in the Prometheus text exposition format (0.0.4):

* ``collect(app)`` reads the database-wide gauges (queue depth and lag, runs
  ended and lease takeovers in a recent window, worker slots, concurrency keys
  at their limit, rate buckets) with the named statements of
  ``sql/metrics.sql``: one index-backed statement each, in one read-only
  snapshot. ``pgjournal metrics`` serves it over HTTP.
* ``WorkerMetrics`` (``worker.metrics``) counts what one worker process did:
  runs claimed, completed, failed, retried, suspended, fenced off (lost
  leases), step durations, claim latency, slots busy and free. No database
  query: ``Worker(metrics_port=...)`` / ``pgjournal worker --metrics-port``
  serve it.

The text format is written here (it is a few lines of escaping), so neither
needs ``prometheus_client``: no extra to install, and no process-global
registry (several workers in one process each keep their own counters).
``serve_metrics`` is a minimal asyncio HTTP/1.1 server (GET ``/metrics``),
bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import errors as pgerr
from psycopg import sql

from ._sql import named_queries, schema_query
from .roles import permission_denied

if TYPE_CHECKING:
    from .app import App
    from .store import Claim, Store

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The window of the "recent" gauges (runs ended, lease takeovers), in seconds.
DEFAULT_WINDOW = 300.0
DEFAULT_PORT = 9464
DEFAULT_HOST = "127.0.0.1"
#: Seconds a scrape's statements may take in all before the scrape fails.
SCRAPE_TIMEOUT = 5.0

ENDED = ("completed", "failed", "cancelled", "dead")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Labels = tuple[tuple[str, str], ...]


# -- the text format ------------------------------------------------------------


@dataclass
class Family:
    """One metric: name, type (``gauge``, ``counter``, ``histogram``), help text,
    and its samples as (name suffix, labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, tuple(labels.items()), float(value)))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family]) -> str:
    """The families in the Prometheus text format (a family without samples is skipped)."""
    out: list[str] = []
    for fam in families:
        if not fam.samples:
            continue
        help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {fam.name} {help_text}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for suffix, labels, value in fam.samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{fam.name}{suffix}{{{label_text}}} {_number(value)}" if label_text
                       else f"{fam.name}{suffix} {_number(value)}")
    return "\n".join(out) + "\n" if out else ""


class Histogram:
    """Cumulative buckets, sum and count per label set (observations in seconds)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, labels: Labels = ()) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.buckets) + 2)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                series[i] += 1
        series[-2] += value
        series[-1] += 1

    def count(self, labels: Labels = ()) -> int:
        series = self._series.get(labels)
        return int(series[-1]) if series else 0

    def family(self, name: str, help_: str) -> Family:
        fam = Family(name, "histogram", help_)
        for labels, series in sorted(self._series.items()):
            for bound, n in zip(self.buckets, series, strict=False):
                fam.samples.append(("_bucket", (*labels, ("le", _number(bound))), n))
            fam.samples.append(("_bucket", (*labels, ("le", "+Inf")), series[-1]))
            fam.samples.append(("_sum", labels, series[-2]))
            fam.samples.append(("_count", labels, series[-1]))
        return fam


# -- database-wide gauges -------------------------------------------------------------


def metrics_query(name: str, schema: str) -> sql.Composed:
    """The named statement of ``sql/metrics.sql`` for ``schema``."""
    return schema_query(named_queries("metrics.sql")[name], schema)


def query_names() -> list[str]:
    return list(named_queries("metrics.sql"))


async def fetch_rows(app: App, *, window: float = DEFAULT_WINDOW
                     ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Every named statement's rows, in one read-only snapshot, and the seconds
    each took (as the client saw them). A role that may not read them (the
    worker role of ``sql/roles.sql``) gets ``PermissionDenied`` naming the
    reader role."""
    store = await app.store()
    rows: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    async with store.pool.connection() as conn:
        try:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                await conn.execute(f"SET LOCAL statement_timeout = {int(SCRAPE_TIMEOUT * 1000)}")
                for name in query_names():
                    started = time.perf_counter()
                    cur = await conn.execute(metrics_query(name, app.schema), {"window": window})
                    rows[name] = [dict(r) for r in await cur.fetchall()]
                    seconds[name] = time.perf_counter() - started
        except pgerr.InsufficientPrivilege as exc:
            # e.g. scraping as the worker role, which reads no view: say which role to use.
            raise permission_denied(exc, schema=app.schema, user=conn.info.user) from exc
    return rows, seconds


async def collect_families(app: App, *, window: float = DEFAULT_WINDOW) -> list[Family]:
    """The database-wide gauges of ``app``'s schema, as families."""
    started = time.perf_counter()
    rows, seconds = await fetch_rows(app, window=window)
    queue_runs = Family("pgjournal_queue_runs", "gauge",
                        "Unfinished runs per queue and state: due (queued, waiting for a "
                        "worker), delayed (queued, not due yet), running, suspended.")
    expired = Family("pgjournal_queue_expired_leases", "gauge",
                     "Running runs whose lease ran out (their worker is gone or frozen).")
    claimable = Family("pgjournal_queue_claimable", "gauge",
                       "Runs a worker could claim now: due, timer fired, lease expired.")
    lag = Family("pgjournal_queue_oldest_due_seconds", "gauge",
                 "How long the oldest claimable run of the queue has been due (0: none).")
    paused = Family("pgjournal_queue_paused", "gauge", "1 if the queue is paused.")
    limit = Family("pgjournal_queue_concurrency_limit", "gauge",
                   "The queue's limit of runs at once (queues with a limit only).")
    queues: set[str] = set()
    for r in rows["queues"]:
        q = r["queue"]
        queues.add(q)
        for state, column in (("due", "queued_due"), ("delayed", "delayed"),
                              ("running", "running"), ("suspended", "suspended")):
            queue_runs.add(r[column], queue=q, state=state)
        expired.add(r["expired_leases"], queue=q)
        claimable.add(r["claimable"], queue=q)
        lag.add(r["oldest_due_seconds"], queue=q)
        paused.add(1 if r["paused"] else 0, queue=q)
        if r["concurrency_limit"] is not None:
            limit.add(r["concurrency_limit"], queue=q)

    ended = Family("pgjournal_runs_ended_recent", "gauge",
                   f"Runs that ended in the last {window:g} seconds, by queue and final "
                   "status (from run_events).")
    takeovers = Family("pgjournal_lease_takeovers_recent", "gauge",
                       f"Running runs claimed again after their lease expired, in the last "
                       f"{window:g} seconds (crash recoveries and interruptions).")
    recent: dict[tuple[str, str], int] = {(r["queue"], r["kind"]): r["n"]
                                          for r in rows["recent"]}
    queues |= {q for q, _ in recent}
    for q in sorted(queues):
        for status in ENDED:
            ended.add(recent.get((q, status), 0), queue=q, status=status)
        takeovers.add(recent.get((q, "takeover"), 0), queue=q)
    window_fam = Family("pgjournal_recent_window_seconds", "gauge",
                        "The window of the *_recent gauges.")
    window_fam.add(window)

    workers = Family("pgjournal_workers", "gauge",
                     "Registered workers by state (alive, gone, stale, stopped).")
    slots = Family("pgjournal_worker_slots", "gauge",
                   "Slots (concurrency) of alive workers: busy (holding a running run) "
                   "and free.")
    by_state = {r["state"]: r for r in rows["workers"]}
    for state in ("alive", "gone", "stale", "stopped"):
        workers.add(by_state[state]["workers"] if state in by_state else 0, state=state)
    alive = by_state.get("alive")
    busy = int(alive["busy"]) if alive else 0
    total = int(alive["slots"]) if alive else 0
    slots.add(busy, state="busy")
    slots.add(max(total - busy, 0), state="free")

    keys = Family("pgjournal_concurrency_keys", "gauge",
                  "Concurrency keys with unfinished runs, and those at their limit.")
    behind = Family("pgjournal_concurrency_keys_queued", "gauge",
                    "Queued runs that carry a concurrency key.")
    k = rows["concurrency_keys"][0]
    keys.add(k["keys"], state="active")
    keys.add(k["at_limit"], state="at_limit")
    behind.add(k["queued_behind"])

    available = Family("pgjournal_rate_bucket_available", "gauge",
                       "Units in the rate bucket now (negative: takers wait for the refill).")
    capacity = Family("pgjournal_rate_bucket_capacity", "gauge", "The rate bucket's capacity.")
    for r in rows["rate_buckets"]:
        available.add(r["available"], bucket=r["name"])
        capacity.add(r["capacity"], bucket=r["name"])

    cost = Family("pgjournal_scrape_query_seconds", "gauge",
                  "Seconds each statement of this scrape took.")
    for name, s in seconds.items():
        cost.add(s, query=name)
    scrape = Family("pgjournal_scrape_seconds", "gauge", "Seconds this scrape took.")
    scrape.add(time.perf_counter() - started)
    return [queue_runs, expired, claimable, lag, paused, limit, ended, takeovers, window_fam,
            workers, slots, keys, behind, available, capacity, *_lag_families(rows), cost,
            scrape]


def _lag_families(rows: dict[str, list[dict[str, Any]]]) -> list[Family]:
    """The lag of resumptions and of new runs, apart (statement ``queue_lag``).

    A claim takes a run that already started (timer due, signal arrived,
    children ended, lease expired) ahead of new runs of its priority, so the
    two lags tell different stories: a resumption lag that grows means the
    workers do not keep up with work in progress (timers fire late, crashed
    runs wait); a new-run lag that grows alone means a backlog of new work.
    """
    lag = Family("pgjournal_queue_lag_seconds", "gauge",
                 "How long the oldest claimable run of the kind has been due (0: none); "
                 "kind=resumption: it started before (timer, signal, children, expired "
                 "lease), claimed first; kind=new: it never started.")
    due = Family("pgjournal_queue_due_runs", "gauge",
                 "Claimable runs of the queue by kind (resumption, new).")
    for r in rows["queue_lag"]:
        lag.add(r["resumption_seconds"], queue=r["queue"], kind="resumption")
        lag.add(r["new_seconds"], queue=r["queue"], kind="new")
        due.add(r["resumptions_due"], queue=r["queue"], kind="resumption")
        due.add(r["new_due"], queue=r["queue"], kind="new")
    return [lag, due]


async def collect(app: App, *, window: float = DEFAULT_WINDOW) -> str:
    """The database-wide gauges of ``app``'s schema in the Prometheus text format.

    The statements of ``sql/metrics.sql`` in one read-only snapshot, each
    index-backed: the cost does not grow with the history of finished runs.
    """
    return render(await collect_families(app, window=window))


# -- a worker's own counters ------------------------------------------------------------


class WorkerMetrics:
    """What one worker did since it started; kept in memory, read by ``render()``.

    Updated and read on the worker's event loop (no locks: plain increments).
    """

    def __init__(self, concurrency: int, busy: Callable[[], int]) -> None:
        self.concurrency = concurrency
        self._busy = busy
        self.claimed: dict[str, int] = {}
        self.completed: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.retried: dict[str, int] = {}
        self.suspended: dict[str, int] = {}
        self.fenced: dict[str, int] = {}
        self.steps = Histogram(STEP_BUCKETS)
        self.claims = Histogram(CLAIM_BUCKETS)

    @staticmethod
    def _bump(counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1

    def run_claimed(self, workflow: str) -> None:
        self._bump(self.claimed, workflow)

    def run_completed(self, workflow: str) -> None:
        self._bump(self.completed, workflow)

    def run_failed(self, workflow: str, status: str) -> None:
        """An attempt raised and ``fail_run`` answered ``status``."""
        if status == "queued":
            self._bump(self.retried, workflow)
        elif not status.startswith("lost:"):
            self._bump(self.failed, workflow)

    def run_suspended(self, workflow: str) -> None:
        self._bump(self.suspended, workflow)

    def lease_lost(self, status: str) -> None:
        """A write of this worker was fenced off (the run is no longer ours)."""
        if status == "database unavailable":
            return  # not a fencing: the database went away
        what = status.removeprefix("lost:").removeprefix("now ")
        reason = next((r for r in ("cancelled", "deleted") if what.startswith(r)), "lost")
        self._bump(self.fenced, reason)

    def claim_latency(self, seconds: float) -> None:
        self.claims.observe(seconds)

    def step_done(self, workflow: str, status: str, seconds: float) -> None:
        self.steps.observe(max(seconds, 0.0), (("workflow", workflow), ("status", status)))

    def timed(self, store: Store, claim: Claim) -> Store:
        """``store`` for one run, timing its step journal writes (see ``_StepTimer``)."""
        timer: Any = _StepTimer(store, claim, self)
        return timer  # type: ignore[no-any-return]

    def families(self) -> list[Family]:
        def counter(name: str, help_: str, values: dict[str, int], label: str) -> Family:
            fam = Family(name, "counter", help_)
            for key, n in sorted(values.items()):
                fam.add(n, **{label: key})
            return fam

        busy = self._busy()
        slots = Family("pgjournal_worker_slots", "gauge",
                       "This worker's slots: busy (executing a run) and free.")
        slots.add(busy, state="busy")
        slots.add(max(self.concurrency - busy, 0), state="free")
        return [
            counter("pgjournal_worker_runs_claimed_total", "Runs this worker claimed.",
                    self.claimed, "workflow"),
            counter("pgjournal_worker_runs_completed_total", "Runs this worker completed.",
                    self.completed, "workflow"),
            counter("pgjournal_worker_runs_failed_total",
                    "Runs that failed for good on this worker (no attempts left, or "
                    "terminal).", self.failed, "workflow"),
            counter("pgjournal_worker_runs_retried_total",
                    "Attempts that raised on this worker and were requeued for a retry.",
                    self.retried, "workflow"),
            counter("pgjournal_worker_runs_suspended_total",
                    "Runs this worker suspended (signal, timer, children, rate bucket).",
                    self.suspended, "workflow"),
            counter("pgjournal_worker_fenced_total",
                    "Runs this worker stopped because it no longer owned them: lease lost "
                    "(taken over, or not renewed in time), cancelled, deleted.",
                    self.fenced, "reason"),
            self.steps.family("pgjournal_worker_step_seconds",
                              "Duration of the steps this worker executed (not replayed), "
                              "by workflow and journaled status."),
            self.claims.family("pgjournal_worker_claim_seconds",
                               "Round trip of this worker's claim calls."),
            slots,
        ]

    def render(self) -> str:
        return render(self.families())


class _StepTimer:
    """A run's view of the store that times its executed steps.

    ``Run`` journals a step it executed with the time the step started
    (``started_at``, on the run's database-clock estimate: the claim's
    ``db_now`` plus local monotonic time). This proxy reads the same clock
    when the journal write returns, so the duration has no clock skew in it.
    Everything else goes to the store untouched.
    """

    def __init__(self, store: Store, claim: Claim, sink: WorkerMetrics) -> None:
        self._store = store
        self._sink = sink
        self._workflow = claim.workflow
        self._db_now = claim.db_now
        self._mono = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def journal_step(self, **params: Any) -> str | None:
        lost = await self._store.journal_step(**params)
        started = params.get("started_at")
        if lost is None and started is not None and params.get("kind") in ("step", "stream"):
            now = self._db_now.timestamp() + (time.monotonic() - self._mono)
            self._sink.step_done(self._workflow, str(params.get("status")),
                                 now - started.timestamp())
        return lost


# -- serving ------------------------------------------------------------------------


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  body: Callable[[], Awaitable[str]]) -> None:
    status, text, ctype = "500 Internal Server Error", "", "text/plain; charset=utf-8"
    try:
        async with asyncio.timeout(10):
            request = (await reader.readline()).decode("latin-1").split()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
        method, path = [*request, "", ""][:2]
        if method not in ("GET", "HEAD"):
            status, text = "405 Method Not Allowed", "only GET\n"
        elif path.split("?")[0] in ("/metrics", "/metrics/"):
            try:
                status, text, ctype = "200 OK", await body(), CONTENT_TYPE
            except Exception as exc:
                status = "503 Service Unavailable"
                text = f"collecting metrics failed: {type(exc).__name__}: {exc}\n"
        elif path == "/":
            status, text = "200 OK", "pgjournal metrics: GET /metrics\n"
        else:
            status, text = "404 Not Found", "not found: GET /metrics\n"
        data = text.encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        writer.write(head if method == "HEAD" else head + data)
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_metrics(body: Callable[[], Awaitable[str]], *, port: int = DEFAULT_PORT,
                        host: str = DEFAULT_HOST) -> asyncio.Server:
    """Start an HTTP server answering ``GET /metrics`` with ``await body()``.

    Binds ``host`` (127.0.0.1 by default: expose it on purpose, with
    ``host="0.0.0.0"``); port 0 picks a free one (``server.sockets[0]``).
    Close it with ``server.close()``.
    """
    return await asyncio.start_server(lambda r, w: _handle(r, w, body), host, port)


def bound_address(server: asyncio.Server) -> tuple[str, int]:
    """The (host, port) a ``serve_metrics`` server listens on."""
    host, port = server.sockets[0].getsockname()[:2]
    return str(host), int(port)


__all__ = ["CONTENT_TYPE", "DEFAULT_WINDOW", "Family", "Histogram", "WorkerMetrics",
           "bound_address", "collect", "collect_families", "render", "serve_metrics"]
