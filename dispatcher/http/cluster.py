"""Cluster routes: this replica and the cluster as the database sees it (leader lease,
queue depth per type, registered replicas). Guarded by the bearer token."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends

from dispatcher.http.dependencies import ClientDep, ReplicaDep, SettingsDep, require_token
from dispatcher.http.errors import GUARDED_RESPONSES

router = APIRouter(
    tags=["cluster"], dependencies=[Depends(require_token)], responses=GUARDED_RESPONSES
)


@router.get("/status")
async def status(replica: ReplicaDep, settings: SettingsDep, client: ClientDep) -> dict[str, Any]:
    """This replica (role, term, running jobs, limits) and the cluster as the
    database sees it (leader lease, queue depth per type)."""
    cluster = await client.cluster_status(alive_within=settings.alive_within)
    leader = cluster.leader
    return {
        "replica": replica.owner_id,
        "name": settings.replica_id,
        "role": replica.role,
        "term": replica.term,
        "version": replica.version,
        "uptime_seconds": round(time.monotonic() - replica.started_at, 1),
        # false: poll-only (DISPATCHER_LISTEN), wake-ups wait for the poll tick.
        "listen": settings.listen,
        "prepared_statements": settings.prepared_statements,
        "leader": None
        if leader is None
        else {
            "id": leader["holder"],
            "term": leader["term"],
            "lease_until": leader["lease_until"].isoformat(),
            "lease_current": leader["lease_current"],
        },
        "running": replica.running_by_type(),
        "limits": replica.limits(),
        "queue": {
            type_: {
                "ready": depth.ready,
                "scheduled": depth.scheduled,
                "processing": depth.processing,
                "oldest_ready_age_seconds": round(depth.oldest_ready_age, 3),
            }
            for type_, depth in cluster.queues.items()
        },
        **replica.status_extras(),
    }


@router.get("/replicas")
async def replicas(settings: SettingsDep, client: ClientDep) -> list[dict[str, Any]]:
    """Registered replicas, with whether each was seen recently."""
    cluster = await client.cluster_status(alive_within=settings.alive_within)
    return [
        {
            **row,
            "started_at": row["started_at"].isoformat(),
            "last_seen": row["last_seen"].isoformat(),
        }
        for row in cluster.replicas
    ]
