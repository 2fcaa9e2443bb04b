"""The one small interface every benchmarked system implements.

An adapter has two halves. The *client* half runs in the harness process: it
installs the system's schema into a database of its own, empties it between
measurements, enqueues jobs and counts the unfinished ones. The *worker* half
(``serve``) runs in a separate worker process started by ``bench.workerproc``,
so worker throughput is measured across real processes, as deployed.

Job bodies are no-ops. A job carries one float, ``t0``: the wall-clock time
the harness took just before enqueueing it (0 when not timed). A body that
gets ``t0 > 0`` reports ``time.time() - t0`` on its stdout (see
:func:`report_latency`): that is the S3 wake-up latency, measured without a
database write in the way.
"""

from __future__ import annotations

import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import psycopg

#: Scenario capabilities an adapter may declare.
ENQUEUE = "enqueue"  # S1 one at a time
BATCH = "batch"  # S1 batches (and S2 release in one transaction)
QUEUE = "queue"  # S2/S3: workers drain a queue
WORKFLOW = "workflow"  # S4: 3 journaled steps per run
RECOVERY = "recovery"  # S5: a killed worker's run resumes from its journal
SCALE = "scale"  # S6: tables can be pre-filled with finished history

#: Worker modes (what ``serve`` runs).
MODE_NOOP = "noop"  # no-op jobs (S2, S3, S6)
MODE_STEPS = "steps"  # 3-step journaled workflows (S4)
MODE_RECOVER = "recover"  # 3-step workflows that record side effects (S5)


def report_latency(t0: float) -> None:
    """Print the wake-up latency of a job whose body starts now.

    Written as one line on stdout, which the harness reads from the worker's
    pipe: wall clocks of processes on one host agree, and no database write
    sits between the body starting and the timestamp being taken.
    """
    if t0 > 0:
        ms = (time.time() - t0) * 1000.0
        sys.stdout.write(f"LAT {ms:.3f}\n")
        sys.stdout.flush()


def announce_ready() -> None:
    """Tell the harness this worker is connected and serving."""
    sys.stdout.write("READY\n")
    sys.stdout.flush()


class Adapter(ABC):
    """One benchmarked system. Subclasses live in ``bench/adapters/<name>.py``."""

    #: Name in tables and JSON.
    name: ClassVar[str]
    #: Capabilities (see the constants above); scenarios skip what is missing.
    features: ClassVar[frozenset[str]]
    #: One line on how the system was configured (concurrency, polling ...).
    config_note: ClassVar[str] = ""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @staticmethod
    @abstractmethod
    def version() -> str:
        """The installed version of the system."""

    # -- client half (harness process) ------------------------------------

    @abstractmethod
    async def setup(self) -> None:
        """Install the system's schema into ``self.dsn`` (a database of its own)."""

    @abstractmethod
    async def reset(self) -> None:
        """Remove every job, run and journal entry, so measurements start equal."""

    async def close(self) -> None:  # noqa: B027 - most adapters have nothing to close
        """Release client connections."""

    @abstractmethod
    async def enqueue_one(self, t0: float = 0.0, mode: str = MODE_NOOP) -> None:
        """Enqueue one job (S1, S3) the way an application would, one call per job."""

    async def enqueue_batch(self, n: int, mode: str = MODE_NOOP) -> None:
        """Enqueue ``n`` jobs in one transaction (only with the ``batch`` feature)."""
        raise NotImplementedError(f"{self.name} has no batch enqueue")

    @abstractmethod
    async def unfinished(self) -> int:
        """How many enqueued jobs have not finished yet (committed as done)."""

    async def any_unfinished(self) -> bool:
        """Whether any job is unfinished: the drain's stop condition, polled every
        20 ms, so adapters answer it from an index (a count over the queue cost
        pgjournal's server 5 ms per poll at 20,000 jobs, a quarter of a core)."""
        return await self.unfinished() > 0

    async def failed(self) -> int:
        """How many jobs failed (a benchmark with failures is void)."""
        return 0

    async def fill_history(self, runs: int, steps_per_run: int) -> None:
        """Insert ``runs`` finished runs with their journals (S6, ``scale`` feature)."""
        raise NotImplementedError(f"{self.name} cannot be pre-filled")

    async def effects(self) -> dict[str, int]:
        """S5: how many times each step of the recovery workflow really ran."""
        raise NotImplementedError(f"{self.name} has no recovery scenario")

    async def enqueue_recover(self) -> None:
        """S5: enqueue one recovery workflow."""
        raise NotImplementedError(f"{self.name} has no recovery scenario")

    # -- worker half (worker process) --------------------------------------

    @abstractmethod
    async def serve(self, mode: str, concurrency: int, lease: float,
                    on_ready: Callable[[], None]) -> None:
        """Serve the queue in this process until SIGTERM; call ``on_ready`` once serving.

        In ``recover`` mode with ``BENCH_BLOCK=1`` in the environment, step 2
        records its side effect and then hangs, so the harness can SIGKILL
        the process in the middle of it.
        """


_effect_conn: dict[str, psycopg.Connection[tuple[object, ...]]] = {}

EFFECTS_DDL = """CREATE TABLE IF NOT EXISTS bench_effects (
    id bigserial PRIMARY KEY, run text NOT NULL, step text NOT NULL,
    pid integer NOT NULL, at timestamptz NOT NULL DEFAULT now())"""


def record_effect(dsn: str, run: str, step: str) -> str:
    """A committed side effect of step ``step`` of ``run`` (S5 counts them).

    With ``BENCH_BLOCK=1``, step ``s2`` hangs after committing its effect: the
    harness kills the worker there.
    """
    conn = _effect_conn.get(dsn)
    if conn is None or conn.closed:
        conn = _effect_conn[dsn] = psycopg.connect(dsn, autocommit=True)
    conn.execute("INSERT INTO bench_effects (run, step, pid) VALUES (%s, %s, %s)",
                 (run, step, os.getpid()))
    if step == "s2" and os.environ.get("BENCH_BLOCK") == "1":
        time.sleep(3600)
    return step


async def count_effects(dsn: str) -> dict[str, int]:
    """Executions per step name recorded by :func:`record_effect`."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT step, count(*) FROM bench_effects GROUP BY step")
        return {str(step): int(n) for step, n in await cur.fetchall()}


def as_url(dsn: str) -> str:
    """``dsn`` as a ``postgresql://`` URL (for libraries that take only URLs)."""
    from urllib.parse import quote

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = quote(str(info.get("user", "postgres")))
    password = f":{quote(str(info['password']))}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    return f"postgresql://{user}{password}@{host}:{port}/{info.get('dbname', 'postgres')}"


async def scalar(dsn: str, query: str) -> int:
    """One integer from ``query`` on a short-lived connection."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query.encode())
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0


async def execute(dsn: str, query: str) -> None:
    """Run ``query`` (no parameters) on a short-lived connection."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(query.encode())
