"""The DBA views, and every query of docs/dba.md, against real runs.

The queries are read out of the doc (each follows a ``<!-- query: NAME -->``
marker), so the doc and the tests cannot drift apart. Data comes from real
workers running real workflows, or from the SQL functions a DBA would call.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import pgjournal

from .conftest import ROOT, wait_for

Row = dict[str, Any]

EXPECTED = {
    "stuck-now", "failed-today", "failed-today-detail", "slowest-step-p95", "queue-lag",
    "workers", "run-summary", "run-steps", "run-events", "psql-start", "psql-worker",
    "psql-signal", "psql-cancel", "psql-retry", "psql-queue", "tree-walk", "tree-waiting",
}
_MARKER = re.compile(r"<!-- query: ([a-z0-9-]+) -->\n```sql\n(.*?)\n```", re.DOTALL)


def doc_queries() -> dict[str, str]:
    text = (ROOT / "docs" / "dba.md").read_text()
    found: dict[str, str] = {}
    for name, body in _MARKER.findall(text):
        assert name not in found, f"query {name!r} appears twice in docs/dba.md"
        found[name] = body
    return found


def test_doc_has_every_query() -> None:
    assert set(doc_queries()) == EXPECTED


class Db:
    """A psql-like session on the test's schema: runs the doc's queries as written."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.conn.execute(sql.SQL("SET search_path TO {}, pg_catalog").format(
            sql.Identifier(schema)))

    def doc(self, name: str, run_id: uuid.UUID | None = None) -> list[list[Row]]:
        """Run doc query ``name`` statement by statement; ``:'run_id'`` as in psql."""
        results = []
        for statement in re.split(r";\s*\n", doc_queries()[name] + "\n"):
            if not re.sub(r"--[^\n]*", "", statement).strip():
                continue
            if ":'run_id'" in statement:
                assert run_id is not None, f"query {name} needs a run id"
                cur = self.conn.execute(statement.replace(":'run_id'", "%(run_id)s"),
                                        {"run_id": run_id})
            else:
                cur = self.conn.execute(statement.encode())
            results.append(cur.fetchall() if cur.description else [])
        return results

    def one_doc(self, name: str, run_id: uuid.UUID | None = None) -> list[Row]:
        (rows,) = self.doc(name, run_id)
        return rows

    def rows(self, query: str, *params: Any) -> list[Row]:
        cur = self.conn.execute(query.encode() if not params else query, params)
        return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def db(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Db]:
    d = Db(pgjournal_dsn, pgjournal_schema)
    yield d
    d.close()


class Serving:
    """A worker on queue ``default``, started once the test registered its workflows."""

    def __init__(self, app: pgjournal.App) -> None:
        self.worker = pgjournal.Worker(app, queues=["default"], concurrency=4, lease=3)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run(handle_signals=False))

    async def stop(self) -> None:
        self.worker.stop()
        if self.task is not None:
            await self.task


@pytest.fixture
async def serving(pgjournal_app: pgjournal.App) -> AsyncIterator[Serving]:
    s = Serving(pgjournal_app)
    yield s
    await s.stop()


async def until(db: Db, query: str, *params: Any, what: str, timeout: float = 30) -> list[Row]:
    async def check() -> list[Row]:
        return await asyncio.to_thread(db.rows, query, *params)
    result: list[Row] = await wait_for(check, timeout, what=what)
    return result


# -- the agent scenario: overview, step timings, failures, run X step by step -----


async def test_runs_steps_and_failures(pgjournal_app: pgjournal.App,
                                       serving: Serving, db: Db) -> None:
    app = pgjournal_app

    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "found"

    @app.workflow()
    async def agent(run: pgjournal.Run, topic: str) -> str:
        plan = await run.step("plan", lambda t: f"plan {t}", topic)
        found = await run.step("search", slow, 0.3)
        verdict = await run.wait_signal("approval", timeout=60)
        return f"{plan} {found} {verdict['ok']}"

    @app.workflow(max_attempts=2, retry_backoff=0)
    async def flaky(run: pgjournal.Run) -> None:
        def call() -> None:
            raise ValueError("upstream said no")
        await run.step("call", call)

    serving.start()
    a = await app.start(agent, "x")
    f = await app.start(flaky)
    with pytest.raises(pgjournal.RunFailed):
        await f.result(timeout=30)

    (ov,) = await until(db, "SELECT * FROM run_overview WHERE id = %s AND status = 'suspended'",
                        a.run_id, what="the agent to wait for approval")
    assert ov["waiting_for_signal"] == "approval"
    assert ov["steps_completed"] == 2 and ov["steps_failed"] == 0
    assert ov["lease_state"] is None and ov["worker_id"] is None
    assert ov["next_due_at"] is not None  # the signal's timeout
    assert ov["queue_wait"] >= timedelta(0)

    summary = db.one_doc("run-summary", a.run_id)
    assert [(r["workflow"], r["status"], r["waiting_for_signal"]) for r in summary] == [
        ("agent", "suspended", "approval")]

    db.doc("psql-signal", a.run_id)  # the doc's send_signal, as a DBA would
    assert await a.result(timeout=30) == "plan x found True"

    (ov,) = db.rows("SELECT * FROM run_overview WHERE id = %s", a.run_id)
    assert ov["status"] == "completed" and ov["steps_completed"] == 3
    assert ov["run_time"] >= timedelta(seconds=0.3)
    assert ov["signals_pending"] == 0 and ov["error_type"] is None

    steps = db.one_doc("run-steps", a.run_id)
    assert [(s["position"], s["name"], s["kind"], s["status"]) for s in steps] == [
        (0, "plan", "step", "completed"), (1, "search", "step", "completed"),
        (2, "approval", "signal", "completed")]
    assert steps[1]["duration"] >= timedelta(seconds=0.25)

    events = db.one_doc("run-events", a.run_id)
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        (None, "queued"), ("queued", "running"), ("running", "suspended"),
        ("suspended", "queued"), ("queued", "running"), ("running", "completed")]
    assert events[1]["worker_pid"] == os.getpid()
    assert events[1]["worker_host"] == socket.gethostname()

    p95 = db.one_doc("slowest-step-p95")
    assert [(r["workflow"], r["step"]) for r in p95] == [("agent", "search"), ("agent", "plan")]
    assert p95[0]["p95_ms"] >= 250 and p95[0]["calls"] == 1

    # flaky: attempt 1 raised and was retried, attempt 2 raised and the run
    # failed; the step's journal entry holds the last failure.
    failures = [r for r in db.one_doc("failed-today-detail") if r["run_id"] == f.run_id]
    assert sorted((r["source"], r["step"], r["attempt"], r["error_type"]) for r in failures) == [
        ("retry", None, 1, "ValueError"), ("run", None, 2, "ValueError"),
        ("step", "call", 2, "ValueError")]
    assert {r["error_message"] for r in failures} == {"upstream said no"}

    today = db.one_doc("failed-today")
    assert sorted((r["workflow"], r["source"], r["step"], r["error_type"], r["failures"],
                   r["runs"]) for r in today) == [
        ("flaky", "retry", None, "ValueError", 1, 1), ("flaky", "run", None, "ValueError", 1, 1),
        ("flaky", "step", "call", "ValueError", 1, 1)]
    assert {r["last_run_id"] for r in today} == {f.run_id}
    assert {r["last_message"] for r in today} == {"upstream said no"}

    (fo,) = db.rows("SELECT * FROM run_overview WHERE id = %s", f.run_id)
    assert (fo["status"], fo["attempt"], fo["error_type"], fo["steps_failed"]) == (
        "failed", 2, "ValueError", 1)
    assert db.one_doc("stuck-now") == []


# -- queues ------------------------------------------------------------------------


async def test_queue_depth_and_lag(pgjournal_app: pgjournal.App, db: Db) -> None:
    app = pgjournal_app
    due = [await app.start("job", i, queue="backlog") for i in range(3)]
    await app.start("job", 99, queue="backlog", delay=3600)
    await app.set_queue("backlog", concurrency_limit=2, paused=True)
    await app.set_queue("idle", concurrency_limit=7)
    await app.start("job", 0, queue="busy")
    db.rows("SELECT * FROM claim_runs(gen_random_uuid(), ARRAY['busy'], 5, 600)")

    lag = db.one_doc("queue-lag")
    assert [r["queue"] for r in lag] == ["backlog", "busy", "idle"]
    backlog, busy, idle = lag
    assert (backlog["claimable"], backlog["queued_due"], backlog["delayed"],
            backlog["running"], backlog["suspended"]) == (3, 3, 1, 0, 0)
    assert (backlog["concurrency_limit"], backlog["paused"]) == (2, True)
    (oldest,) = db.rows("SELECT now() - created_at AS age FROM runs WHERE id = %s",
                        due[0].run_id)
    assert backlog["lag"] >= oldest["age"] - timedelta(seconds=1)
    assert backlog["lag"] > timedelta(0)
    assert (busy["running"], busy["claimable"], busy["lag"], busy["expired_leases"]) == (
        1, 0, None, 0)
    assert (idle["claimable"], idle["running"], idle["concurrency_limit"], idle["paused"]) == (
        0, 0, 7, False)

    # The doc's set_queue walkthrough on a queue of its own making.
    db.doc("psql-queue")
    (q,) = db.rows("SELECT * FROM queue_depth WHERE queue = 'default'")
    assert (q["concurrency_limit"], q["paused"], q["claimable"]) == (5, False, 0)


# -- stuck runs and worker health ------------------------------------------------


async def test_stuck_runs(pgjournal_app: pgjournal.App, db: Db) -> None:
    app = pgjournal_app
    me = uuid.uuid4()
    db.rows("SELECT register_worker(%s, 'host-a', 4242, ARRAY['q'], 2)", me)
    # Three completed runs of 'batch' give it a median of well under a second.
    for i in range(3):
        h = await app.start("batch", i, queue="q")
        (c,) = db.rows("SELECT * FROM claim_runs(%s, ARRAY['q'], 1, 600)", me)
        assert c["id"] == h.run_id
        db.rows("SELECT * FROM complete_runs(%s, %s, ARRAY['1']::json[])",
                [h.run_id], [c["lease_epoch"]])
    slow = await app.start("batch", "slow", queue="q")
    fresh = await app.start("batch", "fresh", queue="q")
    expiring = await app.start("other", queue="q")
    claimed = {r["id"]: r for r in db.rows(
        "SELECT * FROM claim_runs(%s, ARRAY['q'], 3, 600)", me)}
    assert set(claimed) == {slow.run_id, fresh.run_id, expiring.run_id}
    # The slow one has been running for an hour (time passing, simulated);
    # the expiring one's worker stops heartbeating: a short last lease.
    db.rows("UPDATE runs SET started_at = now() - interval '1 hour' WHERE id = %s",
            slow.run_id)
    db.rows("SELECT * FROM heartbeat(%s, %s, %s, 0.2)", me, [expiring.run_id],
            [claimed[expiring.run_id]["lease_epoch"]])

    def listed() -> list[Row]:
        return db.one_doc("stuck-now")

    async def both() -> list[Row]:
        rows = await asyncio.to_thread(listed)
        return rows if len(rows) == 2 else []

    stuck = await wait_for(both, 30, what="the expired lease to show in stuck_runs")
    by_id = {r["id"]: r for r in stuck}
    assert set(by_id) == {slow.run_id, expiring.run_id}  # not the fresh one
    s, e = by_id[slow.run_id], by_id[expiring.run_id]
    assert (s["reason"], s["workflow"], s["worker_host"], s["worker_pid"]) == (
        "running over 3x the median", "batch", "host-a", 4242)
    assert s["running_for"] >= timedelta(hours=1) and s["lease_expired_for"] is None
    assert timedelta(0) <= s["workflow_median"] < timedelta(minutes=1)
    assert (e["reason"], e["workflow"], e["workflow_median"]) == ("lease expired", "other", None)
    assert e["lease_expired_for"] > timedelta(0)
    (full,) = db.rows("SELECT * FROM stuck_runs WHERE id = %s", slow.run_id)
    assert full["median_sample_size"] == 3 and full["claimed_at"] is not None

    # Another worker takes the expired run over: it is no longer stuck.
    db.rows("SELECT * FROM claim_runs(gen_random_uuid(), ARRAY['q'], 5, 600)")
    assert [r["id"] for r in listed()] == [slow.run_id]
    (ov,) = db.rows("SELECT * FROM run_overview WHERE id = %s", expiring.run_id)
    assert (ov["recoveries"], ov["lease_state"]) == (1, "held")


async def test_worker_health(pgjournal_app: pgjournal.App, serving: Serving,
                             db: Db) -> None:
    app = pgjournal_app
    release = asyncio.Event()

    @app.workflow()
    async def hold(run: pgjournal.Run) -> str:
        await release.wait()
        return "done"

    serving.start()
    h = await app.start(hold)
    # Holding one run with three slots free, it waits for more work.
    await until(db, "SELECT 1 FROM worker_health WHERE id = %s AND runs_held = 1 AND hungry",
                serving.worker.id, what="the worker to hold the run and want more")
    gone = uuid.uuid4()
    db.rows("SELECT register_worker(%s, 'host-b', 77, ARRAY['default'], 1)", gone)
    db.rows("UPDATE workers SET heartbeat_at = now() - interval '10 minutes' WHERE id = %s",
            gone)

    rows = {r["pid"]: r for r in db.one_doc("workers")}
    assert set(rows) == {os.getpid(), 77}
    mine = rows[os.getpid()]
    assert (mine["state"], mine["host"], mine["runs_held"], mine["queues"]) == (
        "alive", socket.gethostname(), 1, ["default"])
    assert mine["heartbeat_age"] < timedelta(seconds=30)
    assert (rows[77]["state"], rows[77]["runs_held"], rows[77]["hungry"]) == ("stale", 0, False)
    assert rows[77]["heartbeat_age"] >= timedelta(minutes=10)

    db.rows("SET pgjournal.worker_stale_after = '1 hour'")
    (later,) = db.rows("SELECT state FROM worker_health WHERE id = %s", gone)
    assert later["state"] == "alive"
    db.rows("RESET pgjournal.worker_stale_after")

    release.set()
    assert await h.result(timeout=30) == "done"
    await serving.stop()
    await until(db, "SELECT 1 FROM worker_health WHERE id = %s AND state = 'stopped'",
                serving.worker.id, what="the worker to stop")
    (w,) = db.rows("SELECT * FROM worker_health WHERE id = %s", serving.worker.id)
    assert (w["runs_held"], w["hungry"]) == (0, False) and w["stopped_at"] is not None


# -- driving the queue from psql ------------------------------------------------------


async def test_psql_walkthrough(pgjournal_app: pgjournal.App, serving: Serving,
                                db: Db) -> None:
    app = pgjournal_app

    @app.workflow()
    async def hello(run: pgjournal.Run, name: str) -> str:
        return str(await run.step("greet", lambda n: f"hello {n}", name))

    @app.workflow(max_attempts=1)
    async def fragile(run: pgjournal.Run) -> str:
        await run.step("once", lambda: "kept")
        if run.attempt < 2:
            raise RuntimeError("first attempt fails")
        return str(await run.step("finish", lambda: "second time lucky"))

    # A run started from psql is executed by the Python worker.
    (started,) = db.one_doc("psql-start")
    assert started["created"] is True
    serving.start()
    assert await app.handle(started["run_id"]).result(timeout=30) == "hello world"
    # Idempotent? No key given: the same id again is a conflict, not a second run.
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.doc("psql-start")

    # A whole run driven by hand: start, register, claim, journal, complete, stop.
    start, _reg, claim, journal, complete, _stop = db.doc("psql-worker")
    run_id = start[0]["run_id"]
    assert claim[0]["id"] == run_id and claim[0]["lease_epoch"] == 1
    assert claim[0]["has_journal"] is False and claim[0]["input"] == {"args": [], "kwargs": {
        "file": "a.csv"}}
    assert journal == [{"journal_step": None}]
    assert complete == [{"run_id": run_id}]
    (r,) = db.rows("SELECT status, output FROM runs WHERE id = %s", run_id)
    assert (r["status"], r["output"]) == ("completed", "imported 3 rows")
    steps = db.one_doc("run-steps", run_id)
    assert [(s["name"], s["status"]) for s in steps] == [("load", "completed")]
    (w,) = db.rows("SELECT state, host FROM worker_health WHERE pid = 0")
    assert (w["state"], w["host"]) == ("stopped", "psql")

    # Cancel from psql.
    waiting = await app.start("hello", "later", delay=3600)
    assert db.one_doc("psql-cancel", waiting.run_id) == [{"cancel_run": "cancelled"}]
    with pytest.raises(pgjournal.Cancelled):
        await waiting.result(timeout=10)

    # Retry from psql: the failed run runs again without redoing its kept step.
    fr = await app.start(fragile)
    with pytest.raises(pgjournal.RunFailed):
        await fr.result(timeout=30)
    assert db.one_doc("psql-retry", fr.run_id) == [{"retry_run": "queued"}]
    assert await fr.result(timeout=30) == "second time lucky"
    steps = db.one_doc("run-steps", fr.run_id)
    assert [(s["name"], s["attempt"]) for s in steps] == [("once", 1), ("finish", 2)]
