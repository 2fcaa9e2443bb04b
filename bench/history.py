"""Retention: `pgjournal prune` by partition (migration 0013) against prune by DELETE.

    python -m bench.history --dsn postgresql://postgres@127.0.0.1/postgres
    python -m bench.history --dsn URL --runs 100000          # smaller
    python -m bench.history                                   # throwaway embedded server

In a database of its own (``pgj_history_bench`` by default, dropped and
recreated, dropped at the end unless --keep), it loads ``--runs`` finished runs
with 3 journal entries and 3 events each, created 100 to 135 days ago (five
weekly partitions), plus ``--recent`` finished runs of the last days that
prune must keep. Then, after a CHECKPOINT, it times ``pgjournal prune
--older-than 30d`` (the CLI itself, in a subprocess) and measures the WAL it
wrote (``pg_current_wal_lsn()`` before and after). The same load is repeated
for ``--no-partitions`` (every run by batched DELETE, the pre-0013 way). fsync
and synchronous_commit stay as the server has them (on, on the machine's
PostgreSQL and the embedded one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import pgjournal

SCHEMA = "pgjournal"
ROOT = Path(__file__).resolve().parent.parent
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def with_db(dsn: str, db: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = db
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fill(dsn: str, runs: int, recent: int, chunk: int = 100_000) -> float:
    """Finished runs created 100-135 days ago (plus ``recent`` of the last days)."""
    t0 = time.monotonic()
    s = sql.Identifier(SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SELECT count(*) FROM {}.maintain(p_since => now() - "
                             "interval '140 days')").format(s))
        # (first, count, of, newest_days, span_days): runs first+1..first+count
        # of `of`, created evenly from newest_days + span_days to newest_days ago.
        batches = [(start, min(chunk, runs - start), runs, 100.0, 35.0)
                   for start in range(0, runs, chunk)]
        batches += [(0, recent, recent, 0.5, 5.0)] if recent else []
        done = 0
        for start, n, of, newest_days, span_days in batches:
            with conn.transaction():
                # Triggers off for the bulk load; the events are written below
                # as the triggers would have.
                conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute(
                    "CREATE TEMP TABLE fill ON COMMIT DROP AS "
                    "SELECT gen_random_uuid() AS id, now() - make_interval(secs => "
                    "(%s + %s * (1.0 - (%s + g)::float8 / %s)) * 86400) AS at "
                    "FROM generate_series(1, %s) g",
                    (newest_days, span_days, start, of, n))
                conn.execute(sql.SQL(
                    "INSERT INTO {}.runs (id, workflow, queue, status, input, output, "
                    "lease_epoch, created_at, updated_at, started_at, finished_at) "
                    "SELECT id, 'three_steps', 'bench', 'completed', "
                    "'{{\"args\": [], \"kwargs\": {{}}}}', '\"s1s2s3\"', 1, at, at, at, at "
                    "FROM fill").format(s))
                conn.execute(sql.SQL(
                    "INSERT INTO {}.steps (run_created_at, run_id, position, name, "
                    "occurrence, kind, status, output, lease_epoch) "
                    "SELECT f.at, f.id, p, 's' || (p + 1), 0, 'step', 'completed', "
                    "to_json('s' || (p + 1)), 1 FROM fill f, generate_series(0, 2) p"
                ).format(s))
                conn.execute(sql.SQL(
                    "INSERT INTO {}.run_events (run_created_at, run_id, from_status, "
                    "to_status, attempt, lease_epoch) "
                    "SELECT at, id, NULL, 'queued', 1, 0 FROM fill "
                    "UNION ALL SELECT at, id, 'queued', 'running', 1, 1 FROM fill "
                    "UNION ALL SELECT at, id, 'running', 'completed', 1, 1 FROM fill"
                ).format(s))
            done += n
            if done % 500_000 < chunk:
                log(f"  loaded {done:,} runs")
        for table in ("runs", "steps", "run_events"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}.{}").format(s, sql.Identifier(table)))
        conn.execute("CHECKPOINT")
    return time.monotonic() - t0


def sizes(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) + coalesce(("
            "  SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i "
            "  WHERE i.inhparent = c.oid), 0) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = ANY(%s)",
            (SCHEMA, ["runs", "steps", "stream_chunks", "run_events"])).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def prune(dsn: str, extra: list[str]) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "pgjournal", "prune", "--dsn", dsn, "--schema", SCHEMA,
             "--older-than", "30d", "--json", *extra],
            cwd=ROOT, capture_output=True, text=True, check=True)
        seconds = time.monotonic() - t0
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint",
                           (lsn0,)).fetchone()[0]  # type: ignore[index]
        left = conn.execute(sql.SQL("SELECT count(*) FROM {}.runs").format(
            sql.Identifier(SCHEMA))).fetchone()[0]  # type: ignore[index]
    out = json.loads(res.stdout)
    return {"seconds": round(seconds, 1), "wal_bytes": int(wal), "deleted": out["deleted"],
            "by_partition": out["deleted_by_partition"],
            "partitions_dropped": len(out["partitions_dropped"]), "runs_left": left}


def one(admin: str, db: str, runs: int, recent: int, method: str) -> dict[str, Any]:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(db)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    dsn = with_db(admin, db)
    pgjournal.migrate(dsn, schema=SCHEMA)
    log(f"{method}: loading {runs:,} + {recent:,} runs")
    load = fill(dsn, runs, recent)
    before = sizes(dsn)
    log(f"{method}: loaded in {load:.0f}s; pruning")
    row = prune(dsn, ["--no-partitions"] if method == "DELETE" else [])
    after = sizes(dsn)
    row |= {"method": method, "load_seconds": round(load), "bytes_before": sum(before.values()),
            "bytes_after": sum(after.values())}
    log(f"{method}: {row}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="server (default: a throwaway embedded one)")
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--recent", type=int, default=10_000)
    p.add_argument("--db", default="pgj_history_bench")
    p.add_argument("--keep", action="store_true", help="keep the database at the end")
    p.add_argument("--out", default="", help="also write the rows here as JSON")
    args = p.parse_args()

    def go(admin: str) -> None:
        rows = [one(admin, args.db, args.runs, args.recent, m)
                for m in ("partition", "DELETE")]
        if not args.keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(args.db)))
        print(f"| prune of {args.runs:,} runs (3 steps + 3 events each; {args.recent:,} "
              "recent runs kept) | seconds | WAL MB | history MB before -> after |")
        print("| --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['method']} ({r['by_partition']:,} by partition, "
                  f"{r['partitions_dropped']} partitions dropped) | {r['seconds']} | "
                  f"{r['wal_bytes'] / 1e6:,.0f} | {r['bytes_before'] / 1e6:,.0f} -> "
                  f"{r['bytes_after'] / 1e6:,.0f} |")
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))

    if args.dsn:
        go(args.dsn)
        return
    from pgjournal.embedded import throwaway_server

    with throwaway_server(settings=DURABLE) as server:
        go(server.dsn)


if __name__ == "__main__":
    main()
