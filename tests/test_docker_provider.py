"""The plugin's testcontainers provider against a real Docker engine.

These run where an engine answers (``DOCKER_HOST`` or the default socket) and
skip, saying why, elsewhere. CI starts an engine of its own and builds a
PostgreSQL image with no registry (``docker/local-images.sh``), then runs the
core tests with ``PGJOURNAL_TEST_PROVIDER=docker`` and these.
"""

from __future__ import annotations

import os
import uuid

import pytest

from pgjournal.pytest_plugin import _docker_answers, container_image

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(not _docker_answers(),
                                reason="no Docker engine answers (DOCKER_HOST or the default "
                                       "socket); CI's Docker pass starts one")

USES_DB = """
import psycopg

def test_db(pgjournal_postgres, pgjournal_schema):
    print("PROVIDER", pgjournal_postgres.provider)
    with psycopg.connect(pgjournal_postgres.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
"""


def run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", *args, timeout=240)


def test_forced_docker_provider_serves_a_test(pytester: pytest.Pytester,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGJOURNAL_TEST_DSN", raising=False)
    monkeypatch.setenv("PGJOURNAL_TEST_PROVIDER", "docker")
    pytester.makepyfile(test_user=USES_DB)
    result = run_inner(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PROVIDER docker*",
                                 "*pgjournal: postgres provider used = docker*"])


def test_missing_image_falls_back_to_embedded_with_one_warning(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"pgjournal-local/missing-{uuid.uuid4().hex[:8]}:0"
    monkeypatch.delenv("PGJOURNAL_TEST_DSN", raising=False)
    monkeypatch.delenv("PGJOURNAL_TEST_PROVIDER", raising=False)
    monkeypatch.setenv("PGJOURNAL_TEST_IMAGE", missing)
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    pytester.makepyfile(test_user=USES_DB)
    result = run_inner(pytester)
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "PROVIDER embedded" in out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING: pgjournal:")]
    # Once when it happens, once more in the summary; both name the setting.
    assert len(warnings) == 2 and len(set(warnings)) == 1, warnings
    assert "PGJOURNAL_TEST_IMAGE" in warnings[0] and missing in warnings[0]
    assert "Traceback" not in out


def test_reaper_that_cannot_start_falls_back_naming_the_setting(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGJOURNAL_TEST_DSN", raising=False)
    monkeypatch.delenv("PGJOURNAL_TEST_PROVIDER", raising=False)
    monkeypatch.delenv("TESTCONTAINERS_RYUK_DISABLED", raising=False)
    # An image name no registry can give: the reaper's pull fails as it does here.
    monkeypatch.setenv("RYUK_CONTAINER_IMAGE", f"pgjournal-local/no-ryuk-{uuid.uuid4().hex[:8]}:0")
    pytester.makepyfile(test_user=USES_DB)
    result = run_inner(pytester)
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "PROVIDER embedded" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING: pgjournal:"))
    assert "TESTCONTAINERS_RYUK_DISABLED" in warning, warning


def test_forced_docker_that_cannot_start_is_one_clear_error(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGJOURNAL_TEST_DSN", raising=False)
    monkeypatch.setenv("PGJOURNAL_TEST_PROVIDER", "docker")
    monkeypatch.setenv("PGJOURNAL_TEST_IMAGE", f"pgjournal-local/missing-{uuid.uuid4().hex[:8]}:0")
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    pytester.makepyfile(test_user=USES_DB)
    result = run_inner(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*PGJOURNAL_TEST_PROVIDER=docker: *PGJOURNAL_TEST_IMAGE*"])
    assert "PROVIDER embedded" not in result.stdout.str()


def test_this_session_is_on_the_provider_ci_forced(pgjournal_postgres: object) -> None:
    """CI's Docker pass forces the provider: a fallback would be a silent lie."""
    forced = os.environ.get("PGJOURNAL_TEST_PROVIDER")
    if not forced:
        pytest.skip("PGJOURNAL_TEST_PROVIDER is not set in this session")
    assert pgjournal_postgres.provider == forced  # type: ignore[attr-defined]
    if forced == "docker":
        assert container_image()
