"""Workflows whose code changes between worker processes (patches, forks).

    python -m tests.procs_codechange DSN SCHEMA [--lease S]

``PGJ_CODE`` picks the version of the ``billing`` workflow the worker has:

* ``v1``: fetch, charge (plain), notify;
* ``v2``: ``if run.patched("retry-with-backoff")``: setup-backoff, charge
  (with back-off) -- else the v1 charge;
* ``v3``: ``run.deprecate_patch("retry-with-backoff")``, then the new path only;
* ``v4``: the new path only, the deprecation removed.

``agent`` (for forks): plan, a stream "think", a draft made with the prompt
``PGJ_PROMPT`` (default "old"), review.

Steps record each execution in ``<schema>.test_effects`` (``tests.procs``), under
the label they return. ``PGJ_HOLD=<run id>:<label>,...`` makes a step of that run
hang after recording itself (the test then kills the process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

import pgjournal

from . import procs


def act(run_id: str, label: str) -> str:
    """A side effect (one committed row), held when ``PGJ_HOLD`` names it."""
    procs.effect(run_id, label)
    if f"{run_id}:{label}" in os.environ.get("PGJ_HOLD", "").split(","):
        time.sleep(3600)
    return label


async def thoughts(run_id: str, n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield await asyncio.to_thread(act, run_id, f"thought{i}")


def build_app(dsn: str, schema: str) -> pgjournal.App:
    app = procs.build_app(dsn, schema)   # sets where effects are written
    code = os.environ.get("PGJ_CODE", "v1")

    @app.workflow(max_attempts=1)
    async def billing(run: pgjournal.Run) -> list[str]:
        rid = str(run.id)
        fetched = await run.step("fetch", act, rid, "fetch")
        if code == "v1":
            charged = await run.step("charge", act, rid, "charge-plain")
        elif code == "v2":
            if run.patched("retry-with-backoff"):
                await run.step("setup-backoff", act, rid, "setup-backoff")
                charged = await run.step("charge", act, rid, "charge-backoff")
            else:
                charged = await run.step("charge", act, rid, "charge-plain")
        else:
            if code == "v3":
                run.deprecate_patch("retry-with-backoff")
            await run.step("setup-backoff", act, rid, "setup-backoff")
            charged = await run.step("charge", act, rid, "charge-backoff")
        notified = await run.step("notify", act, rid, "notify")
        return [fetched, charged, notified]

    @app.workflow(max_attempts=1)
    async def agent(run: pgjournal.Run, topic: str) -> list[str]:
        rid = str(run.id)
        prompt = os.environ.get("PGJ_PROMPT", "old")
        plan = await run.step("plan", act, rid, f"plan-{topic}")
        thought = [t async for t in run.stream_step("think", thoughts, rid, 3)]
        draft = await run.step("draft", act, rid, f"draft-{prompt}")
        review = await run.step("review", act, rid, "review")
        return [plan, *thought, draft, review]

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--lease", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(args.dsn, args.schema)
    worker = pgjournal.Worker(app, queues=["default"], concurrency=8, lease=args.lease,
                              grace_period=5.0)

    async def serve() -> None:
        try:
            await worker.run()
        finally:
            await app.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
