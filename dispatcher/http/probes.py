"""Open routes for probes and scrapers: liveness, readiness and Prometheus metrics.
No token: a kubelet or a Prometheus server has none."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher.core.database_errors import describe
from dispatcher.core.errors import SchemaNotReady
from dispatcher.core.queries import queries_for
from dispatcher.database.migrate import check_schema_current
from dispatcher.http.dependencies import ReplicaDep, SettingsDep
from dispatcher.http.errors import Problem

router = APIRouter(tags=["probes"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answers while the event loop runs."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Problem}})
async def readyz(replica: ReplicaDep, settings: SettingsDep) -> JSONResponse:
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


@router.get("/metrics", response_class=Response)
async def metrics(replica: ReplicaDep) -> Response:
    """Prometheus metrics of this replica."""
    # Rendered in a worker thread: rendering never yields, and on the event loop it
    # held up lease renewals and heartbeats for as long as it took (seconds, for a
    # page of 50,000 job types before the type label was bounded). In a thread the
    # loop gets the GIL back every switch interval (5 ms). prometheus_client's
    # metrics are thread-safe. anyio's worker pool, not the loop's default executor,
    # where asyncpg resolves host names when it connects.
    page = await run_in_threadpool(generate_latest, replica.metrics.registry)
    return Response(page, media_type=CONTENT_TYPE_LATEST)
