"""Group commit of attempt outcomes: one UPDATE for many jobs, never one per job.

Outcomes queue up while a write is in flight, so the batch grows with the load on
its own. Nothing waits for company: a slot is free only once its outcome is written,
so every millisecond spent gathering is a millisecond each slot stands idle (a 2 ms
window halved a 16-slot replica's burn-down, bench/README.md). The
write is fenced by owner and attempt (complete_jobs): outcomes of attempts that were
taken from us come back unwritten and are logged as fenced.

While the claimer wants the slots a batch frees (its last claim was cut short), the
batch goes out with that claim in one statement (``write_with_claim``, the
dispatcher's; complete_and_claim_jobs): a slot's cycle costs one round trip and one
commit instead of two. If that statement fails, the batch is written alone as below.

Nothing is lost, and no row holds the others hostage: a transient failure
(connection, restart) keeps the batch and tries again with backoff; a batch the
database refuses for its content is split until the one bad outcome is found, which is
then recorded as a failed attempt instead; a row another session holds locked is
waited for at most ROW_LOCK_WAIT, then the batch is written one outcome at a time and
the locked one is tried again alone, with backoff, until the lock is gone. Its slot
stays held, and its heartbeat goes on, meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from dispatcher.core.cancellation import wait_for_event
from dispatcher.core.database_errors import describe, is_transient
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.core.retry import backoff_delay
from dispatcher.services.executor import Outcome, OutcomeKind

# The status written per (job id, attempt); fenced attempts are absent.
Written = dict[tuple[int, int], str]
# Called with each finished batch (written or fenced) and what was written.
OnWritten = Callable[[list[Outcome], Written], None]
# Writes a batch together with the claim of the slots it frees, if the claimer can now
# (complete_and_claim_jobs); what was written, or None: the batch is written alone.
WriteWithClaim = Callable[[list[Outcome]], Awaitable[Written | None]]
# A write (or the connection's release) slower than this is abandoned and tried again:
# the database may have taken it (then the retry finds the attempt ended, and the
# outcome counts as fenced), or not.
WRITE_TIMEOUT = 30.0
# How long a completion batch waits for a row another session holds locked before it
# is written one outcome at a time (Postgres' lock_timeout syntax).
ROW_LOCK_WAIT = "500ms"
# How long an outcome whose row is locked waits before it is tried again (backing off).
LOCKED_ROW_RETRY_FIRST = 0.05
LOCKED_ROW_RETRY_MAX = 1.0


class Completer:
    """Writes outcomes in batches for one owner; calls ``on_written`` after each."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        owner_id: str,
        on_written: OnWritten,
        *,
        max_batch: int = 5000,
        metrics: Metrics,
    ) -> None:
        self._pool = pool
        self._sql = queries_for(schema)["complete_jobs"]
        self._owner_id = owner_id
        self._on_written = on_written
        # Set by the runtime to the dispatcher's (None: every batch is written alone).
        self.write_with_claim: WriteWithClaim | None = None
        self._max_batch = max_batch
        self._metrics = metrics
        self._log = get_logger("completer")
        self._pending: list[Outcome] = []
        # Outcomes whose row another session held locked, waiting to be tried again.
        self._waiting_on_locks = 0
        self._duration_children: dict[str, Any] = {}
        self._has_pending = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, outcome: Outcome) -> None:
        """Queue an outcome for the next batch (DROPPED ones are released at once)."""
        if outcome.kind is OutcomeKind.DROPPED:
            self._on_written([outcome], {})
            return
        self._pending.append(outcome)
        self._idle.clear()
        self._has_pending.set()

    @property
    def backlog(self) -> int:
        return len(self._pending) + self._waiting_on_locks

    async def run(self) -> None:
        while True:
            await self._has_pending.wait()
            # One turn of the loop: outcomes delivered in this same turn join the batch.
            await asyncio.sleep(0)
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            if not self._pending:
                self._has_pending.clear()
            await self._write(batch)
            self._set_idle_if_done()

    async def flush(self, timeout: float) -> bool:
        """Wait until every submitted outcome is written; False on timeout."""
        return await wait_for_event(self._idle, timeout)

    # --- writing ---------------------------------------------------------------------

    def _set_idle_if_done(self) -> None:
        if not self._pending and not self._waiting_on_locks:
            self._idle.set()

    async def _write(self, batch: list[Outcome]) -> None:
        if self.write_with_claim is not None:
            with_claim = await self.write_with_claim(batch)
            if with_claim is not None:
                self._record(batch, with_claim)
                self._on_written(batch, with_claim)
                return
        try:
            written, busy = await self._execute_retrying(batch)
        except Exception as refused:
            # The database refused the batch for its content: find the bad outcome.
            self._log.error(
                "completion_batch_refused", error=describe(refused), outcomes=len(batch)
            )
            written, busy = {}, []
            for outcome in batch:
                alone, locked = await self._write_alone(outcome)
                written.update(alone)
                busy.extend(locked)
        if busy:
            self._try_again_later(busy)
            waiting = set(map(id, busy))
            batch = [outcome for outcome in batch if id(outcome) not in waiting]
        self._record(batch, written)
        self._on_written(batch, written)

    def _try_again_later(self, busy: list[Outcome]) -> None:
        """Rows another session holds locked: try them again alone, backing off."""
        for outcome in busy:
            outcome.locked_out += 1
            tries = outcome.locked_out
            if tries == 1:
                self._log.warning(
                    "completion_waiting_for_row_lock",
                    job_id=outcome.job_id,
                    attempt=outcome.attempt,
                    outcome=outcome.kind.value,
                )
            delay = backoff_delay(tries, LOCKED_ROW_RETRY_FIRST, LOCKED_ROW_RETRY_MAX)
            self._waiting_on_locks += 1
            asyncio.get_running_loop().call_later(delay, self._resubmit, outcome)

    def _resubmit(self, outcome: Outcome) -> None:
        self._waiting_on_locks -= 1
        self._pending.append(outcome)
        self._has_pending.set()

    async def _execute_retrying(self, batch: list[Outcome]) -> tuple[Written, list[Outcome]]:
        """Execute; retry transient failures with backoff; raise any other error."""
        failures = 0
        while True:
            try:
                return await self._execute(batch)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                delay = backoff_delay(failures, 0.05, 2.0)
                self._metrics.database_errors.labels(Service.COMPLETER).inc()
                self._log.warning(
                    "completion_write_retrying",
                    error=describe(exc),
                    outcomes=len(batch),
                    retry_in=round(delay, 3),
                )
                await asyncio.sleep(delay)

    async def _write_alone(self, outcome: Outcome) -> tuple[Written, list[Outcome]]:
        try:
            return await self._execute_retrying([outcome])
        except Exception as refused:
            outcome.kind = OutcomeKind.FAILED
            outcome.result_json = None
            outcome.error = f"the outcome could not be stored: {describe(refused)}"
            outcome.traceback = None
        try:
            return await self._execute_retrying([outcome])
        except Exception as again:
            # Left processing; no longer heartbeated, so the reaper rescues it.
            self._log.error("completion_dropped", job_id=outcome.job_id, error=describe(again))
            return {}, []

    async def _execute(self, batch: list[Outcome]) -> tuple[Written, list[Outcome]]:
        """complete_jobs: what it wrote, and the outcomes whose row another session
        holds locked (busy: written later)."""
        try:
            async with self._pool.acquire(timeout=WRITE_TIMEOUT) as conn:
                rows = await conn.fetch(
                    self._sql, *outcome_arguments(self._owner_id, batch), timeout=WRITE_TIMEOUT
                )
        except asyncpg.LockNotAvailableError:
            if len(batch) == 1:
                return {}, list(batch)
            # Some row of the batch is locked by another session: one by one, so that
            # row holds back only itself.
            written: Written = {}
            busy: list[Outcome] = []
            for outcome in batch:
                alone, locked = await self._execute([outcome])
                written.update(alone)
                busy.extend(locked)
            return written, busy
        return {(row["id"], row["attempt"]): row["status"] for row in rows}, []

    def _record(self, batch: list[Outcome], written: Written) -> None:
        metrics = self._metrics
        # Counted per (counter, type) and added once per batch: metric updates take a
        # lock each, so per-job increments would cost more than the write itself.
        counts: Counter[tuple[Any, str]] = Counter()
        durations = self._duration_children
        for outcome in batch:
            status = written.get((outcome.job_id, outcome.attempt))
            if status is None:
                self._log.warning(
                    "job_outcome_fenced",
                    job_id=outcome.job_id,
                    type=outcome.type,
                    attempt=outcome.attempt,
                    outcome=outcome.kind.value,
                )
                counts[(metrics.jobs_fenced, outcome.type)] += 1
                continue
            counter = _counter_for(metrics, status, outcome.kind)
            if counter is not None:
                counts[(counter, outcome.type)] += 1
            child = durations.get(outcome.type)
            if child is None:
                child = durations[outcome.type] = metrics.job_duration.labels(outcome.type)
            child.observe(outcome.duration)
        metrics.completion_batch_size.observe(len(batch))
        for (counter, type_), n in counts.items():
            counter.labels(type_).inc(n)


def outcome_arguments(owner_id: str, batch: list[Outcome]) -> tuple[object, ...]:
    """complete_jobs' $1 to $9 for ``batch``."""
    return (
        owner_id,
        [o.job_id for o in batch],
        [o.attempt for o in batch],
        [o.kind.value for o in batch],
        [o.result_json for o in batch],
        [o.error for o in batch],
        [o.traceback for o in batch],
        [o.delay for o in batch],
        ROW_LOCK_WAIT,
    )


def _counter_for(metrics: Metrics, status: str, kind: OutcomeKind) -> Any:
    if status == "completed":
        return metrics.jobs_completed
    if status == "failed":
        return metrics.jobs_failed
    if status == "cancelled":
        return metrics.jobs_cancelled
    if kind is OutcomeKind.RETRY:
        return metrics.jobs_retried
    if kind is OutcomeKind.SNOOZE:
        return metrics.jobs_snoozed
    return None
