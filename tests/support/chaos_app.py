"""The app real replica processes run in chaos tests: ``tests.support.chaos_app:app``.

Every attempt is recorded in ``<schema>.attempts_log``: its start is written (and
committed) before the work begins, its end (with the outcome) as soon as the database
takes it, so losses and overlapping attempts are computed from the database, not from
logs. Times come from this machine's clock, which the harness shares, so they stay
right even when the database is down at the moment an attempt ends.

Settings from the environment: DISPATCHER_DSN, DISPATCHER_SCHEMA, DISPATCHER_REPLICA_ID,
CHAOS_TYPE_LIMIT, CHAOS_CONCURRENCY.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import asyncpg

from dispatcher import PermanentError
from dispatcher.app import App
from dispatcher.job import Job

ATTEMPTS_LOG = """
CREATE TABLE IF NOT EXISTS {schema}.attempts_log (
    job_id     bigint           NOT NULL,
    attempt    integer          NOT NULL,
    replica    text             NOT NULL,
    pid        integer          NOT NULL,
    started_at double precision NOT NULL,
    ended_at   double precision,
    outcome    text,
    PRIMARY KEY (job_id, attempt, pid)
)
"""

app = App(concurrency=int(os.environ.get("CHAOS_CONCURRENCY", "100")), max_attempts=25)
REPLICA = os.environ.get("DISPATCHER_REPLICA_ID", "?")
PID = os.getpid()


class Recorder:
    """Writes attempt starts and ends, retrying through database outages."""

    def __init__(self) -> None:
        self.pool: asyncpg.Pool | None = None
        self.ends: asyncio.Queue[tuple[int, int, float, str]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        schema = os.environ.get("DISPATCHER_SCHEMA", "dispatcher")
        self.table = f'"{schema}".attempts_log'

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(
            os.environ["DISPATCHER_DSN"], min_size=1, max_size=4, timeout=5
        )
        self.task = asyncio.create_task(self._write_ends())

    async def _retrying(self, sql: str, *args: Any) -> None:
        assert self.pool is not None
        while True:
            try:
                await self.pool.execute(sql, *args, timeout=5)
                return
            except Exception:  # whatever the outage looks like: try again
                await asyncio.sleep(0.2)

    async def started(self, job: Job, at: float) -> None:
        await self._retrying(
            f"INSERT INTO {self.table} (job_id, attempt, replica, pid, started_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            job.id,
            job.attempt,
            REPLICA,
            PID,
            at,
        )

    async def _write_ends(self) -> None:
        while True:
            job_id, attempt, at, outcome = await self.ends.get()
            await self._retrying(
                f"UPDATE {self.table} SET ended_at = $4, outcome = $5 "
                "WHERE job_id = $1 AND attempt = $2 AND pid = $3",
                job_id,
                attempt,
                PID,
                at,
                outcome,
            )
            self.ends.task_done()

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ends.join(), 30)
        if self.task is not None:
            self.task.cancel()
        if self.pool is not None:
            await self.pool.close()


recorder = Recorder()
app.on_startup(recorder.start)
app.on_shutdown(recorder.stop)


@app.executor("chaos.work", concurrency=int(os.environ.get("CHAOS_TYPE_LIMIT", "20")))
async def work(job: Job) -> dict[str, Any]:
    started = time.time()
    await recorder.started(job, started)
    outcome = "error"
    try:
        await asyncio.sleep(float(job.payload.get("seconds", 0.05)))
        outcome = "completed"
        return {"attempt": job.attempt, "replica": REPLICA, "pid": PID}
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        recorder.ends.put_nowait((job.id, job.attempt, time.time(), outcome))


@app.executor("chaos.strict")
async def strict(job: Job) -> dict[str, Any]:
    """Rejects any payload but {"n": <int>}; touches the payload so odd ones (deep
    nesting, huge) are decoded."""
    payload = job.payload
    if not (isinstance(payload, dict) and set(payload) == {"n"} and type(payload["n"]) is int):
        raise PermanentError(f"payload must be {{'n': <int>}}, got {str(payload)[:80]}")
    return {"n": payload["n"]}
