"""The replica registry: who is alive, in which role.

Every replica upserts its row each heartbeat; the leader prunes rows unseen for a
while. A row's id is an *incarnation*: the replica name (the pod name by default)
plus pid plus a random suffix, new at every process start. It is also the owner
written on the leader row and on claimed jobs, so a pod restarted under the same
name never adopts, heartbeats or completes its predecessor's jobs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Callable

import asyncpg

from dispatcher.core.log import get_logger
from dispatcher.core.metrics import Metrics, Service
from dispatcher.core.queries import queries_for
from dispatcher.services.service_loop import run_every


def incarnation_id(name: str) -> str:
    """``<name>-<pid>-<6 hex>``: unique per process start."""
    return f"{name}-{os.getpid()}-{secrets.token_hex(3)}"


class ReplicaRegistry:
    """Heartbeats this replica's row; prunes stale rows while ``is_leader()``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        owner_id: str,
        name: str,
        version: str,
        role: Callable[[], str],
        job_types: list[str],
        is_leader: Callable[[], bool],
        interval: float,
        prune_after: float,
        metrics: Metrics,
    ) -> None:
        self._pool = pool
        self._queries = queries_for(schema)
        self._owner_id = owner_id
        self._name = name
        self._version = version
        self._role = role
        self._job_types = sorted(job_types)
        self._is_leader = is_leader
        self._interval = interval
        self._prune_after = prune_after
        self._metrics = metrics
        self._log = get_logger("replicas")

    async def run_once(self) -> list[str]:
        """Heartbeat our row; if leading, prune stale rows. Returns the pruned ids."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                self._queries["replica_heartbeat"],
                self._owner_id,
                self._name,
                socket.gethostname(),
                os.getpid(),
                self._version,
                self._role(),
                self._job_types,
            )
            if not self._is_leader():
                return []
            rows = await conn.fetch(self._queries["replicas_prune"], self._prune_after)
        pruned = [row["id"] for row in rows]
        if pruned:
            self._log.info("replicas_pruned", ids=pruned)
        return pruned

    async def run(self) -> None:
        await run_every(
            self.run_once,
            self._interval,
            service=Service.REPLICAS,
            metrics=self._metrics,
            log=self._log,
            failed="replica_heartbeat_failed",
        )

    async def remove(self) -> None:
        """Delete our row (graceful shutdown); best effort."""
        with contextlib.suppress(Exception):
            async with self._pool.acquire(timeout=5) as conn:
                await conn.execute(self._queries["replica_remove"], self._owner_id, timeout=5)
