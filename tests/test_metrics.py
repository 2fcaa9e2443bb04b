"""Prometheus metrics: the database-wide gauges for a known set of runs, the
HTTP endpoint, a worker's own counters, and the ``pgjournal metrics`` command.

The output is read back with prometheus_client's own parser, so a malformed
exposition fails these tests as it would fail a real scrape.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pgjournal
from pgjournal.cli import build_parser, main
from pgjournal.metrics import (
    CONTENT_TYPE,
    Family,
    bound_address,
    collect,
    render,
    serve_metrics,
)

from .conftest import serving, wait_for

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} missing; have " + ", ".join(
        sorted(f"{n}{dict(lb)}" for n, lb in samples if n == name))
    return samples[key]


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_text_format_round_trips_through_the_reference_parser() -> None:
    fam = Family("x_total", "counter", "help with \\ and\nnewline")
    fam.add(3, workflow='we"ird\\name\nx')
    fam.add(0.25, workflow="plain")
    gauge = Family("g", "gauge", "g")
    gauge.add(float("inf"))
    samples = parse(render([fam, gauge, Family("empty", "gauge", "skipped")]))
    assert value(samples, "x_total", workflow='we"ird\\name\nx') == 3
    assert value(samples, "x_total", workflow="plain") == 0.25
    assert math.isinf(value(samples, "g"))
    assert not any(name == "empty" for name, _ in samples)


def test_fencing_reasons_are_classified() -> None:
    from pgjournal.metrics import WorkerMetrics

    m = WorkerMetrics(1, lambda: 0)
    for status in ("cancelled", "now cancelled, before its failure was recorded", "deleted",
                   "lease not renewed in time", "now running", "lost before completion",
                   "database unavailable"):
        m.lease_lost(status)
    assert m.fenced == {"cancelled": 2, "deleted": 1, "lost": 3}


def _setup_known_runs(dsn: str, schema: str) -> dict[str, uuid.UUID]:
    """Queues mq (2 due, the oldest due 60 s ago; 1 delayed), mr (1 running;
    1 completed, 1 failed, 1 cancelled), ms (1 suspended), mk (a key at its
    limit: 1 running, 1 queued), mt (1 run taken over after its lease
    expired); workers W (concurrency 5) and W2 (2), alive; a rate bucket."""
    s = f'"{schema}"'
    w1, w2 = uuid.uuid4(), uuid.uuid4()
    ids: dict[str, uuid.UUID] = {}

    with psycopg.connect(dsn, autocommit=True) as conn:
        def start(name: str, queue: str, delay: float = 0, key: str | None = None) -> None:
            ids[name] = uuid.uuid4()
            conn.execute(f"SELECT {s}.start_run(%s, 'wf', %s, '{{}}'::json, "
                         "p_delay_seconds => %s, p_concurrency_key => %s)",
                         (ids[name], queue, delay, key))

        def claim(worker: uuid.UUID, queue: str, lease: float = 30) -> int:
            row = conn.execute(f"SELECT lease_epoch FROM {s}.claim_runs(%s, ARRAY[%s], 1, %s)",
                               (worker, queue, lease)).fetchone()
            assert row is not None, f"nothing claimed on {queue}"
            return int(row[0])

        for w, n in ((w1, 5), (w2, 2)):
            conn.execute(f"SELECT {s}.register_worker(%s, 'test', 1, "
                         "ARRAY['mq','mr','ms','mk','mt'], %s, 30)", (w, n))
        start("due1", "mq")
        start("due2", "mq")
        conn.execute(f"UPDATE {s}.runs SET due_at = now() - interval '60 seconds' "
                     "WHERE id = %s", (ids["due1"],))
        start("delayed", "mq", delay=3600)
        epoch = {}
        for name in ("running", "done", "failed"):
            start(name, "mr")
            epoch[name] = claim(w1, "mr")
        conn.execute(f"SELECT {s}.complete_runs(ARRAY[%s]::uuid[], ARRAY[%s]::bigint[], "
                     "ARRAY['1']::json[])", (ids["done"], epoch["done"]))
        conn.execute(f"SELECT {s}.fail_run(%s, %s, '{{\"type\": \"E\"}}'::jsonb, 0, true)",
                     (ids["failed"], epoch["failed"]))
        start("cancelled", "mr")
        conn.execute(f"SELECT {s}.cancel_run(%s)", (ids["cancelled"],))
        start("suspended", "ms")
        e = claim(w1, "ms")
        row = conn.execute(f"SELECT outcome FROM {s}.wait_signal(%s, %s, 0, 'go', 0, NULL, 1)",
                           (ids["suspended"], e)).fetchone()
        assert row is not None and row[0] == "suspended"
        conn.execute(f"SELECT {s}.set_concurrency_limit('tenant-1', 1)")
        start("key_running", "mk", key="tenant-1")
        claim(w1, "mk")
        start("key_queued", "mk", key="tenant-1")
        start("taken_over", "mt")
        claim(w1, "mt", lease=0.05)
        conn.execute("SELECT pg_sleep(0.1)")
        claim(w2, "mt")
        conn.execute(f"SELECT {s}.set_rate_limit('tpm', 100, 1)")
    return ids


async def test_collect_reports_a_known_set_of_runs(pgjournal_app: pgjournal.App,
                                                   pgjournal_dsn: str,
                                                   pgjournal_schema: str) -> None:
    await asyncio.to_thread(_setup_known_runs, pgjournal_dsn, pgjournal_schema)
    m = parse(await collect(pgjournal_app))
    runs = "pgjournal_queue_runs"
    expected = {("mq", "due"): 2, ("mq", "delayed"): 1, ("mq", "running"): 0,
                ("mr", "running"): 1, ("mr", "due"): 0, ("ms", "suspended"): 1,
                ("mk", "running"): 1, ("mk", "due"): 1, ("mt", "running"): 1}
    for (q, state), n in expected.items():
        assert value(m, runs, queue=q, state=state) == n, (q, state)
    assert 60 <= value(m, "pgjournal_queue_oldest_due_seconds", queue="mq") < 120
    assert value(m, "pgjournal_queue_oldest_due_seconds", queue="mr") == 0
    assert value(m, "pgjournal_queue_expired_leases", queue="mt") == 0
    ended = "pgjournal_runs_ended_recent"
    for status, n in (("completed", 1), ("failed", 1), ("cancelled", 1), ("dead", 0)):
        assert value(m, ended, queue="mr", status=status) == n, status
    assert value(m, ended, queue="mq", status="completed") == 0
    assert value(m, "pgjournal_lease_takeovers_recent", queue="mt") == 1
    assert value(m, "pgjournal_lease_takeovers_recent", queue="mr") == 0
    assert value(m, "pgjournal_workers", state="alive") == 2
    # busy: running (W), key_running (W), taken_over (W2); the suspended run holds none.
    assert value(m, "pgjournal_worker_slots", state="busy") == 3
    assert value(m, "pgjournal_worker_slots", state="free") == 7 - 3
    assert value(m, "pgjournal_concurrency_keys", state="active") == 1
    assert value(m, "pgjournal_concurrency_keys", state="at_limit") == 1
    assert value(m, "pgjournal_concurrency_keys_queued") == 1
    assert value(m, "pgjournal_rate_bucket_capacity", bucket="tpm") == 100
    assert value(m, "pgjournal_rate_bucket_available", bucket="tpm") == 100

    # Outside the window, ended runs and takeovers no longer count.
    m = parse(await collect(pgjournal_app, window=0.001))
    assert value(m, ended, queue="mr", status="completed") == 0
    assert value(m, "pgjournal_lease_takeovers_recent", queue="mt") == 0


async def test_endpoint_serves_the_text_format(pgjournal_app: pgjournal.App) -> None:
    await pgjournal_app.start("nobody_serves_this", queue="lonely")
    server = await serve_metrics(lambda: collect(pgjournal_app), port=0)
    try:
        host, port = bound_address(server)
        assert host == "127.0.0.1"
        status, ctype, body = await asyncio.to_thread(get, f"http://{host}:{port}/metrics")
        assert status == 200 and ctype == CONTENT_TYPE
        m = parse(body)
        assert value(m, "pgjournal_queue_runs", queue="lonely", state="due") == 1
        names = {name for name, _ in m}
        for name in ("pgjournal_queue_oldest_due_seconds", "pgjournal_runs_ended_recent",
                     "pgjournal_lease_takeovers_recent", "pgjournal_workers",
                     "pgjournal_worker_slots", "pgjournal_concurrency_keys",
                     "pgjournal_scrape_seconds"):
            assert name in names, name
        status, _, _ = await asyncio.to_thread(get, f"http://{host}:{port}/other")
        assert status == 404
    finally:
        server.close()
        await server.wait_closed()


async def test_a_failing_collect_answers_503(pgjournal_app: pgjournal.App) -> None:
    async def broken() -> str:
        raise RuntimeError("database went away")

    server = await serve_metrics(broken, port=0)
    try:
        host, port = bound_address(server)
        status, _, body = await asyncio.to_thread(get, f"http://{host}:{port}/metrics")
        assert status == 503 and "database went away" in body
    finally:
        server.close()


async def _step_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def test_worker_counters_move(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app
    gate = asyncio.Event()

    @app.workflow(queue="wm")
    async def ok(run: pgjournal.Run, x: float) -> float:
        return float(await run.step("nap", _step_sleep, x))

    @app.workflow(queue="wm")
    async def bad(run: pgjournal.Run) -> None:
        raise pgjournal.TerminalError("no")

    @app.workflow(queue="wm")
    async def waits(run: pgjournal.Run) -> Any:
        return await run.wait_signal("go")

    async def hold() -> int:
        await gate.wait()
        return 1

    @app.workflow(queue="wm")
    async def held(run: pgjournal.Run) -> int:
        await run.step("hold", hold)
        return int(await run.step("after", _step_sleep, 0))

    async with serving(app, metrics_port=0) as worker:
        url = "http://{}:{}/metrics".format(*await wait_for(
            lambda: asyncio.sleep(0, worker.metrics_address), what="the metrics server"))
        assert url.startswith("http://127.0.0.1:")
        handles = [await app.start("ok", 0.06) for _ in range(3)]
        failing = await app.start("bad")
        waiting = await app.start("waits")
        cancelled = await app.start("held")
        for h in handles:
            assert await h.result(timeout=20) == 0.06
        with pytest.raises(Exception, match="no"):
            await failing.result(timeout=20)
        await wait_for(lambda: asyncio.sleep(0, worker.metrics.suspended.get("waits")),
                       what="the run to suspend")
        await app.signal(waiting.run_id, "go", "x")
        assert await waiting.result(timeout=20) == "x"
        await wait_for(lambda: asyncio.sleep(0, worker.metrics.claimed.get("held")),
                       what="the held run to start")
        await app.cancel(cancelled.run_id)
        gate.set()  # its journal write is refused: the worker no longer owns it
        await wait_for(lambda: asyncio.sleep(0, worker.metrics.fenced.get("cancelled")),
                       what="the fenced write")
        await wait_for(lambda: asyncio.sleep(0, not worker._inflight), what="idle worker")
        status, ctype, body = await asyncio.to_thread(get, url)
    assert worker.metrics_address is None  # closed with the worker
    assert status == 200 and ctype == CONTENT_TYPE
    m = parse(body)
    claimed, done = "pgjournal_worker_runs_claimed_total", "pgjournal_worker_runs_completed_total"
    assert value(m, claimed, workflow="ok") == 3
    assert value(m, done, workflow="ok") == 3
    assert value(m, claimed, workflow="bad") == 1
    assert value(m, "pgjournal_worker_runs_failed_total", workflow="bad") == 1
    assert value(m, claimed, workflow="waits") == 2  # suspended, then claimed again
    assert value(m, "pgjournal_worker_runs_suspended_total", workflow="waits") == 1
    assert value(m, done, workflow="waits") == 1
    assert value(m, "pgjournal_worker_fenced_total", reason="cancelled") == 1
    assert ("pgjournal_worker_runs_completed_total",
            frozenset({("workflow", "held")})) not in m
    step = {"workflow": "ok", "status": "completed"}
    assert value(m, "pgjournal_worker_step_seconds_count", **step) == 3
    assert 0.18 <= value(m, "pgjournal_worker_step_seconds_sum", **step) < 3
    assert value(m, "pgjournal_worker_step_seconds_bucket", le="0.05", **step) == 0
    assert value(m, "pgjournal_worker_step_seconds_bucket", le="+Inf", **step) == 3
    assert value(m, "pgjournal_worker_claim_seconds_count") >= 1
    assert value(m, "pgjournal_worker_slots", state="busy") == 0
    assert value(m, "pgjournal_worker_slots", state="free") == 4


def test_cli_help_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["metrics", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--host" in out and "127.0.0.1" in out
    assert "examples:" in out and "pgjournal metrics --once" in out
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    assert "--metrics-port" in capsys.readouterr().out
    args = build_parser().parse_args(["metrics"])
    assert (args.host, args.port) == ("127.0.0.1", 9464)
    args = build_parser().parse_args(["worker", "m:app", "--metrics-port", "9100"])
    assert (args.metrics_port, args.metrics_host) == (9100, "127.0.0.1")


def test_cli_serves_on_loopback_by_default(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PGJOURNAL_DSN", "PGJOURNAL_SCHEMA")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgjournal", "--dsn", pgjournal_dsn, "--schema",
         pgjournal_schema, "metrics", "--port", "0"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving metrics" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
        status, ctype, body = get(url)
        assert status == 200 and ctype == CONTENT_TYPE
        m = parse(body)
        assert value(m, "pgjournal_workers", state="alive") == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_once_and_bad_port(pgjournal_dsn: str, pgjournal_schema: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgjournal", "--dsn", pgjournal_dsn,
                               "--schema", pgjournal_schema, "metrics", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60,
                              check=False)

    res = cli("--once")
    assert res.returncode == 0, res.stderr
    assert value(parse(res.stdout), "pgjournal_recent_window_seconds") == 300
    assert main(["--dsn", pgjournal_dsn, "metrics", "--port", "70000"]) == 1
    assert "is not a TCP port" in capsys.readouterr().err


def test_cli_worker_serves_its_counters(pgjournal_dsn: str, pgjournal_schema: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PGJOURNAL_DSN", "PGJOURNAL_SCHEMA")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgjournal", "worker", "pgjournal._demo_app:app", "--dsn",
         pgjournal_dsn, "--schema", pgjournal_schema, "--queue", "agents", "--concurrency",
         "2", "--metrics-port", "0"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = threading.Timer(30, proc.kill)  # a worker that never says so: fail, not hang
    deadline.start()
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serves metrics on" in line or len(lines) > 50:
                break
        assert "serves metrics on http://127.0.0.1:" in line, "".join(lines)
        url = line.split(" on ", 1)[1].split()[0]
        status, ctype, body = get(url)
        assert status == 200 and ctype == CONTENT_TYPE
        m = parse(body)
        assert value(m, "pgjournal_worker_slots", state="free") == 2
        assert value(m, "pgjournal_worker_slots", state="busy") == 0
    finally:
        deadline.cancel()
        proc.terminate()
        proc.wait(20)
