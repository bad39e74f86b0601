"""How each way an attempt can end maps to an outcome (run_attempt, no database)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dispatcher import PermanentError, RetryAfter, Snooze
from dispatcher.core.app import App
from dispatcher.core.retry import RetryPolicy
from dispatcher.services.executor import (
    Attempt,
    CancelReason,
    OutcomeKind,
    run_attempt,
    thread_pool,
)
from dispatcher.services.job import Job
from tests.support.waiting import eventually


def attempt_of(
    function: Any, *, attempt: int = 1, max_attempts: int = 3, timeout: float | None = None
) -> Attempt:
    app = App(retry=RetryPolicy(base=1, cap=8))
    app.executor("t")(function)
    spec = app.executors["t"]
    job = Job(1, "t", '{"k": 1}', attempt, max_attempts, timeout, threaded=not spec.is_async)
    return Attempt(job, spec)


async def run(function: Any, **kwargs: Any) -> Any:
    with thread_pool(2) as threads:
        return await run_attempt(attempt_of(function, **kwargs), threads)


async def test_return_value_is_stored_as_json() -> None:
    async def ok(job: Job) -> Any:
        return {"payload": job.payload}

    outcome = await run(ok)
    assert outcome.kind is OutcomeKind.COMPLETED
    assert outcome.result_json == '{"payload":{"k":1}}'


async def test_an_exception_is_a_failed_attempt_with_backoff_until_the_last() -> None:
    async def boom(job: Job) -> None:
        raise ValueError("no")

    first = await run(boom, attempt=2, max_attempts=3)
    assert first.kind is OutcomeKind.RETRY and 0 <= first.delay <= 2
    assert first.error == "ValueError: no" and "Traceback" in (first.traceback or "")
    last = await run(boom, attempt=3, max_attempts=3)
    assert last.kind is OutcomeKind.FAILED


@pytest.mark.parametrize(
    ("raised", "kind", "delay"),
    [
        (PermanentError("gone"), OutcomeKind.FAILED, 0.0),
        (Snooze(12), OutcomeKind.SNOOZE, 12.0),
        (RetryAfter(30), OutcomeKind.RETRY, 30.0),
    ],
)
async def test_job_control_signals(raised: Exception, kind: OutcomeKind, delay: float) -> None:
    async def signal(job: Job) -> None:
        raise raised

    outcome = await run(signal)
    assert (outcome.kind, outcome.delay) == (kind, delay)


async def test_async_timeout_names_its_limit_but_an_inner_timeout_error_is_just_an_error() -> None:
    async def hang(job: Job) -> None:
        await asyncio.sleep(10)

    async def inner(job: Job) -> None:
        raise TimeoutError("upstream took too long")

    timed_out = await run(hang, timeout=0.05)
    assert timed_out.error == "timed out after 0.05s" and timed_out.kind is OutcomeKind.RETRY
    own = await run(inner, timeout=5)
    assert own.error == "TimeoutError: upstream took too long"


async def test_sync_timeout_flags_the_job_so_a_polite_thread_stops() -> None:
    flagged: list[bool] = []

    def polite(job: Job) -> None:
        flagged.append(job.cancel_event.wait(5))

    outcome = await run(polite, timeout=0.05)
    assert outcome.error == "timed out after 0.05s"
    # The thread reports True if the flag woke it, False after its 5 s wait otherwise.
    await eventually(
        lambda: asyncio.sleep(0, flagged), timeout=10, what="the thread to see its flag"
    )
    assert flagged == [True]


async def test_unstorable_results() -> None:
    async def returns_a_set(job: Job) -> Any:
        return {1, 2}

    outcome = await run(returns_a_set)
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.error is not None and outcome.error.startswith(
        "the return value cannot be stored: result is not JSON-serializable"
    )


async def test_a_result_nested_too_deeply_fails_the_attempt_instead_of_its_task() -> None:
    # Python's encoder gives up past its recursion limit (RecursionError): that must
    # end the attempt like any unstorable result, not escape run_attempt and leave the
    # slot held with no outcome.
    async def returns_a_deep_list(job: Job) -> Any:
        value: list[Any] = []
        for _ in range(100_000):
            value = [value]
        return value

    outcome = await run(returns_a_deep_list)
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.error == (
        "the return value cannot be stored: result is not JSON-serializable: "
        "nested too deeply (or contains itself)"
    )


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (CancelReason.REQUESTED, OutcomeKind.CANCELLED),
        (CancelReason.SHUTDOWN, OutcomeKind.REQUEUE),
        (CancelReason.TAKEN_OVER, OutcomeKind.DROPPED),
        (CancelReason.DATABASE_LOST, OutcomeKind.RETRY),
    ],
)
async def test_cancellation_reasons(reason: CancelReason, kind: OutcomeKind) -> None:
    started = asyncio.Event()

    async def wait_forever(job: Job) -> None:
        started.set()
        await asyncio.sleep(60)

    attempt = attempt_of(wait_forever)
    with thread_pool(1) as threads:
        task = asyncio.ensure_future(run_attempt(attempt, threads))
        attempt.task = task
        await started.wait()
        assert attempt.cancel(reason)
        outcome = await task
    assert outcome.kind is kind
    assert attempt.job.cancelled
    assert not attempt.cancel(reason), "a second cancel is a no-op"


async def test_progress_validates_and_works_with_or_without_await() -> None:
    job = Job(1, "t", "{}", 1, 1, None)
    job.progress(1, 10)
    await job.progress(2, 10, "two")
    assert job.progress_value == {"current": 2, "total": 10, "message": "two"}
    with pytest.raises(ValueError, match="progress current must be a finite number"):
        job.progress(float("nan"))
    with pytest.raises(ValueError, match="progress message must be a string"):
        job.progress(1, 2, 3)  # type: ignore[arg-type]


async def test_an_attempt_that_could_not_start_in_time_is_handed_back_unrun() -> None:
    # Claimed, then the process was paused past the point where the reaper may have
    # rescued the job: starting it now could run it beside its retry.
    ran: list[int] = []

    async def work(job: Job) -> None:
        ran.append(job.id)

    late = attempt_of(work)
    late.start_by = time.monotonic() - 1.0
    delivered: list[Any] = []
    with thread_pool(1) as threads:
        outcome = await run_attempt(late, threads, delivered.append)
        on_time = attempt_of(work)
        on_time.start_by = time.monotonic() + 60
        assert (await run_attempt(on_time, threads)).kind is OutcomeKind.COMPLETED
    assert outcome.kind is OutcomeKind.REQUEUE and delivered == [outcome]
    assert ran == [1], "only the attempt that started in time ran"
    assert late.finished


async def test_a_thread_past_its_timeout_keeps_the_attempt_until_it_returns() -> None:
    # A thread cannot be stopped: the outcome (and so the retry) waits for it.
    def stubborn(job: Job) -> str:
        time.sleep(0.3)  # ignores job.cancelled: the duration of its work, not a wait
        return "done anyway"

    attempt = attempt_of(stubborn, timeout=0.05)
    started = time.monotonic()
    with thread_pool(1) as threads:
        outcome = await run_attempt(attempt, threads)
    assert time.monotonic() - started >= 0.3
    assert (outcome.kind, outcome.error) == (OutcomeKind.RETRY, "timed out after 0.05s")
    assert outcome.source is attempt and not attempt.thread_running


async def test_a_cancelled_thread_ends_by_its_reason_once_it_returns() -> None:
    returned = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stubborn(job: Job) -> str:
        time.sleep(0.2)  # work that ignores the cancel, not a wait
        loop.call_soon_threadsafe(returned.set)
        return "done anyway"

    attempt = attempt_of(stubborn)
    with thread_pool(1) as threads:
        task = asyncio.ensure_future(run_attempt(attempt, threads))
        attempt.task = task
        await eventually(
            lambda: asyncio.sleep(0, attempt.thread_running),
            timeout=5,
            what="the thread to start",
            every=0.005,
        )
        assert attempt.cancel(CancelReason.SHUTDOWN)
        assert not task.done() and attempt.thread_running, "live until the thread returns"
        outcome = await task
    assert returned.is_set()
    assert outcome.kind is OutcomeKind.REQUEUE


async def test_an_attempt_cancelled_before_it_started_never_runs() -> None:
    ran: list[int] = []

    async def work(job: Job) -> None:
        ran.append(job.id)

    def sync_work(job: Job) -> None:
        ran.append(job.id)

    with thread_pool(1) as threads:
        for function in (work, sync_work):
            attempt = attempt_of(function)
            assert attempt.cancel(CancelReason.REQUESTED)  # claimed with cancel_requested
            attempt.task = asyncio.ensure_future(run_attempt(attempt, threads))
            assert (await attempt.task).kind is OutcomeKind.CANCELLED
    assert ran == []
