"""``start``, ``runs``, ``show``, ``signal``, ``cancel``, ``retry``, ``fork``: one run at a time."""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from typing import Any

from .._output import (
    STATUS_STYLE,
    ago,
    between,
    compact,
    paint,
    parse_duration,
    table,
    to_json,
    use_colour,
)
from .._queries import cli_fetch
from .._sql import validate_identifier
from ..app import App
from ..errors import InvalidState, UnknownRun, UnknownWorkflow
from ._common import (
    STATUSES,
    Add,
    Row,
    error_text,
    fail,
    load_app,
    local,
    paint_status,
    parse_json,
    print_json,
    with_app,
)


def cmd_start(args: argparse.Namespace) -> int:
    positional = parse_json(args.args, "--args")
    if not isinstance(positional, list):
        raise fail("--args must be a JSON array of positional arguments, e.g. "
                   "'[\"durable agents\"]' (keyword arguments go in --kwargs)")
    keywords = parse_json(args.kwargs, "--kwargs")
    if not isinstance(keywords, dict):
        raise fail("--kwargs must be a JSON object, e.g. '{\"topic\": \"agents\"}'")
    app = load_app(args.app, args) if args.app else None
    if app is not None and args.workflow not in app.workflows:
        known = ", ".join(sorted(app.workflows)) or "none"
        close = difflib.get_close_matches(args.workflow, list(app.workflows), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownWorkflow(
            f"{args.app} has no workflow {args.workflow!r} (known: {known}){hint}")
    if args.queue:
        validate_identifier(args.queue, "queue name")

    async def go(app: App) -> dict[str, Any]:
        queue = args.queue
        if queue is None and not app.workflows:
            queue = await _served_queue(app, args.workflow)
        handle = await app.start(args.workflow, *positional, queue=queue,
                                 priority=args.priority, delay=args.delay,
                                 idempotency_key=args.idempotency_key, **keywords)
        out: dict[str, Any] = {"run_id": str(handle.run_id)}
        if args.wait is not None:
            try:
                out["output"] = await handle.result(timeout=args.wait)
            except TimeoutError as exc:
                # result()'s message says the run's status and whether a worker serves it.
                raise fail(f"{exc} (the run goes on; see `pgjournal show "
                           f"{handle.run_id}`)") from None
        return out

    out = with_app(args, go, app=app)
    if args.json:
        print_json(out)
    else:
        print(out["run_id"])
        if "output" in out:
            print(to_json(out["output"]))
    return 0


async def _served_queue(app: App, workflow: str) -> str:
    """The queue on which live workers take runs of ``workflow``, or a clear refusal:
    a run nobody can take (a typo, a worker not deployed yet) would sit forever."""
    queues = await app.served_queues(workflow)
    if len(queues) == 1:
        return str(queues[0])
    if queues:
        raise fail(f"live workers serve workflow {workflow!r} on several queues "
                   f"({', '.join(queues)}); choose one with --queue")
    known = [r["workflow"] for r in await cli_fetch(app, "live_workflows")]
    close = difflib.get_close_matches(workflow, known, n=3)
    hint = (f"did you mean {' or '.join(map(repr, close))}? " if close else
            f"live workers serve: {', '.join(sorted(known))}. " if known else
            "no live worker is running. ")
    raise fail(f"no live worker knows workflow {workflow!r}; {hint}To enqueue it anyway "
               "(for a worker you will start later), pass --queue Q, or --app MODULE:APP "
               "to check the name against your App")


def cmd_runs(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        try:
            since = datetime.now(UTC) - parse_duration(args.since)
        except ValueError as exc:
            raise fail(f"--since: {exc}") from None
    if args.limit < 1:
        raise fail("--limit must be at least 1")

    async def go(app: App) -> list[Row]:
        store = await app.store()
        parent = None if args.parent is None else await resolve_run_id(app, args.parent)
        return await store.list_runs(status=args.status, workflow=args.workflow,
                                     queue=args.queue, since=since, limit=args.limit,
                                     parent=parent)

    rows = with_app(args, go, read_only=True)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no runs match", file=sys.stderr)
        return 0
    colour = use_colour(sys.stdout)
    now = datetime.now(UTC)
    cells, styles = [], []
    for r in rows:
        end = r["finished_at"] or (now if r["started_at"] else None)
        cells.append([str(r["id"]), r["workflow"], r["queue"], r["status"], str(r["attempt"]),
                      str(r["recoveries"]), ago(r["created_at"], now),
                      between(r["started_at"], end), error_text(r["error"], 50)])
        styles.append([None, None, None, STATUS_STYLE.get(r["status"]), None, None, None,
                       None, "red"])
    print(table(cells, ["RUN", "WORKFLOW", "QUEUE", "STATUS", "ATT", "REC", "CREATED",
                        "TOOK", "ERROR"], colour=colour, styles=styles, right=(4, 5)))
    if len(rows) == args.limit:
        print(f"(the newest {args.limit}; --limit N for more)", file=sys.stderr)
    return 0


def _step_detail(step: Row, chunks: dict[int, int]) -> str:
    if step["status"] == "failed":
        return error_text(step["error"], 70)
    if step["kind"] == "stream":
        return f"{chunks.get(step['position'], 0)} chunks"
    if step["kind"] == "sleep":
        return f"until {local(datetime.fromisoformat(step['output']))}" if step["output"] \
            else ""
    return compact(step["output"], 70)


def offset(t0: datetime, moment: datetime | None) -> str:
    """``+1.2s`` after the run's creation; never negative (an adapter run's
    ``created_at`` comes from its record and may be later than its events)."""
    if moment is None:
        return "-"
    return "+" + between(t0, max(moment, t0))


#: The shortest run-id prefix accepted (the dashboard and listings show 8).
MIN_PREFIX = 4


async def resolve_run_id(app: App, text: str) -> uuid.UUID:
    """A run id, a unique prefix of one (``e569f25f``), or an adapter's own id
    (``order-42``) kept in ``meta.original_id``."""
    try:
        return uuid.UUID(text)
    except ValueError:
        pass
    digits = text.replace("-", "").lower()
    if MIN_PREFIX <= len(digits) < 32 and all(c in "0123456789abcdef" for c in digits):
        lo, hi = (uuid.UUID(digits.ljust(32, pad)) for pad in "0f")
        ids = [r["id"] for r in await cli_fetch(app, "runs_by_prefix", lo=lo, hi=hi)]
        if len(ids) == 1:
            return uuid.UUID(str(ids[0]))
        if ids:
            shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise UnknownRun(f"{text!r} is the start of several run ids ({shown}); "
                             "give more characters")
    rows = await cli_fetch(app, "run_by_original_id", original=text)
    if len(rows) == 1:
        return uuid.UUID(str(rows[0]["id"]))
    if not rows:
        raise UnknownRun(f"{text!r} is not a run id (a UUID or a unique prefix of at least "
                         f"{MIN_PREFIX} characters), nor the id of an adapter's run in "
                         f"schema {app.schema!r}")
    found = ", ".join(f"{r['id']} ({r['source']})" for r in rows)
    raise UnknownRun(f"{text!r} names several adapter runs: {found}; give the run id")


#: Children listed by ``pgjournal show`` (the rest: ``pgjournal runs --parent``).
SHOW_CHILDREN = 20
#: A run's error in ``pgjournal show``: whole unless huge (``--json`` has all of it).
SHOW_ERROR_CHARS = 2000


def cmd_show(args: argparse.Namespace) -> int:
    async def go(app: App) -> dict[str, Any]:
        run_id = await resolve_run_id(app, args.run_id)
        store = await app.store()
        run = await store.get_run(run_id)
        if run is None:
            raise UnknownRun(f"run {run_id} does not exist in schema {app.schema!r}")
        return {"run": run, "children": await cli_fetch(app, "children_of", run=run_id,
                                                        limit=SHOW_CHILDREN),
                "children_by_status": {r["status"]: r["n"] for r in await cli_fetch(
                    app, "children_counts", run=run_id)},
                "steps": await store.get_steps(run_id),
                "chunks": await store.get_chunks(run_id),
                "signals": await store.get_signals(run_id),
                "events": await store.get_events(run_id)}

    data = with_app(args, go, read_only=True)
    if args.json:
        print_json(data)
        return 0
    colour = use_colour(sys.stdout)
    run = data["run"]
    t0: datetime = run["created_at"]
    now = datetime.now(UTC)
    print(f"run {run['id']}  {run['workflow']}  "
          f"{paint_status(run['status'], colour)}")
    print(f"  queue {run['queue']} · priority {run['priority']} · attempt "
          f"{run['attempt']}/{run['max_attempts']} · crash recoveries {run['recoveries']} · "
          f"lease epoch {run['lease_epoch']}")
    end = run["finished_at"] or now
    print(f"  created {local(t0)} · started "
          f"{offset(t0, run['started_at']) if run['started_at'] else '-'} · "
          f"{'took' if run['finished_at'] else 'running for'} {between(t0, max(end, t0))}")
    if run["idempotency_key"]:
        print(f"  idempotency key {run['idempotency_key']}")
    if run["parent_run_id"]:
        print(f"  child of run {run['parent_run_id']} (its journal entry "
              f"#{run['parent_position']})")
    if run["deadline_at"]:
        print(f"  deadline {local(run['deadline_at'])}")
    if run["status"] == "suspended":
        waiting = f"signal {run['wait_signal']!r}" if run["wait_signal"] else "timer"
        if run["wait_children"]:
            waiting = (f"{run['wait_pending']} of {len(set(run['wait_children']))} "
                       "child runs to end")
        print(f"  waiting for {waiting}" + (f" until {local(run['due_at'])}"
                                            if run["due_at"] else ""))
    print(f"  input  {compact(run['input'], 100)}")
    if run["output"] is not None:
        print(f"  output {compact(run['output'], 100)}")
    if run["error"]:
        # Whole: the useful part (e.g. "$.cost is of type Decimal") is often at the end.
        print("  error  " + paint(error_text(run["error"], SHOW_ERROR_CHARS), "red", colour))

    chunks: dict[int, int] = {}
    for c in data["chunks"]:
        chunks[c["position"]] = chunks.get(c["position"], 0) + 1
    print()
    if data["steps"]:
        print(paint("steps", "bold", colour) + " (at = offset from the run's creation)")
        cells, styles = [], []
        for s in data["steps"]:
            cells.append([str(s["position"]), offset(t0, s["started_at"]),
                          between(s["started_at"], s["finished_at"]), s["kind"], s["name"],
                          s["status"], str(s["attempt"]), str(s["tries"]),
                          _step_detail(s, chunks)])
            styles.append([None, None, None, None, None, STATUS_STYLE.get(s["status"]), None,
                           None, "red" if s["status"] == "failed" else None])
        print(textwrap.indent(table(cells, ["#", "AT", "TOOK", "KIND", "NAME", "STATUS",
                                            "ATT", "TRIES", "RESULT"],
                                    colour=colour, styles=styles, right=(0, 6, 7)), "  "))
    elif run["finished_at"]:
        print(f"no steps journaled: the run ended ({run['status']}) before its first "
              "journal entry" + (", error above" if run["error"] else ""))
    else:
        print("no steps journaled yet")
    if data["children"]:
        total = sum(data["children_by_status"].values())
        counts = ", ".join(f"{n} {st}" for st, n in data["children_by_status"].items())
        print()
        print(paint("children", "bold", colour) + f" ({total}: {counts})")
        cells, styles = [], []
        for c in data["children"]:
            end = c["finished_at"] or (now if c["started_at"] else None)
            cells.append([str(c["id"]), c["workflow"], c["status"],
                          between(c["started_at"], end), error_text(c["error"], 50)])
            styles.append([None, None, STATUS_STYLE.get(c["status"]), None, "red"])
        print(textwrap.indent(table(cells, ["RUN", "WORKFLOW", "STATUS", "TOOK", "ERROR"],
                                    colour=colour, styles=styles), "  "))
        if total > len(data["children"]):
            print(f"  ... {total - len(data['children'])} more: pgjournal runs --parent "
                  f"{run['id']} --limit {total}")
    if data["signals"]:
        print()
        print(paint("signals", "bold", colour))
        cells = [[str(g["id"]), g["name"], offset(t0, g["created_at"]),
                  (offset(t0, g["consumed_at"])) if g["consumed_at"] else "pending",
                  compact(g["payload"], 60)] for g in data["signals"]]
        print(textwrap.indent(table(cells, ["ID", "NAME", "SENT", "CONSUMED", "PAYLOAD"],
                                    colour=colour), "  "))
    if data["events"]:
        print()
        print(paint("events", "bold", colour))
        cells, styles = [], []
        for e in data["events"]:
            detail = error_text(e["detail"], 50)
            if e["from_status"] == e["to_status"] == "running":
                detail = detail or "lease expired: taken over by another worker"
            cells.append([offset(t0, e["at"]), e["from_status"] or "-", e["to_status"],
                          str(e["attempt"]), str(e["lease_epoch"]),
                          str(e["worker_id"] or "-"), detail])
            styles.append([None, None, STATUS_STYLE.get(e["to_status"]), None, None, None,
                           "red"])
        print(textwrap.indent(table(cells, ["AT", "FROM", "TO", "ATT", "EPOCH", "WORKER",
                                            "DETAIL"], colour=colour, styles=styles,
                                    right=(3, 4)), "  "))
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    payload = parse_json(args.payload, "the signal payload")

    async def go(app: App) -> None:
        await app.signal(args.run_id, args.name, payload,
                         idempotency_key=args.idempotency_key)

    with_app(args, go)
    print(f"signal {args.name!r} sent to run {args.run_id}")
    return 0


#: Statuses of runs that have ended (a cancel leaves them as they are).
ENDED = frozenset({"completed", "failed", "cancelled", "dead"})


def cmd_cancel(args: argparse.Namespace) -> int:
    async def go(app: App) -> tuple[uuid.UUID, str, int]:
        run_id = await resolve_run_id(app, args.run_id)
        unfinished = 0
        if not args.keep_children:
            counts = await cli_fetch(app, "children_counts", run=run_id)
            unfinished = sum(int(r["n"]) for r in counts if r["status"] not in ENDED)
        return run_id, await app.cancel(run_id, children=not args.keep_children), unfinished

    run_id, status, unfinished = with_app(args, go)
    if status != "cancelled":
        raise InvalidState(f"run {run_id} had already ended ({status}); not cancelled")
    print(f"run {run_id} cancelled" + (
        f" with its {unfinished} unfinished child run{'s' if unfinished != 1 else ''}"
        if unfinished else ""))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    async def go(app: App) -> str:
        return await app.retry(args.run_id)

    status = with_app(args, go)
    print(f"run {args.run_id} {status} again (journaled steps are kept, not redone)")
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    async def go(app: App) -> uuid.UUID:
        return (await app.fork(args.run_id, from_step=args.from_step)).run_id

    new_id = with_app(args, go)
    if args.json:
        print_json({"run_id": str(new_id), "forked_from": args.run_id,
                    "from_step": args.from_step})
    else:
        print(new_id)
    return 0


def register(add: Add, db: argparse.ArgumentParser, js: argparse.ArgumentParser) -> None:
    """Add this group's commands to the parser (see ``build_parser``)."""
    p = add("start", "start a run of a workflow and print its id",
            """
            pgjournal start research --args '["durable agents"]'
            pgjournal start research --args '[]' --kwargs '{"topic": "x"}' --queue agents
            pgjournal start research --args '["x"]' --app myproject.jobs:app --wait 60
            """, [db, js], cmd_start)
    p.add_argument("workflow", metavar="WORKFLOW")
    p.add_argument("--args", default="[]", metavar="JSON",
                   help="positional arguments as a JSON array (default [])")
    p.add_argument("--kwargs", default="{}", metavar="JSON",
                   help="keyword arguments as a JSON object (default {})")
    p.add_argument("--queue", help="queue (default: with --app, the workflow's; without, the "
                                   "queue live workers serve it on, else refused)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--delay", type=float, default=None, metavar="SECONDS",
                   help="start no earlier than this many seconds from now")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="the same key always yields the same run")
    p.add_argument("--app", metavar="MODULE:APP",
                   help="check WORKFLOW against this App and use its queue and settings")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for the run to end and print its output")
    p = add("runs", "list runs, newest first",
            """
            pgjournal runs
            pgjournal runs --status failed --since 1d
            pgjournal runs --workflow research --queue agents --limit 100 --json
            pgjournal runs --parent 0b6c4e1e-...   # the child runs one run spawned
            """, [db, js], cmd_runs)
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--workflow")
    p.add_argument("--queue")
    p.add_argument("--since", metavar="AGE", help="created in the last AGE (90s, 15m, 1h, 2d)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this run")
    p = add("show", "one run: its state, then its steps as a timeline, signals and events",
            """
            pgjournal show 0b6c4e1e-7d6c-4a55-9a4f-2f1f0c8d2b9e
            pgjournal show 0b6c4e1e-7d6c-4a55-9a4f-2f1f0c8d2b9e --json | jq .steps
            pgjournal show order-42        # an adapter run, by the adapter's own id
            """, [db, js], cmd_show)
    p.add_argument("run_id", metavar="RUN_ID")
    p = add("signal", "send a signal (durable, even if the run is not waiting yet)",
            """
            pgjournal signal 0b6c4e1e-... approval '{"ok": true}'
            pgjournal signal 0b6c4e1e-... go
            pgjournal signal 0b6c4e1e-... approval '{"ok": true}' --idempotency-key review-7
            """, [db], cmd_signal)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("name", metavar="NAME")
    p.add_argument("payload", metavar="JSON", nargs="?", default="null",
                   help="payload as JSON (default null)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="send at most once per run and key, however often the command is "
                        "repeated (safe to retry after a lost connection)")
    p = add("cancel", "cancel a run and its unfinished child runs (a running one stops at "
            "its next step)",
            """
            pgjournal cancel 0b6c4e1e-...
            pgjournal cancel 0b6c4e1e-... --keep-children
            """, [db], cmd_cancel)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--keep-children", action="store_true",
                   help="cancel this run only; its child runs go on")
    p = add("retry", "requeue a failed, dead or cancelled run; completed steps are not redone",
            "pgjournal retry 0b6c4e1e-...", [db], cmd_retry)
    p.add_argument("run_id", metavar="RUN_ID")
    p = add("fork", "re-run a run from step N as a new run (steps before N are copied, not "
                    "redone); print its id",
            """
            pgjournal fork 0b6c4e1e-... --from-step 3     # re-run from the step at position 3
            pgjournal fork 0b6c4e1e-... --from-step 0     # the same input, nothing replayed
            pgjournal show 0b6c4e1e-...                   # the positions (#) of its steps
            """, [db, js], cmd_fork,
            more="\n\nThe new run has the same workflow and input; its journal is a copy "
                 "of the old run's entries before position N, so a worker replays those "
                 "and executes N and later with the code it has now (a fixed prompt, a "
                 "changed step). The old run is not changed (it may still be running: what it has "
                 "committed is copied). The new run records forked_from. N is a journal "
                 "position as `pgjournal show` lists them, from 0 to the last one + 1.")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--from-step", type=int, required=True, metavar="N",
                   help="the first journal position to execute again (0 .. last + 1)")
