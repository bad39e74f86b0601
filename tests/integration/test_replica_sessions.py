"""A replica's own session (dispatcher.services.replica_session), owner side, on a real
database: losing it stops the replica's async attempts at once and keeps it from
starting anything until a new session is recorded; its threads run on.

The leader's side (rescue of a dead owner's async jobs within orphan_grace) is in
test_reaper.py, and with a real kill -9 in tests/chaos/test_crash_rescue.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from dispatcher.core.app import App
from dispatcher.core.retry import RetryPolicy
from dispatcher.runtime import Runtime
from dispatcher.services.claiming import ClaimRequest
from dispatcher.services.job import Job
from tests.support.database import TestDatabase
from tests.support.runtimes import StartRuntime
from tests.support.waiting import eventually

# Far away: nothing in these tests may be rescued the slow way.
STALE_AFTER = "60"


@dataclass
class Runs:
    """What the executors of blocking_app did: (job id, attempt) per start and end."""

    started: list[tuple[int, int]] = field(default_factory=list)
    cancelled: list[tuple[int, int]] = field(default_factory=list)
    ended_at: dict[tuple[int, int], float] = field(default_factory=dict)
    started_at: dict[tuple[int, int], float] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    release_threads: threading.Event = field(default_factory=threading.Event)


def blocking_app(runs: Runs) -> App:
    app = App(concurrency=10, retry=RetryPolicy(base=0.05, cap=0.1))

    @app.executor("s.block")
    async def block(job: Job) -> None:
        key = (job.id, job.attempt)
        runs.started.append(key)
        runs.started_at[key] = time.monotonic()
        try:
            await runs.release.wait()
        except asyncio.CancelledError:
            runs.cancelled.append(key)
            raise
        finally:
            runs.ended_at[key] = time.monotonic()

    @app.executor("s.thread")
    def thread(job: Job) -> None:
        runs.started.append((job.id, job.attempt))
        runs.release_threads.wait(timeout=60)

    return app


async def session_pid(conn: asyncpg.Connection, db: TestDatabase, owner: str) -> int | None:
    pid: int | None = await conn.fetchval(
        f'SELECT session_pid FROM "{db.schema}".replicas WHERE id = $1', owner
    )
    return pid


async def recorded_session(conn: asyncpg.Connection, db: TestDatabase, runtime: Runtime) -> int:
    async def recorded() -> int | None:
        if runtime.session is None or runtime.session.recorded_pid is None:
            return None
        pid = await session_pid(conn, db, runtime.owner_id)
        return pid if pid == runtime.session.recorded_pid else None

    return await eventually(recorded, timeout=15, what="the replica's session to be recorded")


async def enqueue(conn: asyncpg.Connection, db: TestDatabase, type_: str) -> int:
    job_id: int = await conn.fetchval(
        f"INSERT INTO {db.jobs} (type) VALUES ($1) RETURNING id", type_
    )
    return job_id


async def job_row(conn: asyncpg.Connection, db: TestDatabase, job_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT * FROM {db.jobs} WHERE id = $1", job_id)
    assert row is not None
    return {**row, "errors": json.loads(row["errors"])}


async def test_a_replica_that_loses_its_session_stops_its_async_attempts_and_starts_again(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runs = Runs()
    runtime = await start_runtime(blocking_app(runs), stale_after=STALE_AFTER)
    conn = await db.connect()
    try:
        first_pid = await recorded_session(conn, db, runtime)
        block = await enqueue(conn, db, "s.block")
        threaded = await enqueue(conn, db, "s.thread")
        await eventually(
            lambda: asyncio.sleep(0, len(runs.started) == 2), timeout=15, what="both jobs running"
        )

        # Someone ends the session under a live process (pg_terminate_backend, or every
        # backend restarted after a crash): the leader may now rescue within
        # orphan_grace, so the replica stops its async attempt at once.
        await conn.execute("SELECT pg_terminate_backend($1)", first_pid)
        await eventually(
            lambda: asyncio.sleep(0, (block, 1) in runs.cancelled),
            timeout=10,
            what="the async attempt to be cancelled on the session's loss",
        )
        # A thread cannot be stopped at once: it runs on (its job keeps the stale_after
        # path, see test_reaper) and is still held.
        assert any(a.job.id == threaded for a in runtime.slots.attempts())
        assert (threaded, 1) not in runs.cancelled

        second_pid = await recorded_session(conn, db, runtime)
        assert second_pid != first_pid
        # The job was retried (by the owner's own outcome or by the leader's rescue,
        # whichever came first) and runs again on this replica's new session.
        await eventually(
            lambda: asyncio.sleep(0, (block, 2) in runs.started),
            timeout=15,
            what="the job's second attempt to start",
        )
        assert runs.ended_at[(block, 1)] <= runs.started_at[(block, 2)], "two live attempts"
        runs.release.set()
        runs.release_threads.set()

        async def both_completed() -> bool:
            rows = [await job_row(conn, db, job_id) for job_id in (block, threaded)]
            return all(row["status"] == "completed" for row in rows)

        await eventually(both_completed, timeout=15, what="both jobs to complete")
        row = await job_row(conn, db, block)
        assert row["attempts"] == 2
        assert "lost its database session" in row["errors"][0]["error"], row["errors"]
        assert (await job_row(conn, db, threaded))["attempts"] == 1
    finally:
        runs.release.set()
        runs.release_threads.set()
        await conn.close()


async def test_rows_claimed_while_the_session_was_lost_are_handed_back_unrun(
    db: TestDatabase, start_runtime: StartRuntime
) -> None:
    runs = Runs()
    runs.release.set()
    runtime = await start_runtime(blocking_app(runs), stale_after=STALE_AFTER)
    conn = await db.connect()
    # The wrapper below runs in the claim loop's task while the test polls on conn: a
    # connection of its own, or the two collide ("another operation is in progress").
    terminator = await db.connect()
    try:
        first_pid = await recorded_session(conn, db, runtime)
        session = runtime.session
        assert session is not None
        mode = runtime.dispatcher.mode
        claim: Callable[[asyncpg.Connection, ClaimRequest], Awaitable[list[asyncpg.Record]]]
        claim = mode.claim
        crossed: list[int] = []
        claims: list[int] = []

        async def claim_then_lose_the_session(
            claim_conn: asyncpg.Connection, request: ClaimRequest
        ) -> list[asyncpg.Record]:
            rows = await claim(claim_conn, request)
            claims.append(len(rows))
            if rows and not crossed:
                # The session ends while this claim's reply is on its way.
                generation = session.generation
                await terminator.execute("SELECT pg_terminate_backend($1)", first_pid)
                await eventually(
                    lambda: asyncio.sleep(0, session.generation > generation),
                    timeout=10,
                    what="the replica to notice its session's loss",
                )
                crossed.extend(row["id"] for row in rows)
            return rows

        mode.claim = claim_then_lose_the_session  # type: ignore[method-assign]
        # A claim that looked the method up before the swap may still be in flight.
        await eventually(
            lambda: asyncio.sleep(0, claims), timeout=10, what="a claim through the wrapper"
        )
        job_id = await enqueue(conn, db, "s.block")

        async def completed() -> bool:
            return (await job_row(conn, db, job_id))["status"] == "completed"

        await eventually(completed, timeout=20, what="the job to complete after the loss")
        assert crossed == [job_id]
        # Handed back unrun, its attempt refunded; then run once, on the new session.
        assert runs.started == [(job_id, 1)]
        row = await job_row(conn, db, job_id)
        assert row["attempts"] == 1 and row["errors"] == [], row
        assert await session_pid(conn, db, runtime.owner_id) != first_pid
    finally:
        await terminator.close()
        await conn.close()
