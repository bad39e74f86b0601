"""One attempt of one job: run the executor, enforce its timeout, name its outcome.

Everything an executor can do (return, raise, hang, return garbage) becomes an
:class:`Outcome` for the completer; nothing it does reaches past its own job.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dispatcher.app import ExecutorSpec
from dispatcher.errors import InvalidJob, PermanentError, RetryAfter, Snooze
from dispatcher.job import Job
from dispatcher.jobs import encode_json
from dispatcher.log import get_logger

MAX_ERROR_LENGTH = 2000
MAX_TRACEBACK_LENGTH = 4000

_log = get_logger("executor")


class OutcomeKind(enum.StrEnum):
    """How an attempt ended; all but DROPPED are written by complete_jobs."""

    COMPLETED = "completed"
    FAILED = "failed"  # for good
    RETRY = "retry"  # failed attempt, runs again after a delay
    SNOOZE = "snooze"  # runs again after a delay, attempt not spent
    REQUEUE = "requeue"  # shutdown, or started too late: pending again now, attempt not spent
    CANCELLED = "cancelled"
    DROPPED = "dropped"  # no longer ours (taken over): nothing to write


class CancelReason(enum.StrEnum):
    REQUESTED = "cancel requested"
    SHUTDOWN = "shutdown"
    TAKEN_OVER = "taken over by another replica"
    DATABASE_LOST = "lost contact with the database"


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


class Attempt:
    """A running attempt: its job, executor, task, and why it was cancelled (if it was).

    ``start_by`` (monotonic): an attempt whose executor could not start by then is
    handed back unrun (see :func:`run_attempt`).
    """

    __slots__ = ("cancel_reason", "finished", "job", "spec", "start_by", "task")

    def __init__(self, job: Job, spec: ExecutorSpec, start_by: float = math.inf) -> None:
        self.job = job
        self.spec = spec
        self.start_by = start_by
        self.task: asyncio.Future[Any] | None = None
        self.cancel_reason: CancelReason | None = None
        self.finished = False

    def cancel(self, reason: CancelReason) -> bool:
        """Stop the attempt for ``reason``; False if it already ended or was stopped."""
        if self.finished or self.cancel_reason is not None:
            return False
        self.cancel_reason = reason
        self.job.mark_cancelled()
        if self.task is not None:
            self.task.cancel()
        return True


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_LENGTH]


def _traceback_tail(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_LENGTH:]


def _failure(attempt: Attempt, error: str, tb: str | None, delay: float | None = None) -> Outcome:
    job = attempt.job
    if job.attempt >= job.max_attempts:
        kind, delay = OutcomeKind.FAILED, 0.0
    else:
        kind = OutcomeKind.RETRY
        if delay is None:
            delay = attempt.spec.retry.delay(job.attempt)
    return Outcome(job.id, job.attempt, job.type, kind, error=error, traceback=tb, delay=delay)


def _cancelled(attempt: Attempt) -> Outcome:
    job = attempt.job
    reason = attempt.cancel_reason
    if reason is CancelReason.REQUESTED:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.CANCELLED, error="cancelled")
    if reason is CancelReason.SHUTDOWN:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE)
    if reason is CancelReason.TAKEN_OVER:
        return Outcome(job.id, job.attempt, job.type, OutcomeKind.DROPPED)
    return _failure(attempt, f"abandoned: {reason}", None)


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
    started = time.monotonic()
    if started > attempt.start_by:
        return _started_too_late(attempt, started, deliver)
    timer: asyncio.Timeout | None = None
    try:
        if spec.is_async:
            if timeout is None:  # most jobs: no timer to arm
                result = await spec.function(job)
            else:
                async with asyncio.timeout(timeout) as timer:
                    result = await spec.function(job)
        else:
            future = asyncio.get_running_loop().run_in_executor(threads, spec.function, job)
            async with asyncio.timeout(timeout) as timer:
                # A thread cannot be killed: on timeout or cancel we stop waiting for
                # it, flag the job cancelled, and let the thread run out on its own.
                result = await future
    except asyncio.CancelledError:
        if attempt.cancel_reason is None:
            raise
        outcome = _cancelled(attempt)
    except TimeoutError as exc:
        if timer is not None and timer.expired():
            job.mark_cancelled()
            outcome = _failure(attempt, f"timed out after {timeout:g}s", None)
        else:
            outcome = _failure(attempt, _describe(exc), _traceback_tail(exc))
    except PermanentError as exc:
        outcome = Outcome(
            job.id, job.attempt, job.type, OutcomeKind.FAILED,
            error=_describe(exc), traceback=_traceback_tail(exc),
        )  # fmt: skip
    except Snooze as exc:
        outcome = Outcome(job.id, job.attempt, job.type, OutcomeKind.SNOOZE, delay=exc.seconds)
    except RetryAfter as exc:
        outcome = _failure(attempt, _describe(exc), None, delay=exc.seconds)
    except Exception as exc:
        outcome = _failure(attempt, _describe(exc), _traceback_tail(exc))
    else:
        # Even if a cancel raced the return, the work was done: record it as done.
        try:
            result_json = None if result is None else encode_json(result, what="result")
        except InvalidJob as exc:
            outcome = _failure(attempt, f"the return value cannot be stored: {exc}", None)
        else:
            outcome = Outcome(
                job.id, job.attempt, job.type, OutcomeKind.COMPLETED, result_json=result_json
            )
    finally:
        attempt.finished = True
    outcome.duration = time.monotonic() - started
    if deliver is not None:
        deliver(outcome)
    return outcome


def _started_too_late(
    attempt: Attempt, now: float, deliver: Callable[[Outcome], None] | None
) -> Outcome:
    # Claimed, then held up (a process paused between the claim and the start, a
    # stalled loop) until the reaper may have rescued the job: running it now could
    # run beside its retry. Hand it back unspent; if it was rescued, the completer's
    # fencing drops this.
    job = attempt.job
    attempt.finished = True
    outcome = Outcome(job.id, job.attempt, job.type, OutcomeKind.REQUEUE)
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
