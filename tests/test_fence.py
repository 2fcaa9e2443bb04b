"""The fence, at the SQL level: every function a worker writes through refuses a
superseded lease epoch and changes no row, and a completed journal entry is never
overwritten, not even by the current owner.

Every call goes through ``Sql`` below (the documented function names, named
arguments), so a change of a function's signature is adjusted in one place.
Each refusal is paired with the same call under the current epoch, which must
be accepted: a test that passes because its arguments were wrong cannot hide.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Json

Row = dict[str, Any]
#: Every table a fenced writer could touch: the run rows (children included),
#: the journal, chunks, signals, the event log the run triggers write, and the
#: rate buckets' state.
TABLES = ("runs", "steps", "stream_chunks", "signals", "run_events", "rate_buckets")


class Sql:
    """One connection on the test's schema; one method per SQL function."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self.conn = conn

    def call(self, fn: str, **args: Any) -> list[Row]:
        """``SELECT * FROM fn(p_a => %(a)s, ...)``: named arguments, so parameters
        with defaults added later do not shift anything."""
        named = sql.SQL(", ").join(
            sql.SQL("{} => {}").format(sql.Identifier(f"p_{k}"), sql.Placeholder(k))
            for k in args)
        query = sql.SQL("SELECT * FROM {}({})").format(sql.Identifier(fn), named)
        return self.conn.execute(query, args).fetchall()

    def scalar(self, fn: str, **args: Any) -> Any:
        (row,) = self.call(fn, **args)
        return next(iter(row.values()))

    # -- the queue ---------------------------------------------------------------

    def start(self, queue: str = "default") -> uuid.UUID:
        (row,) = self.call("start_run", id=uuid.uuid4(), workflow="wf", queue=queue,
                           input='{"args": [], "kwargs": {}}')
        return uuid.UUID(str(row["run_id"]))

    def register(self) -> uuid.UUID:
        worker = uuid.uuid4()
        self.call("register_worker", id=worker, host="test", pid=1, queues=["default"],
                  concurrency=4)
        return worker

    def claim(self, worker: uuid.UUID, lease: float) -> int:
        (row,) = self.call("claim_runs", worker=worker, queues=["default"], limit=1,
                           lease_seconds=lease)
        return int(row["lease_epoch"])

    # -- the fenced writers --------------------------------------------------------

    def journal_step(self, run: uuid.UUID, epoch: int, position: int, *,
                     status: str = "completed", output: Any = "v", kind: str = "step",
                     name: str | None = None, chunks: list[Any] | None = None) -> Any:
        return self.scalar(
            "journal_step", run=run, epoch=epoch, position=position,
            name=name or f"s{position}", occurrence=0, kind=kind, status=status,
            output=json.dumps(output) if status == "completed" else None,
            error=None if status == "completed" else json.dumps({"type": "E", "message": "x"}),
            attempt=1, chunks=None if chunks is None else json.dumps(chunks))

    def append_chunks(self, run: uuid.UUID, epoch: int, position: int) -> Any:
        return self.scalar("append_chunks", run=run, epoch=epoch, position=position,
                           chunk_start=0, chunks=json.dumps(["stale-a", "stale-b"]))

    def wait_signal(self, run: uuid.UUID, epoch: int, position: int) -> tuple[str, Any]:
        (row,) = self.call("wait_signal", run=run, epoch=epoch, position=position, name="go",
                           occurrence=0, timeout_seconds=None, attempt=1)
        return row["outcome"], row["payload"]

    def sleep_until(self, run: uuid.UUID, epoch: int, position: int) -> str:
        (row,) = self.call("sleep_until", run=run, epoch=epoch, position=position, name="nap",
                           occurrence=0, seconds=3600.0, wake_at=None, attempt=1)
        return str(row["outcome"])

    def complete(self, run: uuid.UUID, epoch: int) -> set[uuid.UUID]:
        rows = self.call("complete_runs", ids=[run], epochs=[epoch],
                         outputs=[json.dumps("stale output")])
        return {r["run_id"] for r in rows}

    def fail(self, run: uuid.UUID, epoch: int) -> str:
        return str(self.scalar("fail_run", run=run, epoch=epoch,
                               error=json.dumps({"type": "Stale", "message": "x"}),
                               retry_delay_seconds=0.0, terminal=False))

    def release(self, run: uuid.UUID, epoch: int) -> int:
        return int(self.scalar("release_runs", ids=[run], epochs=[epoch]))

    def spawn_runs(self, run: uuid.UUID, epoch: int, position: int,
                   children: list[uuid.UUID]) -> Any:
        """Spawn ``children`` (queue ``kids``, which no claim here serves)."""
        return self.scalar(
            "spawn_runs", parent=run, epoch=epoch, position=position, name=f"spawn{position}",
            occurrence=0, attempt=1, turn=None, calls_before=None, fingerprint=None,
            ids=children, workflow="wf", queue="kids",
            inputs=[Json({"args": [], "kwargs": {}}) for _ in children],
            max_attempts=3, max_recoveries=5, timeout_seconds=None)

    def take_units(self, run: uuid.UUID, epoch: int, position: int,
                   again: bool = False) -> tuple[str, Any]:
        """``again``: take again into the take journaled at ``position`` (a retry)."""
        (row,) = self.call("take_units", run=run, epoch=epoch, position=position,
                           name="rate:api", occurrence=position, bucket="api", units=30.0,
                           attempt=1, again=again)
        return row["outcome"], row["ready_at"]

    def wait_children(self, run: uuid.UUID, epoch: int, position: int,
                      children: list[uuid.UUID]) -> tuple[str, Any]:
        (row,) = self.call("wait_children", run=run, epoch=epoch, position=position,
                           name="wait", occurrence=0, attempt=1, turn=None, calls_before=None,
                           children=children, mode="all")
        return row["outcome"], row["results"]

    def heartbeat(self, worker: uuid.UUID, run: uuid.UUID, epoch: int,
                  lease: float = 3600.0) -> list[Row]:
        return self.call("heartbeat", worker=worker, ids=[run], epochs=[epoch],
                         lease_seconds=lease)

    # -- what a refused call must leave alone --------------------------------------

    def snapshot(self) -> dict[str, list[Row]]:
        out = {}
        for table in TABLES:
            rows = self.conn.execute(
                sql.SQL("SELECT * FROM {} t").format(sql.Identifier(table))).fetchall()
            out[table] = sorted(rows, key=lambda r: json.dumps(r, default=str, sort_keys=True))
        return out


@pytest.fixture
def db(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Sql]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pgjournal_schema)))
        yield Sql(conn)


class Scene:
    """A run whose first owner (``stale``) was superseded by ``current``.

    The run has a completed step at position 0 (the stale owner's), a stream step
    with flushed chunks at position 1 (the current owner's), two unended children
    the stale owner spawned at position 2, its take from rate bucket ``api`` at
    position 3, a signal ``go`` waiting to be consumed and units in the bucket:
    material for every stale write to corrupt.
    """

    def __init__(self, db: Sql, how: str) -> None:
        self.db = db
        db.call("set_rate_limit", name="api", capacity=100.0, refill_per_second=1.0)
        self.run = db.start()
        self.old_worker = db.register()
        self.stale = db.claim(self.old_worker, lease=0.0)  # expires at once
        assert db.journal_step(self.run, self.stale, 0) is None
        self.children = sorted([uuid.uuid4(), uuid.uuid4()])
        assert db.spawn_runs(self.run, self.stale, 2, self.children) is None
        assert db.take_units(self.run, self.stale, 3)[0] == "taken"
        if how == "takeover":
            self.new_worker = db.register()
            self.current: int | None = db.claim(self.new_worker, lease=3600.0)
            assert self.current == self.stale + 1
            assert db.append_chunks(self.run, self.current, 1) is None
            db.call("send_signal", run=self.run, name="go", payload='"payload"')
        elif how == "cancel":
            assert db.scalar("cancel_run", run=self.run) == "cancelled"
            self.current = None
        else:  # parked dead by the next claim: its recoveries are used up
            db.conn.execute("UPDATE runs SET max_recoveries = 0 WHERE id = %s", (self.run,))
            assert db.call("claim_runs", worker=db.register(), queues=["default"], limit=1,
                           lease_seconds=3600.0) == []
            self.current = None
        self.next_position = 4


FENCED = ["journal_step", "overwrite_step", "append_chunks", "wait_signal", "sleep_until",
          "complete_runs", "fail_run", "release_runs", "heartbeat", "spawn_runs",
          "take_units", "take_units_again", "wait_children"]


def _attempt(scene: Scene, fn: str, epoch: int) -> tuple[bool, Any]:
    """Call ``fn`` for the scene's run under ``epoch``: (accepted?, what it returned)."""
    db, run, pos = scene.db, scene.run, scene.next_position
    if fn == "journal_step":
        out = db.journal_step(run, epoch, pos)
        return out is None, out
    if fn == "overwrite_step":  # position 1 holds the current owner's stream chunks
        out = db.journal_step(run, epoch, 1, kind="stream", name="s1", output={"chunks": 1},
                              chunks=["stale"])
        return out is None, out
    if fn == "append_chunks":
        out = db.append_chunks(run, epoch, 1)
        return out is None, out
    if fn == "wait_signal":
        outcome, payload = db.wait_signal(run, epoch, pos)
        return outcome != "lost", (outcome, payload)
    if fn == "sleep_until":
        outcome = db.sleep_until(run, epoch, pos)
        return outcome != "lost", outcome
    if fn == "complete_runs":
        done = db.complete(run, epoch)
        return run in done, done
    if fn == "fail_run":
        status = db.fail(run, epoch)
        return not status.startswith("lost:"), status
    if fn == "release_runs":
        n = db.release(run, epoch)
        return n == 1, n
    if fn == "spawn_runs":
        out = db.spawn_runs(run, epoch, pos, [uuid.uuid4()])
        return out is None, out
    if fn == "take_units":
        outcome, _ready = db.take_units(run, epoch, pos)
        return outcome == "taken", outcome
    if fn == "take_units_again":  # a retry's take, into the take at position 3
        outcome, _ready = db.take_units(run, epoch, 3, again=True)
        return outcome == "taken", outcome
    if fn == "wait_children":  # the children are unended: the wait would suspend the run
        outcome, results = db.wait_children(run, epoch, pos, scene.children)
        return outcome != "lost", (outcome, results)
    if fn == "heartbeat":
        worker = scene.old_worker if epoch == scene.stale else scene.new_worker
        lost = db.heartbeat(worker, run, epoch)
        return not lost, lost
    raise AssertionError(fn)


@pytest.mark.parametrize("fn", FENCED)
def test_superseded_epoch_is_refused_and_changes_nothing(db: Sql, fn: str) -> None:
    """The epoch moved on through a takeover (lease expired, another worker
    claimed): the old owner's write is refused and leaves every row as it was."""
    scene = Scene(db, "takeover")
    assert scene.current is not None
    before = db.snapshot()
    accepted, result = _attempt(scene, fn, scene.stale)
    assert not accepted, f"{fn} accepted a write under a superseded epoch: {result!r}"
    assert db.snapshot() == before, f"{fn} refused, yet changed rows"
    # What the refusal reports: the run's status now (a lost lease, not a cancel).
    if fn in ("journal_step", "overwrite_step", "append_chunks", "spawn_runs"):
        assert result == "running"
    elif fn in ("wait_signal", "wait_children"):
        assert result == ("lost", "running")
    elif fn in ("fail_run", "take_units", "take_units_again"):
        assert result == "lost:running"
    elif fn == "heartbeat":
        assert [(r["status"], r["lease_epoch"]) for r in result] == [
            ("running", scene.current)]
    # The same call from the current owner goes through: the refusal was the epoch's.
    accepted, result = _attempt(scene, fn, scene.current)
    assert accepted, f"{fn} refused the current owner too: {result!r}"
    assert db.snapshot() != before or fn == "heartbeat"


@pytest.mark.parametrize("how", ["cancel", "dead"])
@pytest.mark.parametrize("fn", FENCED)
def test_ended_run_refuses_its_owner(db: Sql, fn: str, how: str) -> None:
    """cancel_run, and the parking of a poison run as dead, move the epoch on:
    the owner's next write is refused and changes nothing."""
    status = {"cancel": "cancelled", "dead": "dead"}[how]
    scene = Scene(db, how)
    (row,) = db.conn.execute("SELECT status, lease_epoch FROM runs WHERE id = %s",
                             (scene.run,)).fetchall()
    assert (row["status"], row["lease_epoch"]) == (status, scene.stale + 1)
    before = db.snapshot()
    if fn == "heartbeat":
        lost = db.heartbeat(scene.old_worker, scene.run, scene.stale)
        assert [(r["status"], r["lease_epoch"]) for r in lost] == [(status, scene.stale + 1)]
        assert db.snapshot() == before
        return
    accepted, result = _attempt(scene, fn, scene.stale)
    assert not accepted, f"{fn} wrote to a {status} run: {result!r}"
    assert db.snapshot() == before
    if fn in ("journal_step", "overwrite_step", "append_chunks", "spawn_runs"):
        assert result == status
    elif fn in ("fail_run", "take_units", "take_units_again"):
        assert result == f"lost:{status}"
    elif fn == "wait_children":
        assert result == ("lost", status)


def test_stale_heartbeat_does_not_extend_the_new_lease(db: Sql) -> None:
    scene = Scene(db, "takeover")
    (due,) = db.conn.execute("SELECT lease_until FROM runs WHERE id = %s",
                             (scene.run,)).fetchall()
    db.heartbeat(scene.old_worker, scene.run, scene.stale, lease=0.0)
    (after,) = db.conn.execute("SELECT lease_until FROM runs WHERE id = %s",
                               (scene.run,)).fetchall()
    assert after == due


def test_completed_entry_is_never_overwritten(db: Sql) -> None:
    """Not even by the current owner: journal_step raises PJ002 and nothing changes.
    A failed entry (an earlier attempt's) may be overwritten: the contrast."""
    run = db.start()
    epoch = db.claim(db.register(), lease=3600.0)
    assert db.journal_step(run, epoch, 0, output="first") is None
    assert db.journal_step(run, epoch, 1, kind="stream", output={"chunks": 2},
                           chunks=["a", "b"]) is None
    assert db.journal_step(run, epoch, 2, status="failed") is None
    before = db.snapshot()
    for position, kw in ((0, {"output": "second"}),
                         (1, {"kind": "stream", "output": {"chunks": 1}, "chunks": ["z"]})):
        with pytest.raises(psycopg.Error, match="already journaled") as info:
            db.journal_step(run, epoch, position, name=f"s{position}", **kw)  # type: ignore[arg-type]
        assert info.value.sqlstate == "PJ002"
        assert db.snapshot() == before
    # A failed entry is re-executed by a retry: overwriting it is allowed.
    assert db.journal_step(run, epoch, 2, output="retried") is None
    (row,) = db.conn.execute("SELECT status, output FROM steps WHERE run_id = %s "
                             "AND position = 2", (run,)).fetchall()
    assert (row["status"], row["output"]) == ("completed", "retried")


def test_heartbeat_is_not_blocked_by_a_dba_lock_on_one_run(
        db: Sql, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """A DBA transaction holding one run row FOR UPDATE: the heartbeat renews the
    worker's other runs at once and reports the locked one as not renewed."""
    worker = db.register()
    a, b = sorted([db.start(), db.start()])
    claimed = db.call("claim_runs", worker=worker, queues=["default"], limit=2,
                      lease_seconds=30.0)
    epochs = {r["id"]: r["lease_epoch"] for r in claimed}
    assert set(epochs) == {a, b}

    def due(run: uuid.UUID) -> Any:
        return db.conn.execute("SELECT lease_until FROM runs WHERE id = %s",
                               (run,)).fetchone()["lease_until"]  # type: ignore[index]

    before = {a: due(a), b: due(b)}
    with psycopg.connect(pgjournal_dsn) as dba:
        dba.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pgjournal_schema)))
        dba.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (a,))  # held open
        db.conn.execute("SET statement_timeout = '10s'")  # fail, rather than hang
        t0 = time.monotonic()
        lost = db.call("heartbeat", worker=worker, ids=[a, b], epochs=[epochs[a], epochs[b]],
                       lease_seconds=30.0)
        took = time.monotonic() - t0
        assert took < 2.0, f"the heartbeat waited {took:.1f}s on the DBA's lock"
        assert [(r["lost_run_id"], r["status"], r["lease_epoch"]) for r in lost] == [
            (a, "busy", epochs[a])]
        assert due(b) > before[b], "the unlocked run's lease was not renewed"
        assert due(a) == before[a]
        dba.rollback()
    assert db.call("heartbeat", worker=worker, ids=[a, b], epochs=[epochs[a], epochs[b]],
                   lease_seconds=30.0) == []
    assert due(a) > before[a]
