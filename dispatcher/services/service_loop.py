"""The loop a periodic service runs: one step, its failure counted and logged, then a
rest. One place for it, so each service says only what its step does.

Every step of these services talks to the database: a failure counts in
``dispatcher_database_errors_total{service=...}`` and logs ``<event>`` with the
error, and the loop goes on (the next step is the retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NoReturn

from dispatcher.core.cancellation import raise_if_cancel_requested
from dispatcher.core.database_errors import describe
from dispatcher.core.log import Logger
from dispatcher.core.metrics import Metrics, Service

Step = Callable[[], Awaitable[object]]


async def guarded(
    step: Step,
    *,
    service: Service,
    metrics: Metrics,
    log: Logger,
    failed: str,
    timeout: float | None = None,
) -> bool:
    """Run ``step`` (for at most ``timeout`` seconds); on an error, or the timeout,
    count it, log ``failed`` and return False."""
    try:
        async with asyncio.timeout(timeout):
            await step()
    except Exception as exc:
        raise_if_cancel_requested()
        metrics.database_errors.labels(service).inc()
        log.warning(failed, error=describe(exc))
        return False
    return True


async def run_every(
    step: Step,
    interval: float | Callable[[], float],
    *,
    service: Service,
    metrics: Metrics,
    log: Logger,
    failed: str,
) -> NoReturn:
    """``guarded(step)``, then rest ``interval`` seconds (or as long as ``interval()``
    says), for good (until cancelled)."""
    while True:
        await guarded(step, service=service, metrics=metrics, log=log, failed=failed)
        await asyncio.sleep(interval() if callable(interval) else interval)
