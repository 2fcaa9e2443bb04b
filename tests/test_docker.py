"""docker/: what can be checked without a Docker engine.

The compose file parses and wires the expected services; every pgjournal
command in it is accepted by the real CLI; the image's entry point runs here,
outside Docker; and the compose topology itself (the starter, its health
check, three workers started through the entry point with the compose
commands, one of them killed with SIGKILL) runs against a real PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from pgjournal.cli import build_parser

from .conftest import ROOT

DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
PGJOURNAL_SERVICES = {"starter", "worker-1", "worker-2", "worker-3"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def entry_env(**extra: str) -> dict[str, str]:
    """The environment of a container, minus Docker: the venv's pgjournal on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOURNAL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def entry(*args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env or entry_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


# -- static checks ---------------------------------------------------------------------


def test_compose_has_the_expected_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres"} | PGJOURNAL_SERVICES

    pg = services["postgres"]
    # ${PGJOURNAL_POSTGRES_IMAGE:-postgres:17}: an official image unless one is named
    # (docker/local-images.sh builds one where no registry answers).
    assert re.fullmatch(r"\$\{PGJOURNAL_POSTGRES_IMAGE:-postgres:[\w.-]+\}", pg["image"]), \
        pg["image"]
    assert "pg_isready" in pg["healthcheck"]["test"]
    pg_env = pg["environment"]

    images = set()
    for name in PGJOURNAL_SERVICES:
        svc = services[name]
        build = svc["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        images.add(svc["image"])
        dsn = psycopg.conninfo.conninfo_to_dict(svc["environment"]["PGJOURNAL_DSN"])
        assert dsn["host"] == "postgres"
        assert (dsn["user"], dsn["password"], dsn["dbname"]) == (
            pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
        schema = svc["command"][svc["command"].index("--schema") + 1]
        assert schema == svc["environment"]["PGJOURNAL_SCHEMA"]
    assert len(images) == 1  # one image, built once

    workers = [services[f"worker-{i}"] for i in (1, 2, 3)]
    assert len({w["hostname"] for w in workers}) == 3  # three distinct hosts
    for w in workers:
        assert w["command"][0] == "worker"
        assert w["depends_on"]["starter"]["condition"] == "service_healthy"
    starter = services["starter"]
    assert starter["command"][:3] == ["demo", "--workers", "0"]
    assert starter["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert starter["healthcheck"]["test"][:3] == ["CMD", "pgjournal", "queues"]


def test_compose_commands_are_accepted_by_the_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name in PGJOURNAL_SERVICES:
        command = compose["services"][name]["command"]
        args = parser.parse_args(command)  # exits (SystemExit) on an unknown option
        assert args.command == command[0]
    check = compose["services"]["starter"]["healthcheck"]["test"]
    assert parser.parse_args(check[2:]).command == "queues"

    # The workers serve the queue of the demo's workflow.
    worker = parser.parse_args(compose["services"]["worker-1"]["command"])
    module, _, attr = worker.app.partition(":")
    app = getattr(__import__(module, fromlist=[attr]), attr)
    assert {wf.queue for wf in app.workflows.values()} == set(worker.queue)


def test_dockerfile_copies_what_the_build_needs() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    included = {line[1:] for line in ignore if line.startswith("!")}
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in src.split():
            assert (ROOT / path).exists(), path
            assert path.rstrip("/") in included, f"{path} is excluded from the build context"
    (entrypoint,) = re.findall(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile, re.MULTILINE)
    assert re.search(rf"^COPY docker/entrypoint.sh /usr/local/bin/{entrypoint}$", dockerfile,
                     re.MULTILINE)


def test_image_build_step_installs_a_complete_package(tmp_path: Path) -> None:
    """The Dockerfile's `pip install .`, on exactly what its COPY lines bring in."""
    pytest.importorskip("hatchling")  # the build backend, for an offline build
    dockerfile = (DOCKER / "Dockerfile").read_text()
    context = tmp_path / "build"
    for src in re.findall(r"^COPY (.+) \./\S*$", dockerfile, re.MULTILINE):
        for path in src.split():
            source = ROOT / path
            if source.is_dir():
                shutil.copytree(source, context / path,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                context.mkdir(exist_ok=True)
                shutil.copy(source, context / path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(context)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("pgjournal-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "pgjournal = pgjournal.cli:main" in zf.read(entry_points).decode()
    shipped = {n.removeprefix("pgjournal/") for n in names if n.startswith("pgjournal/sql/")}
    in_repo = {str(f.relative_to(ROOT)) for f in (ROOT / "sql").rglob("*.sql")}
    assert shipped == in_repo  # migrations (views included), queries, roles.sql


# -- the entry point, outside Docker -----------------------------------------------------


def test_entrypoint_runs_outside_docker() -> None:
    top = entry("--help")
    assert top.returncode == 0, top.stderr
    assert "worker" in top.stdout and "demo" in top.stdout
    worker = entry("worker", "--help")
    assert worker.returncode == 0, worker.stderr
    assert "--concurrency" in worker.stdout
    bad = entry("worker", "nowhere.module:app", "--queue", "agents",
                env=entry_env(PGJOURNAL_DSN="postgresql://nobody@127.0.0.1:1/none"))
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr


@pytest.fixture
def demo_schema(pgjournal_dsn: str) -> Iterator[str]:
    """A schema name of the test's own (the demo migrates it itself)."""
    schema = f"t_docker_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_compose_topology_survives_a_killed_worker(
        compose: dict[str, Any], pgjournal_dsn: str, demo_schema: str, tmp_path: Path) -> None:
    """`docker compose up` then `docker compose kill worker-2`, without Docker."""
    services = compose["services"]

    def command(name: str, *extra: str) -> list[str]:
        return [demo_schema if a == "pgjournal_demo" else a
                for a in services[name]["command"]] + list(extra)

    env = entry_env(PGJOURNAL_DSN=pgjournal_dsn, PGJOURNAL_SCHEMA=demo_schema)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}

    def start(name: str, args: list[str]) -> None:
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as fh:
            # PGAPPNAME (read by libpq): the container's connections are told apart
            # in pg_stat_activity, as a DBA would tell hosts apart.
            procs[name] = subprocess.Popen(["sh", str(ENTRYPOINT), *args],
                                           env={**env, "PGAPPNAME": f"{demo_schema}/{name}"},
                                           cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        check = services["starter"]["healthcheck"]["test"][1:]
        check = [demo_schema if a == "pgjournal_demo" else a for a in check]
        return subprocess.run(check, env=env, capture_output=True, check=False,
                              timeout=30).returncode == 0

    def one(query: str, *params: Any) -> int:
        with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(demo_schema)))
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row else 0

    def held(pid: int) -> int:
        return one("SELECT count(*) FROM runs r JOIN workers w ON w.id = r.worker_id "
                   "WHERE w.pid = %s AND r.status = 'running'", pid)

    def unjournaled_effects(pid: int) -> int:
        """Side effects of ``pid`` whose step result is not committed yet."""
        return one("SELECT count(*) FROM demo_effects x WHERE x.pid = %s AND NOT EXISTS "
                   "(SELECT 1 FROM steps s WHERE s.run_id = x.run_id AND s.name = x.step "
                   "AND s.status = 'completed')", pid)

    def busy_backends(name: str) -> int:
        """Statements of container ``name`` that the server is still executing."""
        return one("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                   "AND state = 'active'", f"{demo_schema}/{name}")

    def kill_holding_runs(name: str) -> bool:
        """SIGKILL container ``name`` while it holds runs, at no instant between a
        step's side effect and its journal commit (a crash there re-runs that step:
        the promise covers committed steps, and the starter counts executions)."""
        pid = procs[name].pid
        if held(pid) < 1:
            return False
        assert one("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                   f"{demo_schema}/{name}") > 0, "its connections must be told apart"
        os.kill(pid, signal.SIGSTOP)
        # Writes it had already sent land: wait until the server has finished
        # every statement of its connections (an event, not a delay).
        deadline = time.monotonic() + 30
        while busy_backends(name):
            assert time.monotonic() < deadline, "a stopped worker's statement never ended"
            time.sleep(0.02)
        if held(pid) >= 1 and unjournaled_effects(pid) == 0:
            os.kill(pid, signal.SIGKILL)
            return True
        os.kill(pid, signal.SIGCONT)
        return False

    def poll(what: str, check: Any, timeout: float = 60, every: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            starter = procs["starter"]
            assert starter.poll() is None or what == "the starter to finish", \
                f"starter exited early:\n{logs['starter'].read_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(every)

    try:
        assert not healthy()  # no schema yet: the workers would have to wait
        # Runs at the demo's normal pace, enough of them that worker-2 surely
        # holds runs at a moment when it is safe to kill it (between two steps:
        # its steps spend most of their time inside the step function).
        start("starter", command("starter", "--runs", "24"))
        poll("the starter to become healthy", healthy)
        for i in (1, 2, 3):
            start(f"worker-{i}", command(f"worker-{i}"))
        # docker compose kill worker-2, while it holds runs
        poll("worker-2 to be killed holding runs",
             lambda: kill_holding_runs("worker-2"), every=0.02)

        poll("the starter to finish", lambda: procs["starter"].poll() is not None, 120)
        out = logs["starter"].read_text()
        assert procs["starter"].returncode == 0, out
        assert "no step executed twice" in out
        assert one("SELECT count(*) FROM runs WHERE recoveries > 0") >= 1  # taken over

        for i in (1, 3):  # docker compose stop: SIGTERM, a clean stop
            procs[f"worker-{i}"].send_signal(signal.SIGTERM)
        for i in (1, 3):
            assert procs[f"worker-{i}"].wait(30) == 0, logs[f"worker-{i}"].read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(10)
