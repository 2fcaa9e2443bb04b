"""Where child runs meet retries of deadlines, forks and retention (issue 20, rows 3 and 5).

* A child that failed by its deadline, retried as docs/fan-out.md says (the
  child, then the parent), gets its timeout again from the retry: it runs.
* ``pgjournal prune`` never deletes a run an unended run still needs: a
  (grand)child of an unended parent, nor the source of an unended fork and
  the children the fork shares with it, by row batches or by dropping a
  whole history partition.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import serving, wait_for
from .test_children import _q
from .test_partitions import backdate, cli

ENDED = ("completed", "failed", "cancelled", "dead")


@pytest.fixture
def keep_app(pgjournal_dsn: str, pgjournal_schema: str) -> pgjournal.App:
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, poll_interval=0.2)

    @app.workflow()
    async def leaf(run: pgjournal.Run, topic: str) -> str:
        return await run.step("work", lambda: f"note on {topic}")  # type: ignore[no-any-return]

    @app.workflow()
    async def held(run: pgjournal.Run, name: str) -> str:
        await run.wait_signal("go")
        return name

    @app.workflow(max_attempts=1)
    async def strict_timed(run: pgjournal.Run, timeout: float) -> Any:
        kid = await run.spawn("held", "late", timeout=timeout)
        return await kid.result()

    @app.workflow()
    async def middle(run: pgjournal.Run, topic: str) -> str:
        kid = await run.spawn("leaf", topic)
        return await kid.result()  # type: ignore[no-any-return]

    @app.workflow()
    async def patient(run: pgjournal.Run) -> Any:
        """Spawns a child (which spawns its own), waits for a signal, then for the child."""
        kid = await run.spawn("middle", "tides")
        await run.wait_signal("go")
        return await kid.result()

    @app.workflow()
    async def fan_then_signal(run: pgjournal.Run) -> Any:
        kids = await run.spawn_many("leaf", ["a", "b"])
        await run.wait_signal("go")
        return await run.wait_all(kids)

    return app


def status_of(dsn: str, schema: str, run: Any) -> str | None:
    rows = _q(dsn, schema, "SELECT status FROM S.runs WHERE id = %s", run)
    return rows[0][0] if rows else None


async def until(dsn: str, schema: str, sql: str, *args: Any, what: str) -> list[Any]:
    async def check() -> list[Any]:
        return _q(dsn, schema, sql, *args)
    return await wait_for(check, 60, what=what)  # type: ignore[no-any-return]


# -- row 3: retry of a run that ended by its deadline -----------------------------------------

async def test_retrying_a_child_failed_by_its_deadline_then_its_parent_runs_the_child_again(
        keep_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    dsn, s = pgjournal_dsn, pgjournal_schema
    handle = await keep_app.start("strict_timed", 5.0)
    async with serving(keep_app):
        with pytest.raises(pgjournal.RunFailed) as failed:
            await handle.result(timeout=60)
        assert failed.value.error["type"] == "ChildFailed"
        ((kid, error, spawn_deadline),) = _q(
            dsn, s, "SELECT id, error, deadline_at FROM S.runs WHERE parent_run_id = %s",
            handle.run_id)
        assert error["type"] == "TimeoutError"
        # A prune meanwhile keeps the old child: its parent ended after the
        # cutoff, and a retry of the parent waits for the child again.
        with psycopg.connect(dsn, autocommit=True) as conn:
            backdate(conn, s, [kid], 10)
        await asyncio.to_thread(cli, dsn, s, "prune", "--older-than", "7d")
        assert status_of(dsn, s, kid) == "failed", "prune deleted the child of a fresh parent"

        # docs/fan-out.md: retry the child, then the parent.
        await keep_app.retry(kid)
        ((fresh, now),) = _q(dsn, s, "SELECT deadline_at, now() FROM S.runs WHERE id = %s",
                             kid)
        assert fresh > now and fresh > spawn_deadline, (
            f"the retried child kept its past deadline {fresh} (now {now})")
        await until(dsn, s, "SELECT status FROM S.runs WHERE id = %s "
                    "AND status IN ('suspended', 'failed', 'dead')", kid,
                    what="the retried child to wait for its signal or fail")
        assert status_of(dsn, s, kid) == "suspended", _q(
            dsn, s, "SELECT status, error FROM S.runs WHERE id = %s", kid)
        await keep_app.signal(kid, "go")
        assert await keep_app.handle(kid).result(timeout=60) == "late"
        await keep_app.retry(handle.run_id)
        assert await handle.result(timeout=60) == "late"


# -- row 5: prune and the runs an unended run still needs ----------------------------------------

def history_count(dsn: str, schema: str, runs: list[Any]) -> int:
    return int(_q(dsn, schema, "SELECT (SELECT count(*) FROM S.steps WHERE run_id = ANY(%s)) "
                  "+ (SELECT count(*) FROM S.run_events WHERE run_id = ANY(%s))",
                  runs, runs)[0][0])


@pytest.mark.parametrize("how", ["batches", "partition"])
async def test_prune_keeps_the_ended_subtree_of_an_unended_parent(
        keep_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str, how: str) -> None:
    dsn, s = pgjournal_dsn, pgjournal_schema
    handle = await keep_app.start("patient")
    async with serving(keep_app):
        await until(dsn, s, "SELECT 1 FROM S.runs WHERE id = %s AND status = 'suspended' "
                    "AND wait_signal = 'go'", handle.run_id, what="the parent to wait")
        ((kid,),) = await until(dsn, s, "SELECT id FROM S.runs WHERE parent_run_id = %s "
                                "AND status = 'completed'", handle.run_id,
                                what="the child to end")
    ((grandkid,),) = _q(dsn, s, "SELECT id FROM S.runs WHERE parent_run_id = %s", kid)
    assert status_of(dsn, s, grandkid) == "completed"
    subtree = [kid, grandkid]
    before = history_count(dsn, s, subtree)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if how == "batches":
            # The whole tree ended (the parent: started) ten days ago.
            backdate(conn, s, [handle.run_id, *subtree], 10)
        else:
            # The children alone in an old partition of their own, which prune
            # could drop whole; the parent in another one.
            backdate(conn, s, [handle.run_id], 300)
            backdate(conn, s, subtree, 200)
    if how == "partition":
        cli(dsn, s, "maintain")
        # maintain() made partitions for the slots that hold rows; the children
        # wrote no stream chunks, so give that table its partition of their slot
        # too, as create-ahead would have.
        _q(dsn, s, "SELECT S.create_history_partition('stream_chunks', h.lower_bound, "
           "h.upper_bound) FROM S.history_partitions('steps') h JOIN S.runs r "
           "ON r.created_at >= h.lower_bound AND r.created_at < h.upper_bound "
           "WHERE NOT h.is_default AND r.id = %s", kid)
        parts = _q(dsn, s, "SELECT runs FROM S.prunable_partitions(now() - interval '7 days', "
                   "ARRAY['completed', 'failed', 'cancelled', 'dead'])")
        assert parts == [], f"a range holding only a waiting parent's children is prunable: {parts}"
    cli(dsn, s, "prune", "--older-than", "7d")
    assert [status_of(dsn, s, r) for r in subtree] == ["completed", "completed"], (
        "prune deleted the ended subtree of a waiting parent")
    assert history_count(dsn, s, subtree) == before
    async with serving(keep_app):
        await handle.signal("go")
        assert await handle.result(timeout=60) == "note on tides"
    # Once the parent has ended too, the whole tree goes.
    with psycopg.connect(dsn, autocommit=True) as conn:
        backdate(conn, s, [handle.run_id], 300 if how == "partition" else 10)
    cli(dsn, s, "prune", "--older-than", "7d")
    assert _q(dsn, s, "SELECT count(*) FROM S.runs") == [(0,)]


async def test_prune_keeps_the_source_of_an_unended_fork_and_the_children_they_share(
        keep_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    dsn, s = pgjournal_dsn, pgjournal_schema
    source = await keep_app.start("fan_then_signal")
    async with serving(keep_app):
        await until(dsn, s, "SELECT 1 FROM S.runs WHERE id = %s AND wait_signal = 'go'",
                    source.run_id, what="the source to wait")
        await source.signal("go")
        assert await source.result(timeout=60) == ["note on a", "note on b"]
        # The fork copies the spawn (position 0), shares the two children and
        # waits for its own signal before waiting for them.
        fork = await keep_app.fork(source.run_id, from_step=1)
        await until(dsn, s, "SELECT 1 FROM S.runs WHERE id = %s AND wait_signal = 'go'",
                    fork.run_id, what="the fork to wait")
    kids = [r[0] for r in _q(dsn, s, "SELECT id FROM S.runs WHERE parent_run_id = %s",
                             source.run_id)]
    assert len(kids) == 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        backdate(conn, s, [source.run_id, *kids], 10)
    cli(dsn, s, "prune", "--older-than", "7d")
    assert [status_of(dsn, s, r) for r in [source.run_id, *kids]] == ["completed"] * 3, (
        "prune deleted what an unended fork shares with its source")
    async with serving(keep_app):
        await fork.signal("go")
        assert await fork.result(timeout=60) == ["note on a", "note on b"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        backdate(conn, s, [fork.run_id], 10)
    cli(dsn, s, "prune", "--older-than", "7d")
    assert _q(dsn, s, "SELECT count(*) FROM S.runs") == [(0,)]


async def test_prune_waits_for_a_fork_being_made_of_its_candidate(
        keep_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """A fork made while prune looks at its source: the fork's transaction holds
    the source, so the prune batch passes it by (and its children, which the
    fork shares) instead of deleting what the fork will wait for."""
    dsn, s = pgjournal_dsn, pgjournal_schema
    source = await keep_app.start("fan_then_signal")
    async with serving(keep_app):
        await until(dsn, s, "SELECT 1 FROM S.runs WHERE id = %s AND wait_signal = 'go'",
                    source.run_id, what="the source to wait")
        await source.signal("go")
        await source.result(timeout=60)
    kids = [r[0] for r in _q(dsn, s, "SELECT id FROM S.runs WHERE parent_run_id = %s",
                             source.run_id)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        backdate(conn, s, [source.run_id, *kids], 10)
    new = uuid.uuid4()
    with psycopg.connect(dsn) as forking:
        forking.execute(f'SELECT "{s}".fork_run(%s, 1, %s)', (source.run_id, new))
        # The fork is not committed yet; prune runs now, in another session.
        res = await asyncio.to_thread(cli, dsn, s, "prune", "--older-than", "7d")
        forking.commit()
    assert res.returncode == 0
    assert [status_of(dsn, s, r) for r in [source.run_id, *kids]] == ["completed"] * 3
    assert status_of(dsn, s, new) == "queued"


async def test_a_retry_counts_the_timeout_again_capped_by_an_unended_parents_deadline(
        keep_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """The deadline rule is remembered at insert (trigger runs_deadline_rule); a
    retry counts it from the retry, but never past the deadline of a parent
    that has not ended (a subtree never outlives its root's time)."""
    dsn, s = pgjournal_dsn, pgjournal_schema
    parent, kid = uuid.uuid4(), uuid.uuid4()
    _q(dsn, s, "INSERT INTO S.runs (id, workflow, queue, status, deadline_at) "
       "VALUES (%s, 'held', 'default', 'suspended', now() + interval '100 s')", parent)
    _q(dsn, s, "INSERT INTO S.runs (id, workflow, queue, status, parent_run_id, deadline_at, "
       "finished_at) VALUES (%s, 'held', 'default', 'failed', %s, now() + interval '1000 s', "
       "now())", kid, parent)
    assert _q(dsn, s, "SELECT deadline_seconds FROM S.runs WHERE id = %s", kid) == [(1000.0,)]
    await keep_app.retry(kid)
    ((capped, parent_deadline),) = _q(
        dsn, s, "SELECT c.deadline_at, p.deadline_at FROM S.runs c JOIN S.runs p "
        "ON p.id = c.parent_run_id WHERE c.id = %s", kid)
    assert capped == parent_deadline
    # The parent ended: the retry gets its whole timeout again.
    _q(dsn, s, "UPDATE S.runs SET status = 'failed', finished_at = now(), due_at = NULL "
       "WHERE id IN (%s, %s)", parent, kid)
    await keep_app.retry(kid)
    ((left,),) = _q(dsn, s, "SELECT extract(epoch FROM deadline_at - now()) FROM S.runs "
                    "WHERE id = %s", kid)
    assert float(left) == pytest.approx(1000.0, abs=1.0)
