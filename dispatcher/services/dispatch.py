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

In-flight attempts live in :class:`~dispatcher.services.slots.Slots` whatever the role: a
replica deposed while running jobs keeps them (the heartbeat keeps them alive) and
completes them, fenced.

Paused types (job_types.paused) are left alone; the set is re-read on a control NOTIFY
and every poll tick. Rate-limited types get at most their window's remaining starts.

Worker mode (``mode="all"``): every replica claims, whether it leads or not (SKIP
LOCKED keeps claims apart). A type with a cluster limit (``concurrency=``) or a rate
limit is claimed under a per-type transaction advisory lock, counting the jobs
processing anywhere (and the recent starts) after taking it, so those limits stay
exact; the global limit then bounds each replica on its own.

Every row a claim commits is started or handed back, whatever interrupts the loop. A
claim in flight is never cancelled: stepping down (deposition, SIGTERM, worker stop)
waits for its reply and starts its rows (a deposed replica runs what it holds). A
claim whose reply is lost (connection died, timeout) may have committed all the same,
so before the next claim the replica revokes its earlier claims and hands back, attempt
refunded, every row processing under its owner id that it does not hold
(:meth:`Dispatcher.hand_back_unheld`).
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

from dispatcher.core.app import App
from dispatcher.core.cancellation import cancel_and_wait
from dispatcher.core.database_errors import describe, is_transient
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.services.executor import Attempt, CancelReason, Outcome, run_attempt
from dispatcher.services.job import Job
from dispatcher.services.notifier import backoff_delay
from dispatcher.services.rate_limit import RateWindows
from dispatcher.services.slots import Slots
from dispatcher.services.wakeup import Wakeup

CLAIM_SLICES = 4
CLAIM_BATCH_MIN = 100
# A claim statement slower than this is abandoned (its outcome is then unknown, and
# the rows it may have taken are handed back before the next claim).
CLAIM_TIMEOUT = 10.0


class Dispatcher:
    """Claims jobs while leading (or always, in worker mode); starts them in ``slots``."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        app: App,
        schema: str,
        owner_id: str,
        slots: Slots,
        wakeup: Wakeup,
        deliver: Callable[[Outcome], None],
        threads: ThreadPoolExecutor,
        is_leader: Callable[[], bool],
        metrics: Metrics,
        can_claim: Callable[[], bool] | None = None,
        concurrency: int | None = None,
        poll_interval: float = 1.0,
        claim_batch: int | None = None,
        claim_timeout: float = CLAIM_TIMEOUT,
        mode: str = "leader",
        on_progress: Callable[[Job], None] | None = None,
        start_within: float = math.inf,
        log: Any = None,
    ) -> None:
        self.app = app
        self.owner_id = owner_id
        self.limit = concurrency or app.concurrency
        self.slots = slots
        self.wakeup = wakeup
        self._deliver = deliver
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
        self._claim_timeout = claim_timeout
        self._on_progress = on_progress
        # An attempt not started this long after its claim may have been rescued.
        self._start_within = start_within
        self._metrics = metrics
        self._log = log or get_logger("dispatch")
        self._foreign: Counter[str] = Counter()
        self._term: int | None = None
        self._loop_task: asyncio.Task[None] | None = None
        # Held by each claim until its rows are started, so that a step-down never
        # cancels a claim in flight; and by hand-backs, which must see every row our
        # claims committed and hand back none that a claim is about to start.
        self._claim_lock = asyncio.Lock()
        self._claims = 0  # claim numbers (see revoke_claims)
        # A claim's reply was lost: rows it may have committed are not held. Set until
        # hand_back_unheld has run since.
        self._unsure = False
        self._hand_back_task: asyncio.Task[None] | None = None
        # Why the claim loop could not prepare, while it cannot (readiness reports it).
        self.preparing_failed: str | None = None
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
        self._wait_histograms = {t: metrics.job_queue_wait.labels(t) for t in self._types}
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
        """Stop claiming at once. A claim in flight is not cancelled: its reply is
        awaited and its rows started (running jobs go on)."""
        self._term = None
        self.preparing_failed = None
        task, self._loop_task = self._loop_task, None
        if task is not None:
            # Cancelled only between claims: holding the claim lock, no claim is in
            # flight, and none can start (the loop waits behind us for the lock).
            async with self._claim_lock:
                await cancel_and_wait([task])
        if self._unsure and (self._hand_back_task is None or self._hand_back_task.done()):
            self._hand_back_task = asyncio.get_running_loop().create_task(
                self._hand_back_until_sure(), name="hand-back-unheld"
            )

    def wake(self, source: str) -> None:
        """Ask the claim loop to look for work now."""
        self.wakeup.wake(source)

    # --- the claim loop ----------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self._prepare()
                self.preparing_failed = None
                break
            except Exception as exc:
                failures += 1
                self.preparing_failed = f"the claim loop cannot start: {describe(exc)}"
                self._log.warning("claim_prepare_failed", error=describe(exc))
                await asyncio.sleep(min(self._poll_interval, 0.05 * 2**failures))
        failures = 0
        while True:
            source = await self.wakeup.wait(self._poll_interval)
            self._metrics.wakeups.labels(source).inc()
            try:
                if self._unsure:
                    await self.hand_back_unheld()
                if source in ("poll", "control", "reconnect"):
                    await self.refresh_paused()
                await self._claim_until_done()
                failures = 0
            except Exception as exc:
                if not is_transient(exc):
                    self._log.exception("claim_failed", error=describe(exc))
                else:
                    self._log.warning("claim_failed", error=describe(exc))
                self._metrics.database_errors.labels(Service.DISPATCH).inc()
                failures += 1
                await asyncio.sleep(min(self._poll_interval, 0.05 * 2**failures))
                if self._unsure:
                    self.wake("hand_back")  # rows a lost claim took wait for us

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
        if not self.wakeup.wanted_slots and self._claiming():
            await self._schedule_next_due()
        opening = min(
            (t for t in map(self.rates.next_opening, self.rates.limits) if t is not None),
            default=None,
        )
        if opening is not None:
            self.wakeup.due_at(opening)

    def _free_total(self) -> int:
        return self.limit - len(self.slots) - self._foreign.total()

    async def run_once(self) -> bool:
        """One claim, its rows started. Returns True if it may have left due jobs
        behind (it was cut short by the batch size or a limit). A claim that failed
        leaves us unsure of what it committed (see hand_back_unheld)."""
        async with self._claim_lock:
            try:
                return await self._claim_and_start()
            except BaseException:
                self._unsure = True
                raise

    async def _claim_and_start(self) -> bool:
        term = self._term
        if (self.mode == "leader" and term is None) or not self.app.executors:
            return False
        if self._foreign.total():
            await self._refresh_foreign()
        free_total = self._free_total()
        if free_total <= 0:
            self.wakeup.wanted_slots = True
            return False
        types: list[str] = []
        frees: list[int] = []
        indexes: list[int] = []
        limited = False
        worker = self.mode != "leader"
        for i, type_ in enumerate(self._types):
            if type_ in self.paused:
                continue
            free = self.type_limits[type_] - self.slots.running(type_) - self._foreign[type_]
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
            self.wakeup.wanted_slots = limited
            return False
        batch = min(free_total, self._claim_batch)
        max_attempts = [self._max_attempts[i] for i in indexes]
        timeouts = [self._timeouts[i] for i in indexes]
        self._claims += 1
        number = self._claims
        # The rows' heartbeat_at is the claim statement's now(): no earlier than this.
        # A reply read late (the process was paused, the network stalled) must not
        # start attempts the reaper may have rescued meanwhile.
        start_by = time.monotonic() + self._start_within
        # Bounded, release included: a step-down waits for this under the claim lock.
        async with self._pool.acquire(timeout=self._claim_timeout) as conn:
            if worker:
                rows = await self._claim_as_worker(conn, types, frees, indexes, batch, number)
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
                    number,
                    timeout=self._claim_timeout,
                )
        claimed: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        attempts = [self._attempt(row, start_by) for row in rows]
        self.slots.add(attempts)
        for attempt in attempts:
            attempt.task = loop.create_task(run_attempt(attempt, self._threads, self._deliver))
            claimed[attempt.job.type] += 1
        for type_, count in claimed.items():
            self.rates.record(type_, count)
        self._metrics.claim_batch_size.observe(len(rows))
        full = len(rows) >= batch or any(
            claimed[t] >= free for t, free in zip(types, frees, strict=True)
        )
        self.wakeup.wanted_slots = limited or full
        return full

    async def _claim_as_worker(
        self,
        conn: asyncpg.Connection,
        types: list[str],
        frees: list[int],
        indexes: list[int],
        batch: int,
        number: int,
    ) -> list[asyncpg.Record]:
        cluster_limits = [self._cluster_limits[i] for i in indexes]
        rates = [self.rates.limits.get(t) for t in types]
        locked = [
            t
            for t, limit, rate in zip(types, cluster_limits, rates, strict=True)
            if limit is not None or rate is not None
        ]
        args = (
            self.owner_id,
            types,
            frees,
            cluster_limits,
            batch,
            [self._max_attempts[i] for i in indexes],
            [self._timeouts[i] for i in indexes],
            [r.starts if r else None for r in rates],
            [r.per if r else None for r in rates],
            number,
        )
        claim = self._queries["claim_jobs_worker"]
        rows: list[asyncpg.Record]
        if not locked:  # no cluster-wide count to serialize: one statement, no transaction
            rows = await conn.fetch(claim, *args, timeout=self._claim_timeout)
            return rows
        async with conn.transaction():
            await conn.execute(
                self._queries["lock_types"], locked, self._schema, timeout=self._claim_timeout
            )
            rows = await conn.fetch(claim, *args, timeout=self._claim_timeout)
        return rows

    async def _schedule_next_due(self) -> None:
        async with self._pool.acquire() as conn:
            seconds = await conn.fetchval(self._queries["next_due_in"], self._types)
        self.wakeup.forget_due()
        if seconds is not None:
            self.wakeup.due_at(time.monotonic() + max(0.0, seconds))

    async def _refresh_foreign(self) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._queries["running_by_others"], self.owner_id)
        self._foreign = Counter({row["type"]: row["running"] for row in rows})

    # --- rows claimed but not held -------------------------------------------------------

    async def hand_back_unheld(self) -> list[int]:
        """Revoke our earlier claims, then hand back (pending again, attempt refunded)
        every row processing under our owner id that we do not hold: rows of a claim
        whose reply never came back. Returns their ids."""
        async with self._claim_lock:
            held = self.slots.attempts()
            pool = self._pool
            async with pool.acquire(timeout=self._claim_timeout) as conn, conn.transaction():
                await conn.execute(
                    self._queries["revoke_claims"],
                    self.owner_id,
                    self._claims + 1,
                    timeout=self._claim_timeout,
                )
                rows = await conn.fetch(
                    self._queries["hand_back_unheld"],
                    self.owner_id,
                    [a.job.id for a in held],
                    [a.job.attempt for a in held],
                    timeout=self._claim_timeout,
                )
            self._unsure = False
        if rows:
            self._log.warning(
                "claimed_rows_handed_back",
                job_ids=[row["id"] for row in rows],
                reason="a claim's reply was lost",
            )
            self.wake("handed_back")
        return [row["id"] for row in rows]

    async def _hand_back_until_sure(self) -> None:
        failures = 0
        while self._unsure:
            try:
                await self.hand_back_unheld()
            except Exception as exc:
                failures += 1
                self._log.warning("hand_back_failed", error=describe(exc))
                await asyncio.sleep(backoff_delay(failures, 0.05, self._poll_interval))

    # --- attempts ---------------------------------------------------------------------

    def _attempt(self, row: asyncpg.Record, start_by: float) -> Attempt:
        """The attempt a claimed row starts (held, then started, by the caller)."""
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
        if row["cancel_requested"]:
            attempt.cancel(CancelReason.REQUESTED)  # it ends at its start, unrun
        earlier = self.slots.of_job(job.id)
        if earlier:
            # The job was rescued from under an attempt of ours that is still running
            # (we were cut off, or paused, past stale_after). That attempt is no longer
            # the owning one: stop it, and start this one only once it has ended.
            self._log.warning(
                "job_claimed_while_still_running",
                job_id=job.id,
                attempt=job.attempt,
                running_attempts=[a.job.attempt for a in earlier],
            )
            for old in earlier:
                old.cancel(CancelReason.TAKEN_OVER)
            attempt.after = [old.task for old in earlier if old.task is not None]
        self._wait_histograms[type_].observe(row["waited"])
        return attempt

    def running_by_type(self) -> dict[str, int]:
        return self.slots.running_by_type()
