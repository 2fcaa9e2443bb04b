"""Enqueue cost vs the number of workers that ever existed (issue 9, row 12).

    python -m bench.stale_workers [--dsn DSN] [--stale 200000] [--n 400]

Every enqueue asks ``notify_wake`` whether a hungry live worker serves the
queue. If that question scans the workers table, enqueues slow down with every
worker that ever started (stopped ones, and vanished ones whose heartbeat is
long past). In one run, on one server, this measures ``start_run`` latency:

1. with no historical workers;
2. after inserting ``--stale`` historical workers (half stopped a month ago,
   half vanished a month ago while hungry), as left by years of deploys;
3. after one more worker registers (``register_worker`` may clean up).

and prints the ratios 2/1 and 3/1 (target: close to 1). One live worker of
the queue is registered throughout and is not hungry (busy), so every enqueue
has to look and find nobody to wake. Without ``--dsn`` a throwaway embedded
server is used (fsync on) and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import psycopg

import pgjournal
from pgjournal.embedded import throwaway_server
from pgjournal.store import Store

SCHEMA = "bench_stale_workers"


async def enqueue_latencies(store: Store, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await store.start_run(uuid.uuid4(), "job", "q", json.dumps({"args": [i]}))
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def insert_stale(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""INSERT INTO {SCHEMA}.workers
                    (id, host, pid, queues, concurrency, started_at, heartbeat_at,
                     stopped_at, hungry)
                SELECT gen_random_uuid(), 'old-host-' || (g %% 50), g, ARRAY['q'], 10,
                       now() - interval '40 days', now() - interval '30 days',
                       CASE WHEN g %% 2 = 0 THEN now() - interval '30 days' END,
                       g %% 2 = 1
                FROM generate_series(1, %s) AS g""", (count,))
        conn.execute(f"ANALYZE {SCHEMA}.workers")


async def register(store: Store, concurrency: int = 10) -> uuid.UUID:
    wid = uuid.uuid4()
    await store.register_worker(wid, "bench-host", 1, ["q"], concurrency)
    return wid


async def measure(dsn: str, stale: int, n: int) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    pgjournal.migrate(dsn, schema=SCHEMA)
    store = await Store.open(dsn, schema=SCHEMA, max_size=2)
    try:
        await register(store)  # the live (busy, not hungry) worker
        await enqueue_latencies(store, 50)  # warm-up
        base = await enqueue_latencies(store, n)
        insert_stale(dsn, stale)
        await enqueue_latencies(store, 20)
        with_stale = await enqueue_latencies(store, n)
        await register(store)  # a deploy starts one more worker
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {SCHEMA}.workers").fetchone()
            left = int(row[0]) if row else -1
        await enqueue_latencies(store, 20)
        after = await enqueue_latencies(store, n)
    finally:
        await store.close()
    (b50, b99), (s50, s99), (a50, a99) = summary(base), summary(with_stale), summary(after)
    print(f"start_run latency, {n} enqueues each (ms)      p50      p99")
    print(f"  0 historical workers                    {b50:8.3f} {b99:8.3f}")
    print(f"  {stale:,} historical workers           {s50:8.3f} {s99:8.3f}   "
          f"p50 ratio {s50 / b50:.2f}x")
    print(f"  after one more worker registered        {a50:8.3f} {a99:8.3f}   "
          f"p50 ratio {a50 / b50:.2f}x  ({left:,} worker rows left)")
    return {"base_p50": b50, "stale_p50": s50, "after_p50": a50,
            "stale_ratio": s50 / b50, "after_ratio": a50 / b50, "rows_left": left}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--stale", type=int, default=200_000)
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    server = None
    dsn = args.dsn
    if dsn is None:
        server = throwaway_server(settings={})
        dsn = server.dsn
    try:
        asyncio.run(measure(dsn, args.stale, args.n))
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
