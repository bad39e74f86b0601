"""Run every due job of an app against a real database, in the calling process.

A test enqueues through its own code (a view, a service, a client), then drains: the
jobs are claimed by the worker-mode claim statement and their outcomes written by
the completer, as on a replica (limits, fencing, retries, dependencies and
all), with no election, no HTTP server and no background loop left behind. Rounds
repeat until a claim finds nothing due: jobs enqueued by executors, and dependents
released by a completion, are drained too.

Meant for a test database with no replica running on it: a replica's leader would
treat the drain's jobs as anyone's, and its claims would compete for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TypedDict, Unpack

import asyncpg

from dispatcher.core.app import App
from dispatcher.core.errors import DispatcherError
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.schema import DEFAULT_SCHEMA, validate_schema_name
from dispatcher.core.version import VERSION
from dispatcher.database.migrate import check_schema_current
from dispatcher.database.pool import create_pool
from dispatcher.services.claiming import WorkerClaims
from dispatcher.services.completer import Completer
from dispatcher.services.dependencies import DependencyResults
from dispatcher.services.dispatch import Dispatcher
from dispatcher.services.executor import CancelReason, Outcome, OutcomeKind, thread_pool
from dispatcher.services.replicas import incarnation_id
from dispatcher.services.slots import Slots
from dispatcher.services.wakeup import Wakeup


@dataclass(frozen=True)
class Drained:
    """How many attempts a drain ran, by how each ended.

    ``retried``: failed attempts that will run again (after their backoff, or in this
    drain with ``with_scheduled=True``); ``failed``: jobs failed for good.
    """

    completed: int = 0
    retried: int = 0
    snoozed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        """Attempts run."""
        return self.completed + self.retried + self.snoozed + self.failed + self.cancelled


def _only(app: App, types: Iterable[str] | None) -> App:
    """``app`` with only the executors of ``types`` (None: all of them)."""
    if types is None:
        return app
    wanted = sorted(set(types))
    unknown = [t for t in wanted if t not in app.executors]
    if unknown:
        registered = ", ".join(sorted(app.executors)) or "none"
        raise DispatcherError(
            f"drain: no executor registered for {', '.join(map(repr, unknown))}; "
            f"registered: {registered}"
        )
    narrowed = copy.copy(app)
    narrowed.executors = {t: app.executors[t] for t in wanted}
    return narrowed


@contextlib.asynccontextmanager
async def _pool(dsn_or_pool: str | asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    if isinstance(dsn_or_pool, str):
        pool = await create_pool(dsn_or_pool, min_size=1, max_size=4)
        try:
            yield pool
        finally:
            await pool.close()
    elif isinstance(dsn_or_pool, asyncpg.Pool):
        yield dsn_or_pool
    else:
        raise TypeError(
            f"drain needs a DSN string or an asyncpg pool, got {type(dsn_or_pool).__name__}"
        )


class DrainOptions(TypedDict, total=False):
    """What :func:`drain` runs, and for how long.

    ``schema``: the installation (default ``dispatcher``). ``types``: only these types
    (default: all of the app's). ``with_scheduled``: jobs due later (a future
    ``run_at``, a retry's backoff, a snooze) run now too, so a job that keeps failing
    runs all its attempts. ``recursive`` (default True): jobs enqueued while draining
    (by executors, or released by a dependency) run in the same drain; False hands
    them back unrun, attempt unspent: only those due when the drain began run.
    ``timeout`` (default 60): seconds before DispatcherError, e.g. for an executor
    that always snoozes under ``with_scheduled``.
    """

    schema: str
    types: Iterable[str] | None
    with_scheduled: bool
    recursive: bool
    timeout: float


async def drain_async(
    app: App, dsn_or_pool: str | asyncpg.Pool, **options: Unpack[DrainOptions]
) -> Drained:
    """:func:`drain` from async code, on a DSN or an asyncpg pool of the caller's."""
    schema = validate_schema_name(options.get("schema", DEFAULT_SCHEMA))
    app = _only(app, options.get("types"))
    if not app.executors:
        raise DispatcherError("drain: the app has no executors registered")
    async with _pool(dsn_or_pool) as pool:
        async with pool.acquire() as conn:
            # A schema never migrated (or behind) says so, not "relation does not exist".
            await check_schema_current(conn, schema)
        return await _Drain(app, pool, schema).run(
            with_scheduled=options.get("with_scheduled", False),
            recursive=options.get("recursive", True),
            timeout=options.get("timeout", 60.0),
        )


def drain(app: App, dsn: str, **options: Unpack[DrainOptions]) -> Drained:
    """Run every due job of ``app``'s types in the database at ``dsn`` until none is
    due, in this process, and return the attempts' outcomes counted
    (:class:`Drained`). ``options``: see :class:`DrainOptions`. From async code, use
    ``await drain_async(...)``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(drain_async(app, dsn, **options))
    raise DispatcherError(
        "drain() runs its own event loop and cannot be called from a running one; "
        "use `await drain_async(...)` in async tests"
    )


class _Drain:
    """One drain: a worker-mode claimer and completer of its own, registered as a
    replica (the worker claim is fenced on the claimer's replica row) while it runs."""

    def __init__(self, app: App, pool: asyncpg.Pool, schema: str) -> None:
        self._app = app
        self._pool = pool
        self._schema = schema
        self._queries = queries_for(schema)
        self._types = sorted(app.executors)
        self._owner = incarnation_id(f"drain-{socket.gethostname()}")
        self._outcomes: Counter[OutcomeKind] = Counter()

    async def run(self, *, with_scheduled: bool, recursive: bool, timeout: float) -> Drained:
        metrics = Metrics()
        slots = Slots(self._types, wakeup=Wakeup(), metrics=metrics)
        completer = Completer(self._pool, self._schema, self._owner, slots.release,
                              metrics=metrics)  # fmt: skip
        threads = thread_pool(self._app.limits().sync_threads)

        def deliver(outcome: Outcome) -> None:
            self._outcomes[outcome.kind] += 1
            completer.submit(outcome)

        dispatcher = Dispatcher(
            pool=self._pool,
            app=self._app,
            schema=self._schema,
            owner_id=self._owner,
            mode=WorkerClaims(self._app, self._queries, self._schema, lambda: True),
            slots=slots,
            wakeup=Wakeup(),
            deliver=deliver,
            threads=threads,
            metrics=metrics,
            dependencies=DependencyResults(self._pool, self._schema),
        )
        writing = asyncio.create_task(completer.run(), name="drain-completer")
        await self._register()
        try:
            async with asyncio.timeout(timeout):
                await self._rounds(dispatcher, slots, with_scheduled, recursive)
        except TimeoutError:
            raise DispatcherError(
                f"drain did not finish within {timeout:g}s ({sum(self._outcomes.values())} "
                "attempts run): an executor that never returns, or one that snoozes or "
                "enqueues forever?"
            ) from None
        finally:
            slots.cancel_all(CancelReason.SHUTDOWN)
            await slots.drain(5.0)
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
            threads.shutdown(wait=False)
            async with self._pool.acquire() as conn:
                await conn.execute(self._queries["replica_remove"], self._owner)
        counts = self._outcomes
        return Drained(
            completed=counts[OutcomeKind.COMPLETED],
            retried=counts[OutcomeKind.RETRY],
            snoozed=counts[OutcomeKind.SNOOZE],
            failed=counts[OutcomeKind.FAILED],
            cancelled=counts[OutcomeKind.CANCELLED],
        )

    async def _rounds(
        self, dispatcher: Dispatcher, slots: Slots, with_scheduled: bool, recursive: bool
    ) -> None:
        await dispatcher.refresh_paused()  # a paused type is not drained, as on a replica
        due_at_start: set[int] | None = None
        if with_scheduled:
            await self._make_scheduled_due()
        if not recursive:
            due_at_start = await self._due_job_ids()
        while True:
            if with_scheduled:
                await self._make_scheduled_due()
            dispatcher.cursors.forget()  # no insert notifications here: scan from the start
            await dispatcher.run_once()
            claimed = slots.attempts()
            if due_at_start is not None:
                # Enqueued while draining: handed back unrun, its attempt unspent.
                for attempt in claimed:
                    if attempt.job.id not in due_at_start:
                        attempt.cancel(CancelReason.SHUTDOWN)
                claimed = [a for a in claimed if a.job.id in due_at_start]
            if not slots:
                return
            # Written (and the slots freed) before the next claim sees the rows.
            await slots.drain(None)
            if not claimed:
                return

    async def _register(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                self._queries["replica_heartbeat"],
                self._owner,
                "drain",
                socket.gethostname(),
                os.getpid(),
                VERSION,
                "standby",
                self._types,
            )

    async def _make_scheduled_due(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(self._queries["testing_make_scheduled_due"], self._types)

    async def _due_job_ids(self) -> set[int]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._queries["testing_due_job_ids"], self._types)
        return {row["id"] for row in rows}
