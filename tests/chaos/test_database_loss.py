"""A replica that cannot reach the database stops its own jobs before the reaper's
retry could run beside them; when the database returns, nothing is lost.

With its replica session (the default) it stops its async jobs the moment that
session ends (the server's shutdown closes it); without one, when its job heartbeats
have failed for the give-up time."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from dispatcher.core.config import load_settings
from dispatcher.runtime import Runtime
from dispatcher.services.executor import CancelReason
from tests.support.apps import make_app, seen
from tests.support.database import migrated_schema
from tests.support.private_postgres import private_postgres
from tests.support.runtimes import fast_env, held_attempt
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize(
    ("sessions", "reason", "error"),
    [
        ("true", CancelReason.SESSION_LOST, "abandoned: lost its database session"),
        ("false", CancelReason.DATABASE_LOST, "abandoned: lost contact with the database"),
    ],
)
async def test_jobs_are_abandoned_when_the_database_is_gone_and_retried_after(
    tmp_path: Path, sessions: str, reason: CancelReason, error: str
) -> None:
    seen.clear()
    with private_postgres(tmp_path / "pg") as server:
        dsn = server.dsn()
        schema = await migrated_schema(dsn)
        env = fast_env()
        settings, _ = load_settings(
            env={
                **env,
                "DISPATCHER_SCHEMA": schema,
                "DISPATCHER_STALE_AFTER": "3",
                "DISPATCHER_REPLICA_SESSIONS": sessions,
            }
        )
        runtime = Runtime(make_app(), settings, dsn=dsn)
        await runtime.start()
        try:
            conn = await asyncpg.connect(dsn)
            job_id = await conn.fetchval(
                f"INSERT INTO \"{schema}\".jobs (type) VALUES ('t.long_then_quick') RETURNING id"
            )
            await conn.close()
            attempt = await eventually(
                lambda: asyncio.sleep(0, held_attempt(runtime, job_id)),
                timeout=10,
                what="the job to start",
            )
            await asyncio.to_thread(server.stop, "fast")
            await eventually(
                lambda: asyncio.sleep(0, attempt.cancel_reason is reason),
                timeout=runtime.heartbeat.give_up_after + 3,
                what="the replica to abandon its job",
            )
            assert attempt.job.cancelled
            await asyncio.to_thread(server.start)

            async def completed() -> asyncpg.Record | None:
                try:
                    c = await asyncpg.connect(dsn)
                except OSError:
                    return None
                try:
                    row = await c.fetchrow(f'SELECT * FROM "{schema}".jobs WHERE id = $1', job_id)
                finally:
                    await c.close()
                return row if row["status"] == "completed" else None

            row = await eventually(completed, timeout=30, what="the retried job to complete")
        finally:
            await runtime.stop()
    assert [a for a, _ in seen[job_id]] == [1, 2]
    assert json.loads(row["result"]) == 2
    assert json.loads(row["errors"])[0]["error"].startswith(
        (error, "stale: owner stopped heartbeating")
    )
