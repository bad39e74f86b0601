"""dispatcher.testing.drain on a real Postgres: every due job runs in the test's process
through the real claim and completion, rounds repeat for jobs enqueued while draining
(or kept out with recursive=False), with_scheduled runs later jobs and retries now,
dependencies release their dependents, and the drain leaves nothing behind."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from typing import Any

import asyncpg
import pytest

from dispatcher import App, AsyncClient, Client, Job, PermanentError, RetryPolicy, Snooze
from dispatcher.core.errors import DispatcherError, SchemaNotReady
from dispatcher.testing import Drained, drain, drain_async
from tests.support.database import TestDatabase


def drain_app(db: TestDatabase) -> App:
    app = App(max_attempts=3, retry=RetryPolicy(base=60.0, cap=60.0))

    @app.executor("d.echo")
    async def echo(job: Job) -> Any:
        return {"echo": job.payload}

    @app.executor("d.sync_echo")
    def sync_echo(job: Job) -> Any:
        return {"echo": job.payload}

    @app.executor("d.flaky")
    async def flaky(job: Job) -> str:
        if job.attempt < job.payload["succeed_on"]:
            raise RuntimeError(f"attempt {job.attempt} failed")
        return f"done on attempt {job.attempt}"

    @app.executor("d.permanent")
    async def permanent(job: Job) -> None:
        raise PermanentError("never")

    @app.executor("d.fanout")
    async def fanout(job: Job) -> int:
        async with await AsyncClient.connect(db.dsn, schema=db.schema) as client:
            for n in range(job.payload["children"]):
                await client.enqueue("d.echo", {"child": n})
        return int(job.payload["children"])

    @app.executor("d.sum")
    async def sum_(job: Job) -> int:
        return sum((await job.dependency_results()).values()) + int(job.payload["add"])

    @app.executor("d.one_per_key", key_concurrency=1)
    async def one_per_key(job: Job) -> str:
        return str(job.payload["n"])

    @app.executor("d.one_at_a_time", concurrency=1, rate_limit=(1000, 1.0))
    def one_at_a_time(job: Job) -> int:
        return int(job.payload["n"])

    @app.executor("d.snooze")
    async def snooze(job: Job) -> None:
        raise Snooze(3600)

    return app


@pytest.fixture
async def client(db: TestDatabase) -> Any:
    async with await AsyncClient.connect(db.dsn, schema=db.schema) as client:
        yield client


async def statuses(conn: asyncpg.Connection, db: TestDatabase) -> dict[int, str]:
    rows = await conn.fetch(f"SELECT id, status FROM {db.jobs} ORDER BY id")
    return {row["id"]: row["status"] for row in rows}


async def test_drain_runs_every_due_job_and_counts_the_outcomes(
    db: TestDatabase, client: AsyncClient
) -> None:
    app = drain_app(db)
    echoes = [await client.enqueue("d.echo", {"n": n}) for n in range(3)]
    threaded = await client.enqueue("d.sync_echo", {"n": "t"})
    flaky = await client.enqueue("d.flaky", {"succeed_on": 2})
    permanent = await client.enqueue("d.permanent")
    later = await client.enqueue("d.echo", {"n": "later"}, run_at=dt.timedelta(hours=1))

    drained = await drain_async(app, db.dsn, schema=db.schema)

    assert drained == Drained(completed=4, retried=1, failed=1)
    assert drained.total == 6
    for job in echoes:
        done = await client.get(job.id)
        assert (done.status, done.result) == ("completed", {"echo": job.payload})
    assert (await client.get(threaded.id)).result == {"echo": {"n": "t"}}
    retrying = await client.get(flaky.id)
    # Its retry is due after the backoff: not in this drain.
    assert (retrying.status, retrying.attempts) == ("pending", 1)
    assert retrying.errors[0]["error"] == "RuntimeError: attempt 1 failed"
    assert (await client.get(permanent.id)).status == "failed"
    assert (await client.get(later.id)).status == "pending"
    conn = await db.connect()
    try:
        owners = await conn.fetchval(f'SELECT count(*) FROM "{db.schema}".replicas')
        assert owners == 0, "the drain's replica row was left behind"
    finally:
        await conn.close()


async def test_with_scheduled_runs_later_jobs_and_every_retry_now(
    db: TestDatabase, client: AsyncClient
) -> None:
    app = drain_app(db)
    later = await client.enqueue("d.echo", {"n": "later"}, run_at=dt.timedelta(hours=1))
    flaky = await client.enqueue("d.flaky", {"succeed_on": 3})
    hopeless = await client.enqueue("d.flaky", {"succeed_on": 99})

    drained = await drain_async(app, db.dsn, schema=db.schema, with_scheduled=True)

    # flaky: 2 failed attempts then done; hopeless: 2 retries then failed on its 3rd.
    assert drained == Drained(completed=2, retried=4, failed=1)
    assert (await client.get(later.id)).status == "completed"
    assert (await client.get(flaky.id)).result == "done on attempt 3"
    gone = await client.get(hopeless.id)
    assert (gone.status, gone.attempts) == ("failed", 3)


async def test_jobs_enqueued_while_draining_are_drained_unless_told_otherwise(
    db: TestDatabase, client: AsyncClient
) -> None:
    app = drain_app(db)
    await client.enqueue("d.fanout", {"children": 3})
    assert await drain_async(app, db.dsn, schema=db.schema) == Drained(completed=4)

    parent = await client.enqueue("d.fanout", {"children": 2})
    drained = await drain_async(app, db.dsn, schema=db.schema, recursive=False)
    assert drained == Drained(completed=1)
    assert (await client.get(parent.id)).status == "completed"
    children = await client.list_jobs(status="pending", type="d.echo")
    assert sorted(job.payload["child"] for job in children) == [0, 1]
    assert all(job.attempts == 0 for job in children), "a handed-back job spent an attempt"
    assert await drain_async(app, db.dsn, schema=db.schema) == Drained(completed=2)


async def test_dependencies_release_their_dependents_within_the_drain(
    db: TestDatabase, client: AsyncClient
) -> None:
    app = drain_app(db)
    ids = await client.enqueue_graph(
        {
            "a": {"type": "d.sum", "payload": {"add": 1}},
            "b": {"type": "d.sum", "payload": {"add": 2}},
            "total": {"type": "d.sum", "payload": {"add": 10}, "depends_on": ["a", "b"]},
        }
    )
    assert await drain_async(app, db.dsn, schema=db.schema) == Drained(completed=3)
    assert (await client.get(ids["total"])).result == 13


async def test_types_narrow_the_drain_and_paused_types_wait(
    db: TestDatabase, client: AsyncClient
) -> None:
    app = drain_app(db)
    echo = await client.enqueue("d.echo")
    threaded = await client.enqueue("d.sync_echo")
    drained = await drain_async(app, db.dsn, schema=db.schema, types=["d.sync_echo"])
    assert drained == Drained(completed=1)
    assert (await client.get(echo.id)).status == "pending"
    assert (await client.get(threaded.id)).status == "completed"

    await client.pause("d.echo")
    assert await drain_async(app, db.dsn, schema=db.schema) == Drained()
    await client.resume("d.echo")
    assert await drain_async(app, db.dsn, schema=db.schema) == Drained(completed=1)

    with pytest.raises(DispatcherError, match=r"no executor registered for 'd.nope'"):
        await drain_async(app, db.dsn, schema=db.schema, types=["d.nope"])
    with pytest.raises(SchemaNotReady, match=r"schema 'never_migrated' is not migrated"):
        await drain_async(app, db.dsn, schema="never_migrated")


async def test_limits_hold_and_rounds_go_on_until_every_job_ran(
    db: TestDatabase, client: AsyncClient
) -> None:
    # Claims cut short by a key limit, a concurrency limit and a rate limit (the
    # worker-mode statements, under their per-type locks): the drain claims again.
    app = drain_app(db)
    for n in range(4):
        await client.enqueue("d.one_per_key", {"n": n}, concurrency_key="k")
        await client.enqueue("d.one_at_a_time", {"n": n})
    assert await drain_async(app, db.dsn, schema=db.schema) == Drained(completed=8)
    conn = await db.connect()
    try:
        rows = await conn.fetch(
            f"SELECT type, started_at, finished_at FROM {db.jobs} ORDER BY started_at"
        )
    finally:
        await conn.close()
    for type_ in ("d.one_per_key", "d.one_at_a_time"):
        runs = [(r["started_at"], r["finished_at"]) for r in rows if r["type"] == type_]
        assert len(runs) == 4
        # One at a time: each started once the one before had finished.
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(runs)), type_


async def test_a_drain_that_cannot_end_says_so(db: TestDatabase, client: AsyncClient) -> None:
    app = drain_app(db)
    await client.enqueue("d.snooze")
    with pytest.raises(DispatcherError, match=r"drain did not finish within 0.5s"):
        await drain_async(app, db.dsn, schema=db.schema, with_scheduled=True, timeout=0.5)


async def test_the_sync_drain_takes_a_dsn_and_refuses_a_running_loop(db: TestDatabase) -> None:
    app = drain_app(db)
    with Client(db.dsn, schema=db.schema) as sync_client:
        job = await asyncio.to_thread(sync_client.enqueue, "d.echo", {"sync": True})
        drained = await asyncio.to_thread(drain, app, db.dsn, schema=db.schema)
        assert drained == Drained(completed=1)
        assert (await asyncio.to_thread(sync_client.get, job.id)).status == "completed"
    with pytest.raises(DispatcherError, match="use `await drain_async"):
        drain(app, db.dsn, schema=db.schema)
