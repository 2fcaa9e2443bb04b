"""The optional roles script: a reader that only reads, a worker that only works.

Roles are cluster-wide, so every test creates its own uniquely named roles (and
login users that are members of them) and drops them afterwards.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerr
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgjournal
import pgjournal.migrations
from pgjournal.roles import roles_sql

from .conftest import ROOT, wait_for

DENIED = pgerr.InsufficientPrivilege


@dataclass
class Roles:
    worker: str  # the group roles the script creates
    reader: str
    worker_dsn: str  # login users that are members of them
    reader_dsn: str


@pytest.fixture
def roles(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Roles]:
    suffix = uuid.uuid4().hex[:10]
    worker, reader = f"pjw_{suffix}", f"pjr_{suffix}"
    worker_login, reader_login = f"{worker}_login", f"{reader}_login"
    script = roles_sql(pgjournal_schema, worker_role=worker, reader_role=reader)
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(script.encode())
        for login, group in ((worker_login, worker), (reader_login, reader)):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(login), sql.Identifier(group)))
    try:
        yield Roles(worker, reader, make_conninfo(pgjournal_dsn, user=worker_login),
                    make_conninfo(pgjournal_dsn, user=reader_login))
    finally:
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            for role in (worker_login, reader_login, worker, reader):
                ident = sql.Identifier(role)
                conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def _denied(dsn: str, schema: str, statement: str, params: Any = None) -> None:
    """``statement`` ({s} = the schema) must fail for lack of privilege."""
    query = sql.SQL(statement).format(s=sql.Identifier(schema))
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(DENIED):
        conn.execute(query, params)


def test_roles_sql_rejects_bad_names() -> None:
    with pytest.raises(pgjournal.ConfigurationError, match="invalid schema name"):
        roles_sql("x; DROP TABLE runs")
    with pytest.raises(pgjournal.ConfigurationError, match="invalid role name"):
        roles_sql("pgjournal", worker_role='w"; --')
    with pytest.raises(pgjournal.ConfigurationError, match="must differ"):
        roles_sql("pgjournal", worker_role="same", reader_role="same")


def _listed(name: str) -> set[str]:
    """The function names in one of the ARRAY[...] lists of sql/roles.sql."""
    text = (ROOT / "sql" / "roles.sql").read_text()
    match = re.search(rf"{name} text\[\] := ARRAY\[(.*?)\];", text, re.DOTALL)
    assert match, name
    return set(re.findall(r"'([a-z_]+)'", match.group(1)))


def test_every_function_the_python_calls_is_classified() -> None:
    """A function added to sql/queries.sql must be put on the worker or client list."""
    called = set(re.findall(r"\{schema\}\.([a-z_]+)\(", (ROOT / "sql" / "queries.sql")
                            .read_text()))
    worker, client = _listed("v_worker"), _listed("v_client")
    assert called and not worker & client
    assert called <= worker | client, f"unclassified: {sorted(called - worker - client)}"


def test_script_is_idempotent(pgjournal_dsn: str, pgjournal_schema: str,
                              roles: Roles) -> None:
    """Re-running it (after each migrate, as documented) must succeed and change nothing."""
    script = roles_sql(pgjournal_schema, worker_role=roles.worker, reader_role=roles.reader)
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        before = conn.execute(
            "SELECT proname, proacl::text, prosecdef FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1", (pgjournal_schema,)
        ).fetchall()
        conn.execute(script.encode())
        after = conn.execute(
            "SELECT proname, proacl::text, prosecdef FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1", (pgjournal_schema,)
        ).fetchall()
    assert before == after


async def test_reader_reads_but_cannot_write_or_call_functions(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        roles: Roles) -> None:
    handle = await pgjournal_app.start("anything", 1)
    schema = pgjournal_schema
    with psycopg.connect(roles.reader_dsn, autocommit=True) as conn:
        for relation in ("runs", "run_overview", "queue_depth", "worker_health", "steps"):
            rows = conn.execute(sql.SQL("SELECT * FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(relation))).fetchall()
            assert rows or relation in ("worker_health", "steps"), relation
        row = conn.execute(sql.SQL("SELECT status FROM {}.run_overview WHERE id = %s")
                           .format(sql.Identifier(schema)), (handle.run_id,)).fetchone()
        assert row == ("queued",)
        # No EXECUTE on any function of the schema, state-changing or not.
        callable_fns = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = %s "
            "AND has_function_privilege(p.oid, 'EXECUTE')", (schema,)).fetchall()
        assert callable_fns == []
    run = handle.run_id
    _denied(roles.reader_dsn, schema, "SELECT {s}.cancel_run(%s)", (run,))
    _denied(roles.reader_dsn, schema, "SELECT {s}.set_queue('default', 1, true)")
    _denied(roles.reader_dsn, schema,
            "SELECT * FROM {s}.claim_runs(gen_random_uuid(), ARRAY['default'], 1, 30)")
    _denied(roles.reader_dsn, schema, "SELECT {s}.send_signal(%s, 'x', 'null')", (run,))
    _denied(roles.reader_dsn, schema, "UPDATE {s}.runs SET status = 'cancelled'")
    _denied(roles.reader_dsn, schema, "DELETE FROM {s}.steps")
    _denied(roles.reader_dsn, schema,
            "INSERT INTO {s}.queues (name, paused) VALUES ('q', true)")
    _denied(roles.reader_dsn, schema, "CREATE TABLE {s}.mine (x int)")
    assert await handle.status() == "queued"


def test_worker_cannot_run_ddl_or_bypass_the_functions(
        pgjournal_dsn: str, pgjournal_schema: str, roles: Roles) -> None:
    schema, dsn = pgjournal_schema, roles.worker_dsn
    _denied(dsn, schema, "CREATE TABLE {s}.mine (x int)")
    _denied(dsn, schema, "CREATE VIEW {s}.mine AS SELECT 1")
    _denied(dsn, schema, "CREATE FUNCTION {s}.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    _denied(dsn, schema, "ALTER TABLE {s}.runs ADD COLUMN x int")
    _denied(dsn, schema, "DROP TABLE {s}.steps")
    _denied(dsn, schema, "DROP VIEW {s}.run_overview")
    _denied(dsn, schema, "TRUNCATE {s}.runs")
    _denied(dsn, schema, "CREATE INDEX ON {s}.runs (queue)")
    # State changes only through the fenced worker functions:
    _denied(dsn, schema, "UPDATE {s}.runs SET status = 'completed'")
    _denied(dsn, schema, "INSERT INTO {s}.steps (run_id, position, name, occurrence, status, "
                         "lease_epoch) VALUES (gen_random_uuid(), 0, 'x', 0, 'completed', 1)")
    _denied(dsn, schema, "SELECT * FROM {s}.claim_from(gen_random_uuid(), "
                         "ARRAY['default'], 1, 30)")
    # ... and no client functions unless granted separately.
    _denied(dsn, schema, "SELECT {s}.cancel_run(gen_random_uuid())")
    _denied(dsn, schema, "SELECT {s}.set_queue('default', 1, true)")
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = 'mine'",
            (schema,)).fetchone()
        assert tables == (0,)


async def _one(dsn: str, query: str, *params: Any) -> Any:
    def run() -> Any:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
            return row[0] if row else None
    return await asyncio.to_thread(run)


@pytest.fixture
async def worker_app(roles: Roles, pgjournal_schema: str) -> AsyncIterator[pgjournal.App]:
    app = pgjournal.App(roles.worker_dsn, schema=pgjournal_schema, poll_interval=0.2)
    try:
        yield app
    finally:
        await app.close()


async def test_worker_role_claims_journals_and_completes(
        pgjournal_app: pgjournal.App, worker_app: pgjournal.App, pgjournal_dsn: str,
        pgjournal_schema: str) -> None:
    """A Worker connected as the worker role exercises every worker function."""

    async def tokens(n: int) -> AsyncIterator[str]:
        for i in range(n):
            yield f"t{i}"
            await asyncio.sleep(0.05)

    # The client registers workflows too (below), so it must know every name it starts.
    @pgjournal_app.workflow(max_attempts=1)
    @worker_app.workflow(max_attempts=1)
    async def agent(run: pgjournal.Run, topic: str) -> str:
        plan = await run.step("plan", lambda t: f"plan for {t}", topic)
        draft = [c async for c in run.stream_step("draft", tokens, 4)]
        verdict = await run.wait_signal("review", timeout=60)
        await run.sleep("cool-down", 0.2)
        return f"{plan}: {''.join(draft)} ({verdict['ok']})"

    # Registered with the client too, so the run it starts has one attempt.
    @pgjournal_app.workflow(max_attempts=1)
    @worker_app.workflow(max_attempts=1)
    async def broken(run: pgjournal.Run) -> None:
        raise ValueError("nope")

    worker = pgjournal.Worker(worker_app, concurrency=2, lease=1.5)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        # The client side (start, signal, result) uses the owner's app.
        good = await pgjournal_app.start("agent", "roles")
        bad = await pgjournal_app.start("broken")
        q = f'SELECT status FROM "{pgjournal_schema}".runs WHERE id = %s'

        async def suspended() -> bool:
            return bool(await _one(pgjournal_dsn, q, good.run_id) == "suspended")

        await wait_for(suspended, 30, what="the run to wait for its signal")
        await pgjournal_app.signal(good.run_id, "review", {"ok": True})
        assert await good.result(timeout=30) == "plan for roles: t0t1t2t3 (True)"
        with pytest.raises(pgjournal.RunFailed, match="nope"):
            await bad.result(timeout=30)
        # It held its leases across heartbeats and registered itself.
        workers = f'SELECT count(*) FROM "{pgjournal_schema}".workers WHERE id = %s'
        assert await _one(pgjournal_dsn, workers, worker.id) == 1
    finally:
        worker.stop()
        await task
    stopped = f'SELECT stopped_at IS NOT NULL FROM "{pgjournal_schema}".workers WHERE id = %s'
    assert await _one(pgjournal_dsn, stopped, worker.id) is True
    kinds = (f'SELECT string_agg(kind, \',\' ORDER BY position) FROM "{pgjournal_schema}".steps '
             "WHERE run_id = %s")
    assert await _one(pgjournal_dsn, kinds, good.run_id) == "step,stream,signal,sleep"


def _function_rights(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    """What the roles script sets on the schema's functions, from the catalog."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prosecdef, "
            "p.proacl::text, "
            "p.proconfig::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s ORDER BY 1", (schema,)).fetchall()


def test_migrate_names_the_roles_to_set_up_again(pgjournal_dsn: str, pgjournal_schema: str,
                                                roles: Roles) -> None:
    """A migration that replaces functions drops what the roles script set on
    them (SECURITY DEFINER, the pinned search_path, or the grants); ``pgjournal
    migrate`` says which roles have rights on the schema and to run the script
    again, after which every function has its rights back and the worker claims."""
    schema = sql.Identifier(pgjournal_schema)
    claim = "SELECT * FROM {s}.claim_runs(gen_random_uuid(), ARRAY['default'], 1, 30)"
    with psycopg.connect(roles.worker_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(claim).format(s=schema))  # allowed
    granted = _function_rights(pgjournal_dsn, pgjournal_schema)
    api_fns = _listed("v_worker") | _listed("v_client")
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        # Replay the newest migration that replaces claim_runs, as an upgrade
        # would apply it.
        replaces = [m.version for m in pgjournal.migrations.available()
                    if re.search(r"(?i)create (or replace )?function\s+claim_runs\b", m.sql)]
        conn.execute(sql.SQL("DELETE FROM {}.migrations WHERE version = %s").format(schema),
                     (replaces[-1],))
    res = subprocess.run([sys.executable, "-m", "pgjournal", "migrate", "--dsn", pgjournal_dsn,
                          "--schema", pgjournal_schema], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    (line,) = [x for x in res.stdout.splitlines()
               if x.startswith(f"roles with rights on schema {pgjournal_schema}: ")]
    named = line.split(": ", 1)[1].split(". ", 1)[0].split(", ")
    assert sorted(named) == sorted([roles.worker, roles.reader])
    assert "pgjournal roles --schema" in res.stdout
    replaced = sorted(set(granted) - set(_function_rights(pgjournal_dsn, pgjournal_schema)))
    # The newest migration replaces at least one function the script gives rights on
    # (this test is about what that does to them).
    assert [f for f, *_ in replaced if f in api_fns], replaced
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(roles_sql(pgjournal_schema, worker_role=roles.worker,
                               reader_role=roles.reader).encode())
    assert _function_rights(pgjournal_dsn, pgjournal_schema) == granted
    with psycopg.connect(roles.worker_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(claim).format(s=schema))
    again = subprocess.run([sys.executable, "-m", "pgjournal", "migrate", "--dsn",
                            pgjournal_dsn, "--schema", pgjournal_schema],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "already up to date" in again.stdout and "roles with rights" not in again.stdout


# -- what each role reads: every view, every metric, every dashboard page ---------------
#
# The reader role (dashboards, Grafana, read-only commands) reads everything a
# DBA reads; the worker role reads nothing but the migrations table: it moves
# runs through its functions, and a dashboard, scrape or listing pointed at it
# answers a clear "permission denied" naming the reader role, never a 500.

LIMITS = {"tenant-*": 1, "tenant-b*": 3, "tenant-a": 5}
#: key -> the limit key_limit() gives it (exact beats prefix, longer prefix beats shorter)
KEYS = {"tenant-a": 5, "tenant-b1": 3, "tenant-c": 1, "other": None}


async def _fill(app: pgjournal.App, dsn: str, schema: str) -> uuid.UUID:
    """Something in every view: keyed runs (one running at its limit), limits, a rate
    bucket, a schedule, a failed run with a failed step, a worker. The id of the failed run."""
    for pattern, limit in LIMITS.items():
        await app.set_concurrency_limit(pattern, limit)
    await app.set_rate_limit("tokens", 100, 10)
    await app.set_schedule("nightly", "0 3 * * *", "anything")
    for key in KEYS:
        await app.start("anything", key, concurrency_key=key, queue="keyed")
    failed = await app.start("anything", 0)
    s = sql.Identifier(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Live leases on tenant-c (limit 1: at its limit) and tenant-a (its own limit
        # of 5 beats the prefix's 1: not at its limit).
        conn.execute(sql.SQL("UPDATE {}.runs SET status = 'running', lease_epoch = 1, "
                             "started_at = now(), due_at = now() + interval '1 hour', "
                             "lease_until = now() + interval '1 hour' "
                             "WHERE concurrency_key IN ('tenant-a', 'tenant-c')").format(s))
        conn.execute(sql.SQL("SELECT {}.register_worker(gen_random_uuid(), 'host', 1, "
                             "ARRAY['default'], 2, 30, ARRAY['anything'], "
                             "'{{\"anything\": \"default\"}}'::jsonb)").format(s))
        conn.execute(sql.SQL("UPDATE {}.runs SET status = 'failed', due_at = NULL, "
                             "finished_at = now(), error = '{{\"type\": \"E\"}}' "
                             "WHERE id = %s").format(s), (failed.run_id,))
        # Its step failed: journaled at position 0 (the dashboard's value page reads it).
        conn.execute(sql.SQL("INSERT INTO {0}.steps (run_id, position, name, occurrence, "
                             "status, error, lease_epoch, run_created_at) SELECT id, 0, 'work', "
                             "0, 'failed', '{{\"type\": \"E\"}}', 1, created_at "
                             "FROM {0}.runs WHERE id = %s").format(s), (failed.run_id,))
    return failed.run_id


def _views(dsn: str, schema: str) -> list[str]:
    """Every view of the schema, from the catalog: a view added later is covered."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('v', 'm') ORDER BY 1", (schema,)).fetchall()
    return [r[0] for r in rows]


async def test_every_view_reads_as_the_reader_and_none_as_the_worker(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        roles: Roles) -> None:
    await _fill(pgjournal_app, pgjournal_dsn, pgjournal_schema)
    views = _views(pgjournal_dsn, pgjournal_schema)
    assert {"run_overview", "queue_depth", "concurrency_keys", "rate_limits",
            "schedule_status", "worker_health", "failures"} <= set(views)
    s = sql.Identifier(pgjournal_schema)
    refused: dict[str, str] = {}
    with psycopg.connect(roles.reader_dsn, autocommit=True) as conn:
        for view in views:
            try:
                conn.execute(sql.SQL("SELECT * FROM {}.{}").format(s, sql.Identifier(view))
                             ).fetchall()
            except psycopg.Error as exc:
                refused[view] = str(exc).splitlines()[0]
        assert refused == {}, f"the reader role cannot read: {refused}"
        keys = {r[0]: r[1:] for r in conn.execute(sql.SQL(
            "SELECT key, max_running, running, queued, at_limit FROM {}.concurrency_keys"
        ).format(s))}
    # The view's limit of each key is the one the claim goes by (key_limit).
    running = ("tenant-a", "tenant-c")
    assert keys == {k: (limit, int(k in running), int(k not in running), k == "tenant-c")
                    for k, limit in KEYS.items()}
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        claims_by = {k: conn.execute(sql.SQL("SELECT {}.key_limit(%s)").format(s), (k,))
                     .fetchone()[0] for k in KEYS}  # type: ignore[index]
    assert claims_by == KEYS
    # The worker role reads no view (and no table but migrations): it works through
    # its functions only.
    for view in views:
        _denied(roles.worker_dsn, pgjournal_schema, "SELECT * FROM {s}." + view)


async def test_traces_keep_the_callers_context_under_the_worker_role(
        pgjournal_app: pgjournal.App, worker_app: pgjournal.App) -> None:
    """A worker reads the trace context stored with each claimed run (its own, else its
    parent's or root's); as the worker role it may not read ``runs``, so it must get
    them through a function it may call: the attempt spans, the child's too, stay in
    the trace of the code that called ``start``."""
    pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry SDK is not installed")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pgjournal import tracing

    @pgjournal_app.workflow()
    @worker_app.workflow()
    async def leaf(run: pgjournal.Run) -> int:
        return await run.step("one", lambda: 1)  # type: ignore[no-any-return]

    @pgjournal_app.workflow()
    @worker_app.workflow()
    async def parent(run: pgjournal.Run) -> list[int]:
        return await run.wait_all(await run.spawn_many("leaf", [(), ()]))  # type: ignore

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(provider)
    try:
        with provider.get_tracer("test").start_as_current_span("caller") as caller:
            handle = await pgjournal_app.start("parent")
        worker = pgjournal.Worker(worker_app, concurrency=4, lease=5)
        task = asyncio.create_task(worker.run(handle_signals=False))
        try:
            assert await handle.result(timeout=30) == [1, 1]
        finally:
            worker.stop()
            await task
    finally:
        tracing.set_tracer_provider(None)
        provider.shutdown()
    spans = exporter.get_finished_spans()
    attempts = [s for s in spans if s.name.startswith("pgjournal.run ")]
    assert sorted(s.name for s in attempts) == ["pgjournal.run leaf", "pgjournal.run leaf",
                                                "pgjournal.run parent", "pgjournal.run parent"]
    trace_id = caller.get_span_context().trace_id
    assert {(s.name, s.context.trace_id == trace_id) for s in attempts} == {
        ("pgjournal.run leaf", True), ("pgjournal.run parent", True)}
