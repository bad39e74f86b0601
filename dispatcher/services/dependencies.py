"""What an executor reads of its job's dependencies: their results.

A job that waited for others runs once all of them completed (migration 0013); its
executor reads their results with ``await job.dependency_results()`` (a plain def
executor, in its thread: ``job.dependency_results_sync()``), a mapping of dependency
id to result. Read when asked, not with the claim: most jobs have no dependencies,
and the claim stays as lean for them as before.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import asyncpg

from dispatcher.core.queries import queries_for
from dispatcher.core.records import decode_json

# How long a plain def executor's thread waits for the results before giving up.
READ_TIMEOUT = 30.0


class DependencyResults:
    """Reads dependency results through the replica's pool, from the event loop or
    from an executor's thread."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        self._sql = queries_for(schema)["dependency_results"]
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    async def read(self, job_id: int) -> dict[int, Any]:
        """{dependency id: its result} for job ``job_id`` (empty: it has none)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._sql, job_id)
        return {row["id"]: decode_json(row["result"]) for row in rows}

    def read_blocking(self, job_id: int) -> dict[int, Any]:
        """:meth:`read`, from a thread other than the event loop's (a plain def
        executor's): the loop runs the query, this thread waits for it."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "dependency_results_sync() would block the event loop: in an async "
                "executor, await job.dependency_results()"
            )
        future = asyncio.run_coroutine_threadsafe(self.read(job_id), self._loop)
        return future.result(READ_TIMEOUT)
