"""The app real replica processes run for job graphs: ``tests.support.graph_app:app``
(tests/chaos/test_dependencies.py). Results carry the pid that produced them, so a
test can tell that a graph's work spanned a hand-over."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from dispatcher import PermanentError
from dispatcher.core.app import App
from dispatcher.core.retry import RetryPolicy
from dispatcher.services.job import Job

app = App(concurrency=20, retry=RetryPolicy(base=0.1, cap=0.5), max_attempts=10)
PID = os.getpid()


@app.executor("g.branch")
async def branch(job: Job) -> dict[str, Any]:
    await asyncio.sleep(float(job.payload.get("seconds", 0)))
    return {"n": job.payload.get("n", 0), "pid": PID}


@app.executor("g.join")
async def join(job: Job) -> dict[str, Any]:
    results = await job.dependency_results()
    return {"count": len(results), "sum": sum(r["n"] for r in results.values()), "pid": PID}


@app.executor("g.broken")
async def broken(job: Job) -> None:
    raise PermanentError("broken on purpose")
