"""What a large journal costs: the claim, the replay, and the other runs' claims.

    python -m bench.journal_size                 # throwaway embedded server, fsync on
    python -m bench.journal_size --dsn URL       # another server (uses schema bench_jsize)
    python -m bench.journal_size --quick         # small sizes (CI smoke)

For journals of 0, 10,000 small entries and ~100 MB (25 entries of 4 MB), it
prints: the time to journal them the first time, the claim of another run
while they exist (a claim must not pay for other runs' journals), and the
claim + full replay of the run itself (from the signal that resumes it to its
completion). Before migration 0005 the claim aggregated the whole journal
into one jsonb: 1.8 s per claim at 100 MB, and a failure past 256 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from typing import Any

import pgjournal
from pgjournal.embedded import throwaway_server

DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def build(dsn: str, schema: str) -> pgjournal.App:
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.05,
                        max_journal_bytes=1024 * 1024 * 1024)

    @app.workflow(queue="big")
    async def hoard(run: pgjournal.Run, n: int, size: int) -> int:
        for i in range(n):
            await run.step("entry", lambda i=i: "x" * size if size else i)
        await run.wait_signal("go")
        return n

    @app.workflow(queue="small")
    async def tiny(run: pgjournal.Run) -> int:
        return 1

    return app


async def claim_ms(app: pgjournal.App, queue: str, repeat: int = 20) -> float:
    """Median time of claiming (and releasing) one fresh run of ``tiny``."""
    store = await app.store()
    worker = uuid.uuid4()
    await store.register_worker(worker, "bench", 0, [queue], 1)
    times = []
    for _ in range(repeat):
        await app.start("tiny")
        t0 = time.perf_counter()
        claims = await store.claim(worker, [queue], 1, 30)
        times.append((time.perf_counter() - t0) * 1000)
        await store.complete_runs([(c.run_id, c.epoch, "1") for c in claims])
    return statistics.median(times)


async def measure(app: pgjournal.App, n: int, size: int) -> dict[str, Any]:
    worker = pgjournal.Worker(app, queues=["big"], concurrency=1, lease=60)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        t0 = time.perf_counter()
        handle = await app.start("hoard", n, size)
        for _ in range(60_000):  # polled: the run's status is the event
            if await handle.status() == "suspended":
                break
            await asyncio.sleep(0.02)
        first = time.perf_counter() - t0
        other = await claim_ms(app, "small")
        t1 = time.perf_counter()
        await app.signal(handle.run_id, "go")
        assert await handle.result(timeout=600) == n
        replay = time.perf_counter() - t1
    finally:
        worker.stop()
        await task
    mb = n * size / 1e6
    return {"entries": n, "MB": round(mb, 1), "first_s": round(first, 2),
            "other_claim_ms": round(other, 2), "resume_replay_s": round(replay, 3)}


async def main_async(dsn: str, quick: bool) -> None:
    schema = f"bench_jsize_{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(pgjournal.migrate, dsn, schema=schema)
    app = build(dsn, schema)
    cases = [(0, 0), (1_000, 0), (4, 1_000_000)] if quick else \
        [(0, 0), (10_000, 0), (25, 4_000_000)]
    rows = []
    async with app:
        for n, size in cases:
            row = await measure(app, n, size)
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
    print(f"{'entries':>8} {'MB':>7} {'journal once s':>15} {'other claim ms':>15} "
          f"{'resume+replay s':>16}")
    for r in rows:
        print(f"{r['entries']:>8} {r['MB']:>7} {r['first_s']:>15} {r['other_claim_ms']:>15} "
              f"{r['resume_replay_s']:>16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="server to use (default: a throwaway embedded one)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    if args.dsn:
        asyncio.run(main_async(args.dsn, args.quick))
        return
    with throwaway_server(settings=DURABLE) as server:
        asyncio.run(main_async(server.dsn, args.quick))


if __name__ == "__main__":
    main()
