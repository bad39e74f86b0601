"""The leader's claim loop, and the slots of the jobs this replica runs.

Wake-ups: a NOTIFY of new jobs, a poll tick (notifications can be missed across a
reconnect), the earliest future run_at, a freed slot, a new term. Each wake-up claims
with one statement for every type that has an executor and free capacity (claim_jobs:
``FOR UPDATE SKIP LOCKED``, fenced by the leader term), and keeps claiming while the
last claim came back full.

Limits are global truths, not per-process counts. A slot is taken at claim and given
back only when the outcome is committed, so the table never shows more jobs of a type
processing than its limit. After a hand-over the new leader also counts the jobs
still processing under other owners (the old leader draining) until they end.

In-flight attempts live here whatever the role: a replica deposed while running jobs
keeps them (the heartbeat keeps them alive) and completes them, fenced.

Paused types (job_types.paused) are left alone; the set is re-read on a control NOTIFY
and every poll tick. Rate-limited types get at most their window's remaining starts.

Worker mode (``mode="all"``): every replica claims, whether it leads or not (SKIP
LOCKED keeps claims apart). A type with a cluster limit (``concurrency=``) or a rate
limit is claimed under a per-type transaction advisory lock, counting the jobs
processing anywhere (and the recent starts) after taking it, so those limits stay
exact; the global limit then bounds each replica on its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg

from dispatcher.app import App
from dispatcher.cancellation import cancel_and_wait, wait_for_event
from dispatcher.completer import Completer
from dispatcher.database_errors import describe, is_transient
from dispatcher.executor import Attempt, CancelReason, Outcome, OutcomeKind, run_attempt
from dispatcher.job import Job
from dispatcher.log import get_logger
from dispatcher.metrics import Metrics
from dispatcher.queries import queries_for
from dispatcher.rate_limit import RateWindows

_RESCHEDULED = (OutcomeKind.RETRY, OutcomeKind.SNOOZE, OutcomeKind.REQUEUE)
CLAIM_SLICES = 4
CLAIM_BATCH_MIN = 100


class Dispatcher:
    """Claims jobs while leading; runs them; frees their slots once written."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        app: App,
        schema: str,
        owner_id: str,
        is_leader: Callable[[], bool],
        can_claim: Callable[[], bool] | None = None,
        threads: ThreadPoolExecutor,
        attempts: dict[int, Attempt] | None = None,
        concurrency: int | None = None,
        poll_interval: float = 1.0,
        claim_batch: int | None = None,
        mode: str = "leader",
        on_progress: Callable[[Job], None] | None = None,
        start_within: float = math.inf,
        metrics: Metrics | None = None,
        log: Any = None,
    ) -> None:
        self.app = app
        self.owner_id = owner_id
        self.limit = concurrency or app.concurrency
        # In-flight attempts by job id, shared with the job heartbeat.
        self.attempts: dict[int, Attempt] = {} if attempts is None else attempts
        # Set by the runtime (the completer needs our release() in turn).
        self.completer: Completer | None = None
        self._pool = pool
        self._queries = queries_for(schema)
        self._is_leader = is_leader
        self.mode = mode
        # Leader mode claims while leading (and trusted); worker mode while running.
        self._can_claim = can_claim or is_leader
        self._schema = schema
        self._threads = threads
        self._poll_interval = poll_interval
        # Claiming in slices of the capacity lets the next claim overlap with the
        # completion of the previous slice: Python and Postgres work side by side.
        self._claim_batch = claim_batch or max(CLAIM_BATCH_MIN, self.limit // CLAIM_SLICES)
        self._on_progress = on_progress
        # An attempt not started this long after its claim may have been rescued.
        self._start_within = start_within
        self._metrics = metrics
        self._log = log or get_logger("dispatch")
        self._running: Counter[str] = Counter()
        self._foreign: Counter[str] = Counter()
        self._term: int | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake_source = "election"
        self._loop_task: asyncio.Task[None] | None = None
        self._more_waiting = False  # the last claim was cut short by capacity
        self._next_due: float | None = None  # monotonic time of the next future run_at
        self._types = sorted(app.executors)
        self.paused: set[str] = set()
        self.rates = RateWindows(
            {t: s.rate_limit for t, s in app.executors.items() if s.rate_limit is not None}
        )
        # Worker mode: the cluster-wide limit of each type (None: only the local one).
        self._cluster_limits = [app.executors[t].concurrency for t in self._types]
        # Effective per-type limits (never above the global one).
        # A type without its own limit follows the global one (which an operator may
        # raise with DISPATCHER_CONCURRENCY beyond the app's default).
        self.type_limits = {
            t: min(app.executors[t].concurrency or self.limit, self.limit) for t in self._types
        }
        self._max_attempts = [app.executors[t].max_attempts for t in self._types]
        self._timeouts = [app.executors[t].timeout for t in self._types]
        self._running_gauges = (
            {t: metrics.jobs_running.labels(t) for t in self._types} if metrics else {}
        )
        self._wait_histograms = (
            {t: metrics.job_queue_wait.labels(t) for t in self._types} if metrics else {}
        )
        if metrics is not None:
            metrics.concurrency_limit.labels("*").set(self.limit)
            for type_, limit in self.type_limits.items():
                metrics.concurrency_limit.labels(type_).set(limit)

    # --- leadership ------------------------------------------------------------------

    def lead(self, term: int) -> None:
        """Leader mode: start claiming under ``term``."""
        self._term = term
        self.start_claiming("election")

    def start_claiming(self, source: str = "start") -> None:
        self.wake(source)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(
                self._claim_loop(), name="claim-loop"
            )

    async def step_down(self) -> None:
        """Stop claiming at once (running jobs go on)."""
        self._term = None
        task, self._loop_task = self._loop_task, None
        if task is not None:
            await cancel_and_wait([task])

    def wake(self, source: str) -> None:
        """Ask the claim loop to look for work now."""
        self._wake_source = source
        self._wake.set()

    # --- the claim loop ----------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self._prepare()
                break
            except Exception as exc:
                failures += 1
                self._log.warning("claim_prepare_failed", error=describe(exc))
                await asyncio.sleep(min(self._poll_interval, 0.05 * 2**failures))
        failures = 0
        while True:
            timeout = self._poll_interval
            if self._next_due is not None:
                timeout = max(0.0, min(timeout, self._next_due - time.monotonic()))
            if await wait_for_event(self._wake, timeout):
                source = self._wake_source
            else:
                due = self._next_due is not None and self._next_due <= time.monotonic()
                source = "timer" if due else "poll"
            if self._next_due is not None and self._next_due <= time.monotonic():
                self._next_due = None  # consumed: the pass below sets the next one
            self._wake.clear()
            if self._metrics is not None:
                self._metrics.wakeups.labels(source).inc()
            try:
                if source in ("poll", "control", "reconnect"):
                    await self.refresh_paused()
                await self._claim_until_done()
                failures = 0
            except Exception as exc:
                if not is_transient(exc):
                    self._log.exception("claim_failed", error=describe(exc))
                else:
                    self._log.warning("claim_failed", error=describe(exc))
                if self._metrics is not None:
                    self._metrics.database_errors.labels("dispatch").inc()
                failures += 1
                await asyncio.sleep(min(self._poll_interval, 0.05 * 2**failures))

    async def _prepare(self) -> None:
        """What a claim loop needs before its first claim."""
        await self.refresh_paused()
        if self.mode == "leader":
            await self._refresh_foreign()
            if self.rates.limits:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch(
                        self._queries["recent_starts"],
                        list(self.rates.limits),
                        max(limit.per for limit in self.rates.limits.values()),
                    )
                self.rates.seed((row["type"], row["ago"]) for row in rows)

    async def refresh_paused(self) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._queries["paused_types"])
        paused = {row["type"] for row in rows}
        if paused != self.paused:
            self._log.info("paused_types", types=sorted(paused))
        self.paused = paused

    def _claiming(self) -> bool:
        if self.mode == "leader":
            return self._term is not None and self._can_claim()
        return self._can_claim()

    async def _claim_until_done(self) -> None:
        while self._claiming():
            full = await self.run_once()
            if not full:
                break
            if self._free_total() <= 0:
                break  # a freed slot wakes us
        if not self._more_waiting and self._claiming():
            await self._schedule_next_due()
        opening = min(
            (t for t in map(self.rates.next_opening, self.rates.limits) if t is not None),
            default=None,
        )
        if opening is not None and (self._next_due is None or opening < self._next_due):
            self._next_due = opening

    def _free_total(self) -> int:
        return self.limit - len(self.attempts) - self._foreign.total()

    async def run_once(self) -> bool:
        """One claim. Returns True if it may have left due jobs behind (it was cut
        short by the batch size or a limit)."""
        term = self._term
        if (self.mode == "leader" and term is None) or not self.app.executors:
            return False
        if self._foreign.total():
            await self._refresh_foreign()
        free_total = self._free_total()
        if free_total <= 0:
            self._more_waiting = True
            return False
        types: list[str] = []
        frees: list[int] = []
        indexes: list[int] = []
        limited = False
        worker = self.mode != "leader"
        for i, type_ in enumerate(self._types):
            if type_ in self.paused:
                continue
            free = self.type_limits[type_] - self._running[type_] - self._foreign[type_]
            free = min(free, free_total)
            budget = None if worker else self.rates.budget(type_)
            if budget is not None:
                free = min(free, budget)
            if free <= 0:
                limited = True
                continue
            types.append(type_)
            frees.append(free)
            indexes.append(i)
        if not types:
            self._more_waiting = limited
            return False
        batch = min(free_total, self._claim_batch)
        max_attempts = [self._max_attempts[i] for i in indexes]
        timeouts = [self._timeouts[i] for i in indexes]
        async with self._pool.acquire() as conn:
            if worker:
                rows = await self._claim_as_worker(conn, types, frees, indexes, batch)
            else:
                rows = await conn.fetch(
                    self._queries["claim_jobs"],
                    term,
                    self.owner_id,
                    types,
                    frees,
                    batch,
                    max_attempts,
                    timeouts,
                )
        claimed: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        start_by = time.monotonic() + self._start_within
        for row in rows:
            self._start(row, loop, start_by)
            claimed[row["type"]] += 1
        if rows:
            self._idle.clear()
        for type_, count in claimed.items():
            self.rates.record(type_, count)
            if self._metrics is not None:
                self._running_gauges[type_].inc(count)
        if self._metrics is not None:
            self._metrics.claim_batch_size.observe(len(rows))
        full = len(rows) >= batch or any(
            claimed[t] >= free for t, free in zip(types, frees, strict=True)
        )
        self._more_waiting = limited or full
        return full

    async def _claim_as_worker(
        self,
        conn: asyncpg.Connection,
        types: list[str],
        frees: list[int],
        indexes: list[int],
        batch: int,
    ) -> list[asyncpg.Record]:
        cluster_limits = [self._cluster_limits[i] for i in indexes]
        rates = [self.rates.limits.get(t) for t in types]
        locked = [
            t
            for t, limit, rate in zip(types, cluster_limits, rates, strict=True)
            if limit is not None or rate is not None
        ]
        async with conn.transaction():
            if locked:
                await conn.execute(self._queries["lock_types"], locked, self._schema)
            rows: list[asyncpg.Record] = await conn.fetch(
                self._queries["claim_jobs_worker"],
                self.owner_id,
                types,
                frees,
                cluster_limits,
                batch,
                [self._max_attempts[i] for i in indexes],
                [self._timeouts[i] for i in indexes],
                [r.starts if r else None for r in rates],
                [r.per if r else None for r in rates],
            )
        return rows

    async def _schedule_next_due(self) -> None:
        async with self._pool.acquire() as conn:
            seconds = await conn.fetchval(self._queries["next_due_in"], self._types)
        self._next_due = None if seconds is None else time.monotonic() + max(0.0, seconds)

    async def _refresh_foreign(self) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._queries["running_by_others"], self.owner_id)
        self._foreign = Counter({row["type"]: row["running"] for row in rows})

    # --- attempts ---------------------------------------------------------------------

    def _start(self, row: asyncpg.Record, loop: asyncio.AbstractEventLoop, start_by: float) -> None:
        type_ = row["type"]
        spec = self.app.executors[type_]
        job = Job(
            row["id"],
            type_,
            row["payload"],
            row["attempts"],
            row["max_attempts"],
            row["timeout"],
            self._on_progress,
            threaded=not spec.is_async,
        )
        attempt = Attempt(job, spec, start_by)
        self.attempts[job.id] = attempt
        self._running[type_] += 1
        if self._metrics is not None:
            self._wait_histograms[type_].observe(row["waited"])
        assert self.completer is not None
        attempt.task = loop.create_task(run_attempt(attempt, self._threads, self.completer.submit))
        if row["cancel_requested"]:
            attempt.cancel(CancelReason.REQUESTED)

    def release(self, outcomes: list[Outcome], written: dict[int, str]) -> None:
        """Completer callback: these outcomes are written (or fenced): free their slots."""
        retry_at: float | None = None
        freed: Counter[str] = Counter()
        for outcome in outcomes:
            if outcome.kind in _RESCHEDULED and written.get(outcome.job_id) == "pending":
                # It runs again at now() + delay: be awake then, not at the next poll.
                at = time.monotonic() + outcome.delay
                retry_at = at if retry_at is None else min(retry_at, at)
            if self.attempts.pop(outcome.job_id, None) is not None:
                freed[outcome.type] += 1
        for type_, count in freed.items():
            self._running[type_] -= count
            if self._metrics is not None:
                self._running_gauges[type_].dec(count)
        if not self.attempts:
            self._idle.set()
        if retry_at is not None and (self._next_due is None or retry_at < self._next_due):
            self._next_due = retry_at
            self.wake("retry")
        elif freed and self._more_waiting and self._claiming():
            self.wake("slot")

    def cancel(self, job_id: int, reason: CancelReason) -> bool:
        """Stop one running attempt; False if it is not running here."""
        attempt = self.attempts.get(job_id)
        return attempt is not None and attempt.cancel(reason)

    def cancel_all(self, reason: CancelReason) -> int:
        return sum(attempt.cancel(reason) for attempt in list(self.attempts.values()))

    async def drain(self, timeout: float) -> bool:
        """Wait until no attempt is in flight (all written); False on timeout."""
        await wait_for_event(self._idle, timeout)
        return not self.attempts

    def running_by_type(self) -> dict[str, int]:
        return {t: n for t, n in self._running.items() if n}
