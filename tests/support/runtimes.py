"""In-process replicas (Runtime) against a test's schema, stopped at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dispatcher.core.app import App
from dispatcher.core.config import load_settings
from dispatcher.runtime import Runtime
from dispatcher.services.executor import Attempt
from tests.support.database import TestDatabase

# Fast intervals so tests run in seconds; the defaults are tested in test_config.
FAST_SETTINGS = {
    "election_interval": "0.2",
    "heartbeat_interval": "0.5",
    "lease": "2",
    "poll_interval": "0.5",
    "stale_after": "3",
    "reaper_interval": "0.5",
    "shutdown_timeout": "5",
}


def fast_env(**overrides: str) -> dict[str, str]:
    """FAST_SETTINGS (and overrides) as the DISPATCHER_* variables of a real process."""
    return {f"DISPATCHER_{k.upper()}": v for k, v in {**FAST_SETTINGS, **overrides}.items()}


StartRuntime = Callable[..., Awaitable[Runtime]]


def held_attempt(runtime: Runtime, job_id: int) -> Attempt | None:
    """The newest attempt of job ``job_id`` the runtime holds, if any."""
    held = [a for a in runtime.slots.attempts() if a.job.id == job_id]
    return held[-1] if held else None


@pytest.fixture
async def start_runtime(db: TestDatabase) -> AsyncIterator[StartRuntime]:
    started: list[Runtime] = []

    async def start(app: App, name: str = "r", **overrides: Any) -> Runtime:
        values = {**FAST_SETTINGS, "schema": db.schema, "replica_id": name, **overrides}
        env = {f"DISPATCHER_{k.upper()}": str(v) for k, v in values.items()}
        settings, _ = load_settings(env=env)
        runtime = Runtime(app, settings, dsn=db.dsn)
        await runtime.start()
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        await runtime.stop()
