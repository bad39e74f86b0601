"""Fixtures of the tests that run real replica processes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.support.chaos_app import ATTEMPTS_LOG
from tests.support.database import TestDatabase
from tests.support.processes import ReplicaProcess, start_replicas

StartChaosReplicas = Callable[[TestDatabase, dict[str, str]], Awaitable[None]]


@pytest.fixture
def replicas() -> Iterator[list[ReplicaProcess]]:
    """Replica processes a test started; stopped (SIGTERM, then SIGKILL) afterwards."""
    started: list[ReplicaProcess] = []
    yield started
    for replica in started:
        replica.stop()


@pytest.fixture
def start_chaos_replicas(replicas: list[ReplicaProcess], tmp_path: Path) -> StartChaosReplicas:
    """``await start(db, env)``: the attempts log in db's schema, then replicas r0 and r1
    of tests.support.chaos_app on it (added to ``replicas``), healthy."""

    async def start(db: TestDatabase, env: dict[str, str]) -> None:
        conn = await db.connect()
        try:
            await conn.execute(ATTEMPTS_LOG.format(schema=f'"{db.schema}"'))
        finally:
            await conn.close()
        env = {**env, "DISPATCHER_DSN": db.dsn, "DISPATCHER_SCHEMA": db.schema}
        await start_replicas(
            "tests.support.chaos_app:app", ("r0", "r1"), env=env, log_dir=tmp_path, into=replicas
        )

    return start
