"""``schedules``: list cron schedules; set, pause, resume, trigger, backfill, delete."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from .._output import paint, parse_duration, table, use_colour
from ..app import App
from ..errors import UnknownSchedule
from ..schedules import (
    CronRule,
    backfill_slots,
    validate_name,
    validate_policy,
    validate_timezone,
    validate_window,
)
from ._common import Add, Row, fail, local, parse_json, plural, print_json, with_app

ACTIONS = ("list", "set", "pause", "resume", "trigger", "backfill", "delete")


def parse_time(text: str, zone: ZoneInfo, what: str) -> datetime:
    """ISO 8601 (``2026-12-02T10:00``, ``2026-12-02 10:00+01:00``, ``2026-12-02``),
    ``now``, or an age such as ``6h`` (that long ago). Without an offset the
    time is read in the schedule's time zone."""
    text = text.strip()
    if text.lower() == "now":
        return datetime.now(UTC)
    if text and text[-1].isalpha() and text[0].isdigit() and "-" not in text:
        try:
            return datetime.now(UTC) - parse_duration(text, require_unit=True)
        except ValueError:
            pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"{what} {text!r} is not a time: use ISO 8601 such as 2026-12-02T10:00 "
                   "(read in the schedule's time zone unless it has an offset), 'now' or an "
                   "age such as 6h") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


def cmd_schedules(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action != "list" and not args.name:
        raise fail(f"schedules {action} needs a schedule NAME")
    if action != "list":
        validate_name(args.name)
    if action == "set":
        return _set(args)
    if action == "backfill" and (not args.start or not args.end):
        raise fail("schedules backfill needs --from T and --to T")

    async def go(app: App) -> object:
        if action == "list":
            return await app.list_schedules()
        if action in ("pause", "resume", "delete"):
            await (await app.store()).schedule_action(action, args.name)
            return None
        if action == "trigger":
            return (await app.trigger_schedule(args.name)).run_id
        # backfill: the slots are computed here, with the schedule's rule.
        store = await app.store()
        row = await store.get_schedule(args.name)
        if row is None:
            raise UnknownSchedule(f"schedule {args.name!r} does not exist")
        zone = validate_timezone(row["timezone"])
        start = parse_time(args.start, zone, "--from")
        end = parse_time(args.end, zone, "--to")
        now = datetime.now(UTC)
        slots = backfill_slots(row["cron"], row["timezone"], start, end, now=now)
        started = await store.backfill_schedule(args.name, start, end, slots)
        return (len(slots), started or 0, start, end, end > now)

    result = with_app(args, go, read_only=action == "list")
    if action == "list":
        assert isinstance(result, list)
        return _print_list(result, args.json)
    if args.json:
        if action == "backfill":  # [slots, started, from, to], as before
            assert isinstance(result, tuple)
            result = list(result[:4])
        print_json({"schedule": args.name, "action": action, "result": result})
        return 0
    if action == "pause":
        print(f"schedule {args.name} paused: no runs until resumed (slots meanwhile are not "
              "caught up; backfill them if needed)")
    elif action == "resume":
        print(f"schedule {args.name} resumed: it fires from its next slot")
    elif action == "delete":
        print(f"schedule {args.name} deleted (its runs stay)")
    elif action == "trigger":
        print(f"started run {result} of schedule {args.name}")
    else:
        assert isinstance(result, tuple)
        n, started, start, end, future = result
        print(f"schedule {args.name}: {plural(n, 'slot')} from {local(start)} to {local(end)}; "
              f"{plural(started, 'run')} started, {n - started} already had one"
              + ("; slots after now are left to fire on time" if future else ""))
    return 0


def _set(args: argparse.Namespace) -> int:
    # Everything is checked before any SQL, each error naming its field.
    if not args.cron:
        raise fail("schedules set needs NAME and CRON, e.g. "
                   "pgjournal schedules set sweep '*/5 * * * *' --workflow sweep")
    if not args.workflow:
        raise fail("schedules set needs --workflow (the workflow each slot starts)")
    CronRule(args.cron, args.timezone)
    validate_policy(args.catchup)
    window = 86400.0
    if args.window:
        try:
            window = validate_window(parse_duration(args.window))
        except ValueError as exc:
            raise fail(f"--window: {exc}") from None
    run_args = parse_json(args.args, "--args") if args.args else []
    if not isinstance(run_args, list):
        raise fail("--args must be a JSON array, e.g. '[1, \"two\"]'")
    run_kwargs = parse_json(args.kwargs, "--kwargs") if args.kwargs else {}
    if not isinstance(run_kwargs, dict):
        raise fail("--kwargs must be a JSON object, e.g. '{\"limit\": 10}'")

    async def go(app: App) -> bool:
        return await app.set_schedule(
            args.name, args.cron, args.workflow, args=run_args, kwargs=run_kwargs,
            timezone=args.timezone, catchup=args.catchup, catchup_window=window,
            queue=args.queue, paused=args.paused)

    created = with_app(args, go)
    if args.json:
        print_json({"schedule": args.name, "created": created})
    else:
        print(f"schedule {args.name} {'created' if created else 'updated'}: {args.cron!r} "
              f"({args.timezone}) starts {args.workflow}"
              + (" (paused)" if args.paused else ""))
    return 0


def _print_list(rows: list[Row], as_json: bool) -> int:
    if as_json:
        print_json(rows)
        return 0
    if not rows:
        print("no schedules (declare one with @app.schedule, or pgjournal schedules set)",
              file=sys.stderr)
        return 0
    colour = use_colour(sys.stdout)
    cells, styles = [], []
    for r in rows:
        state = "paused" if r["paused"] else ("error" if r["last_error"] else "active")
        cells.append([r["name"], r["workflow"], r["cron"], r["timezone"], r["catchup"], state,
                      local(r["next_fire_at"]) if r["next_fire_at"] else "-",
                      local(r["last_slot"]), str(r["runs_last_day"]),
                      r["last_run_status"] or "-"])
        styles.append([None] * 5 + [
            "yellow" if r["paused"] else ("red" if r["last_error"] else None)] + [None] * 4)
    print(table(cells, ["NAME", "WORKFLOW", "CRON", "TIMEZONE", "CATCHUP", "STATE",
                        "NEXT", "LAST-SLOT", "RUNS-1D", "LAST-RUN"],
                colour=colour, styles=styles, right=(8,)))
    for r in rows:
        if r["last_error"]:
            print(paint(f"schedule {r['name']}: {r['last_error']}", "red", colour))
    return 0


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's command to the parser (see ``build_parser``)."""
    p = add("schedules", "cron schedules: list, set, pause, resume, trigger, backfill, delete",
            """
            pgjournal schedules                            # list, with next and last slot
            pgjournal schedules pause sweep                # no runs until resumed
            pgjournal schedules resume sweep               # fires from its next slot
            pgjournal schedules trigger sweep              # one run now, outside the slots
            pgjournal schedules backfill sweep --from 2026-12-01T00:00 --to 2026-12-02T00:00
            pgjournal schedules backfill sweep --from 6h --to now
            pgjournal schedules set report '0 7 * * 1-5' --workflow report --timezone Europe/Berlin
            pgjournal schedules set tick '*/10 * * * * *' --workflow tick --catchup skip
            pgjournal schedules delete report
            """, [db, js], cmd_schedules,
            more="\n\nEach slot of a schedule becomes one run (idempotency key "
                 "schedule:NAME:SLOT), however many workers run. Cron: 5 fields (minute "
                 "hour day month weekday), 6 with a seconds field first, or @hourly, "
                 "@daily, @weekly, @monthly, @yearly. Times without an offset are read in "
                 "the schedule's time zone. See docs/flow-control.md.")
    p.add_argument("action", nargs="?", choices=ACTIONS, metavar="ACTION",
                   help="list (default), set, pause, resume, trigger, backfill, delete")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("cron", nargs="?", metavar="CRON", help="set: the cron rule")
    p.add_argument("--from", dest="start", metavar="T", help="backfill: first time")
    p.add_argument("--to", dest="end", metavar="T", help="backfill: last time")
    p.add_argument("--workflow", help="set: the workflow each slot starts")
    p.add_argument("--timezone", default="UTC", help="set: IANA time zone (default UTC)")
    p.add_argument("--catchup", default="latest",
                   help="set: skip, latest or all: what runs after downtime (default latest)")
    p.add_argument("--window", metavar="AGE",
                   help="set: how far back catchup=all reaches (default 1d)")
    p.add_argument("--queue", help="set: queue of the runs (default: the workflow's)")
    p.add_argument("--args", metavar="JSON", help="set: positional arguments, a JSON array")
    p.add_argument("--kwargs", metavar="JSON", help="set: keyword arguments, a JSON object")
    p.add_argument("--paused", action="store_true", help="set: create it paused")

