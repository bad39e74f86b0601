"""Periodic jobs, result cache, pause/resume, backpressure, rate limits and dead
letters, with in-process replicas against a real Postgres."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from dispatcher import AsyncClient, QueueFull
from dispatcher.core.app import Periodic
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.runtime import Runtime
from dispatcher.services.periodic import PeriodicScheduler
from dispatcher.services.queue_stats import QueueStats
from tests.support.apps import make_feature_app, seen
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime, held_attempt
from tests.support.waiting import eventually


@pytest.fixture(autouse=True)
def forget_seen() -> None:
    seen.clear()


async def leading(runtimes: list[Runtime]) -> Runtime:
    async def one() -> Runtime | None:
        leaders = [r for r in runtimes if not r.stopping and r.elector.is_leader()]
        return leaders[0] if len(leaders) == 1 else None

    return await eventually(one, timeout=10, what="a leader")


async def test_every_second_schedule_is_enqueued_once_per_instant_across_leader_changes(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtimes = [await start_runtime(make_feature_app(), name=f"r{i}") for i in range(4)]
    conn = await db.connect()
    try:
        first = await leading(runtimes)
        await eventually(
            lambda: conn.fetchval(f'SELECT count(*) >= 2 FROM "{db.schema}".schedule_runs'),
            timeout=10,
            what="the first ticks",
        )
        leader = first
        for _ in range(3):  # three leader changes, the old leader gone each time
            await asyncio.sleep(1.2)
            await leader.stop()
            leader = await leading(runtimes)
        await asyncio.sleep(2.5)
        runs = await conn.fetch(
            f'SELECT scheduled_for, job_id FROM "{db.schema}".schedule_runs ORDER BY 1'
        )
        jobs = await conn.fetch(
            f"SELECT id, run_at, unique_key FROM {db.jobs} WHERE type = 't.tick' ORDER BY run_at"
        )
        terms = await conn.fetchval(f'SELECT term FROM "{db.schema}".leader')
    finally:
        await conn.close()
    instants = [r["scheduled_for"] for r in runs]
    assert len(instants) >= 6
    # Every second between the first and the last instant, each exactly once.
    span = int((instants[-1] - instants[0]).total_seconds())
    assert instants == [instants[0] + dt.timedelta(seconds=i) for i in range(span + 1)]
    assert [j["run_at"] for j in jobs] == instants
    assert {r["job_id"] for r in runs} == {j["id"] for j in jobs}
    assert jobs[0]["unique_key"].startswith("periodic:tick:")
    assert terms >= 4


async def test_after_downtime_a_schedule_backfills_at_most_its_window(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    conn = await db.connect()
    try:
        # The last tick ran a minute ago; the schedule backfills 3 seconds.
        await conn.execute(
            f'INSERT INTO "{db.schema}".schedule_runs (schedule, scheduled_for) '
            "VALUES ('tick', date_trunc('second', now()) - interval '60 seconds')"
        )
        runtime = await start_runtime(make_feature_app(tick_backfill=3.0))
        await leading([runtime])
        await eventually(
            lambda: conn.fetchval(f"SELECT count(*) >= 1 FROM {db.jobs} WHERE type = 't.tick'"),
            timeout=10,
            what="ticks",
        )
        oldest = await conn.fetchval(
            f"SELECT extract(epoch FROM now() - min(run_at))::float8 FROM {db.jobs} "
            "WHERE type = 't.tick'"
        )
    finally:
        await conn.close()
    assert oldest <= 3.0 + 2.0, f"backfilled {oldest:.1f}s, window is 3s"


async def test_schedules_show_their_next_run(db: TestDatabase, start_runtime: StartRuntime) -> None:
    runtime = await start_runtime(make_feature_app(), api_token="t0ken")
    await leading([runtime])
    client = AsyncClient(pool=runtime.pool, schema=db.schema)

    async def listed() -> Any:
        status = await client.cluster_status()
        return status.schedules or None

    (schedule,) = await eventually(listed, timeout=10, what="the schedule in the table")
    assert (schedule["name"], schedule["cron"], schedule["type"]) == (
        "tick",
        "* * * * * *",
        "t.tick",
    )
    assert schedule["next_run_at"] is not None
    transport = httpx.ASGITransport(app=runtime.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
        status = (await http.get("/status", headers={"Authorization": "Bearer t0ken"})).json()
    assert status["schedules"][0]["name"] == "tick" and status["schedules"][0]["next_run_at"]
    assert status["mode"] == "leader"


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

    await asyncio.sleep(2.2)
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


async def test_pause_stops_new_starts_survives_a_leader_kill_and_resume_restarts(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    a = await start_runtime(make_feature_app(), name="a")
    await leading([a])
    b = await start_runtime(make_feature_app(), name="b")
    client = AsyncClient(pool=a.pool, schema=db.schema)
    running = await client.enqueue("t.pausable", {"seconds": 2.0})
    await eventually(
        lambda: asyncio.sleep(0, held_attempt(a, running.id) is not None), timeout=5, what="start"
    )
    paused_at = asyncio.get_running_loop().time()
    await client.pause("t.pausable")
    await eventually(
        lambda: asyncio.sleep(0, "t.pausable" in a.dispatcher.paused), timeout=1.0, what="pause"
    )
    took = asyncio.get_running_loop().time() - paused_at
    waiting = [await client.enqueue("t.pausable", {"seconds": 0.01}) for _ in range(5)]
    await asyncio.sleep(1.0)
    assert [(await client.get(j.id)).status.value for j in waiting] == ["pending"] * 5
    # The running job finishes while paused.
    await eventually(
        lambda: asyncio.sleep(0, held_attempt(a, running.id) is None), timeout=10, what="end"
    )
    assert (await client.get(running.id)).status.value == "completed"

    # The leader dies; the pause lives in the database.
    assert a.elector.is_leader()
    a.elector._notifier.reset("test: kill the leader's session")
    await a.stop()
    assert await leading([b]) is b
    await asyncio.sleep(1.0)
    client = AsyncClient(pool=b.pool, schema=db.schema)
    assert [(await client.get(j.id)).status.value for j in waiting] == ["pending"] * 5

    await client.resume("t.pausable")

    async def all_done() -> bool:
        statuses = [(await client.get(j.id)).status.value for j in waiting]
        return statuses == ["completed"] * 5

    await eventually(all_done, timeout=10, what="resumed jobs to run")
    # The claim statement itself skips paused types, so the pause held from the
    # moment it committed; the leader's own list followed within:
    assert took < 2.0, f"the leader heard of the pause after {took:.2f}s"


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


async def test_rate_limit_caps_starts_per_window_across_a_leader_change(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    a = await start_runtime(make_feature_app(), name="a")
    await leading([a])
    b = await start_runtime(make_feature_app(), name="b")
    conn = await db.connect()
    try:
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 't.rated' FROM generate_series(1, 18)"
        )
        await asyncio.sleep(1.5)
        await a.stop()  # hand over mid-run: b seeds its window from the table
        await leading([b])

        async def done() -> bool:
            return bool(
                await conn.fetchval(
                    f"SELECT count(*) = 18 FROM {db.jobs} "
                    "WHERE type = 't.rated' AND status = 'completed'"
                )
            )

        await eventually(done, timeout=20, what="all rated jobs", every=0.1)
        starts = [
            r["started_at"]
            for r in await conn.fetch(
                f"SELECT started_at FROM {db.jobs} WHERE type = 't.rated' ORDER BY started_at"
            )
        ]
    finally:
        await conn.close()
    worst = max(sum(1 for t in starts if s <= t < s + dt.timedelta(seconds=1)) for s in starts)
    assert worst <= 5, f"{worst} starts within one second; the limit is 5"
    span = (starts[-1] - starts[0]).total_seconds()
    assert span >= 2.5, f"18 jobs at 5/s took {span:.1f}s"


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


def yearly(at: dt.datetime, name: str, backfill_days: float) -> Periodic:
    """A schedule whose only instant a year is ``at`` (its minute, hour, day, month)."""
    return Periodic(name=name, cron=f"{at.minute} {at.hour} {at.day} {at.month} *",
                    type="t.yearly", payload={}, timezone="UTC", priority=0,
                    max_attempts=None, backfill=backfill_days * 86400)  # fmt: skip


async def test_a_schedule_with_a_long_backfill_is_not_enqueued_again_after_pruning(
    db: TestDatabase,
) -> None:
    # Its latest instant, 10 days ago, is older than the 7 days instants are kept, but
    # within its 30-day backfill: a new leader once enqueued it a second time.
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    try:
        now: dt.datetime = await pool.fetchval("SELECT date_trunc('minute', now())")
        schedule = yearly(now - dt.timedelta(days=10), "ten-days-ago", backfill_days=30)
        first = PeriodicScheduler(pool, db.schema, [schedule])
        assert len(await first.run_once()) == 1, "the instant within the backfill, once"
        await first.prune()
        second = PeriodicScheduler(pool, db.schema, [schedule])  # the next leader
        assert await second.run_once() == []
        assert await pool.fetchval(f"SELECT count(*) FROM {db.jobs}") == 1
    finally:
        await pool.close()


async def test_one_schedules_conflicting_job_does_not_stop_the_others(db: TestDatabase) -> None:
    # An active job already holds the unique key of one schedule's instant (inserted by
    # hand, or its run forgotten): that once aborted the pass for every schedule.
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    try:
        now: dt.datetime = await pool.fetchval("SELECT date_trunc('minute', now())")
        instant = now - dt.timedelta(days=1)
        held = yearly(instant, "held", backfill_days=2)
        free = Periodic(**{**vars(yearly(instant, "free", backfill_days=2)), "type": "t.free"})
        key = "periodic:held:" + instant.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await pool.execute(f"INSERT INTO {db.jobs} (type, unique_key) VALUES ('t.yearly', $1)", key)
        enqueued = await PeriodicScheduler(pool, db.schema, [held, free]).run_once()
        types = await pool.fetch(f"SELECT type, unique_key FROM {db.jobs} ORDER BY id")
    finally:
        await pool.close()
    assert [(name, at) for name, at, _ in enqueued] == [("free", instant)]
    assert [r["type"] for r in types] == ["t.yearly", "t.free"]
