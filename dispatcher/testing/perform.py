"""Run one executor in the test's own process, without a database.

``perform(app, "email.send", {"to": "a@b.c"})`` builds the job an executor would
receive from a claim (payload checked and encoded as enqueue does, then decoded),
runs the executor through the same code a replica runs it with (its timeout, its
thread pool for a plain ``def``, the same rules for what its return value or
exception means), and returns what the replica would have written, as a value.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from dispatcher.core.app import App, ExecutorSpec
from dispatcher.core.errors import DispatcherError
from dispatcher.core.records import encode_json
from dispatcher.services.executor import (
    Attempt,
    CancelReason,
    Outcome,
    OutcomeKind,
    run_attempt,
    thread_pool,
)
from dispatcher.services.job import Job

# How an attempt ended, as tests name it (OutcomeKind.SNOOZE is "snoozed").
_OUTCOMES = {
    OutcomeKind.COMPLETED: "completed",
    OutcomeKind.RETRY: "retry",
    OutcomeKind.SNOOZE: "snoozed",
    OutcomeKind.FAILED: "failed",
    OutcomeKind.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class Performed:
    """What one attempt ended with, as a replica would have written it.

    ``outcome``: ``"completed"`` (``result`` holds the return value after its JSON
    round trip, as readers of the row get it), ``"retry"`` (a failed attempt with
    attempts left: runs again after ``delay`` seconds), ``"snoozed"`` (runs again after
    ``delay``, attempt not spent), ``"failed"`` (for good: a PermanentError, or the last
    attempt failed) or ``"cancelled"``. ``error`` and ``traceback`` are what the row's
    errors entry would hold; ``timed_out`` says the attempt failed by its timeout.
    ``progress``: every ``job.progress(...)`` call, in order.
    """

    outcome: str
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    delay: float | None = None
    timed_out: bool = False
    progress: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.outcome == "completed"

    @property
    def failed(self) -> bool:
        """The attempt failed (``"retry"`` or ``"failed"``)."""
        return self.outcome in ("retry", "failed")


class JobFields(TypedDict, total=False):
    """The job a claim would hand over (see :func:`perform`)."""

    id: int
    attempt: int
    max_attempts: int
    timeout: float
    dependency_results: dict[int, Any]
    cancel_after: float


class _GivenDependencies:
    """``job.dependency_results()`` answered from the test's mapping."""

    def __init__(self, results: dict[int, Any]) -> None:
        self._results = results

    async def read(self, job_id: int) -> dict[int, Any]:
        return dict(self._results)

    def read_blocking(self, job_id: int) -> dict[int, Any]:
        return dict(self._results)


def _spec(app: App, type_: str) -> ExecutorSpec:
    spec = app.executors.get(type_)
    if spec is None:
        registered = ", ".join(sorted(app.executors)) or "none"
        raise DispatcherError(
            f"no executor registered for type {type_!r}; registered: {registered}"
        )
    return spec


async def perform_async(
    app: App, type: str, payload: Any = None, **job_fields: Unpack[JobFields]
) -> Performed:
    """Run ``type``'s executor of ``app`` once on ``payload``; see :func:`perform`."""
    spec = _spec(app, type)
    payload_text = encode_json({} if payload is None else payload, what="payload")
    progress: list[dict[str, Any]] = []

    def record_progress(job: Job) -> None:
        if job.progress_value is not None:
            progress.append(dict(job.progress_value))

    job = Job(
        job_fields.get("id", 1),
        type,
        payload_text,
        job_fields.get("attempt", 1),
        job_fields.get("max_attempts", spec.max_attempts),
        job_fields.get("timeout", spec.timeout),
        record_progress,
        threaded=not spec.is_async,
        dependencies=_GivenDependencies(job_fields.get("dependency_results", {})),
    )
    attempt = Attempt(job, spec)
    cancel_after = job_fields.get("cancel_after")
    cancelling = (
        None
        if cancel_after is None
        else asyncio.get_running_loop().call_later(
            cancel_after, attempt.cancel, CancelReason.REQUESTED
        )
    )
    threads = thread_pool(1)
    try:
        # A task, as on a replica: a cancel request cancels it.
        attempt.task = asyncio.ensure_future(run_attempt(attempt, threads))
        outcome = await attempt.task
    finally:
        if cancelling is not None:
            cancelling.cancel()
        threads.shutdown(wait=False)
    return _performed(outcome, progress)


def _performed(outcome: Outcome, progress: list[dict[str, Any]]) -> Performed:
    kind = _OUTCOMES.get(outcome.kind)
    if kind is None:  # requeue and dropped need a replica that is stopping or deposed
        raise DispatcherError(f"unexpected outcome {outcome.kind} outside a replica")
    delayed = outcome.kind in (OutcomeKind.RETRY, OutcomeKind.SNOOZE)
    return Performed(
        outcome=kind,
        result=None if outcome.result_json is None else json.loads(outcome.result_json),
        error=outcome.error,
        traceback=outcome.traceback,
        delay=outcome.delay if delayed else None,
        timed_out=bool(outcome.error and outcome.error.startswith("timed out after ")),
        progress=progress,
    )


def perform(app: App, type: str, payload: Any = None, **job_fields: Unpack[JobFields]) -> Performed:
    """Run ``type``'s executor of ``app`` once on ``payload``, in this process, without
    a database, and return how the attempt ended (:class:`Performed`).

    ``job_fields`` make the job a claim would hand over: ``id``, ``attempt`` (default
    1: the first run), ``max_attempts`` and ``timeout`` (default: the executor's), and
    ``dependency_results`` (``{job id: result}``, what ``job.dependency_results()``
    returns); ``cancel_after``: seconds after the start at which a cancel request
    reaches the attempt (an async executor gets CancelledError; a plain def sees
    ``job.cancelled`` and ``job.cancel_event``). The payload must be JSON, as at
    enqueue (InvalidJob otherwise). From async code (a running event loop), use
    ``await perform_async(...)``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(perform_async(app, type, payload, **job_fields))
    raise DispatcherError(
        "perform() runs its own event loop and cannot be called from a running one; "
        "use `await perform_async(...)` in async tests"
    )
