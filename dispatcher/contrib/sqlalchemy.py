"""Enqueue inside a SQLAlchemy transaction: the job commits or rolls back with it.

Install with ``pip install 'dispatcher[sqlalchemy]'``. Sync code passes a
``Session`` or ``Connection`` of an engine on the psycopg 3 driver
(``postgresql+psycopg://``); asyncio code an ``AsyncSession`` or ``AsyncConnection``
of an engine on asyncpg (``postgresql+asyncpg://``)::

    with Session(engine) as session, session.begin():
        session.add(Order(id=7))
        enqueue(session, "order.ship", {"order": 7})

The statements run on the driver connection under the session (the same plans as
:class:`dispatcher.Client` and :class:`dispatcher.AsyncClient`, so the same checks,
errors and results), inside the session's transaction: begun first if it was not.
Under an engine in ``AUTOCOMMIT`` isolation the job commits at once, like every
statement there.

A refusal: ``InvalidJob`` for a bad job and ``QueueFull`` leave the transaction as
it was (nothing failed in the database); a job the database itself refuses (a
``depends_on`` id with no job) raises ``InvalidJob`` from a failed statement, and
Postgres then refuses everything until the transaction rolls back, as after any
failed statement. To carry on after such a refusal, enqueue inside a savepoint
(``session.begin_nested()``) and roll back only that.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Unpack

import asyncpg
import psycopg
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from dispatcher.core.records import BulkOptions, EnqueueOptions, JobRecord, new_job_values
from dispatcher.core.schema import DEFAULT_SCHEMA
from dispatcher.producers.graphs import enqueue_graph_plan, prepare_graph
from dispatcher.producers.plans import enqueue_many_plan, enqueue_plan, prepare_bulk
from dispatcher.producers.runners import AsyncpgRunner, PsycopgRunner

__all__ = [
    "enqueue",
    "enqueue_async",
    "enqueue_graph",
    "enqueue_graph_async",
    "enqueue_many",
    "enqueue_many_async",
]

SyncBind = Session | Connection
AsyncBind = AsyncSession | AsyncConnection


def enqueue(
    bind: SyncBind,
    type: str,
    payload: Any = None,
    *,
    schema: str = DEFAULT_SCHEMA,
    **options: Unpack[EnqueueOptions],
) -> JobRecord:
    """Insert one job in ``bind``'s transaction (a ``Session`` or ``Connection`` on
    psycopg 3) and return its row.

    ``schema`` names the dispatcher installation; ``options`` are those of
    :meth:`dispatcher.Client.enqueue` (priority, run_at, unique_key, depends_on, ...),
    with its results and errors.
    """
    job = new_job_values(type, payload, **options)
    return _psycopg_runner(schema).run(_psycopg_connection(bind), enqueue_plan(job))


def enqueue_many(
    bind: SyncBind,
    type: str,
    payloads: Iterable[Any],
    *,
    schema: str = DEFAULT_SCHEMA,
    **options: Unpack[BulkOptions],
) -> list[int]:
    """Insert one job of ``type`` per payload in ``bind``'s transaction, with COPY;
    return their ids in payload order. See :meth:`dispatcher.Client.enqueue_many`."""
    bulk = prepare_bulk(type, payloads, **options)
    return _psycopg_runner(schema).run(_psycopg_connection(bind), enqueue_many_plan(bulk))


def enqueue_graph(
    bind: SyncBind, nodes: Mapping[str, Mapping[str, Any]], *, schema: str = DEFAULT_SCHEMA
) -> dict[str, int]:
    """Insert a small graph of jobs in ``bind``'s transaction; return {node name: job
    id}. See :meth:`dispatcher.Client.enqueue_graph`."""
    graph = prepare_graph(nodes)
    return _psycopg_runner(schema).run(_psycopg_connection(bind), enqueue_graph_plan(graph))


async def enqueue_async(
    bind: AsyncBind,
    type: str,
    payload: Any = None,
    *,
    schema: str = DEFAULT_SCHEMA,
    **options: Unpack[EnqueueOptions],
) -> JobRecord:
    """Insert one job in ``bind``'s transaction (an ``AsyncSession`` or
    ``AsyncConnection`` on asyncpg) and return its row; see :func:`enqueue`."""
    job = new_job_values(type, payload, **options)
    conn = await _asyncpg_connection(bind)
    return await _asyncpg_runner(schema).run(conn, enqueue_plan(job))


async def enqueue_many_async(
    bind: AsyncBind,
    type: str,
    payloads: Iterable[Any],
    *,
    schema: str = DEFAULT_SCHEMA,
    **options: Unpack[BulkOptions],
) -> list[int]:
    """Insert one job of ``type`` per payload in ``bind``'s transaction, with binary
    COPY; return their ids in payload order. See :func:`enqueue_many`."""
    bulk = prepare_bulk(type, payloads, **options)
    conn = await _asyncpg_connection(bind)
    return await _asyncpg_runner(schema).run(conn, enqueue_many_plan(bulk))


async def enqueue_graph_async(
    bind: AsyncBind, nodes: Mapping[str, Mapping[str, Any]], *, schema: str = DEFAULT_SCHEMA
) -> dict[str, int]:
    """Insert a small graph of jobs in ``bind``'s transaction; return {node name: job
    id}. See :meth:`dispatcher.Client.enqueue_graph`."""
    graph = prepare_graph(nodes)
    conn = await _asyncpg_connection(bind)
    return await _asyncpg_runner(schema).run(conn, enqueue_graph_plan(graph))


# --- the driver connection under the session ------------------------------------------


def _psycopg_connection(bind: SyncBind) -> psycopg.Connection[Any]:
    """The psycopg connection under ``bind``, its SQLAlchemy transaction begun.

    psycopg itself sends BEGIN before the first statement on a connection out of
    autocommit, ours included; SQLAlchemy's commit and rollback end that transaction.
    But SQLAlchemy must know it has one: a ``Connection`` that never began would make
    its ``commit()`` a no-op and leave the job to die with the connection.
    """
    if isinstance(bind, Session):
        connection = bind.connection()  # begins the session's transaction
    elif isinstance(bind, Connection):
        connection = bind
        if not connection.in_transaction():
            connection.begin()  # what its first execute() would do (autobegin)
    else:
        raise _not_supported(bind, "a Session or Connection")
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise _not_supported(bind, "a Session or Connection", connection.dialect)
    return driver


async def _asyncpg_connection(bind: AsyncBind) -> asyncpg.Connection:
    """The asyncpg connection under ``bind``, in the session's transaction.

    SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the first statement it runs
    itself, not when the session's transaction begins: a statement sent straight to
    asyncpg before that would run in autocommit and outlive a rollback. So unless the
    connection is in a transaction already, one statement goes through SQLAlchemy first
    (under ``AUTOCOMMIT`` isolation it begins nothing, as the user asked).
    """
    if isinstance(bind, AsyncSession):
        connection = await bind.connection()  # begins the session's transaction
    elif isinstance(bind, AsyncConnection):
        connection = bind
        if not connection.in_transaction():
            await connection.begin()
    else:
        raise _not_supported(bind, "an AsyncSession or AsyncConnection")
    driver = (await connection.get_raw_connection()).driver_connection
    if not isinstance(driver, asyncpg.Connection):
        raise _not_supported(bind, "an AsyncSession or AsyncConnection", connection.dialect)
    if not driver.is_in_transaction():
        await connection.exec_driver_sql("SELECT 1")
    return driver


def _not_supported(bind: object, kinds: str, dialect: Any = None) -> TypeError:
    engine = f" on {dialect.name}+{dialect.driver}" if dialect is not None else ""
    return TypeError(
        f"dispatcher.contrib.sqlalchemy cannot enqueue through {type(bind).__name__}{engine}: "
        f"it takes {kinds} of an engine on psycopg 3 (sync: create_engine("
        '"postgresql+psycopg://...")) or on asyncpg (asyncio: create_async_engine('
        '"postgresql+asyncpg://...")), with enqueue() and enqueue_async() respectively'
    )


@functools.lru_cache(maxsize=32)
def _psycopg_runner(schema: str) -> PsycopgRunner:
    # prepare=None: the engine's connection decides (psycopg's prepare_threshold).
    return PsycopgRunner(schema)


@functools.lru_cache(maxsize=32)
def _asyncpg_runner(schema: str) -> AsyncpgRunner:
    # SQLAlchemy's asyncpg dialect installs json and jsonb codecs that decode to Python.
    return AsyncpgRunner(schema, decodes_json=True)
