"""The leader's housekeeping: rescue jobs whose owner died; fail jobs nobody can run.

* Rescue: a processing job not heartbeated for ``stale_after`` lost its owner (crash,
  partition, pause). Its attempt is recorded as failed ("stale: owner stopped
  heartbeating"), then it is retried with the type's backoff, or failed when out of
  attempts.
* Orphans: every ORPHAN_WATCH_INTERVAL, replicas whose session lock is gone (their
  process died; see :mod:`dispatcher.services.replica_session`); once seen so for
  ``orphan_grace``, their async attempts are rescued the same way, without waiting
  for ``stale_after``.
* Unknown types: a pending job of a type no live replica has an executor for stays
  pending (a newer replica may bring it during a rolling deploy); once due for longer
  than the grace period it fails with "no executor registered for type 'x'".
* Retention: completed and cancelled jobs are deleted ``retention_completed`` after
  they finished, failed ones ``retention_failed`` after. Deletes go oldest first, in
  batches of PRUNE_BATCH rows, resting after each as long as it took, and a pass
  stops after PRUNE_BATCHES_PER_PASS batches: no long locks, no bloat storm, and the
  claim loop (which touches only pending rows) never waits on them.

Each pass works in bounded batches and runs only while this replica leads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from dispatcher.core.app import App
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.core.schema import SchemaNames
from dispatcher.services.service_loop import run_every

BATCH = 1000
PRUNE_BATCH = 2000
PRUNE_BATCHES_PER_PASS = 50
PRUNE_PAUSE = 0.01
# How often the leader looks for replicas whose session ended.
ORPHAN_WATCH_INTERVAL = 0.25


@dataclass
class ReapReport:
    """What one pass did: (job id, type, new status) per rescued job, ids failed."""

    rescued: list[tuple[int, str, str]] = field(default_factory=list)
    without_executor: list[int] = field(default_factory=list)
    pruned: int = 0


class Reaper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        app: App,
        *,
        stale_after: float,
        interval: float,
        replica_seen_within: float,
        unknown_type_grace: float | None = None,
        retention_completed: float = 86400.0,
        retention_failed: float = 14 * 86400.0,
        orphan_grace: float = 1.0,
        on_rescued: Callable[[], None] | None = None,
        metrics: Metrics,
    ) -> None:
        self._pool = pool
        self._queries = queries_for(schema)
        self._app = app
        self._stale_after = stale_after
        self._interval = interval
        self._replica_seen_within = replica_seen_within
        self._grace = (
            unknown_type_grace if unknown_type_grace is not None else app.unknown_type_grace
        )
        self._retention = (
            (["completed", "cancelled"], retention_completed),
            (["failed"], retention_failed),
        )
        self._orphan_grace = orphan_grace
        self._on_rescued = on_rescued
        self._session_lock_name = SchemaNames(schema).session_lock_name
        # (owner, session pid) -> when this leader first saw that session gone.
        self._orphans_seen: dict[tuple[str, int], float] = {}
        self._metrics = metrics
        self._log = get_logger("reaper")

    async def run(self) -> None:
        """Reap every ``interval`` (the runtime runs this only while leading)."""
        await run_every(
            self.run_once,
            self._interval,
            service=Service.REAPER,
            metrics=self._metrics,
            log=self._log,
            failed="reaper_failed",
        )

    async def watch_orphans(self) -> None:
        """Rescue orphans every ORPHAN_WATCH_INTERVAL (while leading)."""
        self._orphans_seen.clear()  # sightings from an earlier term are not ours to trust
        await run_every(
            self.rescue_orphaned,
            ORPHAN_WATCH_INTERVAL,
            service=Service.REAPER,
            metrics=self._metrics,
            log=self._log,
            failed="orphan_watch_failed",
        )

    async def run_once(self) -> ReapReport:
        report = ReapReport()
        while True:
            rescued = await self.rescue_stale()
            report.rescued.extend(rescued)
            if len(rescued) < BATCH:
                break
        while True:
            failed = await self.fail_without_executor()
            report.without_executor.extend(failed)
            if len(failed) < BATCH:
                break
        report.pruned = await self.prune_finished()
        self._metrics.reaper_runs.inc()
        return report

    async def rescue_stale(self) -> list[tuple[int, str, str]]:
        return await self._rescue("stale_jobs", self._stale_after, BATCH)

    async def rescue_orphaned(self) -> list[tuple[int, str, str]]:
        """Rescue the async attempts of replicas whose session has been gone for
        ``orphan_grace``: the time their owner had to cancel them (it does so the
        moment it loses its session)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._queries["orphaned_owners"], self._session_lock_name)
        now = time.monotonic()
        gone = {(row["id"], row["session_pid"]) for row in rows}
        self._orphans_seen = {key: self._orphans_seen.get(key, now) for key in gone}
        ripe = [key for key, seen in self._orphans_seen.items() if now - seen >= self._orphan_grace]
        rescued: list[tuple[int, str, str]] = []
        while ripe:
            owners, pids = [owner for owner, _ in ripe], [pid for _, pid in ripe]
            batch = await self._rescue(
                "orphaned_jobs", self._session_lock_name, owners, pids, BATCH
            )
            rescued.extend(batch)
            if len(batch) < BATCH:
                break
        return rescued

    async def _rescue(self, query: str, *args: object) -> list[tuple[int, str, str]]:
        """Lock jobs with ``query`` (stale_jobs or orphaned_jobs) and rescue them in
        the same transaction: retry with the type's backoff, or fail for good."""
        async with self._pool.acquire() as conn, conn.transaction():
            stale = await conn.fetch(self._queries[query], *args)
            if not stale:
                return []
            ids, delays, retries, errors = [], [], [], []
            for row in stale:
                policy, max_attempts = self._app.retry_for(row["type"])
                after = policy.after_failure(row["attempts"], row["max_attempts"] or max_attempts)
                ids.append(row["id"])
                retries.append(after is not None)
                delays.append(after or 0.0)
                errors.append(row["error"])
            rows = await conn.fetch(self._queries["rescue_jobs"], ids, delays, retries, errors)
        rescued = [(row["id"], row["type"], row["status"]) for row in rows]
        if rescued and self._on_rescued is not None:
            self._on_rescued()  # their slots are free now: the claim loop may use them
        for job_id, type_, status in rescued:
            self._log.warning("job_rescued", job_id=job_id, type=type_, status=status)
            self._metrics.jobs_rescued.labels(type_).inc()
            if status == "failed":
                self._metrics.jobs_failed.labels(type_).inc()
        return rescued

    async def prune_finished(self) -> int:
        """Delete finished jobs past their retention; returns how many."""
        total = 0
        for statuses, retention in self._retention:
            for _ in range(PRUNE_BATCHES_PER_PASS):
                started = time.monotonic()
                async with self._pool.acquire() as conn:
                    deleted = await conn.fetchval(
                        self._queries["prune_finished_jobs"], statuses, retention, PRUNE_BATCH
                    )
                total += deleted
                if deleted < PRUNE_BATCH:
                    break
                # Rest as long as the batch took: pruning never takes more than half
                # of the database's time from the jobs being run.
                await asyncio.sleep(max(PRUNE_PAUSE, time.monotonic() - started))
        if total:
            self._log.info("jobs_pruned", jobs=total)
            self._metrics.jobs_pruned.inc(total)
        return total

    async def fail_without_executor(self) -> list[int]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                self._queries["fail_jobs_without_executor"],
                BATCH,
                self._grace,
                self._replica_seen_within,
                sorted(self._app.executors),
            )
        for row in rows:
            self._log.warning("job_failed_without_executor", job_id=row["id"], type=row["type"])
            self._metrics.jobs_failed.labels(row["type"]).inc()
        return [row["id"] for row in rows]
