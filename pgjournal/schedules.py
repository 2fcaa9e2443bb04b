"""Schedules: cron rules stored as rows; each slot becomes exactly one run.

The pieces:

* :class:`CronRule` -- a validated cron expression in an IANA time zone, and
  the exact list of its *slots* (UTC instants) in any range, with daylight
  saving time handled as documented in ``docs/flow-control.md``:

  - a slot whose wall-clock time does not exist (the hour skipped in spring)
    fires as far after the change as it was into the skipped hour (02:30 ->
    03:30 the same morning); for hourly-or-finer rules that instant is already
    a slot and nothing extra fires;
  - a wall-clock time that happens twice (the hour repeated in autumn) fires
    once, at its first occurrence, unless the rule fires every hour of the
    day (``30 * * * *``, ``*/10 * * * *``, per-second rules): those follow
    real time and fire in both passes.

* :func:`plan_round` -- which slots one scheduler round fires under a catch-up
  policy (``skip``, ``latest``, ``all`` within a window), and where the
  schedule's cursor moves to.

* :class:`ScheduleSpec` -- a schedule declared in code (``@app.schedule``).

* :class:`Scheduler` -- the task every :class:`pgjournal.Worker` runs: it
  upserts the app's declared schedules, then at each due time claims due
  schedule rows (``FOR UPDATE SKIP LOCKED``), computes their slots here, starts
  one run per slot with the idempotency key ``schedule:NAME:SLOT`` and advances
  the rows, all in one transaction.

The cron library (croniter) is imported on first use, so ``import pgjournal``
works without it; using schedules without it says what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from bisect import insort
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigurationError, DatabaseUnavailable

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("pgjournal.schedules")

POLICIES = ("skip", "latest", "all")
#: The ``pgjournal_wake`` payload suffix that wakes schedulers (never a queue
#: name: queue names are identifiers).
WAKE_TOPIC = "*schedules"
#: A slot seen at most this late (and at most half the time to the next slot)
#: is on time and fires under every policy; later, it was missed.
ON_TIME_SECONDS = 10.0
#: Slots one schedule fires in one round; more (catch-up ``all``, backfills)
#: continue in the next round, right away.
MAX_SLOTS_PER_ROUND = 1000
#: Slots one backfill call may fire.
MAX_BACKFILL_SLOTS = 100_000
DEFAULT_CATCHUP_WINDOW = 86400.0

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DAY = 86400
_SEGMENT_HORIZON = 30 * _DAY
_WALL_EPOCH = datetime(1970, 1, 1)


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError:  # pragma: no cover - croniter is a dependency
        raise ConfigurationError(
            "schedules need the cron library croniter: pip install 'croniter>=6' "
            "(it is a dependency of pgjournal; was it installed with --no-deps?)") from None
    return croniter


# -- validation ----------------------------------------------------------------


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"invalid schedule name {name!r}: use 1-100 letters, digits, '_', '.' or '-'")
    return name


def validate_policy(catchup: str) -> str:
    if catchup not in POLICIES:
        raise ConfigurationError(f"invalid catchup {catchup!r}: expected one of "
                                 f"{', '.join(POLICIES)}")
    return catchup


def validate_window(seconds: float | timedelta) -> float:
    value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or math.isinf(value):
        raise ConfigurationError(f"invalid catchup_window {seconds!r}: a positive number "
                                 "of seconds (or a timedelta)")
    return float(value)


def validate_timezone(name: str) -> ZoneInfo:
    """The zone ``name`` (an IANA name such as ``Europe/Berlin``), or a
    ``ConfigurationError`` naming the timezone."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigurationError(f"invalid timezone {name!r}: expected an IANA name such as "
                                 "'UTC' or 'Europe/Berlin'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigurationError(f"invalid timezone {name!r}: not an IANA time zone name "
                                 "(e.g. 'UTC', 'Europe/Berlin', 'America/New_York')") from None


def normalize_cron(expr: str) -> tuple[str, bool]:
    """``(expression, seconds_first)`` for croniter, or a ``ConfigurationError``
    naming the cron field. Five fields: minute hour day month weekday; six: a
    seconds field first; or one of @yearly @monthly @weekly @daily @hourly."""
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigurationError(f"invalid cron {expr!r}: empty")
    text = " ".join(expr.split())
    text = _ALIASES.get(text.lower(), text)
    fields = text.split(" ")
    if len(fields) not in (5, 6):
        raise ConfigurationError(
            f"invalid cron {expr!r}: expected 5 fields (minute hour day month weekday), 6 "
            "(second minute hour day month weekday) or @hourly/@daily/@weekly/@monthly/"
            f"@yearly, got {len(fields)}")
    croniter = _croniter()
    seconds_first = len(fields) == 6
    try:
        croniter.expand(text, second_at_beginning=seconds_first)
    except Exception as exc:  # croniter raises several ValueError kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigurationError(f"invalid cron {expr!r}: {reason}") from None
    return text, seconds_first


# -- slots ---------------------------------------------------------------------


def _off(zone: ZoneInfo, t: int) -> int:
    """UTC offset (seconds) of ``zone`` at the UTC instant ``t`` (epoch seconds)."""
    delta = datetime.fromtimestamp(t, zone).utcoffset()
    assert delta is not None
    return int(delta.total_seconds())


def _wall(seconds: int) -> datetime:
    return _WALL_EPOCH + timedelta(seconds=seconds)


def _wall_seconds(wall: datetime) -> int:
    return int((wall - _WALL_EPOCH).total_seconds())


@dataclass(frozen=True)
class CronRule:
    """A validated cron expression in a time zone."""

    cron: str
    timezone: str
    expr: str = field(init=False)
    seconds_first: bool = field(init=False)
    zone: ZoneInfo = field(init=False, repr=False, compare=False)
    hourly_or_finer: bool = field(init=False)

    def __post_init__(self) -> None:
        expr, seconds_first = normalize_cron(self.cron)
        zone = validate_timezone(self.timezone)
        fields = _croniter().expand(expr, second_at_beginning=seconds_first)[0]
        hours = fields[1]  # croniter's order: minute, hour, day, month, weekday[, second]
        every_hour = hours == ["*"] or set(hours) >= set(range(24))
        object.__setattr__(self, "expr", expr)
        object.__setattr__(self, "seconds_first", seconds_first)
        object.__setattr__(self, "zone", zone)
        object.__setattr__(self, "hourly_or_finer", every_hour)
        try:
            self.next_slot(int(datetime.now(UTC).timestamp()))
        except ConfigurationError:
            raise
        except Exception:
            raise ConfigurationError(f"invalid cron {self.cron!r}: it never matches a date "
                                     "(e.g. February 30)") from None

    # Walls are naive local times, as seconds since 1970-01-01 00:00 local.

    def _walls(self, start_wall: int, *, inclusive: bool) -> Iterator[int]:
        it = _croniter()(self.expr, _wall(start_wall - 1 if inclusive else start_wall),
                         second_at_beginning=self.seconds_first)
        while True:
            yield _wall_seconds(it.get_next(datetime))

    def _segment_end(self, start: int, off: int) -> tuple[int, int]:
        """The first instant after ``start`` where the offset changes, and the
        new offset; or ``start`` + 30 days and the same offset."""
        day = start
        for _ in range(_SEGMENT_HORIZON // _DAY):
            nxt = day + _DAY
            if _off(self.zone, nxt) != off:
                lo, hi = day, nxt  # off at lo, changed at hi
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if _off(self.zone, mid) == off:
                        lo = mid
                    else:
                        hi = mid
                return hi, _off(self.zone, hi)
            day = nxt
        return day, off

    def _gap_instants(self, change: int, before: int, after: int) -> list[int]:
        """Slots whose wall time fell into the gap of a spring-forward change at
        ``change`` (offset ``before`` -> ``after``): each fires at its wall time
        read with the old offset, i.e. as far after the change as it was into
        the gap."""
        out: list[int] = []
        for w in self._walls(change + before, inclusive=True):
            if w >= change + after:
                break
            out.append(w - before)
        return out

    def slots_after(self, after: int) -> Iterator[int]:
        """Every slot strictly after ``after`` (UTC epoch seconds), in order."""
        start, inclusive = after, False
        pending: list[int] = []  # gap slots not yet yielded, sorted
        # A spring-forward change in the last hours before ``after`` may have
        # slots of its gap that fire after ``after``.
        back = after - 4 * 3600
        off_back, off_now = _off(self.zone, back), _off(self.zone, after)
        if off_back < off_now:
            change, new = self._segment_end(back, off_back)
            if change <= after:
                pending = [t for t in self._gap_instants(change, off_back, new) if t > after]
        last = after
        while True:
            off = _off(self.zone, start)
            end, off_next = self._segment_end(start, off)
            for w in self._walls(start + off, inclusive=inclusive):
                t = w - off
                if t >= end:
                    break
                while pending and pending[0] <= t:
                    g = pending.pop(0)
                    if g > last:
                        last = g
                        yield g
                if t <= last:
                    continue
                if not self.hourly_or_finer and datetime.fromtimestamp(t, self.zone).fold:
                    continue  # second pass of a repeated wall time
                last = t
                yield t
            if off_next > off:
                for g in self._gap_instants(end, off, off_next):
                    insort(pending, g)
            while pending and pending[0] < end:
                g = pending.pop(0)
                if g > last:
                    last = g
                    yield g
            start, inclusive = end, True

    def slots_between(self, after: int, until: int, limit: int | None = None) -> list[int]:
        """Slots in ``(after, until]`` in order, at most ``limit`` of them."""
        out: list[int] = []
        for t in self.slots_after(after):
            if t > until or (limit is not None and len(out) >= limit):
                break
            out.append(t)
        return out

    def next_slot(self, after: int) -> int:
        return next(self.slots_after(after))

    def latest_slot(self, after: int, until: int) -> int | None:
        """The last slot in ``(after, until]``, searching back in growing windows."""
        for span in (60, 3600, _DAY, 32 * _DAY, 400 * _DAY, 5 * 366 * _DAY, 30 * 366 * _DAY):
            lo = max(after, until - span)
            found: int | None = None
            for t in self.slots_after(lo):
                if t > until:
                    break
                found = t
            if found is not None or lo == after:
                return found
        return None


def to_epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ConfigurationError(f"{moment!r} has no time zone; pass an aware datetime")
    return moment.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class Plan:
    """What one round does for one schedule: the slots to fire, the new cursor
    (every slot up to it has been considered), and the next slot after it."""

    fire: list[int]
    cursor: float
    next_fire: int | None
    dropped: int = 0


def _on_time(rule: CronRule, slot: int, following: int, now: float) -> bool:
    return now - slot <= min(ON_TIME_SECONDS, (following - slot) / 2)


def plan_round(rule: CronRule, policy: str, window: float, cursor: float,
               now: float) -> Plan:
    """The slots due in ``(cursor, now]`` that ``policy`` fires.

    On-time slots (seen at most ``min(10 s, half the time to the next slot)``
    late) always fire. Missed ones: ``skip`` none; ``latest`` the most recent
    missed slot only; ``all`` every missed slot not older than ``window``
    seconds (older ones are dropped). At most ``MAX_SLOTS_PER_ROUND`` fire per
    round; the cursor then stops at the last one fired.
    """
    after = math.floor(cursor)
    until = math.floor(now)
    # The recent slots (at most ON_TIME_SECONDS old) and the one after them.
    recent_lo = max(after, until - math.ceil(ON_TIME_SECONDS) - 1)
    recent: list[int] = []
    following: int | None = None
    for t in rule.slots_after(recent_lo):
        if t > until:
            following = t
            break
        recent.append(t)
        if len(recent) > MAX_SLOTS_PER_ROUND:  # pragma: no cover - needs > 100 slots/s
            break
    assert following is not None or recent
    on_time: list[int] = []
    missed_recent: list[int] = []
    for i, t in enumerate(recent):
        nxt = recent[i + 1] if i + 1 < len(recent) else following
        if nxt is not None and _on_time(rule, t, nxt, now):
            on_time.append(t)
        else:
            missed_recent.append(t)
    chosen: list[int] = []
    capped = False
    if policy == "latest":
        if missed_recent:
            chosen = [missed_recent[-1]]
        else:
            older = rule.latest_slot(after, recent_lo)
            chosen = [older] if older is not None else []
    elif policy == "all":
        lo = max(after, math.ceil(now - window) - 1)
        chosen = rule.slots_between(lo, until, limit=MAX_SLOTS_PER_ROUND + 1)
        chosen = [t for t in chosen if t not in set(on_time) and now - t <= window]
    fire = sorted(set(on_time) | set(chosen))
    if len(fire) > MAX_SLOTS_PER_ROUND:
        fire, capped = fire[:MAX_SLOTS_PER_ROUND], True
    if capped:
        new_cursor: float = fire[-1]
        return Plan(fire, new_cursor, rule.next_slot(fire[-1]))
    nxt_slot = following if following is not None else rule.next_slot(until)
    return Plan(fire, until, nxt_slot)


def plan_backfills(rule: CronRule, requests: Sequence[dict[str, Any]], now: float,
                   budget: int = MAX_SLOTS_PER_ROUND) -> tuple[list[dict[str, Any]], list[int]]:
    """The slots one round starts for a schedule's queued backfill requests, and
    the requests left for later rounds.

    Requests are served in order, at most ``budget`` slots in all; a request
    the budget cuts short continues after its last planned slot, and requests
    the budget does not reach are left as they are (never planned from an
    empty list). A backfill reaches no further than ``now``: later slots are
    the schedule's own, fired on time (or not at all while it is paused), so
    a request's future part is dropped rather than started early -- starting
    it would take the slot's idempotency key before the slot came.

    A request that cannot be planned (hand-written, out of range) is kept,
    marked with ``"error"``, and skipped from then on: it must not stop the
    schedule's regular slots nor the other requests. ``set_schedule`` clears
    such requests.
    """
    left: list[dict[str, Any]] = []
    fire: list[int] = []
    for req in requests:
        if "error" in req:
            left.append(req)  # failed earlier: kept for the operator, not retried
            continue
        if budget <= 0:
            left.append(req)  # the next round's
            continue
        try:
            lo = datetime.fromisoformat(req["from"]).timestamp()
            hi = min(datetime.fromisoformat(req["to"]).timestamp(), now)
            # Slots in [from, to]: strictly after one second before ``from``.
            got = [t for t in rule.slots_between(math.ceil(lo) - 1, math.floor(hi),
                                                 limit=budget + 1) if lo <= t <= hi]
        except Exception as exc:  # any failure is this request's alone
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("schedule backfill %s cannot be planned: %s", req, reason)
            left.append({**req, "error": f"cannot plan this backfill: {type(exc).__name__}: "
                                         f"{reason}"})
            continue
        if len(got) > budget:
            got = got[:budget]
            left.append({"from": from_epoch(got[-1] + 1).isoformat(), "to": req["to"]})
        budget -= len(got)
        fire.extend(got)
    return left, fire


# -- declarations --------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule declared in code with ``@app.schedule``: upserted into the
    ``schedules`` table by every worker of the app when it starts."""

    name: str
    cron: str
    timezone: str
    catchup: str
    catchup_window: float
    args_json: str
    kwargs_json: str
    fn: Any  # the decorated function; its workflow name is resolved at worker start
    queue: str | None = None

    def workflow_name(self, app: Host) -> str:
        for wf in app.workflows.values():
            if wf.fn is self.fn:
                return wf.name
        raise ConfigurationError(
            f"schedule {self.name!r} decorates {getattr(self.fn, '__name__', self.fn)!r}, "
            "which is not registered with this app: put @app.workflow() under "
            "@app.schedule(...)")


class Registered(Protocol):
    """A registered workflow as schedules read it (``pgjournal.app.Workflow``)."""

    @property
    def name(self) -> str: ...

    @property
    def fn(self) -> Any: ...

    @property
    def queue(self) -> str: ...

    @property
    def max_attempts(self) -> int: ...

    @property
    def max_recoveries(self) -> int: ...


class Host(Protocol):
    """The app whose schedules fire (``pgjournal.App``): its workflows and its
    declared schedules. A protocol: the app imports this module, not the reverse."""

    @property
    def workflows(self) -> Mapping[str, Registered]: ...

    @property
    def schedules(self) -> Mapping[str, ScheduleSpec]: ...


# -- the scheduler task --------------------------------------------------------


class Scheduler:
    """Fires the due schedules of the workflows one worker registered.

    Sleeps until the earliest ``next_fire_at`` of those schedules (at most
    ``5 x poll_interval``, the safety net), woken by NOTIFY when schedules
    change. One round: claim due rows ``FOR UPDATE SKIP LOCKED`` (other
    workers' rounds skip them), plan each here, start the runs and advance
    the rows in the same transaction. The idempotency key of each slot's run
    makes a slot one run even if two rounds ever computed it.
    """

    def __init__(self, app: Host, store: Store, workflows: Sequence[str],
                 poll_interval: float) -> None:
        self.app = app
        self.store = store
        self.workflows = sorted(workflows)
        self.cap = max(poll_interval * 5, 0.05)
        self._wake = asyncio.Event()
        self._rules: dict[tuple[str, str], CronRule] = {}
        self.rounds = 0

    def wake(self) -> None:
        self._wake.set()

    @property
    def declared(self) -> list[str]:
        return sorted(self.app.schedules)

    def _rule(self, cron: str, timezone: str) -> CronRule:
        key = (cron, timezone)
        rule = self._rules.get(key)
        if rule is None:
            rule = self._rules[key] = CronRule(cron, timezone)
        return rule

    async def declare(self) -> None:
        """Upsert the app's ``@app.schedule`` declarations (pause state kept)."""
        specs = list(self.app.schedules.values())
        if not specs:
            return
        defs = []
        for spec in specs:
            name = spec.workflow_name(self.app)
            wf = self.app.workflows[name]
            defs.append({
                "name": spec.name, "cron": spec.cron, "timezone": spec.timezone,
                "workflow": name, "queue": spec.queue or wf.queue,
                "args": json.loads(spec.args_json), "kwargs": json.loads(spec.kwargs_json),
                "catchup": spec.catchup, "catchup_window": spec.catchup_window,
                "max_attempts": wf.max_attempts, "max_recoveries": wf.max_recoveries,
            })
        await self.store.declare_schedules(defs)

    async def run(self) -> None:
        backoff = 0.1
        declared = False
        while True:
            try:
                if not declared:
                    await self.declare()
                    declared = True
                delay = await self.round()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                log.warning("scheduler round failed (%s); retrying in %.1fs", exc, backoff)
                delay, backoff = backoff, min(backoff * 2, 5.0)
            except Exception:
                log.exception("scheduler round failed; retrying in %.1fs", backoff)
                delay, backoff = backoff, min(backoff * 2, 5.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.0))

    async def round(self) -> float:
        """One round; returns how long to sleep before the next."""
        fired = await self.store.run_schedule_round(self.workflows, self.declared, self._plan)
        self.rounds += 1
        next_due, db_now = await self.store.schedules_next_due(self.workflows, self.declared)
        if next_due is None:
            return self.cap
        delay = (next_due - db_now).total_seconds()
        if delay <= 0:
            # Due, but claimed by another worker's round (or just fired here with
            # more to do): look again shortly.
            return 0.0 if fired else min(0.05, self.cap)
        return min(delay + 0.005, self.cap)

    def _plan(self, row: dict[str, Any]) -> dict[str, Any]:
        """The update (and slots to fire) of one claimed schedule row."""
        wf = self.app.workflows.get(row["workflow"])
        item: dict[str, Any] = {
            "name": row["name"],
            "max_attempts": wf.max_attempts if wf else row["max_attempts"],
            "max_recoveries": wf.max_recoveries if wf else row["max_recoveries"],
        }
        try:
            return self._plan_rule(row, item)
        except Exception as exc:  # one bad schedule must not stop the others
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, ConfigurationError):
                text = f"cannot compute its slots: {type(exc).__name__}: {text}"
            log.error("schedule %s cannot fire: %s", row["name"], text)
            return {"name": row["name"], "error": text}

    def _plan_rule(self, row: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        rule = self._rule(row["cron"], row["timezone"])
        now = row["db_now"].timestamp()
        slots: list[int] = []
        if not row["paused"] and (row["next_fire_at"] is None
                                  or row["next_fire_at"] <= row["db_now"]):
            plan = plan_round(rule, row["catchup"],
                              row["catchup_window"].total_seconds(),
                              row["fire_after"].timestamp(), now)
            slots = plan.fire
            item["fire_after"] = from_epoch(plan.cursor).isoformat()
            item["next_fire_at"] = (from_epoch(plan.next_fire).isoformat()
                                    if plan.next_fire is not None else None)
        backfills, back = plan_backfills(rule, row["backfills"] or [], now)
        if back:
            item["backfill_slots"] = [from_epoch(t).isoformat() for t in back]
        item["backfills"] = backfills
        item["slots"] = [from_epoch(t).isoformat() for t in slots]
        return item


def backfill_slots(cron: str, timezone: str, start: datetime, end: datetime,
                   now: datetime | None = None) -> list[datetime]:
    """The slots of a rule in ``[start, end]`` (aware datetimes) that a backfill
    starts: those not after ``now`` (default: the current time). Later slots
    are left to the schedule, which fires them on time; a backfill that
    started them would start them early and take their idempotency keys
    (``backfill_schedule`` in SQL drops them too, by the database's clock)."""
    rule = CronRule(cron, timezone)
    lo, hi = to_epoch(start), to_epoch(end)
    if hi < lo:
        raise ConfigurationError(f"backfill range ends ({end.isoformat()}) before it starts "
                                 f"({start.isoformat()})")
    hi = min(hi, to_epoch(now) if now is not None else datetime.now(UTC).timestamp())
    got = rule.slots_between(math.ceil(lo) - 1, math.floor(hi), limit=MAX_BACKFILL_SLOTS + 1)
    got = [t for t in got if lo <= t <= hi]
    if len(got) > MAX_BACKFILL_SLOTS:
        raise ConfigurationError(f"the backfill range holds more than {MAX_BACKFILL_SLOTS} "
                                 "slots; split it into smaller ranges")
    return [from_epoch(t) for t in got]
