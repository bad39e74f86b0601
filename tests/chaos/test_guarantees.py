"""Plain def executors that ignore job.cancelled, in real `dispatcher run` processes:
their process's exit is what stops them, and it comes before any other replica can
start their job (issue 12, scenario 4; docs/reliability.md)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from dispatcher.services.draining import EXIT_THREADS_UNSTOPPABLE, HAND_BACK_DELAY, SHUTDOWN_GRACE
from tests.chaos.conftest import StartChaosReplicas
from tests.support.attempt_log import create_attempts_log, fetch_runs, overlapping_runs
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess, leader_name
from tests.support.runtimes import FAST_SETTINGS, fast_env
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

SHUTDOWN_TIMEOUT = 1.0
STALE_AFTER = float(FAST_SETTINGS["stale_after"])


async def exited(replica: ReplicaProcess, timeout: float) -> tuple[int, float]:
    """Wait for the process to end; its exit status and (about) when it ended."""
    code = await asyncio.to_thread(replica.process.wait, timeout)
    return code, time.time()


async def test_sigterm_hands_a_stuck_threads_job_back_and_exits_before_it_runs_again(
    db: TestDatabase,
    replicas: list[ReplicaProcess],
    start_chaos_replicas: StartChaosReplicas,
) -> None:
    await start_chaos_replicas(db, fast_env(shutdown_timeout=str(SHUTDOWN_TIMEOUT)))
    conn = await db.connect()
    try:
        first = await eventually(lambda: leader_name(conn, db.schema), timeout=30, what="a leader")
        # The thread outlasts the shutdown timeout and the grace after it.
        seconds = SHUTDOWN_TIMEOUT + SHUTDOWN_GRACE + 3
        job_id = await conn.fetchval(
            f"INSERT INTO {db.jobs} (type, payload, max_attempts) "
            "VALUES ('chaos.sync', jsonb_build_object('seconds', $1::float8), 1) RETURNING id",
            seconds,
        )

        async def running() -> bool:
            runs = await fetch_runs(conn, db.schema)
            return any(r.job_id == job_id for r in runs)

        await eventually(running, timeout=10, what="the sync job to start")
        victim = next(r for r in replicas if r.name == first)
        victim.signal(signal.SIGTERM)
        code, exit_time = await exited(victim, timeout=60)

        async def completed() -> asyncpg.Record | None:
            row = await conn.fetchrow(f"SELECT * FROM {db.jobs} WHERE id = $1", job_id)
            return row if row["status"] == "completed" else None

        row = await eventually(completed, timeout=seconds + 20, what="the job to run again")
        runs = await fetch_runs(conn, db.schema)
    finally:
        await conn.close()
    assert code == 0, victim.log_tail()
    assert "shutdown_exiting_with_threads_running" in victim.log_path.read_text()
    assert row["attempts"] == 1, "handed back unspent (max_attempts=1, and it did not fail)"
    assert not row["owner"].startswith(first)
    first_run, second_run = runs
    assert first_run.pid == victim.pid and first_run.ended_at is None, "stopped by the exit"
    assert second_run.started_at >= exit_time - 0.05
    assert second_run.started_at - exit_time < HAND_BACK_DELAY + 5
    assert overlapping_runs(runs, ended_by_exit={victim.pid: exit_time}) == []


@pytest.fixture
async def proxy(db: TestDatabase) -> AsyncIterator[TcpProxy]:
    tcp = await TcpProxy(db.dsn).start()
    yield tcp
    await tcp.close()


async def test_a_replica_cut_off_with_a_stuck_thread_exits_before_the_reaper_rescues(
    db: TestDatabase, replicas: list[ReplicaProcess], proxy: TcpProxy, tmp_path: Path
) -> None:
    # r0 leads and runs a thread that ignores job.cancelled; then every statement it
    # sends goes unanswered. It gives its jobs up, cannot stop the thread, and must be
    # gone before the new leader's reaper may call the job stale.
    conn = await db.connect()
    try:
        await create_attempts_log(conn, db.schema)
        env = {**fast_env(), "DISPATCHER_SCHEMA": db.schema}
        through_proxy = {"DISPATCHER_DSN": proxy.dsn, "DISPATCHER_ELECTION_DSN": proxy.dsn}
        app = "tests.support.chaos_app:app"
        r0 = ReplicaProcess(app, name="r0", env={**env, **through_proxy}, log_path=tmp_path / "r0")
        replicas.append(r0)
        await asyncio.to_thread(r0.wait_healthy)
        await eventually(lambda: leader_name(conn, db.schema), timeout=30, what="r0 to lead")
        direct = {"DISPATCHER_DSN": db.dsn}
        r1 = ReplicaProcess(app, name="r1", env={**env, **direct}, log_path=tmp_path / "r1")
        replicas.append(r1)
        await asyncio.to_thread(r1.wait_healthy)
        assert await leader_name(conn, db.schema) == "r0"
        job_id = await conn.fetchval(
            f"INSERT INTO {db.jobs} (type, payload) "
            "VALUES ('chaos.sync', jsonb_build_object('seconds', $1::float8)) RETURNING id",
            STALE_AFTER + 3,
        )

        async def running() -> bool:
            runs = await fetch_runs(conn, db.schema)
            return any(r.job_id == job_id for r in runs)

        await eventually(running, timeout=10, what="the sync job to start on r0")
        proxy.hold_replies(to="")  # every statement from now on
        code, exit_time = await exited(r0, timeout=30)

        async def completed() -> asyncpg.Record | None:
            row = await conn.fetchrow(f"SELECT * FROM {db.jobs} WHERE id = $1", job_id)
            return row if row["status"] == "completed" else None

        row = await eventually(completed, timeout=60, what="the job to be rescued and run")
        runs = await fetch_runs(conn, db.schema)
    finally:
        await conn.close()
    assert code == EXIT_THREADS_UNSTOPPABLE, r0.log_tail()
    assert "exiting_sync_jobs_unstoppable" in r0.log_path.read_text()
    assert row["attempts"] == 2 and row["owner"].startswith("r1")
    assert "stale: owner stopped heartbeating" in row["last_error"]
    second = next(r for r in runs if r.attempt == 2)
    assert second.started_at > exit_time
    assert overlapping_runs(runs, ended_by_exit={r0.pid: exit_time}) == []
