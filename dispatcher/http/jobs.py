"""Job routes: enqueue, list, get, cancel and retry, one job or every failed one.
Guarded by the bearer token.

Bad requests get a 4xx naming the field: unknown fields, wrong types, values out of
range, a payload over DISPATCHER_MAX_PAYLOAD_BYTES.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, Strict

from dispatcher.core import tracing
from dispatcher.core.errors import InvalidJob
from dispatcher.core.records import (
    MAX_ATTEMPTS,
    MAX_DEPENDENCIES,
    MAX_TYPE_LENGTH,
    JobRecord,
    JobStatus,
    options_of,
)
from dispatcher.http.dependencies import ClientDep, SettingsDep, require_token
from dispatcher.http.errors import GUARDED_RESPONSES, Problem
from dispatcher.producers.plans import MAX_PAGE

BIGINT_MAX = 2**63 - 1

StrictInt = Annotated[int, Strict()]
StrictNumber = Annotated[float, Strict()]
JobId = Annotated[int, Path(ge=1, le=BIGINT_MAX, description="job id")]
TypeFilter = Annotated[str | None, Query(min_length=1, max_length=MAX_TYPE_LENGTH)]

router = APIRouter(
    tags=["jobs"], dependencies=[Depends(require_token)], responses=GUARDED_RESPONSES
)


class EnqueueRequest(BaseModel):
    """A job to enqueue. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=MAX_TYPE_LENGTH, description="job type")
    payload: Any = Field(default_factory=dict, description="any JSON value (default {})")
    priority: StrictInt = Field(0, ge=-32768, le=32767, description="lower runs first")
    run_at: AwareDatetime | None = Field(None, description="when to run (with a timezone)")
    delay: StrictNumber | None = Field(
        None, ge=0, le=10 * 365 * 86400, description="seconds from now (database clock)"
    )
    max_attempts: StrictInt | None = Field(None, ge=1, le=MAX_ATTEMPTS)
    timeout: StrictNumber | None = Field(None, gt=0, le=365 * 86400, description="seconds")
    unique_key: str | None = Field(None, min_length=1, max_length=1000)
    concurrency_key: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="jobs of the type with the same key run at most key_concurrency at once",
    )
    cache_ttl: StrictNumber | None = Field(
        None,
        gt=0,
        le=365 * 86400,
        description="seconds: return a job of this type and unique_key that completed "
        "within them (200, with its result) instead of running it again",
    )
    depends_on: list[Annotated[StrictInt, Field(ge=1, le=BIGINT_MAX)]] | None = Field(
        None,
        max_length=MAX_DEPENDENCIES,
        description="ids of jobs to wait for: it runs once all of them completed "
        "(status waiting until then) and ends when one of them fails or is cancelled",
    )
    on_dependency_failure: Literal["fail", "cancel"] | None = Field(
        None, description="what it becomes when a dependency fails or is cancelled"
    )


class BulkRetry(BaseModel):
    retried: int


class JobPage(BaseModel):
    jobs: list[JobRecord]
    next_before_id: int | None = Field(
        None, description="pass as before_id for the next page; null on the last page"
    )


class DuplicateJob(BaseModel):
    detail: str
    job: JobRecord


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobRecord,
    responses={
        200: {"model": JobRecord, "description": "a cached result (cache_ttl)"},
        409: {"model": DuplicateJob, "description": "an active job has this unique_key"},
        413: {"model": Problem},
        422: {"description": "invalid job"},
        429: {"model": Problem, "description": "the type's queue is full (max_pending)"},
    },
)
async def enqueue(
    body: EnqueueRequest, settings: SettingsDep, client: ClientDep, request: Request
) -> Any:
    """Enqueue a job. 409 (with the existing job) if an active job of the same type
    has its unique_key; 200 with a completed job when cache_ttl finds one; 429 with
    Retry-After when the type's queue is full."""
    payload_bytes = len(_json_bytes(body.payload))
    if payload_bytes > settings.max_payload_bytes:
        raise HTTPException(
            413,
            f"payload is {payload_bytes} bytes, over the limit of "
            f"{settings.max_payload_bytes} (DISPATCHER_MAX_PAYLOAD_BYTES)",
        )
    if body.run_at is not None and body.delay is not None:
        raise InvalidJob("give run_at or delay, not both")
    run_at: dt.datetime | dt.timedelta | None = body.run_at
    if body.delay is not None:
        run_at = dt.timedelta(seconds=body.delay)
    # A W3C traceparent header (with tracestate) puts the job in its caller's trace.
    incoming = tracing.incoming(request.headers) if settings.otel != "false" else tracing.NOTHING
    with incoming:
        job = await client.enqueue(body.type, body.payload, **options_of(body, run_at=run_at))
    if job.cached:
        return JSONResponse(_job(job), status_code=200)
    if job.duplicate:
        return JSONResponse(
            {
                "detail": f"an active {job.type!r} job already has unique_key {job.unique_key!r}",
                "job": _job(job),
            },
            status_code=409,
        )
    return JSONResponse(_job(job), status_code=201)


@router.get("/jobs", response_model=JobPage)
async def list_jobs(
    client: ClientDep,
    status: JobStatus | None = None,
    type: TypeFilter = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    before_id: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
) -> Any:
    """Jobs newest first, filtered by status and type; page with before_id."""
    jobs = await client.list_jobs(
        status=status.value if status else None, type=type, before_id=before_id, limit=limit
    )
    next_before = jobs[-1].id if len(jobs) == limit else None
    return JSONResponse({"jobs": [_job(j) for j in jobs], "next_before_id": next_before})


@router.post("/jobs/retry", response_model=BulkRetry, responses={422: {"model": Problem}})
async def retry_jobs(
    client: ClientDep,
    status: Annotated[str, Query(pattern="^(failed|cancelled)$")] = "failed",
    type: TypeFilter = None,
) -> Any:
    """Retry every failed (or cancelled) job, optionally only of one type: the
    dead-letter queue, back to pending."""
    return {"retried": await client.retry_many(status=status, type=type)}


@router.get("/jobs/{job_id}", response_model=JobRecord, responses={404: {"model": Problem}})
async def get_job(job_id: JobId, client: ClientDep) -> Any:
    """One job, with progress, result and error history."""
    return JSONResponse(_job(await client.get(job_id)))


@router.delete(
    "/jobs/{job_id}",
    response_model=JobRecord,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def cancel_job(job_id: JobId, client: ClientDep) -> Any:
    """Cancel: a pending job at once; a running one is stopped by its owner within
    about a second (the returned row shows cancel_requested)."""
    return JSONResponse(_job(await client.cancel(job_id)))


@router.post(
    "/jobs/{job_id}/retry",
    response_model=JobRecord,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def retry_job(job_id: JobId, client: ClientDep) -> Any:
    """Put a failed or cancelled job back to pending, due now."""
    return JSONResponse(_job(await client.retry(job_id)))


def _job(record: JobRecord) -> dict[str, Any]:
    return record.to_json()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
