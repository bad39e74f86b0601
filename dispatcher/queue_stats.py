"""Queue depth per type, counted by the leader: gauges and backpressure.

Gauges: queue depth and oldest-pending age per type. Only the leader exports them,
and a deposed leader clears them, so summing across replicas never counts twice.

Backpressure: the same count closes (or reopens) the queue of every type with a
``max_pending``: ``job_types.accepting``, which an enqueue checks by primary key
instead of counting. Precision: one pass (``interval``); producers can overshoot
``max_pending`` by what they enqueue in that time. Counts are serialized by a
transaction lock (they overlap across a leader change), so a stale count never
reopens a queue that a newer one closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from dispatcher.database_errors import describe
from dispatcher.log import get_logger
from dispatcher.metrics import Metrics
from dispatcher.queries import queries_for


class QueueStats:
    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        metrics: Metrics,
        *,
        interval: float,
        max_pending: dict[str, int | None] | None = None,
        log: Any = None,
    ) -> None:
        self._pool = pool
        self._schema = schema
        self._queries = queries_for(schema)
        self._sql = self._queries["queue_depth"]
        self._max_pending = max_pending or {}
        self._metrics = metrics
        self._interval = interval
        self._log = log or get_logger("queue_stats")
        # Declared once per term: whichever replica leads, its app is the reference.
        self._declared = False

    async def run(self) -> None:
        self._declared = False
        try:
            while True:
                try:
                    await self.run_once()
                except Exception as exc:
                    self._metrics.database_errors.labels("queue_stats").inc()
                    self._log.warning("queue_stats_failed", error=describe(exc))
                await asyncio.sleep(self._interval)
        finally:
            self.clear()

    async def declare_limits(self) -> None:
        """Record the app's max_pending per type (the leader's app is the reference)."""
        if not self._max_pending:
            return
        async with self._pool.acquire() as conn:
            await conn.execute(
                self._queries["declare_max_pending"],
                list(self._max_pending),
                list(self._max_pending.values()),
            )

    async def run_once(self) -> None:
        """One count: gauges, and every max_pending queue closed or reopened."""
        if not self._declared:
            # Before the first count, or it would judge against stale limits.
            await self.declare_limits()
            self._declared = True
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(self._queries["lock_queue_count"], self._schema)
            rows = await conn.fetch(self._sql)
            await conn.execute(
                self._queries["refresh_accepting"],
                [row["type"] for row in rows],
                [row["ready"] + row["scheduled"] for row in rows],
            )
        depth = self._metrics.queue_depth
        age = self._metrics.queue_oldest_pending_age
        depth.clear()
        age.clear()
        for row in rows:
            depth.labels(row["type"], "ready").set(row["ready"])
            depth.labels(row["type"], "scheduled").set(row["scheduled"])
            age.labels(row["type"]).set(row["oldest_ready_age"])

    def clear(self) -> None:
        """Stop exporting (this replica no longer leads)."""
        self._metrics.queue_depth.clear()
        self._metrics.queue_oldest_pending_age.clear()
