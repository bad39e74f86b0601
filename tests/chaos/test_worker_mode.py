"""Worker mode (--mode all) with three real replicas: every job exactly once, the
cluster-wide per-type limit held, and throughput against leader mode (printed; the
benchmarks track it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.database import TestDatabase
from tests.support.intervals import max_overlap
from tests.support.processes import ReplicaProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos
JOBS = 10_000


async def until_claiming(batch: list[ReplicaProcess], mode: str) -> None:
    """Wait until the replicas that claim in ``mode`` have begun their claim loops:
    the leader in leader mode, every replica in worker mode. Otherwise the first one
    to start could drain the queue alone, and "every replica claims" would fail."""
    claimers = len(batch) if mode == "all" else 1

    async def claiming() -> bool:
        wakeups = [
            await asyncio.to_thread(replica.metric_total, "dispatcher_wakeups_total")
            for replica in batch
        ]
        return sum(1 for count in wakeups if count >= 1) == claimers

    await eventually(
        claiming, timeout=30, what=f"{claimers} replica(s) claiming in {mode} mode", every=0.1
    )


async def run_mode(
    db: TestDatabase, tmp_path: Path, replicas: list[ReplicaProcess], mode: str
) -> tuple[float, int]:
    """Drain JOBS no-ops and 300 limited jobs with 3 replicas; (no-op jobs/s, peak
    concurrency of the limited type)."""
    conn = await db.connect()
    try:
        await conn.execute(f"TRUNCATE {db.jobs}")
        env = {"DISPATCHER_DSN": db.dsn, "DISPATCHER_SCHEMA": db.schema, "DISPATCHER_MODE": mode}
        batch = [
            ReplicaProcess(
                "tests.support.worker_app:app",
                name=f"{mode}{i}",
                env=env,
                log_path=tmp_path / f"{mode}{i}.log",
            )
            for i in range(3)
        ]
        replicas.extend(batch)
        for replica in batch:
            await asyncio.to_thread(replica.wait_healthy)
        await until_claiming(batch, mode)
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'w.limited' FROM generate_series(1, 300)"
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type) SELECT 'w.noop' FROM generate_series(1, $1)", JOBS
        )

        async def drained() -> bool:
            left = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE status <> 'completed'"
            )
            return left == 0

        await eventually(drained, timeout=180, what=f"{mode} mode to drain", every=0.2)
        summary = await conn.fetchrow(
            "SELECT count(*) AS n, max(attempts) AS max_attempts, "
            "count(DISTINCT owner) AS owners, "
            "extract(epoch FROM max(finished_at) - min(started_at))::float8 AS seconds "
            f"FROM {db.jobs} WHERE type = 'w.noop'"
        )
        limited = await conn.fetch(
            f"SELECT started_at, finished_at FROM {db.jobs} WHERE type = 'w.limited'"
        )
    finally:
        await conn.close()
    for replica in batch:
        assert replica.stop() == 0, replica.log_tail()
    assert summary["n"] == JOBS and summary["max_attempts"] == 1  # each exactly once
    if mode == "all":
        assert summary["owners"] == 3, "in worker mode every replica claims"
    else:
        assert summary["owners"] == 1, "in leader mode only the leader claims"
    peak = max_overlap([(r["started_at"], r["finished_at"]) for r in limited])
    return JOBS / summary["seconds"], peak


@pytest.mark.timeout(400)
async def test_worker_mode_runs_every_job_once_within_limits(
    db: TestDatabase, tmp_path: Path, replicas: list[ReplicaProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    leader_rate, leader_peak = await run_mode(db, tmp_path, replicas, "leader")
    worker_rate, worker_peak = await run_mode(db, tmp_path, replicas, "all")
    with capsys.disabled():
        print(
            f"\n  3 replicas, {JOBS:,} no-op jobs: leader mode {leader_rate:,.0f} jobs/s, "
            f"worker mode {worker_rate:,.0f} jobs/s ({worker_rate / leader_rate:.2f}x); "
            f"limited type peak {leader_peak} / {worker_peak} (limit 4)"
        )
    assert leader_peak <= 4
    assert worker_peak <= 4
