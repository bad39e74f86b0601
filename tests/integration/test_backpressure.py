"""Backpressure: ``max_pending`` per type. The leader counts pending jobs
(``QueueStats.run_once``) and closes a type's queue at its limit: producers get
QueueFull (HTTP 429) until a later count finds room."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from dispatcher import AsyncClient, QueueFull
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.services.queue_stats import QueueStats
from tests.support.apps import make_feature_app
from tests.support.database import TestDatabase
from tests.support.leadership import leading
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


async def test_max_pending_refuses_the_next_enqueue_with_queue_full_and_429(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtime = await start_runtime(make_feature_app(), api_token="t0ken")
    await leading([runtime])
    client = AsyncClient(pool=runtime.pool, schema=db.schema)
    await client.pause("t.limited")  # keep them pending, so the count is exact
    for n in range(3):
        await client.enqueue("t.limited", {"n": n})
    await runtime.queue_stats.run_once()
    with pytest.raises(
        QueueFull, match=r"'t.limited' queue is full: about 3 jobs pending, max_pending 3"
    ):
        await client.enqueue("t.limited", {"n": 3})
    with pytest.raises(QueueFull):
        await client.enqueue_many("t.limited", [{"n": 4}])
    transport = httpx.ASGITransport(app=runtime.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
        response = await http.post(
            "/jobs", json={"type": "t.limited"}, headers={"Authorization": "Bearer t0ken"}
        )
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert "queue is full" in response.json()["detail"]
    # Other types are not affected.
    assert (await client.enqueue("t.rated")).id
    # Room again: the queue reopens at the next count.
    await client.resume("t.limited")
    conn = await db.connect()
    try:
        await conn.execute(f"UPDATE {db.jobs} SET status = 'cancelled' WHERE type = 't.limited'")
    finally:
        await conn.close()
    await runtime.queue_stats.run_once()
    assert (await client.enqueue("t.limited", {"n": 5})).id


@pytest.fixture
async def limited_queue(db: TestDatabase) -> AsyncIterator[tuple[AsyncClient, QueueStats]]:
    """A client, and the counts of a leader whose app gives t.limited max_pending 3."""
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=3)
    try:
        stats = QueueStats(pool, db.schema, Metrics(), interval=60, max_pending={"t.limited": 3})
        yield AsyncClient(pool=pool, schema=db.schema), stats
    finally:
        await pool.close()


async def test_a_new_leaders_first_count_already_applies_max_pending(
    limited_queue: tuple[AsyncClient, QueueStats],
) -> None:
    # The first count once ran before the limits were declared, judging against none
    # (seen as a flaky QueueFull test right after an election).
    client, stats = limited_queue
    for n in range(3):
        await client.enqueue("t.limited", {"n": n})
    await stats.run_once()
    with pytest.raises(QueueFull, match="max_pending 3"):
        await client.enqueue("t.limited", {"n": 3})


async def test_a_stale_count_never_reopens_a_queue_that_a_newer_count_closed(
    db: TestDatabase, limited_queue: tuple[AsyncClient, QueueStats]
) -> None:
    # Two counts overlap across a leader change (or beside the loop): the older one,
    # written last, once reopened the queue the newer one had closed.
    client, stats = limited_queue
    queries = queries_for(db.schema)
    await stats.run_once()
    older = await db.connect()
    try:
        async with older.transaction():
            await older.execute(queries["lock_queue_count"], db.schema)
            counted = await older.fetch(queries["queue_depth"])  # before the jobs exist
            for n in range(3):
                await client.enqueue("t.limited", {"n": n})
            newer = asyncio.create_task(stats.run_once())

            async def newer_waits_or_ended() -> bool:
                waiting = await older.fetchval(
                    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return newer.done() or waiting

            await eventually(newer_waits_or_ended, timeout=10, what="the newer count")
            await older.execute(
                queries["refresh_accepting"],
                [row["type"] for row in counted],
                [row["ready"] + row["scheduled"] for row in counted],
            )
        await newer
        with pytest.raises(QueueFull, match="about 3 jobs pending"):
            await client.enqueue("t.limited", {"n": 3})
    finally:
        await older.close()


async def test_removing_max_pending_reopens_a_closed_queue(
    db: TestDatabase, limited_queue: tuple[AsyncClient, QueueStats]
) -> None:
    # A deploy drops max_pending from the executor: its queue, closed by the last count
    # under the limit, once stayed closed for good.
    client, stats = limited_queue
    for n in range(3):
        await client.enqueue("t.limited", {"n": n})
    await stats.run_once()
    with pytest.raises(QueueFull):
        await client.enqueue("t.limited", {"n": 3})
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=1)
    try:
        # The leader's app now declares no limit for the type.
        limits: dict[str, int | None] = {"t.limited": None}
        await QueueStats(pool, db.schema, Metrics(), interval=60, max_pending=limits).run_once()
    finally:
        await pool.close()
    assert (await client.enqueue("t.limited", {"n": 4})).id
