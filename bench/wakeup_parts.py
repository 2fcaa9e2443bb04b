"""Where S3's wake-up time goes: enqueue, NOTIFY, claim, start of the body.

    python -m bench.wakeup_parts                       # throwaway embedded server
    python -m bench.wakeup_parts --dsn URL [--jobs 200] [--interval 0.02]

S3 (``python -m bench``) times enqueue → body start as one number. This
splits it, with one idle worker process and one run every ``--interval``
seconds, as S3 does:

- ``enqueue``: the client's ``App.start`` round trip (the INSERT's commit
  waits for its WAL flush; the NOTIFY goes out at that commit);
- ``commit → notify``: the NOTIFY's arrival at the worker, relative to the
  client getting its answer (negative: the worker hears it first);
- ``notify → claim sent``: the worker's reaction on its listening connection;
- ``claim``: the claim's round trip (``claim_runs`` and its commit);
- ``claim → body``: spawning the run's task up to the workflow's first line.

Timestamps are wall clock (``time.time()``) in two processes on one host.
The worker process wraps ``Worker._act_on_wake`` and ``Store.claim`` to take
them: private names, so this script follows the code it measures. With
``--async-claim`` the worker's listening connection runs with
``synchronous_commit = off``: the claim's commit then does not wait for its
WAL flush, which shows what that flush costs (not a setting to deploy: a
claim lost in a server crash could give two workers the same lease epoch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

import pgjournal
from pgjournal.connect import connect_sync
from pgjournal.errors import DatabaseUnavailable

SCHEMA = "bench_wakeup_parts"
QUEUE = "bench"


def _app(dsn: str) -> pgjournal.App:
    app = pgjournal.App(dsn, schema=SCHEMA, poll_interval=1.0)

    @app.workflow(queue=QUEUE)
    async def noop(run: pgjournal.Run, t0: float = 0.0) -> None:
        _record(t0=t0, body=time.time())

    return app


_log: Any = None


def _record(**fields: float | bool) -> None:
    _log.write(json.dumps(fields) + "\n")
    _log.flush()


async def _worker(dsn: str, async_claim: bool) -> None:
    """The worker process: a stock ``Worker`` with timestamps around its parts."""
    from pgjournal import store as store_mod
    from pgjournal import worker as worker_mod

    act = worker_mod.Worker._act_on_wake
    tuned: set[int] = set()

    async def timed_act(self: Any, conn: Any, payloads: Any) -> None:
        _record(notify=time.time())
        if async_claim and id(conn) not in tuned:
            await conn.execute("SET synchronous_commit = off")
            tuned.add(id(conn))
        await act(self, conn, payloads)

    claim = store_mod.Store.claim

    async def timed_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
        sent = time.time()
        got = await claim(self, *args, **kwargs)
        if got:
            _record(claim_sent=sent, claim_done=time.time())
        return got

    worker_mod.Worker._act_on_wake = timed_act  # type: ignore[method-assign]
    store_mod.Store.claim = timed_claim  # type: ignore[method-assign]
    await pgjournal.Worker(_app(dsn), concurrency=10).run()


def _parts(enqueued: list[tuple[float, float]], lines: list[dict[str, float]]
           ) -> dict[str, list[float]]:
    notifies = [x["notify"] for x in lines if "notify" in x]
    claims = [x for x in lines if "claim_sent" in x]
    bodies = {x["t0"]: x["body"] for x in lines if "body" in x}
    parts: dict[str, list[float]] = {k: [] for k in (
        "enqueue", "commit -> notify", "notify -> claim sent", "claim", "claim -> body",
        "total")}
    for t0, answered in enqueued:
        body = bodies.get(t0)
        notify = next((n for n in notifies if n > t0), None)
        if body is None or notify is None:
            continue
        claim = next((c for c in claims if c["claim_sent"] >= notify - 1e-4), None)
        if claim is None or claim["claim_done"] > body:
            continue  # claimed by the claim loop, not on the NOTIFY: not this path
        for name, value in (("enqueue", answered - t0), ("commit -> notify", notify - answered),
                            ("notify -> claim sent", claim["claim_sent"] - notify),
                            ("claim", claim["claim_done"] - claim["claim_sent"]),
                            ("claim -> body", body - claim["claim_done"]),
                            ("total", body - t0)):
            parts[name].append(value * 1000)
    return parts


async def _client(dsn: str, jobs: int, interval: float, async_claim: bool) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    pgjournal.migrate(dsn, schema=SCHEMA)
    log = Path(tempfile.mkdtemp(prefix="wakeup-parts-")) / "worker.jsonl"
    log.touch()
    cmd = [sys.executable, "-m", "bench.wakeup_parts", "--worker", "--dsn", dsn,
           "--log", str(log)] + (["--async-claim"] if async_claim else [])
    proc = await asyncio.create_subprocess_exec(*cmd)
    app = _app(dsn)
    enqueued: list[tuple[float, float]] = []

    def bodies() -> int:
        return sum('"body"' in x for x in log.read_text().splitlines())

    async def until(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while bodies() < n:
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError(f"the worker ran {bodies()} of {n} runs")
            await asyncio.sleep(0.05)

    try:
        warm = 3  # untimed: the worker starts, connects and LISTENs
        for i in range(warm):
            await app.start("noop", 0.0)
            await until(i + 1, 60)
        for _ in range(jobs):
            t0 = time.time()
            await app.start("noop", t0)
            enqueued.append((t0, time.time()))
            await asyncio.sleep(interval)
        await until(warm + jobs, 30)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        await app.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    parts = _parts(enqueued, lines)
    print(f"{len(parts['total'])} of {jobs} runs claimed on their NOTIFY"
          + (" (claim commits with synchronous_commit = off)" if async_claim else ""))
    print("| part | p50 ms | p90 ms | p99 ms |\n| --- | ---: | ---: | ---: |")
    summary: dict[str, Any] = {}
    for name, values in parts.items():
        if not values:
            continue
        ordered = sorted(values)
        p50 = statistics.median(ordered)
        p90, p99 = ordered[int(len(ordered) * 0.9)], ordered[int(len(ordered) * 0.99)]
        summary[name] = {"p50": p50, "p90": p90, "p99": p99}
        print(f"| {name} | {p50:.3f} | {p90:.3f} | {p99:.3f} |")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", help="server to use (default: a throwaway embedded one "
                    "with fsync and synchronous_commit on, as the S3 bench)")
    ap.add_argument("--jobs", type=int, default=200, help="timed runs (default 200)")
    ap.add_argument("--interval", type=float, default=0.02,
                    help="seconds between enqueues (default 0.02, as S3)")
    ap.add_argument("--async-claim", action="store_true",
                    help="the worker's claims commit without waiting for the WAL flush")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.interval < 0:
        ap.error("--jobs must be at least 1 and --interval 0 or more")
    if args.worker:
        global _log
        _log = open(args.log, "a")  # noqa: SIM115 - open for the process' lifetime
        asyncio.run(_worker(args.dsn, args.async_claim))
        return
    if args.dsn:
        try:
            connect_sync(args.dsn).close()
        except DatabaseUnavailable as exc:
            ap.error(str(exc))
        asyncio.run(_client(args.dsn, args.jobs, args.interval, args.async_claim))
        return
    from bench.cli import DURABLE
    from pgjournal.embedded import throwaway_server

    server = throwaway_server(settings=DURABLE)
    try:
        print("throwaway embedded PostgreSQL, fsync and synchronous_commit on")
        asyncio.run(_client(server.dsn, args.jobs, args.interval, args.async_claim))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
