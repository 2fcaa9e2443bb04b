"""Backfills where they meet the rest of a schedule (issue 20, row 1 and item 6).

* Two queued backfills of one schedule, the first larger than one round's
  budget: both complete over several rounds, and the schedule's regular slots
  keep firing (the second request used to raise ``IndexError`` in planning,
  which set ``last_error`` and stopped the schedule for good).
* A backfill request that cannot be planned is marked failed on its own; the
  schedule's regular slots keep firing, and ``set_schedule`` clears it.
* A backfill whose end lies in the future does not start the future slots
  early: they are left to fire on time, as regular slots.

Rounds are driven by calling :meth:`Scheduler.round` directly, so no worker
executes the thousands of runs a test starts, and each round is one observed
step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgjournal
from pgjournal.schedules import (
    MAX_SLOTS_PER_ROUND,
    CronRule,
    Scheduler,
    backfill_slots,
    plan_backfills,
)

from .conftest import wait_for
from .test_schedules import run_cli


@pytest.fixture
def db(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(f'SET search_path TO "{pgjournal_schema}"')
        yield conn


def runs_of(db: psycopg.Connection[Any], name: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT idempotency_key, meta, created_at, (meta->>'slot')::timestamptz AS slot "
        "FROM runs WHERE meta->>'schedule' = %s ORDER BY slot", (name,)).fetchall()


def assert_one_run_per_slot(db: psycopg.Connection[Any], name: str) -> None:
    row = db.execute("SELECT count(*) AS n, count(DISTINCT idempotency_key) AS keys, "
                     "count(*) FILTER (WHERE idempotency_key IS DISTINCT FROM "
                     "schedule_key(meta->>'schedule', (meta->>'slot')::timestamptz)) AS odd "
                     "FROM runs WHERE meta->>'schedule' = %s", (name,)).fetchone()
    assert row["n"] == row["keys"] and row["odd"] == 0, row


async def rounds_until_done(app: pgjournal.App, db: psycopg.Connection[Any], name: str,
                            most: int = 20) -> int:
    """Scheduler rounds until no pending backfill is left; each round must leave
    the schedule without an error. Returns the number of rounds."""
    sched = Scheduler(app, await app.store(), sorted(app.workflows), 0.1)
    for n in range(1, most + 1):
        await sched.round()
        row = db.execute("SELECT last_error, backfills FROM schedules WHERE name = %s",
                         (name,)).fetchone()
        assert row["last_error"] is None, f"round {n}: {row['last_error']}"
        if not [b for b in row["backfills"] if "error" not in b]:
            return n
    raise AssertionError(f"backfills still pending after {most} rounds: {row['backfills']}")


def minutes(start: datetime, end: datetime) -> list[datetime]:
    out, t = [], start
    while t <= end:
        out.append(t)
        t += timedelta(minutes=1)
    return out


def plan_row(backfills: list[dict[str, str]], *, cron: str = "* * * * *",
             paused: bool = True) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"name": "m", "workflow": "tick", "cron": cron, "timezone": "UTC",
            "catchup": "latest", "catchup_window": timedelta(days=1), "paused": paused,
            "max_attempts": None, "max_recoveries": None, "fire_after": now,
            "next_fire_at": None, "backfills": backfills, "db_now": now}


def test_planning_leaves_requests_past_the_round_budget_for_the_next_round() -> None:
    app = pgjournal.App("postgresql://unused", schema="unused")

    @app.workflow()
    async def tick(run: pgjournal.Run) -> None: ...

    sched = Scheduler(app, None, ["tick"], 0.1)  # type: ignore[arg-type]  # no DB needed
    day1 = {"from": "2026-01-01T00:00:00+00:00", "to": "2026-01-02T00:00:00+00:00"}
    day2 = {"from": "2026-01-02T00:00:00+00:00", "to": "2026-01-03T00:00:00+00:00"}
    item = sched._plan(plan_row([day1, day2]))
    assert "error" not in item, item.get("error")
    assert len(item["backfill_slots"]) == MAX_SLOTS_PER_ROUND
    # The first request continues after its last planned slot; the second is untouched.
    assert item["backfills"] == [
        {"from": "2026-01-01T16:39:01+00:00", "to": day1["to"]}, day2]
    # A request that exactly fills the budget is done, and leaves nothing empty behind.
    exact = {"from": "2026-01-01T00:00:00+00:00",
             "to": (datetime(2026, 1, 1, tzinfo=UTC)
                    + timedelta(minutes=MAX_SLOTS_PER_ROUND - 1)).isoformat()}
    item = sched._plan(plan_row([exact, day2]))
    assert len(item["backfill_slots"]) == MAX_SLOTS_PER_ROUND
    assert item["backfills"] == [day2]


def test_backfill_slots_stop_at_now() -> None:
    """The clients' slot list and the worker's planning of a queued request
    (one queued before 0015 may end in the future) both end at now."""
    now = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    got = backfill_slots("* * * * *", "UTC", datetime(2026, 1, 1, 0, 5, tzinfo=UTC),
                         datetime(2026, 1, 1, 1, 0, tzinfo=UTC), now=now)
    assert got == minutes(datetime(2026, 1, 1, 0, 5, tzinfo=UTC), now)
    assert backfill_slots("* * * * *", "UTC", now + timedelta(minutes=1),
                          now + timedelta(minutes=5), now=now) == []
    req = {"from": "2026-01-01T00:05:00+00:00", "to": "2026-01-01T01:00:00+00:00"}
    left, fire = plan_backfills(CronRule("* * * * *", "UTC"), [req], now.timestamp())
    assert left == []  # the future part is the schedule's, not left pending
    assert [datetime.fromtimestamp(t, UTC) for t in fire] == got


async def test_two_queued_backfills_complete_and_the_schedule_keeps_firing(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    """Row 1: a day, then the next day, of a per-minute schedule (1441 slots
    each, more than one round's 1000)."""
    app = pgjournal_app

    @app.workflow()
    async def tick(run: pgjournal.Run) -> None: ...

    db.execute("SELECT set_schedule('m', '* * * * *', 'tick')")
    for day in (1, 2):
        assert db.execute("SELECT backfill_schedule('m', %s, %s) AS n",
                          (datetime(2026, 1, day, tzinfo=UTC),
                           datetime(2026, 1, day + 1, tzinfo=UTC))).fetchone()["n"] is None
    # The regular slots: the cursor three minutes back, so a round has a slot to fire.
    cursor = db.execute("UPDATE schedules SET fire_after = now() - interval '3 minutes', "
                        "next_fire_at = NULL RETURNING fire_after").fetchone()["fire_after"]
    n = await rounds_until_done(app, db, "m")
    assert n == 3  # 2882 slots (the shared midnight once): 1000 + 1000 + 881
    runs = runs_of(db, "m")
    backfilled = [r["slot"] for r in runs if r["meta"].get("backfill")]
    assert backfilled == minutes(datetime(2026, 1, 1, tzinfo=UTC),
                                 datetime(2026, 1, 3, tzinfo=UTC))
    # The latest missed slot (and the on-time ones if a minute turned meanwhile).
    regular = [r["slot"] for r in runs if not r["meta"].get("backfill")]
    assert regular and min(regular) > cursor, (cursor, regular)
    assert_one_run_per_slot(db, "m")
    row = db.execute("SELECT last_error, backfills, next_fire_at > now() AS ahead "
                     "FROM schedules").fetchone()
    assert row == {"last_error": None, "backfills": [], "ahead": True}


async def test_a_broken_backfill_is_marked_alone_and_set_schedule_clears_it(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    app = pgjournal_app

    @app.workflow()
    async def tick(run: pgjournal.Run) -> None: ...

    db.execute("SELECT set_schedule('m', '* * * * *', 'tick')")
    # A request nobody can plan (written by hand; backfill_schedule refuses it now).
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="finite"):
        db.execute("SELECT backfill_schedule('m', '-infinity', 'infinity')")
    db.execute("""UPDATE schedules SET
        backfills = '[{"from": "-infinity", "to": "2026-01-01T00:10:00+00:00"},
                      {"from": "2026-01-01T00:00:00+00:00",
                       "to": "2026-01-01T00:05:00+00:00"}]',
        fire_after = now() - interval '3 minutes', next_fire_at = NULL""")
    cursor = db.execute("SELECT fire_after FROM schedules").fetchone()["fire_after"]
    await rounds_until_done(app, db, "m")
    runs = runs_of(db, "m")
    assert [r["slot"] for r in runs if r["meta"].get("backfill")] == minutes(
        datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    regular = [r["slot"] for r in runs if not r["meta"].get("backfill")]
    assert regular and min(regular) > cursor, (cursor, regular)
    row = db.execute("SELECT last_error, backfills, next_fire_at > now() AS ahead "
                     "FROM schedules").fetchone()
    assert row["last_error"] is None and row["ahead"] is True
    [failed] = row["backfills"]
    assert failed["from"] == "-infinity" and "cannot plan" in failed["error"], failed
    # A failed request is not pending: the schedule is not due because of it.
    due = db.execute("SELECT next_due > db_now AS later FROM "
                     "schedules_next_due(ARRAY['tick'], ARRAY[]::text[])").fetchone()
    assert due["later"] is True
    assert db.execute("SELECT count(*) AS n FROM claim_schedules(ARRAY['tick'], "
                      "ARRAY[]::text[], 10)").fetchone()["n"] == 0
    # Setting the schedule again clears the failed request (a pending one would stay).
    db.execute("SELECT set_schedule('m', '* * * * *', 'tick')")
    assert db.execute("SELECT backfills FROM schedules").fetchone()["backfills"] == []


async def test_a_backfill_into_the_future_leaves_future_slots_to_fire_on_time(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    """Item 6: a backfill whose end is in the future used to start the future
    slots at once (meta backfill, created before their slot), and their real
    firing then found the idempotency key taken. Now a backfill reaches no
    further than now, from the App, from psql with slots and from a queued
    request; later slots fire as regular slots, never before their time."""
    app = pgjournal_app

    @app.workflow()
    async def tick(run: pgjournal.Run) -> None: ...

    await app.set_schedule("s", "* * * * * *", tick, catchup="all")
    await app.set_schedule("q", "* * * * * *", tick, catchup="all")
    now = db.execute("SELECT now() AS t").fetchone()["t"]
    end = now.replace(microsecond=0) + timedelta(seconds=3)  # a slot
    # The App computes the slots (the CLI does the same).
    started = await app.backfill_schedule("s", now - timedelta(seconds=3), end)
    early = [(r["slot"], r["created_at"]) for r in runs_of(db, "s")
             if r["slot"] > r["created_at"]]
    assert early == [], f"runs started before their slot: {early}"
    # From psql with slots in the future: those are not started either.
    future = [end + timedelta(seconds=1), end + timedelta(seconds=2)]
    assert db.execute("SELECT backfill_schedule('s', %s, %s, %s) AS n",
                      (future[0], future[-1], future)).fetchone()["n"] == 0
    # A queued request ends at now().
    db.execute("SELECT backfill_schedule('q', %s, %s)", (now - timedelta(seconds=3), end))
    to = db.execute("SELECT (backfills->0->>'to')::timestamptz AS t, now() AS now "
                    "FROM schedules WHERE name = 'q'").fetchone()
    assert to["t"] <= to["now"]
    assert [r for r in runs_of(db, "s") if r["slot"] > r["created_at"]] == []
    assert started == len(runs_of(db, "s")) >= 3
    # Once the future slots have passed, the schedule fires them, as regular slots.
    last = future[-1]
    await wait_for(lambda: asyncio.to_thread(
        lambda: db.execute("SELECT now() > %s AS past", (last,)).fetchone()["past"]),
        what="the backfill's end to pass")
    sched = Scheduler(app, await app.store(), ["tick"], 0.1)
    await sched.round()
    for name in ("s", "q"):
        runs = runs_of(db, name)
        assert_one_run_per_slot(db, name)
        assert [r for r in runs if r["slot"] > r["created_at"]] == []
        later = [r for r in runs if r["slot"] > now]
        expected = {now.replace(microsecond=0) + timedelta(seconds=k) for k in range(1, 6)}
        assert {r["slot"] for r in later} >= expected
        assert not [r for r in later if r["meta"].get("backfill")], later


def test_cli_backfill_into_the_future_says_what_it_left(
        pgjournal_dsn: str, pgjournal_schema: str, db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT set_schedule('m', '* * * * *', 'tick')")
    now = db.execute("SELECT now() AS t").fetchone()["t"]
    res = run_cli(pgjournal_dsn, pgjournal_schema, "schedules", "backfill", "m",
                  "--from", "5m", "--to", (now + timedelta(hours=1)).isoformat())
    assert res.returncode == 0, res.stderr
    assert "slots after now are left to fire on time" in res.stdout, res.stdout
    runs = runs_of(db, "m")
    assert 4 <= len(runs) <= 6 and [r for r in runs if r["slot"] > r["created_at"]] == []


async def test_upgrade_revives_schedules_the_planning_bug_stopped(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    """A schedule stopped before 0015 (last_error from the IndexError, two
    backfills still queued) fires and finishes its backfills after the upgrade,
    without anyone setting it again."""
    from pgjournal.migrations import sql_dir

    app = pgjournal_app

    @app.workflow()
    async def tick(run: pgjournal.Run) -> None: ...

    db.execute("SELECT set_schedule('m', '* * * * *', 'tick')")
    db.execute("SELECT set_schedule('bad', '* * * * *', 'tick')")
    db.execute("""UPDATE schedules SET backfills = '[
        {"from": "2026-01-01T00:00:00+00:00", "to": "2026-01-02T00:00:00+00:00"},
        {"from": "2026-01-02T00:00:00+00:00", "to": "2026-01-03T00:00:00+00:00"}]',
        last_error = 'cannot compute its slots: IndexError: list index out of range'
        WHERE name = 'm'""")
    db.execute("UPDATE schedules SET last_error = 'invalid cron ''x'': y' WHERE name = 'bad'")
    db.execute((sql_dir() / "migrations" / "0015_schedule_backfills.sql").read_text())
    errors = {r["name"]: r["last_error"] for r in
              db.execute("SELECT name, last_error FROM schedules").fetchall()}
    assert errors == {"m": None, "bad": "invalid cron 'x': y"}  # only the bug's errors go
    await rounds_until_done(app, db, "m")
    assert len([r for r in runs_of(db, "m") if r["meta"].get("backfill")]) == 2881
