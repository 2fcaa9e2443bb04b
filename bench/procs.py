"""Worker processes for the harness: spawn, wait until ready, collect latencies, stop.

Workers are real OS processes (``python -m bench.workerproc``), because that
is how queues are deployed and because two workers in one Python process
would share one GIL and one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


class WorkerPool:
    """``count`` worker processes of one system, as an async context manager."""

    def __init__(self, system: str, dsn: str, mode: str, *, count: int = 1,
                 concurrency: int = 10, lease: float = 30.0, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.system, self.dsn, self.mode = system, dsn, mode
        self.count, self.concurrency, self.lease = count, concurrency, lease
        self.log_dir = log_dir
        self.env = env or {}
        self.procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        self._ready = 0
        self._ready_event = asyncio.Event()
        self.latencies: list[float] = []
        self._lat_event = asyncio.Event()

    async def start_one(self, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        """Start one more worker process (S5 starts the replacement this way)."""
        n = len(self.procs)
        log = (self.log_dir / f"{self.system}-{self.mode}-{os.getpid()}-{n}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.workerproc", self.system, self.dsn, self.mode,
            str(self.concurrency), str(self.lease),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})},
        )
        log.close()
        self.procs.append(proc)
        self._readers.append(asyncio.create_task(self._read(proc)))
        return proc

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line == "READY":
                self._ready += 1
                self._ready_event.set()
            elif line.startswith("LAT "):
                self.latencies.append(float(line[4:]))
                self._lat_event.set()

    async def wait_ready(self, n: int | None = None, timeout: float = 120.0) -> None:
        """Until ``n`` (default: all started) processes said READY."""
        want = len(self.procs) if n is None else n
        deadline = time.monotonic() + timeout
        while self._ready < want:
            dead = [p for p in self.procs if p.returncode is not None]
            if dead:
                raise RuntimeError(f"{self.system} worker exited with {dead[0].returncode} "
                                   f"before it was ready; see {self.log_dir}")
            self._ready_event.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.system} workers not ready after {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready_event.wait(), min(left, 0.5))

    async def wait_latencies(self, n: int, timeout: float) -> list[float]:
        """Until ``n`` timed jobs reported their latency (returns what arrived)."""
        deadline = time.monotonic() + timeout
        while len(self.latencies) < n and time.monotonic() < deadline:
            self._lat_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lat_event.wait(),
                                       max(0.01, deadline - time.monotonic()))
        return list(self.latencies)

    def kill(self, index: int) -> None:
        """SIGKILL one worker: a crash, not a shutdown."""
        proc = self.procs[index]
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)

    async def stop(self, grace: float = 10.0) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        for task in self._readers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> WorkerPool:
        for _ in range(self.count):
            await self.start_one()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
