"""Dead letters: jobs that failed for good, listed by status and type, and retried in
bulk with their error history kept."""

from __future__ import annotations

import json
from typing import Any

from dispatcher import AsyncClient
from tests.support.apps import make_feature_app
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


async def test_dead_letters_are_listed_and_retried_in_bulk_by_type(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtime = await start_runtime(make_feature_app())
    client = AsyncClient(pool=runtime.pool, schema=db.schema)
    for n in range(4):
        await client.enqueue("t.doomed", {"n": n})
    await client.enqueue("t.cached", {"x": 1})

    async def failed() -> Any:
        jobs = await client.list_jobs(status="failed")
        return jobs if len(jobs) == 4 else None

    dead = await eventually(failed, timeout=10, what="four dead letters")
    assert all(j.errors and j.errors[0]["error"] == "ValueError: doomed" for j in dead)
    assert await client.retry_many(type="t.doomed") == 4
    assert await client.retry_many(type="t.doomed") == 0
    jobs = await client.list_jobs(type="t.doomed")
    assert all(j.status.value in ("pending", "processing", "failed") for j in jobs)
    assert all(len(j.errors) >= 1 for j in jobs), "the history stays"
    assert json.dumps([j.max_attempts for j in jobs])  # exhausted jobs got one more attempt
