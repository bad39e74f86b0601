"""The dashboard (/ui/) of an in-process replica over HTTP, against a real Postgres:
login and sessions, CSRF and read-only refusals, every page, every action checked in
the database, hostile rows shown as text, and the queue samples behind the charts.
The same in a real browser: tests/browser/test_dashboard_browser.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from dispatcher.core.config import load_settings
from dispatcher.core.metrics import Metrics
from dispatcher.http.ui.reads import DashboardReads, FinishedCounts
from dispatcher.runtime import Runtime
from dispatcher.services import queue_stats
from dispatcher.services.queue_stats import QueueStats
from tests.support.apps import make_app
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime, fast_env
from tests.support.waiting import eventually

TOKEN = "ui-operator-token"
READONLY = "ui-readonly-token"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def browser(runtime: Runtime) -> httpx.AsyncClient:
    """A client that keeps cookies and does not follow redirects (tests look at them)."""
    transport = httpx.ASGITransport(app=runtime.api)
    return httpx.AsyncClient(transport=transport, base_url="http://replica")


async def log_in(client: httpx.AsyncClient, token: str = TOKEN) -> str:
    """Log in; the CSRF token of the new session."""
    reply = await client.post("/ui/login", data={"token": token, "next": "/ui/jobs"})
    assert reply.status_code == 303 and reply.headers["location"] == "/ui/jobs", reply.text
    page = await client.get("/ui/jobs")
    assert page.status_code == 200
    match = CSRF.search(page.text)
    assert match, page.text
    return match.group(1)


@pytest.fixture
async def dashboard(
    db: TestDatabase, start_runtime: StartRuntime
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    runtime = await start_runtime(make_app(), api_token=TOKEN, ui_readonly_token=READONLY)
    async with browser(runtime) as client:
        yield runtime, client


async def insert(db: TestDatabase, type: str, payload: str = "{}", **columns: object) -> int:
    conn = await db.connect()
    try:
        names = ["type", "payload", *columns]
        values = [type, payload, *columns.values()]
        placeholders = ", ".join(f"${i + 1}" for i in range(len(values)))
        job_id: int = await conn.fetchval(
            f"INSERT INTO {db.schema}.jobs ({', '.join(names)}) VALUES ({placeholders}) "
            "RETURNING id",
            *values,
        )
        return job_id
    finally:
        await conn.close()


async def job_row(db: TestDatabase, job_id: int) -> dict[str, object]:
    conn = await db.connect()
    try:
        row = await conn.fetchrow(f"SELECT * FROM {db.schema}.jobs WHERE id = $1", job_id)
        assert row is not None
        return dict(row)
    finally:
        await conn.close()


async def pause(db: TestDatabase, type: str) -> None:
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.schema}.job_types (type, paused) VALUES ($1, true) "
            "ON CONFLICT (type) DO UPDATE SET paused = true",
            type,
        )
    finally:
        await conn.close()


async def test_pages_need_a_login_and_a_wrong_token_is_refused(
    dashboard: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, client = dashboard
    page = await client.get("/ui/jobs?status=failed")
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3Dfailed"
    wrong = await client.post("/ui/login", data={"token": TOKEN + "x"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert not wrong.cookies
    right = await client.post("/ui/login", data={"token": TOKEN, "next": "https://evil.example"})
    assert right.status_code == 303 and right.headers["location"] == "/ui/"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    overview = await client.get("/ui/")
    assert overview.status_code == 200 and "Log out" in overview.text
    assert "default-src 'self'" in overview.headers["content-security-policy"]


async def test_logging_out_ends_the_session(dashboard: tuple[Runtime, httpx.AsyncClient]) -> None:
    _, client = dashboard
    csrf = await log_in(client)
    out = await client.post("/ui/logout", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert (await client.get("/ui/")).status_code == 303


async def test_every_page_renders_with_the_cluster_and_the_jobs(
    db: TestDatabase, dashboard: tuple[Runtime, httpx.AsyncClient]
) -> None:
    runtime, client = dashboard
    await pause(db, "t.noop")
    ready = [await insert(db, "t.noop", unique_key=f"key-{i}") for i in range(3)]
    await log_in(client)
    await eventually(
        lambda: _leader_shown(client, runtime.owner_id), timeout=15, what="the leader shown"
    )
    overview = (await client.get("/ui/")).text
    row = re.search(r'<tr data-type="t\.noop">(.*?)</tr>', overview, re.S)
    assert row and re.search(r'data-testid="ready">3<', row.group(1)), overview
    assert "paused" in row.group(1)
    jobs = (await client.get("/ui/jobs?status=pending&type=t.noop")).text
    assert all(f'data-job-id="{i}"' in jobs for i in ready)
    by_key = (await client.get("/ui/jobs?q=key-1")).text
    assert f'data-job-id="{ready[1]}"' in by_key and f'data-job-id="{ready[0]}"' not in by_key
    by_id = (await client.get(f"/ui/jobs?q={ready[2]}")).text
    assert f'data-job-id="{ready[2]}"' in by_id and f'data-job-id="{ready[1]}"' not in by_id
    older = (await client.get(f"/ui/jobs?before_id={ready[2]}")).text
    assert f'data-job-id="{ready[2]}"' not in older and f'data-job-id="{ready[1]}"' in older
    detail = await client.get(f"/ui/jobs/{ready[0]}")
    assert detail.status_code == 200 and "key-0" in detail.text and "Cancel" in detail.text
    assert (await client.get("/ui/jobs/999999")).status_code == 404
    types = (await client.get("/ui/types")).text
    assert "t.sleep" in types and "Resume" in types
    assert (await client.get("/ui/schedules")).status_code == 200
    # Filters that match nothing, or make no sense, are not errors.
    assert (await client.get("/ui/jobs?status=bogus&q=%20")).status_code == 200


async def _leader_shown(client: httpx.AsyncClient, owner: str) -> bool:
    return f'data-testid="leader">{owner}<' in (await client.get("/ui/")).text


async def test_actions_change_the_database(
    db: TestDatabase, dashboard: tuple[Runtime, httpx.AsyncClient]
) -> None:
    _, client = dashboard
    failed = await insert(
        db, "t.gone", status="failed", attempts=1, finished_at=None, last_error="boom"
    )
    also_failed = await insert(db, "t.gone", status="failed", attempts=1)
    await pause(db, "t.noop")
    waiting = [await insert(db, "t.noop") for _ in range(2)]
    csrf = await log_in(client)

    retried = await client.post(f"/ui/jobs/{failed}/retry", data={"csrf_token": csrf})
    assert retried.status_code == 303
    assert retried.headers["location"] == f"/ui/jobs/{failed}?notice=retried&n=1&skipped=0"
    assert (await job_row(db, failed))["status"] == "pending"
    page = await client.get(retried.headers["location"])
    assert "1 job(s) back to pending" in page.text

    cancelled = await client.post(
        "/ui/jobs/selected",
        data={
            "csrf_token": csrf,
            "action": "cancel",
            "ids": [str(waiting[0]), str(also_failed)],
            "back": "/ui/jobs?type=t.noop",
        },
    )
    assert cancelled.headers["location"] == ("/ui/jobs?type=t.noop&notice=cancelled&n=1&skipped=1")
    assert (await job_row(db, waiting[0]))["status"] == "cancelled"
    assert (await job_row(db, waiting[1]))["status"] == "pending"
    assert (await job_row(db, also_failed))["status"] == "failed"

    all_failed = await client.post(
        "/ui/jobs/retry-failed", data={"csrf_token": csrf, "type": "t.gone"}
    )
    assert "notice=retried&n=1" in all_failed.headers["location"]
    assert (await job_row(db, also_failed))["status"] == "pending"

    paused = await client.post("/ui/types/pause", data={"csrf_token": csrf, "type": "a/b <c>"})
    assert paused.status_code == 303
    types = (await client.get("/ui/types")).text
    assert "a/b &lt;c&gt;" in types and "<c>" not in types
    conn = await db.connect()
    try:
        assert await conn.fetchval(
            f"SELECT paused FROM {db.schema}.job_types WHERE type = 'a/b <c>'"
        )
        await client.post("/ui/types/resume", data={"csrf_token": csrf, "type": "a/b <c>"})
        assert not await conn.fetchval(
            f"SELECT paused FROM {db.schema}.job_types WHERE type = 'a/b <c>'"
        )
    finally:
        await conn.close()


async def test_actions_without_a_session_csrf_token_or_with_a_read_only_one_are_refused(
    db: TestDatabase, dashboard: tuple[Runtime, httpx.AsyncClient]
) -> None:
    runtime, client = dashboard
    failed = await insert(db, "t.gone", status="failed", attempts=1)
    action = f"/ui/jobs/{failed}/retry"
    nobody = await client.post(action, data={"csrf_token": "x"})
    assert nobody.status_code == 401
    csrf = await log_in(client)
    missing = await client.post(action)
    assert missing.status_code == 403 and "CSRF" in missing.text
    wrong = await client.post(action, data={"csrf_token": csrf + "x"})
    assert wrong.status_code == 403
    async with browser(runtime) as reader:
        read_csrf = await log_in(reader, READONLY)
        page = (await reader.get(f"/ui/jobs/{failed}")).text
        assert "read-only" in page and ">Retry<" not in page
        refused = await reader.post(action, data={"csrf_token": read_csrf})
        assert refused.status_code == 403 and "read-only" in refused.text
        listing = (await reader.get("/ui/jobs?status=failed")).text
        assert "Retry selected" not in listing and "Retry all failed" not in listing
    assert (await job_row(db, failed))["status"] == "failed"


async def test_job_rows_are_shown_as_text(
    db: TestDatabase, dashboard: tuple[Runtime, httpx.AsyncClient]
) -> None:
    _, client = dashboard
    hostile = "<script>alert(1)</script>"
    job_id = await insert(
        db,
        "t.gone",
        payload=f'{{"html": "{hostile}"}}',
        status="failed",
        attempts=1,
        last_error=f"{hostile} in error",
        unique_key=f'"><img src=x onerror=alert(1)>{hostile}',
        errors=f'[{{"attempt": 1, "at": "2026-11-30T12:00:00+00:00", "error": "{hostile}", '
        f'"traceback": "{hostile}"}}]',
    )
    await log_in(client)
    for path in (f"/ui/jobs/{job_id}", "/ui/jobs?status=failed"):
        text = (await client.get(path)).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path
        assert hostile not in text and "<img" not in text, path


async def test_no_token_refuses_the_dashboard_unless_insecure(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    closed = await start_runtime(make_app(), name="closed")
    async with browser(closed) as client:
        for path in ("/ui/", "/ui/login"):
            page = await client.get(path)
            assert page.status_code == 403 and "DISPATCHER_API_TOKEN" in page.text
        assert (await client.post("/ui/login", data={"token": ""})).status_code == 403
    failed = await insert(db, "t.gone", status="failed", attempts=1)
    # --insecure-no-auth is a flag of `dispatcher run`, passed to the Runtime.
    settings, _ = load_settings(env=fast_env(schema=db.schema, replica_id="open"))
    open_ = Runtime(make_app(), settings, dsn=db.dsn, insecure_no_auth=True)
    await open_.start()
    try:
        async with browser(open_) as client:
            page = await client.get("/ui/jobs")
            assert page.status_code == 200 and "set-cookie" in page.headers
            match = CSRF.search(page.text)
            assert match
            assert (await client.post(f"/ui/jobs/{failed}/retry")).status_code == 403
            done = await client.post(
                f"/ui/jobs/{failed}/retry", data={"csrf_token": match.group(1)}
            )
            assert done.status_code == 303
    finally:
        await open_.stop()
    assert (await job_row(db, failed))["status"] == "pending"


async def test_queue_samples_count_each_finished_job_once(
    db: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.schema}.jobs (type, status, attempts, started_at, finished_at) "
            "SELECT 't.done', s, 1, now() - interval '4 seconds', now() - interval '3 seconds' "
            "FROM unnest(array['completed', 'completed', 'completed', 'failed', 'cancelled']) s"
        )
        # Finished long before the first sample: not in it (it looks 10 s back).
        await conn.execute(
            f"INSERT INTO {db.schema}.jobs (type, status, attempts, finished_at) "
            "VALUES ('t.done', 'completed', 1, now() - interval '1 hour')"
        )
        await conn.execute(f"INSERT INTO {db.schema}.jobs (type) VALUES ('t.done'), ('t.done')")
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    try:
        stats = QueueStats(pool, db.schema, Metrics(), interval=2.0)
        reads = DashboardReads(pool, db.schema)
        await stats.run_once()
        await stats.run_once()  # within SAMPLE_INTERVAL: no second sample
        history = await reads.queue_history()
        assert len(history) == 1
        assert (history[0].completed, history[0].failed, history[0].ready) == (3, 1, 2)
        assert await reads.finished_by_type() == {"t.done": FinishedCounts(3, 1)}
        # The next sample counts only what finished after the previous one.
        monkeypatch.setattr(queue_stats, "SAMPLE_INTERVAL", 0.0)
        await stats.run_once()
        assert await reads.finished_by_type() == {"t.done": FinishedCounts(3, 1)}
        samples = await pool.fetchval(f"SELECT count(*) FROM {db.schema}.queue_samples")
        assert samples == 2
    finally:
        await pool.close()
