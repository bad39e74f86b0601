"""The HTTP API of a replica (in-process, over ASGI) against a real Postgres."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from dispatcher.core.config import load_settings
from dispatcher.examples import app as examples_app
from dispatcher.runtime import Runtime
from tests.support.apps import make_app
from tests.support.database import TestDatabase, migrated_schema
from tests.support.private_postgres import private_postgres
from tests.support.runtimes import StartRuntime, fast_env
from tests.support.waiting import eventually

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics"}


def http(runtime: Runtime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=runtime.api)
    return httpx.AsyncClient(transport=transport, base_url="http://replica")


@pytest.fixture
async def api(
    db: TestDatabase, start_runtime: StartRuntime
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    runtime = await start_runtime(make_app(), api_token=TOKEN)
    async with http(runtime) as client:
        yield runtime, client


def guarded_routes(runtime: Runtime) -> list[tuple[str, str]]:
    """The API's routes behind the bearer token (the dashboard's, under /ui, have a
    login of their own: test_dashboard.py)."""
    routes = []
    for route in runtime.api.routes:
        api_route = isinstance(route, APIRoute) and not route.path.startswith("/ui")
        if api_route and route.path not in OPEN_ROUTES:
            path = route.path.replace("{job_id}", "1")
            routes.extend((method, path) for method in sorted(route.methods))
    return routes


async def test_every_guarded_route_requires_the_token(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = api
    routes = guarded_routes(runtime)
    assert {path for _, path in routes} >= {
        "/status", "/jobs", "/jobs/1", "/jobs/1/retry", "/replicas", "/openapi.json",
    }  # fmt: skip
    for method, path in routes:
        json_body = {"type": "t.noop"} if method == "POST" and path == "/jobs" else None
        missing = await client.request(method, path, json=json_body)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.request(
            method, path, json=json_body, headers={"Authorization": f"Bearer {TOKEN}x"}
        )
        assert wrong.status_code == 401, (method, path)
        right = await client.request(method, path, json=json_body, headers=AUTH)
        assert right.status_code not in (401, 403), (method, path, right.text)
    for path in OPEN_ROUTES:
        assert (await client.get(path)).status_code == 200, path


async def test_with_no_token_configured_the_api_is_refused_unless_insecure(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtime = await start_runtime(make_app())
    async with http(runtime) as client:
        response = await client.get("/status")
        assert response.status_code == 403
        assert "no DISPATCHER_API_TOKEN is configured" in response.json()["detail"]
        assert (await client.get("/healthz")).status_code == 200
    insecure = Runtime(make_app(), runtime.settings, dsn=db.dsn, insecure_no_auth=True)
    await insecure.start()
    try:
        async with http(insecure) as client:
            assert (await client.get("/status")).status_code == 200
    finally:
        await insecure.stop()


async def test_enqueue_get_list_cancel_retry(api: tuple[Runtime, httpx.AsyncClient]) -> None:
    _, client = api
    created = await client.post(
        "/jobs",
        headers=AUTH,
        json={"type": "t.noop", "payload": {"a": 1}, "priority": -3, "delay": 3600},
    )
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["type"], job["payload"], job["priority"], job["status"]) == (
        "t.noop", {"a": 1}, -3, "pending",
    )  # fmt: skip
    assert (await client.get(f"/jobs/{job['id']}", headers=AUTH)).json()["id"] == job["id"]

    unique = {"type": "t.noop", "unique_key": "k", "delay": 3600}
    first = await client.post("/jobs", headers=AUTH, json=unique)
    again = await client.post("/jobs", headers=AUTH, json=unique)
    assert first.status_code == 201 and again.status_code == 409
    assert again.json()["job"]["id"] == first.json()["id"]
    assert "already has unique_key 'k'" in again.json()["detail"]

    cancelled = await client.delete(f"/jobs/{job['id']}", headers=AUTH)
    assert cancelled.json()["status"] == "cancelled"
    twice = await client.delete(f"/jobs/{job['id']}", headers=AUTH)
    assert twice.status_code == 409 and "it is cancelled" in twice.json()["detail"]
    retried = await client.post(f"/jobs/{job['id']}/retry", headers=AUTH)
    assert retried.json()["status"] == "pending"

    page = (await client.get("/jobs?limit=1", headers=AUTH)).json()
    assert len(page["jobs"]) == 1 and page["next_before_id"] == page["jobs"][0]["id"]
    rest = await client.get(f"/jobs?limit=10&before_id={page['next_before_id']}", headers=AUTH)
    assert len(rest.json()["jobs"]) == 1 and rest.json()["next_before_id"] is None
    pending = (await client.get("/jobs?status=pending&type=t.noop", headers=AUTH)).json()
    assert {j["status"] for j in pending["jobs"]} == {"pending"}
    assert (await client.get("/jobs/999999", headers=AUTH)).status_code == 404


async def test_a_completed_job_shows_its_result(api: tuple[Runtime, httpx.AsyncClient]) -> None:
    _, client = api
    job = (
        await client.post(
            "/jobs", headers=AUTH, json={"type": "t.sync_echo", "payload": {"hello": "world"}}
        )
    ).json()

    async def completed() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get(f"/jobs/{job['id']}", headers=AUTH)).json()
        return body if body["status"] == "completed" else None

    done = await eventually(completed, timeout=10, what="the job to complete")
    assert done["result"]["echo"] == {"hello": "world"}


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    # method, path, request kwargs, status, a fragment the message must name
    ("POST", "/jobs", {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
     422, "JSON decode error"),
    ("POST", "/jobs", {"json": {}}, 422, "type"),
    ("POST", "/jobs", {"json": {"type": ""}}, 422, "type"),
    ("POST", "/jobs", {"json": {"type": 5}}, 422, "type"),
    ("POST", "/jobs", {"json": {"type": "t", "priority": "high"}}, 422, "priority"),
    ("POST", "/jobs", {"json": {"type": "t", "priority": 40000}}, 422, "priority"),
    ("POST", "/jobs", {"json": {"type": "t", "max_attempts": 0}}, 422, "max_attempts"),
    ("POST", "/jobs", {"json": {"type": "t", "timeout": -1}}, 422, "timeout"),
    ("POST", "/jobs", {"json": {"type": "t", "run_at": "2030-01-01T00:00:00"}}, 422, "run_at"),
    ("POST", "/jobs", {"json": {"type": "t", "run_at": "2030-01-01T00:00:00Z", "delay": 1}},
     422, "run_at or delay"),
    ("POST", "/jobs", {"json": {"type": "t", "colour": "red"}}, 422, "colour"),
    ("POST", "/jobs", {"json": {"type": "t", "payload": {"x": "a\u0000b"}}}, 422, "NUL"),
    # A lone surrogate is valid JSON text but not Unicode (it once got a 500).
    ("POST", "/jobs", {"content": b'{"type": "t", "payload": {"x": "\\ud800"}}',
                       "headers": {"Content-Type": "application/json"}}, 422, "lone surrogate"),
    ("POST", "/jobs", {"content": b'{"type": "t\\ud800"}',
                       "headers": {"Content-Type": "application/json"}}, 422, "lone surrogate"),
    ("POST", "/jobs", {"content": b'{"type": "t", "unique_key": "\\udfff"}',
                       "headers": {"Content-Type": "application/json"}}, 422, "lone surrogate"),
    ("GET", "/jobs?type=%ED%A0%80", {}, 200, "jobs"),
    ("POST", "/jobs", {"json": {"type": "t", "max_attempts": 10001}}, 422, "max_attempts"),
    ("POST", "/jobs", {"json": {"type": "t", "payload": "x" * (2 * 1024 * 1024)}}, 413, "payload"),
    ("GET", "/jobs?status=running", {}, 422, "status"),
    ("GET", "/jobs?limit=0", {}, 422, "limit"),
    ("GET", "/jobs?before_id=abc", {}, 422, "before_id"),
    ("GET", "/jobs/abc", {}, 422, "job_id"),
    ("GET", "/jobs/-1", {}, 422, "job_id"),
    ("GET", "/jobs/99999999999999999999", {}, 422, "job_id"),
    ("DELETE", "/jobs/0", {}, 422, "job_id"),
]  # fmt: skip


async def test_malformed_requests_get_a_4xx_naming_the_problem(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, client = api
    for method, path, kwargs, status, fragment in BAD_REQUESTS:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        response = await client.request(method, path, headers=headers, **kwargs)
        assert response.status_code == status, (method, path, response.text[:300])
        assert fragment in response.text, (method, path, response.text[:300])


async def test_a_payload_over_the_limit_by_content_length_is_refused_before_parsing(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, client = api
    body = b'{"type": "t", "payload": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = await client.post(
        "/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=body
    )
    assert response.status_code == 413
    assert "the `payload` field may be at most 1048576 bytes" in response.json()["detail"]


async def test_status_and_replicas(
    api: tuple[Runtime, httpx.AsyncClient], db: TestDatabase
) -> None:
    runtime, client = api
    await eventually(
        lambda: asyncio.sleep(0, runtime.elector.is_leader()), timeout=5, what="leadership"
    )
    await client.post("/jobs", headers=AUTH, json={"type": "t.noop", "delay": 600})
    status = (await client.get("/status", headers=AUTH)).json()
    assert status["role"] == "leader" and status["replica"] == runtime.owner_id
    assert status["leader"]["id"] == runtime.owner_id and status["leader"]["lease_current"]
    assert status["limits"]["global"] == 50 and status["limits"]["types"]["t.sleep"] == 3
    assert status["queue"]["t.noop"]["scheduled"] == 1
    assert status["version"]
    replicas = (await client.get("/replicas", headers=AUTH)).json()
    assert [r["id"] for r in replicas] == [runtime.owner_id]
    assert replicas[0]["alive"] and "t.noop" in replicas[0]["job_types"]


async def test_openapi_describes_the_api_and_its_auth(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, client = api
    spec = (await client.get("/openapi.json", headers=AUTH)).json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/retry", "/status"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_metrics_expose_every_metric_after_jobs_ran(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtime = await start_runtime(make_app(), api_token=TOKEN)
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, payload) VALUES ('t.noop', '{{}}'), "
            """('t.flaky', '{"fail_times": 1}'), ('t.permanent', '{}'), ('t.snooze', '{}'), """
            "('t.long_then_quick', '{}')"
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, run_at) VALUES ('t.noop', now() + interval '1 hour')"
        )

        async def settled() -> bool:
            n = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE status = 'pending' AND run_at < now()"
            )
            running = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE status = 'processing'"
            )
            return n == 0 and running == 1

        await eventually(settled, timeout=20, what="jobs to run")
        long_id = await conn.fetchval(f"SELECT id FROM {db.jobs} WHERE type = 't.long_then_quick'")
        await conn.execute(f"UPDATE {db.jobs} SET cancel_requested = true WHERE id = $1", long_id)
        await eventually(lambda: asyncio.sleep(0, not runtime.slots), timeout=10, what="cancel")
    finally:
        await conn.close()
    await runtime.queue_stats.run_once()
    async with http(runtime) as client:
        text = (await client.get("/metrics")).text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    for name in runtime.metrics.exposed_names():
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in families or family in families, name
    assert len(families) == len(list(runtime.metrics.registry.collect()))
    for sample in (
        'dispatcher_jobs_completed_total{type="t.noop"} 1.0',
        'dispatcher_jobs_retried_total{type="t.flaky"} 1.0',
        'dispatcher_jobs_failed_total{type="t.permanent"} 1.0',
        'dispatcher_jobs_snoozed_total{type="t.snooze"} 1.0',
        'dispatcher_jobs_cancelled_total{type="t.long_then_quick"} 1.0',
        'dispatcher_queue_depth{state="scheduled",type="t.noop"} 1.0',
        "dispatcher_is_leader 1.0",
    ):
        assert sample in text, sample
    assert re.search(r'dispatcher_job_duration_seconds_count\{type="t.noop"\} 1.0', text)
    assert re.search(r'dispatcher_job_queue_wait_seconds_count\{type="t.noop"\} 1.0', text)
    assert re.search(r"dispatcher_claim_batch_size_count [1-9]", text)
    assert re.search(r'dispatcher_wakeups_total\{source="\w+"\} [1-9]', text)


async def test_queue_depth_gauges_appear_on_the_leader_only(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    leader = await start_runtime(make_app(), name="leader")
    await eventually(
        lambda: asyncio.sleep(0, leader.elector.is_leader()), timeout=5, what="leadership"
    )
    standby = await start_runtime(make_app(), name="standby")
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, run_at) VALUES ('t.noop', now() + interval '1 hour')"
        )
    finally:
        await conn.close()

    def depth(runtime: Runtime) -> float | None:
        return runtime.metrics.registry.get_sample_value(
            "dispatcher_queue_depth", {"type": "t.noop", "state": "scheduled"}
        )

    await eventually(
        lambda: asyncio.sleep(0, depth(leader) == 1), timeout=10, what="leader's gauge"
    )
    assert depth(standby) is None
    # Hand over: the old leader clears its gauges, the new one exports them.
    await leader.stop()
    await eventually(
        lambda: asyncio.sleep(0, depth(standby) == 1), timeout=10, what="new leader's gauge"
    )
    assert depth(leader) is None


async def test_readyz_flips_when_the_database_goes_away_and_returns(tmp_path: Path) -> None:
    with private_postgres(tmp_path / "pg") as server:
        dsn = server.dsn()
        schema = await migrated_schema(dsn)
        env = fast_env()
        settings, _ = load_settings(env={**env, "DISPATCHER_SCHEMA": schema})
        runtime = Runtime(examples_app, settings, dsn=dsn)
        await runtime.start()
        try:
            async with http(runtime) as client:
                seen: list[str] = []

                async def status_is(code: int) -> bool:
                    response = await client.get("/readyz")
                    seen.append(f"{response.status_code} {response.text[:200]}")
                    return response.status_code == code

                assert await status_is(200), seen
                await asyncio.to_thread(server.stop, "fast")
                try:
                    await eventually(lambda: status_is(503), timeout=15, what="503")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; saw {seen[-3:]}") from None
                body = (await client.get("/readyz")).json()
                assert body["status"] == "unavailable" and "database" in body["detail"]
                assert (await client.get("/healthz")).status_code == 200
                await asyncio.to_thread(server.start)
                try:
                    await eventually(lambda: status_is(200), timeout=30, what="200 again")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; saw {seen[-3:]}") from None
        finally:
            await runtime.stop()
