"""Partitioned history (migration 0011): the partition key, maintain(), prune by partition,
and the conversion of an existing schema."""

from __future__ import annotations

import json
import re
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


# -- reads by run id name the partition key (issue 20, row 6) ---------------------------
#
# A year of weekly history is ~52 partitions per table. A read of one run's
# history that does not say `run_created_at = <its run's created_at>` probes an
# index in every partition (buffers grew 12 -> 68 from 3 to 34 partitions). The
# key is runs.created_at: a reader learns it with one primary-key probe of
# `runs`, inside the same statement (`run_created_at = (SELECT created_at FROM
# runs WHERE id = $1)`, or `= r.created_at` when the statement joins runs), and
# the executor prunes every other partition at run time.

#: Files of named statements, and the reads of one run's history in them: each
#: maps to the parameters it is called with (``T``: the target run, ``P``: its
#: parent, ``C``: a child). A new statement that reads a history table must be
#: added here (its partitions are then checked) or to NOT_BY_RUN with a reason.
READ_FILES = {
    "queries.sql": ROOT / "sql" / "queries.sql",
    "adapters.sql": ROOT / "sql" / "adapters.sql",
    "cli.sql": ROOT / "sql" / "cli.sql",
    "dashboard": ROOT / "pgjournal" / "dashboard" / "queries.sql",
}
READS: dict[tuple[str, str], dict[str, Any]] = {
    ("queries.sql", "get_steps"): {"run": "T"},
    ("queries.sql", "get_chunks"): {"run": "T"},
    ("queries.sql", "get_events"): {"run": "T"},
    ("queries.sql", "journal_outline"): {"run": "T"},
    ("queries.sql", "journal_page"): {"run": "T", "after": -1, "limit": 500,
                                      "max_bytes": 1 << 20},
    ("queries.sql", "chunk_page"): {"run": "T", "position": 1, "after": -1, "limit": 100,
                                    "max_bytes": 1 << 20},
    ("adapters.sql", "get_named"): {"run": "T", "name": "s", "kind": "step"},
    ("adapters.sql", "get_chunks"): {"run": "T", "position": 1},
    ("adapters.sql", "entries"): {"run": "T", "from_position": 0},
    ("adapters.sql", "last_position"): {"run": "T"},
    ("adapters.sql", "max_iteration"): {"run": "T"},
    ("dashboard", "runs_page"): {"status": None, "workflow": "w", "queue": None, "key": None,
                                 "since": None, "until": None, "cursor_at": None,
                                 "cursor_id": None, "limit": 51},
    ("dashboard", "watch"): {"ids": ["T", "P", "C"]},
    ("dashboard", "run"): {"run": "T"},
    ("dashboard", "steps_page"): {"run": "T", "after": -1, "limit": 51},
    ("dashboard", "step_value"): {"run": "T", "position": 2},
    ("dashboard", "events"): {"run": "T", "limit": 201},
    ("dashboard", "children"): {"run": "P", "limit": 50},
}
#: Statements that read a history table, but not by one run's id (or not for
#: a program to run), and why they need not name the key.
NOT_BY_RUN = {
    ("dashboard", "note_action"): "a write (the key comes from runs in the INSERT)",
    ("cli.sql", "prune_count"): "prune: by age over all runs",
    ("cli.sql", "prune_batch"): "prune: deletes runs; the trigger deletes on the key",
    ("cli.sql", "demo_worker_state"): "the demo's handful of runs, today's partition",
    ("cli.sql", "demo_check"): "the demo's handful of runs, today's partition",
    ("cli.sql", "demo_journal_kinds"): "the demo's handful of runs, today's partition",
    ("cli.sql", "demo_steps_by_worker"): "the demo's handful of runs, today's partition",
    ("cli.sql", "dba_timeline"): "SQL printed for a person to paste, kept plain",
    ("cli.sql", "dba_events"): "SQL printed for a person to paste, kept plain",
    ("cli.sql", "dba_no_step_twice"): "SQL printed for a person: every run of the demo",
}
#: STABLE functions of the schema that read history, by run id (called through
#: the READS above) or not at all by run.
READ_FUNCTIONS = {"journal_page", "chunk_page", "journal_outline"}
NOT_BY_RUN_FUNCTIONS = {"history_partitions": "the catalog, not a run's rows",
                        "prunable_partitions": "ranges of partitions, not a run"}
HISTORY_WORD = re.compile(r"\b(steps|stream_chunks|run_events)\b")


def _statements() -> dict[tuple[str, str], str]:
    return {(f, name): text for f, path in READ_FILES.items()
            for name, text in _sql.parse_named_queries(path.read_text()).items()}


def test_every_statement_reading_history_is_checked_or_exempt() -> None:
    """The list the partition test runs is complete: a new read of a history
    table fails here until it is added to READS (and so checked) or exempted."""
    reading = {key for key, text in _statements().items()
               if HISTORY_WORD.search(re.sub(r"--[^\n]*", "", text))}
    unlisted = reading - set(READS) - set(NOT_BY_RUN)
    assert not unlisted, f"statements reading history, neither checked nor exempt: {unlisted}"
    gone = (set(READS) | set(NOT_BY_RUN)) - set(_statements())
    assert not gone, f"listed statements that no longer exist: {gone}"


def _partitions_of(db: Any, s: str, runs: list[Any]) -> set[str]:
    """The partitions holding (or due to hold) the history of these runs."""
    out: set[str] = set()
    for table in HISTORY:
        rows = db.execute(q("SELECT coalesce((SELECT h.partition_name "
                            "FROM {s}.history_partitions(%s) h WHERE NOT h.is_default "
                            "AND r.created_at >= h.lower_bound AND r.created_at < h.upper_bound), "
                            "%s) AS p FROM {s}.runs r WHERE r.id = ANY(%s)", s),
                          (table, f"{table}_default", runs)).fetchall()
        out |= {r["p"] for r in rows}
    return out


def _history_relations(db: Any, s: str) -> dict[int, str]:
    """Every partition of the history tables and each of their indexes (oid ->
    the partition's name)."""
    rows = db.execute(
        "SELECT c.oid, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = ANY(ARRAY[%s::regclass, %s::regclass, %s::regclass]) "
        "UNION ALL SELECT x.indexrelid, c.relname FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_index x ON x.indrelid = c.oid "
        "WHERE i.inhparent = ANY(ARRAY[%s::regclass, %s::regclass, %s::regclass])",
        [f'"{s}".{t}' for t in HISTORY] * 2).fetchall()
    return {r["oid"]: r["relname"] for r in rows}


def _scanned_in_plan(plan: dict[str, Any], history: set[str]) -> set[str]:
    """The history partitions that a plan node actually scanned (loops > 0)."""
    found: set[str] = set()
    if plan.get("Relation Name") in history and plan.get("Actual Loops", 0) > 0:
        found.add(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found |= _scanned_in_plan(child, history)
    return found


def explain_partitions(db: Any, s: str, statement: Any, params: dict[str, Any]
                       ) -> tuple[set[str], int, Any]:
    """Run ``statement`` under EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) in a
    transaction: the history partitions it touched (scan nodes executed, and
    any scan of a partition or its index counted by the statistics, which also
    sees inside SQL functions), its shared buffers, and the plan."""
    relations = _history_relations(db, s)
    history = set(relations.values())
    count = ("SELECT c.oid, pg_stat_get_xact_numscans(c.oid) AS n "
             "FROM unnest(%s::oid[]) AS c(oid)")
    with db.transaction():  # the counters only move between transactions' flushes
        before = {r["oid"]: r["n"] for r in db.execute(count, (list(relations),))}
        [row] = db.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + statement,
                           params).fetchall()
        after = {r["oid"]: r["n"] for r in db.execute(count, (list(relations),))}
    plan = row["QUERY PLAN"]
    plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]
    counted = {relations[o] for o, n in after.items() if n > before.get(o, 0)}
    top = plan["Plan"]
    buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    return _scanned_in_plan(top, history) | counted, buffers, plan


@pytest.fixture
def many_partitions(db: Any, pgjournal_schema: str) -> dict[str, Any]:
    """A schema with a year of weekly partitions (~55 per table) and a run
    family (parent P, target T, child C) each in a different week, beside
    runs in other weeks; every run has steps, a stream's chunks and events."""
    s = pgjournal_schema
    db.execute(q("SELECT count(*) FROM {s}.maintain(p_ahead_days => 7, "
                 "p_since => now() - interval '365 days')", s))
    ids = {"P": uuid.uuid4(), "T": uuid.uuid4(), "C": uuid.uuid4()}
    ages = {"P": 300, "T": 200, "C": 100}
    others = [uuid.uuid4() for _ in range(4)]
    rows = [(ids[k], ages[k], ids["P"] if k == "C" else (ids["P"] if k == "T" else None))
            for k in ids] + [(o, 30 + 50 * i, None) for i, o in enumerate(others)]
    # And one run of another workflow in every week, so that no partition is
    # empty (probing an empty one costs no buffer).
    fillers = [(uuid.uuid4(), days, None) for days in range(3, 365, 7)]
    for rid, days, parent in rows + fillers:
        db.execute(q("INSERT INTO {s}.runs (id, workflow, queue, input, status, created_at, "
                     "parent_run_id, parent_position) VALUES (%s, %s, 'q', '{{}}', "
                     "'completed', now() - make_interval(days => %s), %s, %s)", s),
                   (rid, "w" if (rid, days, parent) in rows else "filler", days, parent,
                    0 if parent else None))
        db.execute(q("INSERT INTO {s}.steps (run_created_at, run_id, position, name, "
                     "occurrence, kind, status, output, lease_epoch) "
                     "SELECT {s}.run_bucket(%s), %s, p, CASE p WHEN 1 THEN 'tok' ELSE 's' END, "
                     "p, CASE p WHEN 1 THEN 'stream' ELSE 'step' END, 'completed', "
                     "'{{\"n\": 1}}', 1 FROM generate_series(0, 4) p", s), (rid, rid))
        db.execute(q("INSERT INTO {s}.stream_chunks (run_created_at, run_id, position, seq, "
                     "chunk) SELECT {s}.run_bucket(%s), %s, 1, k, '\"x\"' "
                     "FROM generate_series(0, 3) k", s), (rid, rid))
    db.execute(q("ANALYZE {s}.runs, {s}.steps, {s}.stream_chunks, {s}.run_events", s))
    n = db.execute(q("SELECT count(*) AS n FROM {s}.history_partitions('steps')", s)
                   ).fetchone()["n"]
    assert n >= 50, n
    return {"ids": ids, "others": others}


def _bind(params: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, str) and v in ids:
            return ids[v]
        if isinstance(v, list):
            return [one(x) for x in v]
        return v
    return {k: one(v) for k, v in params.items()}


def test_every_read_by_run_id_touches_only_that_runs_partitions(
        db: Any, pgjournal_schema: str, many_partitions: dict[str, Any]) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of each read of READS, over ~55 partitions a
    table, none of them empty: only the partitions of the runs it reads are
    scanned, and its buffers stay below one per two partitions."""
    s, ids = pgjournal_schema, many_partitions["ids"]
    texts = _statements()
    partitions = int(db.execute(q("SELECT count(*) AS n FROM {s}.history_partitions('steps')",
                                  s)).fetchone()["n"])
    failures = []
    for key, params in READS.items():
        bound = _bind(params, ids)
        runs = [v for v in bound.values() if isinstance(v, uuid.UUID)]
        runs += [x for v in bound.values() if isinstance(v, list) for x in v]
        if key == ("dashboard", "runs_page"):
            runs = list(ids.values()) + many_partitions["others"]
        if key == ("dashboard", "children"):
            runs = [ids["T"], ids["C"]]  # the parent's children
        allowed = _partitions_of(db, s, runs)
        statement = _sql.schema_query(texts[key], s)
        explain_partitions(db, s, statement, bound)  # warm: a SQL function plans on its first call
        touched, buffers, _plan = explain_partitions(db, s, statement, bound)
        extra = touched - allowed
        if extra or buffers >= partitions // 2:
            failures.append(f"{key}: {len(extra)} other partitions scanned "
                            f"({sorted(extra)[:3]}...), {buffers} buffers")
    assert not failures, "\n".join(failures)


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
