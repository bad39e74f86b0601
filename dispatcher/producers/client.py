"""The sync producer client, on psycopg 3 with a psycopg_pool connection pool.

Every method takes an optional ``conn``: pass your own open psycopg connection and the
job is written inside your transaction, so it commits or rolls back with your business
write. Without one, the client borrows a pooled connection in autocommit mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, Unpack

import psycopg
from psycopg_pool import ConnectionPool

from dispatcher.core.records import BulkOptions, EnqueueOptions, JobRecord, new_job_values
from dispatcher.core.schema import DEFAULT_SCHEMA, validate_schema_name
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
from dispatcher.producers.runners import PsycopgRunner

T = TypeVar("T")
Connection = psycopg.Connection[Any]


class Client:
    """Enqueue and control jobs from synchronous code.

    >>> client = Client("postgresql://localhost/app")
    >>> job = client.enqueue("email.send", {"to": "a@b.c"})

    ``dsn`` opens a pool of ``min_size``..``max_size`` connections (``timeout``: seconds
    to wait for one before PoolTimeout); alternatively pass
    an existing ``pool`` (the client then does not close it). ``schema`` names the
    dispatcher installation (default ``dispatcher``).

    ``prepared_statements=False`` for a ``dsn`` that goes through PgBouncer in
    transaction mode (before 1.21 it cannot carry a named prepared statement from one
    transaction to the next): the client's statements are never prepared, on its own
    pool (``prepare_threshold=None``) and on a ``pool`` or ``conn`` you pass.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool: ConnectionPool | None = None,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 30.0,
        prepared_statements: bool = True,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ValueError("Client needs exactly one of dsn= or pool=")
        self.schema = validate_schema_name(schema)
        self._owns_pool = pool is None
        # prepare None: psycopg decides (prepares a statement after a few runs); False: never.
        self._runner = PsycopgRunner(schema, prepare=None if prepared_statements else False)
        connect_options: dict[str, Any] = {"autocommit": True}
        if not prepared_statements:
            connect_options["prepare_threshold"] = None
        self._pool = pool or ConnectionPool(
            dsn or "",
            min_size=min_size,
            max_size=max_size,
            kwargs=connect_options,
            timeout=timeout,
            open=True,
            name="dispatcher-client",
        )

    def close(self) -> None:
        """Close the pool if this client opened it."""
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self._pool.connection() as pooled:
                yield pooled

    def _run(self, conn: Connection | None, plan: Plan[T]) -> T:
        """Run a producer plan's statements on ``conn`` (or a pooled one) to its end."""
        with self._connection(conn) as c:
            return self._runner.run(c, plan)

    def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        conn: Connection | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> JobRecord:
        """Insert one job and return its row.

        ``options`` (see :class:`dispatcher.EnqueueOptions`): ``priority`` (lower runs
        first), ``run_at`` (an aware datetime, or a timedelta from the database's now()),
        ``max_attempts`` and ``timeout`` (default: the executor's), ``unique_key`` (if a
        pending or processing job of the type has that key, that job is returned with
        ``duplicate=True`` and nothing is inserted; race-free), ``cache_ttl`` (seconds;
        needs ``unique_key``: a job of the type with that key that completed within the
        TTL is returned instead, ``cached=True`` with its result), ``depends_on`` (ids
        of jobs to wait for: the job is ``waiting`` until all of them completed, and
        ends failed, or cancelled with ``on_dependency_failure="cancel"``, when one of
        them fails or is cancelled; InvalidJob if one does not exist). Raises QueueFull
        when the type has a ``max_pending`` and its queue is full.
        """
        return self._run(conn, enqueue_plan(new_job_values(type, payload, **options)))

    def enqueue_many(
        self,
        type: str,
        payloads: Iterable[Any],
        *,
        conn: Connection | None = None,
        **options: Unpack[BulkOptions],
    ) -> list[int]:
        """Insert one job of ``type`` per payload; return their ids in payload order.

        Written with COPY: two statements whatever the count. ``options`` (see
        :class:`dispatcher.BulkOptions`) apply to every job; with ``unique_keys`` (one
        per payload), jobs whose key is already active are not inserted and the existing
        job's id is returned in their place.
        """
        return self._run(conn, enqueue_many_plan(prepare_bulk(type, payloads, **options)))

    def enqueue_graph(
        self, nodes: Mapping[str, Mapping[str, Any]], *, conn: Connection | None = None
    ) -> dict[str, int]:
        """Insert a small graph of jobs in one statement; return {node name: job id}.

        ``nodes`` maps names to jobs: ``type``, ``payload``, ``depends_on`` (names of
        other nodes and ids of existing jobs) and any enqueue option but
        ``unique_key`` and ``cache_ttl``, e.g. ``{"fetch": {"type": "image.fetch"},
        "resize": {"type": "image.resize", "depends_on": ["fetch"]}}``. All of them or
        none are inserted; a cycle or an unknown name raises InvalidJob first. See
        :mod:`dispatcher.producers.graphs`.
        """
        return self._run(conn, enqueue_graph_plan(prepare_graph(nodes)))

    def get(self, job_id: int, *, conn: Connection | None = None) -> JobRecord:
        """The job's current row; JobNotFound if there is none."""
        return self._run(conn, get_plan(job_id))

    def cancel(self, job_id: int, *, conn: Connection | None = None) -> JobRecord:
        """Cancel a job: a pending one at once; a processing one is flagged and its
        owner stops it within about a second (the returned row shows
        ``cancel_requested``). InvalidTransition if it already finished."""
        return self._run(conn, cancel_plan(job_id))

    def retry(self, job_id: int, *, conn: Connection | None = None) -> JobRecord:
        """Put a failed or cancelled job back to pending, due now.

        InvalidTransition unless the job is failed or cancelled."""
        return self._run(conn, retry_plan(job_id))

    def list_jobs(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
        conn: Connection | None = None,
    ) -> list[JobRecord]:
        """Jobs newest first, optionally filtered by ``status`` and ``type``.

        Page with ``before_id``: pass the last id of the previous page.
        """
        return self._run(conn, list_jobs_plan(status, type, before_id, limit))

    def cluster_status(
        self, *, alive_within: float = 30.0, conn: Connection | None = None
    ) -> ClusterStatus:
        """The leader lease, registered replicas and queue depth per type."""
        return self._run(conn, cluster_status_plan(alive_within))

    def retry_many(
        self, *, status: str = "failed", type: str | None = None, conn: Connection | None = None
    ) -> int:
        """Retry every ``failed`` (or ``cancelled``) job, optionally only of ``type``;
        returns how many went back to pending."""
        return self._run(conn, retry_many_plan(status, type))

    def pause(self, type: str, *, conn: Connection | None = None) -> JobType:
        """Stop claiming ``type`` across the cluster (running jobs finish)."""
        return self._run(conn, set_paused_plan(type, True))

    def resume(self, type: str, *, conn: Connection | None = None) -> JobType:
        """Claim ``type`` again."""
        return self._run(conn, set_paused_plan(type, False))

    def job_types(self, *, conn: Connection | None = None) -> list[JobType]:
        """Types with cluster-wide controls (paused, max_pending) and their state."""
        return self._run(conn, job_types_plan())
