"""Queue depth per type, counted by the leader: gauges and backpressure.

Gauges: queue depth and oldest-pending age per registered type, and one
``type="(other)"`` series for every other type together, so that the page keeps its
size however many types producers insert. Only the leader exports them, and a deposed
leader clears them, so summing across replicas never counts twice.

Backpressure: the same count closes (or reopens) the queue of every type with a
``max_pending``: ``job_types.accepting``, which an enqueue checks by primary key
instead of counting. Precision: one pass (``interval``); producers can overshoot
``max_pending`` by what they enqueue in that time. Counts are serialized by a
transaction lock (they overlap across a leader change), so a stale count never
reopens a queue that a newer one closed.

Samples: at most every ``SAMPLE_INTERVAL`` the same count is also recorded in
``queue_samples`` with the jobs finished since the previous sample, for the
dashboard's charts (migration 0011); samples older than two hours are pruned.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

from dispatcher.core.log import get_logger
from dispatcher.core.metrics import OTHER_TYPES, Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.services.service_loop import run_every

# Seconds between queue samples: 360 rows an hour per type.
SAMPLE_INTERVAL = 10.0


class QueueStats:
    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        metrics: Metrics,
        *,
        interval: float,
        max_pending: dict[str, int | None] | None = None,
    ) -> None:
        self._pool = pool
        self._schema = schema
        self._queries = queries_for(schema)
        self._sql = self._queries["queue_depth"]
        self._max_pending = max_pending or {}
        self._metrics = metrics
        self._interval = interval
        self._log = get_logger("queue_stats")
        # Declared once per term: whichever replica leads, its app is the reference.
        self._declared = False
        self._sampled_at: float | None = None

    async def run(self) -> None:
        self._declared = False
        self._sampled_at = None
        try:
            await run_every(
                self.run_once,
                self._interval,
                service=Service.QUEUE_STATS,
                metrics=self._metrics,
                log=self._log,
                failed="queue_stats_failed",
            )
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
            now = time.monotonic()
            if self._sampled_at is None or now - self._sampled_at >= SAMPLE_INTERVAL:
                await conn.execute(
                    self._queries["record_queue_sample"],
                    [row["type"] for row in rows],
                    [row["ready"] for row in rows],
                    [row["scheduled"] for row in rows],
                    [row["processing"] for row in rows],
                    SAMPLE_INTERVAL,
                )
                await conn.execute(self._queries["prune_queue_samples"])
                self._sampled_at = now
        export_queue_depth(self._metrics, rows)

    def clear(self) -> None:
        """Stop exporting (this replica no longer leads)."""
        self._metrics.queue_depth.clear()
        self._metrics.queue_oldest_pending_age.clear()


def export_queue_depth(metrics: Metrics, rows: Iterable[Mapping[str, Any]]) -> None:
    """Set the queue gauges from one ``queue_depth`` count: a series per registered
    type (0 when none is pending) and one OTHER_TYPES series for all other types (their
    depths summed, the oldest of their ages)."""
    labels = [*sorted(metrics.job_types or ()), OTHER_TYPES]
    ready = dict.fromkeys(labels, 0)
    scheduled = dict.fromkeys(labels, 0)
    oldest = dict.fromkeys(labels, 0.0)
    for row in rows:
        label = metrics.type_label(row["type"])
        ready[label] = ready.get(label, 0) + row["ready"]
        scheduled[label] = scheduled.get(label, 0) + row["scheduled"]
        oldest[label] = max(oldest.get(label, 0.0), row["oldest_ready_age"])
    depth = metrics.queue_depth
    age = metrics.queue_oldest_pending_age
    # Set in place, never cleared and refilled: /metrics renders in a thread and would
    # catch the gauges empty half way (a missing sample resets a pending alert). Only
    # without init_series (a test's bare Metrics) do the labels come and go.
    if metrics.job_types is None:
        depth.clear()
        age.clear()
    for label in oldest:
        depth.labels(label, "ready").set(ready[label])
        depth.labels(label, "scheduled").set(scheduled[label])
        age.labels(label).set(oldest[label])
