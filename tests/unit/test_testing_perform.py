"""dispatcher.testing.perform: one executor run in-process, no database, its outcome a
value. Each outcome a replica can write is produced by the same code a replica runs
(run_attempt), so these tests also pin what users' tests will see."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from dispatcher import App, InvalidJob, Job, PermanentError, RetryAfter, RetryPolicy, Snooze
from dispatcher.core.errors import DispatcherError
from dispatcher.testing import Performed, perform, perform_async


def make_app() -> App:
    app = App(max_attempts=3, retry=RetryPolicy(base=2.0, cap=10.0))

    @app.executor("t.echo")
    async def echo(job: Job) -> Any:
        await job.progress(1, 2, "half")
        job.progress(2, 2)
        job.log.info("echoed")
        return {"got": job.payload, "attempt": job.attempt, "pair": (1, 2)}

    @app.executor("t.sync_echo")
    def sync_echo(job: Job) -> Any:
        return {"got": job.payload, "thread": threading.current_thread().name}

    @app.executor("t.boom")
    async def boom(job: Job) -> None:
        raise RuntimeError(f"boom on attempt {job.attempt}")

    @app.executor("t.permanent")
    def permanent(job: Job) -> None:
        raise PermanentError("bad payload")

    @app.executor("t.snooze")
    async def snooze(job: Job) -> None:
        raise Snooze(30)

    @app.executor("t.retry_after")
    async def retry_after(job: Job) -> None:
        raise RetryAfter(7, "rate limited upstream")

    @app.executor("t.slow", timeout=0.05)
    async def slow(job: Job) -> None:
        await asyncio.Event().wait()  # never set: only the timeout ends it

    @app.executor("t.slow_thread", timeout=0.05)
    def slow_thread(job: Job) -> str:
        job.cancel_event.wait()  # returns when the timeout flags the job
        return "stopped"

    @app.executor("t.wait_for_cancel")
    def wait_for_cancel(job: Job) -> str:
        job.cancel_event.wait()
        return "saw the cancel"

    @app.executor("t.async_wait")
    async def async_wait(job: Job) -> None:
        await asyncio.Event().wait()

    @app.executor("t.unstorable")
    async def unstorable(job: Job) -> Any:
        return {"when": time}  # a module: not JSON

    @app.executor("t.join")
    async def join(job: Job) -> list[Any]:
        return sorted((await job.dependency_results()).values())

    @app.executor("t.sync_join")
    def sync_join(job: Job) -> list[Any]:
        return sorted(job.dependency_results_sync().values())

    return app


APP = make_app()


def test_a_completed_job_returns_its_result_as_stored() -> None:
    done = perform(APP, "t.echo", {"to": "a@b.c"})
    assert done == Performed(
        outcome="completed",
        # The JSON round trip a reader of the row sees: the tuple is a list.
        result={"got": {"to": "a@b.c"}, "attempt": 1, "pair": [1, 2]},
        progress=[
            {"current": 1, "total": 2, "message": "half"},
            {"current": 2, "total": 2, "message": None},
        ],
    )
    assert done.completed and not done.failed


def test_a_plain_def_executor_runs_in_a_thread_of_the_pool() -> None:
    done = perform(APP, "t.sync_echo", [1, 2])
    assert done.outcome == "completed"
    assert done.result["got"] == [1, 2]
    assert done.result["thread"].startswith("dispatcher-job")


def test_a_failure_with_attempts_left_is_a_retry_after_the_policys_backoff() -> None:
    done = perform(APP, "t.boom", attempt=2)
    assert done.outcome == "retry"
    assert done.error == "RuntimeError: boom on attempt 2"
    assert done.traceback is not None and "boom on attempt 2" in done.traceback
    # Full jitter after the 2nd failure: uniform in [0, min(10, 2 * 2)].
    assert done.delay is not None and 0 <= done.delay <= 4.0
    assert done.failed and not done.timed_out


def test_the_last_attempt_failing_fails_the_job_for_good() -> None:
    done = perform(APP, "t.boom", attempt=3)
    assert (done.outcome, done.delay) == ("failed", None)
    assert perform(APP, "t.boom", attempt=5, max_attempts=5).outcome == "failed"
    assert perform(APP, "t.boom", attempt=4, max_attempts=5).outcome == "retry"


def test_a_permanent_error_fails_at_once() -> None:
    done = perform(APP, "t.permanent")
    assert (done.outcome, done.error) == ("failed", "PermanentError: bad payload")


def test_snooze_and_retry_after_carry_their_delays() -> None:
    assert perform(APP, "t.snooze") == Performed(outcome="snoozed", delay=30.0)
    done = perform(APP, "t.retry_after")
    assert (done.outcome, done.delay) == ("retry", 7.0)
    assert done.error == "RetryAfter: rate limited upstream"


def test_timeouts_fail_the_attempt_async_and_threaded() -> None:
    for type_ in ("t.slow", "t.slow_thread"):
        done = perform(APP, type_)
        assert done.timed_out, type_
        assert (done.outcome, done.error) == ("retry", "timed out after 0.05s"), type_
    # The job's own timeout wins over the executor's, as a row's does.
    assert perform(APP, "t.slow", timeout=0.01).error == "timed out after 0.01s"


def test_a_cancel_request_reaches_the_running_attempt() -> None:
    for type_ in ("t.wait_for_cancel", "t.async_wait"):
        done = perform(APP, type_, cancel_after=0.01)
        assert (done.outcome, done.error, done.result) == ("cancelled", "cancelled", None), type_


def test_a_return_value_that_cannot_be_stored_fails_the_attempt() -> None:
    done = perform(APP, "t.unstorable")
    assert done.outcome == "retry"
    assert done.error is not None and done.error.startswith("the return value cannot be stored")


def test_dependency_results_come_from_the_test() -> None:
    given = {11: "b", 10: "a"}
    assert perform(APP, "t.join", dependency_results=given).result == ["a", "b"]
    assert perform(APP, "t.sync_join", dependency_results=given).result == ["a", "b"]
    assert perform(APP, "t.join").result == []


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(DispatcherError, match=r"no executor registered for type 't.nope'"):
        perform(APP, "t.nope")
    with pytest.raises(InvalidJob, match="payload is not JSON-serializable"):
        perform(APP, "t.echo", {"x": object()})


async def test_from_async_code_perform_async_runs_on_the_running_loop() -> None:
    done = await perform_async(APP, "t.echo", {"n": 1}, id=42, attempt=2)
    assert done.result == {"got": {"n": 1}, "attempt": 2, "pair": [1, 2]}
    with pytest.raises(DispatcherError, match="use `await perform_async"):
        perform(APP, "t.echo")
