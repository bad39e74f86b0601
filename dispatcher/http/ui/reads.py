"""What the dashboard reads beyond the AsyncClient's operator calls: the queue samples
behind the overview's charts (migration 0011), the unique-key search, and the
schedules alone (the cluster status would count every queue as well)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg

from dispatcher.core.queries import queries_for
from dispatcher.core.records import JobRecord


@dataclass(frozen=True)
class MinuteSample:
    """One minute of the last hour: jobs finished in it, the queue at its end."""

    minute: dt.datetime
    completed: int
    failed: int
    ready: int
    scheduled: int
    processing: int


@dataclass(frozen=True)
class FinishedCounts:
    completed: int
    failed: int


@dataclass(frozen=True)
class JobLink:
    """A job at the other end of a dependency: its id, type and status."""

    id: int
    type: str
    status: str


@dataclass(frozen=True)
class JobLinks:
    """A job's dependencies (those that still exist) and its first dependents."""

    dependencies: list[JobLink]
    dependents: list[JobLink]


class DashboardReads:
    """The dashboard's own queries, on the replica's pool."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        self._queries = queries_for(schema)

    async def queue_history(self) -> list[MinuteSample]:
        """The last hour, minute by minute (minutes without a sample are missing)."""
        rows = await self._pool.fetch(self._queries["queue_history"])
        return [
            MinuteSample(
                minute=row["minute"],
                completed=row["completed"],
                failed=row["failed"],
                ready=row["ready"],
                scheduled=row["scheduled"],
                processing=row["processing"],
            )
            for row in rows
        ]

    async def finished_by_type(self) -> dict[str, FinishedCounts]:
        """Per type, jobs completed and failed in the last hour."""
        rows = await self._pool.fetch(self._queries["finished_by_type"])
        return {row["type"]: FinishedCounts(row["completed"], row["failed"]) for row in rows}

    async def schedules(self) -> list[dict[str, Any]]:
        """Every registered schedule with its next run (as the cluster status lists
        them), without the cluster status's queue count."""
        rows = await self._pool.fetch(self._queries["list_schedules"])
        return [dict(row) for row in rows]

    async def job_links(self, job_id: int, *, dependents: int) -> JobLinks:
        """Job ``job_id``'s dependencies and its first ``dependents`` dependents."""
        rows = await self._pool.fetch(self._queries["job_links"], job_id, dependents)
        links: dict[str, list[JobLink]] = {"dependency": [], "dependent": []}
        for row in rows:
            links[row["link"]].append(JobLink(row["id"], row["type"], row["status"]))
        return JobLinks(links["dependency"], links["dependent"])

    async def jobs_by_unique_key(
        self,
        unique_key: str,
        *,
        status: str | None,
        type: str | None,
        before_id: int | None,
        limit: int,
    ) -> list[JobRecord]:
        """Jobs with ``unique_key``, newest first, filtered and paged like list_jobs."""
        rows = await self._pool.fetch(
            self._queries["list_jobs_by_unique_key"], unique_key, status, type, before_id, limit
        )
        return [JobRecord.from_row(row) for row in rows]
