"""Workflows for tests that run workers as real processes, and their entry point.

    python -m tests.procs DSN SCHEMA [--concurrency N] [--lease S] [--queues a,b]

Step functions record each execution in ``<schema>.test_effects`` (created by
the ``effects`` fixture), so a test can count how often a step really ran.
``PGJ_BLOCK=<step>`` makes that step hang after recording itself (a test then
kills or stops the process); ``PGJ_SLOW=<step>:<seconds>`` slows a step down;
``PGJ_GATE=<step>:<path>`` makes that step wait, after recording itself, until
the file ``path`` exists (a test opens the gate when it is ready: an event, not
a delay).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from typing import Any

import psycopg

import pgjournal

_conn: psycopg.Connection[Any] | None = None
_lock = threading.Lock()
_target: tuple[str, str] = ("", "")


def wait_gate(name: str) -> None:
    """With ``PGJ_GATE=<name>:<path>``, wait until the file ``path`` exists."""
    gate = os.environ.get("PGJ_GATE", "")
    if gate.startswith(name + ":"):
        path = gate.split(":", 1)[1]
        while not os.path.exists(path):
            time.sleep(0.02)


def effect(run_id: str, step: str) -> str:
    """A side effect: one committed row per execution."""
    global _conn
    dsn, schema = _target
    deadline = time.monotonic() + 60
    with _lock:
        while True:  # the database may be restarting under us (server-crash tests)
            try:
                if _conn is None or _conn.closed:
                    # No prepared statements: the DSN may be a transaction-mode pooler.
                    _conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                                            prepare_threshold=None)
                _conn.execute(
                    f'INSERT INTO "{schema}".test_effects (run_id, step, pid) '
                    "VALUES (%s, %s, %s)",
                    (str(run_id), step, os.getpid()),
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                _conn = None
                time.sleep(0.2)
    if os.environ.get("PGJ_BLOCK") == step:
        time.sleep(3600)
    wait_gate(step)
    slow = os.environ.get("PGJ_SLOW", "")
    if slow.startswith(step + ":"):
        time.sleep(float(slow.split(":")[1]))
    return step


def build_app(dsn: str, schema: str) -> pgjournal.App:
    global _target
    _target = (dsn, schema)
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)

    @app.workflow(max_attempts=3, retry_backoff=0.1)
    async def five_steps(run: pgjournal.Run, n: int = 5) -> str:
        done = []
        for i in range(1, n + 1):
            done.append(await run.step(f"s{i}", effect, str(run.id), f"s{i}"))
        return ",".join(done)

    @app.workflow()
    async def waiter(run: pgjournal.Run, names: list[str], timeout: float | None = None) -> Any:
        got = []
        for name in names:
            try:
                got.append(await run.wait_signal(name, timeout=timeout))
            except TimeoutError:
                got.append("timeout")
            await run.step(f"after-{name}", effect, str(run.id), f"after-{name}")
        return got

    @app.workflow()
    async def sleeper(run: pgjournal.Run, seconds: float) -> str:
        await run.step("before", effect, str(run.id), "before")
        await run.sleep("nap", seconds)
        await run.step("after", effect, str(run.id), "after")
        return "rested"

    @app.workflow(queue="limited")
    async def limited(run: pgjournal.Run, hold: float) -> str:
        await run.step("hold", effect, str(run.id), "hold")
        await asyncio.sleep(hold)
        await run.step("release", effect, str(run.id), "release")
        return "ok"

    async def tokens(run_id: str, n: int) -> Any:
        for i in range(n):
            await asyncio.to_thread(effect, run_id, f"tok{i}")
            await asyncio.sleep(0.1)
            yield f"t{i}"

    @app.workflow()
    async def streamer(run: pgjournal.Run, n: int) -> list[str]:
        got = [c async for c in run.stream_step("llm", tokens, str(run.id), n)]
        await run.step("after", effect, str(run.id), "after")
        return got

    @app.workflow()
    async def gap(run: pgjournal.Run) -> str:
        """Two steps with workflow code between them (``PGJ_GATE=gap:<path>`` holds it)."""
        await run.step("s1", effect, str(run.id), "s1")
        await asyncio.to_thread(wait_gate, "gap")
        await run.step("s2", effect, str(run.id), "s2")
        return "ok"

    @app.workflow(max_recoveries=50)
    async def paced(run: pgjournal.Run, n: int, pause: float) -> int:
        for i in range(n):
            await run.step(f"p{i}", effect, str(run.id), f"p{i}")
            await asyncio.sleep(pause)
        return n

    @app.workflow(max_recoveries=1)
    async def fragile(run: pgjournal.Run, n: int, pause: float) -> int:
        """``paced`` that survives one crash recovery only (not server restarts)."""
        for i in range(n):
            await run.step(f"p{i}", effect, str(run.id), f"p{i}")
            await asyncio.sleep(pause)
        return n

    @app.workflow()
    async def noop(run: pgjournal.Run) -> None:
        return None

    @app.workflow(max_attempts=3, retry_backoff=0.1)
    async def parallel(run: pgjournal.Run, branches: int) -> list[list[str]]:
        """Branches of three steps each; the middle one has the same name in all."""
        async def branch(i: int) -> list[str]:
            rid = str(run.id)
            early = await run.step(f"b{i}-early", effect, rid, f"b{i}-early")
            shared = await run.step("shared", effect, rid, f"b{i}-shared")
            late = await run.step(f"b{i}-late", effect, rid, f"b{i}-late")
            return [early, shared, late]
        return list(await asyncio.gather(*[branch(i) for i in range(branches)]))

    @app.workflow(max_recoveries=20)
    async def fanout(run: pgjournal.Run, n: int) -> int:
        """Spawn ``n`` leaves and wait for all (``PGJ_GATE=fanout:<path>`` holds the
        parent between its first step and the spawn)."""
        rid = str(run.id)
        await run.step("before", effect, rid, "before")
        await asyncio.to_thread(wait_gate, "fanout")
        kids = await run.spawn_many("leaf", list(range(n)))
        await run.step("spawned", effect, rid, "spawned")
        values = await run.wait_all(kids)
        await run.step("after", effect, rid, "after")
        return sum(values)

    @app.workflow(max_recoveries=20)
    async def leaf(run: pgjournal.Run, i: int) -> int:
        await run.step("leaf", effect, str(run.id), "leaf")
        return i * 2

    @app.workflow()
    async def keyed(run: pgjournal.Run, hold: float) -> str:
        """One step that records itself and holds its slot ``hold`` seconds."""
        await run.step("work", effect, str(run.id), "work")
        await asyncio.sleep(hold)
        return "done"

    @app.workflow()
    async def metered(run: pgjournal.Run, bucket: str, units: int) -> str:
        """One step that takes ``units`` from rate bucket ``bucket`` first."""
        return await run.step("call", effect, str(run.id), "call",  # type: ignore[no-any-return]
                              rate=(bucket, units))

    @app.workflow(max_attempts=1)
    async def chain(run: pgjournal.Run, n: int) -> int:
        total = 0
        for i in range(n):
            total += await run.step("tick", effect, str(run.id), f"tick{i}") == f"tick{i}"
        return total

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--queues", default="default,limited")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="heartbeat interval (default lease/3); large = held off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(args.dsn, args.schema)
    worker = pgjournal.Worker(app, queues=args.queues.split(","),
                              concurrency=args.concurrency, lease=args.lease,
                              grace_period=5.0, heartbeat_interval=args.heartbeat)

    async def serve() -> None:  # as `pgjournal worker` does: the worker opens the app
        try:
            await worker.run()
        finally:
            await app.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
