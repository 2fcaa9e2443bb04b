"""OpenTelemetry tracing: span names, attributes and parenting (in-process, with the
SDK's in-memory exporter), the trace context of ``start`` carried through a
``kill -9`` to another worker process, and pgjournal without OpenTelemetry."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import pgjournal
from pgjournal import tracing
from tests.conftest import ROOT, Effects, serving, wait_for


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """pgjournal's spans go to an in-memory exporter for the test (and only then)."""
    exporter = InMemorySpanExporter()
    prov = TracerProvider()
    prov.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(prov)
    try:
        yield prov, exporter
    finally:
        tracing.set_tracer_provider(None)
        prov.shutdown()


def by_name(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)),
                  key=lambda s: s.start_time or 0)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_steps_signal_wait_and_replay(
        pgjournal_app: pgjournal.App,
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    prov, exporter = provider
    app = pgjournal_app
    calls: list[str] = []

    async def plan(topic: str) -> str:
        calls.append(topic)
        return f"plan of {topic}"

    @app.workflow(queue="traced")
    async def research(run: pgjournal.Run, topic: str) -> str:
        first = await run.step("plan", plan, topic)
        second = await run.step("plan", plan, topic + "!")
        verdict = await run.wait_signal("review", timeout=60)
        return f"{first}|{second}|{verdict}"

    caller = prov.get_tracer("test")
    with caller.start_as_current_span("caller") as root:
        handle = await app.start("research", "tracing")
    trace_id = root.get_span_context().trace_id

    async with serving(app, queues=["traced"]):
        await wait_for(lambda: _status_is(handle, "suspended"), 15, what="suspension")
        await app.signal(handle.run_id, "review", "ok")
        assert await handle.result(timeout=15) == "plan of tracing|plan of tracing!|ok"
    assert calls == ["tracing", "tracing!"]

    spans = list(exporter.get_finished_spans())
    assert {s.context.trace_id for s in spans if not s.name.startswith("pgjournal.claim")} \
        == {trace_id}
    (start,) = by_name(spans, "pgjournal.start")
    assert start.parent is not None and start.parent.span_id == root.get_span_context().span_id
    assert attrs(start)["pgjournal.run_id"] == str(handle.run_id)
    assert attrs(start)["pgjournal.workflow"] == "research"
    assert attrs(start)["pgjournal.queue"] == "traced"

    attempts = by_name(spans, "pgjournal.run research")
    assert len(attempts) == 2, [s.name for s in spans]
    for a in attempts:
        assert a.parent is not None and a.parent.span_id == start.context.span_id
        assert attrs(a)["pgjournal.run_id"] == str(handle.run_id)
        assert attrs(a)["pgjournal.queue"] == "traced"
        assert attrs(a)["pgjournal.attempt"] == 1
        assert attrs(a)["pgjournal.recoveries"] == 0
        assert a.links, "an attempt links to the claim that took it"
    assert attrs(attempts[0]).get("pgjournal.suspended") is True
    assert attempts[0].status.status_code is StatusCode.UNSET
    assert attempts[1].status.status_code is not StatusCode.ERROR

    def children(parent: ReadableSpan) -> list[tuple[str, int, bool, bool]]:
        out = [s for s in spans if s.parent is not None
               and s.parent.span_id == parent.context.span_id]
        return [(s.name, attrs(s)["pgjournal.step.occurrence"], attrs(s)["pgjournal.replayed"],
                 bool(attrs(s).get("pgjournal.suspended")))
                for s in sorted(out, key=lambda s: s.start_time or 0)]

    assert children(attempts[0]) == [
        ("pgjournal.step plan", 0, False, False),
        ("pgjournal.step plan", 1, False, False),
        ("pgjournal.signal review", 0, False, True),
    ]
    resumed = children(attempts[1])
    assert resumed[:2] == [("pgjournal.step plan", 0, True, False),
                           ("pgjournal.step plan", 1, True, False)]
    assert resumed[2][0] == "pgjournal.signal review" and not resumed[2][3]
    step = by_name(spans, "pgjournal.step plan")[0]
    assert attrs(step)["pgjournal.step.name"] == "plan"
    assert attrs(step)["pgjournal.step.kind"] == "step"
    assert attrs(step)["pgjournal.workflow"] == "research"
    claims = by_name(spans, "pgjournal.claim")
    assert claims and all(attrs(c)["pgjournal.claimed"] >= 1 for c in claims)


async def _status_is(handle: pgjournal.RunHandle, status: str) -> bool:
    return await handle.status() == status


async def test_failing_step_records_the_exception(
        pgjournal_app: pgjournal.App,
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    _prov, exporter = provider
    app = pgjournal_app

    def boom() -> None:
        raise ValueError("the model said no")

    @app.workflow(max_attempts=1)
    async def failing(run: pgjournal.Run) -> None:
        await run.step("call", boom)

    handle = await app.start("failing")
    async with serving(app):
        with pytest.raises(pgjournal.RunFailed):
            await handle.result(timeout=15)
    spans = list(exporter.get_finished_spans())
    (step,) = by_name(spans, "pgjournal.step call")
    (attempt,) = by_name(spans, "pgjournal.run failing")
    for span in (step, attempt):
        assert span.status.status_code is StatusCode.ERROR
        assert "ValueError" in (span.status.description or "")
        (event,) = [e for e in span.events if e.name == "exception"]
        assert (event.attributes or {})["exception.type"] == "ValueError"
    assert step.parent is not None and step.parent.span_id == attempt.context.span_id
    # No caller context was stored: the attempt starts a trace of its own.
    (start,) = by_name(spans, "pgjournal.start")
    assert attempt.parent is not None and attempt.parent.span_id == start.context.span_id


async def test_children_stream_and_sleep_share_the_trace(
        pgjournal_app: pgjournal.App,
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    prov, exporter = provider
    app = pgjournal_app

    async def words(n: int) -> Any:
        for i in range(n):
            yield f"w{i}"

    @app.workflow()
    async def leaf(run: pgjournal.Run, i: int) -> int:
        return await run.step("double", lambda: i * 2)  # type: ignore[no-any-return]

    @app.workflow()
    async def parent(run: pgjournal.Run) -> Any:
        got = [w async for w in run.stream_step("llm", words, 3)]
        await run.sleep("nap", 0.05)
        kids = await run.spawn_many("leaf", [1, 2])
        return got, await run.wait_all(kids)

    with prov.get_tracer("test").start_as_current_span("caller") as root:
        handle = await app.start("parent")
    async with serving(app):
        assert await handle.result(timeout=20) == [["w0", "w1", "w2"], [2, 4]]
    spans = [s for s in exporter.get_finished_spans() if not s.name.startswith("pgjournal.claim")]
    assert {s.context.trace_id for s in spans} == {root.get_span_context().trace_id}
    names = {s.name for s in spans}
    assert {"pgjournal.stream llm", "pgjournal.sleep nap", "pgjournal.spawn leaf",
            "pgjournal.children wait_all", "pgjournal.run leaf",
            "pgjournal.step double"} <= names, names
    stream = by_name(spans, "pgjournal.stream llm")[0]
    assert attrs(stream)["pgjournal.stream.chunks"] == 3
    assert attrs(stream)["pgjournal.replayed"] is False


async def test_stream_cut_short_then_replayed(
        pgjournal_app: pgjournal.App,
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    _prov, exporter = provider
    app = pgjournal_app
    produced: list[int] = []

    async def numbers() -> Any:
        for i in range(5):
            produced.append(i)
            yield i

    @app.workflow()
    async def cut(run: pgjournal.Run) -> Any:
        got = []
        async for n in run.stream_step("nums", numbers):
            got.append(n)
            if n == 1:
                break
        await run.wait_signal("go")
        return got

    handle = await app.start("cut")
    async with serving(app):
        await wait_for(lambda: _status_is(handle, "suspended"), 15, what="suspension")
        await app.signal(handle.run_id, "go")
        assert await handle.result(timeout=15) == [0, 1]
    assert produced[:2] == [0, 1] and len(produced) <= 3  # not called again on replay
    streams = by_name(list(exporter.get_finished_spans()), "pgjournal.stream nums")
    assert [(attrs(s)["pgjournal.replayed"], attrs(s)["pgjournal.stream.chunks"])
            for s in streams] == [(False, 2), (True, 2)]
    assert attrs(streams[0]).get("pgjournal.stream.cut") is True
    assert all(s.status.status_code is StatusCode.UNSET for s in streams)


async def test_start_many_is_one_span_parenting_every_run(
        pgjournal_app: pgjournal.App,
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    prov, exporter = provider
    app = pgjournal_app

    @app.workflow()
    async def square(run: pgjournal.Run, x: int) -> int:
        return await run.step("square", lambda: x * x)  # type: ignore[no-any-return]

    with prov.get_tracer("test").start_as_current_span("caller"):
        handles = await app.start_many("square", [1, 2, 3])
    async with serving(app):
        assert [await h.result(timeout=15) for h in handles] == [1, 4, 9]
    spans = list(exporter.get_finished_spans())
    (start,) = by_name(spans, "pgjournal.start")
    assert attrs(start)["pgjournal.runs"] == 3
    runs = by_name(spans, "pgjournal.run square")
    assert sorted(attrs(r)["pgjournal.run_id"] for r in runs) == \
        sorted(str(h.run_id) for h in handles)
    assert all(r.parent is not None and r.parent.span_id == start.context.span_id
               for r in runs)


def test_pgjournal_runs_without_opentelemetry(pgjournal_dsn: str,
                                              pgjournal_schema: str) -> None:
    """With ``opentelemetry`` not importable, pgjournal imports and runs a workflow;
    with it importable but no provider set, pgjournal never imports it."""
    script = textwrap.dedent("""
        import asyncio, sys
        if sys.argv[3] == "blocked":
            sys.modules["opentelemetry"] = None  # import opentelemetry -> ImportError
        import pgjournal
        from pgjournal import tracing

        app = pgjournal.App(sys.argv[1], schema=sys.argv[2], poll_interval=0.2)

        @app.workflow()
        async def hello(run, name):
            return await run.step("greet", lambda: "hi " + name)

        async def main():
            async with app:
                worker = pgjournal.Worker(app, concurrency=2, lease=5)
                task = asyncio.create_task(worker.run(handle_signals=False))
                handle = await app.start("hello", "otel")
                print(await handle.result(timeout=20))
                worker.stop()
                await task

        asyncio.run(main())
        print("enabled", tracing.enabled())
        print("imported", any(m.startswith("opentelemetry") and sys.modules[m] is not None
                              for m in sys.modules))
    """)
    for mode in ("blocked", "installed"):
        out = subprocess.run([sys.executable, "-c", script, pgjournal_dsn, pgjournal_schema,
                              mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:3] == ["hi otel", "enabled False", "imported False"], \
            (mode, out.stdout, out.stderr)


async def test_trace_context_survives_kill9_and_resume_elsewhere(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        effects: Effects, tmp_path: Path,
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """The run's spans on both worker processes, before and after a ``kill -9``,
    are children of the span that called ``start``."""
    prov, exporter = provider
    app = pgjournal_app
    with prov.get_tracer("test").start_as_current_span("caller") as root:
        handle = await app.start("five_steps", 4)
    trace_id = format(root.get_span_context().trace_id, "032x")

    procs: list[subprocess.Popen[bytes]] = []

    def worker(name: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp_path / f"{name}.jsonl"
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs_tracing", pgjournal_dsn, pgjournal_schema,
             "--lease", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PGJ_SPANS": str(out), **env})
        procs.append(proc)
        return proc, out

    try:
        first, first_out = worker("first", {"PGJ_BLOCK": "s3"})
        await effects.wait(handle.run_id, "s3", timeout=20)
        await wait_for(lambda: asyncio.to_thread(_has_span, first_out, "pgjournal.step s2"),
                       10, what="the first worker's span of step s2")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second, second_out = worker("second", {})
        assert await handle.result(timeout=20) == "s1,s2,s3,s4"
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    before = _spans(first_out)
    after = _spans(second_out)
    run_spans = [s for s in before + after if s["name"] != "pgjournal.claim"]
    assert {s["trace_id"] for s in run_spans} == {trace_id}
    # The killed attempt never ended its span; its finished steps were exported.
    assert [s["name"] for s in before if s["name"].startswith("pgjournal.step")] == \
        ["pgjournal.step s1", "pgjournal.step s2"]
    (resumed,) = [s for s in after if s["name"] == "pgjournal.run five_steps"]
    assert resumed["attributes"]["pgjournal.recoveries"] == 1
    assert resumed["attributes"]["pgjournal.run_id"] == str(handle.run_id)
    steps = {s["attributes"]["pgjournal.step.name"]: s for s in after
             if s["name"].startswith("pgjournal.step")}
    assert {n: s["attributes"]["pgjournal.replayed"] for n, s in steps.items()} == \
        {"s1": True, "s2": True, "s3": False, "s4": False}
    assert all(s["parent_id"] == resumed["span_id"] for s in steps.values())
    # The resumed attempt's parent is the stored context: the caller's start span.
    (start,) = by_name(list(exporter.get_finished_spans()), "pgjournal.start")
    assert resumed["parent_id"] == format(start.context.span_id, "016x")
    assert start.parent is not None and start.parent.span_id == root.get_span_context().span_id


def _spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _has_span(path: Path, name: str) -> bool:
    return any(s["name"] == name for s in _spans(path))
