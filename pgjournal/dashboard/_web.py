"""The dashboard's Starlette application: pages, actions, the live event stream."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import psycopg
from psycopg import errors as pgerr
from psycopg_pool import AsyncConnectionPool
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._output import between, compact, human_seconds, shorten, to_json
from .._queue_change import change_queue
from ..app import App
from ..connect import mask_dsn, open_pool
from ..errors import ConfigurationError, PermissionDenied, PgJournalError, SerializationError
from ..roles import permission_denied
from ..store import translate_error
from ._data import (
    BULK_LIMIT,
    CANCELLABLE,
    PAGE_SIZE,
    RETRYABLE,
    STATUSES,
    Row,
    RunFilter,
    cursor_of,
    fingerprint,
    query,
)
from ._live import Live, Subscriber
from ._security import COOKIE, Session, new_cookie, read_cookie, same_origin, token_matches

log = logging.getLogger("pgjournal.dashboard")
HERE = Path(__file__).parent
#: Children listed on a run page (the rest: the runs list filtered by parent).
CHILDREN_SHOWN = 50
#: Steps a page of a run's timeline holds (the next page by keyset: ?after=).
STEPS_PAGE = 50
#: The latest signals and events a run page shows (all of them: pgjournal show).
SIGNALS_SHOWN = 100
EVENTS_SHOWN = 200
FLASH = "pgjournal_dashboard_flash"
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class Forbidden(Exception):
    pass


class Dashboard:
    """The state behind one dashboard application (reachable as ``asgi.state.dashboard``)."""

    def __init__(self, app: App, *, token: str | None, read_only: bool,
                 reader_dsn: str | None, poll_interval: float, close_app: bool,
                 allowed_origins: tuple[str, ...] = (), login_to_read: bool = False) -> None:
        self.app = app
        self.login_to_read = login_to_read
        self.allowed_origins = tuple(o.rstrip("/") for o in allowed_origins)
        self.schema = app.schema
        self.token = token or None
        self.read_only = read_only or not self.token
        self.reader_dsn = reader_dsn
        self.close_app = close_app
        self._reader: AsyncConnectionPool[psycopg.AsyncConnection[Row]] | None = None
        self._reader_lock = asyncio.Lock()
        self._reader_app: App | None = None
        self.live = Live(self.fetch, poll_interval)

    async def _pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Row]]:
        if self.reader_dsn is None:
            return (await self.app.store()).pool
        async with self._reader_lock:
            if self._reader is None:
                self._reader = await open_pool(
                    self.reader_dsn, min_size=1, max_size=4,
                    name=f"pgjournal-dashboard-reader:{mask_dsn(self.reader_dsn)}")
            return self._reader

    def metrics_app(self) -> App:
        """The App the ``/metrics`` scrape reads through: on ``reader_dsn`` when given."""
        if self.reader_dsn is None:
            return self.app
        if self._reader_app is None:
            self._reader_app = App(self.reader_dsn, schema=self.schema, pool_size=1)
        return self._reader_app

    async def fetch(self, name: str, /, **params: Any) -> list[Row]:
        """A named read (``queries.sql``), on the reader pool when there is one."""
        pool = await self._pool()
        try:
            async with pool.connection() as conn:
                try:
                    cur = await conn.execute(query(name, self.schema), params)
                    return await cur.fetchall() if cur.description else []
                except pgerr.InsufficientPrivilege as exc:
                    # A role that may not read (the worker role of sql/roles.sql):
                    # a 403 page naming the reader role, not a 500.
                    raise permission_denied(exc, schema=self.schema,
                                            user=conn.info.user) from exc
        except psycopg.Error as exc:
            raise translate_error(exc, self.schema) from exc

    async def act(self, steps: list[tuple[str, dict[str, Any]]]) -> list[Row]:
        """Named writes in one transaction, on ``app``'s own pool; the first one's rows."""
        store = await self.app.store()
        try:
            async with store.pool.connection() as conn:
                try:
                    async with conn.transaction():
                        first: list[Row] | None = None
                        for name, params in steps:
                            cur = await conn.execute(query(name, self.schema), params)
                            rows = await cur.fetchall() if cur.description else []
                            first = rows if first is None else first
                        return first or []
                except pgerr.InsufficientPrivilege as exc:
                    raise permission_denied(exc, schema=self.schema, user=conn.info.user,
                                            write=True) from exc
        except psycopg.Error as exc:
            raise translate_error(exc, self.schema) from exc

    async def close(self) -> None:
        await self.live.close()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._reader_app is not None:
            await self._reader_app.close()
            self._reader_app = None
        if self.close_app:
            await self.app.close()


# -- template helpers -----------------------------------------------------------------


def _local(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return human_seconds((datetime.now(UTC) - moment).total_seconds()) + " ago"


def _offset(t0: datetime | None, moment: datetime | None) -> str:
    if t0 is None or moment is None:
        return "-"
    return "+" + between(t0, max(moment, t0))


def _took(row: Row) -> str:
    start = row.get("started_at")
    end = row.get("finished_at") or (datetime.now(UTC) if start else None)
    return between(start, end)


def _pretty(value: Any) -> str:
    if value is None:
        return "null"
    try:
        return to_json(value)
    except (TypeError, ValueError):
        return str(value)


def _error(error: Any, width: int = 120) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        return shorten(f"{error.get('type', 'Error')}: {error.get('message', '')}", width)
    return shorten(str(error), width)


def _head(text: Any, width: int = 80) -> str:
    """The start of a value's JSON text (the page never carries whole values)."""
    return shorten(text or "", width)


def _step_error(row: Row, width: int = 80) -> str:
    return shorten(f"{row.get('error_type') or 'Error'}: {row.get('error_message') or ''}",
                   width)


def _interval(value: Any) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else float(value)
    return human_seconds(seconds)


def _cell(value: Any) -> str:
    """Any view column for people: durations, times, numbers, lists."""
    if value is None:
        return "-"
    if isinstance(value, timedelta):
        return human_seconds(value.total_seconds())
    if isinstance(value, datetime):
        return _local(value)
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, list | dict):
        return compact(value, 80)
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value is escaped; step outputs are user data
    )
    env.filters.update(local=_local, ago=_ago, compact=compact, pretty=_pretty,
                       error=_error, took=_took, interval=_interval, cell=_cell, fp=fingerprint,
                       head=_head, step_error=_step_error)
    env.globals.update(offset=_offset, statuses=STATUSES)
    return env


class SecurityHeaders:
    """Adds a strict Content-Security-Policy (no inline script) and friends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, send_with)


# -- the application --------------------------------------------------------------------


def build(app: App, *, token: str | None, read_only: bool, reader_dsn: str | None,
          poll_interval: float, close_app: bool = False,
          allowed_origins: tuple[str, ...] | list[str] = (),
          login_to_read: bool = False) -> Starlette:
    if login_to_read and not token:
        raise ConfigurationError("login_to_read needs a token (nobody could log in)")
    dash = Dashboard(app, token=token, read_only=read_only, reader_dsn=reader_dsn,
                     poll_interval=poll_interval, close_app=close_app,
                     allowed_origins=tuple(allowed_origins), login_to_read=login_to_read)
    templates = Jinja2Templates(env=_environment())

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def session(request: Request) -> Session | None:
        return read_cookie(dash.token, request.cookies.get(COOKIE))

    def render(request: Request, name: str, status_code: int = 200,
               **context: Any) -> Response:
        sess = session(request)
        flash = request.cookies.get(FLASH)
        context.setdefault("events_url", "")
        response = templates.TemplateResponse(request, name, {
            "base": base(request), "schema": dash.schema, "read_only": dash.read_only,
            "login_open": dash.token is not None and (not dash.read_only or dash.login_to_read),
            "session": sess, "can_act": sess is not None and not dash.read_only,
            "csrf": sess.csrf(dash.token) if sess and dash.token else "",
            "flash": _read_flash(flash), "now": datetime.now(UTC),
            "path": request.url.path, **context}, status_code=status_code)
        response.headers["cache-control"] = "no-store"
        if flash:
            response.delete_cookie(FLASH, path=base(request) or "/")
        return response

    def redirect(request: Request, to: str, message: str | None = None,
                 error: bool = False) -> Response:
        response = RedirectResponse(to, status_code=303)
        if message:
            response.set_cookie(FLASH, json.dumps({"text": message, "error": error}),
                                path=base(request) or "/", httponly=True, samesite="strict",
                                max_age=60)
        return response

    async def check_post(request: Request) -> tuple[Session, Any]:
        """The session of an allowed POST and its form; ``Forbidden`` otherwise."""
        if dash.read_only:
            raise Forbidden("this dashboard is read-only" + (
                "" if dash.token else " (no token configured: set "
                "PGJOURNAL_DASHBOARD_TOKEN or --token)"))
        if not same_origin(dict(request.headers), dash.allowed_origins):
            raise Forbidden("cross-origin request refused")
        sess = session(request)
        if sess is None or dash.token is None:
            raise Forbidden("log in with the dashboard token first")
        form = await request.form()
        given = form.get("csrf")
        if not isinstance(given, str) or not hmac.compare_digest(
                given, sess.csrf(dash.token)):
            raise Forbidden("missing or wrong CSRF token (reload the page)")
        return sess, form

    def actor(request: Request, sess: Session) -> str:
        who = sess.name or "dashboard"
        client = request.client.host if request.client else "?"
        return f"{who} ({client})"

    def action(handler: Callable[[Request, Session, Any], Awaitable[Response]]
               ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                sess, form = await check_post(request)
            except Forbidden as exc:
                return PlainTextResponse(f"403 Forbidden: {exc}\n", status_code=403)
            return await handler(request, sess, form)
        return endpoint

    def reader(handler: Callable[[Request], Awaitable[Response]]
               ) -> Callable[[Request], Awaitable[Response]]:
        """With ``login_to_read``, a page or stream only for a logged-in session."""
        async def endpoint(request: Request) -> Response:
            if dash.login_to_read and session(request) is None:
                if request.url.path.endswith("/events"):
                    return PlainTextResponse("403 Forbidden: log in first\n", status_code=403)
                query = urlencode({"next": request.url.path})
                return RedirectResponse(f"{base(request)}/login?{query}", status_code=303)
            return await handler(request)
        return endpoint

    # -- pages ------------------------------------------------------------------------

    @reader
    async def runs_page(request: Request) -> Response:
        f = RunFilter.from_query(request.query_params)
        params = f.params()
        if f.cursor and params["cursor_at"] is None:
            f.cursor = None
        rows = await dash.fetch("runs_page", limit=PAGE_SIZE + 1, **params)
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        choices = await dash.fetch("filter_choices")
        older = f"?{urlencode(f.query_items(cursor=cursor_of(rows[-1])))}" if more else ""
        newest = f"?{urlencode(f.query_items())}"
        live: list[tuple[str, str]] = list(f.query_items())
        if not f.cursor:
            top = rows[0]["created_at"] if rows else datetime.now(UTC)
            live.append(("top", top.isoformat()))
        events_url = f"{base(request)}/events?{urlencode(live)}"
        return render(request, "runs.html", page="runs", rows=rows, f=f, older=older,
                      newest=newest if f.cursor else "", events_url=events_url,
                      queues=[c["value"] for c in choices if c["kind"] == "queue"],
                      workflows=[c["value"] for c in choices if c["kind"] == "workflow"],
                      bulk_limit=BULK_LIMIT, filter_query=urlencode(f.query_items()))

    def position_of(request: Request, default: int | None) -> int | None:
        """The keyset of a steps page: ``?after=<position>`` (-1: from the start)."""
        text = request.query_params.get("after", "")
        try:
            return max(int(text), -1)
        except ValueError:
            return default

    async def run_or_missing(request: Request) -> Row | Response:
        run_id = run_of(request)
        if run_id is None:
            return render(request, "missing.html", status_code=404, page="runs",
                          what=f"{request.path_params['run_id']!r} is not a run id")
        rows = await dash.fetch("run", run=run_id)
        if not rows:
            return render(request, "missing.html", status_code=404, page="runs",
                          what=f"run {run_id} does not exist in schema {dash.schema!r}")
        return rows[0]

    async def steps_after(run: Row, after: int | None) -> dict[str, Any]:
        """One page of the timeline after position ``after`` (keyset; None: none)."""
        if after is None:
            return {"steps": [], "more": False, "last": None, "after": None}
        rows = await dash.fetch("steps_page", run=run["id"], after=after,
                                limit=STEPS_PAGE + 1)
        more = len(rows) > STEPS_PAGE
        rows = rows[:STEPS_PAGE]
        return {"steps": rows, "more": more, "after": after,
                "last": rows[-1]["position"] if rows else after}

    async def run_parts(run: Row) -> dict[str, Any]:
        """The summary, children, signals and events of a run page: each list
        bounded, so the page's weight does not grow with the run's history."""
        run_id = run["id"]
        children = await dash.fetch("children", run=run_id, limit=CHILDREN_SHOWN)
        counts = {r["status"]: r["n"] for r in await dash.fetch("children_counts", run=run_id)}
        signals = await dash.fetch("signals", run=run_id, limit=SIGNALS_SHOWN + 1)
        events = await dash.fetch("events", run=run_id, limit=EVENTS_SHOWN + 1)
        return {"run": run, "children": children, "children_counts": counts,
                "children_total": sum(counts.values()),
                "signals": signals[:SIGNALS_SHOWN][::-1],
                "signals_more": len(signals) > SIGNALS_SHOWN,
                "events": events[:EVENTS_SHOWN][::-1],
                "events_more": len(events) > EVENTS_SHOWN,
                "page_size": STEPS_PAGE,
                "retryable": run["status"] in RETRYABLE,
                "cancellable": run["status"] in CANCELLABLE}

    @reader
    async def run_page(request: Request) -> Response:
        run = await run_or_missing(request)
        if isinstance(run, Response):
            return run
        page = await steps_after(run, position_of(request, -1))
        return render(request, "run.html", page="run", events_url=f"{base(request)}/events",
                      **page, **await run_parts(run))

    @reader
    async def run_steps(request: Request) -> Response:
        """The next page of a run's timeline, as rows the page appends."""
        run = await run_or_missing(request)
        if isinstance(run, Response):
            return run
        page = await steps_after(run, position_of(request, -1))
        return render(request, "run_steps.html", page="run", run=run, **page)

    @reader
    async def run_live(request: Request) -> Response:
        """What a live run page fetches after its run changed: the bounded parts,
        and the steps after ``?after=`` (the last it shows, when it shows the
        tail of the timeline); never the steps it already has."""
        run = await run_or_missing(request)
        if isinstance(run, Response):
            return run
        page = await steps_after(run, position_of(request, None))
        return render(request, "run_live.html", page="run", **page, **await run_parts(run))

    @reader
    async def step_value(request: Request) -> Response:
        """One step's whole value (its error, if it failed), as text: the page
        puts it in with textContent when the value is opened."""
        run_id = run_of(request)
        position = request.path_params["position"]
        rows = [] if run_id is None else await dash.fetch("step_value", run=run_id,
                                                           position=position)
        if not rows:
            return PlainTextResponse(f"no step {position} in run {request.path_params['run_id']}\n",
                                     status_code=404)
        step = rows[0]
        value = step["error"] if step["status"] == "failed" else step["output"]
        response = PlainTextResponse(_pretty(value))
        response.headers["cache-control"] = "no-store"
        return response

    @reader
    async def queues_page(request: Request) -> Response:
        return render(request, "queues.html", page="queues",
                      rows=await dash.fetch("queues"))

    @reader
    async def workers_page(request: Request) -> Response:
        return render(request, "workers.html", page="workers",
                      rows=await dash.fetch("workers"))

    @reader
    async def limits_page(request: Request) -> Response:
        return render(request, "limits.html", page="limits",
                      keys=await dash.fetch("concurrency_keys"),
                      buckets=await dash.fetch("rate_limits"))

    @reader
    async def schedules_page(request: Request) -> Response:
        return render(request, "schedules.html", page="schedules",
                      rows=await dash.fetch("schedules"))

    # -- login ------------------------------------------------------------------------

    def safe_next(request: Request, target: Any) -> str:
        home = base(request) + "/"
        if isinstance(target, str) and target.startswith(home) and not \
                target.startswith("//") and "\\" not in target:
            return target
        return home

    async def login_page(request: Request) -> Response:
        return render(request, "login.html", page="login",
                      next=safe_next(request, request.query_params.get("next")))

    async def login(request: Request) -> Response:
        if dash.token is None or (dash.read_only and not dash.login_to_read):
            return PlainTextResponse("403 Forbidden: this dashboard is read-only\n",
                                     status_code=403)
        if not same_origin(dict(request.headers), dash.allowed_origins):
            return PlainTextResponse("403 Forbidden: cross-origin request refused\n",
                                     status_code=403)
        form = await request.form()
        given, name = form.get("token"), form.get("name")
        target = safe_next(request, form.get("next"))
        if not isinstance(given, str) or not token_matches(dash.token, given):
            await asyncio.sleep(0.5)  # slows down guessing
            return render(request, "login.html", status_code=403, page="login",
                          next=target, error="wrong token")
        assert dash.token is not None
        who = name.strip()[:80] if isinstance(name, str) else ""
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, new_cookie(dash.token, who),
                            path=base(request) or "/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=12 * 3600)
        return response

    async def logout(request: Request) -> Response:
        if not same_origin(dict(request.headers), dash.allowed_origins):
            return PlainTextResponse("403 Forbidden: cross-origin request refused\n",
                                     status_code=403)
        response = RedirectResponse(base(request) + "/", status_code=303)
        response.delete_cookie(COOKIE, path=base(request) or "/")
        return response

    # -- actions ----------------------------------------------------------------------

    def note(request: Request, sess: Session, run: uuid.UUID, what: str,
             **extra: Any) -> tuple[str, dict[str, Any]]:
        detail = {"event": "dashboard_action", "action": what, "by": actor(request, sess),
                  **extra}
        return "note_action", {"run": run, "detail": json.dumps(detail)}

    def run_of(request: Request) -> uuid.UUID | None:
        try:
            return uuid.UUID(request.path_params["run_id"])
        except ValueError:
            return None

    @action
    async def retry(request: Request, sess: Session, form: Any) -> Response:
        run = run_of(request)
        if run is None:
            return PlainTextResponse("404 not a run id\n", status_code=404)
        back = f"{base(request)}/runs/{run}"
        try:
            rows = await dash.act([("retry", {"run": run}), note(request, sess, run, "retry")])
        except PgJournalError as exc:
            return redirect(request, back, f"not retried: {exc}", error=True)
        return redirect(request, back, f"run {rows[0]['status']} again (a new attempt; its "
                        "journaled steps are kept, not redone)")

    @action
    async def cancel(request: Request, sess: Session, form: Any) -> Response:
        run = run_of(request)
        if run is None:
            return PlainTextResponse("404 not a run id\n", status_code=404)
        back = f"{base(request)}/runs/{run}"
        children = form.get("children") == "on"
        try:
            rows = await dash.act([("cancel", {"run": run, "children": children}),
                                   note(request, sess, run, "cancel", children=children)])
        except PgJournalError as exc:
            return redirect(request, back, f"not cancelled: {exc}", error=True)
        status = rows[0]["status"]
        if status != "cancelled":
            return redirect(request, back, f"the run had already ended ({status}); "
                            "not cancelled", error=True)
        return redirect(request, back, "run cancelled" + (
            " with its unfinished child runs" if children else ""))

    @action
    async def signal(request: Request, sess: Session, form: Any) -> Response:
        run = run_of(request)
        if run is None:
            return PlainTextResponse("404 not a run id\n", status_code=404)
        back = f"{base(request)}/runs/{run}"
        name = str(form.get("name") or "").strip()
        text = str(form.get("payload") or "").strip() or "null"
        if not name:
            return redirect(request, back, "a signal needs a name", error=True)
        try:
            payload = json.loads(text)
            dumped = dash.app.serializer.dumps(payload, what=f"payload of signal {name!r}")
        except json.JSONDecodeError as exc:
            return redirect(request, back, f"the payload is not JSON: {exc.msg}", error=True)
        except SerializationError as exc:
            return redirect(request, back, f"not sent: {exc}", error=True)
        try:
            rows = await dash.act([
                ("signal", {"run": run, "name": name, "payload": dumped}),
                note(request, sess, run, "signal", signal=name)])
        except PgJournalError as exc:
            return redirect(request, back, f"not sent: {exc}", error=True)
        return redirect(request, back, f"signal {name!r} sent (#{rows[0]['signal_id']})")

    @action
    async def bulk(request: Request, sess: Session, form: Any) -> Response:
        what = form.get("action")
        f = RunFilter.from_query(form)
        back = f"{base(request)}/?{urlencode(f.query_items())}"
        if what not in ("retry", "cancel"):
            return redirect(request, back, "unknown bulk action", error=True)
        params = f.params()
        if f.errors:
            return redirect(request, back, "; ".join(f.errors), error=True)
        params.pop("cursor_at")
        params.pop("cursor_id")
        statuses = list(RETRYABLE if what == "retry" else CANCELLABLE)
        ids = [r["id"] for r in await dash.fetch("bulk_ids", statuses=statuses,
                                                 limit=BULK_LIMIT, **params)]
        if form.get("confirm") != "yes":
            # First click: say what would change, and ask again.
            return render(request, "confirm.html", page="runs", action=what, f=f,
                          count=len(ids), statuses=statuses, bulk_limit=BULK_LIMIT,
                          back=back)
        done, failed = 0, 0
        for run in ids:  # one short transaction each: no long lock on many runs
            step = (("retry", {"run": run}) if what == "retry"
                    else ("cancel", {"run": run, "children": True}))
            try:
                rows = await dash.act([step, note(request, sess, run, what, bulk=True)])
                ok = what == "retry" or rows[0]["status"] == "cancelled"
                done += ok
                failed += not ok
            except PgJournalError:
                failed += 1
        verb = "retried" if what == "retry" else "cancelled"
        message = f"{done} run{'s' * (done != 1)} {verb}"
        if failed:
            message += f"; {failed} had changed meanwhile and were left alone"
        if len(ids) == BULK_LIMIT:
            message += f" (at most {BULK_LIMIT} per click: repeat for more)"
        return redirect(request, back, message, error=False)

    @action
    async def queue_action(request: Request, sess: Session, form: Any) -> Response:
        name = request.path_params["name"]
        back = f"{base(request)}/queues"
        what = str(form.get("action") or "")
        # A blank limit field lifts the limit; everything else is parsed and checked as
        # `pgjournal queues` does (pgjournal/_queue_change.py): same names, same limits,
        # and no queue the schema has never seen.
        text = str(form.get("limit") or "").strip() or "none"
        try:
            done = await change_queue(dash.app, name, what, text, lift="to stop the queue "
                                      "pause it, to lift the limit leave the field empty")
        except PgJournalError as exc:
            return redirect(request, back, f"not changed: {exc}", error=True)
        log.info("dashboard: %s set queue %s: limit %s, paused %s", actor(request, sess),
                 done.name, done.concurrency_limit, done.paused)
        return redirect(request, back, f"queue {done.name}: " + (
            "paused" if done.paused else "running") + f", limit {done.concurrency_limit or 'none'}")

    # -- live -------------------------------------------------------------------------

    @reader
    async def events(request: Request) -> Response:
        runs: dict[uuid.UUID, str] = {}
        for item in (request.query_params.get("runs") or "").split(",")[:500]:
            rid, _, fp = item.partition("~")
            with contextlib.suppress(ValueError):
                runs[uuid.UUID(rid)] = fp
        top = None
        filters: dict[str, Any] = {}
        if request.query_params.get("top"):
            with contextlib.suppress(ValueError):
                top = datetime.fromisoformat(request.query_params["top"])
            f = RunFilter.from_query(request.query_params)
            filters = {k: v for k, v in f.params().items()
                       if k in ("status", "workflow", "queue", "key")}
        sub = Subscriber(runs=runs, top=top, filters=filters)

        async def stream() -> AsyncIterator[dict[str, str]]:
            dash.live.subscribe(sub)
            try:
                yield {"event": "hello", "data": "{}"}
                while True:
                    event, data = await sub.queue.get()
                    yield {"event": event, "data": json.dumps(data)}
            finally:
                dash.live.unsubscribe(sub)

        return EventSourceResponse(stream(), ping=15, headers={"cache-control": "no-store"})

    @reader
    async def metrics(request: Request) -> Response:
        """The database-wide Prometheus gauges (as ``pgjournal metrics`` serves them)."""
        from ..metrics import collect

        try:
            text = await collect(dash.metrics_app())
        except PermissionDenied as exc:  # e.g. the worker role: it reads no view
            return PlainTextResponse(f"403 Forbidden: scrape refused: {exc}\n",
                                     status_code=403)
        except PgJournalError as exc:
            return PlainTextResponse(f"scrape failed: {exc}\n", status_code=503)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def refused(request: Request, exc: Exception) -> Response:
        """A read or an action the database role may not do: 403 with the reason (which
        names the reader role), on any page, never a 500 with a traceback."""
        if isinstance(exc, pgerr.InsufficientPrivilege):  # outside Dashboard.fetch/act
            exc = permission_denied(exc, schema=dash.schema, user=None)
        log.warning("dashboard: %s %s refused: %s", request.method, request.url.path, exc)
        if request.url.path.endswith("/events"):
            return PlainTextResponse(f"403 Forbidden: {exc}\n", status_code=403)
        return render(request, "denied.html", status_code=403, page="", what=str(exc))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dash.close()

    routes = [
        Route("/", runs_page, name="runs"),
        Route("/runs/{run_id}", run_page, name="run"),
        Route("/runs/{run_id}/steps", run_steps),
        Route("/runs/{run_id}/live", run_live),
        Route("/runs/{run_id}/steps/{position:int}/value", step_value),
        Route("/runs/{run_id}/retry", retry, methods=["POST"]),
        Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
        Route("/runs/{run_id}/signal", signal, methods=["POST"]),
        Route("/bulk", bulk, methods=["POST"]),
        Route("/queues", queues_page, name="queues"),
        Route("/queues/{name}", queue_action, methods=["POST"]),
        Route("/workers", workers_page, name="workers"),
        Route("/limits", limits_page, name="limits"),
        Route("/schedules", schedules_page, name="schedules"),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/events", events),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    asgi = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        PermissionDenied: refused, pgerr.InsufficientPrivilege: refused})
    asgi.add_middleware(SecurityHeaders)
    asgi.state.dashboard = dash
    return asgi


def _read_flash(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("text"), str) else None
