"""Keeps this replica's running attempts alive in the table, and writes their progress.

Every ``interval`` one statement heartbeats all held attempts (heartbeat_jobs); what
comes back also tells us which attempts were taken from us (rescued while we could not
heartbeat) and which have a cancel request. A cancel NOTIFY only asks for an early
beat: the row, not the notification, says whether a job is cancelled.

Rows another session holds locked are skipped, not waited for, so one forgotten
``SELECT ... FOR UPDATE`` delays nothing else. Such a row is still ours: its
heartbeat_at ages, so we list it on our replica row (record_locked_jobs) and the
reaper spares it while we are alive to say so.

Progress recorded by executors is written at most every ``progress_interval``, all
jobs in one statement, whatever the number of progress() calls.

Only a successful job heartbeat counts as contact. If there is none for ``stale_after``
minus a margin, the replica stops its attempts itself: the reaper is about to rescue
them, and its retry must not run beside a zombie copy. A plain def executor cannot be
stopped, only asked; if its thread still runs when the reaper may rescue the job,
``on_unstoppable`` is called (``dispatcher run`` exits the process: a dead process
runs nothing twice).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable

import asyncpg

from dispatcher.core.cancellation import cancel_and_wait
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.services.executor import Attempt, CancelReason
from dispatcher.services.job import Job
from dispatcher.services.service_loop import Step, guarded
from dispatcher.services.slots import Slots

OnUnstoppable = Callable[[list[Attempt]], None]


class JobHeartbeat:
    """Heartbeats the attempts in ``slots`` and flushes their progress."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        owner_id: str,
        slots: Slots,
        *,
        interval: float,
        stale_after: float,
        metrics: Metrics,
        progress_interval: float = 0.25,
        on_unstoppable: OnUnstoppable | None = None,
    ) -> None:
        self._pool = pool
        self._queries = queries_for(schema)
        self._owner_id = owner_id
        self._slots = slots
        self.interval = interval
        self._progress_interval = min(progress_interval, interval)
        # Give up a little before the reaper would rescue the jobs...
        self.give_up_after = max(stale_after - max(3 * interval, stale_after / 5), interval)
        # ... and if a thread is still running halfway to that point, it never will stop.
        self.unstoppable_after = (self.give_up_after + stale_after) / 2
        # Bounds a heartbeat or flush, the connection's release included (asyncpg
        # waits on a cancelled statement's reply before it reuses its connection).
        self._step_timeout = 2 * interval
        self._metrics = metrics
        self._on_unstoppable = on_unstoppable
        self._log = get_logger("heartbeat")
        # Appended from executor threads too: deque.append/popleft are thread-safe.
        self._dirty: deque[Job] = deque()
        # When the last successful heartbeat was *sent*: its heartbeat_at is no older.
        self._last_contact = time.monotonic()
        self._beat_requested = False
        self._locked_recorded: list[int] = []
        self._locked_reported: set[int] = set()
        self._unstoppable_reported = False

    def progress_changed(self, job: Job) -> None:
        """Job.progress() callback; may run in an executor thread."""
        self._dirty.append(job)

    def beat_soon(self) -> None:
        """Heartbeat at the next tick (a cancel NOTIFY: read the flags from the rows)."""
        self._beat_requested = True

    async def run(self) -> None:
        """Tick every progress interval: flush progress, heartbeat when due, and check
        for contact. Database work runs in tasks of its own, so the check goes on
        while a statement hangs (a network that drops packets answers nothing)."""
        next_beat = time.monotonic() + self.interval
        beat: asyncio.Task[None] | None = None
        flush: asyncio.Task[bool] | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self._progress_interval)
                if self._dirty and (flush is None or flush.done()):
                    flush = loop.create_task(self._guarded(self.flush_progress))
                due = self._beat_requested or time.monotonic() >= next_beat
                if due and (beat is None or beat.done()):
                    self._beat_requested = False
                    next_beat = time.monotonic() + self.interval
                    beat = loop.create_task(self._beat())
                self._stop_if_cut_off()
        finally:
            await cancel_and_wait([task for task in (beat, flush) if task is not None])

    async def _beat(self) -> None:
        sent = time.monotonic()
        if await self._guarded(self.run_once):
            self._last_contact = sent

    async def _guarded(self, step: Step) -> bool:
        return await guarded(
            step,
            service=Service.HEARTBEAT,
            metrics=self._metrics,
            log=self._log,
            failed="heartbeat_failed",
            timeout=self._step_timeout,
        )

    async def run_once(self) -> None:
        """Heartbeat every held attempt; stop the ones that are no longer ours."""
        sent = self._slots.attempts()
        if not sent and not self._locked_recorded:
            return
        async with self._pool.acquire(timeout=self._step_timeout) as conn:
            rows = await conn.fetch(
                self._queries["heartbeat_jobs"],
                self._owner_id,
                [a.job.id for a in sent],
                [a.job.attempt for a in sent],
                timeout=self.interval * 2,
            )
            by_attempt = {(row["id"], row["attempt"]): row for row in rows}
            locked: list[int] = []
            for attempt in sent:
                row = by_attempt.get((attempt.job.id, attempt.job.attempt))
                if row is None or not row["ours"]:
                    if attempt.cancel(CancelReason.TAKEN_OVER):
                        self._log.warning(
                            "job_taken_over", job_id=attempt.job.id, attempt=attempt.job.attempt
                        )
                    continue
                if not row["beaten"]:
                    locked.append(attempt.job.id)
                if row["cancel_requested"]:
                    attempt.cancel(CancelReason.REQUESTED)
            if locked or self._locked_recorded:
                await conn.execute(
                    self._queries["record_locked_jobs"],
                    self._owner_id,
                    locked,
                    timeout=self.interval * 2,
                )
        # Our own completer holds a row for the moment it writes an outcome: only a
        # row found locked at two beats in a row is worth a warning.
        persistent = set(locked) & set(self._locked_recorded)
        if persistent - self._locked_reported:
            self._log.warning("job_rows_locked_by_another_session", job_ids=sorted(persistent))
        self._locked_reported = persistent
        self._locked_recorded = locked

    async def flush_progress(self) -> None:
        """Write the latest progress of every job that reported some since last time."""
        latest: dict[tuple[int, int], Job] = {}
        while self._dirty:
            job = self._dirty.popleft()
            latest[(job.id, job.attempt)] = job
        jobs = [job for job in latest.values() if job.progress_value is not None]
        if not jobs:
            return
        async with self._pool.acquire(timeout=self._step_timeout) as conn:
            rows = await conn.fetch(
                self._queries["update_progress"],
                self._owner_id,
                [job.id for job in jobs],
                [job.attempt for job in jobs],
                [json.dumps(job.progress_value, allow_nan=False) for job in jobs],
                timeout=self.interval * 2,
            )
        written = {(row["id"], row["attempt"]) for row in rows}
        for job in jobs:
            # Not written: its row is locked by another session (try again next flush)
            # or the attempt is no longer ours (then it is no longer held either).
            if (job.id, job.attempt) not in written and self._slots.holds(job):
                self._dirty.append(job)

    def _stop_if_cut_off(self) -> None:
        silent = time.monotonic() - self._last_contact
        if silent < self.give_up_after or not self._slots:
            self._unstoppable_reported = False
            return
        cancelled = self._slots.cancel_all(CancelReason.DATABASE_LOST)
        if cancelled:
            self._log.error(
                "jobs_abandoned_database_unreachable",
                jobs=cancelled,
                unreachable_for=round(silent, 1),
            )
        if silent < self.unstoppable_after or self._unstoppable_reported:
            return
        running = self._slots.threads_still_running()
        if running:
            self._unstoppable_reported = True
            if self._on_unstoppable is not None:
                self._on_unstoppable(running)
