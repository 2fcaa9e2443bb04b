"""The dashboard over plain HTTP (Starlette's TestClient): pages, filters and
keyset pages, escaping, and the rules of the actions (token, session cookie,
CSRF token, Origin, read-only), each action checked in the database."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import psycopg
import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

import pgjournal
from pgjournal.dashboard import create_app

from .conftest import ROOT

TOKEN = "t0ken-for-tests"
ORIGIN = "http://testserver"
XSS_SCRIPT = "<script>window.__pwned = 1</script>"
XSS_ATTR = '"><img src=x onerror="window.__pwned = 2">'


def sql(dsn: str, schema: str, text: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(text.replace("S.", f'"{schema}".'), args)
        return cur.fetchall() if cur.description else []


def add_run(dsn: str, schema: str, *, status: str = "failed", workflow: str = "research",
            queue: str = "default", created: datetime | None = None, key: str | None = None,
            input_: Any = None, output: Any = None, error: Any = None,
            parent: uuid.UUID | None = None) -> uuid.UUID:
    """A run row as the SQL functions would leave it (ended runs have no due_at)."""
    rid = uuid.uuid4()
    ended = status in ("completed", "failed", "cancelled", "dead")
    now = created or datetime.now(UTC)
    sql(dsn, schema,
        "INSERT INTO S.runs (id, workflow, queue, status, input, output, error, due_at, "
        "created_at, started_at, finished_at, concurrency_key, parent_run_id, max_attempts) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1)",
        rid, workflow, queue, status, json.dumps(input_ if input_ is not None else {}),
        None if output is None else json.dumps(output),
        None if error is None else json.dumps(error),
        None if ended or status == "suspended" else now, now, now,
        now + timedelta(seconds=2) if ended else None, key, parent)
    return rid


def add_step(dsn: str, schema: str, run: uuid.UUID, position: int, name: str, *,
             status: str = "completed", output: Any = None, error: Any = None) -> None:
    sql(dsn, schema,
        "INSERT INTO S.steps (run_created_at, run_id, position, name, occurrence, status, "
        "output, error, lease_epoch) VALUES (S.run_bucket(%s), %s, %s, %s, 0, %s, %s, %s, 1)",
        run,
        run, position, name, status, None if output is None else json.dumps(output),
        None if error is None else json.dumps(error))


def status_of(dsn: str, schema: str, run: uuid.UUID) -> str:
    return str(sql(dsn, schema, "SELECT status FROM S.runs WHERE id = %s", run)[0][0])


def actions_of(dsn: str, schema: str, run: uuid.UUID) -> list[dict[str, Any]]:
    return [r[0] for r in sql(dsn, schema, "SELECT detail FROM S.run_events WHERE run_id = %s "
                              "AND detail->>'event' = 'dashboard_action' ORDER BY id", run)]


@pytest.fixture
def client_for(pgjournal_dsn: str, pgjournal_schema: str) -> Iterator[Any]:
    """``client_for(token=..., read_only=..., reader_dsn=...)`` -> a TestClient."""
    clients: list[TestClient] = []

    def make(**kw: Any) -> TestClient:
        app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, pool_size=2)
        client = TestClient(create_app(app, close_app=True, **kw), base_url=ORIGIN)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


class _Markup(HTMLParser):
    """Collects what could execute: inline scripts, on* attributes, img elements."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = [k for k, _ in attrs]
        if tag == "img" or (tag == "script" and "src" not in names):
            self.found.append(tag)
        self.found += [f"{tag}[{k}]" for k in names if k.startswith("on")]


def active_markup(html: str) -> list[str]:
    parser = _Markup()
    parser.feed(html)
    return parser.found


def login(client: TestClient, name: str = "ada") -> str:
    """Log in; the CSRF token of the new session (from a page's form)."""
    r = client.post("/login", data={"token": TOKEN, "name": name, "next": "/"},
                    headers={"origin": ORIGIN}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/").text
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m, "a logged-in page carries the CSRF token in its forms"
    return m.group(1)


def test_pages_render_read_only_without_token(client_for: Any, pgjournal_dsn: str,
                                              pgjournal_schema: str) -> None:
    failed = add_run(pgjournal_dsn, pgjournal_schema, error={"type": "ValueError",
                                                              "message": "boom"})
    add_step(pgjournal_dsn, pgjournal_schema, failed, 0, "fetch", output={"n": 1})
    child = add_run(pgjournal_dsn, pgjournal_schema, status="queued", parent=failed)
    c = client_for()
    home = c.get("/")
    assert home.status_code == 200
    assert str(failed)[:8] in home.text and "read-only" in home.text
    assert "content-security-policy" in home.headers
    assert "script-src 'self'" in home.headers["content-security-policy"]
    run = c.get(f"/runs/{failed}")
    assert run.status_code == 200
    for text in ("fetch", "boom", str(child), "events", "attempt"):
        assert text in run.text
    assert f'href="/runs/{failed}"' in c.get(f"/runs/{child}").text  # the parent link
    assert 'name="csrf"' not in run.text and 'id="retry"' not in run.text
    for page in ("/queues", "/workers", "/limits", "/schedules", "/login"):
        assert c.get(page).status_code == 200, page
    assert c.get(f"/runs/{uuid.uuid4()}").status_code == 404
    assert c.get("/runs/not-a-uuid").status_code == 404
    # No token configured: every action is refused, logged in or not.
    r = c.post(f"/runs/{failed}/retry", data={"csrf": "x"}, headers={"origin": ORIGIN})
    assert r.status_code == 403 and "read-only" in r.text
    r = c.post("/login", data={"token": ""}, headers={"origin": ORIGIN})
    assert r.status_code == 403
    assert status_of(pgjournal_dsn, pgjournal_schema, failed) == "failed"


def test_actions_need_login_csrf_and_same_origin(client_for: Any, pgjournal_dsn: str,
                                                 pgjournal_schema: str) -> None:
    run = add_run(pgjournal_dsn, pgjournal_schema)
    c = client_for(token=TOKEN)
    assert "log in to act" in c.get("/").text
    # Not logged in.
    r = c.post(f"/runs/{run}/retry", data={"csrf": "x"}, headers={"origin": ORIGIN})
    assert r.status_code == 403 and "log in" in r.text
    # A wrong token.
    r = c.post("/login", data={"token": "guess", "next": "/"}, headers={"origin": ORIGIN},
               follow_redirects=False)
    assert r.status_code == 403 and "sec" not in r.cookies
    # Logging in from another site is refused too.
    r = c.post("/login", data={"token": TOKEN}, headers={"origin": "http://evil.example"},
               follow_redirects=False)
    assert r.status_code == 403
    r = c.post("/login", data={"token": TOKEN, "name": "ada", "next": "//evil.example/"},
               headers={"origin": ORIGIN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    csrf = login(c)
    # Without the CSRF token, with a wrong one, or from another origin: refused.
    for data, headers in (({}, {"origin": ORIGIN}), ({"csrf": "0" * 64}, {"origin": ORIGIN}),
                          ({"csrf": csrf}, {"origin": "http://evil.example"}),
                          ({"csrf": csrf}, {"referer": "http://evil.example/x"})):
        r = c.post(f"/runs/{run}/retry", data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403, (data, headers)
    assert status_of(pgjournal_dsn, pgjournal_schema, run) == "failed"
    # A GET never changes anything.
    assert c.get(f"/runs/{run}/retry").status_code == 405
    # The real thing.
    r = c.post(f"/runs/{run}/retry", data={"csrf": csrf}, headers={"origin": ORIGIN},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/runs/{run}"
    assert status_of(pgjournal_dsn, pgjournal_schema, run) == "queued"
    [note] = actions_of(pgjournal_dsn, pgjournal_schema, run)
    assert note["action"] == "retry" and note["by"].startswith("ada (")
    page = c.get(f"/runs/{run}").text
    assert "queued again" in page  # the flash message
    assert "retry by ada" in page  # the event, on the run page
    # Retrying a run that is not failed: refused by retry_run, said on the page.
    r = c.post(f"/runs/{run}/retry", data={"csrf": csrf}, headers={"origin": ORIGIN})
    assert "not retried" in r.text
    # Logging out ends the session: the old cookie is gone.
    c.post("/logout", headers={"origin": ORIGIN})
    r = c.post(f"/runs/{run}/cancel", data={"csrf": csrf}, headers={"origin": ORIGIN})
    assert r.status_code == 403


def test_read_only_flag_wins_over_token(client_for: Any, pgjournal_dsn: str,
                                        pgjournal_schema: str) -> None:
    run = add_run(pgjournal_dsn, pgjournal_schema)
    c = client_for(token=TOKEN, read_only=True)
    r = c.post("/login", data={"token": TOKEN}, headers={"origin": ORIGIN})
    assert r.status_code == 403
    assert "read-only" in c.get(f"/runs/{run}").text


def test_cancel_signal_queue_actions(client_for: Any, pgjournal_dsn: str,
                                     pgjournal_schema: str) -> None:
    parent = add_run(pgjournal_dsn, pgjournal_schema, status="queued", queue="agents")
    child = add_run(pgjournal_dsn, pgjournal_schema, status="queued", parent=parent)
    waiting = add_run(pgjournal_dsn, pgjournal_schema, status="queued")
    c = client_for(token=TOKEN)
    csrf = login(c, "grace")
    h = {"origin": ORIGIN}
    r = c.post(f"/runs/{waiting}/signal", headers=h,
               data={"csrf": csrf, "name": "approval", "payload": '{"ok": true}'})
    assert "signal &#39;approval&#39; sent" in r.text or "signal 'approval' sent" in r.text
    assert sql(pgjournal_dsn, pgjournal_schema, "SELECT name, payload FROM S.signals "
               "WHERE run_id = %s", waiting) == [("approval", {"ok": True})]
    r = c.post(f"/runs/{waiting}/signal", headers=h,
               data={"csrf": csrf, "name": "approval", "payload": "{not json"})
    assert "not JSON" in r.text
    r = c.post(f"/runs/{parent}/cancel", headers=h, data={"csrf": csrf, "children": "on"})
    assert "cancelled" in r.text
    assert status_of(pgjournal_dsn, pgjournal_schema, parent) == "cancelled"
    assert status_of(pgjournal_dsn, pgjournal_schema, child) == "cancelled"
    assert [a["action"] for a in actions_of(pgjournal_dsn, pgjournal_schema, parent)] == \
        ["cancel"]
    assert [a["action"] for a in actions_of(pgjournal_dsn, pgjournal_schema, waiting)] == \
        ["signal"]
    # Queues: pause, set a limit, resume; the limit survives the resume.
    c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "pause"})
    c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "limit", "limit": "3"})
    assert sql(pgjournal_dsn, pgjournal_schema, "SELECT paused, concurrency_limit "
               "FROM S.queues WHERE name = 'agents'") == [(True, 3)]
    r = c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "resume"})
    assert sql(pgjournal_dsn, pgjournal_schema, "SELECT paused, concurrency_limit "
               "FROM S.queues WHERE name = 'agents'") == [(False, 3)]
    assert "queue agents: running, limit 3" in r.text
    r = c.post("/queues/agents", headers=h, data={"csrf": csrf, "action": "limit",
                                                  "limit": "-2"})
    assert "a concurrency limit must be at least 1" in r.text  # as `pgjournal queues` says


def test_filters_keyset_pages_and_bulk(client_for: Any, pgjournal_dsn: str,
                                       pgjournal_schema: str) -> None:
    t0 = datetime.now(UTC) - timedelta(hours=1)
    # 120 runs, three with the same created_at (the id breaks the tie).
    ids = [add_run(pgjournal_dsn, pgjournal_schema, status="completed",
                   created=t0 + timedelta(seconds=i // 3 * 3)) for i in range(120)]
    failed = [add_run(pgjournal_dsn, pgjournal_schema, workflow="flaky", key="tenant-7",
                      created=t0 + timedelta(minutes=30, seconds=i)) for i in range(3)]
    old = add_run(pgjournal_dsn, pgjournal_schema, workflow="flaky",
                  created=t0 - timedelta(days=3))
    c = client_for(token=TOKEN)
    seen: list[str] = []
    url = "/?status=completed"
    pages = 0
    while url:
        page = c.get(url).text
        pages += 1
        seen += re.findall(r'<tr data-run="([0-9a-f-]+)"', page)
        m = re.search(r'id="older" href="([^"]+)"', page)
        url = m.group(1).replace("&amp;", "&") if m else ""
    assert pages == 3 and len(seen) == 120 and set(seen) == {str(i) for i in ids}
    by_key = re.findall(r'<tr data-run="([0-9a-f-]+)"', c.get("/?key=tenant-7").text)
    assert sorted(by_key) == sorted(map(str, failed))
    recent = re.findall(r'<tr data-run="([0-9a-f-]+)"', c.get(
        "/?workflow=flaky&since=2d").text)
    assert str(old) not in recent and len(recent) == 3
    assert "since: " in c.get("/?since=banana").text  # said, not a 500
    # Bulk retry of what the filter shows (the old one is outside the time window).
    csrf = login(c)
    form = {"csrf": csrf, "action": "retry", "workflow": "flaky", "since": "2d"}
    r = c.post("/bulk", headers={"origin": ORIGIN}, data=form)  # asks first
    assert "3 runs (failed, dead, cancelled) match" in r.text and 'id="confirm"' in r.text
    assert status_of(pgjournal_dsn, pgjournal_schema, failed[0]) == "failed"
    r = c.post("/bulk", headers={"origin": ORIGIN}, data={**form, "confirm": "yes"})
    assert "3 runs retried" in r.text
    for run in failed:
        assert status_of(pgjournal_dsn, pgjournal_schema, run) == "queued"
        [note] = actions_of(pgjournal_dsn, pgjournal_schema, run)
        assert note["bulk"] is True and note["action"] == "retry"
    assert status_of(pgjournal_dsn, pgjournal_schema, old) == "failed"
    r = c.post("/bulk", headers={"origin": ORIGIN},
               data={"csrf": csrf, "action": "cancel", "key": "tenant-7", "confirm": "yes"})
    assert "3 runs cancelled" in r.text
    r = c.post("/bulk", headers={"origin": ORIGIN},
               data={"csrf": csrf, "action": "cancel", "key": "tenant-7"})
    assert "No run matching these filters can be cancelled" in r.text


def test_user_values_are_escaped(client_for: Any, pgjournal_dsn: str,
                                 pgjournal_schema: str) -> None:
    run = add_run(pgjournal_dsn, pgjournal_schema, workflow=XSS_ATTR, queue="q",
                  input_={"topic": XSS_SCRIPT, XSS_ATTR: 1}, key=XSS_ATTR,
                  error={"type": XSS_SCRIPT, "message": XSS_ATTR})
    add_step(pgjournal_dsn, pgjournal_schema, run, 0, XSS_SCRIPT, output=XSS_ATTR)
    add_step(pgjournal_dsn, pgjournal_schema, run, 1, XSS_ATTR, status="failed",
             error={"type": "E", "message": XSS_SCRIPT})
    c = client_for(token=TOKEN)
    login(c, name=XSS_ATTR)
    c.post(f"/runs/{run}/retry", headers={"origin": ORIGIN},
           data={"csrf": login(c, name=XSS_ATTR)})
    for page in (f"/runs/{run}", "/", f"/?key={XSS_ATTR}", f"/?workflow={XSS_SCRIPT}"):
        html = c.get(page).text
        assert "<script>window" not in html and "<img src=x" not in html, page
        assert active_markup(html) == [], page
    html = c.get(f"/runs/{run}").text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    assert "retry by &#34;&gt;&lt;img" in html  # the actor's name, escaped too


def test_reader_dsn_reads_through_another_role(client_for: Any, pgjournal_dsn: str,
                                               pgjournal_schema: str) -> None:
    run = add_run(pgjournal_dsn, pgjournal_schema)
    role = f"dash_reader_{uuid.uuid4().hex[:8]}"
    sql(pgjournal_dsn, pgjournal_schema, f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    try:
        sql(pgjournal_dsn, pgjournal_schema,
            f'GRANT USAGE ON SCHEMA "{pgjournal_schema}" TO {role}; '
            f'GRANT SELECT ON ALL TABLES IN SCHEMA "{pgjournal_schema}" TO {role}')
        reader = psycopg.conninfo.make_conninfo(pgjournal_dsn, user=role,
                                                password=f"pw-{role}")
        c = client_for(token=TOKEN, reader_dsn=reader)
        for page in ("/", f"/runs/{run}", "/queues", "/workers", "/limits", "/schedules"):
            assert c.get(page).status_code == 200, page
        assert sql(pgjournal_dsn, pgjournal_schema, "SELECT count(*) FROM pg_stat_activity "
                   "WHERE usename = %s", role)[0][0] >= 1
        # Actions still go through the app's own connection (the reader cannot write).
        csrf = login(c)
        c.post(f"/runs/{run}/retry", headers={"origin": ORIGIN}, data={"csrf": csrf})
        assert status_of(pgjournal_dsn, pgjournal_schema, run) == "queued"
        c.__exit__(None, None, None)  # closes the reader pool before the role goes
    finally:
        sql(pgjournal_dsn, pgjournal_schema,
            f'REVOKE ALL ON ALL TABLES IN SCHEMA "{pgjournal_schema}" FROM {role}; '
            f'REVOKE ALL ON SCHEMA "{pgjournal_schema}" FROM {role}; DROP ROLE {role}')


def test_live_poller_reports_changes_and_newer_runs(pgjournal_dsn: str,
                                                    pgjournal_schema: str) -> None:
    from pgjournal.dashboard._live import Subscriber
    from pgjournal.dashboard._web import Dashboard

    run = add_run(pgjournal_dsn, pgjournal_schema, status="queued")

    async def go() -> None:
        app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, pool_size=2)
        dash = Dashboard(app, token=None, read_only=True, reader_dsn=None,
                         poll_interval=0.05, close_app=True)
        try:
            [row] = await dash.fetch("runs_page", limit=5, status=None, workflow=None,
                                     queue=None, key=None, since=None, until=None,
                                     cursor_at=None, cursor_id=None)
            from pgjournal.dashboard._data import fingerprint
            sub = Subscriber(runs={run: fingerprint(row)}, top=row["created_at"],
                             filters={"status": None, "workflow": "other", "queue": None,
                                      "key": None})
            await dash.live.poll()  # nothing changed: nothing said
            assert sub.queue.empty()
            dash.live.subscribe(sub)
            sql(pgjournal_dsn, pgjournal_schema,
                "UPDATE S.runs SET status = 'cancelled', due_at = NULL, "
                "updated_at = now() WHERE id = %s", run)
            event, data = await asyncio.wait_for(sub.queue.get(), 5)
            assert event == "run" and data["status"] == "cancelled"
            add_run(pgjournal_dsn, pgjournal_schema, workflow="research")  # not "other"
            await asyncio.sleep(0.3)
            assert sub.queue.empty()
            add_run(pgjournal_dsn, pgjournal_schema, workflow="other")
            event, _ = await asyncio.wait_for(sub.queue.get(), 5)
            assert event == "newer"
            dash.live.unsubscribe(sub)
            polls = dash.live.polls
            await asyncio.sleep(0.3)
            assert dash.live.polls <= polls + 1  # no page open: the poller stops
        finally:
            await dash.close()

    asyncio.run(go())


@pytest.mark.parametrize(("direct_url", "hint"), [
    ('{"url": "file:///home/ann/src/pgjournal", "dir_info": {"editable": true}}',
     "pip install -e '/home/ann/src/pgjournal[dashboard]'"),
    ('{"url": "file:///tmp/pgjournal-0.1.0-py3-none-any.whl", "archive_info": {}}',
     "pip install '/tmp/pgjournal-0.1.0-py3-none-any.whl[dashboard]'"),
    (None, "pip install 'pgjournal[dashboard]'"),
])
def test_install_hint_names_the_clone_it_was_installed_from(
        monkeypatch: pytest.MonkeyPatch, direct_url: str | None, hint: str) -> None:
    """From a clone, `pip install 'pgjournal[dashboard]'` fails (not on PyPI)."""
    from importlib import metadata

    from pgjournal._install import extra_hint

    class Dist:
        def read_text(self, name: str) -> str | None:
            return direct_url if name == "direct_url.json" else None

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist())
    assert extra_hint("dashboard") == hint


def test_cli_without_the_extra_says_so(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import pgjournal.dashboard as dashboard
    from pgjournal.cli import main

    monkeypatch.setattr(dashboard, "missing_packages", lambda: ["starlette", "uvicorn"])
    assert main(["dashboard", "--dsn", "postgresql://nobody@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert dashboard.INSTALL_HINT in err and "[dashboard]'" in err and "starlette" in err
    with pytest.raises(pgjournal.ConfigurationError, match="dashboard"):
        create_app(pgjournal.App("postgresql://nobody@127.0.0.1:1/x"))


def test_nothing_imported_without_the_dashboard() -> None:
    code = ("import sys, pgjournal, pgjournal.cli, pgjournal.dashboard; "
            "pgjournal.cli.build_parser(); "
            "bad = [m for m in ('starlette', 'jinja2', 'sse_starlette', 'uvicorn') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_help_and_package_data() -> None:
    out = subprocess.run([sys.executable, "-m", "pgjournal", "dashboard", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--port", "--host", "--read-only", "--token", "--reader-dsn"):
        assert flag in out
    from pathlib import Path

    here = Path(pgjournal.__file__).parent / "dashboard"
    for name in ("queries.sql", "templates/run.html", "static/dashboard.js"):
        assert (here / name).is_file(), name


def test_mounted_under_a_prefix_in_another_starlette_app(pgjournal_dsn: str,
                                                         pgjournal_schema: str) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    run = add_run(pgjournal_dsn, pgjournal_schema)
    app = pgjournal.App(pgjournal_dsn, schema=pgjournal_schema, pool_size=2)
    dashboard = create_app(app, token=TOKEN)
    service = Starlette(routes=[
        Route("/health", lambda _r: PlainTextResponse("ok")),
        Mount("/ops/pgjournal", dashboard),
    ])
    with TestClient(service, base_url=ORIGIN) as c:
        assert c.get("/health").text == "ok"
        home = c.get("/ops/pgjournal/")
        assert home.status_code == 200
        assert f'href="/ops/pgjournal/runs/{run}"' in home.text
        assert 'src="/ops/pgjournal/static/dashboard.js"' in home.text
        assert c.get("/ops/pgjournal/static/dashboard.js").status_code == 200
        r = c.post("/ops/pgjournal/login", data={"token": TOKEN, "name": "ops",
                                                 "next": "/ops/pgjournal/queues"},
                   headers={"origin": ORIGIN}, follow_redirects=False)
        assert r.headers["location"] == "/ops/pgjournal/queues"
        assert "Path=/ops/pgjournal" in r.headers["set-cookie"]
        page = c.get(f"/ops/pgjournal/runs/{run}").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert csrf and f'action="/ops/pgjournal/runs/{run}/retry"' in page
        r = c.post(f"/ops/pgjournal/runs/{run}/retry", data={"csrf": csrf.group(1)},
                   headers={"origin": ORIGIN}, follow_redirects=False)
        assert r.headers["location"] == f"/ops/pgjournal/runs/{run}"
        assert status_of(pgjournal_dsn, pgjournal_schema, run) == "queued"
    # A mounted dashboard's lifespan does not run: its owner closes it.
    asyncio.run(dashboard.state.dashboard.close())
    asyncio.run(app.close())


def test_origin_rules() -> None:
    from pgjournal.dashboard._security import same_origin

    host = {"host": "ops.example.com"}
    assert same_origin({**host, "origin": "https://ops.example.com"})  # TLS proxy in front
    assert same_origin({**host, "origin": "http://ops.example.com"})
    assert same_origin({**host, "referer": "https://ops.example.com/runs/x"})
    assert same_origin(host)  # not a browser: the CSRF token decides
    assert not same_origin({**host, "origin": "https://evil.example"})
    assert not same_origin({**host, "origin": "https://ops.example.com.evil.example"})
    assert not same_origin({**host, "origin": "null"})
    assert not same_origin({**host, "referer": "https://evil.example/ops.example.com"})
    inner = {"host": "127.0.0.1:8080", "origin": "https://ops.example.com"}
    assert not same_origin(inner)
    assert same_origin(inner, ("https://ops.example.com",))


def test_the_command_serves_and_stops(pgjournal_dsn: str, pgjournal_schema: str,
                                      tmp_path: Any) -> None:
    import os
    import signal
    import socket
    import time
    import urllib.request

    run = add_run(pgjournal_dsn, pgjournal_schema)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "dashboard.log").open("w+")
    env = {**os.environ, "PGJOURNAL_DASHBOARD_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgjournal", "--dsn", pgjournal_dsn, "--schema",
         pgjournal_schema, "dashboard", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/runs/{run}",
                                            timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, log.read()
                assert time.monotonic() < deadline, "the dashboard did not answer"
                time.sleep(0.1)
        assert str(run) in page and "log in to act" in page
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log.seek(0)
    out = log.read()
    assert f"pgjournal dashboard: http://127.0.0.1:{port}/" in out
    assert "actions need the token" in out


def test_login_to_read(client_for: Any, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    run = add_run(pgjournal_dsn, pgjournal_schema)
    c = client_for(token=TOKEN, read_only=True, login_to_read=True)
    for page in ("/", f"/runs/{run}", "/queues", "/workers", "/limits", "/schedules"):
        r = c.get(page, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), page
    assert c.get("/events").status_code == 403
    assert c.get("/static/dashboard.css").status_code == 200
    r = c.post("/login", data={"token": TOKEN, "next": f"/runs/{run}"},
               headers={"origin": ORIGIN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/runs/{run}"
    page = c.get(f"/runs/{run}").text
    assert str(run) in page and 'id="retry"' not in page  # read-only still: no actions
    with pytest.raises(pgjournal.ConfigurationError, match="token"):
        create_app(pgjournal.App(pgjournal_dsn, schema=pgjournal_schema), login_to_read=True)


def test_metrics_endpoint_serves_the_gauges(client_for: Any, pgjournal_dsn: str,
                                            pgjournal_schema: str) -> None:
    with psycopg.connect(pgjournal_dsn, autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f'SELECT * FROM "{pgjournal_schema}".start_run(gen_random_uuid(), '
                         "'wf', 'metered_q', '{}'::json)")
    r = client_for().get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    line = [x for x in r.text.splitlines()
            if x.startswith("pgjournal_queue_runs{") and 'queue="metered_q"' in x
            and 'state="due"' in x]
    assert line and line[0].endswith(" 3"), r.text[:2000]


def test_the_command_refuses_a_bad_dsn_or_schema_at_once(pgjournal_dsn: str) -> None:
    for extra, says in ((["--dsn", "postgresql://nobody@127.0.0.1:1/x"], "cannot connect"),
                        (["--dsn", pgjournal_dsn, "--schema", "never_migrated_here"],
                         "pgjournal migrate")):
        res = subprocess.run([sys.executable, "-m", "pgjournal", "dashboard", "--port", "0",
                              *extra], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, res.stderr
        assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


# -- a long run's page (issue 20, row 8) ---------------------------------------------------


def add_steps(dsn: str, schema: str, run: uuid.UUID, first: int, last: int,
              pad: int = 500) -> None:
    """Steps first..last of ``run`` (an agent loop), each with a value of about
    ``pad`` bytes that ends in the marker ``END-<position>``."""
    sql(dsn, schema,
        "INSERT INTO S.steps (run_created_at, run_id, position, name, occurrence, status, "
        "output, lease_epoch, started_at, finished_at) "
        "SELECT S.run_bucket(%s), %s, p, 'think', p, 'completed', "
        "json_build_object('text', repeat('x', %s), 'end', 'END-' || p), 1, now(), now() "
        "FROM generate_series(%s::int, %s::int) p", run, run, pad, first, last)


def positions_in(html: str) -> list[int]:
    return [int(p) for p in re.findall(r'<tr[^>]* data-position="(\d+)"', html)]


def test_a_long_runs_page_is_paged_by_position_and_loads_values_on_demand(
        client_for: Any, pgjournal_dsn: str, pgjournal_schema: str) -> None:
    """5,000 steps of 500 bytes: the page holds the first 50 steps, no full
    values, and weighs what a run of 60 steps weighs; the next page comes by
    keyset (after the last position shown), each value on demand, and a live
    page asks only for the steps after the last one it has."""
    d, s = pgjournal_dsn, pgjournal_schema
    long_run = add_run(d, s, status="running")
    short_run = add_run(d, s, status="running")
    add_steps(d, s, long_run, 0, 4999)
    add_steps(d, s, short_run, 0, 59)
    c = client_for()
    page = c.get(f"/runs/{long_run}")
    assert page.status_code == 200
    short = c.get(f"/runs/{short_run}")
    assert len(page.content) < 80_000, f"the page of 5,000 steps is {len(page.content):,} bytes"
    assert abs(len(page.content) - len(short.content)) < 300, (len(page.content),
                                                               len(short.content))
    assert positions_in(page.text) == list(range(50))
    assert "END-3" not in page.text  # values are not in the page, only their start
    # The next page, by keyset: the fragment the script appends, and the same
    # rows as a whole page without script.
    m = re.search(r'id="more-steps"[^>]* href="([^"]+)"', page.text)
    assert m and m.group(1).endswith("?after=49"), m
    more = c.get(f"/runs/{long_run}/steps?after=49")
    assert more.status_code == 200 and positions_in(more.text) == list(range(50, 100))
    assert len(more.content) < 40_000
    assert positions_in(c.get(f"/runs/{long_run}{m.group(1)}").text) == list(range(50, 100))
    last = c.get(f"/runs/{long_run}/steps?after=4980")
    assert positions_in(last.text) == list(range(4981, 5000))
    assert 'data-more="1"' in more.text and 'data-more="1"' not in last.text
    # A value on demand: the whole of it, as text (the page shows it with textContent).
    value = c.get(f"/runs/{long_run}/steps/4321/value")
    assert value.status_code == 200 and value.headers["content-type"].startswith("text/plain")
    assert "END-4321" in value.text and len(value.text) > 500
    assert c.get(f"/runs/{long_run}/steps/5000/value").status_code == 404
    # Live: the page asks for what is new after the last step it shows.
    add_steps(d, s, long_run, 5000, 5000)
    live = c.get(f"/runs/{long_run}/live?after=4999")
    assert live.status_code == 200 and positions_in(live.text) == [5000]
    assert 'id="live"' in live.text and len(live.content) < 20_000
    # A page that does not show the tail asks for the summary only.
    head = c.get(f"/runs/{long_run}/live")
    assert positions_in(head.text) == [] and 'id="live"' in head.text
    assert c.get(f"/runs/{uuid.uuid4()}/live").status_code == 404
