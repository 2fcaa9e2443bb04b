"""What one claim costs with many running runs, with and without the expired-lease scan.

    python -m bench.claim_cost --dsn postgresql://postgres@127.0.0.1/postgres \\
        [--running 0,2000,10000] [--claims 300] [--schema S]

Since migration 0013 a running run's lease expiry is in no index (heartbeats
are HOT updates), so the part of a claim that looks for expired leases reads
every running run of the queue. Migration 0014 lets a claim skip that part
(``p_expired => false``); workers make it once per poll interval instead of on
every claim.

For each count of running runs (held by another registered worker, leases an
hour long, so none is expired), the same connection alternates: enqueue one
run, claim it (``claim_runs``, limit 10, the worker's default), finish it; half
of the claims with the scan, half without, interleaved so both see the same
machine. Reports the median and p90 client round trip of each kind and their
ratio. One connection, no pool: the numbers are the statement's round trip
on this server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgjournal._sql import validate_identifier
from pgjournal.connect import connect_sync
from pgjournal.errors import ConfigurationError, DatabaseUnavailable
from pgjournal.migrations import migrate

Row = dict[str, Any]
INPUT = '{"args": [], "kwargs": {}}'


def _fill_running(conn: psycopg.Connection[Row], holder: uuid.UUID, n: int) -> None:
    """Make exactly ``n`` runs of the queue 'bench' running, held by ``holder``."""
    conn.execute("UPDATE runs SET status = 'completed', finished_at = now(), due_at = NULL "
                 "WHERE status IN ('queued', 'running')")
    if n:
        conn.execute("SELECT start_run(gen_random_uuid(), 'wf', 'bench', %s::json) "
                     "FROM generate_series(1, %s)", (INPUT, n))
        got = 0
        while got < n:
            got += len(conn.execute("SELECT id FROM claim_runs(%s, ARRAY['bench'], 1000, 3600)",
                                    (holder,)).fetchall())
    conn.execute("VACUUM ANALYZE runs")


def _one(conn: psycopg.Connection[Row], me: uuid.UUID, expired: bool) -> float:
    conn.execute("SELECT start_run(%s, 'wf', 'bench', %s::json)", (uuid.uuid4(), INPUT))
    t = time.perf_counter()
    rows = conn.execute("SELECT id FROM claim_runs(%s, ARRAY['bench'], 10, 30, NULL, %s)",
                        (me, expired)).fetchall()
    took = time.perf_counter() - t
    if len(rows) != 1:
        raise RuntimeError(f"claimed {len(rows)} runs, expected the one just enqueued")
    conn.execute("UPDATE runs SET status = 'completed', finished_at = now(), due_at = NULL "
                 "WHERE id = %s", (rows[0]["id"],))
    return took * 1000


def _ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.9)]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("PGJOURNAL_TEST_DSN"),
                    help="server to use (default: $PGJOURNAL_TEST_DSN)")
    ap.add_argument("--schema", default="bench_claim_cost",
                    help="schema to create (dropped first; default bench_claim_cost)")
    ap.add_argument("--running", default="0,2000,10000",
                    help="comma-separated counts of running runs (default 0,2000,10000)")
    ap.add_argument("--claims", type=int, default=300,
                    help="claims per count, half with the scan (default 300)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    if not args.dsn:
        ap.error("--dsn (or PGJOURNAL_TEST_DSN) is required")
    try:
        counts = [int(x) for x in args.running.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--running: expected comma-separated integers, got {args.running!r}")
    if not counts or min(counts) < 0:
        ap.error(f"--running: expected counts of 0 or more, got {args.running!r}")
    if args.claims < 2:
        ap.error("--claims must be at least 2 (half with the scan, half without)")
    try:
        validate_identifier(args.schema)
        connect_sync(args.dsn).close()
    except (ConfigurationError, DatabaseUnavailable) as exc:
        ap.error(str(exc))
    schema = sql.Identifier(args.schema)
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))
    migrate(args.dsn, schema=args.schema)
    results: list[dict[str, Any]] = []
    print("| running runs | claim with the scan p50 / p90 | without p50 / p90 | with / without |")
    print("| ---: | ---: | ---: | ---: |")
    with psycopg.connect(args.dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(schema))
        holder, me = uuid.uuid4(), uuid.uuid4()
        conn.execute("SELECT register_worker(%s, 'bench', 1, ARRAY['bench'], 100000)", (holder,))
        conn.execute("SELECT register_worker(%s, 'bench', 2, ARRAY['bench'], 10)", (me,))
        for n in counts:
            _fill_running(conn, holder, n)
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(20):  # warm-up (plans, caches)
                _one(conn, me, i % 2 == 0)
            for i in range(args.claims):
                times[i % 2 == 0].append(_one(conn, me, i % 2 == 0))
            (w50, w90), (o50, o90) = _ms(times[True]), _ms(times[False])
            results.append({"running": n, "with_p50_ms": w50, "with_p90_ms": w90,
                            "without_p50_ms": o50, "without_p90_ms": o90})
            print(f"| {n:,} | {w50:.3f} / {w90:.3f} ms | {o50:.3f} / {o90:.3f} ms | "
                  f"{w50 / o50:.2f}x |", flush=True)
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
