"""The jobs table as other services see it: plain SQL inserts, defaults, constraints,
and the statement-level NOTIFY."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support.database import TestDatabase


async def test_a_plain_sql_insert_gets_every_default(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        row = await conn.fetchrow(
            f"INSERT INTO \"{db.schema}\".jobs (type, payload) VALUES ('email.send', "
            """'{"to": "a@b.c"}') RETURNING *, now() AS inserted_at"""
        )
        assert row["id"] >= 1
        assert row["status"] == "pending"
        assert row["priority"] == 0
        assert row["run_at"] == row["inserted_at"] == row["created_at"]
        assert row["attempts"] == 0
        # NULL = the executor's setting, fixed on the row at claim time.
        assert row["max_attempts"] is None
        assert row["timeout"] is None
        assert row["unique_key"] is None
        for column in ("started_at", "finished_at", "heartbeat_at", "owner", "term"):
            assert row[column] is None, column
        assert row["progress"] is None and row["result"] is None and row["last_error"] is None
        assert row["errors"] == "[]"
        assert row["cancel_requested"] is False

        bare = await conn.fetchrow(
            f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('x') RETURNING payload"
        )
        assert bare["payload"] == "{}"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("columns", "values", "constraint"),
    [
        ("type", "''", "type_must_not_be_empty"),
        ("type", "'   '", "type_must_not_be_empty"),
        ("type, max_attempts", "'t', 0", "max_attempts_must_be_at_least_1"),
        ("type, status", "'t', 'running'", "status_must_be_pending_processing_completed_failed"),
        ("type, timeout", "'t', -5", "timeout_must_be_positive_seconds"),
        ("type, timeout", "'t', 'NaN'", "timeout_must_be_positive_seconds"),
        ("type, attempts", "'t', -1", "attempts_must_not_be_negative"),
        ("type, unique_key", "'t', ''", "unique_key_must_not_be_empty"),
        ("type, errors", "'t', '{}'", "errors_must_be_a_json_array"),
    ],
)
async def test_rows_that_can_never_run_are_refused_with_a_named_reason(
    db: TestDatabase, columns: str, values: str, constraint: str
) -> None:
    conn = await db.connect()
    try:
        with pytest.raises(asyncpg.CheckViolationError) as raised:
            await conn.execute(f'INSERT INTO "{db.schema}".jobs ({columns}) VALUES ({values})')
        assert constraint in str(raised.value)
    finally:
        await conn.close()


async def test_missing_type_is_refused(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        with pytest.raises(asyncpg.NotNullViolationError, match='"type"'):
            await conn.execute(f"INSERT INTO \"{db.schema}\".jobs (payload) VALUES ('{{}}')")
    finally:
        await conn.close()


async def test_bulk_insert_of_10000_rows_notifies_exactly_once(db: TestDatabase) -> None:
    listener = await db.connect()
    writer = await db.connect()
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            f"{db.schema}.jobs", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await writer.execute(
            f'INSERT INTO "{db.schema}".jobs (type, payload) '
            "SELECT 'bulk', jsonb_build_object('n', n) FROM generate_series(1, 10000) AS n"
        )
        # A marker insert in a later transaction: notifications arrive in commit order,
        # so once the marker's arrives, everything the bulk insert sent has too.
        await writer.execute(f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('marker')")
        first = await asyncio.wait_for(received.get(), timeout=10)
        marker = await asyncio.wait_for(received.get(), timeout=10)
        assert (first, marker) == ("", "")
        assert received.empty(), f"{received.qsize()} extra notifications"
        count = await writer.fetchval(
            f"SELECT count(*) FROM \"{db.schema}\".jobs WHERE type = 'bulk'"
        )
        assert count == 10000
    finally:
        await listener.close()
        await writer.close()


async def test_copy_notifies_once_too(db: TestDatabase) -> None:
    listener = await db.connect()
    writer = await db.connect()
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            f"{db.schema}.jobs", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await writer.copy_records_to_table(
            "jobs", schema_name=db.schema, columns=["type"], records=[("c",)] * 5000
        )
        await writer.execute(f"INSERT INTO \"{db.schema}\".jobs (type) VALUES ('marker')")
        await asyncio.wait_for(received.get(), timeout=10)
        await asyncio.wait_for(received.get(), timeout=10)
        assert received.empty()
    finally:
        await listener.close()
        await writer.close()


async def test_claim_and_reap_queries_use_their_partial_indexes(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        await conn.execute(
            f'INSERT INTO "{db.schema}".jobs (type, status, finished_at) '
            "SELECT 'done', 'completed', now() FROM generate_series(1, 20000)"
        )
        await conn.execute(
            f"INSERT INTO \"{db.schema}\".jobs (type) SELECT 'todo' FROM generate_series(1, 50)"
        )
        await conn.execute(f'ANALYZE "{db.schema}".jobs')
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN SELECT id FROM \"{db.schema}\".jobs WHERE status = 'pending' "
                "AND type = 'todo' AND run_at <= now() ORDER BY priority, run_at, id LIMIT 10"
            )
        )
        assert "jobs_pending_claim_idx" in plan, plan
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN SELECT id FROM \"{db.schema}\".jobs WHERE status = 'processing' "
                "AND heartbeat_at < now() - interval '30 seconds'"
            )
        )
        assert "jobs_processing_heartbeat_idx" in plan, plan
    finally:
        await conn.close()


async def test_one_active_job_per_type_and_unique_key(db: TestDatabase) -> None:
    conn = await db.connect()
    try:
        table = f'"{db.schema}".jobs'
        await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('t', 'k')")
        with pytest.raises(asyncpg.UniqueViolationError, match="jobs_unique_active_idx"):
            await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('t', 'k')")
        # Another type, or a finished job with the key, does not conflict.
        await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('other', 'k')")
        await conn.execute(f"UPDATE {table} SET status = 'completed' WHERE type = 't'")
        await conn.execute(f"INSERT INTO {table} (type, unique_key) VALUES ('t', 'k')")
    finally:
        await conn.close()
