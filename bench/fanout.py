"""Fan-out: one parent spawns N children and waits for all (issue 11).

    python -m bench.fanout [--dsn DSN] [--children 1000] [--concurrency 10]

In one run, on one server, with one worker of ``--concurrency`` slots:

1. **tree**: a parent run spawns ``--children`` child runs (``run.spawn_many``,
   one round trip) and waits for all of them (``run.wait_all``); timed from
   the worker's start to the parent's completion;
2. **flat**: the same number of the same child runs, enqueued by a client
   beforehand, timed from the worker's start until all have completed.

The worker's slots are sampled every 20 ms: how many are busy, and whether the
parent holds one. A parent that held its slot while waiting would show up in
nearly every sample (and with ``--concurrency 1`` the tree would never end).
The ratio tree/flat is the cost of the tree (the spawn, the parent's two
executions and its wake-up) over running the same children without a parent.
Without ``--dsn`` a throwaway embedded server is used (fsync on).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import psycopg

import pgjournal
from pgjournal.embedded import throwaway_server

SCHEMA = "bench_fanout"


def build_app(dsn: str) -> pgjournal.App:
    app = pgjournal.App(dsn, schema=SCHEMA, poll_interval=0.5)

    @app.workflow()
    async def child(run: pgjournal.Run, i: int) -> int:
        def work() -> int:
            return i * 2
        return await run.step("work", work)  # type: ignore[no-any-return]

    @app.workflow()
    async def parent(run: pgjournal.Run, n: int) -> int:
        kids = await run.spawn_many("child", list(range(n)))
        return sum(await run.wait_all(kids))

    return app


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    pgjournal.migrate(dsn, schema=SCHEMA)


async def completed(app: pgjournal.App, workflow: str) -> int:
    store = await app.store()
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*) AS n FROM {SCHEMA}.runs WHERE workflow = %s "
            "AND status = 'completed'", (workflow,))
        row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def measure(dsn: str, kind: str, n: int, concurrency: int) -> dict[str, Any]:
    reset(dsn)
    app = build_app(dsn)
    try:
        parent_id = None
        if kind == "tree":
            parent_id = (await app.start("parent", n)).run_id
        else:
            for i in range(n):
                await app.start("child", i)
        worker = pgjournal.Worker(app, concurrency=concurrency, lease=30)
        samples: list[tuple[int, bool]] = []
        t0 = time.perf_counter()
        task = asyncio.create_task(worker.run(handle_signals=False))

        async def sample() -> None:
            while True:
                inflight = worker._inflight  # a bench may look inside
                samples.append((len(inflight), parent_id in inflight))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        if kind == "tree":
            assert parent_id is not None
            total = await app.handle(parent_id).result(timeout=600)
            assert total == sum(2 * i for i in range(n)), total
        else:
            while await completed(app, "child") < n:  # noqa: ASYNC110 - polling the DB
                await asyncio.sleep(0.02)
        seconds = time.perf_counter() - t0
        sampler.cancel()
        worker.stop()
        await task
    finally:
        await app.close()
    busy = [b for b, _ in samples]
    held = sum(1 for _, p in samples if p)
    return {"kind": kind, "seconds": seconds, "per_s": n / seconds,
            "busy_mean": statistics.fmean(busy) if busy else 0.0,
            "busy_max": max(busy, default=0), "samples": len(samples),
            "parent_held": held}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", help="server to use (default: a throwaway embedded server)")
    ap.add_argument("--children", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=10)
    args = ap.parse_args()

    def go(dsn: str) -> None:
        print(f"fan-out of {args.children} children, one worker of {args.concurrency} "
              "slots, same server, same run", flush=True)
        rows = [asyncio.run(measure(dsn, kind, args.children, args.concurrency))
                for kind in ("flat", "tree")]
        print(f"{'':6} {'seconds':>8} {'runs/s':>8} {'busy mean':>10} {'busy max':>9} "
              f"{'samples':>8} {'parent holds a slot':>20}")
        for r in rows:
            held = "-" if r["kind"] == "flat" else f"{r['parent_held']}/{r['samples']}"
            print(f"{r['kind']:6} {r['seconds']:8.2f} {r['per_s']:8.0f} "
                  f"{r['busy_mean']:10.1f} {r['busy_max']:9d} {r['samples']:8d} {held:>20}")
        print(f"tree / flat time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x")

    if args.dsn:
        go(args.dsn)
    else:
        with throwaway_server(settings={}) as server:
            go(server.dsn)


if __name__ == "__main__":
    main()
