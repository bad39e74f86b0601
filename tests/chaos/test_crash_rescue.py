"""A replica process killed with jobs in flight: the new leader rescues its async jobs
within seconds of the kill, because the victim's session lock is gone, not after
stale_after (see dispatcher/services/replica_session.py); its plain def jobs, which a
live process could not have stopped at once, keep the stale_after path."""

from __future__ import annotations

import json
import signal
import time

import asyncpg
import pytest

from tests.chaos.conftest import StartChaosReplicas
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess
from tests.support.runtimes import fast_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

# stale_after far away: within RESCUE_WITHIN only the session lock can tell.
STALE_AFTER = 120
RESCUE_WITHIN = 30
ENV = {
    **fast_env(lease="3", stale_after=str(STALE_AFTER)),
    "CHAOS_CONCURRENCY": "50",
    "CHAOS_TYPE_LIMIT": "50",
}
ASYNC_JOBS = 20
SYNC_JOBS = 5


async def current_leader(conn: asyncpg.Connection, schema: str) -> str | None:
    holder: str | None = await conn.fetchval(
        f'SELECT holder FROM "{schema}".leader WHERE lease_until > now()'
    )
    return holder


async def test_a_killed_replicas_async_jobs_are_rescued_in_seconds_not_after_stale_after(
    db: TestDatabase,
    replicas: list[ReplicaProcess],
    start_chaos_replicas: StartChaosReplicas,
) -> None:
    await start_chaos_replicas(db, ENV)
    conn = await db.connect()
    try:
        owner = await eventually(
            lambda: current_leader(conn, db.schema), timeout=30, what="a leader"
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, payload) "
            f"""SELECT 'chaos.work', '{{"seconds": 600}}' FROM generate_series(1, {ASYNC_JOBS})"""
        )
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, payload) "
            f"""SELECT 'chaos.sync', '{{"seconds": 600}}' FROM generate_series(1, {SYNC_JOBS})"""
        )

        async def all_running() -> bool:
            n = await conn.fetchval(
                f'SELECT count(*) FROM "{db.schema}".attempts_log WHERE ended_at IS NULL'
            )
            return n == ASYNC_JOBS + SYNC_JOBS

        await eventually(all_running, timeout=30, what="every job running on the leader")
        victim = next(r for r in replicas if owner.startswith(f"{r.name}-"))
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)

        async def async_jobs_rescued() -> bool:
            n = await conn.fetchval(
                f"SELECT count(*) FROM {db.jobs} WHERE type = 'chaos.work' "
                "AND status = 'processing' AND owner = $1",
                owner,
            )
            return n == 0

        await eventually(
            async_jobs_rescued,
            timeout=RESCUE_WITHIN,
            what=f"the killed leader's async jobs to be rescued (stale_after is {STALE_AFTER}s)",
            every=0.05,
        )
        took = time.monotonic() - killed_at
        print(f"async jobs of the killed replica rescued {took:.2f}s after the kill -9")
        sync_held = await conn.fetchval(
            f"SELECT count(*) FROM {db.jobs} WHERE type = 'chaos.sync' "
            "AND status = 'processing' AND owner = $1",
            owner,
        )
        rows = await conn.fetch(f"SELECT errors FROM {db.jobs} WHERE type = 'chaos.work'")
    finally:
        await conn.close()

    assert sync_held == SYNC_JOBS
    for row in rows:
        (error,) = json.loads(row["errors"])
        assert error["error"] == (
            f"orphaned: owner {owner} lost its database session (its process died or was cut off)"
        )
