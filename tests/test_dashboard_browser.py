"""The dashboard in a real browser: headless Chromium driven by Selenium.

A server thread runs the dashboard (uvicorn) and an in-process worker on one
event loop; the test drives the browser. A screenshot of each page is saved
under $PGJOURNAL_ARTIFACTS (else the test's tmp_path); with
PGJOURNAL_UPDATE_DOCS_IMG=1 the run page's also goes to docs/img/run-page.png.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

#: Debian's chromium and chromium-driver; PGJOURNAL_CHROMIUM / PGJOURNAL_CHROMEDRIVER
#: name another build (e.g. the packages unpacked without installing them).
CHROMIUM = os.environ.get("PGJOURNAL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PGJOURNAL_CHROMEDRIVER", "/usr/bin/chromedriver")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"browser tests need {CHROMIUM} and {CHROMEDRIVER} "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="the browser tests need selenium (the dev extra)")
pytest.importorskip("uvicorn", reason="the dashboard extra is not installed")

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

import pgjournal  # noqa: E402
from pgjournal.dashboard import create_app  # noqa: E402

from .conftest import ROOT, serving, wait_for  # noqa: E402
from .test_dashboard import (  # noqa: E402
    TOKEN,
    XSS_ATTR,
    XSS_SCRIPT,
    actions_of,
    add_run,
    add_step,
    add_steps,
    sql,
    status_of,
)

#: Set by the test: the retried attempt of "flaky" may finish.
RELEASE = threading.Event()
#: While set, "flaky" fails (its first attempt).
FAILING = threading.Event()


def build_app(dsn: str, schema: str) -> pgjournal.App:
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)

    @app.workflow(max_attempts=1)
    async def flaky(run: Any, topic: str) -> dict[str, Any]:
        notes = await run.step("fetch", lambda: {"topic": topic, "pages": 3})
        await run.step("think", _think)
        await asyncio.to_thread(RELEASE.wait, 20)
        summary = await run.step("summarise", lambda: f"{topic}: {notes['pages']} pages")
        return {"summary": summary}

    @app.workflow()
    async def steady(run: Any, n: int) -> int:
        return int(await run.step("double", lambda: n * 2))

    return app


def _think() -> str:
    if FAILING.is_set():
        raise RuntimeError("the model timed out")
    return "thought"


class Server:
    """Dashboard + worker on one event loop in a thread."""

    def __init__(self, dsn: str, schema: str, browser: webdriver.Chrome) -> None:
        self.browser = browser
        self.app = build_app(dsn, schema)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        asgi = create_app(self.app, token=TOKEN, poll_interval=0.2)
        server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="on",
                                               timeout_graceful_shutdown=1))
        async with serving(self.app, concurrency=4, lease=5):
            task = asyncio.create_task(server.serve(sockets=[self.sock]))

            async def started() -> bool:
                return bool(server.started)

            await wait_for(started, 30, 0.02, "the dashboard to listen")
            self._ready.set()
            await self._stop.wait()
            server.should_exit = True
            await task
        await self.app.close()

    def call(self, coro: Any) -> Any:
        assert self.loop is not None
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def __enter__(self) -> Server:
        self._thread.start()
        assert self._ready.wait(30), "the dashboard did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.browser.get("about:blank")  # close the page's event stream first
        RELEASE.set()
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1360,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    where = os.environ.get("PGJOURNAL_ARTIFACTS")
    path = Path(where) if where else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_until(driver: webdriver.Chrome, check: Callable[[webdriver.Chrome], Any],
               what: str, timeout: float = 15) -> Any:
    """Wait for ``check``; an element the live updates replaced meanwhile is read
    again on the next poll (StaleElementReferenceException is not a failure)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)
                         ).until(check, message=what)


def text_of(driver: webdriver.Chrome, by: str, selector: str) -> str:
    """The text of an element that live updates may replace while it is read."""
    text: str = wait_until(driver, lambda d: d.find_element(by, selector).text + "\0",
                           f"the text of {selector}")
    return text[:-1]


def wait_db(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_in(driver: webdriver.Chrome, url: str, name: str) -> None:
    driver.get(f"{url}/login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "login").click()
    wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "header form button"),
               "the logged-in header")


def test_retry_a_failed_run_and_watch_it_complete_live(
        browser: webdriver.Chrome, artifacts: Path, pgjournal_dsn: str,
        pgjournal_schema: str) -> None:
    RELEASE.clear()
    FAILING.set()
    with Server(pgjournal_dsn, pgjournal_schema, browser) as srv:
        fine = [srv.call(srv.app.start("steady", n)).run_id for n in range(3)]
        failed = srv.call(srv.app.start("flaky", "durable agents")).run_id
        wait_db(lambda: status_of(pgjournal_dsn, pgjournal_schema, failed) == "failed",
                "the first attempt to fail")
        wait_db(lambda: all(status_of(pgjournal_dsn, pgjournal_schema, r) == "completed"
                            for r in fine), "the steady runs")
        log_in(browser, srv.url, "ada")
        assert browser.current_url == f"{srv.url}/"
        wait_until(browser, lambda d: "on" in d.find_element(By.ID, "live-state")
                   .get_attribute("class"), "the live stream to connect")
        browser.save_screenshot(str(artifacts / "runs.png"))

        # Filter to failed: only the failed run is left.
        Select(browser.find_element(By.NAME, "status")).select_by_value("failed")
        browser.find_element(By.ID, "apply-filters").click()
        wait_until(browser, lambda d: "status=failed" in d.current_url, "the filter")
        rows = browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr[data-run]")
        assert [r.get_attribute("data-run") for r in rows] == [str(failed)]
        browser.save_screenshot(str(artifacts / "runs-failed.png"))

        # Open it: the timeline shows the failed step and its error.
        rows[0].find_element(By.CSS_SELECTOR, "td.id a").click()
        wait_until(browser, lambda d: d.find_elements(By.ID, "run-status"), "the run page")
        assert text_of(browser, By.ID, "run-status") == "failed"
        steps = text_of(browser, By.CSS_SELECTOR, "table.steps")
        assert "fetch" in steps and "think" in steps and "the model timed out" in steps

        # Retry; the page then follows the run without being reloaded.
        FAILING.clear()
        browser.find_element(By.ID, "retry").click()
        wait_until(browser, lambda d: "again" in d.find_element(By.CSS_SELECTOR,
                                                                  ".flash").text,
                   "the retry's confirmation")
        browser.execute_script("window.__same_page = 42;")
        assert text_of(browser, By.ID, "run-status") in ("queued", "running")
        wait_until(browser, lambda d: "on" in d.find_element(By.ID, "live-state")
                   .get_attribute("class"), "the live stream to connect")
        t0 = time.monotonic()
        RELEASE.set()
        wait_until(browser, lambda d: d.find_element(By.ID, "run-status").text
                   == "completed", "the status to turn completed live", timeout=20)
        live_seconds = time.monotonic() - t0
        assert browser.execute_script("return window.__same_page;") == 42, "page reloaded"
        # The refreshed section shows the new steps and output, and who retried.
        wait_until(browser, lambda d: "summarise" in d.find_element(
            By.CSS_SELECTOR, "table.steps").text, "the new step in the timeline")
        # The failed entry the retry ran again is shown completed: rows that
        # can still change (failed, streams) are fetched again with the new ones.
        wait_until(browser, lambda d: "completed" in d.find_element(
            By.CSS_SELECTOR, '#step-rows tr[data-position="1"]').text,
                   "the retried step completed in the timeline")
        assert "timed out" not in text_of(browser, By.CSS_SELECTOR,
                                          '#step-rows tr[data-position="1"]')
        assert "durable agents: 3 pages" in text_of(browser, By.ID, "output")
        assert "retry by ada" in text_of(browser, By.CSS_SELECTOR, "table.events")
        [note] = actions_of(pgjournal_dsn, pgjournal_schema, failed)
        assert note["by"].startswith("ada")
        print(f"completed on the page {live_seconds:.2f}s after the worker was released")
        browser.save_screenshot(str(artifacts / "run-page.png"))
        if os.environ.get("PGJOURNAL_UPDATE_DOCS_IMG"):
            (ROOT / "docs" / "img").mkdir(exist_ok=True)
            shutil.copy(artifacts / "run-page.png", ROOT / "docs" / "img" / "run-page.png")

        srv.call(srv.app.set_queue("default", concurrency_limit=8, paused=False))
        for page in ("queues", "workers", "limits", "schedules"):
            browser.get(f"{srv.url}/{page}")
            wait_until(browser, lambda d: d.find_elements(By.TAG_NAME, "h1"), page)
            browser.save_screenshot(str(artifacts / f"{page}.png"))
        browser.get(f"{srv.url}/queues")
        assert "default" in browser.find_element(By.TAG_NAME, "table").text
        browser.get(f"{srv.url}/workers")
        assert "alive" in browser.find_element(By.TAG_NAME, "table").text


def test_user_values_never_execute(browser: webdriver.Chrome, artifacts: Path,
                                   pgjournal_dsn: str, pgjournal_schema: str) -> None:
    run = add_run(pgjournal_dsn, pgjournal_schema, workflow=XSS_ATTR,
                  input_={"topic": XSS_SCRIPT, "note": XSS_ATTR}, key=XSS_SCRIPT,
                  output={"answer": XSS_ATTR},
                  error={"type": XSS_SCRIPT, "message": XSS_ATTR})
    add_step(pgjournal_dsn, pgjournal_schema, run, 0, XSS_SCRIPT, output=XSS_ATTR)
    add_step(pgjournal_dsn, pgjournal_schema, run, 1, XSS_ATTR, status="failed",
             error={"type": "ValueError", "message": XSS_SCRIPT})
    child = add_run(pgjournal_dsn, pgjournal_schema, workflow=XSS_SCRIPT, parent=run,
                    error={"type": "E", "message": XSS_ATTR})
    with Server(pgjournal_dsn, pgjournal_schema, browser) as srv:
        log_in(browser, srv.url, XSS_ATTR)  # the actor's name is user input too
        browser.get(f"{srv.url}/runs/{run}")
        browser.find_element(By.ID, "retry").click()
        wait_until(browser, lambda d: "again" in d.find_element(By.CSS_SELECTOR,
                                                                  ".flash").text, "retry")
        pages = [f"{srv.url}/runs/{run}", f"{srv.url}/", f"{srv.url}/runs/{child}",
                 f"{srv.url}/?workflow={uuid.uuid4()}"]
        for page in pages:
            browser.get(page)
            wait_until(browser, lambda d: d.find_elements(By.TAG_NAME, "main"), page)
            assert browser.execute_script("return typeof window.__pwned;") == "undefined", page
            assert not browser.find_elements(By.CSS_SELECTOR, "main img"), page
        browser.get(f"{srv.url}/runs/{run}")
        body = browser.find_element(By.TAG_NAME, "body").text
        for text in (XSS_SCRIPT, 'onerror="window.__pwned = 2">', "retry by"):
            assert text in body, text
        assert XSS_SCRIPT in browser.find_element(By.CSS_SELECTOR, "table.steps").text
        assert browser.find_element(By.CSS_SELECTOR, "h1 .wf").text == XSS_ATTR
        assert browser.execute_script("return typeof window.__pwned;") == "undefined"
        browser.save_screenshot(str(artifacts / "escaped.png"))


def test_a_long_run_pages_its_steps_loads_values_and_appends_new_steps_live(
        browser: webdriver.Chrome, artifacts: Path, pgjournal_dsn: str,
        pgjournal_schema: str) -> None:
    """120 steps: the page shows 50; "later steps" appends the next pages in
    place; an opened value is fetched then; a step journaled while the page is
    open is appended live, fetched alone (the request asks for the steps after
    the last one shown), and the rows already there are left as they are."""
    d, s = pgjournal_dsn, pgjournal_schema
    run = add_run(d, s, status="running")
    add_steps(d, s, run, 0, 119)

    def rows(drv: webdriver.Chrome) -> list[int]:
        return [int(r.get_attribute("data-position")) for r in
                drv.find_elements(By.CSS_SELECTOR, "#step-rows tr[data-position]")]

    with Server(d, s, browser) as srv:
        browser.get(f"{srv.url}/runs/{run}")
        wait_until(browser, lambda b: "on" in b.find_element(By.ID, "live-state")
                   .get_attribute("class"), "the live stream to connect")
        assert rows(browser) == list(range(50))
        browser.execute_script("window.__same_page = 7;")
        browser.find_element(By.ID, "more-steps").click()
        wait_until(browser, lambda b: rows(b) == list(range(100)), "the second page")
        browser.find_element(By.ID, "more-steps").click()
        wait_until(browser, lambda b: rows(b) == list(range(120)), "the third page")
        assert not browser.find_element(By.ID, "more-steps").is_displayed()
        # A value on demand.
        cell = browser.find_element(By.CSS_SELECTOR,
                                    '#step-rows tr[data-position="7"] details')
        assert "END-7" not in cell.text
        cell.find_element(By.TAG_NAME, "summary").click()
        wait_until(browser, lambda b: "END-7" in b.find_element(
            By.CSS_SELECTOR, '#step-rows tr[data-position="7"] pre').text, "the value")
        # A new step, live: appended, fetched as the steps after 119 only.
        add_steps(d, s, run, 120, 120)
        sql(d, s, "UPDATE S.runs SET updated_at = now() WHERE id = %s", run)
        wait_until(browser, lambda b: rows(b) == list(range(121)), "the new step, live")
        assert browser.execute_script("return window.__same_page;") == 7, "page reloaded"
        fetched = browser.execute_script(
            "return performance.getEntriesByType('resource').map(function (e) "
            "{ return e.name; });")
        assert any(u.endswith(f"/runs/{run}/live?after=119") for u in fetched), fetched
        assert not any(u.endswith(f"/runs/{run}") for u in fetched), fetched
        # The value opened before is still open: rows already shown are kept.
        assert "END-7" in browser.find_element(
            By.CSS_SELECTOR, '#step-rows tr[data-position="7"] pre').text
        browser.save_screenshot(str(artifacts / "long-run.png"))
