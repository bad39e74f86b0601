"""The app of the worker-mode tests: ``tests.support.worker_app:app``."""

from __future__ import annotations

import asyncio

from dispatcher.core.app import App
from dispatcher.services.job import Job

app = App(concurrency=200)


@app.executor("w.noop")
async def noop(job: Job) -> None:
    return None


@app.executor("w.limited", concurrency=4)
async def limited(job: Job) -> None:
    await asyncio.sleep(0.02)
