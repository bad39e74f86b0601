"""The producer clients (sync on psycopg, async on asyncpg) against a real Postgres."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from dispatcher import (
    AsyncClient,
    Client,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    JobStatus,
)
from tests.support.database import TestDatabase


@pytest.fixture
def client(db: TestDatabase) -> Iterator[Client]:
    with Client(db.dsn, schema=db.schema, max_size=8) as c:
        yield c


@pytest.fixture
async def aclient(db: TestDatabase) -> AsyncIterator[AsyncClient]:
    c = await AsyncClient.connect(db.dsn, schema=db.schema, max_size=8)
    yield c
    await c.close()


def count_jobs(db: TestDatabase, where: str = "true") -> int:
    with psycopg.connect(db.dsn) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{db.schema}".jobs WHERE {where}').fetchone()
        assert row is not None
        return int(row[0])


# --- enqueue, get ---------------------------------------------------------------------


def test_sync_enqueue_and_get(client: Client) -> None:
    job = client.enqueue("email.send", {"to": "a@b.c"}, priority=-5, max_attempts=3, timeout=30)
    assert job.status is JobStatus.PENDING
    assert job.payload == {"to": "a@b.c"}
    assert (job.priority, job.max_attempts, job.timeout) == (-5, 3, 30.0)
    assert job.duplicate is False
    assert client.get(job.id) == job


async def test_async_enqueue_and_get(aclient: AsyncClient) -> None:
    job = await aclient.enqueue("email.send", {"to": "a@b.c"})
    assert job.status is JobStatus.PENDING and job.payload == {"to": "a@b.c"}
    assert await aclient.get(job.id) == job


@pytest.mark.parametrize("payload", ["hello", "42", "", "null", 42, None, [1, "2"], {"a": "b"}])
async def test_payloads_read_back_as_they_were_enqueued(
    client: Client, aclient: AsyncClient, payload: object
) -> None:
    # psycopg decodes jsonb itself: a JSON string once came back decoded twice ("42" as
    # 42) or not at all ("hello" raised JSONDecodeError) through the sync client.
    expected = {} if payload is None else payload
    job = await asyncio.to_thread(client.enqueue, "t.echo", payload)
    assert job.payload == expected
    assert (await asyncio.to_thread(client.get, job.id)).payload == expected
    (listed,) = await asyncio.to_thread(client.list_jobs, type="t.echo")
    assert listed.payload == expected
    assert (await aclient.get(job.id)).payload == expected


def test_run_at_delay_is_counted_on_the_database_clock(client: Client, db: TestDatabase) -> None:
    job = client.enqueue("later", run_at=dt.timedelta(hours=1))
    assert job.run_at - job.created_at == dt.timedelta(hours=1)
    when = dt.datetime(2031, 5, 1, 12, tzinfo=dt.UTC)
    assert client.enqueue("later", run_at=when).run_at == when


def test_get_unknown_job_raises_job_not_found(client: Client) -> None:
    with pytest.raises(JobNotFound, match="no job with id 999999"):
        client.get(999999)


def test_bad_job_is_refused_before_the_database(client: Client, db: TestDatabase) -> None:
    with pytest.raises(InvalidJob, match="max_attempts must be 1 to 10000"):
        client.enqueue("t", max_attempts=0)
    assert count_jobs(db) == 0


# --- transactional enqueue ----------------------------------------------------------------


def test_sync_enqueue_in_the_callers_transaction(client: Client, db: TestDatabase) -> None:
    with psycopg.connect(db.dsn) as conn:
        conn.execute("CREATE TEMP TABLE orders (id int)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (1)")
            client.enqueue("order.ship", {"order": 1}, conn=conn)
        with pytest.raises(RuntimeError, match="business failure"), conn.transaction():
            conn.execute("INSERT INTO orders VALUES (2)")
            client.enqueue("order.ship", {"order": 2}, conn=conn)
            raise RuntimeError("business failure")
    assert count_jobs(db) == 1
    assert count_jobs(db, "payload->>'order' = '1'") == 1


async def test_async_enqueue_in_the_callers_transaction(
    aclient: AsyncClient, db: TestDatabase
) -> None:
    conn = await db.connect()
    try:
        async with conn.transaction():
            await aclient.enqueue("order.ship", {"order": 1}, conn=conn)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await aclient.enqueue("order.ship", {"order": 2}, conn=conn)
                await aclient.enqueue_many("order.ship", [{"order": 3}], conn=conn)
                raise RuntimeError("business failure")
    finally:
        await conn.close()
    assert count_jobs(db) == 1


def test_enqueue_many_rolls_back_with_the_caller(client: Client, db: TestDatabase) -> None:
    with psycopg.connect(db.dsn) as conn, pytest.raises(RuntimeError), conn.transaction():
        client.enqueue_many("t", [{}] * 100, conn=conn)
        raise RuntimeError("business failure")
    assert count_jobs(db) == 0


# --- unique_key ---------------------------------------------------------------------------


def test_20_concurrent_sync_enqueues_of_one_key_yield_one_active_job(
    client: Client, db: TestDatabase
) -> None:
    def enqueue(i: int) -> Any:
        return client.enqueue("report.build", {"attempt": i}, unique_key="report-42")

    with ThreadPoolExecutor(max_workers=20) as pool:
        jobs = list(pool.map(enqueue, range(20)))
    assert len({job.id for job in jobs}) == 1
    assert sum(not job.duplicate for job in jobs) == 1
    assert count_jobs(db) == 1


async def test_20_concurrent_async_enqueues_of_one_key_yield_one_active_job(
    aclient: AsyncClient, db: TestDatabase
) -> None:
    jobs = await asyncio.gather(
        *(aclient.enqueue("report.build", {"i": i}, unique_key="k") for i in range(20))
    )
    assert len({job.id for job in jobs}) == 1
    assert sum(not job.duplicate for job in jobs) == 1
    assert count_jobs(db) == 1


def test_unique_key_is_free_again_once_the_job_finished(client: Client, db: TestDatabase) -> None:
    first = client.enqueue("t", unique_key="k")
    client.cancel(first.id)
    second = client.enqueue("t", unique_key="k")
    assert second.id != first.id and not second.duplicate


def test_enqueue_many_with_unique_keys_maps_duplicates_to_the_active_job(client: Client) -> None:
    existing = client.enqueue("t", {"n": 0}, unique_key="a")
    ids = client.enqueue_many(
        "t", [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}], unique_keys=["a", "b", "c", "b"]
    )
    assert ids[0] == existing.id
    assert ids[1] == ids[3] != ids[2]
    assert client.get(ids[1]).payload == {"n": 2}


# --- bulk ---------------------------------------------------------------------------------


class CountingCursor(psycopg.Cursor[Any]):
    """Counts the statements (execute and COPY) sent through it."""

    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        CountingCursor.statements += 1
        return super().execute(*args, **kwargs)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        CountingCursor.statements += 1
        return super().copy(*args, **kwargs)


def test_enqueue_many_of_10000_jobs_takes_two_statements(
    client: Client, db: TestDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(db.dsn, autocommit=True, cursor_factory=CountingCursor) as conn:
        CountingCursor.statements = 0
        started = time.perf_counter()
        ids = client.enqueue_many(
            "bulk.job", ({"n": n} for n in range(10_000)), priority=3, conn=conn
        )
        elapsed = time.perf_counter() - started
        assert CountingCursor.statements == 2  # reserve ids + COPY
    assert len(ids) == len(set(ids)) == 10_000
    assert count_jobs(db, "type = 'bulk.job' AND priority = 3") == 10_000
    assert client.get(ids[1234]).payload == {"n": 1234}
    with capsys.disabled():
        print(f"\n  enqueue_many: 10,000 jobs in {elapsed * 1000:.0f} ms (sync client, COPY)")


async def test_async_enqueue_many_with_binary_copy(aclient: AsyncClient, db: TestDatabase) -> None:
    when = dt.datetime(2032, 1, 1, tzinfo=dt.UTC)
    ids = await aclient.enqueue_many("bulk", [{"n": n} for n in range(500)], run_at=when, timeout=5)
    assert len(ids) == 500
    job = await aclient.get(ids[-1])
    assert (job.payload, job.run_at, job.timeout) == ({"n": 499}, when, 5.0)


def test_enqueue_many_of_nothing_is_nothing(client: Client) -> None:
    assert client.enqueue_many("t", []) == []


# --- cancel and retry ---------------------------------------------------------------------


def test_cancel_pending_then_retry(client: Client) -> None:
    job = client.enqueue("t")
    cancelled = client.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(InvalidTransition, match=r"cannot cancel job .* it is cancelled"):
        client.cancel(job.id)
    retried = client.retry(job.id)
    assert retried.status is JobStatus.PENDING and retried.finished_at is None
    with pytest.raises(InvalidTransition, match="retry applies to failed or cancelled jobs"):
        client.retry(job.id)


async def test_cancel_processing_sets_the_flag_and_notifies(
    aclient: AsyncClient, db: TestDatabase
) -> None:
    job = await aclient.enqueue("long")
    conn = await db.connect()
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await conn.execute(
            f"UPDATE \"{db.schema}\".jobs SET status = 'processing', attempts = 1, "
            "owner = 'someone', heartbeat_at = now() WHERE id = $1",
            job.id,
        )
        await conn.add_listener(
            f"{db.schema}.cancel", lambda _c, _p, _ch, payload: received.put_nowait(payload)
        )
        flagged = await aclient.cancel(job.id)
        assert flagged.status is JobStatus.PROCESSING and flagged.cancel_requested
        assert await asyncio.wait_for(received.get(), timeout=5) == str(job.id)
    finally:
        await conn.close()


async def test_retry_gives_an_exhausted_job_one_more_attempt(
    aclient: AsyncClient, db: TestDatabase
) -> None:
    job = await aclient.enqueue("t", max_attempts=2)
    conn = await db.connect()
    try:
        await conn.execute(
            f"UPDATE \"{db.schema}\".jobs SET status = 'failed', attempts = 2, "
            "finished_at = now() WHERE id = $1",
            job.id,
        )
    finally:
        await conn.close()
    retried = await aclient.retry(job.id)
    assert retried.status is JobStatus.PENDING
    assert (retried.attempts, retried.max_attempts) == (2, 3)


async def test_async_unknown_job(aclient: AsyncClient) -> None:
    with pytest.raises(JobNotFound):
        await aclient.cancel(424242)
    with pytest.raises(JobNotFound):
        await aclient.retry(424242)
