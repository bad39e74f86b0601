"""The result cache: an enqueue with ``cache_ttl`` returns the latest completed job of
its type and unique key while that result is younger than the TTL, and runs the job
again once it is older."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from dispatcher import AsyncClient
from tests.support.apps import make_feature_app, seen
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


@pytest.fixture(autouse=True)
def forget_seen() -> None:
    seen.clear()  # job ids start at 1 in every test's schema


async def test_cached_enqueue_returns_the_first_result_until_the_ttl_expires(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtime = await start_runtime(make_feature_app())
    client = AsyncClient(pool=runtime.pool, schema=db.schema)
    first = await client.enqueue("t.cached", {"x": 21}, unique_key="answer", cache_ttl=2)
    assert not first.cached

    async def completed() -> Any:
        job = await client.get(first.id)
        return job if job.status.value == "completed" else None

    done = await eventually(completed, timeout=10, what="the first run")
    again = await client.enqueue("t.cached", {"x": 21}, unique_key="answer", cache_ttl=2)
    assert again.cached and again.id == first.id
    assert again.result == {"computed": 42, "run": 1} == done.result
    assert len(seen[first.id]) == 1, "the cached call must not run the job again"

    # The TTL counts from finished_at on the database clock: wait until it has passed
    # there, not for as long on ours.
    await eventually(
        lambda: runtime.pool.fetchval(
            f"SELECT now() > finished_at + interval '2 seconds' FROM {db.jobs} WHERE id = $1",
            first.id,
        ),
        timeout=10,
        what="the cached result to be older than its 2 s TTL",
        every=0.1,
    )
    fresh = await client.enqueue("t.cached", {"x": 21}, unique_key="answer", cache_ttl=2)
    assert not fresh.cached and fresh.id != first.id
    await eventually(
        lambda: asyncio.sleep(0, bool(seen[fresh.id])), timeout=10, what="the new job to run"
    )

    transport = httpx.ASGITransport(app=runtime.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
        body = {"type": "t.cached", "payload": {"x": 21}, "unique_key": "answer", "cache_ttl": 60}
        response = await http.post("/jobs", json=body)
    assert response.status_code in (200, 409, 403)  # 403: no token configured here
