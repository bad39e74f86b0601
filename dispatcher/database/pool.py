"""The runtime's connection pool: how a replica talks to PostgreSQL, through a
transaction pooler or not."""

from __future__ import annotations

import inspect
from typing import Any

import asyncpg
import asyncpg.pool

from dispatcher.core.cancellation import raise_if_cancel_requested
from dispatcher.core.config import Settings
from dispatcher.core.errors import DispatcherError

# The cycle pool's connections: the claim loop and the completer hold at most one each.
CYCLE_POOL_SIZE = 2
# How the cycle pool's sessions plan (see cycle_pool): once per statement, with no
# sequential scan and no nested loop unless nothing else can run the statement. No JIT:
# before PostgreSQL 16 such a forced node costs 10^10, which set JIT compiling on every
# run (1.4 s a claim on PostgreSQL 15).
CYCLE_PLANNING = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_nestloop": "off",
    "jit": "off",
}


class Pool(asyncpg.pool.Pool):  # type: ignore[misc]  # asyncpg ships no types
    """asyncpg's pool, through which a cancellation always arrives.

    A task cancelled while its connection is being lost can see ``release()`` raise
    InternalClientError ("called on a free connection holder": the lost connection's
    cleanup freed the holder first). Raised in ``async with pool.acquire()``'s exit, it
    replaces the CancelledError in flight, and a loop that catches Exception runs on
    though it was told to stop (seen: a deposed leader's claim loop kept claiming and
    its step-down, waiting for it, never ended). With asyncpg 0.32, racing cancellations
    against pg_terminate_backend lost one in six that way on a busy machine, none on a
    quiet one. Here that error becomes the cancellation it hid
    (tests/integration/test_lost_cancellations.py injects it where asyncpg raised it).
    """

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        try:
            await super().release(connection, timeout=timeout)
        except Exception:
            raise_if_cancel_requested()  # the error it raised stays as its __context__
            raise


def _create_pool_defaults() -> dict[str, Any]:
    """What asyncpg.create_pool passes to its Pool when not told (it takes no pool
    class, so ours is built directly), read from its signature: whatever this asyncpg
    version's defaults are."""
    parameters = inspect.signature(asyncpg.create_pool).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}


async def create_pool(dsn: str, **options: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool(dsn, **options)``, as a :class:`Pool`."""
    pool: asyncpg.Pool = await Pool(dsn, **{**_create_pool_defaults(), **options})
    return pool


async def runtime_pool(dsn: str, settings: Settings) -> asyncpg.Pool:
    """The runtime pool, with or without prepared statements (``prepared_statements``).

    With them (the default) asyncpg names and caches every statement, so each is parsed
    once per connection. The batch statements take arrays (unnest, = ANY) whose size a
    cached generic plan cannot know: after five runs Postgres switched to one that
    scanned a thousand-row batch 20x slower, so these sessions plan every run
    (plan_cache_mode, a fraction of a millisecond per batch).

    Without them, for PgBouncer in transaction mode (before 1.21 it cannot carry a named
    statement from one transaction to the next, and no version accepts a startup
    parameter it does not know, such as plan_cache_mode): statement_cache_size=0 makes
    asyncpg (0.29+) use the unnamed statement and send its Parse again with Bind,
    Execute and Sync, so one server connection runs the whole statement whichever one
    PgBouncer hands out after the Describe. Each unnamed statement is executed once,
    and Postgres plans a statement's first five executions with their parameters (a
    custom plan): plan_cache_mode is moot there (measured: docs/operations.md).
    """
    if settings.prepared_statements:
        return await _pool(dsn, settings.pool_size, {"plan_cache_mode": "force_custom_plan"})
    return await _pool(dsn, settings.pool_size, {}, statement_cache_size=0)


async def cycle_pool(dsn: str, settings: Settings) -> asyncpg.Pool | None:
    """The pool of a slot's cycle when statements are prepared: the leader's claims of
    unkeyed types, the outcomes, and the two in one statement (complete_and_claim_jobs);
    None without prepared statements (the runtime pool serves them then).

    Planning was about half of their server time: complete_and_claim_jobs for 16 jobs
    planned in 1.7 ms and ran in 1.8, where a raw-SQL cycle's statement planned in 0.5
    and ran in 1.5 (pg_stat_statements over a burn-down). Here each is planned once per
    connection, for any parameters. A plan made once is made on the statistics of that
    moment, often a queue's least typical (a new table, a drained queue), so these
    sessions forbid what such statistics make look cheap: a sequential scan of jobs,
    and a nested loop that rescans the batch per row of jobs (both only stay where
    nothing else can run a statement: a lateral probe, a one-row table). The statements
    find rows by id and scan the claim index from where their parameters say, so no
    plan left to choose reads more than its batch; tests/integration/test_cycle_plans.py
    checks their plans made on an empty, an analyzed-empty, a full and a mostly finished
    table.
    """
    if not settings.prepared_statements:
        return None
    return await _pool(dsn, CYCLE_POOL_SIZE, CYCLE_PLANNING)


async def _pool(dsn: str, max_size: int, planning: dict[str, str], **options: Any) -> asyncpg.Pool:
    try:
        pool = await create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            timeout=10,
            max_inactive_connection_lifetime=60,
            server_settings={"application_name": "dispatcher", **planning},
            reset=_keep_session,
            **options,
        )
    except asyncpg.ProtocolViolationError as exc:
        # PgBouncer's answer to a startup parameter it does not pass on.
        if "startup parameter" not in str(exc):
            raise
        raise DispatcherError(
            f"the database refused a startup parameter ({exc}): DISPATCHER_DSN goes "
            "through a pooler such as PgBouncer; set DISPATCHER_PREPARED_STATEMENTS=false"
        ) from None
    return pool


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset: none. asyncpg's default sends RESET ALL, UNLISTEN *, ... on every
    release, a round trip per statement on the hot path; our pool connections never
    change session state (LISTEN and session locks live on the notifier's own
    connection), and asyncpg still rolls back a transaction left open."""
