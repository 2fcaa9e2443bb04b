"""Guards that only an interleaving shows, forced with open transactions (not
timing), and the lease check before a live step, shown by its behaviour.

- the rate take's clock: a take whose transaction began before another take
  locked the bucket reckons from the later time;
- the per-key advisory lock of the claim: a claim that picked a run of a key
  while another claim of the key is still open waits for it, then counts again;
- ``ensure()`` before a live step: an async step (no executor thread to check
  the lease again) past a lost, unconfirmable lease is never called, and
  neither is an in-process retry of a step whose lease was lost meanwhile.

And two questions about flow control, each answered by a test: does a retried
``rate=`` step take its units again (it does now: every call of the model
takes units, and the retries are paced by the bucket), and does a run past its
lease, still in its step, keep its key's slot (it does not: documented).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

import pgjournal
from pgjournal.errors import DatabaseUnavailable
from pgjournal.lease import Lease
from pgjournal.run import Abandoned, Run

from .conftest import lease_expired, serving, wait_for
from .test_fence import Sql
from .test_flow_control import check_rate_windows, ready_times

Row = dict[str, Any]


def _connect(dsn: str, schema: str, *, autocommit: bool) -> psycopg.Connection[Row]:
    conn = psycopg.connect(dsn, autocommit=autocommit, row_factory=dict_row)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    if not autocommit:
        conn.commit()
    return conn


@pytest.fixture
def db(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Sql]:
    with _connect(pgjournal_dsn, pgjournal_schema, autocommit=True) as conn:
        yield Sql(conn)


def _claim_all(db: Sql, n: int) -> dict[uuid.UUID, int]:
    """Claim ``n`` queued runs for one worker: run id -> lease epoch."""
    rows = db.call("claim_runs", worker=db.register(), queues=["default"], limit=n,
                   lease_seconds=3600.0)
    assert len(rows) == n
    return {r["id"]: int(r["lease_epoch"]) for r in rows}


def _take(db: Sql, run: uuid.UUID, epoch: int, units: float) -> Row:
    (row,) = db.call("take_units", run=run, epoch=epoch, position=0, name="rate:api",
                     occurrence=0, bucket="api", units=units, attempt=1)
    assert row["outcome"] == "taken", row
    return row


def _bucket(db: Sql) -> Row:
    row = db.conn.execute("SELECT tokens, updated_at FROM rate_buckets WHERE name = 'api'"
                          ).fetchone()
    assert row is not None
    return row


def _blocked_on_a_lock(db: Sql, pid: int) -> bool:
    row = db.conn.execute("SELECT count(*) AS n FROM pg_locks WHERE pid = %s AND NOT granted",
                          (pid,)).fetchone()
    return bool(row and row["n"])


def _await(check: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``check()`` (an observed state, not a delay) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- the rate take's clock ------------------------------------------------------------


def test_a_take_begun_before_another_took_reckons_from_the_later_time(
        db: Sql, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Take A's transaction begins (its now() is fixed), then take B takes the
    full bucket and commits, then A takes. A's units are ready only when the
    refill has paid them after B's: reckoning from A's own, earlier, start would
    make them ready early, and put more units in a window than the bucket holds."""
    capacity, refill = 10.0, 10.0
    db.call("set_rate_limit", name="api", capacity=capacity, refill_per_second=refill)
    db.start()
    db.start()
    (run_a, epoch_a), (run_b, epoch_b) = sorted(_claim_all(db, 2).items())
    with _connect(pgjournal_dsn, pgjournal_schema, autocommit=False) as conn_a:
        started_a = conn_a.execute("SELECT now() AS t").fetchone()["t"]  # type: ignore[index]
        ready_b = _take(db, run_b, epoch_b, capacity)["ready_at"]        # B empties it
        took_b = _bucket(db)["updated_at"]
        assert started_a < took_b, "the order was not forced"
        assert ready_b == took_b                                        # B had its units
        ready_a = _take(Sql(conn_a), run_a, epoch_a, 5.0)["ready_at"]
        conn_a.commit()
    # Capacity + refill x W for the window [ready_b, ready_a] holds both takes.
    window = (ready_a - ready_b).total_seconds()
    assert capacity + 5.0 <= capacity + refill * window, (
        f"15 units ready within {window:.6f} s: A reckoned from its own start "
        f"({started_a}), {(took_b - started_a).total_seconds():.6f} s before B took")
    assert ready_a == took_b + timedelta(seconds=5.0 / refill)
    bucket = _bucket(db)
    assert bucket["updated_at"] == took_b, "the bucket's clock went back"
    assert bucket["tokens"] == pytest.approx(-5.0)


# -- the per-key lock of the claim ------------------------------------------------------


def test_a_claim_waits_for_an_open_claim_of_the_same_key_then_counts_again(
        db: Sql, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Claim A picked a run of key K (limit 1) and its transaction is still open;
    claim B, which cannot see A's pick yet, passes over A's locked row and picks
    the next run of K. B must wait for A on K's lock and, counting again after
    A committed, take nothing of K."""
    db.call("set_concurrency_limit", pattern="K", max_running=1)
    first, second = (db.call("start_run", id=uuid.uuid4(), workflow="wf", queue="default",
                             input='{"args": [], "kwargs": {}}',
                             concurrency_key="K")[0]["run_id"] for _ in range(2))
    worker_a, worker_b = db.register(), db.register()
    got_b: list[Row] = []
    errors: list[BaseException] = []
    with _connect(pgjournal_dsn, pgjournal_schema, autocommit=False) as conn_a, \
            _connect(pgjournal_dsn, pgjournal_schema, autocommit=True) as conn_b:
        got_a = Sql(conn_a).call("claim_runs", worker=worker_a, queues=["default"], limit=1,
                                 lease_seconds=60.0)
        assert [r["id"] for r in got_a] == [first]                   # held open from here

        def claim_b() -> None:
            try:
                got_b.extend(Sql(conn_b).call("claim_runs", worker=worker_b,
                                              queues=["default"], limit=1,
                                              lease_seconds=60.0))
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        pid_b = conn_b.info.backend_pid
        thread = threading.Thread(target=claim_b)
        thread.start()
        _await(lambda: not thread.is_alive() or _blocked_on_a_lock(db, pid_b),
               "claim B to end or to wait for a lock")
        waited = thread.is_alive()
        conn_a.commit()
        thread.join(30)
        assert not thread.is_alive() and not errors, errors
    assert [r["id"] for r in got_b] == [], (
        f"claim B took {second} beside {first}, which claim A held for key K "
        f"(limit 1; B {'waited for a lock' if waited else 'never waited'})")
    assert waited, "claim B did not wait for claim A's key lock"
    running = db.conn.execute("SELECT id FROM runs WHERE status = 'running'").fetchall()
    assert [r["id"] for r in running] == [first]


# -- the lease check before a live step ---------------------------------------------------


class Heartbeat:
    """Confirms a lease as the worker does: a heartbeat of this run alone, in the
    database; ``down`` makes the database unreachable for it."""

    def __init__(self, store: Any, worker: uuid.UUID, down: bool = False) -> None:
        self.store, self.worker, self.down = store, worker, down
        self.asked = 0

    async def __call__(self, lease: Lease) -> bool:
        self.asked += 1
        if self.down:
            raise DatabaseUnavailable("database connection failed (test)")
        lost = await self.store.heartbeat(self.worker, [(lease.run_id, lease.epoch)], 30.0)
        return not lost


@pytest.mark.parametrize("how", ["taken over", "database unreachable"])
async def test_an_async_step_past_a_lost_lease_is_never_called(
        pgjournal_app: pgjournal.App, how: str) -> None:
    """The local lease ran out (a pause, heartbeats that did not get through) and
    cannot be confirmed: the next async step raises ``Abandoned`` and its
    function is never called; nothing is journaled for it."""
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("work")
    stale_worker = uuid.uuid4()
    if how == "taken over":
        (claim,) = await store.claim(stale_worker, ["default"], 1, 0.0)  # expires at once
        (newer,) = await store.claim(uuid.uuid4(), ["default"], 1, 30.0)
        assert newer.epoch == claim.epoch + 1
    else:
        (claim,) = await store.claim(stale_worker, ["default"], 1, 30.0)
    confirm = Heartbeat(store, stale_worker, down=how == "database unreachable")
    lease = Lease(claim.run_id, claim.epoch, 3.0, sent_at=time.monotonic() - 4.0,
                  confirm=confirm)
    run = Run(store, app.serializer, claim, lease=lease)
    called: list[str] = []

    async def charge() -> str:
        called.append("charged")
        return "charged"

    with pytest.raises(Abandoned):
        await run.step("charge", charge)
    assert called == [], "the step function ran past a lost lease"
    assert confirm.asked >= 1 and lease.lost is not None
    assert await store.get_steps(handle.run_id) == []


async def test_an_in_process_retry_after_the_lease_was_lost_is_not_called(
        pgjournal_app: pgjournal.App) -> None:
    """``retries=``: the first call fails; meanwhile the lease ran out locally and
    another worker took the run over. The retry is a new execution of the step:
    it is not started without confirming the lease."""
    app = pgjournal_app
    store = await app.store()
    handle = await app.start("work")
    stale_worker = uuid.uuid4()
    (claim,) = await store.claim(stale_worker, ["default"], 1, 30.0)
    lease = Lease(claim.run_id, claim.epoch, 30.0, sent_at=time.monotonic(),
                  confirm=Heartbeat(store, stale_worker))
    run = Run(store, app.serializer, claim, lease=lease)
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(len(calls))
        if len(calls) == 1:
            # The worker paused past its lease while this call was out; the run
            # was taken over meanwhile.
            lease.valid_until = time.monotonic() - 1.0
            async with store.pool.connection() as conn:
                await conn.execute(
                    sql.SQL("UPDATE {}.runs SET lease_until = now() WHERE id = %s").format(
                        sql.Identifier(store.schema)), (claim.run_id,))
            (newer,) = await store.claim(uuid.uuid4(), ["default"], 1, 30.0)
            assert newer.epoch == claim.epoch + 1
            raise ConnectionError("model API hiccup")
        return "ok"

    with pytest.raises(Abandoned):
        await run.step("call", flaky, retries=2, backoff=0.0)
    assert calls == [0], "the retry ran past a lost lease"
    assert await store.get_steps(handle.run_id) == []


# -- a rate take and the calls it pays for ---------------------------------------------------


def _takes(dsn: str, schema: str, run_id: uuid.UUID) -> list[Row]:
    """The run's rate entries: each take journaled under them (the earlier ones
    of an entry taken again, then its last), with the entry's tries."""
    with _connect(dsn, schema, autocommit=True) as conn:
        return conn.execute(
            "SELECT position, name, tries, attempt, output FROM steps "
            "WHERE run_id = %s AND kind = 'rate' ORDER BY position", (run_id,)).fetchall()


def _available(dsn: str, schema: str) -> float:
    with _connect(dsn, schema, autocommit=True) as conn:
        row = conn.execute("SELECT available FROM rate_limits WHERE name = 'api'").fetchone()
    assert row is not None
    return float(row["available"])


def _flaky_app(app: pgjournal.App, fails: int, units: float = 30) -> list[int]:
    """Workflows whose rate-limited step fails its first ``fails`` calls:
    ``in_process`` retries it in the step (``retries=``), ``by_attempts`` lets
    the run fail and be retried (a new attempt). Returns the list of calls."""
    calls: list[int] = []

    def call_model() -> str:
        calls.append(len(calls))
        if len(calls) <= fails:
            raise ConnectionError(f"model API hiccup {len(calls)}")
        return "reply"

    @app.workflow()
    async def in_process(run: pgjournal.Run) -> str:
        return await run.step("call", call_model, retries=fails,  # type: ignore[no-any-return]
                              backoff=0.01, rate=("api", units))

    @app.workflow(max_attempts=fails + 1, retry_backoff=0.05)
    async def by_attempts(run: pgjournal.Run) -> str:
        return await run.step("call", call_model,  # type: ignore[no-any-return]
                              rate=("api", units))

    return calls


@pytest.mark.parametrize("how", ["in_process", "by_attempts"])
async def test_each_call_of_a_retried_step_takes_its_units(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        how: str) -> None:
    """A ``rate=`` step whose model call fails twice calls the model three times,
    in process (``retries=2``) or over three attempts: the bucket is charged for
    three calls, each call waits for its own units, and the journal shows every
    take (one entry, taken again per call)."""
    app = pgjournal_app
    await app.set_rate_limit("api", capacity=100, refill_per_second=0.001)
    calls = _flaky_app(app, fails=2)
    handle = await app.start(how)
    async with serving(app):
        assert await handle.result(timeout=60) == "reply"
    assert len(calls) == 3
    assert _available(pgjournal_dsn, pgjournal_schema) == pytest.approx(100 - 3 * 30, abs=0.5), \
        "the retried calls of the model took no units"
    (entry,) = _takes(pgjournal_dsn, pgjournal_schema, handle.run_id)
    assert entry["tries"] == 3
    assert [e["units"] for e in entry["output"]["earlier"]] == [30, 30]
    assert entry["output"]["units"] == 30
    assert entry["attempt"] == (3 if how == "by_attempts" else 1)


async def test_a_new_attempt_waits_suspended_for_its_new_take_and_takes_once(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """The new attempt's take is not ready for 1.5 s: the run suspends (no worker
    held) and, resumed, replays that take: it neither takes a third time nor
    calls the model before the units are ready."""
    app = pgjournal_app
    await app.set_rate_limit("api", capacity=30, refill_per_second=20)
    calls = _flaky_app(app, fails=1)
    handle = await app.start("by_attempts")
    async with serving(app):
        assert await handle.result(timeout=60) == "reply"
    assert len(calls) == 2
    (entry,) = _takes(pgjournal_dsn, pgjournal_schema, handle.run_id)
    assert (entry["tries"], entry["attempt"]) == (2, 2)
    assert [e["units"] for e in entry["output"]["earlier"]] == [30]
    with _connect(pgjournal_dsn, pgjournal_schema, autocommit=True) as conn:
        (step,) = conn.execute("SELECT started_at, attempt FROM steps WHERE run_id = %s "
                               "AND kind = 'step'", (handle.run_id,)).fetchall()
        suspended = conn.execute("SELECT count(*) AS n FROM run_events WHERE run_id = %s "
                                 "AND to_status = 'suspended'", (handle.run_id,)).fetchone()
    ready = datetime.fromisoformat(entry["output"]["ready_at"])
    assert step["attempt"] == 2 and step["started_at"] >= ready - timedelta(milliseconds=5)
    assert suspended is not None and suspended["n"] == 1


# -- a key's slot and a run past its lease ----------------------------------------------------


async def test_a_run_past_its_lease_still_in_its_step_keeps_holding_its_key(
        pgjournal_app: pgjournal.App, db: Sql) -> None:
    """A running run holds its key's slot until it ends or is taken over, live
    lease or not (migration 0022). Worker A's heartbeats do not get through (a
    cut network, a blocked event loop) while its step of run 1 (key K, limit 1)
    is still calling out. Before 0022, once run 1's lease expired in the
    database, a claim on another host started run 2 of K beside it ("run 2
    was started beside run 1"): two runs of K executed at once, and when A's
    heartbeats got through again both held live leases (the chaos run's K
    row). Now run 2 waits; the takeover of run 1 itself is not held back."""
    app = pgjournal_app
    store = await app.store()
    await app.set_concurrency_limit("K", 1)
    entered: dict[uuid.UUID, asyncio.Event] = {}
    release = asyncio.Event()

    @app.workflow(queue="a")
    async def long_call(run: pgjournal.Run) -> str:
        async def call() -> str:
            entered.setdefault(run.id, asyncio.Event()).set()
            await release.wait()
            return "done"
        return await run.step("call", call)  # type: ignore[no-any-return]

    first = await app.start("long_call", concurrency_key="K")
    second = await app.start("long_call", queue="b", concurrency_key="K")

    def claim(queue: str) -> list[uuid.UUID]:
        rows = db.call("claim_runs", worker=db.register(), queues=[queue], limit=1,
                       lease_seconds=30.0)
        return [r["id"] for r in rows]

    # poll_interval: the worker itself never looks for expired leases here (it
    # would take run 1 over from under the test's own claims).
    async with serving(app, queues=["a"], lease=1.0, heartbeat_interval=3600.0,
                       poll_interval=3600.0):
        async def first_in_step() -> bool:
            return first.run_id in entered
        await wait_for(first_in_step, 30, what="run 1 to enter its step")
        # While run 1's lease is live, K is at its limit: nothing of K is claimed.
        assert claim("b") == []
        await wait_for(lambda: lease_expired(store, first.run_id), 30,
                       what="run 1's lease to expire in the database")
        # Run 1 is still in its step (its call has not returned) ...
        assert not release.is_set()
        # ... and still holds K: no claim of K on another host starts run 2.
        assert claim("b") == [], "run 2 was started beside run 1"
        running = db.conn.execute(
            "SELECT count(*) AS n FROM runs WHERE concurrency_key = 'K' "
            "AND status = 'running'").fetchone()
        assert running is not None and running["n"] == 1
        # A takeover of run 1 itself replaces its slot: not held back by K.
        assert claim("a") == [first.run_id], "the expired run 1 was not taken over"
        release.set()
    # Run 1's old worker lost its lease to the takeover; run 2 still waits for K.
    assert await second.status() == "queued"


async def test_retried_calls_are_paced_by_the_bucket(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """Four runs whose model call fails twice, retried in process: twelve takes
    of 30 from a bucket of 60 refilled at 200/s. No window of the takes (the
    earlier ones of each entry included) holds more than capacity + refill x W,
    and the whole takes at least the minimum the limit allows."""
    app = pgjournal_app
    await app.set_rate_limit("api", capacity=60, refill_per_second=200)
    calls: dict[str, int] = {}

    def call_model(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        if calls[key] <= 2:
            raise ConnectionError("model API hiccup")
        return "reply"

    @app.workflow()
    async def retried(run: pgjournal.Run) -> str:
        return await run.step("call", call_model, str(run.id),  # type: ignore[no-any-return]
                              retries=2, backoff=0.0, rate=("api", 30))

    runs = [await app.start("retried") for _ in range(4)]
    async with serving(app, concurrency=4):
        for h in runs:
            assert await h.result(timeout=60) == "reply"
    takes = ready_times(pgjournal_dsn, pgjournal_schema)
    assert len(takes) == 12 and sum(calls.values()) == 12
    check_rate_windows(takes, 60, 200)
    span = (takes[-1][0] - takes[0][0]).total_seconds()
    assert span >= (12 * 30 - 60) / 200 - 0.01
