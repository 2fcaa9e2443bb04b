"""The roles script meets the read side: metrics, the dashboard, the CLI listings.

The reader role (what docs/dba.md gives dashboards and Grafana) must read every
metric, every dashboard page and every CLI listing; the worker role reads none
of them, and each refuses it with a clear "permission denied" naming the reader
role: a 403 page, a failed scrape, a one-line CLI error, never a 500 or a
traceback. The views themselves are checked in tests/test_roles.py.
"""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgjournal
from pgjournal.metrics import collect, query_names

from .test_cli import clean_env, run_cli
from .test_roles import KEYS, Roles, _fill, roles  # noqa: F401  (roles: a fixture)

starlette = pytest.importorskip("starlette", reason="the dashboard extra is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2
    warnings.simplefilter("ignore")
    from starlette.routing import Route
    from starlette.testclient import TestClient

from pgjournal.dashboard import create_app  # noqa: E402
from pgjournal.dashboard._data import query  # noqa: E402
from pgjournal.dashboard._web import HERE  # noqa: E402

TOKEN = "t0ken-for-role-tests"
ORIGIN = "http://testserver"


def _pages(client: TestClient, run: uuid.UUID) -> list[str]:
    """Every GET page of the dashboard, from its routing table (a page added later is
    covered): path parameters filled in, the live stream left to the next test."""
    paths = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route) and "GET" in (route.methods or ()) \
                and route.path != "/events":
            # The failed run's first journal entry is at position 0 (see _fill).
            paths.append(route.path.replace("{run_id}", str(run))
                         .replace("{position:int}", "0"))
    assert not [p for p in paths if "{" in p], paths
    return paths


@pytest.fixture
def dashboard(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(dsn: str, **kw: Any) -> TestClient:
        app = pgjournal.App(dsn, schema=pgjournal_schema, pool_size=2)
        client = TestClient(create_app(app, close_app=True, **kw), base_url=ORIGIN)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:  # before the roles fixture drops the login roles
        c.__exit__(None, None, None)


async def test_every_dashboard_page_as_the_reader_and_the_worker(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        roles: Roles, dashboard: Any) -> None:  # noqa: F811
    run = await _fill(pgjournal_app, pgjournal_dsn, pgjournal_schema)
    as_reader = dashboard(pgjournal_dsn, token=TOKEN, reader_dsn=roles.reader_dsn)
    reader_only = dashboard(roles.reader_dsn)  # the whole dashboard on the reader role
    pages = _pages(as_reader, run)
    assert {"/", "/runs/{run_id}".replace("{run_id}", str(run)), "/queues", "/limits",
            "/metrics"} <= set(pages)
    for client in (as_reader, reader_only):
        answers = {p: client.get(p) for p in pages}
        assert {p: r.status_code for p, r in answers.items()} == dict.fromkeys(pages, 200)
        assert "tenant-c" in answers["/limits"].text  # the keys are on the page
        assert 'pgjournal_concurrency_keys{state="at_limit"} 1' in answers["/metrics"].text
    # Pointed at the worker role, every page that reads says why it cannot.
    as_worker = dashboard(pgjournal_dsn, token=TOKEN, reader_dsn=roles.worker_dsn)
    for page in pages:
        r = as_worker.get(page)
        if page == "/login":
            assert r.status_code == 200
            continue
        assert r.status_code == 403, (page, r.status_code, r.text[:300])
        assert "permission denied" in r.text and "reader role" in r.text, (page, r.text)
        assert "Traceback" not in r.text and "Internal Server Error" not in r.text


def test_every_named_read_of_the_dashboard_runs_as_the_reader(
        pgjournal_dsn: str, pgjournal_schema: str, roles: Roles) -> None:  # noqa: F811
    """The live stream's polls and every other read of dashboard/queries.sql (the
    statements calling a function are the actions, which use the app's own role)."""
    text = (HERE / "queries.sql").read_text()
    names = re.findall(r"^-- name: (\w+)$", text, re.MULTILINE)
    reads = [n for n in names
             if not re.search(r"\{schema\}\.\w+\(|^\s*(INSERT|UPDATE|DELETE)\b",
                              query(n, "x").as_string(None).replace('"x"', "{schema}"),
                              re.MULTILINE)]
    assert {"watch", "newest", "newer_exists", "runs_page", "concurrency_keys"} <= set(reads)
    run = uuid.uuid4()
    known: dict[str, Any] = {
        "run": run, "ids": [run], "top": datetime.now(UTC) - timedelta(days=1),
        "statuses": ["failed"], "limit": 10, "name": "default"}
    refused = {}
    with psycopg.connect(roles.reader_dsn, autocommit=True) as conn:
        for name in reads:
            statement = query(name, pgjournal_schema)
            wanted = set(re.findall(r"%\((\w+)\)s", statement.as_string(None)))
            try:
                conn.execute(statement, {k: known.get(k) for k in wanted}).fetchall()
            except psycopg.Error as exc:
                refused[name] = str(exc).splitlines()[0]
    assert refused == {}


async def test_metrics_scrape_as_the_reader_and_refused_to_the_worker(
        pgjournal_app: pgjournal.App, pgjournal_dsn: str, pgjournal_schema: str,
        roles: Roles) -> None:  # noqa: F811
    await _fill(pgjournal_app, pgjournal_dsn, pgjournal_schema)
    reader = pgjournal.App(roles.reader_dsn, schema=pgjournal_schema, pool_size=1)
    try:
        text = await collect(reader)
    finally:
        await reader.close()
    for name in query_names():  # every statement of sql/metrics.sql ran
        assert f'pgjournal_scrape_query_seconds{{query="{name}"}}' in text
    assert f'pgjournal_concurrency_keys{{state="active"}} {len(KEYS)}' in text
    assert 'pgjournal_concurrency_keys{state="at_limit"} 1' in text
    assert 'pgjournal_rate_bucket_capacity{bucket="tokens"} 100' in text
    worker = pgjournal.App(roles.worker_dsn, schema=pgjournal_schema, pool_size=1)
    try:
        with pytest.raises(pgjournal.PermissionDenied, match="reader role"):
            await collect(worker)
    finally:
        await worker.close()


LISTINGS = [("queues",), ("limits",), ("workers",), ("schedules",), ("runs",),
            ("metrics", "--once")]


def test_cli_listings_as_the_reader_and_the_worker(
        pgjournal_dsn: str, pgjournal_schema: str, roles: Roles) -> None:  # noqa: F811
    env = clean_env()
    for listing in LISTINGS:
        res = run_cli("--dsn", pgjournal_dsn, "--reader-dsn", roles.reader_dsn,
                      "--schema", pgjournal_schema, *listing, env=env)
        assert res.returncode == 0, (listing, res.stderr)
        res = run_cli("--dsn", pgjournal_dsn, "--reader-dsn", roles.worker_dsn,
                      "--schema", pgjournal_schema, *listing, env=env)
        assert res.returncode == 1, (listing, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
        assert "permission denied" in res.stderr and "reader role" in res.stderr, res.stderr
