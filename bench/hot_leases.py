"""Lease renewals and table bloat: N running runs heartbeating for M minutes.

    python -m bench.hot_leases --dsn postgresql://postgres@127.0.0.1/postgres \\
        [--runs 2000] [--minutes 10] [--lease 30] [--workers 20] [--schema S]

Creates schema S with the migrations of the ``pgjournal`` package that is
imported (run it with ``PYTHONPATH`` pointing at another checkout to measure
that code), starts ``--runs`` runs, has ``--workers`` registered workers claim
them all (``--runs / --workers`` each) and then sends every worker's
heartbeat, one ``heartbeat()`` call for all of its runs, every ``lease / 3``
seconds (the worker's default interval), the workers spread evenly over the
interval, for ``--minutes``. Autovacuum runs as the server is configured.

Reports, before and after the heartbeating: ``n_tup_upd`` and
``n_tup_hot_upd`` of the runs table (flushed with
``pg_stat_force_next_flush()`` on PostgreSQL 15+), the table's and its
indexes' sizes (``pg_relation_size``), ``pgstattuple`` (dead tuples, free
space) when the extension can be created, and autovacuum counts. The
counters are exact; sizes depend on autovacuum's timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

import pgjournal
from pgjournal.migrations import code_version, migrate

Row = dict[str, Any]


def _stats(conn: psycopg.Connection[Row], schema: str) -> Row:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT n_tup_upd, n_tup_hot_upd, n_live_tup, n_dead_tup, autovacuum_count, "
        "vacuum_count, pg_relation_size(relid) AS table_bytes, "
        "pg_indexes_size(relid) AS index_bytes "
        "FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'runs'",
        (schema,)).fetchone()
    assert row is not None
    out = dict(row)
    out["indexes"] = {
        r["indexrelname"]: r["bytes"] for r in conn.execute(
            "SELECT indexrelname, pg_relation_size(indexrelid) AS bytes "
            "FROM pg_stat_user_indexes WHERE schemaname = %s AND relname = 'runs' "
            "ORDER BY indexrelname", (schema,))}
    try:
        t = conn.execute(sql.SQL("SELECT * FROM pgstattuple({})").format(
            sql.Literal(f'"{schema}".runs'))).fetchone()
        if t is not None:
            out["pgstattuple"] = {k: t[k] for k in (
                "table_len", "tuple_count", "dead_tuple_count", "dead_tuple_len",
                "free_space", "free_percent")}
    except psycopg.Error:
        pass
    return out


def _flush(conn: psycopg.Connection[Row]) -> None:
    if conn.info.server_version >= 150000:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT 1")  # the flush happens when the session goes idle
    else:
        time.sleep(1.5)  # PGSTAT_MIN_INTERVAL is 1 s before 15


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("PGJOURNAL_TEST_DSN"))
    ap.add_argument("--schema", default="bench_hot_leases")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=200,
                    help="workers (default 200: 10 runs each, the default concurrency)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lease", type=float, default=30.0)
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--rounds", action="store_true",
                    help="print the counters after every heartbeat round")
    args = ap.parse_args(argv)
    if not args.dsn:
        ap.error("--dsn (or PGJOURNAL_TEST_DSN) is needed")
    schema = args.schema
    with psycopg.connect(args.dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        with contextlib.suppress(psycopg.Error):
            c.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    migrate(args.dsn, schema=schema)
    conn = psycopg.connect(args.dsn, autocommit=True, row_factory=dict_row)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    per = args.runs // args.workers
    workers = [uuid.uuid4() for _ in range(args.workers)]
    for w in workers:
        conn.execute("SELECT register_worker(%s, 'bench', 1, ARRAY['hot'], %s, %s)",
                     (w, per, args.lease))
    with conn.transaction():
        for _ in range(per * args.workers):
            conn.execute("SELECT start_run(%s, 'wf', 'hot', "
                         "'{\"args\": [], \"kwargs\": {}}'::json)", (uuid.uuid4(),))
    held: dict[uuid.UUID, tuple[list[uuid.UUID], list[int]]] = {}
    for w in workers:
        rows = conn.execute("SELECT id, lease_epoch FROM claim_runs(%s, ARRAY['hot'], %s, %s)",
                            (w, per, args.lease)).fetchall()
        held[w] = ([r["id"] for r in rows], [r["lease_epoch"] for r in rows])
    running = conn.execute("SELECT count(*) AS n FROM runs WHERE status = 'running'").fetchone()
    assert running is not None and running["n"] == per * args.workers, running
    _flush(conn)
    time.sleep(0.2)
    before = _stats(conn, schema)

    interval = args.lease / 3
    start = time.monotonic()
    end = start + args.minutes * 60
    beats = renewed = 0
    slot = 0
    last = before
    rounds: list[dict[str, Any]] = []
    while True:
        # worker k beats at start + k * interval / workers + n * interval
        due = start + slot * interval / args.workers
        if due >= end:
            break
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        w = workers[slot % args.workers]
        ids, epochs = held[w]
        lost = conn.execute("SELECT * FROM heartbeat(%s, %s, %s, %s)",
                            (w, ids, epochs, args.lease)).fetchall()
        beats += 1
        renewed += len(ids) - len(lost)
        slot += 1
        if slot % args.workers == 0:  # a full round: every run renewed once more
            _flush(conn)
            now = _stats(conn, schema) if args.rounds else None
            if now is not None:
                d_upd = now["n_tup_upd"] - last["n_tup_upd"]
                d_hot = now["n_tup_hot_upd"] - last["n_tup_hot_upd"]
                rounds.append({"round": slot // args.workers, "updates": d_upd, "hot": d_hot,
                               "table_bytes": now["table_bytes"]})
                print(f"  round {slot // args.workers:3}: {d_upd} updates, {d_hot} HOT, "
                      f"table {now['table_bytes'] / 1024:.0f} kB", flush=True)
                last = now
    elapsed = time.monotonic() - start
    _flush(conn)
    time.sleep(0.2)
    after = _stats(conn, schema)
    conn.close()

    upd = after["n_tup_upd"] - before["n_tup_upd"]
    hot = after["n_tup_hot_upd"] - before["n_tup_hot_upd"]
    result = {
        "pgjournal": getattr(pgjournal, "__file__", "?"),
        "schema_version": code_version(),
        "runs": per * args.workers, "workers": args.workers, "lease": args.lease,
        "heartbeat_interval": interval, "minutes": elapsed / 60,
        "heartbeat_calls": beats, "renewals": renewed,
        "updates": upd, "hot_updates": hot,
        "hot_share": hot / upd if upd else None,
        "before": before, "after": after, "rounds": rounds,
    }
    print(f"pgjournal schema version {code_version()} ({result['pgjournal']})")
    print(f"{per * args.workers} running runs, {args.workers} workers, heartbeat every "
          f"{interval:.1f}s for {elapsed / 60:.1f} min: {beats} heartbeat calls, "
          f"{renewed} renewals")
    print(f"runs updates {upd}, HOT {hot} ({100 * hot / upd if upd else 0:.1f}%)")
    for label, s in (("before", before), ("after", after)):
        st = s.get("pgstattuple", {})
        print(f"  {label:6} table {s['table_bytes'] / 1024:8.0f} kB  indexes "
              f"{s['index_bytes'] / 1024:8.0f} kB  dead tuples {s['n_dead_tup']:7}  "
              f"autovacuums {s['autovacuum_count']}"
              + (f"  pgstattuple: dead {st['dead_tuple_count']}, free "
                 f"{st['free_percent']}%" if st else ""))
        print("         " + ", ".join(f"{k} {v / 1024:.0f} kB"
                                      for k, v in s["indexes"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
