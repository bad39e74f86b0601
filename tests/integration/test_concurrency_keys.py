"""Per-key concurrency (``key_concurrency``, jobs' ``concurrency_key``) with in-process
replicas against a real Postgres: at most N running per key, per-key order, a hot key
that starves no other, unkeyed jobs unlimited, leader and worker modes, and the
producers' surfaces. Real processes through a kill -9 of the leader:
tests/chaos/test_concurrency_keys.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from dispatcher.core.app import App
from dispatcher.core.errors import DispatcherError, InvalidJob
from dispatcher.producers.async_client import AsyncClient
from dispatcher.services.job import Job
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually


class Runs:
    """What the keyed executor saw: per job its key, start and end (monotonic)."""

    def __init__(self) -> None:
        self.spans: dict[int, tuple[str | None, float, float]] = {}
        self.running: dict[str | None, int] = defaultdict(int)
        self.most_at_once: dict[str | None, int] = defaultdict(int)

    def overlaps(self) -> list[tuple[int, int]]:
        """Pairs of jobs of one key that ran at the same time."""
        by_key: dict[str | None, list[tuple[float, float, int]]] = defaultdict(list)
        for job_id, (key, start, end) in self.spans.items():
            if key is not None:
                by_key[key].append((start, end, job_id))
        pairs = []
        for spans in by_key.values():
            spans.sort()
            for (_, end, a), (start, _, b) in itertools.pairwise(spans):
                if start < end:
                    pairs.append((a, b))
        return pairs


def keyed_app(runs: Runs, *, key_limit: int = 1, seconds: float = 0.01) -> App:
    app = App(concurrency=20)

    @app.executor("t.keyed", key_concurrency=key_limit)
    async def keyed(job: Job) -> None:
        key = job.payload.get("key")
        runs.running[key] += 1
        runs.most_at_once[key] = max(runs.most_at_once[key], runs.running[key])
        start = time.monotonic()
        await asyncio.sleep(job.payload.get("seconds", seconds))
        runs.running[key] -= 1
        runs.spans[job.id] = (key, start, time.monotonic())

    return app


async def enqueue_keyed(
    client: AsyncClient, keys: Sequence[str | None], *, seconds: float = 0.01
) -> list[int]:
    ids = []
    for key in keys:
        job = await client.enqueue("t.keyed", {"key": key, "seconds": seconds}, concurrency_key=key)
        ids.append(job.id)
    return ids


async def all_completed(db: TestDatabase, ids: list[int]) -> bool:
    conn = await db.connect()
    try:
        done = await conn.fetchval(
            f"SELECT count(*) FROM {db.schema}.jobs WHERE id = ANY($1) AND status = 'completed'",
            ids,
        )
        return bool(done == len(ids))
    finally:
        await conn.close()


@pytest.fixture
async def client(db: TestDatabase) -> AsyncIterator[AsyncClient]:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=4)
    yield AsyncClient(pool=pool, schema=db.schema)
    await pool.close()


async def test_one_at_a_time_per_key_in_order(
    db: TestDatabase, start_runtime: StartRuntime, client: AsyncClient
) -> None:
    runs = Runs()
    keys: list[str | None] = [f"customer-{i % 4}" for i in range(80)]
    ids = await enqueue_keyed(client, keys)
    await start_runtime(keyed_app(runs))
    await eventually(lambda: all_completed(db, ids), timeout=60, what="80 keyed jobs completed")
    assert runs.overlaps() == []
    assert max(runs.most_at_once.values()) == 1
    # Four keys ran side by side, each in id order.
    assert len({k for k, _, _ in runs.spans.values()}) == 4
    for key in {k for k in keys}:
        mine = sorted((start, job_id) for job_id, (k, start, _) in runs.spans.items() if k == key)
        assert [job_id for _, job_id in mine] == sorted(job_id for _, job_id in mine), key


async def test_n_at_a_time_per_key_and_unkeyed_jobs_unlimited(
    db: TestDatabase, start_runtime: StartRuntime, client: AsyncClient
) -> None:
    runs = Runs()
    ids = await enqueue_keyed(client, ["a"] * 12 + ["b"] * 12, seconds=0.2)
    unkeyed = await enqueue_keyed(client, [None] * 8, seconds=0.5)
    await start_runtime(keyed_app(runs, key_limit=3))
    await eventually(
        lambda: all_completed(db, ids + unkeyed), timeout=60, what="keyed and unkeyed jobs done"
    )
    assert runs.most_at_once["a"] == 3 and runs.most_at_once["b"] == 3
    assert runs.most_at_once[None] == 8  # only the type's other limits (20) apply


async def test_a_hot_key_does_not_starve_the_others(
    db: TestDatabase, start_runtime: StartRuntime, client: AsyncClient
) -> None:
    runs = Runs()
    conn = await db.connect()
    try:
        # 5,000 jobs under one key, inserted first (the lowest ids, the oldest run_at).
        await conn.execute(
            f"INSERT INTO {db.schema}.jobs (type, payload, concurrency_key) "
            "SELECT 't.keyed', '{\"key\": \"hot\", \"seconds\": 0.05}', 'hot' "
            "FROM generate_series(1, 5000)"
        )
    finally:
        await conn.close()
    cold = await enqueue_keyed(client, [f"cold-{i}" for i in range(10)])
    await start_runtime(keyed_app(runs))
    await eventually(lambda: all_completed(db, cold), timeout=30, what="the cold keys' jobs")
    hot_done = sum(1 for key, _, _ in runs.spans.values() if key == "hot")
    assert hot_done < 100, "the cold keys waited behind the hot key"
    assert runs.most_at_once["hot"] == 1


async def test_worker_mode_counts_every_replicas_jobs(
    db: TestDatabase, start_runtime: StartRuntime, client: AsyncClient
) -> None:
    runs = Runs()  # shared: both replicas run in this process
    ids = await enqueue_keyed(client, [f"k{i % 3}" for i in range(45)], seconds=0.02)
    for name in ("w1", "w2"):
        await start_runtime(keyed_app(runs), name=name, mode="all")
    await eventually(lambda: all_completed(db, ids), timeout=60, what="45 jobs in worker mode")
    assert runs.overlaps() == [] and max(runs.most_at_once.values()) == 1


async def test_producers_set_the_key_and_bad_keys_are_refused(
    db: TestDatabase, client: AsyncClient
) -> None:
    job = await client.enqueue("t.keyed", {}, concurrency_key="customer-42")
    assert job.concurrency_key == "customer-42"
    assert (await client.get(job.id)).concurrency_key == "customer-42"
    for bad in ("", "a\x00b", 42):
        with pytest.raises(InvalidJob, match="concurrency_key"):
            await client.enqueue("t.keyed", {}, concurrency_key=bad)  # type: ignore[arg-type]
    conn = await db.connect()
    try:
        with pytest.raises(asyncpg.CheckViolationError, match="concurrency_key_must_not_be_empty"):
            await conn.execute(
                f"INSERT INTO {db.schema}.jobs (type, concurrency_key) VALUES ('t.keyed', '')"
            )
    finally:
        await conn.close()


def test_key_concurrency_must_be_a_positive_integer() -> None:
    app = App()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DispatcherError, match="key_concurrency must be a positive integer"):
            app.executor("t.x", key_concurrency=bad)  # type: ignore[arg-type]
