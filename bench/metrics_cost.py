"""What one Prometheus scrape costs the database, with a long history (issue 13).

    python -m bench.metrics_cost [--dsn DSN] [--finished 1000000] [--unfinished 1000]

Fills a schema with ``--finished`` ended runs spread over 30 days (90%
completed, 6% failed, 3% cancelled, 1% dead; three run_events each: queued,
running, the end) with ``generate_series``, plus ``--unfinished`` live runs
(queued due and delayed, running with held and expired leases, suspended),
some with concurrency keys, 10 alive and 50 stopped workers and 5 rate
buckets. Then, for each named statement of ``sql/metrics.sql``, it prints
the server's execution time (EXPLAIN ANALYZE), the buffers it touched, the
median client round trip over 20 runs, and whether the plan scans a history
table sequentially (it must not). For scale it also times the statement a
scrape must NOT run: counting the runs that ended in the window from ``runs``
(no index on ``finished_at``). Last, a whole ``collect(app)`` scrape.

Without ``--dsn`` a throwaway embedded server is used. ``--keep`` leaves the
schema for a look with psql; ``--reuse`` measures an existing filled schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import psycopg

import pgjournal
from pgjournal.metrics import collect, metrics_query, query_names

SCHEMA = "bench_metrics"
HISTORY = {"runs", "run_events", "steps"}


def fill(dsn: str, schema: str, finished: int, unfinished: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    pgjournal.migrate(dsn, schema=schema)
    s = f'"{schema}"'
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        # The history, as the triggers would have logged it, written directly.
        conn.execute(f"ALTER TABLE {s}.runs DISABLE TRIGGER USER")
        conn.execute(f"""
            INSERT INTO {s}.runs (id, workflow, queue, status, input, output, error, attempt,
                                  lease_epoch, created_at, updated_at, started_at, finished_at)
            SELECT gen_random_uuid(), 'wf' || (g %% 20), 'q' || (g %% 8),
                   CASE WHEN g %% 100 < 90 THEN 'completed' WHEN g %% 100 < 96 THEN 'failed'
                        WHEN g %% 100 < 99 THEN 'cancelled' ELSE 'dead' END,
                   jsonb_build_object('args', jsonb_build_array(g), 'kwargs', '{{}}'::jsonb),
                   CASE WHEN g %% 100 < 90 THEN to_jsonb('done ' || g) END,
                   CASE WHEN g %% 100 BETWEEN 90 AND 95
                        THEN '{{"type": "ValueError", "message": "boom"}}'::jsonb END,
                   1, 1, t - interval '2 seconds', t, t - interval '1 second', t
            FROM generate_series(1, %(n)s) AS g,
                 LATERAL (SELECT now() - g * (interval '30 days' / %(n)s)) AS x(t)""",
                     {"n": finished})
        conn.execute(f"""
            INSERT INTO {s}.run_events (run_created_at, run_id, at, from_status, to_status,
                                        attempt, lease_epoch)
            SELECT r.created_at, r.id, e.at, e.f, e.t, 1, e.epoch
            FROM {s}.runs r,
                 LATERAL (VALUES (r.created_at, NULL, 'queued', 0),
                                 (r.started_at, 'queued', 'running', 1),
                                 (r.finished_at, 'running', r.status, 1)) AS e(at, f, t, epoch)
            """)
        conn.execute(f"ALTER TABLE {s}.runs ENABLE TRIGGER USER")
        print(f"history: {finished} ended runs, {3 * finished} events in "
              f"{time.perf_counter() - t0:.0f}s")
        # The live part, through the ordinary triggers.
        conn.execute(f"""
            INSERT INTO {s}.workers (id, host, pid, queues, concurrency, heartbeat_at,
                                     stopped_at, lease_seconds)
            SELECT gen_random_uuid(), 'host' || g, g, ARRAY['q0','q1','q2','q3','q4','q5',
                   'q6','q7'], 50, CASE WHEN g <= 10 THEN now() ELSE now() - interval '2h' END,
                   CASE WHEN g > 10 THEN now() - interval '1h' END, 30
            FROM generate_series(1, 60) AS g""")
        conn.execute(f"""
            WITH w AS (SELECT array_agg(id) AS ids FROM {s}.workers WHERE stopped_at IS NULL)
            INSERT INTO {s}.runs (id, workflow, queue, status, attempt, lease_epoch,
                                  worker_id, due_at, wait_signal, concurrency_key, started_at)
            SELECT gen_random_uuid(), 'wf' || (g %% 20), 'q' || (g %% 8), st,
                   1, CASE WHEN st = 'running' THEN 1 ELSE 0 END,
                   CASE WHEN st = 'running' THEN w.ids[1 + g %% 10] END,
                   CASE WHEN k < 40 THEN now() - interval '5 seconds'
                        WHEN k < 60 THEN now() + interval '1 hour'
                        WHEN k < 83 THEN now() + interval '30 seconds'
                        WHEN k < 85 THEN now() - interval '1 minute'
                        ELSE NULL END,
                   CASE WHEN st = 'suspended' THEN 'approval' END,
                   CASE WHEN g %% 3 = 0 THEN 'tenant-' || (g %% 50) END,
                   CASE WHEN st IN ('running', 'suspended') THEN now() END
            FROM generate_series(1, %(n)s) AS g, w,
                 LATERAL (SELECT g * 100 / %(n)s) AS kk(k),
                 LATERAL (SELECT CASE WHEN k < 60 THEN 'queued' WHEN k < 85 THEN 'running'
                                      ELSE 'suspended' END) AS s(st)""", {"n": unfinished})
        conn.execute(f"SELECT {s}.set_concurrency_limit('tenant-*', 2)")
        for i in range(5):
            conn.execute(f"SELECT {s}.set_rate_limit(%s, 1000, 10)", (f"bucket-{i}",))
        t1 = time.perf_counter()
        conn.execute(f"VACUUM ANALYZE {s}.runs")
        conn.execute(f"VACUUM ANALYZE {s}.run_events")
        conn.execute(f"VACUUM ANALYZE {s}.workers")
        print(f"live: {unfinished} unfinished runs; vacuum analyze {time.perf_counter() - t1:.0f}s")


def indexes(plan: dict[str, Any]) -> list[str]:
    found = [plan["Index Name"]] if "Index Name" in plan else []
    for child in plan.get("Plans", []):
        found += [i for i in indexes(child) if i not in found]
    return found


def seq_scans(plan: dict[str, Any]) -> list[str]:
    found = []
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in HISTORY:
        found.append(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found += seq_scans(child)
    return found


NAIVE = """SELECT queue, status, count(*) FROM {schema}.runs
WHERE finished_at > now() - make_interval(secs => %(window)s) GROUP BY 1, 2"""


def measure(dsn: str, schema: str, repeat: int) -> list[tuple[str, float, int, float, str]]:
    from psycopg import sql

    rows = []
    params = {"window": 300.0}
    statements = [(n, metrics_query(n, schema)) for n in query_names()]
    statements.append(("(naive: count ended from runs)",
                       sql.SQL(NAIVE).format(schema=sql.Identifier(schema))))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, stmt in statements:
            conn.execute(stmt, params).fetchall()  # warm
            cur = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + stmt,
                               params)
            raw = cur.fetchone()
            assert raw is not None
            doc = raw[0] if not isinstance(raw[0], str) else json.loads(raw[0])
            plan = doc[0]
            top = plan["Plan"]
            buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                conn.execute(stmt, params).fetchall()
                times.append(time.perf_counter() - t0)
            scans = seq_scans(top)
            rows.append((name, plan["Execution Time"], buffers,
                         statistics.median(times) * 1000,
                         "SEQ SCAN " + ",".join(scans) if scans
                         else ",".join(indexes(top)) or "small tables only"))
    return rows


async def scrape(dsn: str, schema: str, repeat: int) -> float:
    app = pgjournal.App(dsn, schema=schema, pool_size=1)
    try:
        await collect(app)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            await collect(app)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000
    finally:
        await app.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("PGJOURNAL_DSN"))
    ap.add_argument("--schema", default=SCHEMA)
    ap.add_argument("--finished", type=int, default=1_000_000)
    ap.add_argument("--unfinished", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="leave the schema afterwards")
    ap.add_argument("--reuse", action="store_true", help="measure an already filled schema")
    args = ap.parse_args()
    if args.dsn is None:
        from pgjournal.embedded import throwaway_server
        with throwaway_server() as server:
            run(server.dsn, args)
    else:
        run(args.dsn, args)


def run(dsn: str, args: argparse.Namespace) -> None:
    if not args.reuse:
        fill(dsn, args.schema, args.finished, args.unfinished)
    try:
        rows = measure(dsn, args.schema, args.repeat)
        print(f"\n{'statement':34} {'server ms':>10} {'buffers':>8} {'round trip ms':>14}  "
              "indexes (or: SEQ SCAN of a history table)")
        for name, server_ms, buffers, rt_ms, plan in rows:
            print(f"{name:34} {server_ms:10.2f} {buffers:8d} {rt_ms:14.2f}  {plan}")
        whole = asyncio.run(scrape(dsn, args.schema, args.repeat))
        print(f"\nwhole scrape, collect(app): median {whole:.1f} ms over {args.repeat}")
    finally:
        if not args.keep:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{args.schema}" CASCADE')


if __name__ == "__main__":
    main()
