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

Each phase is measured interleaved with the same enqueues on a clean schema
(no history) on the same server, so both see the same machine load, and the
p50 ratio measured/clean is printed (target: close to 1). One live worker of
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


async def fresh_schema(dsn: str, schema: str) -> Store:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    pgjournal.migrate(dsn, schema=schema)
    store = await Store.open(dsn, schema=schema, max_size=2)
    await register(store)  # the live (busy, not hungry) worker
    return store


async def interleaved(a: Store, b: Store, n: int, rounds: int = 8) -> tuple[list[float],
                                                                           list[float]]:
    """Alternate batches on the two schemas so both see the same machine load."""
    out_a: list[float] = []
    out_b: list[float] = []
    for _ in range(rounds):
        out_a += await enqueue_latencies(a, n // rounds)
        out_b += await enqueue_latencies(b, n // rounds)
    return out_a, out_b


async def measure(dsn: str, stale: int, n: int) -> dict[str, float]:
    clean = await fresh_schema(dsn, SCHEMA + "_clean")
    store = await fresh_schema(dsn, SCHEMA)
    try:
        await interleaved(clean, store, 80)  # warm-up
        base, same = await interleaved(clean, store, n)
        insert_stale(dsn, stale)
        await interleaved(clean, store, 80)
        base2, with_stale = await interleaved(clean, store, n)
        await register(store)  # a deploy starts one more worker
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {SCHEMA}.workers").fetchone()
            left = int(row[0]) if row else -1
        await interleaved(clean, store, 80)
        base3, after = await interleaved(clean, store, n)
    finally:
        await store.close()
        await clean.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA}_clean CASCADE")
    rows = [("both schemas without history", base, same),
            (f"{stale:,} historical workers in one", base2, with_stale),
            (f"... after one more worker registered ({left:,} rows left)", base3, after)]
    print(f"start_run latency, ms (p50 / p99), {n} enqueues per cell, interleaved")
    print(f"  {'':58} {'clean schema':>16} {'measured schema':>18} {'p50 ratio':>10}")
    result: dict[str, float] = {"rows_left": left}
    for label, ref, val in rows:
        (r50, r99), (v50, v99) = summary(ref), summary(val)
        print(f"  {label:58} {r50:7.3f} /{r99:7.3f} {v50:8.3f} /{v99:8.3f} {v50 / r50:9.2f}x")
        result[label] = v50 / r50
    return result


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
