"""Flow control: concurrency keys (limits across workers, no head-of-line blocking)
and rate buckets (units shared by every worker), checked from the database's own
timestamps."""

from __future__ import annotations

import asyncio
import signal
import threading
from datetime import datetime
from typing import Any

import psycopg
import pytest

import pgjournal

from .conftest import Effects, lease_expired, serving, wait_for


def _q(dsn: str, schema: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.replace("S.", f'"{schema}".'), args)
        return cur.fetchall() if cur.description else []


class RunningSampler:
    """Reads, as fast as it can on its own connection, how many runs of each
    concurrency key are running: each read is one consistent snapshot of the
    database, so a count over the limit is a real violation (run_events times
    are transaction start times, and would show overlaps that never were)."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self.most: dict[str, int] = {}
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                for key, n in conn.execute(
                        f'SELECT concurrency_key, count(*) FROM "{self.schema}".runs '
                        "WHERE status = 'running' AND concurrency_key IS NOT NULL "
                        "GROUP BY 1").fetchall():
                    self.most[key] = max(self.most.get(key, 0), n)
                self.reads += 1

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def hot_done_before_cold(dsn: str, schema: str, hot: str) -> int:
    """How many runs of the hot key had finished when the last other run finished
    (the database's finish times: not when the test got around to reading them)."""
    return int(_q(dsn, schema, """
        SELECT count(*) FROM S.runs h
        WHERE h.concurrency_key = %s AND h.status = 'completed'
          AND h.finished_at < (SELECT max(c.finished_at) FROM S.runs c
                               WHERE c.concurrency_key <> %s)""", hot, hot)[0][0])


async def both_workers_up(dsn: str, schema: str) -> None:
    """Two worker processes registered (both can take part before runs exist)."""
    async def up() -> bool:
        return _q(dsn, schema, "SELECT count(*) FROM S.workers WHERE stopped_at IS NULL")[0][0] \
            >= 2
    await wait_for(up, 60, what="both worker processes to register")


def ready_times(dsn: str, schema: str) -> list[tuple[datetime, float]]:
    """When each take's units were ready, as the database reckoned them (journaled
    with the take): the bucket's own accounting, which no worker delay bends.
    A take taken again for a retried call keeps its earlier takes in ``earlier``."""
    return [(t, float(u)) for t, u in _q(dsn, schema, """
        SELECT (output->>'ready_at')::timestamptz, (output->>'units')::float
        FROM S.steps WHERE kind = 'rate' AND name LIKE 'rate:%%'
        UNION ALL
        SELECT (e->>'ready_at')::timestamptz, (e->>'units')::float
        FROM S.steps s CROSS JOIN LATERAL json_array_elements(s.output->'earlier') AS e
        WHERE s.kind = 'rate' AND s.name LIKE 'rate:%%'
        ORDER BY 1""")]


def started_before_ready(dsn: str, schema: str, started: str) -> list[Any]:
    """Steps that started before their take's units were ready (``started``: the
    SQL of a step's start, over ``s`` the step entry of run ``s.run_id``)."""
    return _q(dsn, schema, f"""
        SELECT s.run_id, s.name FROM S.steps s
        JOIN S.steps r ON r.run_id = s.run_id AND r.kind = 'rate'
                      AND r.position = s.position - 1
        WHERE s.kind = 'step'
          AND {started} < (r.output->>'ready_at')::timestamptz - interval '5 ms'""")


def check_rate_windows(starts: list[tuple[datetime, float]], capacity: float,
                       refill: float, slack: float = 0.05) -> None:
    """No window [t_i, t_j] holds more units than capacity + refill * (t_j - t_i)."""
    starts = sorted(starts)
    for i, (ti, _) in enumerate(starts):
        total = 0.0
        for tj, units in starts[i:]:
            total += units
            allowed = capacity + refill * ((tj - ti).total_seconds() + slack)
            assert total <= allowed + 1e-6, (
                f"{total} units started in {(tj - ti).total_seconds():.3f}s > {allowed}")


@pytest.fixture
def flow_app(pgjournal_dsn: str, pgjournal_schema: str) -> pgjournal.App:
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, poll_interval=0.2)

    @app.workflow()
    async def job(run: pgjournal.Run, hold: float) -> str:
        await asyncio.sleep(hold)
        return "ok"

    @app.workflow()
    async def waits(run: pgjournal.Run) -> Any:
        return await run.wait_signal("go")

    @app.workflow()
    async def llm(run: pgjournal.Run, used: int | None) -> Any:
        def call() -> dict[str, Any]:
            return {"text": "hi", "usage": used}
        if used is None:
            return await run.step("call", call, rate=("tpm", 50))
        out = await run.step("call", call, rate=("tpm", 50, lambda r: r["usage"]))
        return out

    @app.workflow()
    async def parallel_llm(run: pgjournal.Run, n: int) -> list[Any]:
        def call(i: int) -> int:
            return i
        return list(await asyncio.gather(*[
            run.step(f"call-{i}", call, i, rate=("tpm", 40)) for i in range(n)]))

    return app


async def test_cold_keys_are_not_blocked_behind_a_saturated_hot_key(
        flow_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = flow_app
    await app.set_concurrency_limit("tenant-*", 3)
    hot = [await app.start("job", 0.05, concurrency_key="tenant-hot") for _ in range(300)]
    cold = [await app.start("job", 0.05, concurrency_key=f"tenant-c{k}")
            for k in range(10) for _ in range(10)]
    with RunningSampler(pgjournal_dsn, pgjournal_schema) as sampler:
        async with serving(app, concurrency=12, lease=10):
            for h in cold:
                assert await h.result(timeout=120) == "ok"
            done_hot = hot_done_before_cold(pgjournal_dsn, pgjournal_schema, "tenant-hot")
            for h in hot:
                await h.cancel()
    assert done_hot < 150, f"the cold keys waited behind the hot one ({done_hot} hot done)"
    assert max(sampler.most.values()) <= 3, sampler.most
    assert sampler.most["tenant-hot"] == 3  # the limit was reached, not just respected


async def test_exact_key_beats_prefix_and_no_limit_means_unlimited(
        flow_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = flow_app
    await app.set_concurrency_limit("t-*", 2)
    await app.set_concurrency_limit("t-vip", 5)
    runs = [await app.start("job", 0.3, concurrency_key=k)
            for k in ["t-vip"] * 8 + ["t-a"] * 6 + ["free"] * 6]
    with RunningSampler(pgjournal_dsn, pgjournal_schema) as sampler:
        async with serving(app, concurrency=20, lease=10):
            for h in runs:
                await h.result(timeout=60)
    assert sampler.most == {"t-vip": 5, "t-a": 2, "free": 6}, sampler.most
    with pytest.raises(pgjournal.ConfigurationError):
        await app.set_concurrency_limit("a*b", 1)
    with pytest.raises(pgjournal.ConfigurationError):
        await app.set_concurrency_limit("x", 0)


async def test_suspended_runs_hold_no_slot_of_their_key(
        flow_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = flow_app
    await app.set_concurrency_limit("solo", 1)
    waiting = await app.start("waits", concurrency_key="solo")
    async with serving(app, concurrency=4):
        async def suspended() -> bool:
            return await waiting.status() == "suspended"
        await wait_for(suspended, 30, what="the first run to wait for its signal")
        other = await app.start("job", 0.0, concurrency_key="solo")
        assert await other.result(timeout=30) == "ok"
        await app.signal(waiting.run_id, "go", 1)
        assert await waiting.result(timeout=30) == 1
    rows = _q(pgjournal_dsn, pgjournal_schema, "SELECT * FROM S.concurrency_keys")
    assert rows == []  # nothing unfinished is left under a key


async def test_rate_bucket_paces_steps_across_runs_and_corrects_usage(
        flow_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = flow_app
    await app.set_rate_limit("tpm", capacity=100, refill_per_second=100)
    runs = [await app.start("llm", None) for _ in range(8)]   # 400 units
    async with serving(app, concurrency=8):
        for h in runs:
            await h.result(timeout=60)
        starts = ready_times(pgjournal_dsn, pgjournal_schema)
        check_rate_windows(starts, 100, 100)
        assert started_before_ready(pgjournal_dsn, pgjournal_schema, "s.started_at") == []
        span = (starts[-1][0] - starts[0][0]).total_seconds()
        assert span >= (400 - 100) / 100 - 0.1
        # The longest waits were spent suspended (no worker held), not in a slot.
        suspended = _q(pgjournal_dsn, pgjournal_schema,
                       "SELECT count(DISTINCT run_id) FROM S.run_events "
                       "WHERE to_status = 'suspended'")[0][0]
        assert suspended >= 1
        # Usage correction: a step that took 50 but used 10 gives 40 back.
        await app.set_rate_limit("tpm", None)
        await app.set_rate_limit("tpm", capacity=1000, refill_per_second=0.001)
        h = await app.start("llm", 10)
        assert (await h.result(timeout=30))["usage"] == 10
    after = _q(pgjournal_dsn, pgjournal_schema,
               "SELECT available FROM S.rate_limits WHERE name = 'tpm'")[0][0]
    entries = _q(pgjournal_dsn, pgjournal_schema,
                 "SELECT s.name, (s.output->>'units')::float FROM S.steps s "
                 "WHERE s.run_id = %s AND s.kind = 'rate' ORDER BY position", h.run_id)
    assert entries == [("rate:tpm", 50.0), ("usage:tpm", -40.0)]
    assert after == pytest.approx(990, abs=1.0)


async def test_parallel_rate_limited_steps_wait_in_the_worker(
        flow_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = flow_app
    await app.set_rate_limit("tpm", capacity=80, refill_per_second=200)
    h = await app.start("parallel_llm", 6)   # 240 units: 80 at once, then 200/s
    async with serving(app):
        assert await h.result(timeout=30) == list(range(6))
    starts = ready_times(pgjournal_dsn, pgjournal_schema)
    assert len(starts) == 6
    check_rate_windows(starts, 80, 200)
    assert started_before_ready(pgjournal_dsn, pgjournal_schema, "s.started_at") == []


async def test_unknown_bucket_fails_the_step_clearly(flow_app: pgjournal.App) -> None:
    h = await flow_app.start("llm", None)
    async with serving(flow_app):
        with pytest.raises(pgjournal.RunFailed) as info:
            await h.result(timeout=30)
    assert "no rate bucket named tpm" in str(info.value)


async def test_key_limit_holds_across_worker_processes(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Any, spawn_worker: Any) -> None:
    """Two worker processes claim runs of one key concurrently: never more than
    its limit run at once (from run_events), and cold keys are not held up."""
    app = pgjournal_app
    await app.set_concurrency_limit("k-*", 2)
    with RunningSampler(pgjournal_dsn, pgjournal_schema) as sampler:
        spawn_worker(concurrency=6)
        spawn_worker(concurrency=6)
        await both_workers_up(pgjournal_dsn, pgjournal_schema)
        hot = [await app.start("keyed", 0.2, concurrency_key="k-hot") for _ in range(40)]
        cold = [await app.start("keyed", 0.2, concurrency_key=f"k-{i}") for i in range(6)]
        for h in cold:
            assert await h.result(timeout=60) == "done"
        hot_done = hot_done_before_cold(pgjournal_dsn, pgjournal_schema, "k-hot")
        for h in hot:
            assert await h.result(timeout=120) == "done"
    assert hot_done < 30, hot_done
    assert sampler.most["k-hot"] == 2 and max(sampler.most.values()) == 2, sampler.most
    pids = {p for _r, _s, p in effects.rows()}
    assert len(pids) == 2  # both processes took part


async def test_rate_limit_holds_across_worker_processes(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Any, spawn_worker: Any) -> None:
    """50 runs on 2 worker processes share one bucket: from the database's own
    timestamps no window started more units than the bucket allows, and the
    whole took about the minimum the limit allows."""
    app = pgjournal_app
    capacity, refill, units, n = 100.0, 200.0, 20, 50   # 1,000 units: >= 4.5 s
    await app.set_rate_limit("api", capacity=capacity, refill_per_second=refill)
    spawn_worker(concurrency=8)
    spawn_worker(concurrency=8)
    await both_workers_up(pgjournal_dsn, pgjournal_schema)
    runs = [await app.start("metered", "api", units) for _ in range(n)]
    for h in runs:
        assert await h.result(timeout=120) == "call"
    # The bucket's accounting, from the times the database journaled with each
    # take; and no step called before its units were ready (its side effect's
    # own database time against its take's ready_at).
    starts = ready_times(pgjournal_dsn, pgjournal_schema)
    assert len(starts) == n
    check_rate_windows(starts, capacity, refill)
    early = _q(pgjournal_dsn, pgjournal_schema, """
        SELECT e.run_id FROM S.test_effects e
        JOIN S.steps r ON r.run_id::text = e.run_id AND r.kind = 'rate'
        WHERE e.step = 'call' AND e.at < (r.output->>'ready_at')::timestamptz
                                          - interval '5 ms'""")
    assert early == []
    span = (starts[-1][0] - starts[0][0]).total_seconds()
    minimum = (n * units - capacity) / refill
    assert minimum - 0.1 <= span <= 2 * minimum + 3, (span, minimum)
    assert len({p for _r, _s, p in effects.rows()}) == 2


def test_cli_limits_sets_shows_and_lifts(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    from .test_cli import run_cli

    def cli(*args: str, code: int = 0) -> str:
        res = run_cli("limits", *args, "--dsn", pgjournal_dsn, "--schema", pgjournal_schema)
        assert res.returncode == code, res.stderr
        return res.stdout + res.stderr

    assert "at most 3 running" in cli("key", "tenant-*", "3")
    assert "90000/60" in cli("rate", "openai-tpm", "90000/60")
    shown = cli()
    assert "tenant-*" in shown and "openai-tpm" in shown and "1500/s" in shown
    assert "not a number" in cli("key", "tenant-*", "lots", code=1)
    assert "UNITS/SECONDS" in cli("rate", "x", "fast", code=1)
    assert "no limit" in cli("key", "tenant-*", "none")
    assert "removed" in cli("rate", "openai-tpm", "none")
    assert _q(pgjournal_dsn, pgjournal_schema, "SELECT count(*) FROM S.concurrency_limits") \
        == [(0,)]


def _available(dsn: str, schema: str, bucket: str) -> float:
    return float(_q(dsn, schema, "SELECT available FROM S.rate_limits WHERE name = %s",
                    bucket)[0][0])


async def test_a_take_survives_kill9_and_is_not_taken_again(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Any, spawn_worker: Any, tmp_path: Any) -> None:
    """The worker dies inside the step, after its take was journaled: the next
    worker replays the take (no second debit) and runs the step."""
    app = pgjournal_app
    await app.set_rate_limit("api", capacity=100, refill_per_second=0.001)
    h = await app.start("metered", "api", 30)
    gate = tmp_path / "gate"
    first = spawn_worker(env={"PGJ_GATE": f"call:{gate}"}, concurrency=1, lease=2)
    await effects.wait(h.run_id, "call")
    first.kill(signal.SIGKILL)
    first.wait()
    spawn_worker(concurrency=1, lease=2)
    assert await h.result(timeout=60) == "call"
    assert effects.count(h.run_id, "call") == 2         # the step ran again ...
    takes = _q(pgjournal_dsn, pgjournal_schema,
               "SELECT count(*) FROM S.steps WHERE run_id = %s AND kind = 'rate'", h.run_id)
    assert takes == [(1,)]                               # ... the take did not
    assert _available(pgjournal_dsn, pgjournal_schema, "api") == pytest.approx(70, abs=0.5)


async def test_a_worker_paused_past_its_lease_takes_nothing(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Any, spawn_worker: Any, tmp_path: Any) -> None:
    """The worker stops (SIGSTOP) in the step after its take; another worker
    finishes the run; the stale one, resumed, writes nothing and takes nothing."""
    app = pgjournal_app
    store = await app.store()
    await app.set_rate_limit("api", capacity=100, refill_per_second=0.001)
    h = await app.start("metered", "api", 30)
    gate = tmp_path / "gate"
    stale = spawn_worker(env={"PGJ_GATE": f"call:{gate}"}, concurrency=1, lease=1)
    await effects.wait(h.run_id, "call")
    stale.kill(signal.SIGSTOP)
    await wait_for(lambda: lease_expired(store, h.run_id), 30, what="lease expiry")
    spawn_worker(concurrency=1, lease=5)
    assert await h.result(timeout=60) == "call"
    gate.touch()
    stale.kill(signal.SIGCONT)

    async def gave_up() -> bool:
        return "lost the lease" in stale.output()

    await wait_for(gave_up, 30, what="the stale worker to give the run up")
    assert _q(pgjournal_dsn, pgjournal_schema,
              "SELECT count(*) FROM S.steps WHERE run_id = %s AND kind = 'rate'",
              h.run_id) == [(1,)]
    assert _available(pgjournal_dsn, pgjournal_schema, "api") == pytest.approx(70, abs=0.5)


async def test_a_run_waiting_for_its_bucket_resumes_after_a_server_restart(
        pgjournal_server_factory: Any, spawn_worker: Any) -> None:
    server = pgjournal_server_factory(settings={})
    schema = "rate_restart"
    pgjournal.migrate(server.dsn, schema=schema)
    Effects(server.dsn, schema)
    app = pgjournal.App(server.dsn, schema=schema, poll_interval=0.2)
    try:
        await app.set_rate_limit("api", capacity=100, refill_per_second=25)
        first = await app.start("metered", "api", 100)
        second = await app.start("metered", "api", 100)   # ready 4 s after the first
        spawn_worker(dsn=server.dsn, schema=schema, concurrency=2, lease=3)

        async def waiting() -> bool:
            # Whichever took its units second waits for the refill.
            return sorted([await first.status(), await second.status()]) == \
                ["completed", "suspended"]

        await wait_for(waiting, 60, what="one run to wait for the refill")
        server.stop()
        server.start()
        assert await first.result(timeout=60) == "call"
        assert await second.result(timeout=60) == "call"
        rows = _q(server.dsn, schema,
                  "SELECT r.id, s.started_at FROM S.steps s JOIN S.runs r ON r.id = s.run_id "
                  "WHERE s.kind = 'step' ORDER BY s.started_at")
        assert {r[0] for r in rows} == {first.run_id, second.run_id}
        assert (rows[1][1] - rows[0][1]).total_seconds() >= 4 - 0.1
        assert _q(server.dsn, schema,
                  "SELECT count(*) FROM S.steps WHERE kind = 'rate'") == [(2,)]
    finally:
        await app.close()


async def test_start_many_keys_every_run_or_each_run(
        flow_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    app = flow_app
    one = await app.start_many("job", [0.0, 0.0], concurrency_key="t-1")
    each = await app.start_many("job", [0.0, 0.0, 0.0], concurrency_keys=["a", None, "b"])
    rows = dict(_q(pgjournal_dsn, pgjournal_schema, "SELECT id, concurrency_key FROM S.runs"))
    assert [rows[h.run_id] for h in one] == ["t-1", "t-1"]
    assert [rows[h.run_id] for h in each] == ["a", None, "b"]
    with pytest.raises(pgjournal.ConfigurationError):
        await app.start_many("job", [0.0], concurrency_keys=["a", "b"])
    with pytest.raises(pgjournal.ConfigurationError):
        await app.start_many("job", [0.0], concurrency_key="x", concurrency_keys=["a"])
