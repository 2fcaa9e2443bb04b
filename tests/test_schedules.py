"""Schedules: slot computation (DST edges), catch-up planning, the decorator and
App API, the SQL functions a DBA calls, the CLI, and the schedule_status view."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.rows import dict_row

import pgjournal
from pgjournal import UnknownSchedule
from pgjournal.schedules import (
    CronRule,
    backfill_slots,
    plan_round,
)

from .conftest import ROOT, serving, wait_for

BERLIN = ZoneInfo("Europe/Berlin")


def slots(cron: str, tz: str, start: datetime, n: int) -> list[datetime]:
    rule = CronRule(cron, tz)
    out = []
    for t in rule.slots_after(int(start.timestamp())):
        out.append(datetime.fromtimestamp(t, UTC))
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


def z(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# -- slots and DST ---------------------------------------------------------------


def test_daily_0230_on_the_spring_forward_day_fires_once_an_hour_later() -> None:
    # 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 does not exist.
    got = slots("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3)
    assert got == [z("2026-03-29T01:30:00+00:00"),   # 03:30 CEST: 30 min into the gap
                   z("2026-03-30T00:30:00+00:00"),   # 02:30 CEST
                   z("2026-03-31T00:30:00+00:00")]
    assert got[0].astimezone(BERLIN).strftime("%H:%M") == "03:30"


def test_daily_0230_on_the_fall_back_day_fires_once_at_the_first_pass() -> None:
    # 2026-10-25: 02:00-03:00 happens twice (CEST, then CET).
    got = slots("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)
    assert got == [z("2026-10-25T00:30:00+00:00"),   # 02:30 CEST, the first pass
                   z("2026-10-26T01:30:00+00:00"),   # 02:30 CET the next day
                   z("2026-10-27T01:30:00+00:00")]


def test_hourly_across_fall_back_fires_every_real_hour() -> None:
    got = slots("30 * * * *", "Europe/Berlin", datetime(2026, 10, 25, 0, 0, tzinfo=BERLIN), 5)
    assert [g.astimezone(BERLIN).strftime("%H:%M%z") for g in got] == [
        "00:30+0200", "01:30+0200", "02:30+0200", "02:30+0100", "03:30+0100"]
    gaps = {(b - a) for a, b in pairwise(got)}
    assert gaps == {timedelta(hours=1)}


def test_hourly_across_spring_forward_fires_every_real_hour() -> None:
    got = slots("30 * * * *", "Europe/Berlin", datetime(2026, 3, 29, 0, 0, tzinfo=BERLIN), 4)
    assert [g.astimezone(BERLIN).strftime("%H:%M%z") for g in got] == [
        "00:30+0100", "01:30+0100", "03:30+0200", "04:30+0200"]
    assert {(b - a) for a, b in pairwise(got)} == {timedelta(hours=1)}


def test_a_fixed_hour_rule_fires_once_in_the_repeated_hour() -> None:
    got = slots("*/20 2 * * *", "Europe/Berlin", datetime(2026, 10, 25, 1, tzinfo=BERLIN), 4)
    assert [g.astimezone(BERLIN).strftime("%m-%d %H:%M%z") for g in got] == [
        "10-25 02:00+0200", "10-25 02:20+0200", "10-25 02:40+0200", "10-26 02:00+0100"]


def test_gap_slot_is_found_when_starting_just_after_the_change() -> None:
    # Starting at 03:10 CEST, after the change: 02:30 (-> 03:30 CEST) is still ahead.
    got = slots("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 29, 3, 10, tzinfo=BERLIN), 1)
    assert got == [z("2026-03-29T01:30:00+00:00")]


def test_new_york_and_seconds_fields() -> None:
    # America/New_York springs forward on 2026-03-08 at 02:00.
    got = slots("0 2 * * *", "America/New_York", datetime(2026, 3, 7, 12, tzinfo=UTC), 2)
    ny = ZoneInfo("America/New_York")
    assert [g.astimezone(ny).strftime("%d %H:%M") for g in got] == ["08 03:00", "09 02:00"]
    got = slots("*/15 * * * * *", "UTC", datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC), 3)
    assert [g.strftime("%M:%S") for g in got] == ["00:15", "00:30", "00:45"]
    got = slots("@hourly", "UTC", datetime(2026, 1, 1, 0, 10, tzinfo=UTC), 2)
    assert [g.strftime("%H:%M") for g in got] == ["01:00", "02:00"]


@pytest.mark.parametrize(("cron", "tz", "field"), [
    ("61 * * * *", "UTC", "cron"),
    ("* * *", "UTC", "cron"),
    ("* * * * * * *", "UTC", "cron"),
    ("", "UTC", "cron"),
    ("0 0 30 2 *", "UTC", "cron"),
    ("* * * * *", "Mars/Olympus", "timezone"),
    ("* * * * *", "", "timezone"),
])
def test_bad_cron_and_timezone_name_the_field(cron: str, tz: str, field: str) -> None:
    with pytest.raises(pgjournal.ConfigurationError, match=f"^invalid {field} "):
        CronRule(cron, tz)


# -- catch-up planning ------------------------------------------------------------


def test_plan_on_time_and_missed_slots_per_policy() -> None:
    rule = CronRule("* * * * *", "UTC")  # every minute
    base = datetime(2026, 1, 1, 12, 0, tzinfo=UTC).timestamp()
    cursor = base - 0.5            # the 12:00 slot is unfired
    now = base + 5 * 60 + 3        # 12:05:03: 12:00..12:04 missed, 12:05 on time
    minute = [int(base) + 60 * i for i in range(6)]
    assert plan_round(rule, "skip", 86400, cursor, now).fire == [minute[5]]
    assert plan_round(rule, "latest", 86400, cursor, now).fire == [minute[4], minute[5]]
    assert plan_round(rule, "all", 86400, cursor, now).fire == minute
    assert plan_round(rule, "all", 150, cursor, now).fire == minute[3:]  # 12:03 is 123 s old
    plan = plan_round(rule, "all", 86400, cursor, now)
    assert plan.cursor == int(now) and plan.next_fire == int(base) + 360
    # Ten seconds late is still on time; eleven is not.
    assert plan_round(rule, "skip", 86400, base - 1, base + 10).fire == [int(base)]
    assert plan_round(rule, "skip", 86400, base - 1, base + 11).fire == []
    # Per second: half the time to the next slot.
    sec = CronRule("* * * * * *", "UTC")
    assert plan_round(sec, "skip", 86400, base - 1, base + 0.4).fire == [int(base)]
    assert plan_round(sec, "skip", 86400, base - 1, base + 0.6).fire == []
    # Latest reaches far back for a sparse rule.
    yearly = CronRule("@yearly", "UTC")
    far = datetime(2020, 6, 1, tzinfo=UTC).timestamp()
    assert plan_round(yearly, "latest", 86400, far, base).fire == [
        int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())]
    assert plan_round(yearly, "skip", 86400, far, base).fire == []


def test_plan_caps_a_large_catch_up_and_continues() -> None:
    sec = CronRule("* * * * * *", "UTC")
    base = 1_800_000_000
    plan = plan_round(sec, "all", 86400, base, base + 5000)
    assert len(plan.fire) == 1000 and plan.fire[0] == base + 1
    assert plan.cursor == plan.fire[-1] and plan.next_fire == plan.fire[-1] + 1


def test_backfill_slots_are_inclusive_and_bounded() -> None:
    got = backfill_slots("0 * * * *", "UTC", z("2026-01-01T00:00:00+00:00"),
                         z("2026-01-01T03:00:00+00:00"))
    assert [g.hour for g in got] == [0, 1, 2, 3]
    with pytest.raises(pgjournal.ConfigurationError, match="more than"):
        backfill_slots("* * * * * *", "UTC", z("2026-01-01T00:00:00+00:00"),
                       z("2026-01-03T00:00:00+00:00"))
    with pytest.raises(pgjournal.ConfigurationError, match="before it starts"):
        backfill_slots("* * * * *", "UTC", z("2026-01-02T00:00:00+00:00"),
                       z("2026-01-01T00:00:00+00:00"))


# -- database ----------------------------------------------------------------------


@pytest.fixture
def db(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(f'SET search_path TO "{pgjournal_schema}"')
        yield conn


def slot_keys(db: psycopg.Connection[Any], name: str) -> list[str]:
    rows = db.execute("SELECT idempotency_key FROM runs WHERE meta->>'schedule' = %s "
                      "AND idempotency_key IS NOT NULL ORDER BY 1", (name,)).fetchall()
    return [r["idempotency_key"] for r in rows]


def test_decorator_validates_at_import(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    with pytest.raises(pgjournal.ConfigurationError, match="invalid cron"):
        app.schedule("*/5 * *")
    with pytest.raises(pgjournal.ConfigurationError, match="invalid timezone"):
        app.schedule("* * * * *", timezone="Europe/Nowhere")
    with pytest.raises(pgjournal.ConfigurationError, match="invalid catchup"):
        app.schedule("* * * * *", catchup="some")
    with pytest.raises(pgjournal.ConfigurationError, match="invalid schedule name"):
        @app.schedule("* * * * *", name="has space")
        @app.workflow()
        async def wf(run: pgjournal.Run) -> None: ...


def test_schedule_on_an_unregistered_function_fails_at_worker_construction(
        pgjournal_app: pgjournal.App) -> None:
    @pgjournal_app.schedule("* * * * *", name="orphan")
    async def orphan(run: pgjournal.Run) -> None: ...

    with pytest.raises(pgjournal.ConfigurationError, match="not registered with this app"):
        pgjournal.Worker(pgjournal_app)
    pgjournal.Worker(pgjournal_app, schedules=False)  # fine without the scheduler


async def test_declared_schedule_is_upserted_at_worker_start_and_keeps_pause(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    app = pgjournal_app

    @app.schedule("0 3 * * *", name="nightly", timezone="Europe/Berlin", catchup="skip",
                  kwargs={"depth": 2})
    @app.workflow(queue="maint", max_attempts=7)
    async def cleanup(run: pgjournal.Run, depth: int) -> int:
        return depth

    # Nothing at import.
    assert db.execute("SELECT count(*) AS n FROM schedules").fetchone()["n"] == 0
    async with serving(app):
        await wait_for(lambda: asyncio.to_thread(
            lambda: db.execute("SELECT next_fire_at FROM schedules "
                               "WHERE next_fire_at IS NOT NULL").fetchone()),
            what="the schedule row and its next slot")
    row = db.execute("SELECT * FROM schedules WHERE name = 'nightly'").fetchone()
    assert (row["workflow"], row["queue"], row["origin"], row["catchup"]) == (
        "cleanup", "maint", "code", "skip")
    assert row["max_attempts"] == 7 and row["kwargs"] == {"depth": 2}
    assert row["next_fire_at"].astimezone(BERLIN).strftime("%H:%M") == "03:00"
    await app.pause_schedule("nightly")
    cursor = db.execute("SELECT fire_after FROM schedules").fetchone()["fire_after"]
    async with serving(app):  # a restarted worker declares it again
        await wait_for(lambda: asyncio.to_thread(lambda: db.execute(
            "SELECT declared_at > %s AS again FROM schedules", (row["declared_at"],)
        ).fetchone()["again"]), what="the second declaration")
    again = db.execute("SELECT * FROM schedules WHERE name = 'nightly'").fetchone()
    assert again["paused"] is True                  # the operator's pause stays
    assert again["fire_after"] == cursor            # unchanged rule: cursor kept


async def test_worker_fires_api_schedule_and_not_undeclared_code_schedules(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    app = pgjournal_app

    @app.workflow(queue="ticks")
    async def tick(run: pgjournal.Run, label: str) -> str:
        return label

    # A schedule set through the API: fired by any worker that registered `tick`.
    assert await app.set_schedule("api-tick", "* * * * * *", "tick", kwargs={"label": "a"},
                                  catchup="all") is True
    # A code schedule no running worker declares any more (removed from the code).
    db.execute("SELECT set_schedule('gone', '* * * * * *', 'tick', '[]', "
               "'{\"label\": \"g\"}', p_queue => 'ticks')")
    db.execute("UPDATE schedules SET origin = 'code' WHERE name = 'gone'")
    async with serving(app):
        await wait_for(lambda: asyncio.to_thread(lambda: len(slot_keys(db, "api-tick")) >= 3),
                       timeout=20, what="three api-tick runs")
        run_id = db.execute("SELECT id FROM runs WHERE meta->>'schedule' = 'api-tick' "
                            "ORDER BY created_at LIMIT 1").fetchone()["id"]
        assert await app.handle(run_id).result(timeout=20) == "a"
    assert slot_keys(db, "gone") == []
    row = db.execute("SELECT * FROM runs WHERE id = %s", (run_id,)).fetchone()
    assert row["queue"] == "ticks"
    assert row["idempotency_key"] == f"schedule:api-tick:{row['meta']['slot']}"
    status = db.execute("SELECT * FROM schedule_status WHERE name = 'api-tick'").fetchone()
    assert status["runs_last_day"] >= 3 and status["last_run_status"] is not None
    assert status["last_slot"] is not None and status["next_fire_at"] > status["last_slot"]


async def test_sql_functions_pause_resume_trigger_backfill(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    app = pgjournal_app

    @app.workflow()
    async def report(run: pgjournal.Run) -> str:
        return "ok"

    db.execute("SELECT set_schedule('rep', '0 * * * *', 'report', p_timezone => 'Europe/Berlin')")
    db.execute("SELECT pause_schedule('rep')")
    assert db.execute("SELECT paused FROM schedule_status").fetchone()["paused"] is True
    run_id = db.execute("SELECT trigger_schedule('rep') AS id").fetchone()["id"]
    triggered = db.execute("SELECT * FROM runs WHERE id = %s", (run_id,)).fetchone()
    assert triggered["meta"] == {"schedule": "rep", "trigger": True}
    # A backfill request from psql is computed and started by a worker, paused or not.
    assert db.execute("SELECT backfill_schedule('rep', '2026-01-01 00:00+00', "
                      "'2026-01-01 03:00+00') AS n").fetchone()["n"] is None
    async with serving(app):
        await wait_for(lambda: asyncio.to_thread(lambda: len(slot_keys(db, "rep")) == 4),
                       timeout=20, what="the backfilled runs")
        await wait_for(lambda: asyncio.to_thread(lambda: db.execute(
            "SELECT pending_backfills = 0 AS done FROM schedule_status").fetchone()["done"]),
            what="the request to be done")
    assert slot_keys(db, "rep") == [f"schedule:rep:2026-01-01T0{h}:00:00+00:00"
                                    for h in range(4)]
    # Again with the slots given (as the CLI does): only slots without a run start.
    slots = [z(f"2026-01-01T0{h}:00:00+00:00") for h in range(3, 6)]
    n = db.execute("SELECT backfill_schedule('rep', %s, %s, %s) AS n",
                   (slots[0], slots[-1], slots)).fetchone()["n"]
    assert n == 2
    db.execute("SELECT resume_schedule('rep')")
    row = db.execute("SELECT paused, next_fire_at FROM schedules").fetchone()
    assert row == {"paused": False, "next_fire_at": None}  # computed by the next round
    for bad, message in [
        ("SELECT pause_schedule('nope')", "schedule 'nope' does not exist"),
        ("SELECT set_schedule('x', '* * *', 'report')", "invalid cron"),
        ("SELECT set_schedule('x', '* * * * *', 'report', p_timezone => 'Mars/Base')",
         "invalid timezone"),
        ("SELECT set_schedule('x', '* * * * *', 'report', p_catchup => 'most')",
         "invalid catchup"),
    ]:
        with pytest.raises(psycopg.Error, match=message):
            db.execute(bad)


async def test_a_cron_that_only_sql_accepted_is_reported_not_retried(
        pgjournal_app: pgjournal.App, db: psycopg.Connection[Any]) -> None:
    app = pgjournal_app

    @app.workflow()
    async def report(run: pgjournal.Run) -> str:
        return "ok"

    db.execute("SELECT set_schedule('bad', '99 * * * *', 'report')")  # 5 fields: SQL accepts
    async with serving(app):
        await wait_for(lambda: asyncio.to_thread(lambda: db.execute(
            "SELECT last_error FROM schedules").fetchone()["last_error"]),
            what="the error to be recorded")
    err = db.execute("SELECT last_error FROM schedule_status").fetchone()["last_error"]
    assert err.startswith("invalid cron '99 * * * *'")
    db.execute("SELECT set_schedule('bad', '9 * * * *', 'report')")
    assert db.execute("SELECT last_error FROM schedules").fetchone()["last_error"] is None


async def test_app_api_errors_and_backfill(pgjournal_app: pgjournal.App,
                                           db: psycopg.Connection[Any]) -> None:
    app = pgjournal_app

    @app.workflow()
    async def report(run: pgjournal.Run) -> str:
        return "ok"

    with pytest.raises(UnknownSchedule, match="'nope' does not exist"):
        await app.pause_schedule("nope")
    with pytest.raises(UnknownSchedule):
        await app.trigger_schedule("nope")
    with pytest.raises(pgjournal.UnknownWorkflow):
        await app.set_schedule("x", "* * * * *", "reprot")
    with pytest.raises(pgjournal.ConfigurationError, match="invalid timezone"):
        await app.set_schedule("x", "* * * * *", "report", timezone="Berlin")
    await app.set_schedule("daily", "30 2 * * *", report, timezone="Europe/Berlin")
    # Backfill across the spring-forward day: 02:30 became 03:30 CEST.
    n = await app.backfill_schedule("daily", datetime(2026, 3, 28, tzinfo=BERLIN),
                                    datetime(2026, 3, 30, 12, tzinfo=BERLIN))
    assert n == 3
    assert slot_keys(db, "daily") == ["schedule:daily:2026-03-28T01:30:00+00:00",
                                      "schedule:daily:2026-03-29T01:30:00+00:00",
                                      "schedule:daily:2026-03-30T00:30:00+00:00"]
    assert await app.backfill_schedule("daily", datetime(2026, 3, 28, tzinfo=BERLIN),
                                       datetime(2026, 3, 30, 12, tzinfo=BERLIN)) == 0
    handle = await app.trigger_schedule("daily")
    assert await handle.status() == "queued"
    await app.delete_schedule("daily")
    assert await app.get_schedule("daily") is None


# -- CLI ----------------------------------------------------------------------------


def run_cli(dsn: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgjournal", "--dsn", dsn, "--schema", schema,
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          check=False)


def one_line_error(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgjournal: error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_schedules(pgjournal_dsn: str, pgjournal_schema: str,
                       db: psycopg.Connection[Any]) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(pgjournal_dsn, pgjournal_schema, "schedules", *args)

    help_text = cli("--help").stdout
    for example in ("schedules pause sweep", "schedules trigger sweep",
                    "schedules backfill sweep --from", "schedules set report"):
        assert example in help_text
    for line in help_text.split("examples:\n", 1)[1].splitlines():  # as test_cli checks
        assert not line.strip() or (line.startswith("  ") and not line.startswith("   ")), line
    res = cli("set", "sweep", "*/5 * * * *", "--workflow", "sweep", "--timezone",
              "Europe/Berlin", "--catchup", "all", "--window", "2h", "--kwargs", '{"n": 1}')
    assert res.returncode == 0, res.stderr
    assert "schedule sweep created" in res.stdout
    row = db.execute("SELECT * FROM schedules").fetchone()
    assert (row["cron"], row["timezone"], row["catchup"], row["kwargs"]) == (
        "*/5 * * * *", "Europe/Berlin", "all", {"n": 1})
    assert row["catchup_window"] == timedelta(hours=2)
    # Errors: one line, naming the field, before any SQL (no such schema is needed).
    one_line_error(cli("set", "x", "*/5 * *", "--workflow", "w"), "invalid cron '*/5 * *'")
    one_line_error(cli("set", "x", "0 25 * * *", "--workflow", "w"), "invalid cron",
                   "out of range")
    one_line_error(cli("set", "x", "* * * * *", "--workflow", "w", "--timezone", "Mars/Base"),
                   "invalid timezone 'Mars/Base'")
    one_line_error(cli("set", "x", "* * * * *", "--workflow", "w", "--catchup", "some"),
                   "invalid catchup 'some'")
    nowhere = run_cli("postgresql://nobody@127.0.0.1:1/none", "nope", "schedules", "set", "x",
                      "* * *", "--workflow", "w")
    one_line_error(nowhere, "invalid cron")
    one_line_error(cli("pause", "nope"), "schedule 'nope' does not exist")
    one_line_error(cli("trigger", "nope"), "schedule 'nope' does not exist")
    one_line_error(cli("backfill", "nope", "--from", "1h", "--to", "now"),
                   "schedule 'nope' does not exist")
    one_line_error(cli("backfill", "sweep", "--from", "yesterday", "--to", "now"),
                   "--from 'yesterday' is not a time")
    one_line_error(cli("pause"), "needs a schedule NAME")

    assert cli("pause", "sweep").returncode == 0
    listing = cli()
    assert listing.returncode == 0
    assert "sweep" in listing.stdout and "paused" in listing.stdout
    res = cli("trigger", "sweep")
    assert res.returncode == 0 and "started run" in res.stdout
    # Backfill in the schedule's zone: 10:00-10:20 Berlin = 09:00-09:20 UTC, 5 slots.
    res = cli("backfill", "sweep", "--from", "2026-01-10T10:00", "--to", "2026-01-10T10:20")
    assert res.returncode == 0, res.stderr
    assert "5 slots" in res.stdout and "5 runs started" in res.stdout
    res = cli("backfill", "sweep", "--from", "2026-01-10T10:10", "--to", "2026-01-10T10:30",
              "--json")
    assert json.loads(res.stdout)["result"][:2] == [5, 2]  # 10:10-10:20 had runs
    assert slot_keys(db, "sweep")[0] == "schedule:sweep:2026-01-10T09:00:00+00:00"
    assert len(slot_keys(db, "sweep")) == 7
    assert cli("resume", "sweep").returncode == 0
    data = json.loads(cli("list", "--json").stdout)
    assert data[0]["name"] == "sweep" and data[0]["paused"] is False
    assert data[0]["runs_last_day"] == 8  # 7 backfilled + 1 triggered
    assert cli("delete", "sweep").returncode == 0
    assert "no schedules" in cli().stderr
