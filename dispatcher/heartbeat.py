"""Keeps this replica's running attempts alive in the table, and writes their progress.

Every ``interval`` one statement heartbeats all in-flight attempts (heartbeat_jobs);
what comes back also tells us which attempts were taken from us (rescued while we
could not heartbeat) and which have a cancel request we may have missed the NOTIFY
of. Progress recorded by executors is written at most every ``progress_interval``, all
jobs in one statement, whatever the number of progress() calls.

If the database stays unreachable for ``stale_after`` minus a margin, the replica
cancels its attempts itself: the reaper is about to rescue them, and its retry must
not run beside a zombie copy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

import asyncpg

from dispatcher.database_errors import describe
from dispatcher.executor import Attempt, CancelReason
from dispatcher.job import Job
from dispatcher.log import get_logger
from dispatcher.metrics import Metrics
from dispatcher.queries import queries_for


class JobHeartbeat:
    """Heartbeats ``attempts`` (shared with the dispatcher) and flushes progress."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        owner_id: str,
        attempts: dict[int, Attempt],
        *,
        interval: float,
        stale_after: float,
        progress_interval: float = 0.25,
        metrics: Metrics | None = None,
        log: Any = None,
    ) -> None:
        self._pool = pool
        self._queries = queries_for(schema)
        self._owner_id = owner_id
        self._attempts = attempts
        self.interval = interval
        self._progress_interval = min(progress_interval, interval)
        # Give up a little before the reaper would rescue the jobs.
        self.give_up_after = max(stale_after - max(3 * interval, stale_after / 5), interval)
        self._metrics = metrics
        self._log = log or get_logger("heartbeat")
        # Appended from executor threads too: deque.append/popleft are thread-safe.
        self._dirty: deque[Job] = deque()
        self._last_contact = time.monotonic()

    def progress_changed(self, job: Job) -> None:
        """Job.progress() callback; may run in an executor thread."""
        self._dirty.append(job)

    async def run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(self._progress_interval)
            if self._dirty:
                await self._guarded(self.flush_progress)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.interval
                await self._guarded(self.run_once)
            self._give_up_if_cut_off()

    async def _guarded(self, step: Any) -> None:
        try:
            await step()
            self._last_contact = time.monotonic()
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.database_errors.labels("heartbeat").inc()
            self._log.warning("heartbeat_failed", error=describe(exc))

    async def run_once(self) -> None:
        """Heartbeat every in-flight attempt; stop the ones that are no longer ours."""
        sent = list(self._attempts.values())
        if not sent:
            return
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                self._queries["heartbeat_jobs"],
                self._owner_id,
                [a.job.id for a in sent],
                [a.job.attempt for a in sent],
                timeout=self.interval * 2,
            )
        still_ours = {row["id"]: row["cancel_requested"] for row in rows}
        for attempt in sent:
            flag = still_ours.get(attempt.job.id)
            if flag is None:
                if attempt.cancel(CancelReason.TAKEN_OVER):
                    self._log.warning(
                        "job_taken_over", job_id=attempt.job.id, attempt=attempt.job.attempt
                    )
            elif flag:
                attempt.cancel(CancelReason.REQUESTED)

    async def flush_progress(self) -> None:
        """Write the latest progress of every job that reported some since last time."""
        latest: dict[int, Job] = {}
        while self._dirty:
            job = self._dirty.popleft()
            latest[job.id] = job
        jobs = [job for job in latest.values() if job.progress_value is not None]
        if not jobs:
            return
        async with self._pool.acquire() as conn:
            await conn.execute(
                self._queries["update_progress"],
                self._owner_id,
                [job.id for job in jobs],
                [job.attempt for job in jobs],
                [json.dumps(job.progress_value, allow_nan=False) for job in jobs],
                timeout=self.interval * 2,
            )

    def _give_up_if_cut_off(self) -> None:
        silent = time.monotonic() - self._last_contact
        if silent < self.give_up_after or not self._attempts:
            return
        cancelled = sum(a.cancel(CancelReason.DATABASE_LOST) for a in self._attempts.values())
        if cancelled:
            self._log.error(
                "jobs_abandoned_database_unreachable",
                jobs=cancelled,
                unreachable_for=round(silent, 1),
            )
