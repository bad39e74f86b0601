"""Every run of every attempt, written by the test apps themselves into
``<schema>.attempts_log``, so overlaps and losses are computed from the database, not
from the runtime's own bookkeeping.

A run's start is committed before its work begins; its end (with the outcome) as soon
as the database takes it, retrying through outages. Times come from this machine's
clock, shared by the tests, the harness and every replica process, so they stay right
even when the database is down at the moment an attempt ends. A run that never ends
(its process was killed) has no end: the test supplies the kill time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from dispatcher.services.job import Job

ATTEMPTS_LOG = """
CREATE TABLE IF NOT EXISTS {schema}.attempts_log (
    run_id     text             PRIMARY KEY,
    job_id     bigint           NOT NULL,
    attempt    integer          NOT NULL,
    replica    text             NOT NULL,
    pid        integer          NOT NULL,
    started_at double precision NOT NULL,
    ended_at   double precision,
    outcome    text
)
"""


class AttemptLog:
    """Writes attempt runs of one replica (``replica``) into ``schema``'s attempts_log."""

    def __init__(self, dsn: str, schema: str, replica: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.table = f'"{schema}".attempts_log'
        self.replica = replica
        self.pool: asyncpg.Pool | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ends: asyncio.Queue[tuple[RunStart, float, str]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=5)
        self.task = asyncio.create_task(self._write_ends())

    async def _retrying(self, sql: str, *args: Any) -> None:
        assert self.pool is not None, "AttemptLog.start() first"
        while True:
            try:
                await self.pool.execute(sql, *args, timeout=5)
                return
            except Exception:  # whatever the outage looks like: try again
                await asyncio.sleep(0.2)

    async def started(self, job: Job) -> RunStart:
        """Record (and commit) the start of a run of ``job``'s attempt."""
        start = RunStart.of(job)
        await self._record_start(start)
        return start

    def _run_columns(self, start: RunStart) -> tuple[object, ...]:
        """(run_id, job_id, attempt, replica, pid, started_at) of a run."""
        return (start.run_id, start.job_id, start.attempt, self.replica, os.getpid(),
                start.started_at)  # fmt: skip

    async def _record_start(self, start: RunStart) -> None:
        await self._retrying(
            f"INSERT INTO {self.table} (run_id, job_id, attempt, replica, pid, started_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            *self._run_columns(start),
        )

    def ended(self, start: RunStart, outcome: str) -> None:
        """Record the end of a run now (written in the background)."""
        self.ends.put_nowait((start, time.time(), outcome))

    def started_from_thread(self, job: Job) -> RunStart:
        """started(), from a plain def executor's thread."""
        assert self.loop is not None, "AttemptLog.start() first"
        return asyncio.run_coroutine_threadsafe(self.started(job), self.loop).result()

    def ended_from_thread(self, start: RunStart, outcome: str) -> None:
        """ended(), from a plain def executor's thread."""
        assert self.loop is not None, "AttemptLog.start() first"
        self.loop.call_soon_threadsafe(self.ends.put_nowait, (start, time.time(), outcome))

    async def _write_ends(self) -> None:
        while True:
            start, at, outcome = await self.ends.get()
            # An upsert: the start's INSERT may have been cut short (cancelled while a
            # failing primary took it), so the end carries the whole run.
            await self._retrying(
                f"INSERT INTO {self.table} "
                "(run_id, job_id, attempt, replica, pid, started_at, ended_at, outcome) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (run_id) DO UPDATE SET ended_at = $7, outcome = $8",
                *self._run_columns(start),
                at,
                outcome,
            )
            self.ends.task_done()

    async def written_runs(self, conn: asyncpg.Connection) -> list[Run]:
        """Every run in the table, once every end recorded so far is written: ends are
        written in the background, so a job's row may say completed before its run's
        end is in the table."""
        await asyncio.wait_for(self.ends.join(), 30)
        return await fetch_runs(conn, self.schema)

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ends.join(), 30)
        if self.task is not None:
            self.task.cancel()
        if self.pool is not None:
            await self.pool.close()

    @contextlib.asynccontextmanager
    async def run(self, job: Job) -> AsyncIterator[None]:
        """Record one run of an async executor around its body. A run cancelled while
        its start is being recorded (its replica lost its session in an outage) still
        gets its end: the start may have reached the database all the same."""
        start = RunStart.of(job)
        outcome = "error"
        try:
            await self._record_start(start)
            yield
            outcome = "completed"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.ended(start, outcome)

    @contextlib.contextmanager
    def run_in_thread(self, job: Job) -> Iterator[None]:
        """Record one run of a plain def executor around its body."""
        start = self.started_from_thread(job)
        outcome = "error"
        try:
            yield
            outcome = "completed"
        finally:
            self.ended_from_thread(start, outcome)


@dataclass(frozen=True)
class RunStart:
    """What the start of a run records, kept so its end can record it again."""

    run_id: str
    job_id: int
    attempt: int
    started_at: float

    @classmethod
    def of(cls, job: Job) -> RunStart:
        """A run of ``job``'s attempt starting now."""
        return cls(uuid.uuid4().hex, job.id, job.attempt, time.time())


@dataclass(frozen=True)
class Run:
    job_id: int
    attempt: int
    replica: str
    pid: int
    started_at: float
    ended_at: float | None
    outcome: str | None


async def create_attempts_log(conn: asyncpg.Connection, schema: str) -> None:
    await conn.execute(ATTEMPTS_LOG.format(schema=f'"{schema}"'))


async def fetch_runs(conn: asyncpg.Connection, schema: str) -> list[Run]:
    rows = await conn.fetch(
        f"SELECT job_id, attempt, replica, pid, started_at, ended_at, outcome "
        f'FROM "{schema}".attempts_log ORDER BY started_at'
    )
    return [Run(**dict(row)) for row in rows]


def overlapping_runs(
    runs: list[Run], *, ended_by_exit: dict[int, float] | None = None
) -> list[tuple[Run, Run]]:
    """Pairs of runs of one job that overlap in time. A run without an end ended when
    its process did (``ended_by_exit``: pid -> exit time); one with neither is still
    running, so it overlaps anything that started after it."""
    exits = ended_by_exit or {}
    by_job: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job_id].append(run)
    found = []
    for job_runs in by_job.values():
        job_runs.sort(key=lambda r: r.started_at)
        for a, b in itertools.combinations(job_runs, 2):
            end_a = a.ended_at if a.ended_at is not None else exits.get(a.pid, float("inf"))
            if b.started_at < end_a:
                found.append((a, b))
    return found
