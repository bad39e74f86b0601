"""The test database types and helpers (the fixtures live in tests/conftest.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg


@dataclass(frozen=True)
class PostgresServer:
    """The session's server: an admin DSN and where it came from."""

    dsn: str
    source: str
    # Set for a server this test session started itself (embedded); tests that stop
    # or restart Postgres must use a private one (see tests/support/private_postgres.py).
    embedded_home: Path | None = None


@dataclass(frozen=True)
class TestDatabase:
    """A migrated schema of its own for one test."""

    __test__ = False  # not a test class, despite the name

    dsn: str
    schema: str

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    @property
    def jobs(self) -> str:
        """The jobs table, quoted, for test SQL."""
        return f'"{self.schema}".jobs'


async def register_owner(conn: asyncpg.Connection, schema: str, owner: str) -> None:
    """A replica row for ``owner``: claims are fenced by their owner's replica row, so
    a test that claims with plain SQL registers its owner first (as a runtime does)."""
    from dispatcher.core.queries import queries_for

    await conn.execute(
        queries_for(schema)["replica_heartbeat"], owner, owner, "test", 0, "test", "standby", []
    )


def new_schema_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


async def migrated_schema(dsn: str) -> str:
    """A new schema on the server at ``dsn``, migrated; its name."""
    from dispatcher.database.migrate import migrate

    schema = new_schema_name()
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema)
    finally:
        await conn.close()
    return schema


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
