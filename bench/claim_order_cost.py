"""What one claim costs before and after migration 0020 (resumptions first), interleaved.

    python -m bench.claim_order_cost --dsn postgresql://postgres@127.0.0.1/postgres \\
        --base /path/to/checkout-of-the-old-code [--sleeping 0,10000] [--claims 400]

Two schemas on one server: one migrated by the checkout ``--base`` (e.g. a
``git worktree`` of main before 0020), one by this checkout. For each count of
runs sleeping on a timer an hour away (suspended, due later: they sit in the
claim index), one connection alternates between the two schemas: enqueue
one run, claim (``claim_runs``, limit 10, the worker's default, without the
expired-lease scan), finish it; so both see the same machine at the same
moment. A claim that comes back short (one run due, ten asked) is the
common case of a worker with free slots. Reports the median and p90 client
round trip of each and the index blocks each claim read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
INPUT = '{"args": [], "kwargs": {}}'
Row = dict[str, Any]


def _migrate(dsn: str, schema: str, code: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    subprocess.run([sys.executable, "-c", "import sys; from pgjournal.migrations import migrate; "
                    "migrate(sys.argv[1], schema=sys.argv[2])", dsn, schema],
                   env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, check=True)


def _blocks(conn: psycopg.Connection[Row], schema: str) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(pg_stat_get_xact_blocks_fetched(i.indexrelid)), 0) AS n "
        "FROM pg_index i WHERE i.indrelid = %s::regclass",
        (f'"{schema}".runs',)).fetchone()
    return int(row["n"]) if row else 0


def _one(conn: psycopg.Connection[Row], schema: str, me: uuid.UUID) -> tuple[float, int]:
    s = sql.Identifier(schema)
    conn.execute(sql.SQL("SELECT {}.start_run(%s, 'wf', 'bench', %s::json)").format(s),
                 (uuid.uuid4(), INPUT))
    with conn.transaction():
        before = _blocks(conn, schema)
        t = time.perf_counter()
        rows = conn.execute(sql.SQL("SELECT id FROM {}.claim_runs(%s, ARRAY['bench'], 10, 30, "
                                    "NULL, false)").format(s), (me,)).fetchall()
        took = time.perf_counter() - t
        blocks = _blocks(conn, schema) - before
    if len(rows) != 1:
        raise RuntimeError(f"claimed {len(rows)} runs, expected the one just enqueued")
    conn.execute(sql.SQL("UPDATE {}.runs SET status = 'completed', finished_at = now(), "
                         "due_at = NULL WHERE id = %s").format(s), (rows[0]["id"],))
    return took * 1000, blocks


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("PGJOURNAL_TEST_DSN"))
    ap.add_argument("--base", required=True, help="checkout of the code before 0020")
    ap.add_argument("--sleeping", default="0,10000")
    ap.add_argument("--claims", type=int, default=400)
    args = ap.parse_args(argv)
    if not args.dsn:
        ap.error("--dsn (or PGJOURNAL_TEST_DSN) is required")
    base = Path(args.base).resolve()
    if not (base / "pgjournal").is_dir():
        ap.error(f"--base: {base} holds no pgjournal package")
    try:
        counts = [int(x) for x in args.sleeping.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--sleeping: expected comma-separated integers, got {args.sleeping!r}")
    schemas = {"before": ("bench_order_before", base), "after": ("bench_order_after", ROOT)}
    for schema, code in schemas.values():
        _migrate(args.dsn, schema, code)
    me = uuid.uuid4()
    results: list[dict[str, Any]] = []
    print("| sleeping runs | before p50 / p90 | after p50 / p90 | index blocks per claim "
          "before / after |")
    print("| ---: | ---: | ---: | ---: |")
    with psycopg.connect(args.dsn, autocommit=True, row_factory=dict_row) as conn:
        for schema, _ in schemas.values():
            conn.execute(sql.SQL("SELECT {}.register_worker(%s, 'bench', 1, ARRAY['bench'], 10)")
                         .format(sql.Identifier(schema)), (me,))
        have = 0
        for n in counts:
            for schema, _ in schemas.values():
                conn.execute(sql.SQL(
                    "INSERT INTO {}.runs (id, workflow, queue, status, due_at, started_at) "
                    "SELECT gen_random_uuid(), 'wf', 'bench', 'suspended', "
                    "now() + interval '1 hour' + g * interval '1 ms', now() "
                    "FROM generate_series(1, %s) AS g").format(sql.Identifier(schema)),
                    (n - have,))
                conn.execute(sql.SQL("VACUUM ANALYZE {}.runs").format(sql.Identifier(schema)))
            have = n
            times: dict[str, list[float]] = {"before": [], "after": []}
            blocks: dict[str, list[int]] = {"before": [], "after": []}
            for _ in range(10):  # warm-up
                for schema, _code in schemas.values():
                    _one(conn, schema, me)
            for _ in range(args.claims):
                for kind, (schema, _code) in schemas.items():
                    ms, b = _one(conn, schema, me)
                    times[kind].append(ms)
                    blocks[kind].append(b)
            row: dict[str, Any] = {"sleeping": n}
            for kind in schemas:
                ordered = sorted(times[kind])
                row[kind] = {"p50_ms": statistics.median(ordered),
                             "p90_ms": ordered[int(len(ordered) * 0.9)],
                             "blocks": statistics.median(blocks[kind])}
            results.append(row)
            b, a = row["before"], row["after"]
            print(f"| {n:,} | {b['p50_ms']:.3f} / {b['p90_ms']:.3f} ms | "
                  f"{a['p50_ms']:.3f} / {a['p90_ms']:.3f} ms | {b['blocks']:g} / {a['blocks']:g} |")
    return results


if __name__ == "__main__":
    main()
