"""Migrations against a real Postgres: apply, re-apply, concurrent runs, refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import pytest

from dispatcher.core.errors import MigrationError, SchemaNotReady
from dispatcher.database.migrate import check_schema_current, known_migrations, migrate
from tests.support.database import PostgresServer


async def tables_of(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
    )
    return {r["table_name"] for r in rows}


async def test_migrate_on_an_empty_database_then_rerun_is_a_noop(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        lines: list[str] = []
        applied = await migrate(conn, unmigrated_schema, report=lines.append)
        assert [m.label for m in applied] == [m.label for m in known_migrations()]
        assert lines[0].startswith(f"applied 0001_initial to schema '{unmigrated_schema}'")
        assert lines[1].startswith("applied 0002_types_and_schedules to schema")
        assert lines[2].startswith("applied 0003_drop_pending_run_at_index to schema")
        assert await tables_of(conn, unmigrated_schema) == {
            "jobs",
            "leader",
            "replicas",
            "migrations",
            "job_types",
            "schedules",
            "schedule_runs",
            "queue_samples",
            "job_dependencies",
            "waiting_jobs",
        }
        await check_schema_current(conn, unmigrated_schema)

        again = await migrate(conn, unmigrated_schema, report=lines.append)
        assert again == []
        assert len(lines) == len(applied)
        assert await conn.fetchval(f'SELECT count(*) FROM "{unmigrated_schema}".leader') == 1
    finally:
        await conn.close()


def test_five_concurrent_migrate_processes_end_with_one_schema(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    env = {**os.environ, "DISPATCHER_DSN": postgres.dsn, "DISPATCHER_SCHEMA": unmigrated_schema}
    command = [sys.executable, "-m", "dispatcher.cli", "migrate"]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(5)
    ]
    results = [(p.wait(timeout=60), *p.communicate()) for p in processes]
    for code, out, err in results:
        assert code == 0, f"migrate exited {code}: {out} {err}"
    outputs = [out for _, out, _ in results]
    applied = [o for o in outputs if "applied 0001_initial" in o]
    up_to_date = [o for o in outputs if "is up to date" in o]
    assert len(applied) == 1, outputs
    assert len(up_to_date) == 4, outputs

    async def check() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await check_schema_current(conn, unmigrated_schema)
            count = await conn.fetchval(f'SELECT count(*) FROM "{unmigrated_schema}".migrations')
            assert count == len(known_migrations())
        finally:
            await conn.close()

    import asyncio

    asyncio.run(check())


async def test_a_database_migrated_by_newer_code_is_refused(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await migrate(conn, unmigrated_schema)
        await conn.execute(
            f'INSERT INTO "{unmigrated_schema}".migrations (version, name, checksum) '
            "VALUES (9999, 'from_the_future', 'x')"
        )
        with pytest.raises(MigrationError, match="at migration 9999, newer than this dispatcher"):
            await migrate(conn, unmigrated_schema)
        with pytest.raises(SchemaNotReady, match="upgrade dispatcher"):
            await check_schema_current(conn, unmigrated_schema)
    finally:
        await conn.close()


async def test_an_edited_migration_is_refused(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await migrate(conn, unmigrated_schema)
        await conn.execute(
            f"UPDATE \"{unmigrated_schema}\".migrations SET checksum = 'edited' WHERE version = 1"
        )
        with pytest.raises(MigrationError, match="0001_initial was changed after it was applied"):
            await migrate(conn, unmigrated_schema)
    finally:
        await conn.close()


async def test_readiness_check_says_to_migrate(
    postgres: PostgresServer, unmigrated_schema: str
) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        with pytest.raises(SchemaNotReady, match="not migrated: run `dispatcher migrate`"):
            await check_schema_current(conn, unmigrated_schema)
    finally:
        await conn.close()


def test_cli_migrate_reports_a_bad_setting_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "migrate"],
        env={**os.environ, "DISPATCHER_SCHEMA": "Not Valid"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "config error: DISPATCHER_SCHEMA: schema name 'Not Valid' is invalid" in result.stderr
