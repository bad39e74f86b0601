"""One attempt of one job: run the executor, enforce its timeout, name its outcome.

Everything an executor can do (return, raise, hang, return garbage) becomes an
:class:`Outcome` for the completer; nothing it does reaches past its own job.

An attempt is live until its code has stopped running. An ``async def`` executor is
stopped by cancelling its task. A plain ``def`` runs in a thread, which nothing can
stop from outside: a timeout or a cancel only flags the job (``job.cancelled``,
``job.cancel_event``), and the attempt stays live (heartbeated, its slot held, no
outcome written, so no retry can start) until the thread has returned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import math
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dispatcher.core.app import ExecutorFunction, ExecutorSpec
from dispatcher.core.errors import InvalidJob, PermanentError, RetryAfter, Snooze
from dispatcher.core.log import get_logger
from dispatcher.core.records import encode_json
from dispatcher.core.tracing import AttemptTracer
from dispatcher.services.job import Job

MAX_ERROR_LENGTH = 2000
MAX_TRACEBACK_LENGTH = 4000

_log = get_logger("executor")


class OutcomeKind(enum.StrEnum):
    """How an attempt ended; all but DROPPED are written by complete_jobs."""

    COMPLETED = "completed"
    FAILED = "failed"  # for good
    RETRY = "retry"  # failed attempt, runs again after a delay
    SNOOZE = "snooze"  # runs again after a delay, attempt not spent
    REQUEUE = "requeue"  # shutdown, or started too late: pending again, attempt not spent
    CANCELLED = "cancelled"
    DROPPED = "dropped"  # no longer ours (taken over): nothing to write


class CancelReason(enum.StrEnum):
    REQUESTED = "cancel requested"
    SHUTDOWN = "shutdown"
    TAKEN_OVER = "taken over by another replica"
    DATABASE_LOST = "lost contact with the database"
    SESSION_LOST = "lost its database session"  # see replica_session.py
    TIMED_OUT = "timed out"  # a thread's timeout: the thread is asked to stop


@dataclass(slots=True)
class Outcome:
    """The end of one attempt, as the completer writes it."""

    job_id: int
    attempt: int
    type: str
    kind: OutcomeKind
    result_json: str | None = None
    error: str | None = None
    traceback: str | None = None
    delay: float = 0.0
    duration: float = 0.0
    # The attempt this outcome ends: its slot is freed by identity, so a late outcome
    # of an older attempt can never free a newer attempt of the same job.
    source: Attempt | None = None
    # Times the completer found the row locked by another session (and waited).
    locked_out: int = 0


class Attempt:
    """A running attempt: its job, executor, task, and why it was cancelled (if it was).

    Identified by (job id, attempt number) towards the database; in this process by
    the object itself. ``start_by`` (monotonic): an attempt whose executor could not
    start by then is handed back unrun (see :func:`run_attempt`).
    """

    __slots__ = (
        "after", "cancel_reason", "finished", "function", "job", "spec", "start_by", "started",
        "task", "thread",
    )  # fmt: skip

    def __init__(self, job: Job, spec: ExecutorSpec, start_by: float = math.inf) -> None:
        self.job = job
        self.spec = spec
        # What runs: the executor, or the executor wrapped by its span (tracing on).
        self.function: ExecutorFunction = spec.function
        self.start_by = start_by
        self.task: asyncio.Future[Any] | None = None
        # A plain def executor's call in the thread pool.
        self.thread: concurrent.futures.Future[Any] | None = None
        self.cancel_reason: CancelReason | None = None
        # Tasks of older attempts of the same job still running here: this one starts
        # only once they have ended (never two live copies in one process).
        self.after: list[asyncio.Future[Any]] = []
        self.started = False  # run_attempt has begun (its task can take a cancel)
        self.finished = False

    def cancel(self, reason: CancelReason) -> bool:
        """Stop the attempt for ``reason``; False if it already ended or was stopped.

        An async attempt's task is cancelled. A thread cannot be: it is flagged, and
        the attempt ends when the thread returns (or at once if it never started). An
        attempt not started yet ends at its start, unrun."""
        if self.finished or self.cancel_reason is not None:
            return False
        self.cancel_reason = reason
        self.job.mark_cancelled()
        if not self.started:
            # A task cancelled before its first step never runs its coroutine, so no
            # outcome would ever free the slot: run_attempt reads the reason instead.
            return True
        if self.spec.is_async:
            if self.task is not None:
                self.task.cancel()
        elif self.thread is not None:
            self.thread.cancel()  # succeeds only if the thread has not started
        return True

    @property
    def told_to_stop(self) -> bool:
        """Cancelled, for any reason (a timed-out thread included)."""
        return self.cancel_reason is not None

    @property
    def thread_running(self) -> bool:
        """True while a plain def executor's thread is still running this attempt."""
        return self.thread is not None and not self.thread.done()


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_LENGTH]


def _traceback_tail(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_LENGTH:]


def _failure(attempt: Attempt, error: str, tb: str | None, delay: float | None = None) -> Outcome:
    """A failed attempt: retried after the policy's delay (or ``delay``, RetryAfter's),
    or failed for good after the last attempt."""
    job = attempt.job
    after = attempt.spec.retry.after_failure(job.attempt, job.max_attempts)
    if after is None:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.FAILED, error=error,
                       traceback=tb)  # fmt: skip
    return Outcome(job.id, job.attempt, job.type, OutcomeKind.RETRY, error=error,
                   traceback=tb, delay=after if delay is None else delay)  # fmt: skip


def _cancelled(attempt: Attempt) -> Outcome:
    job = attempt.job
    reason = attempt.cancel_reason
    if reason is CancelReason.REQUESTED:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.CANCELLED, error="cancelled")
    if reason is CancelReason.SHUTDOWN:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE)
    if reason is CancelReason.TAKEN_OVER:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.DROPPED)
    if reason is CancelReason.TIMED_OUT:
        return _failure(attempt, f"timed out after {job.timeout:g}s", None)
    return _failure(attempt, f"abandoned: {reason}", None)


def _cancelled_unstarted(attempt: Attempt) -> Outcome:
    """Cancelled between its claim and its start. A job whose replica lost its session
    meanwhile goes back unrun and unspent (if the leader rescued it first, the
    completer's fencing drops this)."""
    if attempt.cancel_reason is CancelReason.SESSION_LOST:
        job = attempt.job
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE)
    return _cancelled(attempt)


async def run_attempt(
    attempt: Attempt,
    threads: ThreadPoolExecutor,
    deliver: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Run one attempt to its outcome, hand it to ``deliver`` (the completer) and
    return it. Never raises (but propagates a cancellation that did not come through
    :meth:`Attempt.cancel`)."""
    job, spec = attempt.job, attempt.spec
    timeout = job.timeout
    if attempt.after:
        await asyncio.wait(attempt.after)
    started = time.monotonic()
    attempt.started = True
    if started > attempt.start_by:
        return _started_too_late(attempt, started, deliver)
    timer: asyncio.Timeout | None = None
    outcome: Outcome | None = None
    try:
        if attempt.cancel_reason is not None:
            outcome = _cancelled_unstarted(attempt)
        elif spec.is_async:
            if timeout is None:  # most jobs: no timer to arm
                result = await attempt.function(job)
            else:
                async with asyncio.timeout(timeout) as timer:
                    result = await attempt.function(job)
        else:
            result = await _run_in_thread(attempt, threads)
            if attempt.told_to_stop:
                # Told to stop (timeout, cancel, shutdown) before it returned: whatever
                # it returned is not the job done; the reason decides.
                outcome = _cancelled(attempt)
    except asyncio.CancelledError:
        if attempt.cancel_reason is None or attempt.thread_running:
            raise  # not ours to turn into an outcome (the loop is going away)
        outcome = _cancelled(attempt)
    except TimeoutError as exc:
        if timer is not None and timer.expired():
            job.mark_cancelled()
            outcome = _failure(attempt, f"timed out after {timeout:g}s", None)
        else:
            outcome = _raised(attempt, exc)
    except Exception as exc:
        outcome = _raised(attempt, exc)
    else:
        if outcome is None:
            # Even if a cancel raced the return, the work was done: record it as done.
            outcome = _completed(attempt, result)
    finally:
        attempt.finished = True
    outcome.duration = time.monotonic() - started
    outcome.source = attempt
    if deliver is not None:
        deliver(outcome)
    return outcome


async def run_traced_attempt(
    attempt: Attempt,
    tracer: AttemptTracer,
    trace_context: str | None,
    threads: ThreadPoolExecutor,
    deliver: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """:func:`run_attempt` inside the attempt's span (tracing on), a child of the
    context its row stores (``trace_context``), which records what the executor raised
    and how the attempt ended."""
    job = attempt.job
    span = tracer.start(job.id, job.type, job.attempt, trace_context)
    attempt.function = span.wrap(attempt.function, is_async=attempt.spec.is_async)
    with span:
        outcome = await run_attempt(attempt, threads, deliver)
    span.end(outcome.kind, outcome.error, outcome.delay)
    return outcome


def _raised(attempt: Attempt, exc: Exception) -> Outcome:
    """The outcome of an executor that raised ``exc``."""
    job = attempt.job
    if not attempt.spec.is_async and attempt.cancel_reason is not None:
        return _cancelled(attempt)  # a thread told to stop, stopping by raising
    if isinstance(exc, PermanentError):
        return Outcome(
            job.id, job.attempt, job.type, OutcomeKind.FAILED,
            error=_describe(exc), traceback=_traceback_tail(exc),
        )  # fmt: skip
    if isinstance(exc, Snooze):
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.SNOOZE, delay=exc.seconds)
    if isinstance(exc, RetryAfter):
        return _failure(attempt, _describe(exc), None, delay=exc.seconds)
    return _failure(attempt, _describe(exc), _traceback_tail(exc))


def _completed(attempt: Attempt, result: Any) -> Outcome:
    job = attempt.job
    try:
        result_json = None if result is None else encode_json(result, what="result")
    except InvalidJob as exc:
        return _failure(attempt, f"the return value cannot be stored: {exc}", None)
    return Outcome(job.id, job.attempt, job.type, OutcomeKind.COMPLETED, result_json=result_json)


async def _run_in_thread(attempt: Attempt, threads: ThreadPoolExecutor) -> Any:
    """Run a plain def executor in the pool and wait until its thread has returned,
    whatever happens meanwhile: a thread cannot be killed, so the attempt is live until
    then. Its timeout and cancels only flag the job (and stop a thread not started)."""
    job = attempt.job
    thread = threads.submit(attempt.function, job)
    attempt.thread = thread
    returned = asyncio.wrap_future(thread)
    if job.timeout is not None:
        done, _ = await asyncio.wait([returned], timeout=job.timeout)
        if not done:
            attempt.cancel(CancelReason.TIMED_OUT)
    return await returned


def _started_too_late(
    attempt: Attempt, now: float, deliver: Callable[[Outcome], None] | None
) -> Outcome:
    # Claimed, then held up (a process paused between the claim and the start, a
    # stalled loop) until the reaper may have rescued the job: running it now could
    # run beside its retry. Hand it back unspent; if it was rescued, the completer's
    # fencing drops this.
    job = attempt.job
    attempt.finished = True
    outcome = Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE, source=attempt)
    _log.warning(
        "job_start_too_late",
        job_id=job.id,
        attempt=job.attempt,
        late_by=round(now - attempt.start_by, 3),
    )
    if deliver is not None:
        deliver(outcome)
    return outcome


def thread_pool(size: int) -> ThreadPoolExecutor:
    """The pool sync executors run in."""
    return ThreadPoolExecutor(max_workers=max(1, size), thread_name_prefix="dispatcher-job")
