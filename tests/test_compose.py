"""docker/compose.yaml on a real Docker engine: PostgreSQL, the demo's starter
and three worker containers built from docker/Dockerfile; worker-2 is killed
(`docker kill`, SIGKILL) while it holds runs, and the starter must still report
every run finished with no step executed twice.

Needs an engine (``DOCKER_HOST`` or the default socket) and Compose (``docker
compose`` or ``docker-compose``); skips, saying why, elsewhere. Where nothing
can be pulled, ``docker/local-images.sh`` builds the bases and
``PGJOURNAL_BASE_IMAGE`` / ``PGJOURNAL_POSTGRES_IMAGE`` name them (CI does
this). ``PGJOURNAL_TEST_COMPOSE=1`` turns every skip into a failure, so CI
cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgjournal.pytest_plugin import _docker_answers

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
IMAGE = "pgjournal:dev"
# What the build needs (docker/Dockerfile.dockerignore says the same for BuildKit).
CONTEXT = ["pyproject.toml", "README.md", "pgjournal", "sql", "docker/entrypoint.sh",
           "docker/Dockerfile"]


def _unavailable(reason: str) -> None:
    if os.environ.get("PGJOURNAL_TEST_COMPOSE") == "1":
        pytest.fail(f"PGJOURNAL_TEST_COMPOSE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _sh(*args: str, check: bool = True, timeout: float = 300,
        **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done  # type: ignore[no-any-return]


@pytest.fixture
def compose() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``compose("up", "-d")``: Compose on docker/compose.yaml under a project
    name of this test's own; everything (volumes included) removed afterwards."""
    if not _docker_answers():
        _unavailable("no Docker engine answers (DOCKER_HOST or the default socket)")
    command = _compose_command()
    if command is None:
        _unavailable("neither `docker compose` nor `docker-compose` is installed")
    assert command is not None
    base = os.environ.get("PGJOURNAL_BASE_IMAGE", "python:3.11-slim")
    # The build context goes in as a tar of what the image needs: the legacy
    # builder (no BuildKit) ignores docker/Dockerfile.dockerignore and would
    # otherwise send the whole checkout, virtual environment included.
    tar = subprocess.Popen(["tar", "-c", "--exclude=__pycache__", *CONTEXT], cwd=ROOT,
                           stdout=subprocess.PIPE)
    # --network host: an engine started with --iptables=false (as CI's is)
    # gives build containers no route out; pip needs PyPI.
    build = subprocess.run(["docker", "build", "-q", "--network", "host",
                            "--build-arg", f"BASE_IMAGE={base}", "-f", "docker/Dockerfile",
                            "-t", IMAGE, "-"], stdin=tar.stdout, capture_output=True,
                           text=True, timeout=600, check=False)
    tar.wait()
    if build.returncode != 0:
        _unavailable(f"`docker build` of {IMAGE} on {base} failed: {build.stderr[-800:]}")
    project = f"pgjt{uuid.uuid4().hex[:8]}"

    def run(*args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _sh(*command, "-p", project, "-f", str(DOCKER / "compose.yaml"), *args,
                   check=check, timeout=timeout, cwd=DOCKER)

    try:
        yield run
    finally:
        if os.environ.get("PGJOURNAL_TEST_COMPOSE_KEEP") != "1":
            run("down", "-v", "--remove-orphans", check=False, timeout=120)


def test_compose_stack_survives_a_killed_worker_container(
        compose: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    def container(service: str) -> str:
        return compose("ps", "-q", service).stdout.strip()

    def address(service: str) -> str:
        return _sh("docker", "inspect", "-f",
                   "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                   container(service)).stdout.strip()

    # The database straight over the compose network (the host reaches its
    # bridge): a query costs milliseconds, not a `docker compose exec` process
    # (about a second on a loaded machine, longer than a paused worker's lease).
    db_dsn: list[str] = []

    def number(query: str) -> int:
        if not db_dsn:
            db_dsn.append(f"postgresql://pgjournal:pgjournal@{address('postgres')}:5432/"
                          "pgjournal?connect_timeout=5")
        try:
            with psycopg.connect(db_dsn[0], autocommit=True) as conn:
                conn.execute("SET search_path TO pgjournal_demo")
                row = conn.execute(query).fetchone()
        except psycopg.Error:
            return 0  # not up yet, or the schema is not there yet
        return int(row[0]) if row and row[0] is not None else 0

    def wait(what: str, check: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + \
                compose("logs", "--tail", "30", check=False).stdout[-4000:]
            time.sleep(0.2)

    held = ("SELECT count(*) FROM runs r JOIN workers w ON w.id = r.worker_id "
            "WHERE w.host = 'worker-2' AND r.status = 'running'")
    # Side effects in worker-2's runs whose step result is not committed: a kill
    # then would re-run that step (the promise covers committed steps).
    unjournaled = ("SELECT count(*) FROM demo_effects x JOIN runs r ON r.id = x.run_id "
                   "JOIN workers w ON w.id = r.worker_id WHERE w.host = 'worker-2' "
                   "AND r.status = 'running' AND NOT EXISTS (SELECT 1 FROM steps s "
                   "WHERE s.run_id = x.run_id AND s.name = x.step AND s.status = 'completed')")

    compose("up", "-d", "--no-build", timeout=600)
    wait("worker-2 to hold runs", lambda: number(held) >= 1)

    def kill_worker_2_between_steps() -> bool:
        """`docker kill worker-2` at a moment when it holds runs and every side
        effect of theirs is journaled: frozen first (`docker pause`, short:
        checked again at once, thawed unless it may die), then killed."""
        if number(held) < 1 or number(unjournaled) > 0:
            return False  # not now: no pause at all
        name, ip = container("worker-2"), address("worker-2")
        _sh("docker", "pause", name)
        # What it had sent lands: no statement of its connections still running.
        deadline = time.monotonic() + 10
        while number("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                     f"AND client_addr = '{ip}'") and time.monotonic() < deadline:
            time.sleep(0.02)
        if number(held) >= 1 and number(unjournaled) == 0:
            _sh("docker", "kill", name)  # SIGKILL, even while frozen
            return True
        _sh("docker", "unpause", name)
        return False

    wait("worker-2 to be killed holding runs", kill_worker_2_between_steps, timeout=180)
    assert _sh("docker", "inspect", "-f", "{{.State.ExitCode}}",
               container("worker-2")).stdout.strip() == "137"

    starter = container("starter")
    exit_code = _sh("docker", "wait", starter, timeout=600).stdout.strip()
    log = _sh("docker", "logs", starter).stdout
    assert exit_code == "0", log[-4000:]
    assert "no step executed twice" in log, log[-4000:]
    assert number("SELECT count(*) FROM runs WHERE recoveries > 0") >= 1  # taken over
    assert number("SELECT count(*) FROM runs WHERE status <> 'completed'") == 0

    compose("stop", "worker-1", "worker-3", timeout=120)  # SIGTERM: a clean stop
    for service in ("worker-1", "worker-3"):
        code = _sh("docker", "inspect", "-f", "{{.State.ExitCode}}",
                   container(service)).stdout.strip()
        assert code == "0", compose("logs", "--tail", "40", service).stdout
