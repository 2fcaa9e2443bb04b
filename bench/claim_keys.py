"""What concurrency keys cost the claim (issue 12).

    python -m bench.claim_keys [--dsn DSN] [--queued 10000] [--keys 1000] [--full 10]

Two schemas on one server, measured alternately in one run:

* **keys**: ``--queued`` queued runs spread over ``--keys`` concurrency keys,
  a limit of 2 for every key (``k-*``), and ``--full`` keys at their limit
  (2 running runs each) whose queued runs come *first* in claim order, so
  every claim has to pass over them (the worst case for head-of-line skipping);
* **plain**: the same number of queued runs with no keys and no limits.

Each sample is one ``claim_runs`` of 10 runs inside a transaction that is
rolled back, so every claim sees the same state. Prints p50/p99 per schema and
the ratio keys/plain. Without ``--dsn`` a throwaway embedded server is used.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg

import pgjournal
from pgjournal.embedded import throwaway_server


def setup(dsn: str, schema: str, queued: int, keys: int, full: int, keyed: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    pgjournal.migrate(dsn, schema=schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        s = schema
        # Queued runs: the full keys' runs are the oldest (first in claim order).
        conn.execute(f"""
            INSERT INTO {s}.runs (id, workflow, queue, input, due_at, created_at,
                                  concurrency_key)
            SELECT gen_random_uuid(), 'job', 'q', '{{}}'::json,
                   now() - interval '1 hour' + make_interval(secs => g * 0.001),
                   now() - interval '1 hour',
                   CASE WHEN %(keyed)s THEN 'k-' || ((g - 1) %% %(keys)s) END
            FROM generate_series(1, %(queued)s) AS g""",
                     {"keyed": keyed, "keys": keys, "queued": queued})
        if keyed:
            # Order: runs of keys k-0 .. k-(full-1) first.
            conn.execute(f"""
                UPDATE {s}.runs SET due_at = now() - interval '2 hours'
                                             + make_interval(secs => random())
                WHERE concurrency_key = ANY (%s)""",
                         ([f"k-{i}" for i in range(full)],))
            conn.execute(f"SELECT {s}.set_concurrency_limit('k-*', 2)")
            conn.execute(f"""
                INSERT INTO {s}.runs (id, workflow, queue, input, status, due_at, started_at,
                                      lease_epoch, concurrency_key)
                SELECT gen_random_uuid(), 'job', 'q', '{{}}'::json, 'running',
                       now() + interval '1 day', now(), 1, 'k-' || (g %% %(full)s)
                FROM generate_series(0, 2 * %(full)s - 1) AS g""", {"full": full})
        conn.execute(f"ANALYZE {s}.runs")


def sample(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> float:
    worker = uuid.uuid4()
    t0 = time.perf_counter()
    with conn.transaction(force_rollback=True):
        rows = conn.execute(
            f"SELECT id FROM {schema}.claim_runs(%s, ARRAY['q'], 10, 30)", (worker,)).fetchall()
    ms = (time.perf_counter() - t0) * 1000
    assert len(rows) == 10, rows
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", help="server to use (default: a throwaway embedded server)")
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=1_000)
    ap.add_argument("--full", type=int, default=10)
    ap.add_argument("--samples", type=int, default=400)
    args = ap.parse_args()

    def go(dsn: str) -> None:
        setup(dsn, "bench_keys", args.queued, args.keys, args.full, True)
        setup(dsn, "bench_plain", args.queued, args.keys, args.full, False)
        times: dict[str, list[float]] = {"keys": [], "plain": []}
        with psycopg.connect(dsn) as conn:
            for _ in range(20):  # warm up both
                sample(conn, "bench_keys")
                sample(conn, "bench_plain")
            for _ in range(args.samples):
                times["keys"].append(sample(conn, "bench_keys"))
                times["plain"].append(sample(conn, "bench_plain"))
        print(f"claim of 10 runs, {args.queued} queued; keys: {args.keys} keys, limit 2, "
              f"{args.full} at their limit and first in line; {args.samples} samples each")
        summary = {}
        for name, ms in times.items():
            ms.sort()
            p50 = statistics.median(ms)
            p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            summary[name] = (p50, p99)
            print(f"  {name:6} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
        print(f"  keys / plain: p50 {summary['keys'][0] / summary['plain'][0]:.2f}x, "
              f"p99 {summary['keys'][1] / summary['plain'][1]:.2f}x")

    if args.dsn:
        go(args.dsn)
    else:
        with throwaway_server(settings={}) as server:
            go(server.dsn)


if __name__ == "__main__":
    main()
