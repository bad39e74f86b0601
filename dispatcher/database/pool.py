"""The runtime's connection pool: how a replica talks to PostgreSQL, through a
transaction pooler or not."""

from __future__ import annotations

from typing import Any

import asyncpg

from dispatcher.core.config import Settings
from dispatcher.core.errors import DispatcherError


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
    server_settings = {"application_name": "dispatcher"}
    options: dict[str, Any] = {"statement_cache_size": 0}
    if settings.prepared_statements:
        server_settings["plan_cache_mode"] = "force_custom_plan"
        options = {}
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=settings.pool_size,
            timeout=10,
            max_inactive_connection_lifetime=60,
            server_settings=server_settings,
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
