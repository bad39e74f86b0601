"""The attempts this replica is running: the one owner of in-flight state.

The dispatcher adds an attempt when its claim commits; the completer releases it when
its outcome is written (or found fenced); the heartbeat reads them to keep them alive;
shutdown drains and cancels them. A slot is held from claim to written outcome, so the
table never shows more jobs of a type processing than its limit (an outcome written
with the next claim, complete_and_claim_jobs, frees its slot in that same commit).

Attempts are held by identity, not by job id: when a replica claims again a job it
still runs (the job was rescued from under a paused attempt), the two attempts are two
entries, and the late outcome of the old one frees the old one's slot only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from dispatcher.core.cancellation import wait_for_event
from dispatcher.core.metrics import Metrics
from dispatcher.services.executor import Attempt, CancelReason, Outcome, OutcomeKind
from dispatcher.services.job import Job
from dispatcher.services.wakeup import Wakeup

_RESCHEDULED = (OutcomeKind.RETRY, OutcomeKind.SNOOZE, OutcomeKind.REQUEUE)

# The status complete_jobs wrote, by (job id, attempt); fenced attempts are absent.
Written = dict[tuple[int, int], str]


class Slots:
    """In-flight attempts, their per-type counts, release, drain and cancel."""

    def __init__(self, types: Iterable[str], *, wakeup: Wakeup, metrics: Metrics) -> None:
        self._wakeup = wakeup
        self._attempts: dict[Attempt, None] = {}  # insertion-ordered set
        self._running: Counter[str] = Counter()
        # Held attempts per job id; ids with none are absent (a Counter's miss runs
        # Python code, and every claimed row asks).
        self._job_ids: dict[int, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._gauges: dict[str, Any] = {t: metrics.jobs_running.labels(t) for t in types}

    # --- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._attempts)

    def __bool__(self) -> bool:
        return bool(self._attempts)

    def attempts(self) -> list[Attempt]:
        """A snapshot of the held attempts (safe to iterate across awaits)."""
        return list(self._attempts)

    def running(self, type_: str) -> int:
        return self._running[type_]

    def running_by_type(self) -> dict[str, int]:
        """Held attempts per type (only types with some)."""
        return {t: n for t, n in self._running.items() if n}

    def holds_job(self, job_id: int) -> bool:
        """Whether some attempt of job ``job_id`` is held here."""
        return job_id in self._job_ids

    def of_job(self, job_id: int) -> list[Attempt]:
        """The held attempts of job ``job_id`` (usually none or one)."""
        if job_id not in self._job_ids:
            return []
        return [attempt for attempt in self._attempts if attempt.job.id == job_id]

    def holds(self, job: Job) -> bool:
        """Whether the attempt running ``job`` is still held here."""
        return any(attempt.job is job for attempt in self._attempts)

    def held_types(self, outcomes: list[Outcome]) -> Counter[str]:
        """Per type, how many of ``outcomes`` end attempts held here: the slots that
        writing them frees."""
        held = self._attempts
        return Counter(o.source.job.type for o in outcomes if o.source in held)

    def threads_still_running(self) -> list[Attempt]:
        """Attempts told to stop whose plain def executor's thread has not returned."""
        return [a for a in self._attempts if a.cancel_reason is not None and a.thread_running]

    # --- changing ----------------------------------------------------------------------

    def add(self, attempts: list[Attempt]) -> None:
        """Hold just-claimed attempts (one claim's worth)."""
        added: Counter[str] = Counter()
        job_ids = self._job_ids
        for attempt in attempts:
            self._attempts[attempt] = None
            job_id = attempt.job.id
            job_ids[job_id] = job_ids.get(job_id, 0) + 1
            added[attempt.job.type] += 1
        # Per type, not per job: a metric update takes a lock each.
        for type_, count in added.items():
            self._running[type_] += count
            self._gauges[type_].inc(count)
        if attempts:
            self._idle.clear()

    def release(self, outcomes: list[Outcome], written: Written) -> None:
        """Completer callback: these outcomes are written (or fenced): free the slots of
        the very attempts they end, and wake the claim loop for what became claimable."""
        now = time.monotonic()
        freed: Counter[str] = Counter()
        for outcome in outcomes:
            key = (outcome.job_id, outcome.attempt)
            if outcome.kind in _RESCHEDULED and written.get(key) == "pending":
                # It runs again at now() + delay: be awake then, not at the next poll.
                self._wakeup.retry_at(now + outcome.delay)
            attempt = outcome.source
            if attempt is None or attempt not in self._attempts:
                continue  # not held (already released): nothing to free
            del self._attempts[attempt]
            freed[attempt.job.type] += 1
            job_id = attempt.job.id
            if self._job_ids[job_id] > 1:
                self._job_ids[job_id] -= 1
            else:
                del self._job_ids[job_id]
        for type_, count in freed.items():
            self._running[type_] -= count
            self._gauges[type_].dec(count)
        if not self._attempts:
            self._idle.set()
        if freed:
            self._wakeup.slot_freed()

    def cancel_all(self, reason: CancelReason, *, async_only: bool = False) -> int:
        """Stop every held attempt (or only those of async executors, which stop at
        once) for ``reason``; how many were told to."""
        return sum(
            attempt.cancel(reason)
            for attempt in list(self._attempts)
            if attempt.spec.is_async or not async_only
        )

    async def drain(self, timeout: float | None) -> bool:
        """Wait until no attempt is held (all written); False on timeout."""
        await wait_for_event(self._idle, timeout)
        return not self._attempts
