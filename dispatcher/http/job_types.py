"""Job type routes: the cluster-wide controls of each type (paused, max_pending) and
pausing and resuming its claiming. Guarded by the bearer token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel

from dispatcher.core.records import MAX_TYPE_LENGTH
from dispatcher.http.dependencies import ClientDep, require_token
from dispatcher.http.errors import GUARDED_RESPONSES

TypeName = Annotated[str, Path(min_length=1, max_length=MAX_TYPE_LENGTH)]

router = APIRouter(
    tags=["types"], dependencies=[Depends(require_token)], responses=GUARDED_RESPONSES
)


class JobTypeOut(BaseModel):
    type: str
    paused: bool
    max_pending: int | None
    accepting: bool
    pending: int | None


@router.get("/types", response_model=list[JobTypeOut])
async def job_types(client: ClientDep) -> Any:
    """Types with cluster-wide controls: paused, max_pending and whether their
    queue accepts jobs."""
    return [vars(t) for t in await client.job_types()]


@router.post("/types/{type}/pause", response_model=JobTypeOut)
async def pause(type: TypeName, client: ClientDep) -> Any:
    """Stop claiming the type across the cluster (within a second); running jobs
    finish. Survives leader changes."""
    return vars(await client.pause(type))


@router.post("/types/{type}/resume", response_model=JobTypeOut)
async def resume(type: TypeName, client: ClientDep) -> Any:
    """Claim the type again."""
    return vars(await client.resume(type))
