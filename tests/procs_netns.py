"""The workflow and worker entry point of ``tests/test_netns.py``.

    python -m tests.procs_netns DSN SCHEMA --log PATH [--concurrency N] [--lease S]

``ticker(n, pause)`` runs the step ``tick`` ``n`` times (occurrences 0..n-1),
pausing between them. Each execution of the step function

1. appends ``{"ev": "start", ...}`` to the local file ``--log`` (this host's
   own record: written even while the host is cut off from the database),
2. inserts a row into ``<schema>.test_effects`` (the side effect the database
   sees; on a cut-off host this waits on the network until the link is back),
3. appends ``{"ev": "end", ...}`` and returns ``"tick<i>@<pid>"``, so the
   journal says which process executed each entry.

Times are ``time.time()``: every namespace shares the machine's one clock
(network namespaces do not virtualise time), the one PostgreSQL's ``now()``
reads too, so they compare with database timestamps.

Holding a run (only in a process started with ``PGJ_NETNS_GATES=<dir>``): with
``hold_at=i`` and ``gate=g`` the run waits at occurrence ``i`` until the file
``<dir>/<g>`` exists; ``hold="inside"`` waits inside the step function, after
its start note and before its side effect (a step in flight: its journal write
comes after the gate opens), ``hold="between"`` waits in the workflow before
the step (noted as ``{"ev": "held"}``; the step must then pass the lease guard).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

import psycopg

import pgjournal

_conn: psycopg.Connection[Any] | None = None
_lock = threading.Lock()
_target: tuple[str, str, str] = ("", "", "")


def _note(ev: str, run_id: str, label: str) -> None:
    line = json.dumps({"ev": ev, "run": run_id, "label": label, "pid": os.getpid(),
                       "t": time.time()}) + "\n"
    fd = os.open(_target[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def wait_gate(run_id: str, label: str, gate: str, *, between: bool) -> None:
    """Wait for ``<PGJ_NETNS_GATES>/<gate>`` (nothing without that variable)."""
    gates = os.environ.get("PGJ_NETNS_GATES")
    if not gates or not gate:
        return
    if between:
        _note("held", run_id, label)
    path = os.path.join(gates, gate)
    while not os.path.exists(path):
        time.sleep(0.02)


def effect(run_id: str, label: str, gate: str = "") -> str:
    global _conn
    dsn, schema, _ = _target
    _note("start", run_id, label)
    wait_gate(run_id, label, gate, between=False)
    with _lock:
        for attempt in range(100):
            try:
                if _conn is None or _conn.closed:
                    _conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
                _conn.execute(
                    f'INSERT INTO "{schema}".test_effects (run_id, step, pid) '
                    "VALUES (%s, %s, %s)", (run_id, label, os.getpid()))
                break
            except psycopg.OperationalError:
                if attempt == 99:
                    raise
                _conn = None
                time.sleep(0.2)
    _note("end", run_id, label)
    return f"{label}@{os.getpid()}"


def build_app(dsn: str, schema: str, log_path: str = "/dev/null") -> pgjournal.App:
    global _target
    _target = (dsn, schema, log_path)
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)

    @app.workflow(max_recoveries=20)
    async def ticker(run: pgjournal.Run, n: int, pause: float, hold_at: int = -1,
                     hold: str = "inside", gate: str = "") -> int:
        rid = str(run.id)
        for i in range(n):
            label, held = f"tick{i}", gate if i == hold_at else ""
            if held and hold == "between":
                await asyncio.to_thread(wait_gate, rid, label, held, between=True)
            inside = held if hold == "inside" else ""
            await run.step("tick", effect, rid, label, inside)
            await asyncio.sleep(pause)
        return n

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--log", required=True, help="this process's local effect log")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=3.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(created).3f %(asctime)s %(name)s %(message)s")
    app = build_app(args.dsn, args.schema, args.log)
    worker = pgjournal.Worker(app, queues=["default"], concurrency=args.concurrency,
                              lease=args.lease, grace_period=5.0)

    async def serve() -> None:
        try:
            await worker.run()
        finally:
            await app.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
