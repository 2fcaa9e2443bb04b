"""Partitioned history (migration 0011): the partition key, maintain(), prune by partition,
and the conversion of an existing schema."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import pgjournal
import pgjournal.errors
import pgjournal.migrations as migrations
from pgjournal import _sql

from .conftest import serving

ROOT = Path(__file__).resolve().parent.parent
HISTORY = ("steps", "stream_chunks", "run_events")


def q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(s=sql.Identifier(schema))  # type: ignore[arg-type]


@pytest.fixture
def db(pgjournal_dsn: str) -> Any:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def cli(dsn: str, schema: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "pgjournal", "--dsn", dsn, "--schema", schema,
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == expect, (args, res.returncode, res.stdout, res.stderr)
    return res


def where_rows_are(db: Any, schema: str) -> dict[str, dict[str, int]]:
    """For each history table: how many rows sit in which partition."""
    out: dict[str, dict[str, int]] = {}
    for table in HISTORY:
        rows = db.execute(q("SELECT tableoid::regclass::text AS part, count(*) AS n "
                            f"FROM {{s}}.{table} GROUP BY 1", schema)).fetchall()
        out[table] = {r["part"].split(".")[-1].strip('"'): r["n"] for r in rows}
    return out


def key_mismatches(db: Any, schema: str) -> int:
    """History rows whose partition key is not their run's created_at."""
    total = 0
    for table in HISTORY:
        total += db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{table} x "
                              "JOIN {s}.runs r ON r.id = x.run_id "
                              "WHERE x.run_created_at <> r.created_at", schema)).fetchone()["n"]
    return total


async def tokens() -> AsyncIterator[str]:
    for c in "abc":
        yield c


def register(app: pgjournal.App) -> None:
    @app.workflow(queue="hist")
    async def chatty(run: pgjournal.Run, n: int) -> int:
        for i in range(n):
            await run.step("s", lambda i=i: i)
        parts = [c async for c in run.stream_step("tokens", tokens)]
        return n + len(parts)

    @app.workflow(queue="hist", max_attempts=1)
    async def broken(run: pgjournal.Run) -> None:
        await run.step("ok", lambda: 1)
        raise ValueError("no")


async def run_some(app: pgjournal.App, n: int = 3) -> list[uuid.UUID]:
    register(app)
    ids = []
    async with serving(app, queues=["hist"]):
        handles = [await app.start("chatty", i + 1) for i in range(n)]
        bad = await app.start("broken")
        for i, h in enumerate(handles):
            assert await h.result(timeout=60) == i + 1 + 3
            ids.append(h.run_id)
        with pytest.raises(pgjournal.errors.RunFailed):
            await bad.result(timeout=60)
        ids.append(bad.run_id)
    return ids


async def test_history_rows_carry_the_runs_created_at_in_a_partition_of_its_slot(
        pgjournal_app: pgjournal.App, db: Any, pgjournal_schema: str) -> None:
    await run_some(pgjournal_app)
    s = pgjournal_schema
    assert key_mismatches(db, s) == 0
    placed = where_rows_are(db, s)
    for table in HISTORY:
        assert placed[table], table
        assert f"{table}_default" not in placed[table], placed
    # Each row sits in the partition whose range holds its key.
    for table in HISTORY:
        bad = db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{table} x "
                           "JOIN {s}.history_partitions(%s) h "
                           "ON h.partition_name = x.tableoid::regclass::text "
                           "OR %s || '.' || h.partition_name = x.tableoid::regclass::text "
                           "WHERE NOT (x.run_created_at >= h.lower_bound "
                           "AND x.run_created_at < h.upper_bound)", s),
                       (table, s)).fetchone()["n"]
        assert bad == 0
    # The DBA views still read the journal.
    assert db.execute(q("SELECT count(*) AS n FROM {s}.step_timings", s)).fetchone()["n"] > 0
    assert db.execute(q("SELECT count(*) AS n FROM {s}.run_overview WHERE steps_completed > 0",
                        s)).fetchone()["n"] == 4


async def test_no_journal_row_duplicated_even_after_the_run_moves(
        pgjournal_app: pgjournal.App, db: Any, pgjournal_schema: str) -> None:
    ids = await run_some(pgjournal_app, 1)
    s, run = pgjournal_schema, ids[0]
    dup = ("INSERT INTO {s}.steps (run_created_at, run_id, position, name, occurrence, status, "
           "lease_epoch) SELECT created_at, id, 0, 'again', 9, 'completed', 1 "
           "FROM {s}.runs WHERE id = %s")
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(q(dup, s), (run,))
    # Backdating the run moves its history into the partition of its new time
    # (here: the DEFAULT one, nothing covers 400 days ago), all rows together.
    before = db.execute(q("SELECT count(*) AS n FROM {s}.steps WHERE run_id = %s", s),
                        (run,)).fetchone()["n"]
    db.execute(q("UPDATE {s}.runs SET created_at = created_at - interval '400 days' "
                 "WHERE id = %s", s), (run,))
    assert key_mismatches(db, s) == 0
    parts = db.execute(q("SELECT DISTINCT tableoid::regclass::text AS p FROM {s}.steps "
                         "WHERE run_id = %s", s), (run,)).fetchall()
    assert [p["p"].split(".")[-1] for p in parts] == ["steps_default"]
    assert db.execute(q("SELECT count(*) AS n FROM {s}.steps WHERE run_id = %s", s),
                      (run,)).fetchone()["n"] == before
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(q(dup, s), (run,))
    # Writing a step for a run that does not exist is refused, as the foreign key did.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute(q("SELECT {s}.run_bucket(%s)", s), (uuid.uuid4(),))


async def test_maintain_creates_ahead_and_moves_default_rows_into_their_own_partition(
        pgjournal_app: pgjournal.App, db: Any, pgjournal_schema: str,
        pgjournal_dsn: str) -> None:
    s = pgjournal_schema
    ids = await run_some(pgjournal_app, 2)
    db.execute(q("UPDATE {s}.runs SET created_at = created_at - interval '400 days' "
                 "WHERE id = ANY(%s)", s), (ids[:2],))
    assert where_rows_are(db, s)["steps"].get("steps_default", 0) > 0
    res = json.loads(cli(pgjournal_dsn, s, "maintain", "--ahead-days", "60", "--json").stdout)
    created = {c["partition"] for c in res["created"]}
    assert {t for t in HISTORY if any(c.startswith(t + "_p") for c in created)} == set(HISTORY)
    placed = where_rows_are(db, s)
    for table in HISTORY:
        assert f"{table}_default" not in placed[table], placed
    assert key_mismatches(db, s) == 0
    # Ahead: the slot of now() + 60 days exists for every table.
    for table in HISTORY:
        assert db.execute(q("SELECT count(*) AS n FROM {s}.history_partitions(%s) "
                            "WHERE lower_bound <= now() + interval '60 days' "
                            "AND upper_bound > now() + interval '60 days'", s),
                          (table,)).fetchone()["n"] == 1
    # Nothing left to do: a second call creates nothing.
    assert "nothing to do" in cli(pgjournal_dsn, s, "maintain", "--ahead-days", "60").stdout
    # A run created beyond every partition still journals (DEFAULT partition).
    db.execute(q("UPDATE {s}.runs SET created_at = now() + interval '5 years' "
                 "WHERE id = %s", s), (ids[2],))
    assert where_rows_are(db, s)["steps"].get("steps_default", 0) > 0


def backdate(db: Any, s: str, ids: list[Any], days: int) -> None:
    db.execute(q("UPDATE {s}.runs SET created_at = now() - make_interval(days => %s), "
                 "finished_at = CASE WHEN finished_at IS NULL THEN NULL "
                 "ELSE now() - make_interval(days => %s) + interval '1 hour' END "
                 "WHERE id = ANY(%s)", s), (days, days, ids))


async def test_prune_drops_whole_partitions_and_deletes_the_rest_in_batches(
        pgjournal_app: pgjournal.App, db: Any, pgjournal_schema: str,
        pgjournal_dsn: str) -> None:
    s = pgjournal_schema
    ids = await run_some(pgjournal_app, 4)
    done = ids[:4]  # completed; ids[4] failed
    held = await pgjournal_app.start("chatty", 1)  # queued: nobody serves it now
    # Slot of 200 days ago: three ended runs only -> dropped whole.
    # Slot of 300 days ago: an ended run next to a queued one -> kept; the ended
    # run goes by DELETE.
    backdate(db, s, done[:3], 200)
    backdate(db, s, [done[3], held.run_id], 300)
    cli(pgjournal_dsn, s, "maintain")
    old_parts = db.execute(q("SELECT partition_name, lower_bound FROM "
                             "{s}.history_partitions('steps') WHERE upper_bound < now() - "
                             "interval '100 days' ORDER BY lower_bound", s)).fetchall()
    assert len(old_parts) == 2
    drop_lo = old_parts[1]["lower_bound"]
    drop = [r["partition_name"] for t in HISTORY for r in db.execute(
        q("SELECT partition_name FROM {s}.history_partitions(%s) WHERE lower_bound = %s", s),
        (t, drop_lo))]
    assert len(drop) == 3

    dry = json.loads(cli(pgjournal_dsn, s, "prune", "--older-than", "30d", "--dry-run",
                         "--json").stdout)
    assert dry["matched"] == 4 and dry["deleted"] == 0
    assert [sorted(p["tables"]) for p in dry["partitions"]] == [sorted(drop)]
    assert dry["partitions"][0]["runs"] == 3 and dry["by_batches"] == 1
    text = cli(pgjournal_dsn, s, "prune", "--older-than", "30d", "--dry-run").stdout
    assert all(name in text for name in drop) and "1 in batches" in text
    assert all(db.execute("SELECT to_regclass(%s) IS NOT NULL AS x",
                          (f'"{s}".{n}',)).fetchone()["x"] for n in drop)

    res = cli(pgjournal_dsn, s, "prune", "--older-than", "30d", "--batch-size", "1")
    assert "deleted 4 runs" in res.stdout and "3 by dropping 3 partitions" in res.stdout
    assert "1 in batches" in res.stdout
    assert all(db.execute("SELECT to_regclass(%s) IS NULL AS x",
                          (f'"{s}".{n}',)).fetchone()["x"] for n in drop)
    left = {r["id"] for r in db.execute(q("SELECT id FROM {s}.runs", s))}
    assert left == {ids[4], held.run_id}
    # No history without its run, and the queued run's history is intact.
    for table in HISTORY:
        orphans = db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{table} x WHERE NOT EXISTS "
                               "(SELECT 1 FROM {s}.runs r WHERE r.id = x.run_id)", s)
                             ).fetchone()["n"]
        assert orphans == 0, table
    assert db.execute(q("SELECT count(*) AS n FROM {s}.run_events WHERE run_id = %s", s),
                      (held.run_id,)).fetchone()["n"] >= 1
    assert db.execute(q("SELECT count(*) AS n FROM {s}.run_overview", s)).fetchone()["n"] == 2
    again = json.loads(cli(pgjournal_dsn, s, "prune", "--older-than", "30d", "--json").stdout)
    assert again["deleted"] == 0 and again["partitions_dropped"] == []


async def test_a_partition_whose_run_is_held_is_kept_with_that_runs_history(
        pgjournal_app: pgjournal.App, db: Any, pgjournal_schema: str,
        pgjournal_dsn: str) -> None:
    s = pgjournal_schema
    ids = (await run_some(pgjournal_app, 2))[:2]
    backdate(db, s, ids, 200)
    cli(pgjournal_dsn, s, "maintain")
    part = db.execute(q("SELECT * FROM {s}.prunable_partitions(now() - interval '30 days', "
                        "ARRAY['completed'])", s)).fetchall()
    assert len(part) == 1 and part[0]["runs"] == 2
    lo, hi = part[0]["lower_bound"], part[0]["upper_bound"]
    with psycopg.connect(pgjournal_dsn) as other:
        # Another transaction holds one run (as a retry would): the batch skips it.
        other.execute(q("SELECT 1 FROM {s}.runs WHERE id = %s FOR UPDATE", s), (ids[0],))
        n = db.execute(q("SELECT {s}.prune_history_batch(%s, %s, now() - interval '30 days', "
                         "ARRAY['completed'], 100) AS n", s), (lo, hi)).fetchone()["n"]
        assert n == 1
        other.rollback()
    dropped = db.execute(q("SELECT {s}.drop_history_range(%s, %s) AS d", s),
                         (lo, hi)).fetchone()["d"]
    assert dropped is None
    kept = db.execute(q("SELECT count(*) AS n FROM {s}.steps WHERE run_id = %s", s),
                      (ids[0],)).fetchone()["n"]
    assert kept > 0
    # Once the held run goes too, the next prune drops the partitions.
    res = json.loads(cli(pgjournal_dsn, s, "prune", "--older-than", "30d", "--json").stdout)
    assert res["deleted_by_partition"] == 1 and len(res["partitions_dropped"]) == 3
    for table in HISTORY:
        assert db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{table} WHERE run_id = ANY(%s)",
                            s), (ids,)).fetchone()["n"] == 0


async def test_migration_moves_an_existing_populated_schema(
        pgjournal_dsn: str, db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = f"m13_{uuid.uuid4().hex[:8]}"
    before = [m for m in migrations.available() if m.version < 11]
    with monkeypatch.context() as mp:
        mp.setattr(migrations, "available", lambda: before)
        assert pgjournal.migrate(pgjournal_dsn, schema=s) == [m.version for m in before]
    try:
        app = pgjournal.App(pgjournal_dsn, schema=s, poll_interval=0.2)
        # The app checks the schema version against the code's: run the
        # workload on the old schema with the check pointed at it too, and
        # the claims as the code of that version sent them (p_expired is 0014).
        monkeypatch.setattr(migrations, "code_version", lambda: before[-1].version)
        current = _sql.named_queries

        def as_before_0014(filename: str = "queries.sql") -> dict[str, str]:
            queries = dict(current(filename))
            for name in ("claim_runs", "go_hungry"):
                queries[name] = queries[name].replace(", %(expired)s", "")
            return queries

        monkeypatch.setattr(_sql, "named_queries", as_before_0014)
        async with app:
            ids = await run_some(app, 3)
        monkeypatch.undo()
        backdate(db, s, ids[:2], 200)
        counts = {t: db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{t}", s)).fetchone()["n"]
                  for t in HISTORY}
        assert all(counts.values()), counts
        assert pgjournal.migrate(pgjournal_dsn, schema=s) == [
            m.version for m in migrations.available() if m.version >= 11]
        assert {t: db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{t}", s)).fetchone()["n"]
                for t in HISTORY} == counts
        assert key_mismatches(db, s) == 0
        placed = where_rows_are(db, s)
        for table in HISTORY:
            assert f"{table}_default" not in placed[table], placed
            assert len(placed[table]) >= 2, placed  # the backdated runs' slot and today's
        assert db.execute(q("SELECT count(*) AS n FROM {s}.run_overview WHERE "
                            "steps_completed > 0", s)).fetchone()["n"] == 4
        assert db.execute(q("SELECT count(*) AS n FROM {s}.failures", s)).fetchone()["n"] >= 1
        # The migrated schema works: new runs journal into it.
        app = pgjournal.App(pgjournal_dsn, schema=s, poll_interval=0.2)
        async with app:
            more = await run_some(app, 1)
        assert db.execute(q("SELECT count(*) AS n FROM {s}.steps WHERE run_id = %s", s),
                          (more[0],)).fetchone()["n"] == 2
        assert key_mismatches(db, s) == 0
    finally:
        db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))


async def test_a_kept_partition_keeps_no_rows_of_the_runs_prune_deleted(
        pgjournal_app: pgjournal.App, db: Any, pgjournal_schema: str,
        pgjournal_dsn: str) -> None:
    """Issue 20, item 6: when drop_history_range keeps a range (a run of it was
    held or retried meanwhile), the history of the runs prune_history_batch
    already deleted must not stay behind in the kept partitions."""
    s = pgjournal_schema
    ids = (await run_some(pgjournal_app, 2))[:2]
    backdate(db, s, ids, 200)
    cli(pgjournal_dsn, s, "maintain")
    (part,) = db.execute(q("SELECT * FROM {s}.prunable_partitions(now() - interval '30 days', "
                           "ARRAY['completed'])", s)).fetchall()
    lo, hi = part["lower_bound"], part["upper_bound"]
    with psycopg.connect(pgjournal_dsn) as other:
        other.execute(q("SELECT 1 FROM {s}.runs WHERE id = %s FOR UPDATE", s), (ids[0],))
        n = db.execute(q("SELECT {s}.prune_history_batch(%s, %s, now() - interval '30 days', "
                         "ARRAY['completed'], 100) AS n", s), (lo, hi)).fetchone()["n"]
        assert n == 1
        other.rollback()
    assert db.execute(q("SELECT {s}.drop_history_range(%s, %s) AS d", s),
                      (lo, hi)).fetchone()["d"] is None
    for table in HISTORY:
        orphans = db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{table} WHERE run_id = %s",
                               s), (ids[1],)).fetchone()["n"]
        assert orphans == 0, f"{table} keeps {orphans} rows of deleted run {ids[1]}"
        kept = db.execute(q(f"SELECT count(*) AS n FROM {{s}}.{table} WHERE run_id = %s",
                            s), (ids[0],)).fetchone()["n"]
        assert kept > 0, table
    assert db.execute(q("SELECT count(*) AS n FROM {s}.steps WHERE run_id = %s", s),
                      (ids[0],)).fetchone()["n"] > 0
