"""The async producer client, on asyncpg.

Mirrors :class:`dispatcher.Client`. Every method takes an optional ``conn``: pass your
own asyncpg connection (inside ``async with conn.transaction():``) and the job commits
or rolls back with your business write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, Unpack

import asyncpg

from dispatcher.core.records import BulkOptions, EnqueueOptions, JobRecord, new_job_values
from dispatcher.core.schema import DEFAULT_SCHEMA, validate_schema_name
from dispatcher.database.pool import create_pool
from dispatcher.producers.graphs import enqueue_graph_plan, prepare_graph
from dispatcher.producers.plans import (
    ClusterStatus,
    JobType,
    Plan,
    cancel_plan,
    cluster_status_plan,
    enqueue_many_plan,
    enqueue_plan,
    get_plan,
    job_types_plan,
    list_jobs_plan,
    prepare_bulk,
    retry_many_plan,
    retry_plan,
    set_paused_plan,
)
from dispatcher.producers.runners import AsyncpgRunner

T = TypeVar("T")


class AsyncClient:
    """Enqueue and control jobs from asyncio code.

    Create with ``await AsyncClient.connect(dsn)`` (opens a pool the client owns) or
    ``AsyncClient(pool=...)`` around an existing asyncpg pool.
    """

    def __init__(self, *, pool: asyncpg.Pool, schema: str = DEFAULT_SCHEMA) -> None:
        self.schema = validate_schema_name(schema)
        self._runner = AsyncpgRunner(schema)
        self._pool = pool
        self._owns_pool = False

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 4,
        prepared_statements: bool = True,
    ) -> AsyncClient:
        """Open a pool on ``dsn`` and return a client that closes it on ``close()``.

        ``prepared_statements=False`` for a ``dsn`` that goes through PgBouncer in
        transaction mode: no statement cache, so asyncpg (0.29+) uses the unnamed
        statement and sends its Parse again with Bind and Execute, which one server
        connection then runs whole (see ``dispatcher.runtime``). Around a ``pool`` of
        your own, create that pool with ``statement_cache_size=0``.
        """
        options: dict[str, Any] = {} if prepared_statements else {"statement_cache_size": 0}
        pool = await create_pool(dsn, min_size=min_size, max_size=max_size, **options)
        client = cls(pool=pool, schema=schema)
        client._owns_pool = True
        return client

    async def close(self) -> None:
        """Close the pool if this client opened it."""
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _connection(
        self, conn: asyncpg.Connection | None
    ) -> AsyncIterator[asyncpg.Connection]:
        if conn is not None:
            yield conn
        else:
            async with self._pool.acquire() as pooled:
                yield pooled

    async def _run(self, conn: asyncpg.Connection | None, plan: Plan[T]) -> T:
        """Run a producer plan's statements on ``conn`` (or a pooled one) to its end."""
        async with self._connection(conn) as c:
            return await self._runner.run(c, plan)

    async def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        conn: asyncpg.Connection | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> JobRecord:
        """Insert one job and return its row; see :meth:`dispatcher.Client.enqueue`."""
        return await self._run(conn, enqueue_plan(new_job_values(type, payload, **options)))

    async def enqueue_many(
        self,
        type: str,
        payloads: Iterable[Any],
        *,
        conn: asyncpg.Connection | None = None,
        **options: Unpack[BulkOptions],
    ) -> list[int]:
        """Insert one job of ``type`` per payload with binary COPY; return their ids.

        See :meth:`dispatcher.Client.enqueue_many`.
        """
        return await self._run(conn, enqueue_many_plan(prepare_bulk(type, payloads, **options)))

    async def enqueue_graph(
        self,
        nodes: Mapping[str, Mapping[str, Any]],
        *,
        conn: asyncpg.Connection | None = None,
    ) -> dict[str, int]:
        """Insert a small graph of jobs in one statement; return {node name: job id}.

        See :meth:`dispatcher.Client.enqueue_graph`.
        """
        return await self._run(conn, enqueue_graph_plan(prepare_graph(nodes)))

    async def get(self, job_id: int, *, conn: asyncpg.Connection | None = None) -> JobRecord:
        """The job's current row; JobNotFound if there is none."""
        return await self._run(conn, get_plan(job_id))

    async def cancel(self, job_id: int, *, conn: asyncpg.Connection | None = None) -> JobRecord:
        """Cancel a job; see :meth:`dispatcher.Client.cancel`."""
        return await self._run(conn, cancel_plan(job_id))

    async def retry(self, job_id: int, *, conn: asyncpg.Connection | None = None) -> JobRecord:
        """Put a failed or cancelled job back to pending, due now."""
        return await self._run(conn, retry_plan(job_id))

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
        conn: asyncpg.Connection | None = None,
    ) -> list[JobRecord]:
        """Jobs newest first, optionally filtered by ``status`` and ``type``.

        Page with ``before_id``: pass the last id of the previous page.
        """
        return await self._run(conn, list_jobs_plan(status, type, before_id, limit))

    async def cluster_status(
        self, *, alive_within: float = 30.0, conn: asyncpg.Connection | None = None
    ) -> ClusterStatus:
        """The leader lease, registered replicas and queue depth per type."""
        return await self._run(conn, cluster_status_plan(alive_within))

    async def retry_many(
        self,
        *,
        status: str = "failed",
        type: str | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> int:
        """Retry every ``failed`` (or ``cancelled``) job, optionally only of ``type``;
        returns how many went back to pending."""
        return await self._run(conn, retry_many_plan(status, type))

    async def pause(self, type: str, *, conn: asyncpg.Connection | None = None) -> JobType:
        """Stop claiming ``type`` across the cluster (running jobs finish)."""
        return await self._run(conn, set_paused_plan(type, True))

    async def resume(self, type: str, *, conn: asyncpg.Connection | None = None) -> JobType:
        """Claim ``type`` again."""
        return await self._run(conn, set_paused_plan(type, False))

    async def job_types(self, *, conn: asyncpg.Connection | None = None) -> list[JobType]:
        """Types with cluster-wide controls (paused, max_pending) and their state."""
        return await self._run(conn, job_types_plan())
