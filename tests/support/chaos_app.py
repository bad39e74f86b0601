"""The app real replica processes run in chaos tests: ``tests.support.chaos_app:app``.

Every run of an attempt is recorded in ``<schema>.attempts_log`` (see
tests/support/attempt_log.py), so losses and overlapping attempts are computed from
the database, not from logs.

Settings from the environment: DISPATCHER_DSN, DISPATCHER_SCHEMA, DISPATCHER_REPLICA_ID,
CHAOS_TYPE_LIMIT, CHAOS_CONCURRENCY.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from dispatcher import PermanentError
from dispatcher.core.app import App
from dispatcher.services.job import Job
from tests.support.attempt_log import ATTEMPTS_LOG, AttemptLog

__all__ = ["ATTEMPTS_LOG", "app"]

app = App(concurrency=int(os.environ.get("CHAOS_CONCURRENCY", "100")), max_attempts=25)
REPLICA = os.environ.get("DISPATCHER_REPLICA_ID", "?")
PID = os.getpid()

recorder = AttemptLog(
    os.environ.get("DISPATCHER_DSN", ""), os.environ.get("DISPATCHER_SCHEMA", "dispatcher"), REPLICA
)
app.on_startup(recorder.start)
app.on_shutdown(recorder.stop)


@app.executor("chaos.work", concurrency=int(os.environ.get("CHAOS_TYPE_LIMIT", "20")))
async def work(job: Job) -> dict[str, Any]:
    async with recorder.run(job):
        await asyncio.sleep(float(job.payload.get("seconds", 0.05)))
        return {"attempt": job.attempt, "replica": REPLICA, "pid": PID}


@app.executor("chaos.sync", concurrency=int(os.environ.get("CHAOS_TYPE_LIMIT", "20")))
def sync_work(job: Job) -> dict[str, Any]:
    """A plain def executor that ignores job.cancelled for ``seconds``: only its
    process's exit can stop it early."""
    with recorder.run_in_thread(job):
        time.sleep(float(job.payload.get("seconds", 0.05)))
        return {"attempt": job.attempt, "replica": REPLICA, "pid": PID}


@app.executor("chaos.strict")
async def strict(job: Job) -> dict[str, Any]:
    """Rejects any payload but {"n": <int>}; touches the payload so odd ones (deep
    nesting, huge) are decoded."""
    payload = job.payload
    if not (isinstance(payload, dict) and set(payload) == {"n"} and type(payload["n"]) is int):
        raise PermanentError(f"payload must be {{'n': <int>}}, got {str(payload)[:80]}")
    return {"n": payload["n"]}


@app.executor("chaos.keyed", key_concurrency=1)
async def keyed(job: Job) -> dict[str, Any]:
    """One at a time per concurrency_key (tests/chaos/test_concurrency_keys.py)."""
    async with recorder.run(job):
        await asyncio.sleep(float(job.payload.get("seconds", 0.01)))
        return {"attempt": job.attempt, "replica": REPLICA, "pid": PID}
