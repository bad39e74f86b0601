"""The dashboard (/ui/) in a real browser (Debian's headless Chromium) against a real
replica process (``dispatcher.examples:app``).

One replica (and its schema) serves the whole module, booting once; each test gets a
fresh browser and starts from a clean slate (no active job, no paused type), so none
depends on another or on their order. What a page shows is checked against the
database, and what an action does is checked in the database, not only on the page.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By

from tests.support.browser import (
    Driver,
    buttons,
    chromium,
    click_button,
    read,
    require_chromium,
    wait_for_element,
    wait_for_path,
    wait_for_text,
    wait_until,
)
from tests.support.database import PostgresServer, TestDatabase, drop_schema, migrated_schema
from tests.support.processes import ReplicaProcess
from tests.support.runtimes import fast_env
from tests.support.waiting import eventually_sync

API_TOKEN = "operator-token-for-the-dashboard-test"
READONLY_TOKEN = "readonly-token-for-the-dashboard-test"
DB_TIMEOUT = 20.0  # for the replica to act on a job (claim, finish, cancel)

Row = dict[str, Any]


@dataclass
class Dashboard:
    """The replica serving the dashboard, its database, the API to feed it, and this
    test's browser."""

    replica: ReplicaProcess
    browser: Driver
    db: TestDatabase
    conn: psycopg.Connection[Row]
    api: httpx.Client

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.replica.port}{path}"

    @property
    def cookie_name(self) -> str:
        return f"dispatcher_ui_{self.replica.port}"

    def enqueue(self, type: str, payload: Any = None, **options: Any) -> int:
        """A job enqueued through the HTTP API; its id."""
        body = {"type": type, "payload": {} if payload is None else payload, **options}
        response = self.api.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id: int = response.json()["id"]
        return job_id

    def pause(self, type: str) -> None:
        response = self.api.post(f"/types/{type}/pause")
        assert response.status_code == 200, response.text

    def query(self, sql: str, *args: Any) -> list[Row]:
        return self.conn.execute(sql.replace("{schema}", f'"{self.db.schema}"'), args).fetchall()

    def job(self, job_id: int) -> Row:
        rows = self.query("SELECT * FROM {schema}.jobs WHERE id = %s", job_id)
        assert rows, f"no job {job_id} in the database"
        return rows[0]

    def wait_job(
        self, job_id: int, check: Callable[[Row], bool], what: str, timeout: float = DB_TIMEOUT
    ) -> Row:
        """Job ``job_id``'s row once ``check`` holds for it."""

        def row() -> Row | None:
            found = self.job(job_id)
            return found if check(found) else None

        try:
            return eventually_sync(row, timeout=timeout, what=f"job {job_id}: {what}", every=0.05)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; row now {self.job(job_id)}; replica log:\n{self.replica.log_tail()}"
            ) from None

    def clean_slate(self) -> None:
        """No paused type and no active job (whatever an earlier test left), the
        replica alive and leading."""
        assert self.replica.alive, f"the replica died:\n{self.replica.log_tail()}"
        for row in self.query("SELECT type FROM {schema}.job_types WHERE paused"):
            response = self.api.post(f"/types/{quote(row['type'], safe='')}/resume")
            assert response.status_code == 200, response.text
        active = "SELECT id FROM {schema}.jobs WHERE status IN ('pending', 'processing')"
        for row in self.query(active + " AND NOT cancel_requested"):
            response = self.api.delete(f"/jobs/{row['id']}")
            assert response.status_code in (200, 409), response.text  # 409: just ended
        eventually_sync(
            lambda: not self.query(active),
            timeout=DB_TIMEOUT,
            what="the jobs of earlier tests to end cancelled",
            every=0.05,
        )
        eventually_sync(
            lambda: self.query("SELECT holder FROM {schema}.leader")[0]["holder"],
            timeout=DB_TIMEOUT,
            what="the replica to lead",
            every=0.05,
        )

    def failed_job(self) -> int:
        """A demo.fail job (one attempt) once it has failed for good."""
        job_id = self.enqueue("demo.fail", max_attempts=1)
        self.wait_job(job_id, lambda r: r["status"] == "failed", "to fail")
        return job_id

    def counts(self, type: str) -> dict[str, int]:
        """What the overview should show for ``type``, counted here."""
        (row,) = self.query(
            "SELECT count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS ready,"
            " count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,"
            " count(*) FILTER (WHERE status = 'processing') AS processing"
            " FROM {schema}.jobs WHERE type = %s",
            type,
        )
        return {k: int(v) for k, v in row.items()}

    def paused(self, type: str) -> bool | None:
        rows = self.query("SELECT paused FROM {schema}.job_types WHERE type = %s", type)
        return bool(rows[0]["paused"]) if rows else None


@dataclass(frozen=True)
class Served:
    """The module's replica and the schema it serves."""

    replica: ReplicaProcess
    db: TestDatabase


@pytest.fixture(scope="module")
def served(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One replica of the example app, with both tokens, on a schema of its own."""
    require_chromium()  # before booting a replica no test could use
    db = TestDatabase(postgres.dsn, asyncio.run(migrated_schema(postgres.dsn)))
    env = {
        # A short shutdown: a test may leave a long demo.sleep running.
        **fast_env(shutdown_timeout="0.5"),
        "DISPATCHER_DSN": db.dsn,
        "DISPATCHER_SCHEMA": db.schema,
        "DISPATCHER_API_TOKEN": API_TOKEN,
        "DISPATCHER_UI_READONLY_TOKEN": READONLY_TOKEN,
    }
    log_path = tmp_path_factory.mktemp("dashboard") / "replica.log"
    replica = ReplicaProcess("dispatcher.examples:app", name="ui", env=env, log_path=log_path)
    try:
        replica.wait_healthy()
        yield Served(replica, db)
    finally:
        code = replica.stop()
        asyncio.run(drop_schema(db.dsn, db.schema))
    assert code == 0, f"the replica exited with {code}:\n{replica.log_tail()}"


@pytest.fixture
def dashboard(served: Served) -> Iterator[Dashboard]:
    """The module's replica, leading (so it runs jobs), from a clean slate, and a fresh
    browser for this test."""
    replica, db = served.replica, served.db
    with (
        chromium() as driver,
        psycopg.connect(db.dsn, autocommit=True, row_factory=dict_row) as conn,
        httpx.Client(
            base_url=f"http://127.0.0.1:{replica.port}",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=10,
        ) as api,
    ):
        dash = Dashboard(replica, driver, db, conn, api)
        dash.clean_slate()
        yield dash
    assert replica.alive, f"the replica died during the test:\n{replica.log_tail()}"


def log_in(driver: Driver, dash: Dashboard, token: str, next: str = "/ui/") -> None:
    """Log in through the login page, landing on ``next``."""
    driver.get(dash.url(f"/ui/login?next={quote(next, safe='')}"))
    wait_for_element(driver, "#token").send_keys(token)
    click_button(driver, "Log in", within="form[action='/ui/login']")
    wait_for_path(driver, next.partition("?")[0], what=f"the landing page {next} after login")
    wait_for_element(driver, "nav[aria-label=Main]", what="the logged-in navigation")


def mark_page(driver: Driver) -> None:
    """Mark the current document, to prove later that it was not reloaded."""
    driver.execute_script("window.__notReloaded = true;")


def still_same_page(driver: Driver) -> bool:
    return bool(driver.execute_script("return window.__notReloaded === true;"))


def navigation_status(driver: Driver) -> int:
    """The HTTP status of the document now shown (a form POST's answer included)."""
    status: int = driver.execute_script(
        "return performance.getEntriesByType('navigation')[0].responseStatus;"
    )
    return status


def post_from_page(driver: Driver, path: str, fields: dict[str, str]) -> dict[str, Any]:
    """POST ``fields`` as a form to ``path`` with fetch() from the page (its cookies,
    same origin); the answer's status, final URL and text."""
    result: dict[str, Any] = driver.execute_async_script(
        """
        const [path, fields, done] = arguments;
        fetch(path, {method: "POST", body: new URLSearchParams(fields),
                     credentials: "same-origin"})
          .then(async (r) => done({status: r.status, url: r.url, text: await r.text()}))
          .catch((e) => done({status: -1, url: "", text: String(e)}));
        """,
        path,
        fields,
    )
    return result


def badge(driver: Driver) -> str:
    """The job detail page's status badge."""
    text: str = driver.find_element(By.CSS_SELECTOR, "#live-job h1 .badge").text
    return text.strip()


def test_login_shows_the_leader_and_the_queue_counts(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    dash = dashboard
    running = [dash.enqueue("demo.sleep", {"seconds": 60}) for _ in range(2)]
    for job_id in running:
        dash.wait_job(job_id, lambda r: r["status"] == "processing", "to start")
    dash.pause("demo.sleep")  # what is enqueued from now on stays ready
    for _ in range(3):
        dash.enqueue("demo.sleep", {"seconds": 60})
    dash.enqueue("demo.sleep", {"seconds": 60}, delay=600)
    expected = {"ready": 3, "scheduled": 1, "processing": 2}
    assert dash.counts("demo.sleep") == expected

    log_in(browser, dash, API_TOKEN)
    cookie = browser.get_cookie(dash.cookie_name)
    assert cookie is not None, browser.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"

    def leader_shown_and_stored() -> tuple[tuple[str, str], tuple[str, str]]:
        (stored,) = dash.query("SELECT holder, term FROM {schema}.leader")
        shown = tuple(
            browser.find_element(By.CSS_SELECTOR, f"[data-testid={name}]").text
            for name in ("leader", "term")
        )
        return (shown[0], shown[1]), (stored["holder"], str(stored["term"]))

    # Equal at once, unless the lease changed hands between the page and the query:
    # then on the overview's next refresh.
    _, stored = wait_until(
        browser,
        lambda _: pair if (pair := leader_shown_and_stored())[0] == pair[1] else None,
        what="the overview to show the leader the database holds",
    )
    assert stored[0].startswith("ui-"), stored  # the replica's id: name-pid-suffix

    row = "tr[data-type='demo.sleep']"

    def shown() -> dict[str, int]:
        return {
            name: int(browser.find_element(By.CSS_SELECTOR, f"{row} [data-testid={name}]").text)
            for name in expected
        }

    assert read(browser, lambda _: shown(), what="the counts") == expected
    assert dash.counts("demo.sleep") == expected

    # The overview refreshes itself: a job enqueued now shows up without a reload.
    mark_page(browser)
    dash.enqueue("demo.sleep", {"seconds": 60})
    expected["ready"] = 4
    assert dash.counts("demo.sleep") == expected
    wait_until(
        browser,
        lambda _: shown() == expected,
        what=f"the overview to show {expected} for demo.sleep by itself",
    )
    assert still_same_page(browser), "the overview was reloaded instead of refreshing in place"


def test_a_wrong_token_is_refused(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    browser.get(dashboard.url("/ui/"))
    wait_for_path(browser, "/ui/login", what="the redirect of a visitor to the login page")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    click_button(browser, "Log in")
    alert = wait_for_text(browser, "p.error[role=alert]", "wrong token")
    assert "DISPATCHER_API_TOKEN" in alert
    assert navigation_status(browser) == 401
    wait_for_path(browser, "/ui/login")
    assert browser.find_element(By.ID, "token").get_attribute("value") == ""
    assert browser.get_cookie(dashboard.cookie_name) is None
    assert browser.find_elements(By.CSS_SELECTOR, "nav[aria-label=Main]") == []

    browser.get(dashboard.url("/ui/jobs"))
    wait_for_path(browser, "/ui/login", what="the jobs page to still need a login")


def test_a_failed_job_is_listed_with_its_traceback(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    job_id = dashboard.failed_job()
    other = dashboard.enqueue("demo.sleep", {"seconds": 60}, delay=600)  # pending: not listed

    log_in(browser, dashboard, API_TOKEN, next="/ui/jobs?status=failed")
    row = wait_for_element(browser, f"tr[data-job-id='{job_id}']")
    assert "failed" in row.find_element(By.CSS_SELECTOR, ".badge").text
    assert "demo.fail always fails" in row.text
    assert browser.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{other}']") == []
    assert "Retry all failed" in buttons(browser)

    row.find_element(By.LINK_TEXT, str(job_id)).click()
    wait_for_path(browser, f"/ui/jobs/{job_id}")
    tracebacks = [
        pre.text for pre in browser.find_elements(By.CSS_SELECTOR, "section pre.traceback")
    ]
    assert len(tracebacks) == 1, tracebacks
    assert "Traceback (most recent call last)" in tracebacks[0]
    assert "RuntimeError: demo.fail always fails (attempt 1 of 1)" in tracebacks[0]
    assert badge(browser) == "failed"
    assert "Retry" in buttons(browser, "#live-job")


def test_retry_puts_a_failed_job_back_to_pending(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    job_id = dashboard.failed_job()
    before = dashboard.job(job_id)
    assert (before["attempts"], len(before["errors"])) == (1, 1)

    log_in(browser, dashboard, API_TOKEN, next=f"/ui/jobs/{job_id}")
    click_button(browser, "Retry", within="#live-job .actions")
    wait_for_text(browser, "p.notice[role=status]", "1 job(s) back to pending")

    after = dashboard.job(job_id)
    # Pending again (or already claimed, or failed again on its extra attempt), with
    # one more attempt allowed and the first attempt's error kept.
    assert after["status"] in ("pending", "processing") or after["attempts"] == 2, after
    assert after["max_attempts"] == 2
    assert after["errors"][0] == before["errors"][0]
    # The replica really runs it again: a second attempt, failed, both errors kept.
    final = dashboard.wait_job(
        job_id,
        lambda r: r["status"] == "failed" and r["attempts"] == 2,
        "to run its second attempt and fail again",
    )
    assert [e["attempt"] for e in final["errors"]] == [1, 2]
    assert final["errors"][0] == before["errors"][0]


def test_cancel_stops_a_running_job(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    job_id = dashboard.enqueue("demo.sleep", {"seconds": 60})
    dashboard.wait_job(job_id, lambda r: r["status"] == "processing", "to start")

    log_in(browser, dashboard, API_TOKEN, next=f"/ui/jobs/{job_id}")
    assert read(browser, badge, what="the status") == "processing"
    click_button(browser, "Cancel", within="#live-job .actions")
    wait_for_text(browser, "p.notice[role=status]", "1 job(s) cancelled or asked to stop")

    row = dashboard.wait_job(job_id, lambda r: r["status"] == "cancelled", "to end cancelled")
    assert row["finished_at"] is not None and row["attempts"] == 1
    # The page, live while the job ran, shows the end by itself.
    wait_until(browser, lambda d: badge(d) == "cancelled", what="the page to show cancelled")
    assert "Cancel" not in buttons(browser, "#live-job")


def test_pause_and_resume_a_type(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    dashboard.enqueue("demo.noop", delay=600)  # the type is listed once it has a job
    assert dashboard.paused("demo.noop") in (None, False)
    row = "tr[data-type='demo.noop']"

    log_in(browser, dashboard, API_TOKEN, next="/ui/types")
    assert wait_for_element(browser, f"{row} [data-testid=state]").text == "running"
    click_button(browser, "Pause", within=row)
    wait_for_text(browser, "p.notice[role=status]", "type paused")
    assert dashboard.paused("demo.noop") is True
    wait_for_text(browser, f"{row} [data-testid=state]", "paused", exact=True)
    assert buttons(browser, row) == ["Resume"]

    click_button(browser, "Resume", within=row)
    wait_for_text(browser, "p.notice[role=status]", "type resumed")
    assert dashboard.paused("demo.noop") is False
    wait_for_text(browser, f"{row} [data-testid=state]", "running", exact=True)
    assert buttons(browser, row) == ["Pause"]


def test_the_progress_bar_moves_by_itself(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    job_id = dashboard.enqueue("demo.sleep", {"seconds": 8})
    dashboard.wait_job(job_id, lambda r: r["status"] == "processing", "to start")

    log_in(browser, dashboard, API_TOKEN, next=f"/ui/jobs/{job_id}")
    mark_page(browser)

    def value_now(driver: Driver) -> float | None:
        raw = driver.find_element(By.ID, "job-progress").get_attribute("aria-valuenow")
        return None if raw is None else float(raw)

    # (value,): truthy even when the bar shows 0.
    (first,) = wait_until(
        browser,
        lambda d: (v,) if (v := value_now(d)) is not None else None,
        what="the progress bar to show a value",
    )
    second = wait_until(
        browser,
        lambda d: v if (v := value_now(d)) is not None and v > first else None,
        what=f"the progress bar to move past {first} without a reload",
    )
    assert second > first
    assert still_same_page(browser), "the job page was reloaded instead of refreshing in place"
    maximum = read(
        browser,
        lambda d: d.find_element(By.ID, "job-progress").get_attribute("max"),
        what="the progress bar's maximum",
    )
    assert maximum is not None and float(maximum) == 8


def test_an_action_without_the_csrf_token_is_refused(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    job_id = dashboard.enqueue("demo.sleep", {"seconds": 60}, delay=600)
    before = dashboard.job(job_id)
    assert before["status"] == "pending"
    cancel = f"/ui/jobs/{job_id}/cancel"

    log_in(browser, dashboard, API_TOKEN, next=f"/ui/jobs/{job_id}")
    # The page is live (the job is pending): read the form's token as it is now.
    csrf = read(
        browser,
        lambda d: d.find_element(
            By.CSS_SELECTOR, f"form[action='{cancel}'] input[name=csrf_token]"
        ).get_attribute("value"),
        what="the Cancel form's CSRF token",
    )
    assert csrf

    # A form submitted by the browser, with the session cookie and without the token.
    browser.execute_script(
        """
        const form = document.createElement("form");
        form.method = "post";
        form.action = arguments[0];
        document.body.appendChild(form);
        form.submit();
        """,
        cancel,
    )
    wait_for_text(browser, "p.error[role=alert]", "missing or wrong CSRF token")
    assert navigation_status(browser) == 403

    # The same by fetch(): no token, an empty one, and a wrong one.
    for fields in ({}, {"csrf_token": ""}, {"csrf_token": "x" + csrf[1:]}):
        refused = post_from_page(browser, cancel, fields)
        assert refused["status"] == 403, (fields, refused)
        assert "missing or wrong CSRF token" in refused["text"]
    refused = post_from_page(browser, "/ui/types/pause", {"type": "demo.sleep"})
    assert refused["status"] == 403, refused

    after = dashboard.job(job_id)
    assert after == before, "a refused action changed the job"
    # (The leader may have declared the app's types meanwhile: a row, not paused.)
    assert dashboard.paused("demo.sleep") is not True

    # With the page's token the same request goes through: the refusals were the token's.
    accepted = post_from_page(browser, cancel, {"csrf_token": csrf})
    assert accepted["status"] == 200 and "notice=cancelled" in accepted["url"], accepted
    assert dashboard.job(job_id)["status"] == "cancelled"


def test_a_payload_is_shown_as_text_never_run(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    hostile = "<script>alert(1)</script>"
    payload = {"note": hostile, "img": "<img src=x onerror=alert(2)>"}
    job_id = dashboard.enqueue("demo.echo", payload)
    dashboard.wait_job(job_id, lambda r: r["status"] == "completed", "to complete")

    log_in(browser, dashboard, API_TOKEN, next=f"/ui/jobs/{job_id}")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 - the property raises when no alert is open
    for testid in ("payload", "result"):  # demo.echo returns its payload
        pre = browser.find_element(By.CSS_SELECTOR, f"pre[data-testid={testid}]")
        assert hostile in pre.text and "<img src=x onerror=alert(2)>" in pre.text
        assert json.loads(pre.text) == payload
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (pre.get_attribute("innerHTML") or "")
    assert browser.find_elements(By.XPATH, "//script[contains(., 'alert(')]") == []
    assert browser.find_elements(By.XPATH, "//img[@src='x']") == []
    sources = [s.get_attribute("src") for s in browser.find_elements(By.TAG_NAME, "script")]
    assert sources == [dashboard.url("/ui/static/ui.js")]
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018


def test_a_read_only_login_sees_but_cannot_act(dashboard: Dashboard) -> None:
    browser = dashboard.browser
    failed = dashboard.failed_job()
    waiting = dashboard.enqueue("demo.noop", delay=600)
    log_in(browser, dashboard, READONLY_TOKEN)
    assert browser.find_element(By.CSS_SELECTOR, ".who .badge.readonly").text == "read-only"
    assert browser.find_element(By.CSS_SELECTOR, "[data-testid=leader]").text
    acting = {"Retry", "Cancel", "Pause", "Resume", "Retry selected", "Cancel selected"}

    browser.get(dashboard.url("/ui/jobs?status=failed"))
    wait_for_element(browser, f"tr[data-job-id='{failed}']")
    assert acting.isdisjoint(buttons(browser)), buttons(browser)
    assert not any(b.startswith("Retry all failed") for b in buttons(browser))
    assert browser.find_elements(By.CSS_SELECTOR, "input[name=ids]") == []

    for job_id in (failed, waiting):
        browser.get(dashboard.url(f"/ui/jobs/{job_id}"))
        wait_for_element(browser, "pre[data-testid=payload]")
        assert buttons(browser) == ["Log out"], (job_id, buttons(browser))
    assert browser.find_elements(By.CSS_SELECTOR, "pre.traceback") == []  # the pending one
    browser.get(dashboard.url(f"/ui/jobs/{failed}"))
    wait_for_text(browser, "pre.traceback", "RuntimeError: demo.fail always fails")

    browser.get(dashboard.url("/ui/types"))
    wait_for_element(browser, "tr[data-type='demo.noop']")
    assert buttons(browser) == ["Log out"]

    # Its own CSRF token (the logout form's) does not make it an acting session.
    csrf = read(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "input[name=csrf_token]").get_attribute("value"),
        what="the logout form's CSRF token",
    )
    before = dashboard.job(waiting)
    refused = post_from_page(browser, f"/ui/jobs/{waiting}/cancel", {"csrf_token": csrf or ""})
    assert refused["status"] == 403 and "read-only" in refused["text"], refused
    assert dashboard.job(waiting) == before
