"""The dashboard's queue action and ``pgjournal queues`` accept and refuse the same
changes: one validation (pgjournal/_queue_change.py) for both."""

from __future__ import annotations

import html
from typing import Any

import pytest

from .test_cli import clean_env, run_cli
from .test_dashboard import ORIGIN, TOKEN, add_run, client_for, login, sql  # noqa: F401

pytest.importorskip("starlette", reason="the dashboard extra is not installed")


def _queues(dsn: str, schema: str) -> dict[str, tuple[Any, ...]]:
    return {r[0]: r[1:] for r in sql(dsn, schema,
                                     "SELECT name, concurrency_limit, paused FROM S.queues")}


@pytest.mark.parametrize(("name", "action", "limit"), [
    ("bad-name", "pause", None),       # not a queue name: the CLI says so
    ("Robert'); --", "pause", None),
    ("never_seen", "pause", None),     # a typo: the CLI refuses it without --create
    ("agents", "limit", "0"),          # a limit below 1
    ("agents", "limit", "2.5"),
])
def test_queue_action_refuses_what_the_cli_refuses(
        client_for: Any, pgjournal_dsn: str, pgjournal_schema: str,  # noqa: F811
        name: str, action: str, limit: str | None) -> None:
    add_run(pgjournal_dsn, pgjournal_schema, status="queued", queue="agents")
    before = _queues(pgjournal_dsn, pgjournal_schema)
    args = ["queues", action, name] + ([limit] if limit is not None else [])
    cli = run_cli("--dsn", pgjournal_dsn, "--schema", pgjournal_schema, *args, env=clean_env())
    assert cli.returncode != 0, cli.stdout
    said = cli.stderr.strip().splitlines()[-1].removeprefix("pgjournal: error: ")
    assert _queues(pgjournal_dsn, pgjournal_schema) == before
    c = client_for(token=TOKEN)
    csrf = login(c)
    form = {"csrf": csrf, "action": action} | ({"limit": limit} if limit is not None else {})
    r = c.post(f"/queues/{name}", headers={"origin": ORIGIN}, data=form)
    assert r.status_code == 200 and r.url.path == "/queues", (r.status_code, r.url)
    assert _queues(pgjournal_dsn, pgjournal_schema) == before
    # The same reason, in the same words (the CLI's may add how to override it).
    reason = said.split(" (")[0].split("; ")[0]
    assert reason in html.unescape(r.text), (reason, r.text[:2000])


def test_queue_action_still_changes_a_known_queue(
        client_for: Any, pgjournal_dsn: str, pgjournal_schema: str) -> None:  # noqa: F811
    add_run(pgjournal_dsn, pgjournal_schema, status="queued", queue="agents")
    c = client_for(token=TOKEN)
    csrf = login(c)
    h = {"origin": ORIGIN}
    c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "limit", "limit": "4"})
    c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "pause"})
    assert _queues(pgjournal_dsn, pgjournal_schema) == {"agents": (4, True)}
    r = c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "limit", "limit": ""})
    assert _queues(pgjournal_dsn, pgjournal_schema) == {"agents": (None, True)}
    assert "queue agents: paused, limit none" in r.text
