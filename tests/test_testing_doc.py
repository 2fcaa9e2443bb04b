"""docs/testing.md is executed: its project is written out and its tests run with pytest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"


def doc_files() -> dict[str, str]:
    """The code blocks of the doc that follow a ``<!-- file: PATH -->`` marker."""
    pattern = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", re.S)
    return dict(pattern.findall(DOC.read_text()))


def doc_variant(name: str) -> dict[str, str]:
    """The blocks after ``<!-- variant NAME, file: PATH -->``: files a variant of
    the project adds (tests/test_user_project.py runs them)."""
    pattern = re.compile(rf"<!-- variant {re.escape(name)}, file: (\S+) -->\n```\w*\n(.*?)```",
                         re.S)
    return dict(pattern.findall(DOC.read_text()))


def test_the_testing_recipe_runs_as_written(tmp_path: Path, pgjournal_dsn: str) -> None:
    files = doc_files()
    assert set(files) == {"pyproject.toml", "jobs.py", "tests/test_jobs.py"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PGJOURNAL_") and not k.startswith("PYTEST_")}
    env["PGJOURNAL_TEST_DSN"] = pgjournal_dsn   # the session's server, whichever provider
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout, res.stdout


def test_readme_snippet_runs_as_pasted_with_the_worker_beside_it(
        tmp_path: Path, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Save this as `readme_app.py`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    assert "pgjournal worker readme_app:app" in commands
    (tmp_path / "readme_app.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOURNAL_")}
    env.update(PGJOURNAL_DSN=pgjournal_dsn, PGJOURNAL_SCHEMA=pgjournal_schema,
               PYTHONUNBUFFERED="1")
    pgjournal = [sys.executable, "-m", "pgjournal"]
    worker = subprocess.Popen([*pgjournal, "worker", "readme_app:app"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        res = subprocess.run([sys.executable, "readme_app.py"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=90, check=False)
    finally:
        worker.terminate()
        worker.wait(30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "an outline of durable agents \n"


def test_adapter_docs_list_every_record_field() -> None:
    from pgjournal.adapters.run_store import RunRecord, StepRecord

    doc = (ROOT / "docs" / "adapters.md").read_text()
    for model in (RunRecord, StepRecord):
        for name in model.model_fields:
            assert f"| `{name}` |" in doc, f"{model.__name__}.{name} is not in docs/adapters.md"
