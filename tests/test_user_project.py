"""A newcomer's project, as docs/testing.md describes it, in a virtual
environment of its own: pgjournal installed from this checkout's path (it is
not on PyPI), the project installed with `pip install -e '.[test]'`, and its
tests run once on the zero-setup default (embedded server) and once with the
doc's testcontainers conftest against a real Docker engine.

The second run needs an engine (``DOCKER_HOST`` or the default socket) and a
PostgreSQL image it has (``PGJOURNAL_TEST_IMAGE``); it skips, saying why,
elsewhere, and fails instead where CI asked for Docker
(``PGJOURNAL_TEST_PROVIDER=docker``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgjournal.pytest_plugin import _docker_answers

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"

pytestmark = pytest.mark.user_project

WHICH = """
def test_which_server(pgjournal_postgres):
    print("PROVIDER", pgjournal_postgres.provider)
"""


def _doc_blocks() -> tuple[dict[str, str], dict[str, str]]:
    from tests.test_testing_doc import doc_files, doc_variant

    return doc_files(), doc_variant("testcontainers")


def _run(args: list[str], cwd: Path, env: dict[str, str],
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _clean_env(venv: Path) -> dict[str, str]:
    """A newcomer's shell: none of this suite's settings, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGJOURNAL_", "PYTEST_", "DOCKER_", "TESTCONTAINERS_"))
           and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the project's directory, its venv), installed the way the doc says."""
    base = tmp_path_factory.mktemp("newcomer")
    venv, proj = base / "venv", base / "shop"
    files, _ = _doc_blocks()
    for name, text in files.items():
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text(text)
    (proj / "tests" / "test_which.py").write_text(WHICH)
    env = _clean_env(venv)
    _run([sys.executable, "-m", "venv", str(venv)], base, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    _run([*pip, "-e", f"{ROOT}[testing]"], base, env)   # docs/testing.md, "Install"
    _run([*pip, "-e", ".[test]"], proj, env)
    yield proj, venv


def _pytest(proj: Path, venv: Path, env: dict[str, str]) -> str:
    done = _run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-s",
                 "-p", "no:cacheprovider"], proj, env, timeout=300)
    assert "3 passed" in done.stdout, done.stdout
    return done.stdout


def test_newcomer_project_on_the_zero_setup_default(project: tuple[Path, Path]) -> None:
    proj, venv = project
    out = _pytest(proj, venv, _clean_env(venv))
    assert "PROVIDER embedded" in out, out
    assert "pgjournal: postgres provider used = embedded" in out


def test_newcomer_project_on_the_docs_testcontainers_conftest(
        project: tuple[Path, Path]) -> None:
    proj, venv = project
    if not _docker_answers():
        reason = "no Docker engine answers (DOCKER_HOST or the default socket)"
        if os.environ.get("PGJOURNAL_TEST_PROVIDER") == "docker":
            pytest.fail(f"PGJOURNAL_TEST_PROVIDER=docker but {reason}", pytrace=False)
        pytest.skip(reason)
    _, variant = _doc_blocks()
    assert set(variant) == {"tests/conftest.py"}
    conftest = proj / "tests" / "conftest.py"
    conftest.write_text(variant["tests/conftest.py"])
    env = _clean_env(venv)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
          "--disable-pip-version-check", "testcontainers[postgres]"], proj, env)
    for key in ("DOCKER_HOST", "PGJOURNAL_TEST_IMAGE", "TESTCONTAINERS_RYUK_DISABLED"):
        if key in os.environ:
            env[key] = os.environ[key]
    try:
        out = _pytest(proj, venv, env)
    finally:
        conftest.unlink()
    assert "PROVIDER docker" in out, out
    assert "provider used = embedded" not in out
