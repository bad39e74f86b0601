"""Periodic (cron) jobs: each scheduled instant enqueued exactly once across leader
changes, a bounded backfill after downtime, schedules listed with their next run, and
the scheduler's own passes (``PeriodicScheduler.run_once``)."""

from __future__ import annotations

import datetime as dt
from functools import partial
from typing import Any

import asyncpg
import httpx

from dispatcher import AsyncClient
from dispatcher.core.app import Periodic
from dispatcher.core.metrics import Metrics
from dispatcher.services.periodic import PeriodicScheduler
from tests.support.apps import make_feature_app
from tests.support.database import TestDatabase
from tests.support.leadership import leading
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


async def test_every_second_schedule_is_enqueued_once_per_instant_across_leader_changes(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runtimes = [await start_runtime(make_feature_app(), name=f"r{i}") for i in range(4)]
    conn = await db.connect()

    async def ticks_beyond(count: int) -> bool:
        enqueued = await conn.fetchval(f'SELECT count(*) FROM "{db.schema}".schedule_runs')
        return bool(enqueued > count)

    async def ticks() -> int:
        enqueued: int = await conn.fetchval(f'SELECT count(*) FROM "{db.schema}".schedule_runs')
        return enqueued

    try:
        leader = await leading(runtimes)
        await eventually(lambda: ticks_beyond(1), timeout=10, what="the first ticks")
        for change in range(3):  # three leader changes, the old leader gone each time
            # Each leader enqueues ticks of its own before it goes.
            before = await ticks()
            await eventually(
                partial(ticks_beyond, before), timeout=10, what=f"a tick of leader #{change + 1}"
            )
            await leader.stop()
            leader = await leading(runtimes)
        # ...and the last one too, two of them: at least six instants in all.
        enough = max(5, await ticks() + 1)
        await eventually(partial(ticks_beyond, enough), timeout=10, what="the last leader's ticks")
        # One snapshot: the leader goes on enqueueing between two plain reads.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            runs = await conn.fetch(
                f'SELECT scheduled_for, job_id FROM "{db.schema}".schedule_runs ORDER BY 1'
            )
            jobs = await conn.fetch(
                f"SELECT id, run_at, unique_key FROM {db.jobs} WHERE type = 't.tick' "
                "ORDER BY run_at"
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
        first = PeriodicScheduler(pool, db.schema, [schedule], Metrics())
        assert len(await first.run_once()) == 1, "the instant within the backfill, once"
        await first.prune()
        second = PeriodicScheduler(pool, db.schema, [schedule], Metrics())  # the next leader
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
        enqueued = await PeriodicScheduler(pool, db.schema, [held, free], Metrics()).run_once()
        types = await pool.fetch(f"SELECT type, unique_key FROM {db.jobs} ORDER BY id")
    finally:
        await pool.close()
    assert [(name, at) for name, at, _ in enqueued] == [("free", instant)]
    assert [r["type"] for r in types] == ["t.yearly", "t.free"]
