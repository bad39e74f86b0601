"""Example executors: ``dispatcher run dispatcher.examples:app``.

* ``demo.noop``: returns at once (benchmarks).
* ``demo.sleep``: payload ``{"seconds": x}``; sleeps, reporting progress each second.
* ``demo.fail``: always raises (retries, then fails).
* ``demo.echo``: returns its payload as the result.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from dispatcher.core.app import App
from dispatcher.core.errors import PermanentError
from dispatcher.services.job import Job

app = App(concurrency=100)


@app.executor("demo.noop")
async def noop(job: Job) -> None:
    return None


@app.executor("demo.sleep")
async def sleep(job: Job) -> dict[str, float]:
    payload = job.payload
    seconds = payload.get("seconds", 1) if isinstance(payload, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise PermanentError(f'payload must be {{"seconds": <number>}}, got {payload!r}')
    if not (math.isfinite(seconds) and 0 <= seconds <= 86400):
        raise PermanentError(f"seconds must be between 0 and 86400, got {seconds}")
    slept = 0.0
    total = float(seconds)
    while slept < total:
        await job.progress(slept, total, f"slept {slept:g}s of {total:g}s")
        step = min(1.0, total - slept)
        await asyncio.sleep(step)
        slept += step
    await job.progress(total, total, "done")
    return {"slept": total}


@app.executor("demo.fail", max_attempts=3)
async def fail(job: Job) -> None:
    raise RuntimeError(f"demo.fail always fails (attempt {job.attempt} of {job.max_attempts})")


@app.executor("demo.echo")
async def echo(job: Job) -> Any:
    return job.payload
