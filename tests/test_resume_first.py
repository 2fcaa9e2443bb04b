"""Work in progress first (issue 20, item 3; migration 0020).

At equal priority a claim takes a run that already started (its timer is due,
its signal arrived, its children ended, its lease expired) ahead of runs that
never started, however long those have been waiting. Before 0020 the claim
ordered by (priority, due time), and a resumption's due time is when it
became due: a backlog of runs enqueued earlier was served first, so under
load timers fired late and crashed runs were taken over late.

Every test drives the SQL functions the worker calls, on a real server, in a
fixed order; nothing depends on timing except waiting (by asking the
database) for a short timer or lease to pass.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from tests.conftest import lease_expired, wait_for

Row = dict[str, Any]
INPUT = '{"args": [], "kwargs": {}}'


@pytest.fixture
def conn(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[psycopg.Connection[Row]]:
    with psycopg.connect(pgjournal_dsn, autocommit=True, row_factory=dict_row) as c:
        c.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pgjournal_schema)))
        yield c


def _start(conn: psycopg.Connection[Row], queue: str = "default", priority: int = 0) -> uuid.UUID:
    run = uuid.uuid4()
    conn.execute("SELECT start_run(%s, 'wf', %s, %s::json, %s)", (run, queue, INPUT, priority))
    return run


def _worker(conn: psycopg.Connection[Row]) -> uuid.UUID:
    worker = uuid.uuid4()
    conn.execute("SELECT register_worker(%s, 'test', 1, ARRAY['default', 'kids'], 10)",
                 (worker,))
    return worker


def _claim(conn: psycopg.Connection[Row], worker: uuid.UUID, limit: int = 1,
           lease: float = 60.0, queue: str = "default") -> list[Row]:
    return conn.execute("SELECT * FROM claim_runs(%s, ARRAY[%s], %s, %s, NULL, true)",
                        (worker, queue, limit, lease)).fetchall()


async def _until(conn: psycopg.Connection[Row], query: str, run: uuid.UUID, what: str) -> None:
    async def check() -> bool:
        row = conn.execute(query, (run,)).fetchone()
        return bool(row and row["ok"])
    await wait_for(check, 30, what=what)


async def _resumption(conn: psycopg.Connection[Row], kind: str,
                      backlog: int = 3) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A run that started, then ``backlog`` new runs enqueued, then the first
    run becomes claimable again in the way ``kind`` says: its due time is
    later than every new run's. Returns (the started run, the new runs)."""
    worker = _worker(conn)
    run = _start(conn)
    lease = 1.0 if kind == "lease expired" else 60.0
    (claimed,) = _claim(conn, worker, lease=lease)
    assert claimed["id"] == run
    epoch = int(claimed["lease_epoch"])
    fresh = [_start(conn) for _ in range(backlog)]
    if kind == "timer due":
        (row,) = conn.execute("SELECT outcome FROM sleep_until(%s, %s, 0, 'nap', 0, 0.2, NULL, 1)",
                              (run, epoch)).fetchall()
        assert row["outcome"] == "suspended"
        await _until(conn, "SELECT due_at <= now() AS ok FROM runs WHERE id = %s", run,
                     "the timer to be due")
    elif kind == "signal arrived":
        (row,) = conn.execute("SELECT outcome FROM wait_signal(%s, %s, 0, 'go', 0, NULL, 1)",
                              (run, epoch)).fetchall()
        assert row["outcome"] == "suspended"
        conn.execute("SELECT send_signal(%s, 'go', '1'::json, NULL)", (run,))
    elif kind == "children ended":
        kid = uuid.uuid4()
        (row,) = conn.execute(
            "SELECT spawn_runs(%s, %s, 0, 'c', 0, 1, 0, 0, NULL, %s, 'c', 'kids', "
            "ARRAY['{}']::json[], 3, 5, NULL) AS lost", (run, epoch, [kid])).fetchall()
        assert row["lost"] is None
        (row,) = conn.execute(
            "SELECT outcome FROM wait_children(%s, %s, 1, 'wait_all', 0, 1, 1, 1, %s, 'all')",
            (run, epoch, [kid])).fetchall()
        assert row["outcome"] == "suspended"
        (child,) = _claim(conn, worker, queue="kids")
        conn.execute("SELECT complete_runs(%s, %s, %s::json[])",
                     ([kid], [child["lease_epoch"]], [json.dumps("done")]))
    elif kind == "lease expired":
        await _until(conn, "SELECT lease_until <= now() AS ok FROM runs WHERE id = %s", run,
                     "the lease to expire")
    else:
        raise AssertionError(kind)
    (row,) = conn.execute(
        "SELECT bool_and(f.due_at < coalesce(r.due_at, r.lease_until)) AS later "
        "FROM runs r, runs f WHERE r.id = %s AND f.id = ANY (%s)", (run, fresh)).fetchall()
    assert row["later"], "the resumption must have become due after the new runs"
    return run, fresh


KINDS = ["timer due", "signal arrived", "children ended", "lease expired"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_resumption_is_claimed_before_older_new_runs(
        conn: psycopg.Connection[Row], kind: str) -> None:
    """The started run comes first, then the new runs in the order they came
    (claimed one at a time: a batch comes back in no particular order)."""
    run, fresh = await _resumption(conn, kind)
    worker = _worker(conn)
    first = _claim(conn, worker)
    assert [r["id"] for r in first] == [run], (
        f"{kind}: a claim of one took {[r['id'] for r in first]}, not the resumed run {run} "
        f"(new runs, oldest first: {fresh})")
    rest = [_claim(conn, worker)[0]["id"] for _ in fresh]
    assert rest == fresh


@pytest.mark.parametrize("kind", ["timer due", "lease expired"])
async def test_a_batch_puts_the_resumption_first_and_fills_up_with_new_runs(
        conn: psycopg.Connection[Row], kind: str) -> None:
    """A batch larger than the resumptions takes them and then the oldest new runs."""
    run, fresh = await _resumption(conn, kind, backlog=4)
    got = _claim(conn, _worker(conn), limit=3)
    assert {r["id"] for r in got} == {run, *fresh[:2]}


async def test_priority_still_comes_before_resumption(conn: psycopg.Connection[Row]) -> None:
    """Priority first: a new run of a higher priority goes ahead of a resumption,
    and a resumption ahead of new runs of its own priority."""
    run, fresh = await _resumption(conn, "signal arrived")
    urgent = _start(conn, priority=5)
    lesser = _start(conn, priority=-1)
    worker = _worker(conn)
    got = [_claim(conn, worker)[0]["id"] for _ in range(len(fresh) + 3)]
    assert got == [urgent, run, *fresh, lesser]


async def test_older_resumptions_first(conn: psycopg.Connection[Row]) -> None:
    """Among resumptions, the one due longest comes first."""
    worker = _worker(conn)
    a, b = _start(conn), _start(conn)
    claimed = {r["id"]: int(r["lease_epoch"]) for r in _claim(conn, worker, limit=2)}
    _start(conn)
    for run in (b, a):  # b waits first, so it is due first
        conn.execute("SELECT outcome FROM wait_signal(%s, %s, 0, 'go', 0, NULL, 1)",
                     (run, claimed[run]))
        conn.execute("SELECT send_signal(%s, 'go', '1'::json, NULL)", (run,))
    got = [_claim(conn, worker)[0]["id"] for _ in range(2)]
    assert got == [b, a]


def _index_blocks(conn: psycopg.Connection[Row]) -> int:
    """Blocks of the indexes of ``runs`` read so far in this transaction."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_stat_get_xact_blocks_fetched(i.indexrelid)), 0) AS n "
        "FROM pg_index i WHERE i.indrelid = 'runs'::regclass").fetchone()
    assert row is not None
    return int(row["n"])


def test_sleeping_runs_cost_a_claim_nothing(conn: psycopg.Connection[Row]) -> None:
    """A claim reads no index entry of a run that is not due yet. 20,000 runs
    sleeping for an hour in the queue: a claim that comes back short (one run
    due, a batch of ten asked) reads as many index blocks as without them.
    The claim of 0014 read every one of them whenever it came back short
    (its index scan had no bound on the due time: priority came first)."""
    worker = _worker(conn)

    def claim_blocks() -> int:
        _start(conn)
        with conn.transaction():
            before = _index_blocks(conn)
            got = _claim(conn, worker, limit=10, queue="default")
            used = _index_blocks(conn) - before
        assert len(got) == 1
        conn.execute("UPDATE runs SET status = 'completed', due_at = NULL, finished_at = now() "
                     "WHERE id = %s", (got[0]["id"],))
        return used

    # The least of three: a claim right after the statistics change plans anew
    # (planning reads index pages too), and autovacuum may analyze any time.
    for _ in range(2):  # warm the plans and caches
        claim_blocks()
    alone = min(claim_blocks() for _ in range(3))
    conn.execute("INSERT INTO runs (id, workflow, queue, status, due_at, started_at) "
                 "SELECT gen_random_uuid(), 'wf', 'default', 'suspended', "
                 "now() + interval '1 hour' + g * interval '1 ms', now() "
                 "FROM generate_series(1, 20000) AS g")
    conn.execute("VACUUM ANALYZE runs")
    with_sleepers = min(claim_blocks() for _ in range(3))
    assert with_sleepers - alone < 10, (
        f"index blocks read by a claim: {alone} alone, {with_sleepers} beside 20,000 "
        "sleeping runs")


async def test_the_lag_of_resumptions_is_shown_apart_from_new_runs(
        conn: psycopg.Connection[Row], pgjournal_app: Any, pgjournal_dsn: str,
        pgjournal_schema: str) -> None:
    """queue_depth, the metrics and ``pgjournal queues`` count and age the due
    resumptions and the due new runs apart (each kind's oldest due time)."""
    from pgjournal.metrics import collect
    from tests.test_cli import run_cli

    run, _fresh = await _resumption(conn, "signal arrived", backlog=2)
    (q,) = conn.execute("SELECT *, oldest_new_age > oldest_resumption_age AS new_older "
                        "FROM queue_depth WHERE queue = 'default'").fetchall()
    assert (q["resumptions_due"], q["new_due"], q["queued_due"]) == (1, 2, 3)
    assert q["new_older"], q
    # The oldest new run is exactly as old as the queue's lag; the resumption is younger.
    with conn.transaction():  # one now()
        (ages,) = conn.execute(
            "SELECT now() - min(due_at) FILTER (WHERE id <> %s) AS new_age, "
            "now() - min(due_at) FILTER (WHERE id = %s) AS resumption_age "
            "FROM runs WHERE status = 'queued'", (run, run)).fetchall()
        (q,) = conn.execute("SELECT * FROM queue_depth WHERE queue = 'default'").fetchall()
    assert q["oldest_new_age"] == ages["new_age"] == q["oldest_due_age"]
    assert q["oldest_resumption_age"] == ages["resumption_age"]

    text = await collect(pgjournal_app)
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("pgjournal_queue_")}
    assert samples['pgjournal_queue_due_runs{queue="default",kind="resumption"}'] == 1
    assert samples['pgjournal_queue_due_runs{queue="default",kind="new"}'] == 2
    assert (samples['pgjournal_queue_lag_seconds{queue="default",kind="new"}']
            > samples['pgjournal_queue_lag_seconds{queue="default",kind="resumption"}'] > 0)

    out = run_cli("--dsn", pgjournal_dsn, "--schema", pgjournal_schema, "queues",
                  env={"NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr
    header, line = out.stdout.splitlines()[:2]
    assert "RESUMING (LAG)" in header and "NEW (LAG)" in header, header
    cells = line.split()
    assert cells[0] == "default" and "1" in cells and "2" in cells, line

    # Claimed, the resumption leaves its kind empty (age NULL, metric 0).
    _claim(conn, _worker(conn))
    (q,) = conn.execute("SELECT * FROM queue_depth WHERE queue = 'default'").fetchall()
    assert (q["resumptions_due"], q["oldest_resumption_age"], q["new_due"]) == (0, None, 2)


async def test_a_busy_worker_takes_over_every_run_of_a_dead_one_at_once(
        pgjournal_app: Any) -> None:
    """A worker looks for expired leases once per poll interval, and claims only
    as many runs as it has free slots: with one slot and an hour-long poll
    interval, its first claim took over one run of a dead worker and the other
    two waited an hour. After a look that took a run over, the next claim looks
    again, so all three are taken over as slots free up."""
    import pgjournal
    from tests.conftest import serving

    app = pgjournal_app
    done: list[int] = []

    @app.workflow()
    async def quick(run: pgjournal.Run, i: int) -> int:
        done.append(i)
        return i

    store = await app.store()
    ghost = uuid.uuid4()
    await store.register_worker(ghost, "gone", 1, ["default"], 3, lease=0.5)
    for i in range(3):
        await app.start("quick", i)
    orphans = await store.claim(ghost, ["default"], 3, 0.5)
    assert len(orphans) == 3

    async def lapsed() -> bool:
        return all([await lease_expired(store, o.run_id) for o in orphans])
    await wait_for(lapsed, 30, what="the dead worker's leases to expire")
    async with serving(app, concurrency=1, poll_interval=3600):
        async def all_done() -> bool:
            return len(done) == 3
        await wait_for(all_done, 60, what="all three runs of the dead worker to be taken over "
                                         "(without the look-again, two wait a poll interval: "
                                         "an hour)")


def test_across_queues_a_resumption_comes_first(conn: psycopg.Connection[Row]) -> None:
    """A worker serving two queues: a resumption of one goes ahead of an older
    new run of the other (the claim merges its queues in the same order)."""
    worker = _worker(conn)
    run = _start(conn, queue="default")
    (claimed,) = _claim(conn, worker)
    older = _start(conn, queue="other")
    conn.execute("SELECT outcome FROM wait_signal(%s, %s, 0, 'go', 0, NULL, 1)",
                 (run, claimed["lease_epoch"]))
    conn.execute("SELECT send_signal(%s, 'go', '1'::json, NULL)", (run,))
    got = [conn.execute("SELECT id FROM claim_runs(%s, ARRAY['other', 'default'], 1, 60)",
                        (worker,)).fetchall()[0]["id"] for _ in range(2)]
    assert got == [run, older]
