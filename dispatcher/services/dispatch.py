"""The claim loop: when to claim, how much, and the start of what a claim took.

Wake-ups: a NOTIFY of new jobs, a poll tick (notifications can be missed across a
reconnect), the earliest future run_at, a freed slot, a new term. Each wake-up claims
with one statement for every type that has an executor and free capacity (claim_jobs:
``FOR UPDATE SKIP LOCKED``), and keeps claiming while the last claim came back full.
Who claims, and how the limits are counted, is the claim mode's
(:mod:`dispatcher.services.claiming`: the leader alone, or every replica).

Limits are global truths, not per-process counts. A slot is taken at claim and given
back only when the outcome is committed, so the table never shows more jobs of a type
processing than its limit. While the last claim was cut short (jobs wait for slots),
the completer's next batch of outcomes carries the claim of the slots it frees, in one
statement (:meth:`Dispatcher.write_with_claim`): outcome written, next job started,
one round trip and one commit. In-flight attempts live in
:class:`~dispatcher.services.slots.Slots` whatever the role: a replica deposed while
running jobs keeps them (the heartbeat keeps them alive) and completes them, fenced.
Paused types (job_types.paused) are left alone; the set is re-read on a control NOTIFY
and every poll tick.

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
from typing import Protocol

import asyncpg

from dispatcher.core.app import App
from dispatcher.core.cancellation import cancel_and_wait, raise_if_cancel_requested
from dispatcher.core.database_errors import describe, is_transient
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.core.retry import backoff_delay
from dispatcher.core.tracing import AttemptTracer, attempt_tracer
from dispatcher.services.claim_cursors import ClaimCursors
from dispatcher.services.claiming import ClaimMode, ClaimRequest
from dispatcher.services.completer import Written, outcome_arguments
from dispatcher.services.executor import (
    Attempt,
    CancelReason,
    Outcome,
    run_attempt,
    run_traced_attempt,
)
from dispatcher.services.job import DependencyReader, Job
from dispatcher.services.slots import Slots
from dispatcher.services.wakeup import Wakeup


class SessionState(Protocol):
    """The replica's session (:class:`~dispatcher.services.replica_session.ReplicaSession`)
    as the claim loop sees it."""

    claims_allowed: bool
    generation: int


CLAIM_SLICES = 4
CLAIM_BATCH_MIN = 100
# A claim statement slower than this is abandoned (its outcome is then unknown, and
# the rows it may have taken are handed back before the next claim).
CLAIM_TIMEOUT = 10.0
# Wake-ups after which the paused types are read again: the poll tick, a control
# NOTIFY (pause, resume), a reconnect (which may have lost one).
REREAD_PAUSED_ON = frozenset({"poll", "control", "reconnect"})


class Dispatcher:
    """Claims jobs when its claim mode says so; starts them in ``slots``."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        cycle_pool: asyncpg.Pool | None = None,
        app: App,
        schema: str,
        owner_id: str,
        mode: ClaimMode,
        slots: Slots,
        wakeup: Wakeup,
        deliver: Callable[[Outcome], None],
        threads: ThreadPoolExecutor,
        metrics: Metrics,
        concurrency: int | None = None,
        poll_interval: float = 1.0,
        claim_batch: int | None = None,
        claim_timeout: float = CLAIM_TIMEOUT,
        on_progress: Callable[[Job], None] | None = None,
        start_within: float = math.inf,
        session: SessionState | None = None,
        dependencies: DependencyReader | None = None,
        otel: str = "false",
    ) -> None:
        """``cycle_pool``: where the claims the mode plans once run (None: ``pool``;
        see :func:`dispatcher.database.pool.cycle_pool`). ``otel``: the setting that
        decides, each time claiming starts, whether each attempt runs in a span
        (:func:`dispatcher.core.tracing.attempt_tracer`)."""
        self.app = app
        self.owner_id = owner_id
        self.mode = mode
        self.limits = app.limits(concurrency)
        self.slots = slots
        self.wakeup = wakeup
        self._deliver = deliver
        self._pool = pool
        self._cycle_pool = cycle_pool or pool
        self._queries = queries_for(schema)
        self._threads = threads
        self._poll_interval = poll_interval
        # Claiming in slices of the capacity lets the next claim overlap with the
        # completion of the previous slice: Python and Postgres work side by side.
        self._claim_batch = claim_batch or max(
            CLAIM_BATCH_MIN, self.limits.global_limit // CLAIM_SLICES
        )
        self._claim_timeout = claim_timeout
        self._on_progress = on_progress
        self._dependencies = dependencies  # what each Job reads its dependencies' results with
        # An attempt not started this long after its claim may have been rescued.
        self._start_within = start_within
        self._session = session
        self._otel = otel
        self._tracer: AttemptTracer | None = None
        self._metrics = metrics
        self._log = get_logger("dispatch")
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
        # Where each type's next claim starts its scan of the claim index.
        self.cursors = ClaimCursors()
        self._max_attempts = [app.executors[t].max_attempts for t in self._types]
        self._key_limits = [app.executors[t].key_concurrency for t in self._types]
        self._timeouts = [app.executors[t].timeout for t in self._types]
        self._wait_histograms = {t: metrics.job_queue_wait.labels(t) for t in self._types}
        metrics.concurrency_limit.labels("*").set(self.limits.global_limit)
        for type_, limit in self.limits.per_type.items():
            metrics.concurrency_limit.labels(type_).set(limit)

    # --- starting and stopping ---------------------------------------------------------

    def start(self) -> None:
        """The replica started (worker mode claims from now on)."""
        if self.mode.started():
            self._start_loop("start")

    def elected(self, term: int) -> None:
        """This replica leads under ``term`` (leader mode claims from now on)."""
        if self.mode.elected(term):
            self._start_loop("election")

    async def deposed(self) -> None:
        """This replica no longer leads (leader mode stops claiming)."""
        if self.mode.deposed():
            await self.stop()

    def _start_loop(self, source: str) -> None:
        self.wake(source)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(
                self._claim_loop(), name="claim-loop"
            )

    async def stop(self) -> None:
        """Stop claiming at once. A claim in flight is not cancelled: its reply is
        awaited and its rows started (running jobs go on)."""
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
                raise_if_cancel_requested()
                failures += 1
                self.preparing_failed = f"the claim loop cannot start: {describe(exc)}"
                self._log.warning("claim_prepare_failed", error=describe(exc))
                await asyncio.sleep(backoff_delay(failures, 0.05, self._poll_interval))
        failures = 0
        while True:
            woken = await self.wakeup.wait(self._poll_interval)
            self._metrics.wakeups.labels(woken.source).inc()
            self.cursors.woken(woken.sources)
            try:
                if self._unsure:
                    await self.hand_back_unheld()
                if not woken.sources.isdisjoint(REREAD_PAUSED_ON):
                    await self.refresh_paused()
                await self._claim_until_done()
                failures = 0
            except Exception as exc:
                raise_if_cancel_requested()
                if not is_transient(exc):
                    self._log.exception("claim_failed", error=describe(exc))
                else:
                    self._log.warning("claim_failed", error=describe(exc))
                self._metrics.database_errors.labels(Service.DISPATCH).inc()
                failures += 1
                await asyncio.sleep(backoff_delay(failures, 0.05, self._poll_interval))
                if self._unsure:
                    self.wake("hand_back")  # rows a lost claim took wait for us

    async def _prepare(self) -> None:
        """What a claim loop needs before its first claim."""
        # Decided here, after the app's startup hooks (where a tracer provider may be set).
        tracer = attempt_tracer(self._otel)
        if (tracer is None) != (self._tracer is None):
            self._log.info("attempt_tracing", enabled=tracer is not None, setting=self._otel)
        self._tracer = tracer
        await self.refresh_paused()
        await self.mode.prepare(self._pool)

    async def refresh_paused(self) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._queries["paused_types"])
        paused = {row["type"] for row in rows}
        if paused != self.paused:
            self._log.info("paused_types", types=sorted(paused))
        self.paused = paused

    async def _claim_until_done(self) -> None:
        while self.mode.claiming():
            full = await self.run_once()
            if not full:
                break
            if self._free_total() <= 0:
                break  # a freed slot wakes us
        if not self.wakeup.wanted_slots and self.mode.claiming():
            await self._schedule_next_due()
        opening = self.mode.next_opening()
        if opening is not None:
            self.wakeup.due_at(opening)

    def _free_total(self) -> int:
        elsewhere = self.mode.running_elsewhere().total()
        return self.limits.global_limit - len(self.slots) - elsewhere

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

    def _claim_generation(self) -> int | None:
        """The session generation a claim starts under, or None: no claim may start
        now (not claiming, nothing to run, or the session forbids it: we are woken
        when it allows them again)."""
        if not self.mode.claiming() or not self.app.executors:
            return None
        session = self._session
        if session is None:
            return 0
        return session.generation if session.claims_allowed else None

    async def _claim_and_start(self) -> bool:
        generation = self._claim_generation()
        if generation is None:
            return False
        await self.mode.refresh(self._pool)
        request, limited = self._request()
        if request is None:
            self.wakeup.wanted_slots = limited
            return False
        # The rows' heartbeat_at is the claim statement's now(): no earlier than this.
        # A reply read late (the process was paused, the network stalled) must not
        # start attempts the reaper may have rescued meanwhile.
        start_by = time.monotonic() + self._start_within
        # Bounded, release included: a step-down waits for this under the claim lock.
        pool = self._pool if request.keyed else self._claims_pool
        async with pool.acquire(timeout=self._claim_timeout) as conn:
            rows = await self.mode.claim(conn, request)
        return self._start_claimed(rows, request, generation, start_by, limited)

    def _start_claimed(
        self,
        rows: list[asyncpg.Record],
        request: ClaimRequest,
        generation: int,
        start_by: float,
        limited: bool,
    ) -> bool:
        """Hold and start a claim's rows; whether it may have left due jobs behind."""
        session = self._session
        claimed: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        attempts = [self._attempt(row, start_by) for row in rows]
        if session is not None and session.generation != generation:
            # The session was lost while the claim was in flight: the leader may rescue
            # these rows within orphan_grace, so they end at their start, unrun.
            for attempt in attempts:
                attempt.cancel(CancelReason.SESSION_LOST)
        self.slots.add(attempts)
        tracer = self._tracer
        for attempt, row in zip(attempts, rows, strict=True):
            if tracer is None:
                run = run_attempt(attempt, self._threads, self._deliver)
            else:
                carrier = row["trace_context"]
                run = run_traced_attempt(attempt, tracer, carrier, self._threads, self._deliver)
            attempt.task = loop.create_task(run)
            claimed[attempt.job.type] += 1
        self.mode.recorded(claimed)
        self.cursors.claimed(rows, request.cursors_generation)
        self._metrics.claim_batch_size.observe(len(rows))
        full = len(rows) >= request.batch or any(
            claimed[t] >= free for t, free in zip(request.types, request.frees, strict=True)
        )
        self.wakeup.wanted_slots = limited or full
        return full

    # --- a slot's cycle in one statement --------------------------------------------------

    async def write_with_claim(self, batch: list[Outcome]) -> Written | None:
        """The completer's batch written together with the claim of the slots it frees
        (complete_and_claim_jobs), when a claim for them is wanted now: the last claim
        was cut short, so due jobs are likely waiting. What was written; None when the
        batch is to be written alone: no claim wanted, allowed or possible now, or the
        statement failed (then the rows it may have claimed are handed back first)."""
        if (
            self._loop_task is None  # claiming stopped (step-down, shutdown)
            or not self.wakeup.wanted_slots
            # An outcome whose row was found locked is tried alone (completer.py).
            or any(outcome.locked_out for outcome in batch)
            or self._unsure
            or self._claim_lock.locked()
            or not self.mode.completes_in_claims
        ):
            return None
        generation = self._claim_generation()
        if generation is None:
            return None
        request, limited = self._request(freeing=self.slots.held_types(batch))
        if request is None:
            return None
        start_by = time.monotonic() + self._start_within
        async with self._claim_lock:
            try:
                async with self._claims_pool.acquire(timeout=self._claim_timeout) as conn:
                    rows = await self.mode.claim_completing(
                        conn, request, outcome_arguments(self.owner_id, batch)
                    )
            except Exception as exc:
                self._unsure = True
                self._metrics.database_errors.labels(Service.DISPATCH).inc()
                self._log.warning("complete_and_claim_failed", error=describe(exc))
                self.wake("hand_back")  # before the next claim; the completer goes on
                return None
            except BaseException:
                self._unsure = True
                raise
            written: Written = {}
            started: list[asyncpg.Record] = []
            for row in rows:
                if row["claimed"]:
                    started.append(row)
                else:
                    written[(row["id"], row["attempts"])] = row["status"]
            try:
                self._start_claimed(started, request, generation, start_by, limited)
            except Exception as exc:
                # The outcomes are written all the same; rows not started go back.
                self._unsure = True
                self._log.exception("claim_start_failed", error=describe(exc))
                self.wake("hand_back")
        return written

    @property
    def _claims_pool(self) -> asyncpg.Pool:
        """Where claims of unkeyed types run: the cycle pool if the mode plans them once."""
        return self._cycle_pool if self.mode.claims_planned_once else self._pool

    def _request(self, freeing: Counter[str] | None = None) -> tuple[ClaimRequest | None, bool]:
        """The next claim (None: nothing may be claimed now), and whether a limit held
        some type back; ``freeing``: slots per type that the claim's own statement
        gives back (complete_and_claim_jobs)."""
        freeing = freeing or Counter()
        free_total = self._free_total() + freeing.total()
        if free_total <= 0:
            return None, True
        types: list[str] = []
        frees: list[int] = []
        indexes: list[int] = []
        limited = False
        for i, type_ in enumerate(self._types):
            if type_ in self.paused:
                continue
            free = self.limits.per_type[type_] - self.slots.running(type_) + freeing[type_]
            free = min(self.mode.allowance(type_, free), free_total)
            if free <= 0:
                limited = True
                continue
            if self._key_limits[i] is not None:
                # Jobs held back by their key's limit do not show in the claim's size:
                # every freed slot is worth a claim (a job of its key may be next).
                limited = True
            types.append(type_)
            frees.append(free)
            indexes.append(i)
        if not types:
            return None, limited
        self._claims += 1
        return ClaimRequest(
            owner=self.owner_id,
            number=self._claims,
            types=types,
            frees=frees,
            batch=min(free_total, self._claim_batch),
            max_attempts=[self._max_attempts[i] for i in indexes],
            timeouts=[self._timeouts[i] for i in indexes],
            hints=[self.cursors.hint(t) for t in types],
            since=[self.cursors.since(t) for t in types],
            cursors_generation=self.cursors.generation,
            timeout=self._claim_timeout,
            key_limits=[self._key_limits[i] for i in indexes],
        ), limited

    async def _schedule_next_due(self) -> None:
        async with self._pool.acquire() as conn:
            seconds = await conn.fetchval(
                self._queries["next_due_in"],
                self._types,
                [self.cursors.hint(t) for t in self._types],
            )
        self.wakeup.forget_due()
        if seconds is not None:
            self.wakeup.due_at(time.monotonic() + max(0.0, seconds))

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
            dependencies=self._dependencies,
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
