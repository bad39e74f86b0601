"""Apps for benchmarks that need executors the examples lack: ``bench.apps:steady``.

* ``bench.sleep``: payload ``{"ms": x}``; waits x milliseconds on the event loop and
  returns. Unlike ``demo.sleep`` it writes no progress, so the only database work per
  job is the dispatcher's own (claim, completion): a stand-in for a short I/O-bound
  job such as a call to another service.
"""

from __future__ import annotations

import asyncio

from dispatcher.core.app import App
from dispatcher.services.job import Job

# The replica's DISPATCHER_CONCURRENCY overrides this global limit.
steady = App(concurrency=100)


@steady.executor("bench.sleep")
async def sleep_ms(job: Job) -> None:
    payload = job.payload
    ms = payload.get("ms", 1) if isinstance(payload, dict) else 1
    await asyncio.sleep(float(ms) / 1000)
