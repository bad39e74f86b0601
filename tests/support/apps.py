"""Apps for the dispatch tests. Executors report what they saw into ``seen`` so tests
can check the very attempt that ran, not only the row it left."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import Any

from dispatcher import PermanentError, RetryAfter, Snooze
from dispatcher.core.app import App
from dispatcher.core.retry import RetryPolicy
from dispatcher.services.job import Job

# job id -> list of (attempt, wall-clock start) per run of that job
seen: dict[int, list[tuple[int, float]]] = defaultdict(list)


def record(job: Job) -> None:
    seen[job.id].append((job.attempt, time.time()))


def make_app(*, concurrency: int = 50, sleep_limit: int = 3) -> App:
    app = App(concurrency=concurrency, retry=RetryPolicy(base=0.2, cap=1.0))

    @app.executor("t.noop")
    async def noop(job: Job) -> None:
        return None

    @app.executor("t.sleep", concurrency=sleep_limit)
    async def sleep(job: Job) -> None:
        await asyncio.sleep(job.payload.get("seconds", 0.2))

    @app.executor("t.flaky", max_attempts=5)
    async def flaky(job: Job) -> dict[str, int]:
        record(job)
        if job.attempt <= job.payload["fail_times"]:
            raise ValueError(f"flaky failure {job.attempt}")
        return {"succeeded_on": job.attempt}

    @app.executor("t.permanent")
    async def permanent(job: Job) -> None:
        record(job)
        raise PermanentError("the record does not exist")

    @app.executor("t.snooze")
    async def snooze(job: Job) -> str:
        record(job)
        if len(seen[job.id]) == 1:
            raise Snooze(0.2)
        return "woke up"

    @app.executor("t.retry_after", max_attempts=2)
    async def retry_after(job: Job) -> None:
        record(job)
        raise RetryAfter(0.3, "rate limited upstream")

    @app.executor("t.slow", timeout=0.3)
    async def slow(job: Job) -> None:
        await asyncio.sleep(30)

    @app.executor("t.sync_slow", timeout=0.3, max_attempts=1)
    def sync_slow(job: Job) -> None:
        # A polite sync executor: it stops when flagged.
        job.cancel_event.wait(10)

    @app.executor("t.sync_echo")
    def sync_echo(job: Job) -> Any:
        assert threading.current_thread() is not threading.main_thread()
        return {"echo": job.payload, "thread": threading.current_thread().name}

    @app.executor("t.bad_result")
    async def bad_result(job: Job) -> Any:
        return {"not json": {1, 2, 3}}

    @app.executor("t.raises")
    async def raises(job: Job) -> None:
        raise KeyError(job.payload.get("missing", "field"))

    @app.executor("t.long_then_quick")
    async def long_then_quick(job: Job) -> int:
        record(job)
        if job.attempt == 1:
            await asyncio.sleep(60)
        return job.attempt

    @app.executor("t.progress")
    async def progress(job: Job) -> None:
        for step in range(1000):  # a flood of calls: writes stay throttled
            job.progress(step, 1000, "flooding")
        await job.progress(7, 10, "seven of ten")
        await asyncio.sleep(30)

    return app


def make_feature_app(*, tick_backfill: float = 30.0) -> App:
    """Periodic, cached, pausable, backpressure, rate-limited and doomed types (see
    tests/integration/test_periodic.py, test_result_cache.py, test_pause.py,
    test_backpressure.py, test_rate_limits.py and test_dead_letters.py)."""
    app = App(concurrency=50, retry=RetryPolicy(base=0.2, cap=1.0))

    @app.periodic("* * * * * *", type="t.tick", name="tick", backfill=tick_backfill)
    async def tick(job: Job) -> None:
        return None

    @app.executor("t.limited", max_pending=3)
    async def limited(job: Job) -> None:
        await asyncio.sleep(30)

    @app.executor("t.rated", rate_limit=(5, 1.0))
    async def rated(job: Job) -> None:
        return None

    @app.executor("t.cached")
    async def cached(job: Job) -> dict[str, Any]:
        record(job)
        return {"computed": job.payload["x"] * 2, "run": len(seen[job.id])}

    @app.executor("t.pausable")
    async def pausable(job: Job) -> None:
        await asyncio.sleep(job.payload.get("seconds", 0.05))

    @app.executor("t.doomed", max_attempts=1)
    async def doomed(job: Job) -> None:
        if job.payload.get("fail", True):
            raise ValueError("doomed")

    return app
