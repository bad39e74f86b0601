"""The HTTP API every replica serves (FastAPI): health, readiness, metrics, status,
jobs, replicas, and its OpenAPI description.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything
else, ``/openapi.json`` included, needs ``Authorization: Bearer <DISPATCHER_API_TOKEN>``
(compared in constant time). With no token configured those routes answer 403,
unless the replica was started with ``--insecure-no-auth``.

Bad requests get a 4xx naming the field (unknown fields, wrong types, values out of
range, bodies over the size limit); a database outage gets 503, never a 500.
"""

from __future__ import annotations

import datetime as dt
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, Protocol

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, Strict

from dispatcher.core.config import Settings
from dispatcher.core.database_errors import CONNECTION_ERRORS, describe, is_transient
from dispatcher.core.errors import (
    DispatcherError,
    InvalidArgument,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    QueueFull,
    SchemaNotReady,
)
from dispatcher.core.metrics import Metrics
from dispatcher.core.queries import queries_for
from dispatcher.core.records import MAX_ATTEMPTS, MAX_TYPE_LENGTH, JobRecord, JobStatus
from dispatcher.database.migrate import check_schema_current
from dispatcher.producers.async_client import AsyncClient
from dispatcher.producers.plans import MAX_PAGE

BIGINT_MAX = 2**63 - 1
# Room for the envelope (type, options) around a payload of the maximum size.
ENVELOPE_BYTES = 64 * 1024

StrictInt = Annotated[int, Strict()]
StrictNumber = Annotated[float, Strict()]
JobId = Annotated[int, Path(ge=1, le=BIGINT_MAX, description="job id")]


class ReplicaView(Protocol):
    """What the API needs from the replica it runs in (the Runtime provides it)."""

    owner_id: str
    settings: Settings
    metrics: Metrics
    version: str
    started_at: float

    @property
    def role(self) -> str: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def term(self) -> int | None: ...

    @property
    def pool(self) -> asyncpg.Pool: ...

    def running_by_type(self) -> dict[str, int]: ...

    def claiming_problem(self) -> str | None:
        """Why this replica's claim loop cannot start, while it cannot (else None)."""
        ...

    def limits(self) -> dict[str, Any]: ...

    def status_extras(self) -> dict[str, Any]: ...


# --- request and response bodies -----------------------------------------------------


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
    cache_ttl: StrictNumber | None = Field(
        None,
        gt=0,
        le=365 * 86400,
        description="seconds: return a job of this type and unique_key that completed "
        "within them (200, with its result) instead of running it again",
    )


class BulkRetry(BaseModel):
    retried: int


class JobTypeOut(BaseModel):
    type: str
    paused: bool
    max_pending: int | None
    accepting: bool
    pending: int | None


class JobPage(BaseModel):
    jobs: list[JobRecord]
    next_before_id: int | None = Field(
        None, description="pass as before_id for the next page; null on the last page"
    )


class Problem(BaseModel):
    detail: str


class DuplicateJob(BaseModel):
    detail: str
    job: JobRecord


def _job(record: JobRecord) -> dict[str, Any]:
    return record.to_json()


# --- the app -----------------------------------------------------------------------------


def build_api(replica: ReplicaView, *, insecure_no_auth: bool = False) -> FastAPI:
    """The FastAPI application of one replica."""
    settings = replica.settings
    token = settings.api_token
    client_holder: dict[str, AsyncClient] = {}

    def client() -> AsyncClient:
        if "client" not in client_holder:
            client_holder["client"] = AsyncClient(pool=replica.pool, schema=settings.schema)
        return client_holder["client"]

    bearer = HTTPBearer(auto_error=False, description="DISPATCHER_API_TOKEN")

    # Default-value style: the annotation is resolved in module globals, where the
    # local ``bearer`` would not be found.
    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008
    ) -> None:
        if token is None:
            if insecure_no_auth:
                return
            raise HTTPException(
                403,
                "the API is disabled: no DISPATCHER_API_TOKEN is configured (set one, or "
                "start with --insecure-no-auth for local development)",
            )
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                "missing or wrong bearer token (Authorization: Bearer $DISPATCHER_API_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(require_token)]
    api = FastAPI(
        title="dispatcher",
        version=replica.version,
        description=__doc__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    api.add_middleware(_BodyLimit, limit=settings.max_payload_bytes + ENVELOPE_BYTES)
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem},
        403: {"model": Problem},
        503: {"model": Problem},
    }

    @api.exception_handler(DispatcherError)
    async def dispatcher_error(_request: Request, exc: DispatcherError) -> JSONResponse:
        status = 400
        if isinstance(exc, JobNotFound):
            status = 404
        elif isinstance(exc, InvalidTransition):
            status = 409
        elif isinstance(exc, InvalidJob | InvalidArgument):
            status = 422
        elif isinstance(exc, SchemaNotReady):
            status = 503
        elif isinstance(exc, QueueFull):
            return JSONResponse(
                {"detail": str(exc)},
                status_code=429,
                headers={"Retry-After": str(max(1, round(exc.retry_after)))},
            )
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @api.exception_handler(asyncpg.PostgresError)
    async def database_error(_request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        if is_transient(exc):
            return _unavailable(exc)
        return JSONResponse({"detail": f"the database refused it: {describe(exc)}"}, 422)

    @api.exception_handler(UnicodeEncodeError)
    async def not_unicode(_request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        # JSON may spell a lone surrogate ("\ud800"); no text encoding can carry it.
        bad = exc.object[exc.start : exc.end]
        detail = f"the request contains a lone surrogate ({bad!r}), which is not valid Unicode"
        return JSONResponse({"detail": detail}, 422)

    for error_type in CONNECTION_ERRORS:

        @api.exception_handler(error_type)
        async def connection_error(_request: Request, exc: Exception) -> JSONResponse:
            return _unavailable(exc)

    # --- open routes -----------------------------------------------------------------

    @api.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: answers while the event loop runs."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["probes"], responses={503: {"model": Problem}})
    async def readyz() -> JSONResponse:
        """Readiness: the database answers, the schema is current, this replica's role
        has every privilege the runtime needs, and its claim loop (if it claims) could
        start; and the replica is not shutting down."""
        if replica.stopping:
            return JSONResponse({"status": "unavailable", "detail": "shutting down"}, 503)
        try:
            async with replica.pool.acquire(timeout=2) as conn:
                await check_schema_current(conn, settings.schema)
                missing = await conn.fetch(
                    queries_for(settings.schema)["missing_runtime_privileges"], settings.schema
                )
        except SchemaNotReady as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, 503)
        except Exception as exc:
            detail = f"database unreachable: {describe(exc)}"
            return JSONResponse({"status": "unavailable", "detail": detail}, 503)
        if missing:
            lacks = ", ".join(row["missing"] for row in missing)
            detail = f"this replica's role lacks {lacks} (see `dispatcher roles`)"
            return JSONResponse({"status": "unavailable", "detail": detail}, 503)
        problem = replica.claiming_problem()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "detail": problem}, 503)
        return JSONResponse({"status": "ready"})

    @api.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics of this replica."""
        # Rendered in a worker thread: rendering never yields, and on the event loop it
        # held up lease renewals and heartbeats for as long as it took (seconds, for a
        # page of 50,000 job types before the type label was bounded). In a thread the
        # loop gets the GIL back every switch interval (5 ms). prometheus_client's
        # metrics are thread-safe. anyio's worker pool, not the loop's default executor,
        # where asyncpg resolves host names when it connects.
        page = await run_in_threadpool(generate_latest, replica.metrics.registry)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    # --- guarded routes ------------------------------------------------------------------

    @api.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return api.openapi()

    @api.get("/status", dependencies=guarded, tags=["cluster"], responses=errors)
    async def status() -> dict[str, Any]:
        """This replica (role, term, running jobs, limits) and the cluster as the
        database sees it (leader lease, queue depth per type)."""
        cluster = await client().cluster_status(alive_within=settings.alive_within)
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

    @api.get("/replicas", dependencies=guarded, tags=["cluster"], responses=errors)
    async def replicas() -> list[dict[str, Any]]:
        """Registered replicas, with whether each was seen recently."""
        cluster = await client().cluster_status(alive_within=settings.alive_within)
        return [
            {
                **row,
                "started_at": row["started_at"].isoformat(),
                "last_seen": row["last_seen"].isoformat(),
            }
            for row in cluster.replicas
        ]

    @api.post(
        "/jobs",
        dependencies=guarded,
        tags=["jobs"],
        status_code=201,
        response_model=JobRecord,
        responses={
            **errors,
            200: {"model": JobRecord, "description": "a cached result (cache_ttl)"},
            409: {"model": DuplicateJob, "description": "an active job has this unique_key"},
            413: {"model": Problem},
            422: {"description": "invalid job"},
            429: {"model": Problem, "description": "the type's queue is full (max_pending)"},
        },
    )
    async def enqueue(body: EnqueueRequest) -> Any:
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
        job = await client().enqueue(
            body.type,
            body.payload,
            priority=body.priority,
            run_at=run_at,
            max_attempts=body.max_attempts,
            timeout=body.timeout,
            unique_key=body.unique_key,
            cache_ttl=body.cache_ttl,
        )
        if job.cached:
            return JSONResponse(_job(job), status_code=200)
        if job.duplicate:
            return JSONResponse(
                {
                    "detail": f"an active {job.type!r} job already has unique_key "
                    f"{job.unique_key!r}",
                    "job": _job(job),
                },
                status_code=409,
            )
        return JSONResponse(_job(job), status_code=201)

    @api.get("/jobs", dependencies=guarded, tags=["jobs"], response_model=JobPage, responses=errors)
    async def list_jobs(
        status: JobStatus | None = None,
        type: Annotated[str | None, Query(min_length=1, max_length=MAX_TYPE_LENGTH)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        before_id: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
    ) -> Any:
        """Jobs newest first, filtered by status and type; page with before_id."""
        jobs = await client().list_jobs(
            status=status.value if status else None, type=type, before_id=before_id, limit=limit
        )
        next_before = jobs[-1].id if len(jobs) == limit else None
        return JSONResponse({"jobs": [_job(j) for j in jobs], "next_before_id": next_before})

    @api.post(
        "/jobs/retry",
        dependencies=guarded,
        tags=["jobs"],
        response_model=BulkRetry,
        responses={**errors, 422: {"model": Problem}},
    )
    async def retry_jobs(
        status: Annotated[str, Query(pattern="^(failed|cancelled)$")] = "failed",
        type: Annotated[str | None, Query(min_length=1, max_length=MAX_TYPE_LENGTH)] = None,
    ) -> Any:
        """Retry every failed (or cancelled) job, optionally only of one type: the
        dead-letter queue, back to pending."""
        return {"retried": await client().retry_many(status=status, type=type)}

    @api.get("/types", dependencies=guarded, tags=["types"], response_model=list[JobTypeOut],
             responses=errors)  # fmt: skip
    async def job_types() -> Any:
        """Types with cluster-wide controls: paused, max_pending and whether their
        queue accepts jobs."""
        return [vars(t) for t in await client().job_types()]

    @api.post("/types/{type}/pause", dependencies=guarded, tags=["types"],
              response_model=JobTypeOut, responses=errors)  # fmt: skip
    async def pause(type: Annotated[str, Path(min_length=1, max_length=MAX_TYPE_LENGTH)]) -> Any:
        """Stop claiming the type across the cluster (within a second); running jobs
        finish. Survives leader changes."""
        return vars(await client().pause(type))

    @api.post("/types/{type}/resume", dependencies=guarded, tags=["types"],
              response_model=JobTypeOut, responses=errors)  # fmt: skip
    async def resume(type: Annotated[str, Path(min_length=1, max_length=MAX_TYPE_LENGTH)]) -> Any:
        """Claim the type again."""
        return vars(await client().resume(type))

    @api.get(
        "/jobs/{job_id}",
        dependencies=guarded,
        tags=["jobs"],
        response_model=JobRecord,
        responses={**errors, 404: {"model": Problem}},
    )
    async def get_job(job_id: JobId) -> Any:
        """One job, with progress, result and error history."""
        return JSONResponse(_job(await client().get(job_id)))

    @api.delete(
        "/jobs/{job_id}",
        dependencies=guarded,
        tags=["jobs"],
        response_model=JobRecord,
        responses={**errors, 404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def cancel_job(job_id: JobId) -> Any:
        """Cancel: a pending job at once; a running one is stopped by its owner within
        about a second (the returned row shows cancel_requested)."""
        return JSONResponse(_job(await client().cancel(job_id)))

    @api.post(
        "/jobs/{job_id}/retry",
        dependencies=guarded,
        tags=["jobs"],
        response_model=JobRecord,
        responses={**errors, 404: {"model": Problem}, 409: {"model": Problem}},
    )
    async def retry_job(job_id: JobId) -> Any:
        """Put a failed or cancelled job back to pending, due now."""
        return JSONResponse(_job(await client().retry(job_id)))

    return api


def _unavailable(exc: BaseException) -> JSONResponse:
    return JSONResponse({"detail": f"database unavailable: {describe(exc)}"}, status_code=503)


def _json_bytes(value: Any) -> bytes:
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# --- request size limit ---------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before parsing them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, int(declared))
            return
        seen = 0
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge as exc:
            if refused:
                await self._refuse(send, exc.size)

    async def _refuse(self, send: Send, size: int) -> None:
        detail = (
            f"request body of {size} bytes is over the limit of {self.limit}: the `payload` "
            f"field may be at most {self.limit - ENVELOPE_BYTES} bytes "
            "(DISPATCHER_MAX_PAYLOAD_BYTES)"
        )
        response = JSONResponse({"detail": detail}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
