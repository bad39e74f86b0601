"""Backoff maths and executor registration (pure logic, no database)."""

from __future__ import annotations

import random

import pytest

from dispatcher.core.app import App, load_app
from dispatcher.core.errors import DispatcherError
from dispatcher.core.retry import RetryPolicy


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(base=2, cap=30)
    assert [policy.ceiling(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert policy.ceiling(10_000) == 30  # no overflow on absurd attempt numbers


def test_full_jitter_stays_within_zero_and_the_ceiling() -> None:
    policy = RetryPolicy(base=1, cap=60)
    rng = random.Random(7)
    for attempt in range(1, 12):
        delays = [policy.delay(attempt, rng) for _ in range(500)]
        assert all(0 <= d <= policy.ceiling(attempt) for d in delays)
        # Full jitter spreads over the whole window, not near its top.
        assert min(delays) < policy.ceiling(attempt) * 0.1
        assert max(delays) > policy.ceiling(attempt) * 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"base": 0}, "base must be a positive number"), ({"base": 5, "cap": 1}, "must be >= base")],
)
def test_bad_retry_policies(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_executor_registration_and_defaults() -> None:
    app = App(concurrency=10, max_attempts=7, timeout=60)

    @app.executor("a", concurrency=20)
    async def a(job: object) -> None: ...

    @app.executor("b", timeout=5, max_attempts=2)
    def b(job: object) -> None: ...

    assert app.executors["a"].is_async and not app.executors["b"].is_async
    assert (app.executors["a"].max_attempts, app.executors["a"].timeout) == (7, 60)
    assert (app.executors["b"].max_attempts, app.executors["b"].timeout) == (2, 5)
    assert app.limits().per_type["a"] == 10, "a type limit never exceeds the global one"


@pytest.mark.parametrize(
    ("type_", "kwargs", "message"),
    [
        ("", {}, "executor type must be a non-empty string"),
        ("x", {"concurrency": 0}, "concurrency must be a positive integer"),
        ("x", {"timeout": -1}, "timeout must be a positive number of seconds"),
        ("x", {"max_attempts": 1.5}, "max_attempts must be a positive integer"),
    ],
)
def test_bad_registrations_say_what_is_wrong(
    type_: str, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(DispatcherError, match=message):
        App().executor(type_, **kwargs)  # type: ignore[arg-type]


def test_a_type_registered_twice_names_the_first_registration() -> None:
    app = App()

    @app.executor("dup")
    async def first(job: object) -> None: ...

    with pytest.raises(DispatcherError, match=r"'dup' is already registered \(by .*first\)"):

        @app.executor("dup")
        async def second(job: object) -> None: ...


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "expected MODULE:APP"),
        ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz'"),
        ("dispatcher.examples:nothing", "must name a dispatcher.App, found nothing"),
        ("dispatcher.examples:noop", "must name a dispatcher.App, found function"),
    ],
)
def test_load_app_errors(target: str, message: str) -> None:
    with pytest.raises(DispatcherError, match=message):
        load_app(target)


def test_load_app_finds_the_examples() -> None:
    app = load_app("dispatcher.examples:app")
    assert sorted(app.executors) == ["demo.echo", "demo.fail", "demo.noop", "demo.sleep"]


def test_limits_are_computed_once_for_the_replica() -> None:
    app = App(concurrency=10)

    @app.executor("fast", concurrency=20)
    async def fast(job: object) -> None: ...

    @app.executor("slow", concurrency=3)
    def slow(job: object) -> None: ...

    @app.executor("other")
    def other(job: object) -> None: ...

    limits = app.limits()
    assert (limits.global_limit, limits.per_type) == (10, {"fast": 10, "other": 10, "slow": 3})
    assert limits.sync_threads == 10, "slow 3 + other 10, capped by the global limit"
    raised = app.limits(concurrency=50)  # DISPATCHER_CONCURRENCY wins over the App's
    assert raised.per_type == {"fast": 20, "other": 50, "slow": 3}
    assert raised.sync_threads == 50, "slow 3 + other 50, capped by the global limit"


def test_retry_or_fail_is_one_decision() -> None:
    policy = RetryPolicy(base=1, cap=8)
    assert policy.after_failure(3, 3) is None, "the last attempt failed: fail for good"
    delays = [policy.after_failure(2, 3) for _ in range(200)]
    assert all(d is not None and 0 <= d <= policy.ceiling(2) == 2 for d in delays)
    app = App(max_attempts=4, retry=policy)
    assert app.retry_for("unknown.type") == (policy, 4)
