"""Periodic jobs: the leader enqueues each cron instant exactly once.

Every pass takes the database clock, works out each schedule's instants since its last
enqueued one (at most ``backfill`` seconds back, so a long outage does not unleash a
storm), and enqueues each with one statement that first records the instant in
``schedule_runs``: its primary key turns a second attempt at the same instant (a new
leader, a restart) into a no-op. The schedules table shows each schedule's next run.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import asyncpg
from croniter import croniter

from dispatcher.core.app import Periodic
from dispatcher.core.database_errors import describe
from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.core.records import encode_json
from dispatcher.services.service_loop import run_every

# How long instants are remembered (each schedule's latest one is kept whatever its
# age: it is where the schedule stands).
RUNS_KEPT_FOR = 7 * 86400.0
MAX_SLEEP = 1.0
PRUNE_EVERY_PASSES = 3600


def instants_between(
    schedule: Periodic, after: dt.datetime, until: dt.datetime
) -> list[dt.datetime]:
    """The schedule's instants in (after, until], in UTC."""
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    it = croniter(schedule.cron, after.astimezone(zone))
    found: list[dt.datetime] = []
    while True:
        instant: dt.datetime = it.get_next(dt.datetime)
        if instant > until:
            return found
        found.append(instant.astimezone(dt.UTC))


def next_instant(schedule: Periodic, after: dt.datetime) -> dt.datetime:
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    instant: dt.datetime = croniter(schedule.cron, after.astimezone(zone)).get_next(dt.datetime)
    return instant.astimezone(dt.UTC)


class PeriodicScheduler:
    """Enqueues the app's schedules while this replica leads."""

    def __init__(
        self, pool: asyncpg.Pool, schema: str, schedules: list[Periodic], metrics: Metrics
    ) -> None:
        self._pool = pool
        self._queries = queries_for(schema)
        self._schedules = schedules
        self._payloads = {
            s.name: encode_json(s.payload, what=f"{s.name} payload") for s in schedules
        }
        self._metrics = metrics
        self._log = get_logger("periodic")
        self._passes = 0
        self._last: dict[str, dt.datetime] = {}
        self.next_runs: dict[str, dt.datetime] = {}

    async def run(self) -> None:
        """Pass after pass, sleeping until the next instant (at most a second)."""
        if not self._schedules:
            return
        self._passes = 0
        await run_every(
            self._pass,
            self._sleep_for,
            service=Service.PERIODIC,
            metrics=self._metrics,
            log=self._log,
            failed="periodic_failed",
        )

    async def _pass(self) -> None:
        self._passes += 1
        if self._passes % PRUNE_EVERY_PASSES == 1:
            await self.prune()
        await self.run_once()

    def _sleep_for(self) -> float:
        if not self.next_runs:
            return MAX_SLEEP
        soonest = min(self.next_runs.values())
        wait = (soonest - dt.datetime.now(dt.UTC)).total_seconds()
        return min(MAX_SLEEP, max(0.01, wait))

    async def run_once(self) -> list[tuple[str, dt.datetime, int]]:
        """Enqueue every due instant; returns (schedule, instant, job id) of new ones."""
        enqueued: list[tuple[str, dt.datetime, int]] = []
        async with self._pool.acquire() as conn:
            now: dt.datetime = await conn.fetchval(self._queries["database_now"])
            if not self._last:
                rows = await conn.fetch(
                    self._queries["last_scheduled"], [s.name for s in self._schedules]
                )
                self._last = {row["schedule"]: row["last"] for row in rows}
            for schedule in self._schedules:
                try:
                    enqueued += await self._enqueue_due(conn, schedule, now)
                except asyncpg.PostgresError as exc:
                    # One schedule's trouble (a row the database refuses) must not hold
                    # back the others: log it, and try it again next pass.
                    self._log.error(
                        "periodic_schedule_failed", schedule=schedule.name, error=describe(exc)
                    )
        return enqueued

    async def _enqueue_due(
        self, conn: asyncpg.Connection, schedule: Periodic, now: dt.datetime
    ) -> list[tuple[str, dt.datetime, int]]:
        enqueued: list[tuple[str, dt.datetime, int]] = []
        floor = now - dt.timedelta(seconds=schedule.backfill)
        last = self._last.get(schedule.name)
        after = floor if last is None or last < floor else last
        for instant in instants_between(schedule, after, now):
            job_id = await conn.fetchval(
                self._queries["enqueue_scheduled"],
                schedule.name,
                instant,
                schedule.type,
                self._payloads[schedule.name],
                schedule.priority,
                schedule.max_attempts,
            )
            self._last[schedule.name] = instant
            if job_id is not None:
                enqueued.append((schedule.name, instant, job_id))
                self._log.info(
                    "periodic_enqueued", schedule=schedule.name, at=instant.isoformat(),
                    job_id=job_id,
                )  # fmt: skip
        upcoming = next_instant(schedule, now)
        self.next_runs[schedule.name] = upcoming
        await conn.execute(
            self._queries["record_schedule"],
            schedule.name,
            schedule.cron,
            schedule.timezone,
            schedule.type,
            upcoming,
            self._last.get(schedule.name),
        )
        return enqueued

    async def prune(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(self._queries["prune_schedule_runs"], RUNS_KEPT_FOR)

    def forget(self) -> None:
        """Deposed: the next leadership reads the last instants from the database."""
        self._last = {}
