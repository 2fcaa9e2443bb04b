"""Lease renewals are HOT updates (migration 0013), and the lease still fences.

A running run keeps its lease expiry in ``runs.lease_until``, which no index
holds, so a heartbeat changes no indexed column: Postgres updates the row
in place on its page (a heap-only tuple) without new index entries. Before
0013 the expiry lived in the indexed ``due_at`` and no heartbeat was HOT.

The statistics counters are asynchronous: the session that did the updates
forces its flush (``pg_stat_force_next_flush``, PostgreSQL 15+), and the
reader drops its cached snapshot before every read; the test waits for the
counters to show every update rather than sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from tests.conftest import serving, wait_for

Row = dict[str, Any]


@pytest.fixture
def conn(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[psycopg.Connection[Row]]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as c:
        if c.info.server_version < 150000:
            pytest.skip("pg_stat_force_next_flush() needs PostgreSQL 15")
        c.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pgjournal_schema)))
        yield c


def _claim_one(conn: psycopg.Connection[Row], lease: float) -> tuple[uuid.UUID, uuid.UUID, int]:
    worker = uuid.uuid4()
    conn.execute("SELECT register_worker(%s, 'test', 1, ARRAY['default'], 4)", (worker,))
    conn.execute("SELECT start_run(%s, 'wf', 'default', '{\"args\": [], \"kwargs\": {}}'::json)",
                 (uuid.uuid4(),))
    (row,) = conn.execute("SELECT id, lease_epoch FROM claim_runs(%s, ARRAY['default'], 1, %s)",
                          (worker, lease)).fetchall()
    return worker, row["id"], int(row["lease_epoch"])


def _counters(conn: psycopg.Connection[Row], schema: str) -> tuple[int, int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    (row,) = conn.execute(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
        "WHERE schemaname = %s AND relname = 'runs'", (schema,)).fetchall()
    return int(row["n_tup_upd"]), int(row["n_tup_hot_upd"])


async def test_heartbeats_of_a_running_run_are_hot_updates(
        conn: psycopg.Connection[Row], pgjournal_dsn: str, pgjournal_schema: str) -> None:
    worker, run, epoch = _claim_one(conn, lease=3600.0)
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")  # the flush happens when the session goes idle
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as reader:
        async def flushed_claim() -> bool:
            return _counters(reader, pgjournal_schema)[0] >= 1
        await wait_for(flushed_claim, 10, what="the claim's update in pg_stat_user_tables")
        upd0, hot0 = _counters(reader, pgjournal_schema)

        beats = 20
        before = conn.execute("SELECT lease_until FROM runs WHERE id = %s",
                              (run,)).fetchone()
        for _ in range(beats):
            lost = conn.execute("SELECT * FROM heartbeat(%s, ARRAY[%s]::uuid[], "
                                "ARRAY[%s]::bigint[], 3600)", (worker, run, epoch)).fetchall()
            assert lost == []  # renewed
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT 1")

        async def flushed() -> bool:
            return _counters(reader, pgjournal_schema)[0] >= upd0 + beats
        await wait_for(flushed, 10, what="the heartbeats in pg_stat_user_tables")
        upd, hot = _counters(reader, pgjournal_schema)
    assert upd - upd0 == beats
    assert hot - hot0 == beats, f"{hot - hot0} of {beats} heartbeats were HOT updates"
    after = conn.execute("SELECT lease_until, due_at, status FROM runs WHERE id = %s",
                         (run,)).fetchone()
    assert before is not None and after is not None
    assert after["status"] == "running" and after["due_at"] is None
    assert after["lease_until"] > before["lease_until"]  # each beat really renewed it


async def test_expired_lease_is_claimed_again_and_fences_the_old_owner(
        conn: psycopg.Connection[Row]) -> None:
    """An expired lease_until makes the run claimable (through runs_running, not
    the claim index); the new claim bumps the epoch and the old owner's
    heartbeat and writes are refused."""
    old, run, epoch = _claim_one(conn, lease=0.2)
    new = uuid.uuid4()
    conn.execute("SELECT register_worker(%s, 'test', 2, ARRAY['default'], 4)", (new,))
    # Not claimable while the lease holds.
    assert conn.execute("SELECT * FROM claim_runs(%s, ARRAY['default'], 1, 30)",
                        (new,)).fetchall() == []

    async def expired() -> bool:
        row = conn.execute("SELECT lease_until < now() AS gone FROM runs WHERE id = %s",
                           (run,)).fetchone()
        return bool(row and row["gone"])
    await wait_for(expired, 10, what="the lease to expire")
    while True:  # the database clock moved past lease_until: claimable now
        rows = conn.execute("SELECT * FROM claim_runs(%s, ARRAY['default'], 1, 30)",
                            (new,)).fetchall()
        if rows:
            break
        await asyncio.sleep(0.01)
    (claimed,) = rows
    assert claimed["id"] == run and claimed["lease_epoch"] == epoch + 1
    assert claimed["recoveries"] == 1
    (lost,) = conn.execute("SELECT * FROM heartbeat(%s, ARRAY[%s]::uuid[], ARRAY[%s]::bigint[], "
                           "30)", (old, run, epoch)).fetchall()
    assert (lost["status"], lost["lease_epoch"]) == ("running", epoch + 1)
    assert conn.execute("SELECT journal_step(%s, %s, 0, 's', 0, 'step', 'completed', "
                        "'1'::json, NULL, 1, 1, now()) AS lost",
                        (run, epoch)).fetchone() == {"lost": "running"}
    # The claim wrote its own event row (0012), once.
    events = conn.execute("SELECT from_status, to_status, lease_epoch FROM run_events "
                          "WHERE run_id = %s ORDER BY id", (run,)).fetchall()
    assert [(e["from_status"], e["to_status"], e["lease_epoch"]) for e in events] == [
        (None, "queued", 0), ("queued", "running", epoch), ("running", "running", epoch + 1)]


def _read(conn: psycopg.Connection[Row]) -> int:
    """Rows of ``runs`` read so far in this transaction: by its sequential and
    bitmap scans (counted on the table) and its index scans (on each index)."""
    row = conn.execute(
        "SELECT pg_stat_get_xact_tuples_returned('runs'::regclass) "
        "+ pg_stat_get_xact_tuples_fetched('runs'::regclass) "
        "+ (SELECT coalesce(sum(pg_stat_get_xact_tuples_fetched(i.indexrelid)), 0) "
        "   FROM pg_index i WHERE i.indrelid = 'runs'::regclass) AS n").fetchone()
    assert row is not None
    return int(row["n"])


def _runs_of_another_worker(conn: psycopg.Connection[Row], n: int) -> int:
    """``n`` runs held by another live worker (hour-long leases); ``n``."""
    busy = uuid.uuid4()
    conn.execute("SELECT register_worker(%s, 'test', 1, ARRAY['default'], %s)", (busy, n))
    conn.execute("SELECT start_run(gen_random_uuid(), 'wf', 'default', "
                 "'{\"args\": [], \"kwargs\": {}}'::json) FROM generate_series(1, %s)", (n,))
    assert len(conn.execute("SELECT * FROM claim_runs(%s, ARRAY['default'], %s, 3600)",
                            (busy, n)).fetchall()) == n
    # Without the dead index entries those claims left behind, which the next
    # index scans would visit (fewer each time, as they get marked dead).
    conn.execute("VACUUM ANALYZE runs")
    return n


async def test_a_claim_without_the_expired_scan_reads_no_running_run(
        conn: psycopg.Connection[Row]) -> None:
    """0014: ``p_expired => false`` skips the scan of the queue's running runs
    (every claim made it before, costing 1.5x with 2,000 running runs); with
    the default it still happens and still takes an expired lease."""
    running = _runs_of_another_worker(conn, 300)
    # One run whose lease has already expired, and one queued run.
    _, gone_run, gone_epoch = _claim_one(conn, lease=0.001)
    conn.execute("SELECT start_run(%s, 'wf', 'default', '{\"args\": [], \"kwargs\": {}}'::json)",
                 (uuid.uuid4(),))
    me = uuid.uuid4()
    conn.execute("SELECT register_worker(%s, 'test', 2, ARRAY['default'], 4)", (me,))

    def claim(expired: bool | None) -> tuple[list[Row], int]:
        with conn.transaction():
            before = _read(conn)
            if expired is None:
                rows = conn.execute("SELECT * FROM claim_runs(%s, ARRAY['default'], 5, 30)",
                                    (me,)).fetchall()
            else:
                rows = conn.execute("SELECT * FROM claim_runs(%s, ARRAY['default'], 5, 30, "
                                    "NULL, %s)", (me, expired)).fetchall()
            return rows, _read(conn) - before

    async def lapsed() -> bool:
        row = conn.execute("SELECT lease_until < now() AS gone FROM runs WHERE id = %s",
                           (gone_run,)).fetchone()
        return bool(row and row["gone"])
    await wait_for(lapsed, 10, what="the short lease to expire")

    rows, without = claim(False)
    assert [r["recoveries"] for r in rows] == [0]  # the queued run only
    rows, with_scan = claim(None)  # the default looks, as before 0014
    assert [(r["id"], r["lease_epoch"]) for r in rows] == [(gone_run, gone_epoch + 1)]
    assert with_scan - without >= running, (
        f"rows of runs read: {without} without the expired scan, {with_scan} with it")


async def test_a_worker_looks_for_expired_leases_once_per_poll_interval(
        pgjournal_app: Any) -> None:
    """The worker passes ``expired=True`` on its first claim and then at most
    once per poll interval, whatever the number of claims (and, since 0020, on
    the claim after a look that took a run over); a run whose worker vanished
    is still taken over."""
    import pgjournal

    app = pgjournal_app
    done: list[int] = []

    @app.workflow()
    async def quick(run: pgjournal.Run, i: int) -> int:
        done.append(i)
        return i

    store = await app.store()
    flags: list[tuple[float, bool]] = []
    claim = store.claim

    took_over: set[float] = set()  # looks that took a run over: the next claim looks too

    async def recording(*args: Any, **kw: Any) -> Any:
        at = time.monotonic()
        flags.append((at, bool(kw.get("expired", True))))
        got = await claim(*args, **kw)
        if any(c.recoveries or c.interruptions for c in got):
            took_over.add(at)
        return got

    store.claim = recording  # type: ignore[method-assign]
    poll = 0.5
    # A run of a worker that vanished: claimed by hand, its lease ends mid-way.
    ghost = uuid.uuid4()
    await store.register_worker(ghost, "gone", 1, ["default"], 1, lease=1.0)
    handle = await app.start("quick", -1)
    (orphan,) = await store.claim(ghost, ["default"], 1, 1.0)  # expires mid-way
    assert orphan.run_id == handle.run_id
    async with serving(app, concurrency=2, poll_interval=poll):
        for i in range(40):
            await app.start("quick", i)
            await asyncio.sleep(0.01)

        async def all_done() -> bool:
            return len(done) == 41
        await wait_for(all_done, 30, what="every run, the orphan too")
    recorded = flags[1:]  # the hand-made claim above
    assert recorded and recorded[0][1], "the first claim of a worker looks for expired leases"
    looked = [t for t, e in recorded if e]
    span = recorded[-1][0] - recorded[0][0]
    assert len(recorded) > len(looked), "every claim looked for expired leases"
    assert len(looked) <= span / poll + 1 + len(took_over), (len(looked), span)
    assert all(b - a >= poll * 0.9 for a, b in itertools.pairwise(looked)
               if a not in took_over)
    assert -1 in done  # the orphan was taken over and ran


def test_a_heartbeat_reads_only_the_runs_it_renews(conn: psycopg.Connection[Row]) -> None:
    """0014: a worker's heartbeat finds its runs by id; it used to read every
    running run of every worker (a scan of runs_running hashed for the join)."""
    _runs_of_another_worker(conn, 300)
    me, run, epoch = _claim_one(conn, lease=3600.0)
    conn.execute("VACUUM ANALYZE runs")
    reads = []
    for _ in range(8):  # past the plan cache's switch to the generic plan
        with conn.transaction():
            before = _read(conn)
            lost = conn.execute("SELECT * FROM heartbeat(%s, ARRAY[%s]::uuid[], "
                                "ARRAY[%s]::bigint[], 3600)", (me, run, epoch)).fetchall()
            reads.append(_read(conn) - before)
        assert lost == []
    assert max(reads) < 20, f"rows of runs read per heartbeat of one run: {reads}"
