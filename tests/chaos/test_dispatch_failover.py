"""A leader killed with jobs in flight: every job still completes, via the reaper's
retry on the new leader, and each job's completing attempt ran once."""

from __future__ import annotations

import json
import signal

import asyncpg
import pytest

from tests.chaos.conftest import StartChaosReplicas
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess, leader_name
from tests.support.runtimes import fast_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

FAST_ENV = {
    **fast_env(lease="3"),
    "CHAOS_CONCURRENCY": "300",
    "CHAOS_TYPE_LIMIT": "300",
}


async def test_leader_killed_with_200_jobs_in_flight_loses_none(
    db: TestDatabase,
    replicas: list[ReplicaProcess],
    start_chaos_replicas: StartChaosReplicas,
) -> None:
    await start_chaos_replicas(db, FAST_ENV)
    conn = await db.connect()
    try:
        first = await eventually(lambda: leader_name(conn, db.schema), timeout=30, what="a leader")
        await conn.execute(
            f"INSERT INTO {db.jobs} (type, payload) "
            """SELECT 'chaos.work', '{"seconds": 2}' FROM generate_series(1, 200)"""
        )

        async def all_in_flight() -> bool:
            n = await conn.fetchval(
                f'SELECT count(*) FROM "{db.schema}".attempts_log WHERE ended_at IS NULL'
            )
            return n == 200

        await eventually(all_in_flight, timeout=30, what="200 attempts running")
        victim = next(r for r in replicas if r.name == first)
        victim.signal(signal.SIGKILL)

        async def all_done() -> bool:
            n = await conn.fetchval(f"SELECT count(*) FROM {db.jobs} WHERE status <> 'completed'")
            return n == 0

        await eventually(all_done, timeout=60, what="every job to complete", every=0.2)
        jobs = await conn.fetch(f"SELECT id, attempts, result, errors FROM {db.jobs}")
        log = await conn.fetch(
            f'SELECT job_id, attempt, pid, ended_at, outcome FROM "{db.schema}".attempts_log'
        )
    finally:
        await conn.close()

    survivor = next(r for r in replicas if r.name != first)
    assert survivor.alive, survivor.log_tail()
    completions: dict[int, list[asyncpg.Record]] = {}
    for row in log:
        if row["outcome"] == "completed":
            completions.setdefault(row["job_id"], []).append(row)
    for job in jobs:
        result = json.loads(job["result"])
        assert result["pid"] == survivor.pid
        assert result["attempt"] == job["attempts"] >= 2
        (completing,) = completions[job["id"]]  # exactly one attempt completed
        assert (completing["attempt"], completing["pid"]) == (result["attempt"], survivor.pid)
        errors = json.loads(job["errors"])
        # Rescued because the victim's session lock went (replica_session.py), or, had
        # the new leader been slower than stale_after, because its heartbeats stopped.
        assert errors[0]["error"].startswith(
            ("orphaned: owner", "stale: owner stopped heartbeating")
        ), errors
    killed = [row for row in log if row["pid"] == victim.pid]
    assert len(killed) == 200 and all(row["ended_at"] is None for row in killed)
