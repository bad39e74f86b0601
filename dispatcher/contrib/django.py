"""Enqueue on Django's database connection: inside ``transaction.atomic()`` the job
commits or rolls back with the block.

Install with ``pip install 'dispatcher[django]'``; the database must use Django's
PostgreSQL backend on psycopg 3 (Django's choice whenever psycopg 3 is installed,
which dispatcher requires)::

    with transaction.atomic():
        order = Order.objects.create(id=7)
        enqueue("order.ship", {"order": order.id})

The statements run on the psycopg connection of ``django.db.connections[using]``
(the same plans as :class:`dispatcher.Client`, so the same checks, errors and
results). Inside ``atomic()`` they join its transaction, and a nested ``atomic()``'s
savepoint: rolling that back drops the job too. Outside any ``atomic()`` Django's
autocommit applies: the job commits at once.

A refusal: ``InvalidJob`` for a bad job and ``QueueFull`` leave the transaction as
it was (nothing failed in the database); a job the database itself refuses (a
``depends_on`` id with no job) raises ``InvalidJob`` from a failed statement, and
Postgres then refuses everything until the transaction rolls back. To carry on after
such a refusal, enqueue inside a nested ``transaction.atomic()`` and catch the error
outside it, as Django advises for any database error.

Django's ORM is synchronous: from async code, call these through
``asgiref.sync.sync_to_async`` (Django raises ``SynchronousOnlyOperation`` otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Unpack

import psycopg
from django.db import connections

from dispatcher.core.records import BulkOptions, EnqueueOptions, JobRecord, new_job_values
from dispatcher.core.schema import DEFAULT_SCHEMA
from dispatcher.producers.graphs import enqueue_graph_plan, prepare_graph
from dispatcher.producers.plans import enqueue_many_plan, enqueue_plan, prepare_bulk
from dispatcher.producers.runners import PsycopgRunner

__all__ = ["enqueue", "enqueue_graph", "enqueue_many"]


def enqueue(
    type: str,
    payload: Any = None,
    *,
    using: str = "default",
    schema: str = DEFAULT_SCHEMA,
    **options: Unpack[EnqueueOptions],
) -> JobRecord:
    """Insert one job on Django's ``using`` database, in the ``atomic()`` block if
    one is open, and return its row.

    ``schema`` names the dispatcher installation; ``options`` are those of
    :meth:`dispatcher.Client.enqueue` (priority, run_at, unique_key, depends_on, ...),
    with its results and errors.
    """
    job = new_job_values(type, payload, **options)
    return _runner(schema).run(_psycopg_connection(using), enqueue_plan(job))


def enqueue_many(
    type: str,
    payloads: Iterable[Any],
    *,
    using: str = "default",
    schema: str = DEFAULT_SCHEMA,
    **options: Unpack[BulkOptions],
) -> list[int]:
    """Insert one job of ``type`` per payload on Django's ``using`` database, with COPY;
    return their ids in payload order. See :meth:`dispatcher.Client.enqueue_many`.

    Outside ``atomic()`` its two statements commit one by one, like the client's: ids
    drawn for jobs that a failed COPY never wrote are simply skipped.
    """
    bulk = prepare_bulk(type, payloads, **options)
    return _runner(schema).run(_psycopg_connection(using), enqueue_many_plan(bulk))


def enqueue_graph(
    nodes: Mapping[str, Mapping[str, Any]],
    *,
    using: str = "default",
    schema: str = DEFAULT_SCHEMA,
) -> dict[str, int]:
    """Insert a small graph of jobs on Django's ``using`` database; return {node name:
    job id}. See :meth:`dispatcher.Client.enqueue_graph`."""
    graph = prepare_graph(nodes)
    return _runner(schema).run(_psycopg_connection(using), enqueue_graph_plan(graph))


def _psycopg_connection(using: str) -> psycopg.Connection[Any]:
    """The psycopg connection of Django's ``using`` database, connected.

    Django leaves psycopg out of autocommit inside ``atomic()`` (psycopg then sends
    BEGIN before the first statement, ours included, and Django's commit or rollback
    ends it) and sends its savepoints on this same connection, so the job needs nothing
    but the connection.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        raise _not_supported(using, f"its {connection.vendor} backend")
    connection.ensure_connection()  # also refuses to run on an event loop
    # What Django's own cursors check first: an error earlier in this atomic() block
    # was caught inside it, so the transaction can only roll back.
    connection.validate_no_broken_transaction()
    driver = connection.connection
    if not isinstance(driver, psycopg.Connection):
        raise _not_supported(using, f"a {type(driver).__module__} connection")
    return driver


def _not_supported(using: str, what: str) -> TypeError:
    return TypeError(
        f"dispatcher.contrib.django cannot enqueue on database {using!r} ({what}): it "
        "needs ENGINE 'django.db.backends.postgresql' on psycopg 3 (pip install "
        "'psycopg[binary]'; Django uses it whenever it is installed)"
    )


@functools.lru_cache(maxsize=32)
def _runner(schema: str) -> PsycopgRunner:
    # prepare=None: Django's connection decides (its prepare_threshold, off by default).
    return PsycopgRunner(schema)
