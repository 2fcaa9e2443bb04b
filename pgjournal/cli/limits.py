"""``limits``: concurrency limits by key, rate buckets, and what each is holding back."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._output import human_seconds, paint, table, use_colour
from ..app import App
from ._common import Add, fail, parse_limit, print_json, with_app


def cmd_limits(args: argparse.Namespace) -> int:
    action = args.action

    async def go(app: App) -> dict[str, Any]:
        if action == "key":
            await app.set_concurrency_limit(args.name, _limit(args.value))
        elif action == "rate":
            if args.value is None or args.value.lower() in ("none", "off"):
                await app.set_rate_limit(args.name, None)
            else:
                capacity, refill = _rate(args.value)
                await app.set_rate_limit(args.name, capacity, refill)
        store = await app.store()
        return {"limits": await store.fetch("concurrency_limits"),
                "keys": await store.fetch("concurrency_keys"),
                "buckets": await store.fetch("rate_limits")}

    if action and (not args.name or (action == "key" and args.value is None)):
        raise fail(f"usage: pgjournal limits {action} NAME "
                   + ("N|none" if action == "key" else "CAPACITY/SECONDS|none"))
    if action == "key":
        _limit(args.value)
    elif action == "rate" and args.value and args.value.lower() not in ("none", "off"):
        _rate(args.value)
    data = with_app(args, go, read_only=not action)
    if action and not args.json:
        if action == "key":
            n = _limit(args.value)
            print(f"concurrency key {args.name}: " + (f"at most {n} running at once across "
                                                      "all workers" if n else "no limit"))
        else:
            gone = args.value is None or args.value.lower() in ("none", "off")
            print(f"rate bucket {args.name}: " + ("removed" if gone else args.value))
        return 0
    if args.json:
        print_json(data)
        return 0
    colour = use_colour(sys.stdout)
    if data["limits"]:
        print(paint("concurrency limits", "bold", colour))
        print(table([[r["pattern"], str(r["max_running"])] for r in data["limits"]],
                    ["KEY OR PATTERN", "MAX RUNNING"], colour=colour, right=(1,)))
    if data["keys"]:
        print(paint("keys with unfinished runs", "bold", colour))
        cells: list[list[str]] = []
        styles: list[list[str | None]] = []
        for r in data["keys"]:
            cells.append([r["key"], str(r["max_running"] or "-"), str(r["running"]),
                          str(r["queued"]), str(r["suspended"]),
                          "yes" if r["at_limit"] else "no"])
            row_style: list[str | None] = [None] * 5
            styles.append([*row_style, "yellow" if r["at_limit"] else None])
        print(table(cells, ["KEY", "LIMIT", "RUNNING", "QUEUED", "SUSPENDED", "AT LIMIT"],
                    colour=colour, styles=styles, right=(1, 2, 3, 4)))
    if data["buckets"]:
        print(paint("rate buckets", "bold", colour))
        cells = []
        for r in data["buckets"]:
            debt = r["debt_paid_in"]
            cells.append([r["name"], f"{r['capacity']:g}", f"{r['refill_per_second']:g}/s",
                          f"{r['available']:.1f}",
                          human_seconds(debt.total_seconds()) if debt else "-"])
        print(table(cells, ["BUCKET", "CAPACITY", "REFILL", "AVAILABLE", "WAITERS READY IN"],
                    colour=colour, right=(1, 2, 3)))
    if not any(data.values()):
        print("no concurrency limits, keys or rate buckets", file=sys.stderr)
    return 0


def _limit(text: str) -> int | None:
    return parse_limit(text, lift="or 'none' to lift it")


def _rate(text: str) -> tuple[float, float]:
    """``3000/60`` (3,000 units per 60 s: capacity 3000, refill 50/s) or ``3000/60s``."""
    amount, _, per = text.partition("/")
    try:
        capacity = float(amount)
        seconds = float(per.rstrip("s")) if per else 1.0
    except ValueError:
        raise fail(f"rate {text!r}: write UNITS/SECONDS, e.g. 90000/60 for 90,000 tokens "
                   "per minute") from None
    if capacity <= 0 or seconds <= 0:
        raise fail(f"rate {text!r}: units and seconds must be positive")
    return capacity, capacity / seconds


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("limits", "concurrency limits by key and rate buckets: what runs, waits, is limited",
            """
            pgjournal limits
            pgjournal limits key 'tenant-*' 3     # at most 3 running per tenant key
            pgjournal limits key tenant-42 10     # an exact key beats a prefix
            pgjournal limits key 'tenant-*' none
            pgjournal limits rate openai-tpm 90000/60   # 90,000 units per minute
            pgjournal limits rate openai-tpm none
            """, [db, js], cmd_limits)
    p.add_argument("action", nargs="?", choices=["key", "rate"],
                   help="key: set a concurrency limit; rate: set a rate bucket")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a concurrency key, a prefix ending in * , or a bucket name")
    p.add_argument("value", nargs="?", metavar="VALUE",
                   help="key: max running (or none); rate: UNITS/SECONDS (or none)")
